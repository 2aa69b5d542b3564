"""Peak memory of a reconstruction, estimated before anything is compiled, and the memory free.

``reconstruct`` refuses a run whose estimate does not fit (``InsufficientMemory``, one line
naming the estimate and what is free), so a run that cannot fit fails in seconds instead of
being killed by the kernel or Slurm after its data has loaded. The estimate counts, in bytes:

- the measured patterns on the device, ``n_positions × ny × nx`` float32, and while they load
  the host's copies of them (the stored array, its clipped and FFT-ordered copies);
- the state (object amplitude and phase ``object_modes × slices × Hy × Wx`` float32, probe
  ``probe_modes × ny × nx`` complex64), twice: the caller's state and the engine's carry;
- the gradient engine: for each optimised parameter its gradient and, with Adam, two moments
  (momentum: one; L-BFGS: ``2 × memory`` history vectors);
- the per-batch working set: the waves incident on every slice, kept for the backward pass
  (gradient engine) or the back-propagation (ePIE, LSQML), ``batch × probe_modes ×
  object_modes × (slices + 1) × ny × nx`` complex64, the batch's object patches (complex64),
  and a few batch-sized FFT temporaries (``WORK_FACTOR`` waves);
- the runtime: Python, JAX and the XLA compiler (``RUNTIME_BYTES``).

Checked against the measured peak RSS (VmHWM) on CPU (gradient engine with Adam on object,
probe and positions unless noted; 2 iterations), measured / estimated:

=====================================================  ==========  ===========  =====
case (scan, detector, probe modes, slices, batch)       measured    estimated    ratio
=====================================================  ==========  ===========  =====
``ptycore reconstruct`` 24², 64², 2, 6, 32               0.448 GB    0.544 GB     0.82
``ptycore reconstruct`` 32², 96², 4, 8, 64               0.748 GB    0.834 GB     0.90
``ptycore reconstruct`` 48², 128², 2, 4, 256             1.356 GB    1.402 GB     0.97
``bench/reconstruct.py`` standard case (24², 64², 2, 6)  461 MiB     518 MiB      0.89
``bench/reconstruct.py`` 48², 128², 2, 4, 256            1303 MiB    1337 MiB     0.97
``bench/reconstruct.py --engine lsqml`` 48², 128², ...   1291 MiB    1332 MiB     0.97
``bench/reconstruct.py --engine epie`` standard case     451 MiB     517 MiB      0.87
=====================================================  ==========  ===========  =====

so the estimate is 3-18 % above the peak (the runtime's share dominates small runs, the
working set large ones). Not yet checked on a GPU, where the device part is compared with
``memory_stats()``. ``reconstruct`` records the estimate and the free memory in its
provenance (``memory_estimate``).

Free memory: the host's available RAM (psutil if installed, else /proc/meminfo's
MemAvailable, else ``os.sysconf``), lowered to the cgroup's limit (a Slurm job's ``--mem``);
on an accelerator, the device's ``memory_stats()`` limit minus what is in use holds the
device part of the estimate and the host keeps the loading copies and the runtime.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ptycore.errors import InsufficientMemory

GB = 1e9
#: Python + JAX + XLA's compiler and its buffers, before any array (measured: 0.36 GB on CPU)
RUNTIME_BYTES = int(0.5 * GB)
#: batch-sized complex64 temporaries beyond the stored slice waves (FFTs, far field, residual, model)
WORK_FACTOR = 4
#: host copies of the patterns while they load (stored float32 array, clipped, FFT-ordered)
LOAD_COPIES = 3


@dataclass(frozen=True)
class StageShape:
    """What one stage's memory depends on (the shapes after the stage's resampling)."""

    name: str
    engine: str
    n_positions: int
    detector_px: tuple[int, int]
    probe_modes: int
    object_modes: int
    slices: int
    object_px: tuple[int, int]
    batch_size: int
    optimizers: dict  # parameter -> (optimizer, lbfgs memory)


@dataclass(frozen=True)
class Estimate:
    """Estimated peak bytes. ``device``: data, state, optimiser and working set while a stage
    iterates (on a CPU in host memory too); ``runtime``: Python, JAX, XLA; ``loading``: the
    host's extra copies of the patterns while they load (before any stage runs). ``parts``
    splits ``device`` for the stage that peaks, ``stage``."""

    device: int
    runtime: int
    loading: int
    stage: str
    parts: dict  # label -> bytes, for the message

    @property
    def host(self) -> int:
        """Host bytes beside the device's on an accelerator."""
        return self.runtime + self.loading

    @property
    def total(self) -> int:
        """Peak bytes when the device is the host (CPU): loading and iterating do not overlap."""
        return self.runtime + max(self.device, self.loading + self.parts["data"])

    def as_record(self) -> dict:
        return {"peak_GB": round(self.total / GB, 3), "device_GB": round(self.device / GB, 3),
                "host_GB": round(self.host / GB, 3), "peak_stage": self.stage,
                **{f"{k.replace(' ', '_')}_GB": round(v / GB, 3) for k, v in self.parts.items()}}


def stage_shapes(stages, *, n_positions: int, detector_px: tuple[int, int], state_shapes: dict) -> list[StageShape]:
    """Follow the state's shapes through the stages' ``resample`` settings (as
    ``ptycore.recon.state.resample_state`` changes them). ``state_shapes``: the init's
    ``object`` (modes, slices, Hy, Wx), ``probe`` (modes, ny, nx) and ``slice_thickness_A``."""
    om, slices, hy, wx = state_shapes["object"]
    pm, wy, wx_window = state_shapes["probe"]
    thickness = float(state_shapes["slice_thickness_A"]) * slices
    out = []
    for stage in stages:
        r = stage.resample
        det = (r.detector_px, r.detector_px) if r.detector_px is not None else tuple(detector_px)
        hy, wx = math.ceil(hy * det[0] / wy), math.ceil(wx * det[1] / wx_window)  # same field of view
        wy, wx_window = det
        pm = r.probe_modes or pm
        if r.slice_thickness_A is not None:
            slices = max(1, round(thickness / r.slice_thickness_A))
        elif r.slices is not None:
            slices = r.slices
        hy, wx = hy + 2 * r.object_pad_px, wx + 2 * r.object_pad_px
        optimizers = {name: (cfg.optimizer, cfg.memory) for name, cfg in stage.optimize.items()}
        out.append(StageShape(stage.name, stage.engine, n_positions, det, pm, om, slices, (hy, wx),
                              min(stage.batch_size, n_positions), optimizers))
    return out


def _parameter_bytes(shape: StageShape) -> dict[str, int]:
    obj = shape.object_modes * shape.slices * shape.object_px[0] * shape.object_px[1] * 4
    probe = shape.probe_modes * shape.detector_px[0] * shape.detector_px[1] * 8
    return {"object_phase": obj, "object_amplitude": obj, "probe": probe, "positions": shape.n_positions * 8,
            "tilts": shape.n_positions * 8, "slice_thickness": 4}


def stage_bytes(shape: StageShape) -> dict[str, int]:
    """Device bytes of one stage: data, state (×2), optimiser, working set."""
    ny, nx = shape.detector_px
    params = _parameter_bytes(shape)
    state = params["object_phase"] + params["object_amplitude"] + params["probe"] + params["positions"]
    optimiser = 0
    if shape.engine == "gradient":
        for name, (optimizer, memory) in shape.optimizers.items():
            slots = {"adam": 2, "momentum": 1, "lbfgs": 2 * memory}.get(optimizer, 0)
            optimiser += (1 + slots) * params.get(name, 0)  # gradient + optimiser state
    wave = shape.batch_size * shape.probe_modes * shape.object_modes * ny * nx * 8
    patches = shape.batch_size * shape.object_modes * shape.slices * ny * nx * 8
    working = wave * (shape.slices + 1 + WORK_FACTOR) + patches
    if shape.engine != "gradient":  # the complex transmission of the whole object, kept per iteration
        working += shape.slices * shape.object_px[0] * shape.object_px[1] * 8
    return {"data": shape.n_positions * ny * nx * 4, "state": 2 * state, "optimiser": optimiser,
            "working set": working}


def estimate(shapes: list[StageShape], *, stored_detector_px: tuple[int, int], devices: int = 1) -> Estimate:
    """The peak over the stages (the data stay resident; each stage's state, optimiser and
    working set live only while it runs) and over the two phases of a run: loading the data
    (``LOAD_COPIES`` host copies of the patterns next to the device copy) and iterating.
    On ``devices`` > 1 (ptycore/recon/placement.py) ``device`` is one device's share: its
    positions' patterns and a sub-batch of ``ceil(batch / devices)`` positions, with the state
    and optimiser replicated."""
    n_pos = math.ceil(shapes[0].n_positions / devices)
    data = n_pos * stored_detector_px[0] * stored_detector_px[1] * 4
    best = None
    for shape in shapes:
        if devices > 1:
            shape = replace(shape, n_positions=n_pos, batch_size=math.ceil(shape.batch_size / devices))
        parts = stage_bytes(shape)
        parts["data"] = data  # the full data stay loaded
        if shape.detector_px != tuple(stored_detector_px):
            parts["data"] += n_pos * shape.detector_px[0] * shape.detector_px[1] * 4  # the stage's crop
        device = sum(parts.values())
        if best is None or device > best.device:
            best = Estimate(device, RUNTIME_BYTES, LOAD_COPIES * data, shape.name, parts)
    return best


@dataclass(frozen=True)
class Available:
    host: int | None
    device: int | None  # None: the device is the host (CPU)
    source: str


def _cgroup_free() -> int | None:
    """Bytes the process's cgroup may still allocate (v2 memory.max, v1 limit_in_bytes), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            limit_file, usage_file = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            limit_file, usage_file = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def available_host_bytes() -> tuple[int | None, str]:
    """(bytes of host memory available to this process, where that number came from)."""
    free, source = None, ""
    try:
        import psutil

        free, source = int(psutil.virtual_memory().available), "host RAM available (psutil)"
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free, source = int(line.split()[1]) * 1024, "host RAM available (/proc/meminfo)"
        except (OSError, ValueError):
            pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "host RAM free (sysconf)"
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < free:
        return cgroup, "memory left in this job's cgroup limit"
    return free, source


def available_memory(device=None) -> Available:
    """Free host memory, and free device memory where the device reports it (GPUs)."""
    host, source = available_host_bytes()
    stats = None
    if device is not None:
        try:
            stats = device.memory_stats()
        except Exception:  # not every backend implements it
            stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return Available(host, free, f"{source}; {device.device_kind} memory free")
    return Available(host, None, source)


def check_fits(est: Estimate, available: Available, *, max_memory_gb: float | None = None) -> None:
    """Raise ``InsufficientMemory`` (one line: the estimate, its largest parts, what is free) if
    the estimate exceeds the free memory; ``max_memory_gb`` replaces the detected free memory
    (the device's where there is one, else the host's)."""
    parts = ", ".join(f"{k} {v / GB:.3g}" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1]) if v)
    hint = "lower batch_size, probe modes or slices, use detector_px, or pass --max-memory-gb to override"
    if max_memory_gb is not None:
        need = est.device if available.device is not None else est.total
        if need > max_memory_gb * GB:
            raise InsufficientMemory(f"estimated peak memory {need / GB:.3g} GB (stage {est.stage!r}: {parts} GB) "
                                     f"exceeds --max-memory-gb {max_memory_gb:g}; {hint}")
        return
    if available.device is not None:
        if est.device > available.device:
            raise InsufficientMemory(f"estimated peak device memory {est.device / GB:.3g} GB (stage {est.stage!r}: "
                                     f"{parts} GB) exceeds the {available.device / GB:.3g} GB free "
                                     f"({available.source}); {hint}")
        if available.host is not None and est.host > available.host:
            raise InsufficientMemory(f"estimated peak host memory {est.host / GB:.3g} GB (loading the data, "
                                     f"runtime) exceeds the {available.host / GB:.3g} GB free ({available.source})")
        return
    if available.host is not None and est.total > available.host:
        raise InsufficientMemory(f"estimated peak memory {est.total / GB:.3g} GB (stage {est.stage!r}: {parts} GB; "
                                 f"runtime {est.runtime / GB:.3g} GB) exceeds the "
                                 f"{available.host / GB:.3g} GB free ({available.source}); {hint}")
