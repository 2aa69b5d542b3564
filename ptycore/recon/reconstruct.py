"""Run a plan end to end: validate everything, run stages, write the result store atomically."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import jax
import numpy as np

from ptycore.errors import InvalidData
from ptycore.plan import load_plan
from ptycore.recon.context import load_measurement
from ptycore.recon.runner import check_stage_detector, run_stage
from ptycore.recon.state import load_state, write_state
from ptycore.store import atomic_output, checksum, create_store, now_iso, open_store, provenance, write_array


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


def reconstruct(*, plan_path, data_path, init_path, out_path, stage=None, resume=False, overwrite=False,
                seed=None, progress=True, on_iteration=None) -> Path:
    """``on_iteration(iteration, scalars)``: see ``run_stage``; ``iteration`` counts over the stages run."""
    started = now_iso()
    plan = load_plan(plan_path)
    if seed is not None:
        plan = plan.model_copy(update={"seed": seed})
    stages = [plan.stage(stage)] if stage else list(plan.stages)
    measurement = load_measurement(data_path)
    state, pixel_A = load_state(init_path)
    check_compatible(state, pixel_A, measurement, init_path, data_path)
    for stage_cfg in stages:  # every stage's detector crop fits the data, before any compute
        check_stage_detector(stage_cfg, measurement)
    init_group = open_store(init_path)
    init_attrs = dict(init_group.attrs)
    previous_stages, previous_history = read_previous_history(init_group)
    plan_hash = plan.hash()
    records = []
    with atomic_output(out_path, overwrite=overwrite, keep_partial_on_error=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        done = 0  # iterations of the stages before this one (for on_iteration)
        for stage_cfg in stages:
            index = plan.stages.index(stage_cfg)
            hook = None if on_iteration is None else (lambda it, s, offset=done: on_iteration(offset + it, s))
            state, record = run_stage(stage_cfg, index, state, measurement, seed=plan.seed, plan_hash=plan_hash,
                                      workdir=tmp, resume=resume, progress=progress, on_iteration=hook)
            done += stage_cfg.iterations
            records.append(record)
        group = create_store(tmp / "result.zarr.tmp")
        write_state(group, state)
        write_history(group, records, previous_stages, previous_history)
        device = jax.devices()[0]
        group.attrs.update({
            "pixel_size_A": records[-1].pixel_size_A,  # the final stage's grid (its detector crop)
            "stages": previous_stages + [r.name for r in records],
            "provenance": provenance(
                verb="reconstruct",
                plan=plan.resolved(),
                plan_hash=plan_hash,
                stages_run=[r.name for r in records],
                inputs={str(data_path): checksum(data_path), str(init_path): checksum(init_path)},
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
            ),
        })
        # the store is the output: move it up, drop the checkpoints
        import shutil

        final = tmp.with_name(tmp.name + ".store")
        shutil.move(str(tmp / "result.zarr.tmp"), final)
        shutil.rmtree(tmp)
        final.rename(tmp)
    return Path(out_path)
