"""Stage runner: iterations, schedules, progress, history, checkpoints, resume, divergence.

The runner owns everything on the host side of a stage; the engine owns the compiled
iteration. Checkpoints go to ``<partial>/checkpoints/<stage>.npz`` (the output's temporary
directory), so ``--resume`` continues a killed run; the same seed on the same hardware gives
identical arrays whether or not the run was interrupted. A checkpoint records the plan hash
and the checksums of the data and init it was made from, and is refused for any other.

Divergence (``Diverged``, the stage stops and its last good checkpoint is kept) is caught
after every iteration when

- a reported loss is not finite;
- the data-fit loss (``single``, ``poisson`` or ``anscombe``) exceeds ``DIVERGENCE_GROWTH`` times
  its best value so far in the stage and is worse than at the stage's first iteration. Good
  runs rise modestly at onsets (probe or positions starting to learn, a schedule step):
  measured on every plan in config/plans and config/test/plans (synthetic 12×12 scan, 1e5
  counts), the largest rise over the best so far was 1.14×, and 5.3× with the poisson loss
  on noise-free data (which it fits down to 6e-7); so 1000× leaves a wide margin and still
  stops a run that explodes (lr 1e6: the loss goes from 0.065 to 3.7e11). The second
  condition keeps a run that fitted noise-free data to 1e-7 and rose back to 1e-4 going;
- the state leaves physical bounds: an object phase beyond ``MAX_PHASE_RAD`` in any slice, an
  object amplitude beyond ``MAX_AMPLITUDE``, a probe carrying more than
  ``MAX_PROBE_POWER_RATIO`` times the data's mean counts per pattern, or a non-finite value in
  any state array.

SIGTERM (Slurm at walltime or preemption) and SIGINT, inside :class:`StopSignals`, let the
current iteration finish, write a checkpoint and stop with ``Interrupted``; ``--resume`` then
continues from there with the same arrays as an uninterrupted run.

A stage with ``resample.detector_px`` fits the central detector pixels only
(``stage_measurement``): its object pixel is coarser, and the state is Fourier-resampled to
that grid on entry, so the engine, its carry and the checkpoints all live on the stage's grid.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ptycore.distributed import is_writer
from ptycore.errors import Diverged, Interrupted, InvalidData, InvalidPlan
from ptycore.physics.electron import wavelength_A
from ptycore.recon.context import Context, Measurement
from ptycore.recon.engines import make_engine
from ptycore.recon.engines.base import ownership
from ptycore.recon.placement import Placement
from ptycore.recon.state import State, resample_state

#: data-fit loss above this many times its best so far in the stage: diverged
DIVERGENCE_GROWTH = 1e3
#: |object phase| (rad, any slice) beyond this: diverged (real objects: a few rad per slice)
MAX_PHASE_RAD = 1e3
#: object amplitude beyond this: diverged (a physical transmission has amplitude <= 1)
MAX_AMPLITUDE = 1e3
#: probe power (sum |probe|^2) beyond this many times the data's mean counts per pattern: diverged
MAX_PROBE_POWER_RATIO = 1e6
#: the loss terms that fit the data, in the order the engines prefer them
DATA_FIT_TERMS = ("single", "poisson", "anscombe")


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
    #: networks generating the object/probe: {field: architecture, parameter count, ...}
    networks: dict = field(default_factory=dict)
    #: pre-training loss per network and pre-training iteration: {field: [loss, ...]}
    pretrain: dict[str, list] = field(default_factory=dict)
    #: the networks' weights, optimiser state and input at the end (host arrays, for the store)
    network_arrays: dict = field(default_factory=dict)
    #: on N devices: positions per device, and per process what it read and holds
    placement: dict = field(default_factory=dict)
    #: the stage's devices and each one's measured peak bytes at its end (None where JAX does not
    #: report it, as on the CPU); ``reconstruct.stage_memory`` adds the estimate per device
    memory: dict = field(default_factory=dict)


def _checkpoint_path(workdir: Path, stage_name: str) -> Path:
    return workdir / "checkpoints" / f"{stage_name}.npz"


def save_checkpoint(path: Path, carry, it: int, record: StageRecord, plan_hash: str,
                    inputs: dict | None = None) -> None:
    """Write the carry after iteration ``it`` atomically (a temporary file renamed over the old
    checkpoint). On a write error (a full disk) the temporary file is removed, the previous
    checkpoint is left as it was, and the ``OSError`` is raised."""
    leaves = jax.tree_util.tree_leaves(carry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    meta = {"iteration": it, "plan_hash": plan_hash, "inputs": inputs or {}, "history": record.history,
            "seconds": record.seconds, "pretrain": record.pretrain}
    try:
        np.savez(tmp, meta=np.asarray(json.dumps(meta)),
                 **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _unreadable(path: Path, why: str) -> InvalidData:
    return InvalidData(f"{path}: checkpoint {why}; remove it or run without --resume")


def load_checkpoint(path: Path, template_carry, plan_hash: str, inputs: dict | None = None):
    """The carry and meta of a checkpoint, refused with one line (``InvalidData`` naming the file)
    when it is unreadable, belongs to another plan or other inputs, or does not fit the stage."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: np.asarray(f[k]) for k in f.files if k != "meta"}
        iteration = int(meta["iteration"])
        checkpoint_plan = meta["plan_hash"]
        history, seconds = dict(meta["history"]), float(meta["seconds"])
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise _unreadable(path, f"is unreadable (truncated or not a checkpoint: {err.__class__.__name__})") from None
    if checkpoint_plan != plan_hash:
        raise _unreadable(path, "belongs to a different plan")
    recorded = meta.get("inputs") or {}
    for role, now in (inputs or {}).items():
        then = recorded.get(role)
        if then is None:
            raise _unreadable(path, f"does not record which --{role} it was made from")
        if then["checksum"] != now["checksum"]:
            raise _unreadable(path, f"was made from --{role} {then['path']} ({then['checksum'][:19]}…), "
                                    f"not {now['path']} ({now['checksum'][:19]}…)")
    treedef = jax.tree_util.tree_structure(template_carry)
    template = jax.tree_util.tree_leaves(template_carry)
    names = [f"leaf{i}" for i in range(len(template))]
    if sorted(arrays) != sorted(names) or any(arrays[n].shape != t.shape for n, t in zip(names, template, strict=True)):
        raise _unreadable(path, "holds other arrays than this stage's (another plan version or ptycore version)")
    leaves = [jnp.asarray(arrays[n], dtype=t.dtype) for n, t in zip(names, template, strict=True)]
    meta = {**meta, "iteration": iteration, "history": history, "seconds": seconds}
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


class StopSignals:
    """While active (``with StopSignals() as stop``), SIGTERM and SIGINT only set
    ``stop.received``; the stage runner checks it between iterations, writes a checkpoint and
    raises ``Interrupted``. A second SIGINT raises ``KeyboardInterrupt`` at once. The previous
    handlers are restored on exit. Outside the main thread (where Python cannot install
    handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


@jax.jit
def _state_extremes(state: State):
    """(max |object phase|, max object amplitude, probe power, every state array finite)."""
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(state)]))
    return (jnp.max(jnp.abs(state.object_phase)), jnp.max(state.object_amplitude),
            jnp.sum(jnp.abs(state.probe) ** 2), finite)


def divergence(scalars: dict, history: dict, state: State, mean_counts: float) -> str | None:
    """Why the iteration that reported ``scalars`` and left ``state`` diverged, or None.
    ``history`` holds the stage's earlier iterations (not this one); see the module docstring."""
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
        return f"loss {bad[0]} is not finite"
    fit = next((k for k in DATA_FIT_TERMS if k in scalars), None)
    if fit is not None and history.get(fit):
        best, first = min(history[fit]), history[fit][0]
        if best > 0 and scalars[fit] > DIVERGENCE_GROWTH * best and scalars[fit] > first:
            return (f"loss {fit} {scalars[fit]:.3g} is over {DIVERGENCE_GROWTH:.0f}× its best {best:.3g} "
                    f"in this stage")
    phase, amplitude, power, finite = (float(x) for x in jax.device_get(_state_extremes(state)))
    if not finite:
        return "the state (object, probe, positions or tilts) is not finite"
    if phase > MAX_PHASE_RAD:
        return f"object phase reaches {phase:.3g} rad (bound {MAX_PHASE_RAD:.0f} rad per slice)"
    if amplitude > MAX_AMPLITUDE:
        return f"object amplitude reaches {amplitude:.3g} (bound {MAX_AMPLITUDE:.0f})"
    if mean_counts > 0 and power > MAX_PROBE_POWER_RATIO * mean_counts:
        return (f"probe power {power:.3g} is over {MAX_PROBE_POWER_RATIO:.0e}× the data's mean counts "
                f"{mean_counts:.3g} per pattern")
    return None


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

    def note(self, text: str):
        """A line about the stage (its networks, their pre-training) before the iterations."""
        if self.bar is not None:
            self.bar.console.print(f"[{self.stage_name}] {text}", markup=False, highlight=False)
        elif self.enabled:
            print(f"[{self.stage_name}] {text}", file=sys.stderr, flush=True)

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
              inputs: dict | None = None,
              stop: StopSignals | None = None, on_iteration=None, observe=None,
              restart_stale: bool = False, placement=None) -> tuple[State, StageRecord]:
    """Run one stage from ``state``; returns the final state and the stage's record.

    ``on_iteration(it, scalars)``, if given, is called after every iteration (once its history
    and checkpoint are written) with the iteration and its scalar terms (e.g. ``validation``);
    an exception it raises stops the stage (``ptycore tune`` prunes trials this way).
    ``restart_stale`` (with ``resume``): a checkpoint that cannot continue this stage (another
    plan, other inputs, unreadable) is removed with a one-line warning and the stage starts over,
    instead of being refused (the workflow's retries: a stale checkpoint is useless there).
    ``observe(it, scalars, state, seconds)`` (benchmarks) also gets the state after the iteration
    and the stage's compute seconds so far (the observer's own time is not counted).

    ``measurement`` is the full prepared data; the stage fits ``stage_measurement`` of it, and
    ``state`` (on any probe window over the same field of view, e.g. a coarser stage's) is
    resampled to the stage's grid first. ``record.pixel_size_A`` is the returned state's pixel.
    ``inputs`` (``{"data": {"path", "checksum"}, "init": {...}}``) goes into every checkpoint and
    must match on resume. With ``stop`` (a :class:`StopSignals`), a signal ends the stage after
    the current iteration with a checkpoint and ``Interrupted``. Raises ``Diverged`` (see the
    module docstring) without overwriting the last good checkpoint. ``placement``
    (``ptycore.recon.placement.Placement``) runs the stage on several devices (default: one)."""
    measurement = stage_measurement(stage, measurement)
    state = resample_state(state, stage.resample, measurement.pixel_size_A, measurement.detector_shape)
    if placement is not None:  # the owners from the positions, then each process reads its own patterns
        owner, _ = ownership(stage, placement, state.positions_A, measurement.n_positions, seed, stage_index)
        measurement = replace(measurement, placement=placement)
        measurement = replace(measurement, placed=placement.place(measurement, owner))
    ctx = Context.build(measurement, state.positions_A, state.object_phase.shape[-2:], stage.propagator_bandlimit)
    engine = make_engine(stage, ctx, measurement, state, seed, stage_index)
    carry = engine.init_carry(state)
    record = StageRecord(stage.name, stage.engine, stage.iterations, pixel_size_A=measurement.pixel_size_A,
                         detector_px=measurement.detector_shape)
    if measurement.placed is not None:
        record.placement = {"positions_per_device": measurement.placed.positions_per_device,
                            "processes": measurement.placed.read_per_process}
    first = 0
    ckpt = _checkpoint_path(workdir, stage.name) if workdir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        try:
            carry, meta = load_checkpoint(ckpt, carry, plan_hash, inputs)
        except InvalidData as err:
            if not restart_stale:
                raise
            print(f"warning: {err}: removed, stage {stage.name!r} starts over", file=sys.stderr, flush=True)
            ckpt.unlink()
            meta = None
        if meta is not None:
            record.history = meta["history"]
            record.seconds = meta["seconds"]
            first = meta["iteration"] + 1
            record.resumed_from = first
            record.pretrain = dict(meta.get("pretrain") or {})
    if first == 0 and hasattr(engine, "pretrain"):  # networks fit the incoming estimate first (not on resume)
        carry, record.pretrain = engine.pretrain(carry)
    record.networks = engine.describe_networks() if hasattr(engine, "describe_networks") else {}
    bar = _Progress(stage.name, stage.iterations, progress)
    for line in network_lines(record):
        bar.note(line)
    last_good = first - 1
    try:
        for it in range(first, stage.iterations):
            t0 = time.perf_counter()
            carry, terms = engine.iteration(carry, it)
            terms = jax.device_get(engine.local(terms))  # waits for the iteration to finish
            dt = time.perf_counter() - t0
            if it == first:
                record.compile_seconds = dt
            record.seconds += dt
            scalars = {k: float(v) for k, v in terms.items() if np.ndim(v) == 0}
            why = divergence(scalars, record.history, engine.local(engine.to_state(carry)), ctx.mean_counts)
            if why:
                kept = f"last good checkpoint: iteration {last_good} in {ckpt}" if last_good >= 0 and ckpt \
                    else "no checkpoint"
                raise Diverged(f"stage {stage.name!r} diverged at iteration {it}: {why} ({kept}); "
                               f"lower the learning rates or check the data")
            for k, v in scalars.items():
                record.history.setdefault(k, []).append(v)
            record.history.setdefault("probe_mode_powers", []).append(np.asarray(terms["probe_mode_powers"]).tolist())
            record.history.setdefault("s_per_iter", []).append(dt)
            bar.update(it, scalars, dt)
            if ckpt is not None and ((it + 1) % stage.checkpoint_every == 0 or it + 1 == stage.iterations):
                if is_writer():  # process 0 of several
                    save_checkpoint(ckpt, engine.local(carry), it, record, plan_hash, inputs)
                last_good = it
            if on_iteration is not None:
                on_iteration(it, scalars)
            if observe is not None:
                observe(it, scalars, engine.local(engine.to_state(carry)), record.seconds)
            if stop is not None and stop.received is not None:
                if ckpt is not None and last_good != it:
                    if is_writer():
                        save_checkpoint(ckpt, engine.local(carry), it, record, plan_hash, inputs)
                    last_good = it
                name = signal.Signals(stop.received).name
                written = f"checkpoint written to {ckpt}; rerun with --resume" if ckpt is not None \
                    else "no checkpoint (no work directory)"
                raise Interrupted(f"interrupted by {name} after iteration {it} of stage {stage.name!r} "
                                  f"({it + 1}/{stage.iterations} done); {written}", signum=stop.received)
    finally:
        bar.close()
    record.compilations = engine.compilations()
    where = placement or Placement()
    record.memory = {"devices": [str(d) for d in where.devices], "peak_bytes": where.peak_memory()}
    if record.networks:
        record.network_arrays = engine.network_arrays(engine.local(carry))
    return engine.local(engine.to_state(carry)), record


def network_lines(record: StageRecord) -> list[str]:
    """One line per network: its size and its pre-training loss (first → last)."""
    lines = []
    for name, net in record.networks.items():
        text = (f"{name} network: U-Net {net['levels']} levels, {net['filters']} filters, "
                f"{net['channels']} channels, {net['parameters']:,} parameters")
        losses = record.pretrain.get(name) or []
        if losses:
            text += f"; pre-training {len(losses)} it: loss {losses[0]:.3g} -> {losses[-1]:.3g}"
        lines.append(text)
    return lines
