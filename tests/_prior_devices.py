"""The prior's stages (gradient with the RED term, LM with the prior residuals, DPS) on 1 and on 2
virtual CPU devices, in one process (run as a subprocess by ``tests/test_prior_recon.py``: the
device count must be set before JAX starts). ``python tests/_prior_devices.py OUT.json`` writes per
stage the largest phase difference relative to the phase's largest value, and the histories'
largest relative difference."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _synthetic import make_synthetic  # noqa: E402

from ptycore.plan import parse_plan  # noqa: E402
from ptycore.prior.guidance import Prior, register_denoiser  # noqa: E402
from ptycore.recon.placement import Placement  # noqa: E402
from ptycore.recon.runner import run_stage  # noqa: E402


def mean_filter(x, sigma):
    return sum(jnp.roll(x, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0


def main(out: str) -> None:
    syn = make_synthetic(n_det=24, scan=6, step_A=0.6, pixel_A=0.3, counts=1e5)
    register_denoiser("mean", Prior(mean_filter, syn.pixel_size_A, syn.slice_thickness_A))
    common = {"iterations": 3, "batch_size": 12, "grouping": "compact", "validation_fraction": 0.1}
    plan = parse_plan({"prior": {"path": "mean"}, "stages": [
        {"name": "red", **common, "optimize": {"object_phase": {"lr": 0.01}}, "losses": {"single": 1.0, "prior": 1e-3}},
        {"name": "lm", "engine": "lm", **common, "optimize": {"object_phase": {"lr": 1.0}},
         "losses": {"single": 1.0, "prior": 1e-3}},
        {"name": "dps", "engine": "dps", **common, "dps": {"eta": 0.5}}]})
    runs = {}
    for n in (1, 2):
        state, runs[n] = syn.flat_state(), []
        for i, stage in enumerate(plan.stages):
            state, record = run_stage(stage, i, state, syn.measurement, seed=0, plan_hash="t", workdir=None,
                                      progress=False, placement=Placement.from_count(n) if n > 1 else None)
            hist = {k: np.asarray(v, np.float64) for k, v in record.history.items()
                    if k not in ("probe_mode_powers", "s_per_iter")}
            runs[n].append((np.asarray(state.object_phase, np.float64), hist))
    result = {}
    for stage, (a, ha), (b, hb) in zip(plan.stages, runs[1], runs[2], strict=True):
        result[stage.name] = {
            "phase": float(np.abs(a - b).max() / np.abs(a).max()),
            "history": max(float(np.max(np.abs(ha[k] - hb[k]) / np.maximum(np.abs(ha[k]), 1e-12))) for k in ha),
            "terms": sorted(ha)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
