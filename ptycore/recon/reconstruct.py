"""Run a plan end to end: validate everything, run stages, write the result store atomically.

Before any compute: the plan, data and init are validated, the inputs are checksummed (the
checkpoints and the provenance record them), and the peak memory is estimated
(:mod:`ptycore.recon.memory`) and refused if it cannot fit. ``resume=True`` continues from
the checkpoints in ``<out>.partial`` (from scratch where there are none); when ``<out>``
already exists it is accepted as done if it was made by the same plan from the same inputs,
and refused otherwise.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ptycore.distributed import info as distributed_info
from ptycore.distributed import is_writer
from ptycore.errors import InvalidArgument, InvalidData, PtycoreError
from ptycore.plan import load_plan
from ptycore.recon import memory
from ptycore.recon.context import load_measurement
from ptycore.recon.engines.registry import REGISTRY
from ptycore.recon.placement import Placement
from ptycore.recon.runner import StopSignals, check_stage_detector, run_stage
from ptycore.recon.state import load_state, write_state
from ptycore.store import (
    atomic_output,
    checksum,
    create_store,
    now_iso,
    open_store,
    partial_path,
    provenance,
    write_array,
)


class Outcome(NamedTuple):
    path: Path
    already_complete: bool = False  # --resume found the finished result of this plan and these inputs


def _stored_patterns_shape(data_path) -> tuple[int, ...] | None:
    """The prepared store's patterns shape from its metadata (nothing is loaded), or None when
    it is not readable: ``load_measurement`` then reports what is wrong."""
    try:
        return tuple(int(n) for n in open_store(data_path)["patterns"].shape)
    except (PtycoreError, KeyError, TypeError, ValueError, AttributeError):
        return None


def estimate_memory(stages, state, patterns_shape, devices: int = 1, local_devices: int = 1) -> memory.Estimate:
    """The run's peak memory from the data's and the init's shapes (see ptycore.recon.memory)."""
    shapes = memory.stage_shapes(stages, n_positions=patterns_shape[0], detector_px=patterns_shape[1:],
                                 state_shapes={"object": state.object_phase.shape, "probe": state.probe.shape,
                                               "slice_thickness_A": float(state.slice_thickness_A)})
    return memory.estimate(shapes, stored_detector_px=patterns_shape[1:], devices=devices,
                           local_devices=local_devices)


def stage_memory(records, estimate: memory.Estimate | None) -> dict:
    """Provenance, per stage: the estimated bytes per device and every device's measured peak
    (``memory_stats()``'s peak since the run started, read at the stage's end; "n/a" where JAX
    does not report it, as on the CPU)."""
    out = {}
    for r in records:
        peaks = (r.memory or {}).get("peak_bytes") or []
        est = None if estimate is None else (estimate.stages or {}).get(r.name)
        out[r.name] = {
            "devices": (r.memory or {}).get("devices", []),
            "estimate_GB_per_device": None if est is None else round(est / memory.GB, 4),
            "peak_GB": ["n/a" if p is None else round(p / memory.GB, 4) for p in peaks]}
    return out


def input_checksums(data_path, init_path) -> dict:
    """What a checkpoint records of its inputs, and ``--resume`` compares: path and checksum of each."""
    return {"data": {"path": str(data_path), "checksum": checksum(data_path)},
            "init": {"path": str(init_path), "checksum": checksum(init_path)}}


def _is_finished(out_path: Path, plan_hash: str, inputs: dict, stage_names: list[str]) -> bool:
    """Whether ``out_path`` is a result store of this plan's stages from these inputs."""
    try:
        prov = dict(open_store(out_path).attrs).get("provenance") or {}
    except PtycoreError:
        return False
    recorded = sorted((prov.get("inputs") or {}).values())
    return (prov.get("plan_hash") == plan_hash and prov.get("stages_run") == stage_names
            and recorded == sorted(v["checksum"] for v in inputs.values()))


def check_compatible(state, init_pixel_A: float, measurement, init_path, data_path) -> None:
    """An init (or a previous stage's result) fits the data when it has one position per pattern
    and its probe window spans the data's field of view, ``n × init pixel = N × data pixel`` per
    axis (both are λ / Δα). The window may have other pixels than the detector: a stage that
    fitted a detector crop leaves a coarser pixel and a smaller window, and the next stage
    Fourier-resamples it to its own grid when it starts (see ptycore.recon.state.resample_pixels)."""
    if state.positions_A.shape[0] != measurement.n_positions:
        raise InvalidData(f"{init_path}: {state.positions_A.shape[0]} positions but {data_path} has "
                          f"{measurement.n_positions} patterns")
    window = tuple(int(n) for n in state.probe.shape[1:])
    detector = measurement.detector_shape
    init_fov = [n * init_pixel_A for n in window]
    data_fov = [n * measurement.pixel_size_A for n in detector]
    if any(abs(a - b) > 1e-5 * b for a, b in zip(init_fov, data_fov, strict=True)):
        raise InvalidData(
            f"{init_path}: probe window {window[0]}×{window[1]} of {init_pixel_A:.6g} Å pixels spans "
            f"{init_fov[0]:.5g}×{init_fov[1]:.5g} Å, but {data_path}'s detector {detector[0]}×{detector[1]} at "
            f"{measurement.pixel_size_A:.6g} Å spans {data_fov[0]:.5g}×{data_fov[1]:.5g} Å (not made for this data)")


def read_previous_history(group) -> tuple[list[str], dict[str, np.ndarray]]:
    """Stages and history of a result store used as ``--init`` (empty for an init store)."""
    if "history" not in group or "stages" not in group.attrs:
        return [], {}
    return list(group.attrs["stages"]), {name: np.asarray(arr[...]) for name, arr in group["history"].arrays()}


def write_history(group, records, previous_stages=(), previous=None) -> None:
    """history/<term> arrays over every stage so far: the ``previous`` history carried by the
    ``--init`` result store, then the stages run now; history/stage indexes ``attrs['stages']``."""
    previous = previous or {}
    n_prev = len(previous.get("s_per_iter", []))
    segments = [(np.asarray(previous.get("stage", np.zeros(n_prev)), np.int32), previous)] if n_prev else []
    for i, r in enumerate(records):
        n = len(r.history.get("s_per_iter", []))
        segments.append((np.full(n, len(previous_stages) + i, np.int32), r.history))
    write_array(group, "history/stage", np.concatenate([seg[0] for seg in segments]))
    terms = sorted({k for _, hist in segments for k in hist} - {"stage"})
    for term in terms:
        rows = []
        for stage_index, hist in segments:
            values = hist.get(term)
            rows.extend([np.nan] * len(stage_index) if values is None else [np.asarray(v) for v in values])
        if term == "probe_mode_powers":  # ragged over stages that change the mode count
            width = max(np.size(v) for v in rows)
            rows = [np.concatenate([np.ravel(v), np.full(width - np.size(v), np.nan)]) for v in rows]
        write_array(group, f"history/{term}", np.asarray(rows, np.float32))


def _print_warning(line: str) -> None:
    print(f"ptycore reconstruct: warning: {line}", file=sys.stderr, flush=True)


def resolve_plan(plan, data_path, init_path, state):
    """The plan for this data (its ``auto`` fields and expressions resolved, see
    ptycore.recon.autoplan), the facts, the rules' notes and the physics warnings."""
    from ptycore.recon import autoplan

    try:
        data_attrs = dict(open_store(data_path).attrs)
    except PtycoreError:
        if plan.adaptive:
            raise
        return plan, None, [], []
    init_attrs = dict(open_store(init_path).attrs)
    total = float(state.slice_thickness_A) * state.n_slices
    try:
        facts = autoplan.facts_for_run(data_attrs, _stored_patterns_shape(data_path), init_attrs, total, str(data_path))
    except (PtycoreError, KeyError, TypeError, ValueError):
        if plan.adaptive:
            raise
        return plan, None, [], []
    plan, notes = plan.resolve(facts)
    return plan, facts, notes, autoplan.slice_warnings(facts, plan.stages, state.n_slices, total)


def placement_warnings(stages, n_devices: int) -> list[str]:
    """One line per stage whose batches on ``n_devices`` devices are not one device's: ``random``
    grouping draws each device's share of a batch from that device's own positions (see
    ptycore/recon/placement.py), except in engines that keep one set of batches (LM)."""
    out = []
    for s in stages:
        if s.grouping == "random" and not getattr(REGISTRY[s.engine].load(), "fixed_batches", False):
            out.append(f"stage {s.name!r}: random grouping on {n_devices} devices draws each batch per device "
                       "(stratified), so the result is not the 1-device one within rounding; grouping: compact or "
                       "sparse gives the same batches on any device count")
    return out


def make_placement(devices, plan_devices: int = 1) -> Placement | None:
    """The run's devices: ``devices`` a count, ``"all"`` (every device of every process), or None
    (all of them when ``jax.distributed`` connected several processes, else the plan's
    ``devices``, default 1)."""
    if devices is None and jax.process_count() == 1 and plan_devices > len(jax.devices()):
        raise InvalidArgument(f"the plan asks for {plan_devices} devices (devices: {plan_devices}) and this process "
                              f"has {len(jax.devices())}: start it as {plan_devices} processes ('ptycore launch -n "
                              f"{plan_devices} -- reconstruct ...', srun or mpirun) or pass --devices 1")
    if devices is None:
        devices = "all" if jax.process_count() > 1 else plan_devices
    n = len(jax.devices()) if devices == "all" else int(devices)
    if n > len(jax.devices()):
        raise InvalidArgument(f"--devices {n}: the run has {len(jax.devices())} device(s) "
                              f"({jax.process_count()} process(es) × {jax.local_device_count()} local)")
    if n < 1:
        raise InvalidArgument(f"--devices must be >= 1, got {n}")
    return Placement.from_count(n) if n > 1 else None


def write_networks(group, records) -> None:
    """The networks of the stages that had them: ``networks/<stage>/<field>/`` with ``weights``
    and ``optimizer_state`` (each flattened in pytree order; the leaf paths in the attribute
    ``leaves``), ``input`` (the normalised input) and the architecture in the attributes; and
    each pre-training loss curve as ``history/pretrain_<field>/<stage>`` (one value per
    pre-training iteration, apart from the per-iteration ``history/<term>`` arrays)."""
    for r in records:
        for name, arrays in r.network_arrays.items():
            base = f"networks/{r.name}/{name}"
            for key in ("weights", "optimizer_state", "input", "mean", "scale"):
                write_array(group, f"{base}/{key}", arrays[key])
            group[base].attrs.update({**r.networks.get(name, {}), "step": arrays["step"],
                                      "leaves": arrays["leaves"],
                                      "pretrain_loss": (r.pretrain.get(name) or [None])[-1]})
        for name, losses in r.pretrain.items():
            if losses:
                write_array(group, f"history/pretrain_{name}/{r.name}", np.asarray(losses, np.float32))


def network_summary(records) -> dict:
    """Provenance: ``{stage: {field: architecture, parameters, pretrain iterations and losses}}``."""
    out = {}
    for r in records:
        for name, net in r.networks.items():
            losses = r.pretrain.get(name) or []
            out.setdefault(r.name, {})[name] = {
                **net, "pretrain_iterations": len(losses),
                "pretrain_loss_first": losses[0] if losses else None,
                "pretrain_loss_last": losses[-1] if losses else None}
    return out


def reconstruct(*, plan_path, data_path, init_path, out_path, stage=None, resume=False, restart_stale=False,
                overwrite=False, seed=None, progress=True, max_memory_gb=None, on_iteration=None,
                on_warning=_print_warning, devices=None) -> Outcome:
    """``on_iteration(iteration, scalars)``: see ``run_stage``; ``iteration`` counts over the stages run.
    ``on_warning(line)`` gets each physics warning (slices, probe window, overlap) before the run.
    ``devices``: see :func:`make_placement`. With several processes, process 0 writes the result
    and the checkpoints; every process reads the checkpoints on ``resume``."""
    started = now_iso()
    plan = load_plan(plan_path)
    placement = make_placement(devices, plan.devices)
    n_devices = 1 if placement is None else placement.n_devices
    writer = is_writer()
    out_path = Path(out_path)
    state, pixel_A = load_state(init_path)
    plan, facts, plan_notes, physics_warnings = resolve_plan(plan, data_path, init_path, state)
    if seed is not None:
        plan = plan.model_copy(update={"seed": seed})
    stages = [plan.stage(stage)] if stage else list(plan.stages)
    for stage_cfg in stages:  # the learned prior of every stage that uses one loads, before any compute
        if stage_cfg.uses_prior:
            from ptycore.prior.guidance import load_stage_prior

            load_stage_prior(stage_cfg)
    patterns_shape = _stored_patterns_shape(data_path)
    inputs = input_checksums(data_path, init_path)
    plan_hash = plan.hash()
    if resume and out_path.exists() and not overwrite:
        if _is_finished(out_path, plan_hash, inputs, [s.name for s in stages]):
            return Outcome(out_path, already_complete=True)
        raise InvalidArgument(f"{out_path}: output already exists and was not made by this plan from these "
                              "inputs (remove it or pass --overwrite)")
    estimate = available = None
    if patterns_shape is not None and len(patterns_shape) == 3:  # before loading anything large
        local = [jax.local_devices()[0]] if placement is None else placement.local_devices
        estimate = estimate_memory(stages, state, patterns_shape, n_devices, len(local))
        available = memory.available_memory(local)  # the least free of this process's devices
        memory.check_fits(estimate, available, max_memory_gb=max_memory_gb)
    # the init's convergence_mrad, if it has one; on N devices each process reads its own positions per stage
    measurement = load_measurement(data_path, init_path, per_process=placement is not None)
    check_compatible(state, pixel_A, measurement, init_path, data_path)
    for stage_cfg in stages:  # every stage's detector crop fits the data, before any compute
        check_stage_detector(stage_cfg, measurement)
    init_group = open_store(init_path)
    init_attrs = dict(init_group.attrs)
    previous_stages, previous_history = read_previous_history(init_group)
    if on_warning is not None and writer and not (resume and out_path.exists()):  # process 0 of several says it
        for line in physics_warnings:
            on_warning(line)
        if n_devices > 1:
            for line in placement_warnings(stages, n_devices):
                on_warning(line)
    records = []
    if not writer:  # another process writes; this one computes its share and reads the checkpoints
        output = contextlib.nullcontext(partial_path(out_path))
    else:
        output = atomic_output(out_path, overwrite=overwrite, keep_partial_on_error=True)
    with StopSignals() as stop, output as tmp:
        if writer:
            tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        done = 0  # iterations of the stages before this one (for on_iteration)
        for stage_cfg in stages:
            index = plan.stages.index(stage_cfg)
            hook = None if on_iteration is None else (lambda it, s, offset=done: on_iteration(offset + it, s))
            state, record = run_stage(stage_cfg, index, state, measurement, seed=plan.seed, plan_hash=plan_hash,
                                      workdir=tmp, resume=resume, progress=progress, inputs=inputs, stop=stop,
                                      restart_stale=restart_stale,
                                      on_iteration=hook, placement=placement)
            done += stage_cfg.iterations
            records.append(record)
        if not writer:
            return Outcome(out_path)
        # a signal from here on waits: writing the result takes seconds, and the run is then done
        group = create_store(tmp / "result.zarr.tmp")
        write_state(group, state)
        write_history(group, records, previous_stages, previous_history)
        write_networks(group, records)
        device = jax.devices()[0]
        group.attrs.update({
            "pixel_size_A": records[-1].pixel_size_A,  # the final stage's grid (its detector crop)
            "stages": previous_stages + [r.name for r in records],
            "thickness_A": init_attrs.get("thickness_A", float(state.slice_thickness_A) * state.n_slices),
            "provenance": provenance(
                verb="reconstruct",
                plan=plan.resolved(),
                autoplan=None if facts is None else {
                    "facts": facts.record(), "notes": plan_notes, "data_notes": list(facts.notes),
                    "warnings": physics_warnings},
                plan_hash=plan_hash,
                stages_run=[r.name for r in records],
                inputs={v["path"]: v["checksum"] for v in inputs.values()},
                upstream=init_attrs.get("provenance"),
                device_kind=device.device_kind,
                platform=device.platform,
                machine=platform.machine(),
                seed=plan.seed,
                started=started,
                finished=now_iso(),
                wall_seconds=time.perf_counter() - t0,
                stage_timings={r.name: {"seconds": r.seconds, "first_iteration_seconds": r.compile_seconds,
                                        "iterations": r.iterations, "compilations": r.compilations,
                                        "resumed_from": r.resumed_from} for r in records},
                stage_grids={r.name: {"pixel_size_A": r.pixel_size_A, "detector_px": list(r.detector_px)}
                             for r in records},
                compilations=sum(r.compilations for r in records),
                placement={**(Placement() if placement is None else placement).describe(),
                           "launcher": (distributed_info() or {}).get("launcher"),
                           # per stage: positions per device; per process: positions and chunks read
                           "stages": {r.name: r.placement for r in records if r.placement}},
                networks=network_summary(records),
                memory_estimate=None if estimate is None else {
                    **estimate.as_record(),
                    "host_free_GB": None if available.host is None else round(available.host / memory.GB, 3),
                    "device_free_GB": None if available.device is None else round(available.device / memory.GB, 3),
                    "max_memory_gb": max_memory_gb, "devices": n_devices},
                stage_memory=stage_memory(records, estimate),
            ),
        })
        if "convergence_mrad" in init_attrs:  # the init config's convergence angle, carried on to the next stage
            group.attrs["convergence_mrad"] = measurement.convergence_mrad
        # the store is the output: move it up, drop the checkpoints
        final = tmp.with_name(tmp.name + ".store")
        if final.exists():  # left by a run killed at this very step
            shutil.rmtree(final)
        shutil.move(str(tmp / "result.zarr.tmp"), final)
        shutil.rmtree(tmp)
        final.rename(tmp)
    return Outcome(out_path)
