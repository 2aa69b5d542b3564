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
- the networks of a stage whose object or probe a U-Net generates (``object: {model: dgp}``,
  ptycore/recon/networks.py): the weights, their gradient and the optimiser's two moments
  (``4 × parameters`` float32), the network's input, and the activations of one forward and
  backward pass per batch, ``UNET_ACTIVATION_FACTOR`` float32 values per element of the
  feature maps of every level (``Σ_i filters·2^i × H/2^i × W/2^i`` and the bottleneck);
- the runtime: Python, JAX and the XLA compiler (``RUNTIME_BYTES``).

On N devices (ptycore/recon/placement.py) every figure but the runtime is one device's: its
share of the patterns, a sub-batch of ``ceil(batch / N)``, and the replicated state, optimiser
and networks. The check is per device: the estimate against the free memory of each of this
process's devices (the least of them), and on a CPU, where the devices are the host, this
process's devices together against the host's.

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
provenance (``memory_estimate``), and per stage the estimate per device next to each device's
measured peak (``stage_memory``: ``memory_stats()``'s ``peak_bytes_in_use``, "n/a" on a CPU),
which ``ptycore inspect`` prints.

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
#: float32 values kept per feature-map element of a U-Net level for one forward + backward pass:
#: XLA's temporaries of ``jax.grad`` of the U-Net (CPU, ``memory_analysis()``; 3 levels, 16 filters,
#: 6 channels, 128² and 256²: 20.8 and 20.3; 4 levels, 32 filters: 24.7 with its weight gradients, 19.6 without)
UNET_ACTIVATION_FACTOR = 21


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
    #: the U-Nets generating the object or probe: (field, channels, levels, filters, norm, (H, W))
    networks: tuple = ()


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
    devices: int = 1  # devices of the run (``device`` is one device's share)
    #: devices of this process (on a CPU they share the host: it holds that many shares)
    local_devices: int = 1
    stages: dict = None  # stage name -> device bytes of that stage (one device's)

    @property
    def host(self) -> int:
        """Host bytes beside the device's on an accelerator."""
        return self.runtime + self.loading

    @property
    def total(self) -> int:
        """Peak bytes when the devices are the host (CPU): this process's devices' shares;
        loading (one device's share at a time) and iterating do not overlap."""
        n = self.local_devices
        return self.runtime + max(n * self.device, self.loading + n * self.parts["data"])

    def as_record(self) -> dict:
        return {"peak_GB": round(self.total / GB, 3), "device_GB": round(self.device / GB, 3),
                "host_GB": round(self.host / GB, 3), "peak_stage": self.stage,
                **{f"{k.replace(' ', '_')}_GB": round(v / GB, 3) for k, v in self.parts.items()},
                "stages_device_GB": {k: round(v / GB, 4) for k, v in (self.stages or {}).items()}}


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
        networks = []
        net = getattr(stage, "object", None)
        if net is not None:
            channels = om * (1 if net.identical_slices else slices) * (2 if net.output == "amplitude_phase" else 1)
            networks.append(("object", channels, net.levels, net.filters, net.norm, (hy, wx)))
        net = getattr(stage, "probe", None)
        if net is not None:
            networks.append(("probe", 2 * pm, net.levels, net.filters, net.norm, det))
        out.append(StageShape(stage.name, stage.engine, n_positions, det, pm, om, slices, (hy, wx),
                              min(stage.batch_size, n_positions), optimizers, tuple(networks)))
    return out


def network_bytes(channels: int, levels: int, filters: int, norm: str, size_px: tuple[int, int]) -> int:
    """One U-Net's device bytes while a stage iterates: weights, gradient and the optimiser's two
    moments, its input (and noisy copy), and the activations of one forward and backward pass
    (see the module docstring)."""
    from ptycore.recon.networks import unet_parameter_count

    m = 2**levels  # the input is padded to multiples of 2^levels
    h, w = -(-size_px[0] // m) * m, -(-size_px[1] // m) * m
    features = sum(filters * 2**i * (h // 2**i) * (w // 2**i) for i in range(levels))
    features += filters * 2 ** (levels - 1) * (h // m) * (w // m)  # the bottleneck
    weights = unet_parameter_count(channels, levels, filters, norm) * 4
    return 4 * weights + 2 * channels * h * w * 4 + UNET_ACTIVATION_FACTOR * features * 4


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
    parts = {"data": shape.n_positions * ny * nx * 4, "state": 2 * state, "optimiser": optimiser,
             "working set": working}
    if shape.networks:
        parts["networks"] = sum(network_bytes(*net[1:]) for net in shape.networks)
    return parts


def estimate(shapes: list[StageShape], *, stored_detector_px: tuple[int, int], devices: int = 1,
             local_devices: int = 1) -> Estimate:
    """The peak over the stages (the data stay resident; each stage's state, optimiser and
    working set live only while it runs) and over the two phases of a run: loading the data
    (``LOAD_COPIES`` host copies of the patterns next to the device copy) and iterating.
    On ``devices`` > 1 (ptycore/recon/placement.py) ``device`` is one device's share: its
    positions' patterns and a sub-batch of ``ceil(batch / devices)`` positions, with the state,
    optimiser and networks replicated; ``local_devices`` of them belong to this process."""
    n_pos = math.ceil(shapes[0].n_positions / devices)
    data = n_pos * stored_detector_px[0] * stored_detector_px[1] * 4
    best = None
    per_stage = {}
    for shape in shapes:
        if devices > 1:
            shape = replace(shape, n_positions=n_pos, batch_size=math.ceil(shape.batch_size / devices))
        parts = stage_bytes(shape)
        parts["data"] = data  # the full data stay loaded
        if shape.detector_px != tuple(stored_detector_px):
            parts["data"] += n_pos * shape.detector_px[0] * shape.detector_px[1] * 4  # the stage's crop
        device = sum(parts.values())
        per_stage[shape.name] = device
        if best is None or device > best.device:
            best = Estimate(device, RUNTIME_BYTES, LOAD_COPIES * data, shape.name, parts, devices, local_devices)
    return replace(best, stages=per_stage)


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


def memory_stats(device) -> dict | None:
    """``device.memory_stats()`` (bytes_limit, bytes_in_use, peak_bytes_in_use on a GPU), or
    None where the backend does not report it (the CPU)."""
    try:
        return device.memory_stats() or None
    except Exception:  # not every backend implements it
        return None


def available_memory(device=None) -> Available:
    """Free host memory, and free device memory where the device reports it (GPUs). ``device``
    may be a list (this process's devices of the run): the least free of them."""
    host, source = available_host_bytes()
    devices = [] if device is None else list(device) if isinstance(device, list | tuple) else [device]
    free = []
    for d in devices:
        stats = memory_stats(d)
        if stats and "bytes_limit" in stats:
            free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    if devices and len(free) == len(devices):
        kind = devices[0].device_kind
        where = f"{kind} memory free" if len(devices) == 1 else f"the least free of {len(devices)} {kind} devices"
        return Available(host, min(free), f"{source}; {where}")
    return Available(host, None, source)


def peak_bytes(device) -> int | None:
    """The device's peak bytes in use since the process started (``memory_stats()``'s
    ``peak_bytes_in_use``), or None where JAX does not say (the CPU)."""
    stats = memory_stats(device)
    value = None if stats is None else stats.get("peak_bytes_in_use")
    return None if value is None else int(value)


def check_fits(est: Estimate, available: Available, *, max_memory_gb: float | None = None) -> None:
    """Raise ``InsufficientMemory`` (one line: the estimate, its largest parts, what is free) if
    the estimate exceeds the free memory; ``max_memory_gb`` replaces the detected free memory
    (the device's where there is one, else the host's)."""
    parts = ", ".join(f"{k} {v / GB:.3g}" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1]) if v)
    hint = "lower batch_size, probe modes or slices, use detector_px, or pass --max-memory-gb to override"
    if est.devices > 1:
        hint = "use more devices, " + hint
    per = f" per device ({est.devices} devices)" if est.devices > 1 else ""
    if max_memory_gb is not None:
        need = est.device if available.device is not None else est.total
        if need > max_memory_gb * GB:
            on = per if available.device is not None else ""
            raise InsufficientMemory(f"estimated peak memory {need / GB:.3g} GB{on} "
                                     f"(stage {est.stage!r}: {parts} GB) exceeds --max-memory-gb {max_memory_gb:g}; "
                                     f"{hint}")
        return
    if available.device is not None:
        if est.device > available.device:
            raise InsufficientMemory(f"estimated peak device memory {est.device / GB:.3g} GB{per} (stage "
                                     f"{est.stage!r}: {parts} GB) exceeds the {available.device / GB:.3g} GB free "
                                     f"({available.source}); {hint}")
        if available.host is not None and est.host > available.host:
            raise InsufficientMemory(f"estimated peak host memory {est.host / GB:.3g} GB (loading the data, "
                                     f"runtime) exceeds the {available.host / GB:.3g} GB free ({available.source})")
        return
    if available.host is not None and est.total > available.host:
        on = (f" for this process's {est.local_devices} devices (stage {est.stage!r}, per device: {parts} GB)"
              if est.local_devices > 1 else f" (stage {est.stage!r}: {parts} GB; runtime {est.runtime / GB:.3g} GB)")
        raise InsufficientMemory(f"estimated peak memory {est.total / GB:.3g} GB{on} exceeds the "
                                 f"{available.host / GB:.3g} GB free ({available.source}); {hint}")
