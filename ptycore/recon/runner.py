"""Stage runner: iterations, schedules, progress, history, checkpoints, resume, divergence.

The runner owns everything on the host side of a stage; the engine owns the compiled
iteration. Checkpoints go to ``<partial>/checkpoints/<stage>.npz`` (the output's temporary
directory), so ``--resume`` continues a killed run; the same seed on the same hardware gives
identical arrays whether or not the run was interrupted.

A stage with ``resample.detector_px`` fits the central detector pixels only
(``stage_measurement``): its object pixel is coarser, and the state is Fourier-resampled to
that grid on entry, so the engine, its carry and the checkpoints all live on the stage's grid.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from ptycore.errors import Diverged, InvalidData, InvalidPlan
from ptycore.physics.electron import wavelength_A
from ptycore.recon.context import Context, Measurement
from ptycore.recon.engines import make_engine
from ptycore.recon.state import State, resample_state


@dataclass
class StageRecord:
    name: str
    engine: str
    iterations: int
    history: dict[str, list] = field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0
    compilations: int = 0
    resumed_from: int | None = None
    pixel_size_A: float | None = None  # the stage's object pixel
    detector_px: tuple[int, int] | None = None  # the detector pixels it fitted (= its probe window)


def _checkpoint_path(workdir: Path, stage_name: str) -> Path:
    return workdir / "checkpoints" / f"{stage_name}.npz"


def save_checkpoint(path: Path, carry, it: int, record: StageRecord, plan_hash: str) -> None:
    leaves = jax.tree_util.tree_leaves(carry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    meta = {"iteration": it, "plan_hash": plan_hash, "history": record.history, "seconds": record.seconds}
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, template_carry, plan_hash: str):
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        if meta["plan_hash"] != plan_hash:
            raise InvalidData(f"{path}: checkpoint belongs to a different plan; remove it or run without --resume")
        treedef = jax.tree_util.tree_structure(template_carry)
        template = jax.tree_util.tree_leaves(template_carry)
        leaves = [jax.numpy.asarray(f[f"leaf{i}"], dtype=t.dtype) for i, t in enumerate(template)]
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


class _Progress:
    """A rich progress bar on a terminal; a log line every ~10 % otherwise (Snakemake logs)."""

    def __init__(self, stage_name: str, total: int, enabled: bool):
        self.total = total
        self.stage_name = stage_name
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{stage_name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(stage_name, total=total, info="")
            self.bar.start()

    def update(self, it: int, terms: dict, s_per_iter: float):
        info = " ".join(f"{k}={v:.4g}" for k, v in terms.items() if k != "probe_mode_powers")
        info += f" {s_per_iter:.3f} s/iter"
        if self.bar is not None:
            self.bar.update(self.task, completed=it + 1, info=info)
        elif self.enabled and (it == 0 or (it + 1) % max(1, self.total // 10) == 0 or it + 1 == self.total):
            print(f"[{self.stage_name}] iter {it + 1}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def check_stage_detector(stage, measurement: Measurement) -> None:
    """Raise ``InvalidPlan`` (naming the stage and both sizes) if the stage's ``detector_px``
    does not fit the data: larger than the detector, a non-square detector, or a crop that
    would cut into the bright-field disc (the probe aperture must lie inside the kept band)."""
    n = stage.resample.detector_px
    if n is None:
        return
    ny, nx = measurement.detector_shape
    where = f"stage {stage.name!r}: resample.detector_px {n}"
    if n > min(ny, nx):
        raise InvalidPlan(f"{where} is larger than the detector ({ny}×{nx} pixels) of "
                          f"{measurement.source or 'the data'}")
    if ny != nx:
        raise InvalidPlan(f"{where} needs a square detector, the data's is {ny}×{nx}")
    pixel_mrad = wavelength_A(measurement.energy_kv) / (ny * measurement.pixel_size_A) * 1e3
    kept_mrad = (n // 2 - 1) * pixel_mrad
    if measurement.convergence_mrad > kept_mrad:
        raise InvalidPlan(f"{where} keeps angles up to {kept_mrad:.3g} mrad, inside the probe's convergence "
                          f"semi-angle {measurement.convergence_mrad:.3g} mrad (detector {ny}×{nx}, "
                          f"{pixel_mrad:.3g} mrad/pixel): use at least "
                          f"{2 * math.ceil(measurement.convergence_mrad / pixel_mrad + 1)} pixels")


def stage_measurement(stage, measurement: Measurement) -> Measurement:
    """The data a stage fits: the central ``resample.detector_px`` pixels of every pattern (its
    object pixel ``pixel_size_A × N / detector_px``), or all of them."""
    check_stage_detector(stage, measurement)
    n = stage.resample.detector_px
    return measurement if n is None else measurement.cropped(n)


def run_stage(stage, stage_index: int, state: State, measurement: Measurement, *, seed: int, plan_hash: str,
              workdir: Path | None, resume: bool = False, progress: bool = True,
              bandlimit: float | None = 2 / 3, on_iteration=None) -> tuple[State, StageRecord]:
    """Run one stage from ``state``; returns the final state and the stage's record.

    ``on_iteration(it, scalars)``, if given, is called after every iteration (once its history
    and checkpoint are written) with the iteration and its scalar terms (e.g. ``validation``);
    an exception it raises stops the stage (``ptycore tune`` prunes trials this way).

    ``measurement`` is the full prepared data; the stage fits ``stage_measurement`` of it, and
    ``state`` (on any probe window over the same field of view, e.g. a coarser stage's) is
    resampled to the stage's grid first. ``record.pixel_size_A`` is the returned state's pixel."""
    measurement = stage_measurement(stage, measurement)
    state = resample_state(state, stage.resample, measurement.pixel_size_A, measurement.detector_shape)
    ctx = Context.build(measurement, state.positions_A, state.object_phase.shape[-2:], bandlimit)
    engine = make_engine(stage, ctx, measurement, state, seed, stage_index)
    carry = engine.init_carry(state)
    record = StageRecord(stage.name, stage.engine, stage.iterations, pixel_size_A=measurement.pixel_size_A,
                         detector_px=measurement.detector_shape)
    first = 0
    ckpt = _checkpoint_path(workdir, stage.name) if workdir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        carry, meta = load_checkpoint(ckpt, carry, plan_hash)
        record.history = meta["history"]
        record.seconds = meta["seconds"]
        first = meta["iteration"] + 1
        record.resumed_from = first
    bar = _Progress(stage.name, stage.iterations, progress)
    last_good = first - 1
    try:
        for it in range(first, stage.iterations):
            t0 = time.perf_counter()
            carry, terms = engine.iteration(carry, it)
            terms = jax.device_get(terms)  # waits for the iteration to finish
            dt = time.perf_counter() - t0
            if it == first:
                record.compile_seconds = dt
            record.seconds += dt
            scalars = {k: float(v) for k, v in terms.items() if np.ndim(v) == 0}
            bad = [k for k, v in scalars.items() if not math.isfinite(v)]
            if bad:
                where = f"last good checkpoint at iteration {last_good}" if last_good >= 0 and ckpt else "no checkpoint"
                raise Diverged(f"stage {stage.name!r} diverged at iteration {it}: loss {bad[0]} is not finite "
                               f"({where}); lower the learning rates or check the data")
            for k, v in scalars.items():
                record.history.setdefault(k, []).append(v)
            record.history.setdefault("probe_mode_powers", []).append(np.asarray(terms["probe_mode_powers"]).tolist())
            record.history.setdefault("s_per_iter", []).append(dt)
            bar.update(it, scalars, dt)
            if ckpt is not None and ((it + 1) % stage.checkpoint_every == 0 or it + 1 == stage.iterations):
                save_checkpoint(ckpt, carry, it, record, plan_hash)
                last_good = it
            if on_iteration is not None:
                on_iteration(it, scalars)
    finally:
        bar.close()
    record.compilations = engine.compilations()
    return engine.to_state(carry), record
