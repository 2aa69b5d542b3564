"""``ptycore inspect STORE``: a store's arrays, attributes, provenance and history at a glance.

Works on every ptycore store (data, prepared, init, result, truth, an aggregate's metrics.zarr):
it walks the groups, prints each array's name, shape, dtype and chunks, the attributes (long
values shortened unless ``--full``), a provenance summary with its upstream chain, and the
last value of every ``history/`` array, the networks that generated the object or probe
(``networks/<stage>/<field>``: architecture, parameter count, pre-training loss), and whether
the store's manifest is whole (``--verify``: every file's size and CRC-32 against the
manifest, see :mod:`ptycore.store`).
"""

from __future__ import annotations

import json

HELP = "print a store's arrays (name, shape, dtype), attributes, provenance summary and last history values"

_WIDTH = 110


def add_arguments(p):
    p.add_argument("store", help="a zarr store written by ptycore")
    p.add_argument("--full", action="store_true", help="print attributes and provenance in full (JSON)")
    p.add_argument("--verify", action="store_true",
                   help="check every file of the store against the size and CRC-32 recorded when it was written "
                        "(reads the whole store; opening it checks only that every file is there)")


def _short(value, full: bool) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    if full or len(text) <= _WIDTH:
        return text
    return text[: _WIDTH - 5] + " ..."


def _walk(group, prefix=""):
    """(name, array) for every array below ``group``, depth first, sorted by name."""
    import zarr

    for name, member in sorted(group.members(), key=lambda kv: kv[0]):
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from _walk(member, path + "/")


def _fmt_number(v) -> str:
    import math

    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


def _last_value(array) -> str:
    import numpy as np

    if array.shape == ():
        return _fmt_number(np.asarray(array[...]).item())
    if len(array.shape) == 0 or array.shape[0] == 0:
        return "(empty)"
    last = np.asarray(array[array.shape[0] - 1])
    if last.ndim == 0:
        return _fmt_number(last.item())
    return "[" + ", ".join(_fmt_number(x) for x in last.ravel()[:8].tolist()) + (" ..." if last.size > 8 else "") + "]"


def provenance_lines(prov: dict, full: bool) -> list[str]:
    if full:
        return json.dumps(prov, indent=1, default=str, ensure_ascii=False).splitlines()
    lines = []
    verb = prov.get("verb") or prov.get("command")
    plan = prov.get("plan")
    plan_name = plan.get("name") if isinstance(plan, dict) else plan
    head = [f"{verb}" if verb else "?"]
    if prov.get("created") or prov.get("finished"):
        head.append(f"at {prov.get('finished') or prov.get('created')}")
    if prov.get("hostname"):
        head.append(f"on {prov['hostname']}")
    lines.append(" ".join(head))
    if plan_name:
        lines.append(f"plan: {plan_name}" + (f" ({prov['plan_hash']})" if prov.get("plan_hash") else ""))
    timings = prov.get("stage_timings")
    if isinstance(timings, dict) and timings:
        parts = []
        for name, t in timings.items():
            if isinstance(t, dict):
                parts.append(f"{name} ({t.get('iterations')} it, {_fmt_number(float(t.get('seconds') or 0))} s)")
        lines.append("stages: " + ", ".join(parts))
    elif prov.get("stages_run"):
        lines.append("stages: " + ", ".join(prov["stages_run"]))
    device = ", ".join(str(prov[k]) for k in ("device_kind", "platform") if prov.get(k))
    if device:
        lines.append(f"device: {device}")
    lines += placement_lines(prov)
    if prov.get("wall_seconds") is not None:
        lines.append(f"wall time: {_fmt_number(float(prov['wall_seconds']))} s")
    versions = prov.get("versions") or {}
    vs = [f"ptycore {prov.get('ptycore_version')}"] if prov.get("ptycore_version") else []
    vs += [f"{k} {v}" for k, v in versions.items() if v]
    if vs:
        lines.append("versions: " + ", ".join(vs) + (f" (git {str(prov['git_commit'])[:10]})"
                                                    if prov.get("git_commit") else ""))
    if prov.get("slurm_job_id"):
        lines.append(f"slurm job: {prov['slurm_job_id']}")
    for key in ("seed", "seeds", "simulator"):
        if prov.get(key) is not None:
            lines.append(f"{key}: {_short(prov[key], False)}")
    inputs = prov.get("inputs")
    if isinstance(inputs, dict):
        for path, digest in inputs.items():
            lines.append(f"input: {path} {str(digest)[:20]}...")
    from ptycore.evaluate import upstream_chain

    chain = upstream_chain(prov)
    if chain:
        lines.append("upstream: " + " <- ".join(chain))
    return lines


def placement_lines(prov: dict) -> list[str]:
    """The devices a reconstruction ran on and, per stage, the memory of each device: the
    estimate (ptycore.recon.memory) and the measured peak, "n/a" where JAX does not report it."""
    lines = []
    placement = prov.get("placement")
    if isinstance(placement, dict) and (placement.get("devices") or 1) * (placement.get("processes") or 1) > 1:
        text = f"devices: {placement['devices']} over {placement.get('processes', 1)} process(es)"
        if placement.get("launcher"):
            text += f" (launcher {placement['launcher']})"
        lines.append(text)
        for stage, info in (placement.get("stages") or {}).items():
            reads = ", ".join(str(r.get("positions_read")) for r in info.get("processes", []))
            lines.append(f"  {stage}: positions per device {', '.join(map(str, info.get('positions_per_device', [])))}"
                         f"; read from the store per process {reads}")
    memory = prov.get("stage_memory")
    if isinstance(memory, dict) and memory:
        lines.append("memory per device (estimate; measured peak so far at the stage's end):")
        for stage, m in memory.items():
            est = m.get("estimate_GB_per_device")
            peaks = m.get("peak_GB") or []
            if peaks and all(p == "n/a" for p in peaks):
                measured = "n/a (not reported on this platform)"
            else:
                measured = ", ".join(p if isinstance(p, str) else f"{p:.3g}" for p in peaks) + " GB"
            n = len(m.get("devices") or []) or 1
            lines.append(f"  {stage}: {'?' if est is None else f'{est:.3g}'} GB on each of {n} device(s); "
                         f"measured {measured}")
    return lines


def network_lines(group) -> list[str]:
    """One line per network stored under ``networks/<stage>/<field>`` (see ptycore.recon.reconstruct)."""
    if "networks" not in group:
        return []
    lines = []
    for stage, stage_group in sorted(group["networks"].groups(), key=lambda kv: kv[0]):
        for name, net in sorted(stage_group.groups(), key=lambda kv: kv[0]):
            a = dict(net.attrs)
            text = (f"{stage}/{name}: {a.get('architecture', '?')} {a.get('levels')} levels, {a.get('filters')} "
                    f"filters, {a.get('channels')} channels, {a.get('parameters', 0):,} parameters, "
                    f"{a.get('optimizer')}, {a.get('step')} steps")
            if a.get("output"):
                text += f", output {a['output']}" + (" (identical slices)" if a.get("identical_slices") else "")
            if a.get("pretrain_loss") is not None:
                text += f", pre-training loss {_fmt_number(float(a['pretrain_loss']))}"
            lines.append(text)
    return lines


def run(args) -> int:
    from pathlib import Path

    from ptycore.errors import InvalidData
    from ptycore.store import MANIFEST_KEY, open_store, verify_store

    path = Path(args.store)
    try:
        group = open_store(path)
    except InvalidData:
        if path.is_dir():
            stores = sorted(p.name for p in path.glob("*.zarr"))
            if stores:
                raise InvalidData(f"{path}: not a zarr store (it holds {', '.join(stores)}; inspect one of "
                                  "those)") from None
        raise
    arrays = list(_walk(group))
    print(f"{path}  (zarr v{group.metadata.zarr_format}, {len(arrays)} arrays)")
    print("arrays:")
    width = max((len(n) for n, _ in arrays), default=10)
    history = []
    for name, arr in arrays:
        chunks = getattr(arr, "chunks", None)
        print(f"  {name:<{width}}  {str(tuple(arr.shape)):<22} {str(arr.dtype):<10} chunks {tuple(chunks)}")
        if name.startswith("history/"):
            history.append((name[len("history/"):], arr))
    attrs = dict(group.attrs)
    prov = attrs.pop("provenance", None)
    manifest = attrs.pop(MANIFEST_KEY, None)
    n_files = len(manifest.get("files", {})) if isinstance(manifest, dict) else 0
    if args.verify:
        checked = verify_store(path)
        print(f"verified: {checked} files match their sizes and CRC-32" if checked else
              "verified: nothing to check (no manifest: not written by ptycore, or by an older version)")
    elif n_files:
        print(f"manifest: {n_files} files, all present (--verify checks their contents)")
    else:
        print("manifest: none (not written by ptycore, or by an older version; not checked)")
    if attrs:
        print("attributes:")
        for key, value in attrs.items():
            print(f"  {key}: {_short(value, args.full)}")
    networks = network_lines(group)
    if networks:
        print("networks:")
        for line in networks:
            print(f"  {line}")
    if isinstance(prov, dict):
        print("provenance:")
        for line in provenance_lines(prov, args.full):
            print(f"  {line}")
    if history:
        lengths = {arr.shape[0] for _, arr in history if arr.shape}
        n = max(lengths) if lengths else 0
        print(f"history ({n} iterations), last values:")
        hw = max(len(t) for t, _ in history)
        for term, arr in history:
            print(f"  {term:<{hw}}  {_last_value(arr)}")
    return 0
