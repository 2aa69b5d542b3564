#!/usr/bin/env python
"""s/iter and per-device memory of one reconstruction against its device count; prints numbers,
asserts nothing.

Runs (each in a fresh interpreter, since the device count is fixed when JAX starts):

- one process with 1, 2, 4 devices (on a CPU the virtual devices of
  ``XLA_FLAGS=--xla_force_host_platform_device_count``; on a GPU machine its GPUs);
- 1 and 2 processes of one device each, connected by ``jax.distributed`` as ``ptycore launch``
  connects them (on a CPU over gloo).

Cases: ``standard`` (bench/reconstruct.py's: 24×24 scan, 64² detector, 2 probe modes, 6
slices, batch 32, gradient engine, Adam on object, probe and positions) and ``large`` (48×48
scan, 128² detector, 2 modes, 6 slices, batch 256). Each line: s/iter (median after the first
iteration, which compiles), the first iteration, the plan's per-device memory estimate
(ptycore.recon.memory), each process's peak RSS, on a GPU each device's peak memory and, with
``--bandwidth``, the bytes one device's iteration reads and writes (XLA's cost analysis of the
compiled iteration) over its time: the achieved memory bandwidth.

    python bench/devices.py                        # standard case: 1, 2, 4 devices; 1 vs 2 processes
    python bench/devices.py --case large --iterations 4
    python bench/devices.py --devices 1 2 --processes 1 --json
    python bench/devices.py --worker --devices 2   # one run in this process (what the above start)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "standard": {"scan": 24, "detector_px": 64, "modes": 2, "slices": 6, "batch": 32},
    "large": {"scan": 48, "detector_px": 128, "modes": 2, "slices": 6, "batch": 256},
}
STEP_A, PIXEL_A, THICKNESS_A = 0.4, 0.1424, 46.86


# ------------------------------------------------------------------ one run (--worker)
def _problem(case: dict):
    import jax.numpy as jnp
    import numpy as np

    from ptycore.physics import Grid, make_mixed_probe, make_probe, object_shape_for
    from ptycore.recon.context import Measurement
    from ptycore.recon.state import State

    n, scan = case["detector_px"], case["scan"]
    probe = make_mixed_probe(make_probe(Grid((n, n), PIXEL_A), 300.0, 21.4, 100.0) * np.sqrt(1e5), case["modes"])
    pos = np.stack(np.meshgrid(np.arange(scan), np.arange(scan), indexing="ij"), -1).reshape(-1, 2)
    pos = (pos * STEP_A + (n // 2 + 4) * PIXEL_A).astype(np.float32)
    shape = (1, case["slices"]) + object_shape_for(pos, PIXEL_A, (n, n), 4)
    patterns = np.random.default_rng(0).poisson(1e5 / n**2, (len(pos), n, n)).astype(np.float32)
    measurement = Measurement(patterns, PIXEL_A, 300.0, 21.4, (scan, scan))
    state = State(jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32), probe, jnp.asarray(pos),
                  jnp.zeros(2, jnp.float32), jnp.float32(THICKNESS_A / case["slices"]))
    return measurement, state


def _stage(case: dict, iterations: int):
    from ptycore.plan import parse_plan

    return parse_plan({"stages": [{
        "name": "bench", "engine": "gradient", "iterations": iterations, "batch_size": case["batch"],
        "grouping": "compact", "losses": {"single": 1.0},
        "optimize": {"object_phase": {"lr": 1e-3}, "object_amplitude": {"lr": 1e-4}, "probe": {"lr": 1e-3},
                     "positions": {"lr": 1e-3}}}]}).stages[0]


def _bytes_per_iteration(stage, measurement, state, placement) -> float | None:
    """Bytes one device reads and writes in one iteration, from XLA's cost analysis, or None if
    XLA does not say. The analysis counts a loop's body once, not once per trip, so this is the
    iteration compiled for one batch, × the batches of an iteration (the once-per-iteration
    update is then counted once per batch: an upper estimate, by that update's share)."""
    from dataclasses import replace

    from ptycore.recon.context import Context
    from ptycore.recon.engines import make_engine

    if placement is not None:
        measurement = replace(measurement, placement=placement)
    ctx = Context.build(measurement, state.positions_A, state.object_phase.shape[-2:], 2 / 3)
    engine = make_engine(stage, ctx, measurement, state, 0, 0)
    carry = engine.init_carry(state)
    idx, mask = engine.device_batches(0)
    val_idx, val_mask = engine.validation_batches()
    hyper = engine.hyper(0)
    if placement is not None:
        carry, hyper = placement.replicate((carry, hyper))
    n_batches = idx.shape[0]
    compiled = engine._iteration.lower(carry, engine.measured, idx[:1], mask[:1], val_idx, val_mask,
                                       hyper).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    value = (cost or {}).get("bytes accessed")
    return None if value is None else float(value) * n_batches


def worker(args) -> dict:
    from ptycore.distributed import initialize

    initialize()  # several processes: PTYCORE_COORDINATOR etc. from the driver
    import jax

    from ptycore.recon import memory
    from ptycore.recon.placement import Placement
    from ptycore.recon.runner import run_stage

    case = CASES[args.case]
    n_devices = len(jax.devices()) if jax.process_count() > 1 else args.devices[0]
    placement = Placement.from_count(n_devices) if n_devices > 1 else None
    measurement, state = _problem(case)
    stage = _stage(case, args.iterations)
    n = case["detector_px"]
    shapes = memory.stage_shapes([stage], n_positions=measurement.n_positions, detector_px=(n, n),
                                 state_shapes={"object": state.object_phase.shape, "probe": state.probe.shape,
                                               "slice_thickness_A": THICKNESS_A / case["slices"]})
    estimate = memory.estimate(shapes, stored_detector_px=(n, n), devices=n_devices)
    _, record = run_stage(stage, 0, state, measurement, seed=0, plan_hash="bench", workdir=None, progress=False,
                          placement=placement)
    per_iter = record.history["s_per_iter"]
    s_per_iter = statistics.median(per_iter[1:]) if len(per_iter) > 1 else per_iter[0]
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    result = {
        "case": args.case, "platform": device.platform, "device_kind": device.device_kind,
        "devices": n_devices, "processes": jax.process_count(), "batch": case["batch"],
        "s_per_iter": s_per_iter, "first_iter_s": per_iter[0], "compilations": record.compilations,
        "estimate_per_device_MB": estimate.device / 2**20,
        "peak_rss_MB": _peak_rss_MB(),
        "device_peak_MB": None if not stats else stats.get("peak_bytes_in_use", 0) / 2**20,
    }
    if args.bandwidth and jax.process_count() == 1:  # (several processes: the compiled iteration spans them)
        moved = _bytes_per_iteration(stage, measurement, state, placement)
        result["bytes_per_iter_per_device"] = moved
        result["bandwidth_GBps_per_device"] = None if moved is None else moved / s_per_iter / 1e9
    return result


def _peak_rss_MB() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, *, devices: int, processes: int, cpu_devices: int) -> dict:
    """One configuration in fresh interpreters: ``processes`` connected workers, each with
    ``cpu_devices`` virtual CPU devices (ignored on a GPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}".strip()
    cmd = [sys.executable, __file__, "--worker", "--case", args.case, "--iterations", str(args.iterations),
           "--devices", str(devices)] + (["--bandwidth"] if args.bandwidth else [])
    if processes == 1:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if out.returncode:
            raise SystemExit(f"bench/devices.py: run on {devices} device(s) failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    port = _free_port()
    procs = []
    for i in range(processes):
        penv = {**env, "PTYCORE_COORDINATOR": f"127.0.0.1:{port}", "PTYCORE_NUM_PROCESSES": str(processes),
                "PTYCORE_PROCESS_ID": str(i), "PTYCORE_LOCAL_DEVICE_IDS": str(i)}
        procs.append(subprocess.Popen(cmd, env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench/devices.py: {processes} processes failed:\n{outs[0][1][-2000:]}")
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    first = results[0]
    first["peak_rss_MB"] = max(r["peak_rss_MB"] for r in results)  # the largest process
    return first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="standard")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="device counts of one process")
    ap.add_argument("--processes", type=int, nargs="*", default=[1, 2],
                    help="process counts (one device each) to compare; none: skip")
    ap.add_argument("--bandwidth", action="store_true", help="also bytes per iteration and GB/s (compiles twice)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--json", action="store_true", help="one JSON line per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    # (devices of one process, processes, virtual CPU devices of each process)
    runs = [(n, 1, n) for n in args.devices] + [(1, p, 1) for p in args.processes if p > 1]
    base = None
    for n, p, cpu in runs:
        t0 = time.perf_counter()
        r = _run(args, devices=n, processes=p, cpu_devices=cpu)
        r["wall_s"] = time.perf_counter() - t0
        base = base or r["s_per_iter"]
        r["speedup"] = base / r["s_per_iter"]
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        mem = f"est {r['estimate_per_device_MB']:.0f} MB/device, RSS {r['peak_rss_MB']:.0f} MB/process"
        if r.get("device_peak_MB"):
            mem += f", device peak {r['device_peak_MB']:.0f} MB"
        bw = r.get("bandwidth_GBps_per_device")
        bw = f", {r['bytes_per_iter_per_device'] / 1e9:.2f} GB/iter/device, {bw:.3g} GB/s/device" if bw else ""
        print(f"{r['case']:>8} {r['device_kind']:>10}  {r['devices']} device(s) × {r['processes']} process(es): "
              f"{r['s_per_iter'] * 1e3:8.1f} ms/iter (×{r['speedup']:.2f}), first {r['first_iter_s']:.1f} s, "
              f"{mem}{bw}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
