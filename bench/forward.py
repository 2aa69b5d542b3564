#!/usr/bin/env python
"""Benchmark the multislice forward model + its gradient over one pass; prints numbers, asserts nothing.

Standard case: 24×24 scan (576 positions), 0.4 Å step, 64×64 detector, 0.1424 Å pixels, 300 kV,
2 probe modes, 6 slices over 46.86 Å (7.81 Å each), batch 32. One jit-compiled function runs
value_and_grad of the Gaussian amplitude loss (``ptycore.recon.losses.single``) w.r.t. object
phase and amplitude, probe and positions for every batch of one pass (18 batches of 32) under
``lax.scan``, accumulating the gradients (no parameter update, so every pass does the same work).

Reports the first call (compile + one pass), the median seconds per pass over ``--repeat`` calls
(``block_until_ready``), seconds per batch, the peak RSS of this process and the JAX device.

    python bench/forward.py                       # standard case
    python bench/forward.py --modes 4 --slices 12 --batch 64
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ptycore.physics import Grid, Optics, intensities, make_mixed_probe, make_probe, object_shape_for
from ptycore.recon.losses import single

ENERGY_KV = 300.0
CONVERGENCE_MRAD = 21.4
DEFOCUS_A = 100.0


def build(args):
    n = args.detector_px
    grid = Grid((n, n), args.pixel_A)
    optics = Optics(grid, ENERGY_KV)
    probe = make_mixed_probe(make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, DEFOCUS_A) * np.sqrt(1e5), args.modes)
    iy, ix = np.meshgrid(np.arange(args.scan), np.arange(args.scan), indexing="ij")
    pos = np.stack([iy, ix], -1).reshape(-1, 2) * args.step_A + (n // 2 + 4) * args.pixel_A
    pos = pos.astype(np.float32)
    shape = (1, args.slices) + object_shape_for(pos, args.pixel_A, (n, n), 4)
    rng = np.random.default_rng(0)
    params = {
        "object_phase": jnp.asarray(rng.normal(0, 0.05, shape), jnp.float32),
        "object_amplitude": jnp.ones(shape, jnp.float32),
        "probe": probe,
        "positions_A": jnp.asarray(pos),
    }
    measured = jnp.asarray(rng.poisson(1e5 / n**2, (len(pos), n, n)).astype(np.float32))
    n_batches = math.ceil(len(pos) / args.batch)
    order = rng.permutation(len(pos))
    idx = np.zeros(n_batches * args.batch, np.int32)
    idx[: len(pos)] = order
    mask = np.zeros(n_batches * args.batch, np.float32)
    mask[: len(pos)] = 1.0
    batches = (jnp.asarray(idx.reshape(n_batches, args.batch)), jnp.asarray(mask.reshape(n_batches, args.batch)))
    tilts = jnp.zeros(2, jnp.float32)
    thickness = jnp.float32(args.thickness_A / args.slices)
    return optics, params, measured, batches, tilts, thickness


def make_pass(optics):
    def loss(params, measured, idx, mask, tilts, thickness):
        model = intensities(optics, params["object_amplitude"], params["object_phase"], params["probe"],
                            params["positions_A"][idx], tilts, thickness)
        return single(model, measured[idx], mask)

    grad_fn = jax.value_and_grad(loss)

    @jax.jit
    def one_pass(params, measured, batches, tilts, thickness):
        def step(acc, batch):
            idx, mask = batch
            value, grads = grad_fn(params, measured, idx, mask, tilts, thickness)
            return jax.tree_util.tree_map(jnp.add, acc, grads), value

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return lax.scan(step, zeros, batches)

    return one_pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=24, help="scan is SCAN x SCAN positions")
    ap.add_argument("--step-A", type=float, default=0.4)
    ap.add_argument("--detector-px", type=int, default=64)
    ap.add_argument("--pixel-A", type=float, default=0.1424)
    ap.add_argument("--modes", type=int, default=2, help="probe modes")
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--thickness-A", type=float, default=46.86, help="total thickness")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5, help="timed passes after the first")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)

    optics, params, measured, batches, tilts, thickness = build(args)
    one_pass = make_pass(optics)
    t0 = time.perf_counter()
    jax.block_until_ready(one_pass(params, measured, batches, tilts, thickness))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(one_pass(params, measured, batches, tilts, thickness))
        times.append(time.perf_counter() - t0)
    n_batches = int(batches[0].shape[0])
    per_pass = statistics.median(times) if times else float("nan")
    device = jax.devices()[0]
    result = {
        "case": f"{args.scan}x{args.scan} scan, {args.detector_px}x{args.detector_px} det, {args.modes} modes, "
                f"{args.slices} slices, batch {args.batch} ({n_batches} batches)",
        "device": f"{device.platform}:{device.device_kind}",
        "compile_first_call_s": first,
        "s_per_pass": per_pass,
        "s_per_batch": per_pass / n_batches,
        "pass_times_s": [round(t, 4) for t in times],
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>21}: {v:.4g}" if isinstance(v, float) else f"{k:>21}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
