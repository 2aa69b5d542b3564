"""The learned prior on the thickness frontier: data-only plans, LM and the prior plan on a ladder of
simulated SrTiO3 thicknesses (issue 20, the benchmark).

For each thickness (unit cells along [001]) this simulates and prepares the data exactly as
``bench/lm_ladder.py``'s ``prepare`` does (abTEM, 300 kV, 21.4 mrad, 1e6 e/Å², 150 Å defocus,
16×16 scan at 0.4 Å, 64 px; cached in ``--data/sto-<cells>``), then runs every method (a shipped
plan's name or a plan YAML; the method is its name or the file's stem) through
``ptycore reconstruct`` from the same init and ``ptycore evaluate`` against the truth, and writes
per thickness and method ``<method>.zarr``, ``eval-<method>/metrics.json`` and ``<method>.json``
(the summary below; a cached summary is reused: delete it to rerun).

What it reports (all from ``ptycore evaluate``):

- **SSIM (depth sum)**: ``ssim_phase_sum``, the SSIM of the depth-summed phase against the
  truth's over the scanned area (0.5 Å margin), after sub-pixel registration and removal of the
  constant phase offset;
- **3D SSIM**: the mean over the truth's slices (one per unit cell, 3.905 Å) of the per-slice
  phase SSIM (``ssim_per_slice``; a result with another slice count is remapped to the truth's
  slices conserving the total phase first, ``slices_compared: resampled``). MEP-Diffusion
  (Belardi, Lee et al.) report a 3D SSIM of the volume and the depth-summed SSIM; ours is the
  slice mean on the same registration as the depth sum;
- **correlation**: Pearson correlation of the depth-summed phase with the truth's
  (``correlation_phase_sum``: negative where a reconstruction inverted the contrast);
- **wall s**: the seconds of ``ptycore reconstruct`` (a shared 2-core machine: ±35 %);
- for a method whose plan uses the prior (a ``prior`` loss or a ``dps`` stage), the
  **hallucination check** ``ptycore evaluate --data-only <data-only result>`` (``--data-only``,
  default the ``default`` plan's result): the RMS phase change the prior made (rad, per
  truth-thickness slice), the SSIM between the two depth sums, and both held-out losses
  (where both results held positions out).

    python bench/prior_ladder.py                                  # 8 12 16 u.c., the four methods
    python bench/prior_ladder.py --cells 12 --methods default thick-prior
    python bench/prior_ladder.py --cells 8 --methods path/to/variant.yaml
    python bench/prior_ladder.py --cells 16 --methods default+bench/prior-refine.yaml   # PLAN from BASE's result
    python bench/prior_ladder.py --grid-check 12                  # the prior's grid on real data
    python bench/prior_ladder.py --cells 12 --checkpoint OUT.partial/checkpoints/lm.npz   # one stage's state
    python bench/prior_ladder.py --from-json results/bench/prior-ladder/prior-ladder.json
    python bench/prior_ladder.py --cells 12 16 --methods ptyrad --ptyrad-python /tmp/peers-venv/bin/python

Method ``ptyrad`` runs PtyRAD (not a dependency: its own environment, see ``bench/peers.md``) on the
same prepared patterns (``prepared.zarr``: its pixel size, scan, energy, aperture and defocus, one
slice per unit cell over the sample's thickness, 2 probe modes, batch 32, its Adam and usual
object constraints; ``--ptyrad-iterations``), writes its object as ``ptyrad.zarr`` (every slice,
positions in its object frame) and scores it with the same ``ptycore evaluate``; ``wall s`` is
PtyRAD's solve and the summary adds its median ``s_per_iter``.

Writes ``prior-ladder.md`` (the table), ``prior-ladder.json`` and ``prior-ladder.png`` (the
depth-summed phase per method and thickness, the truth in the first column) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from lm_ladder import prepare  # noqa: E402  (the ladder's simulation and preparation, shared)

METHODS = ["default", "multislice-study", "lm-multislice", "thick-prior"]
LATTICE_A = 3.905


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def method_name(method: str) -> str:
    """``default``, ``path/to/x.yaml`` -> ``x``; ``BASE+PLAN`` (PLAN run from BASE's result) -> ``BASE+plan``."""
    if "+" in method:
        base, plan = method.split("+", 1)
        return f"{method_name(base)}+{method_name(plan)}"
    return Path(method).stem if method.endswith((".yaml", ".yml")) else method


def plan_path(method: str) -> str:
    if "+" in method:
        return plan_path(method.split("+", 1)[1])
    if method.endswith((".yaml", ".yml")):
        return method
    return str(ROOT / "config/plans" / f"{method}.yaml")


def uses_prior(method: str) -> bool:
    from ptycore.plan import load_plan

    plan = load_plan(plan_path(method))
    return any("prior" in s.losses or s.engine == "dps" for s in plan.stages)


def measure(d: Path, out: Path, method: str, data_only: str | None, peer: dict | None = None) -> dict:
    """Reconstruct and evaluate one method on one thickness (cached in ``out/<name>.json``)."""
    name = method_name(method)
    summary = out / f"{name}.json"
    if summary.exists():
        return json.loads(summary.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if method == "ptyrad":
        return measure_ptyrad(d, out, peer or {})
    init = d / "init.zarr"
    base_s = 0.0
    if "+" in method:  # PLAN from BASE's result: BASE runs first (cached), its wall time counts
        base = method.split("+", 1)[0]
        base_s = measure(d, out, base, data_only)["wall_s"]
        init = out / f"{method_name(base)}.zarr"
    t0 = time.perf_counter()
    run(["ptycore", "reconstruct", "--plan", plan_path(method), "--data", str(d / "prepared.zarr"), "--init",
         str(init), "--out", str(out / f"{name}.zarr"), "--overwrite", "--quiet"])
    wall_s = base_s + time.perf_counter() - t0
    cmd = ["ptycore", "evaluate", "--result", str(out / f"{name}.zarr"), "--truth", str(d / "sim/truth.zarr"),
           "--init", str(d / "init.zarr"), "--out", str(out / f"eval-{name}"), "--no-figures", "--quiet",
           "--overwrite"]
    reference = out / f"{data_only}.zarr" if data_only else None
    prior = uses_prior(method)
    if prior and reference is not None and reference.exists():
        cmd += ["--data-only", str(reference)]
    run(cmd)
    return summarise(out, name, wall_s, reference if prior else None)


def measure_ptyrad(d: Path, out: Path, peer: dict) -> dict:
    """PtyRAD on ``d/prepared.zarr`` (see the module docstring), its object written as ``out/ptyrad.zarr``
    and evaluated like every other method."""
    import zarr
    from compare_ptyrad import ptyrad_python, solve_ptyrad

    from ptycore.store import create_store, seal_store, write_array

    python = ptyrad_python(peer.get("python"))
    if python is None:
        raise SystemExit("prior_ladder: error: method 'ptyrad' needs PtyRAD: pass --ptyrad-python (see bench/peers.md)")
    prepared = zarr.open_group(str(d / "prepared.zarr"), mode="r")
    attrs = dict(prepared.attrs)
    meta = attrs["metadata"]
    thickness_A = float(meta["thickness_A"])
    slices = max(1, round(thickness_A / LATTICE_A))
    step = meta["scan_step_A"]
    if abs(step[0] - step[1]) > 1e-9:
        raise SystemExit(f"prior_ladder: error: {d}/prepared.zarr: scan_step_A {step} is not square (PtyRAD: one step)")
    work = out / "ptyrad-run"
    shutil.rmtree(work, ignore_errors=True)  # PtyRAD's model files of an earlier run would be read as this one's
    work.mkdir(parents=True)
    np.save(work / "dp.npy", np.asarray(prepared["patterns"][...], np.float32))  # zero frequency at the centre
    spec = {"scan": list(attrs["scan_shape"]), "step_A": float(step[0]),
            "detector_px": int(attrs["detector_shape"][-1]), "pixel_A": float(attrs["pixel_size_A"]),
            "kv": float(meta["energy_kv"]),
            "conv_mrad": float(meta["convergence_mrad"]), "defocus_A": float(meta["defocus_A"]),
            "modes": peer.get("modes", 2), "slices": slices, "thickness_A": thickness_A, "batch": peer.get("batch", 32),
            "iterations": peer.get("iterations", 200), "threads": peer.get("threads", 2),
            "lr_object": 5e-4, "lr_probe": 1e-4, "object_constraints": True, "save_object": True}
    t0 = time.perf_counter()
    timing = solve_ptyrad(python, spec, work)
    wall_s = time.perf_counter() - t0
    with np.load(work / "object.npz") as f:
        phase, amplitude, centres_px = f["objp"], f["obja"], f["probe_centres_px"]
    result = out / "ptyrad.zarr"
    group = create_store(result)
    write_array(group, "object_phase", phase[:1].astype(np.float32))
    write_array(group, "object_amplitude", amplitude[:1].astype(np.float32))
    write_array(group, "positions_A", (centres_px * spec["pixel_A"]).astype(np.float32))
    write_array(group, "slice_thickness_A", np.float32(thickness_A / slices))
    group.attrs.update({"pixel_size_A": spec["pixel_A"], "made_by": "PtyRAD 1.0 (bench/prior_ladder.py)",
                        "ptyrad": {**spec, **timing}})
    seal_store(result)
    run(["ptycore", "evaluate", "--result", str(result), "--truth", str(d / "sim/truth.zarr"), "--out",
         str(out / "eval-ptyrad"), "--no-figures", "--quiet", "--overwrite"])
    row = summarise(out, "ptyrad", wall_s, None)
    row.update(s_per_iter=timing["s_per_iter"], iterations=spec["iterations"], slices=slices)
    (out / "ptyrad.json").write_text(json.dumps(row, indent=1))
    return row


def summarise(out: Path, name: str, wall_s: float, reference: Path | None) -> dict:
    m = json.loads((out / f"eval-{name}" / "metrics.json").read_text())
    per_slice = [v for v in (m.get("ssim_per_slice") or []) if v is not None]
    row = {"method": name, "ssim_phase_sum": m.get("ssim_phase_sum"),
           "ssim_3d": float(np.mean(per_slice)) if per_slice else None, "ssim_per_slice": per_slice,
           "slices_compared": m.get("slices_compared"), "correlation_phase_sum": m.get("correlation_phase_sum"),
           "wall_s": wall_s, "validation_loss": m.get("validation_loss")}
    check = m.get("prior_check")
    if check is not None:
        row["prior_check"] = check
    elif reference is not None:
        row["prior_check"] = None
        row["prior_check_missing"] = f"no data-only result at {reference}"
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


# ---------------------------------------------------------------- the figure and the table
def phase_sums(d: Path, out: Path, names: list[str]):
    """The registered depth-summed phase of each result and the truth on the comparison grid."""
    from ptycore.errors import PtycoreError
    from ptycore.evaluate import DEFAULT_MARGIN_A, compare_with_truth, load_reconstruction, result_origin

    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    init = load_reconstruction(d / "init.zarr", role="init")
    images, truth_img = {}, None
    for name in names:
        path = out / f"{name}.zarr"
        if not path.exists():
            continue
        rec = load_reconstruction(path, role="result")
        try:
            comparison = compare_with_truth(rec, truth, DEFAULT_MARGIN_A, result_origin(rec, init))
        except PtycoreError as err:
            print(f"{path}: {err}", file=sys.stderr)
            continue
        images[name] = comparison.result - np.mean(comparison.result)
        truth_img = comparison.truth - np.mean(comparison.truth)
    return truth_img, images


def plot(results: dict, data: Path, out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for rows in results.values() for n in rows))
    fig, axes = plt.subplots(len(results), len(names) + 1, figsize=(2.3 * (len(names) + 1), 2.4 * len(results)),
                             squeeze=False)
    for r, (cells, rows) in enumerate(results.items()):
        truth, images = phase_sums(data / f"sto-{cells}", out / f"sto-{cells}", names)
        lim = None if truth is None else (truth.min(), truth.max())
        for c, name in enumerate(["truth"] + names):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = truth if name == "truth" else images.get(name)
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
            row = rows.get(name, {})
            ssim = row.get("ssim_phase_sum")
            title = name if name == "truth" else f"{name}\nSSIM {ssim:.3f}" if ssim is not None else f"{name}\n—"
            ax.set_title(title, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{cells} u.c. ({cells * LATTICE_A:.0f} Å)")
    fig.suptitle("SrTiO3 [001], 300 kV, 1e6 e/Å²: depth-summed phase (truth's range)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def table(results: dict) -> str:
    lines = ["| u.c. (Å) | method | SSIM depth sum | 3D SSIM (slice mean) | correlation | wall s | "
             "prior vs data-only: RMS change rad / SSIM of sums / held-out ratio |",
             "|---|---|---|---|---|---|---|"]
    for cells, rows in results.items():
        for name, row in rows.items():
            check = row.get("prior_check")
            if check:
                ratio = check.get("validation_ratio")
                moved = (f"{fmt(check.get('rms_phase_difference_rad'), '.3g')} / {fmt(check.get('ssim_phase_sum'))} / "
                         f"{fmt(ratio, '.3f')}")
            else:
                moved = row.get("prior_check_missing", "")
            lines.append(f"| {cells} ({cells * LATTICE_A:.0f}) | {name} | {fmt(row.get('ssim_phase_sum'))} | "
                         f"{fmt(row.get('ssim_3d'))} | {fmt(row.get('correlation_phase_sum'))} | "
                         f"{fmt(row.get('wall_s'), '.0f')} | {moved} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the prior's grid on real data
def grid_check(data: Path, out: Path, cells: int, result_name: str = "default", sigma_rad: float = 0.015) -> dict:
    """PriorMap.describe on the ladder's object grid and one slab denoised: the truth (resampled to
    the recon grid's slices), the truth plus noise of ``sigma_rad``, and a reconstruction's slab."""
    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptycore.evaluate import load_reconstruction
    from ptycore.prior.guidance import PriorMap, load_denoiser

    d = data / f"sto-{cells}"
    prior = load_denoiser("shipped")
    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    phase = np.asarray(truth.phase, np.float32).reshape((1,) + np.asarray(truth.phase).shape[-3:])
    pmap = PriorMap(prior, phase.shape[-2:], phase.shape[1], truth.pixel_size_A, truth.slice_thickness_A)
    x = pmap.to_prior(jnp.asarray(phase))
    rng = np.random.default_rng(0)
    noisy = x + sigma_rad * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    den_noisy = pmap.denoise(noisy, sigma_rad)
    den_clean = pmap.denoise(x, sigma_rad)
    report = {"cells": cells, "truth_map": pmap.describe(), "sigma_rad": sigma_rad,
              "prior_phase_scale_rad": prior.phase_scale_rad,
              "truth_slab_rms_rad": float(jnp.sqrt(jnp.mean((x - x.mean(axis=(-2, -1), keepdims=True)) ** 2))),
              "mse_identity_rad2": float(jnp.mean((noisy - x) ** 2)),
              "mse_denoised_rad2": float(jnp.mean((den_noisy - x) ** 2)),
              "clean_change_rms_rad": float(jnp.sqrt(jnp.mean((den_clean - x) ** 2))),
              "round_trip_error_rms_rad": float(jnp.sqrt(jnp.mean((pmap.from_prior(x) - phase) ** 2)))}
    panels = [("truth slab", x), (f"+ noise {sigma_rad:g} rad", noisy), ("denoised", den_noisy)]
    rec_path = out / f"sto-{cells}" / f"{result_name}.zarr"
    if rec_path.exists():
        rec = load_reconstruction(rec_path, role="result")
        rphase = np.asarray(rec.phase, np.float32)
        rphase = rphase.reshape((1,) + rphase.shape[-3:])
        rmap = PriorMap(prior, rphase.shape[-2:], rphase.shape[1], rec.pixel_size_A, rec.slice_thickness_A)
        xr = rmap.to_prior(jnp.asarray(rphase))
        dr = rmap.denoise(xr, sigma_rad)
        report.update(result=str(rec_path), result_map=rmap.describe(),
                      result_red_residual_rms_rad=float(jnp.sqrt(jnp.mean((xr - dr) ** 2))))
        panels += [(f"{result_name} slab", xr), ("denoised", dr)]
    jax.clear_caches()
    slab = pmap.prior_slices // 2
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (title, arr) in zip(axes, panels, strict=True):
        img = np.asarray(arr)[0, min(slab, arr.shape[1] - 1)]
        ax.imshow(img, cmap="gray")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"SrTiO3 {cells} u.c.: prior slab {slab} of the prior's grid (2 Å, 0.2 Å px)", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"grid-check-{cells}.png", dpi=110)
    (out / f"grid-check-{cells}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def checkpoint_metrics(data: Path, cells: int, checkpoint: Path) -> dict:
    """Depth-summed and per-slice SSIM against the truth of the state in a stage checkpoint
    (``<out>.partial/checkpoints/<stage>.npz``: its first leaves are the State's arrays), e.g. the
    ``lm`` stage of a prior plan before its ``dps`` stage (DPS on/off from one run)."""
    from ptycore.errors import InvalidData
    from ptycore.evaluate import DEFAULT_MARGIN_A, Reconstruction, compare_with_truth, load_reconstruction

    d = data / f"sto-{cells}"
    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    init = load_reconstruction(d / "init.zarr", role="init")
    with np.load(checkpoint, allow_pickle=False) as f:
        amplitude, phase, _, positions = (np.asarray(f[f"leaf{i}"]) for i in range(4))
        slice_A = float(f["leaf5"])
        meta = json.loads(str(f["meta"]))
    rec = Reconstruction(checkpoint, phase.astype(np.float64), amplitude, None, positions.astype(np.float64),
                         init.pixel_size_A, slice_A)
    try:
        m = compare_with_truth(rec, truth, DEFAULT_MARGIN_A).metrics
    except InvalidData as err:  # a state gone far off registers outside the truth's field
        row = {"checkpoint": str(checkpoint), "iteration": meta["iteration"], "ssim_phase_sum": None,
               "unregistered": str(err)}
        print(json.dumps(row))
        return row
    per_slice = [v for v in m["ssim_per_slice"] if v is not None]
    row = {"checkpoint": str(checkpoint), "iteration": meta["iteration"], "ssim_phase_sum": m["ssim_phase_sum"],
           "ssim_3d": float(np.mean(per_slice)), "correlation_phase_sum": m["correlation_phase_sum"]}
    print(json.dumps(row))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--methods", nargs="+", default=METHODS, help="shipped plan names or plan YAML paths")
    ap.add_argument("--data-only", default="default",
                    help="the data-only method the prior methods are checked against (run it first)")
    ap.add_argument("--ptyrad-python", help="Python of an environment with PtyRAD, for method 'ptyrad' "
                    "(default: $PTYRAD_PYTHON, this one)")
    ap.add_argument("--ptyrad-iterations", type=int, default=200, help="PtyRAD's iterations (method 'ptyrad')")
    ap.add_argument("--ptyrad-threads", type=int, default=2, help="PyTorch threads for PtyRAD on the CPU")
    ap.add_argument("--scan", type=int, default=16)
    ap.add_argument("--defocus-A", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=Path("/tmp/ladder"), help="simulated ladder (cached)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/prior-ladder")
    ap.add_argument("--grid-check", type=int, metavar="CELLS", help="only the prior-grid check on one thickness")
    ap.add_argument("--checkpoint", type=Path, help="only the SSIM of a stage checkpoint (with one --cells)")
    ap.add_argument("--from-json", type=Path, help="only tabulate and plot an earlier run's prior-ladder.json")
    args = ap.parse_args(argv)
    if args.grid_check:
        grid_check(args.data, args.out, args.grid_check, args.data_only)
        return
    if args.checkpoint:
        checkpoint_metrics(args.data, args.cells[0], args.checkpoint)
        return
    path = args.out / "prior-ladder.json"
    if args.from_json:
        results = {int(k): v for k, v in json.loads(args.from_json.read_text()).items()}
    else:
        results = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
        for cells in args.cells:
            d = prepare(args.data, cells, args.scan, args.defocus_A, args.seed)
            peer = {"python": args.ptyrad_python, "iterations": args.ptyrad_iterations, "threads": args.ptyrad_threads}
            rows = results.setdefault(cells, {})
            for method in args.methods:
                rows[method_name(method)] = measure(d, args.out / f"sto-{cells}", method, args.data_only, peer)
                print(f"{cells} u.c. {method_name(method)}: SSIM {fmt(rows[method_name(method)]['ssim_phase_sum'])}",
                      file=sys.stderr, flush=True)
                args.out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({str(k): v for k, v in sorted(results.items())}, indent=1))
    results = dict(sorted(results.items()))
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prior-ladder.md").write_text(text + "\n")
    plot(results, args.data, args.out, args.out / "prior-ladder.png")


if __name__ == "__main__":
    main()
