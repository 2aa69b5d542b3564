#!/usr/bin/env python
"""Benchmark one engine iteration on the standard case; prints numbers, asserts nothing.

Standard case (PtyRAD/phaser comparison): 24×24 scan, 0.4 Å step, 64×64 detector, 0.1424 Å
pixels, 300 kV, 2 probe modes, 6 slices over 46.86 Å, batch 32, Adam on object, probe and
positions. Reports s/iter (median, excluding the first), the first iteration (compile)
time, compilations, the peak RSS of this process and ``reconstruct``'s estimate of it
(ptycore.recon.memory; the ratio measured / estimated is in that module's docstring).

    python bench/reconstruct.py                 # standard case
    python bench/reconstruct.py --modes 4 --slices 8
    python bench/reconstruct.py --engine lsqml  # ePIE/LSQML: object + probe (positions: --positions)
    python bench/reconstruct.py --scan 48 --detector-px 128 --slices 4 --batch 256 --iterations 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptycore.physics import Grid, make_mixed_probe, make_probe, object_shape_for
from ptycore.plan import parse_plan
from ptycore.recon import memory
from ptycore.recon.context import Measurement
from ptycore.recon.runner import run_stage
from ptycore.recon.state import State


def peak_rss_MB() -> float:
    """This process's peak resident memory in MiB: VmHWM of /proc/self/status on Linux (the peak of
    this program's own memory map; getrusage's ru_maxrss also keeps the peak of the process that
    started this one, e.g. a large pytest, across fork and exec), else getrusage."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=24)
    ap.add_argument("--step-A", type=float, default=0.4)
    ap.add_argument("--detector-px", type=int, default=64)
    ap.add_argument("--pixel-A", type=float, default=0.1424)
    ap.add_argument("--modes", type=int, default=2)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--thickness-A", type=float, default=46.86)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--engine", choices=["gradient", "epie", "lsqml"], default="gradient")
    ap.add_argument("--positions", action="store_true", help="ePIE/LSQML: also refine positions")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)

    n = args.detector_px
    grid = Grid((n, n), args.pixel_A)
    probe = make_mixed_probe(make_probe(grid, 300.0, 21.4, 100.0) * np.sqrt(1e5), args.modes)
    pos = np.stack(np.meshgrid(np.arange(args.scan), np.arange(args.scan), indexing="ij"), -1).reshape(-1, 2)
    pos = (pos * args.step_A + (n // 2 + 4) * args.pixel_A).astype(np.float32)
    shape = (1, args.slices) + object_shape_for(pos, args.pixel_A, (n, n), 4)
    rng = np.random.default_rng(0)
    patterns = jnp.asarray(rng.poisson(1e5 / n**2, (len(pos), n, n)).astype(np.float32))
    measurement = Measurement(patterns, args.pixel_A, 300.0, 21.4, (args.scan, args.scan))
    state = State(jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32), probe, jnp.asarray(pos),
                  jnp.zeros(2, jnp.float32), jnp.float32(args.thickness_A / args.slices))
    if args.engine == "gradient":
        optimize = {"object_phase": {"lr": 1e-3}, "object_amplitude": {"lr": 1e-4},
                    "probe": {"lr": 1e-3}, "positions": {"lr": 1e-3}}
    else:  # projection engines: object and probe (the comparison with phaser), positions on request
        optimize = {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}, "probe": {"lr": 1.0}}
        if args.positions:
            optimize["positions"] = {"lr": 1.0}
    plan = parse_plan({"stages": [{
        "name": "bench", "engine": args.engine, "iterations": args.iterations, "batch_size": args.batch,
        "grouping": "random", "optimize": optimize, "losses": {"single": 1.0}}]})
    shapes = memory.stage_shapes(plan.stages, n_positions=len(pos), detector_px=(n, n),
                                 state_shapes={"object": shape, "probe": probe.shape,
                                               "slice_thickness_A": args.thickness_A / args.slices})
    estimate = memory.estimate(shapes, stored_detector_px=(n, n))
    t0 = time.perf_counter()
    _, record = run_stage(plan.stages[0], 0, state, measurement, seed=0, plan_hash="bench", workdir=None,
                          progress=False)
    total = time.perf_counter() - t0
    per_iter = record.history["s_per_iter"]
    result = {
        "engine": args.engine,
        "case": f"{args.scan}x{args.scan} scan, {n}x{n} det, {args.modes} modes, {args.slices} slices, "
                f"batch {args.batch}",
        "device": jax.devices()[0].device_kind,
        "s_per_iter": statistics.median(per_iter[1:]) if len(per_iter) > 1 else per_iter[0],
        "first_iter_s": per_iter[0],
        "compilations": record.compilations,
        "peak_rss_MB": peak_rss_MB(),
        "estimate_MB": estimate.total / 2**20,  # MiB, as peak_rss_MB
        "total_s": total,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>14}: {v:.4g}" if isinstance(v, float) else f"{k:>14}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
