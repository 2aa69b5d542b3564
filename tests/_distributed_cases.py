"""Every engine on 1 device and on N virtual CPU devices, in one process (run as a subprocess by
``tests/test_distributed.py``: the device count must be set before JAX starts).

``python tests/_distributed_cases.py N OUT.json [CASE ...]`` writes, per case, the largest difference of
each state array between the runs relative to the array's largest value, the histories'
largest relative difference, the compile count and the devices the patterns lay on."""

from __future__ import annotations

import json
import os
import sys

N_DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N_DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from _reference_cases import CASES, problem  # noqa: E402

from ptycore.plan import parse_plan  # noqa: E402
from ptycore.recon.placement import Placement  # noqa: E402
from ptycore.recon.runner import run_stage  # noqa: E402
from ptycore.recon.state import STATE_ARRAYS  # noqa: E402

_LM = {"engine": "lm", "iterations": 4, "batch_size": 16, "validation_fraction": 0.1,
       "optimize": {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}, "probe": {"lr": 1.0},
                    "positions": {"lr": 1.0, "start": 1}}, "lm": {"cg_iterations": 4}}
#: (reference case, grouping): compact and sparse batches are the same on N devices as on one;
#: LM sums over every position whatever the grouping; random grouping is stratified on N devices
RUNS = {"gradient": ("gradient", "compact"), "gradient_poisson": ("gradient_poisson", "sparse"),
        "epie": ("epie", "compact"), "lsqml": ("lsqml", "compact"), "lsqml_poisson": ("lsqml_poisson", "sparse"),
        "lm": ("lm", "random"), "gradient_random": ("gradient", "random")}


def run(case: str, grouping: str, n_devices: int):
    spec = _LM if case == "lm" else CASES[case]
    cfg = {k: v for k, v in spec.items() if k != "slices"} | {"grouping": grouping}
    stage = parse_plan({"stages": [{"name": "main", **cfg}]}).stages[0]
    syn, state = problem(spec.get("slices", 3))
    placement = Placement.from_count(n_devices) if n_devices > 1 else None
    state, record = run_stage(stage, 0, state, syn.measurement, seed=3, plan_hash="dist", workdir=None,
                              progress=False, placement=placement)
    return state, record


def main():
    out = {}
    for name in sys.argv[3:] or RUNS:
        case, grouping = RUNS[name]
        one, rec1 = run(case, grouping, 1)
        many, rec_n = run(case, grouping, N_DEVICES)
        diffs = {}
        for a in STATE_ARRAYS:
            x, y = np.asarray(getattr(one, a)), np.asarray(getattr(many, a))
            diffs[a] = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-12)) if x.size else 0.0
        hist = {}
        for term, values in rec1.history.items():
            if term in ("s_per_iter", "probe_mode_powers"):
                continue
            x, y = np.asarray(values, float), np.asarray(rec_n.history[term], float)
            hist[term] = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-12)))
        fit = "single" if "single" in rec1.history else "poisson"
        out[name] = {"state": diffs, "history": hist, "compilations": [rec1.compilations, rec_n.compilations],
                     "final_fit": [rec1.history[fit][-1], rec_n.history[fit][-1]],
                     "first_fit": rec1.history[fit][0]}
    out["devices"] = len(Placement.from_count(N_DEVICES).devices)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
