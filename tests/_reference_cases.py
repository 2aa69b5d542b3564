"""Engine reference cases: a few iterations of every engine on a small multislice, mixed-state
problem. ``tests/data/engine_reference.npz`` holds the arrays these cases gave before the
parameter/problem seam was introduced (made by ``python tests/_reference_cases.py``, from
commit 30e010a); ``test_engine_reference.py`` checks that the engines still give them.

The ePIE and LSQML cases have one slice: before the seam their multislice update took the
wave *leaving* slice s (incident wave times transmission) where the wave incident on it belongs;
that was fixed with the seam (``test_engines.py::test_projection_update_is_the_gradient_direction``),
so only their one-slice results are the same as before.

No total-variation term with Adam here: its smoothed |x| is steep where Adam has driven the
differences to ~0, which amplifies float32 rounding ~1000x per step (measured: phase differences
of 6e-3 rad after 6 iterations from identical starting gradients), so no reference can hold it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from _synthetic import make_synthetic

from ptycore.plan import parse_plan
from ptycore.recon.runner import run_stage
from ptycore.recon.state import STATE_ARRAYS, State

_OBJECT = {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}}
CASES = {
    "gradient": {
        "engine": "gradient", "iterations": 6, "batch_size": 12, "validation_fraction": 0.1,
        "optimize": {"object_phase": {"lr": 0.02}, "object_amplitude": {"lr": 0.01},
                     "probe": {"lr": 0.02, "start": 2}, "positions": {"lr": 0.01, "start": 3},
                     "tilts": {"optimizer": "sgd", "lr": 0.05, "start": 1, "stop": 5},
                     "slice_thickness": {"optimizer": "lbfgs", "lr": 0.05, "start": 2}},
        "losses": {"single": 1.0, "pacbed": 0.3, "l2": {"schedule": "linear", "start": 0.0, "end": 0.1,
                                                          "to_iter": 4}},
        "constraints": {"probe_orthogonalize": {"every": 2}, "object_amplitude_bounds": {"max": 1.0}},
    },
    "gradient_poisson": {
        "engine": "gradient", "iterations": 4, "batch_size": 16,
        "optimize": {"object_phase": {"lr": 0.03, "optimizer": "momentum"}, "probe": {"lr": 0.01}},
        "losses": {"poisson": 1.0, "sparse": 0.01},
    },
    "epie": {
        "slices": 1, "engine": "epie", "iterations": 5, "batch_size": 12,
        "optimize": {**_OBJECT, "probe": {"lr": 1.0, "start": 1}, "positions": {"lr": 1.0, "start": 2}},
        "losses": {"single": 1.0, "poisson": 1.0},
        "constraints": {"object_amplitude_bounds": {"max": 1.0}},
    },
    "lsqml": {
        "slices": 1, "engine": "lsqml", "iterations": 5, "batch_size": 12, "validation_fraction": 0.1,
        "optimize": {**_OBJECT, "probe": {"lr": 1.0, "start": 1}, "positions": {"lr": 1.0, "start": 2}},
        "constraints": {"object_amplitude_bounds": {"max": 1.0}, "probe_orthogonalize": {"every": 1}},
    },
    "lsqml_poisson": {
        "slices": 1, "engine": "lsqml", "iterations": 4, "batch_size": 16, "lsqml": {"noise_model": "poisson"},
        "optimize": {**_OBJECT, "probe": {"lr": 0.5}},
    },
}


def stage_for(name: str):
    # the reference arrays were made when the propagator was always band-limited to 2/3 of Nyquist
    case = {"propagator_bandlimit": 2 / 3, **{k: v for k, v in CASES[name].items() if k != "slices"}}
    return parse_plan({"stages": [{"name": "main", **case}]}).stages[0]


def problem(slices: int = 3):
    """A multislice (default 3 slices), 2-probe-mode start on a small synthetic dataset
    (per-position tilts)."""
    syn = make_synthetic(n_det=32, scan=8, step_A=0.6, counts=2e4)
    rng = np.random.default_rng(1)
    shape = (1, slices) + syn.truth_phase.shape
    probe = jnp.concatenate([syn.probe, 0.3 * jnp.roll(syn.probe, 2, axis=-1)])
    n = syn.measurement.n_positions
    state = State(jnp.asarray(rng.uniform(0.9, 1.0, shape), jnp.float32),
                  jnp.asarray(rng.uniform(0.0, 0.1, shape), jnp.float32), probe,
                  jnp.asarray(syn.positions_A + rng.normal(0, 0.05, syn.positions_A.shape), jnp.float32),
                  jnp.asarray(rng.normal(0, 0.5, (n, 2)), jnp.float32), jnp.float32(3.4))
    return syn, state


def run_case(name: str):
    syn, state = problem(CASES[name].get("slices", 3))
    state, record = run_stage(stage_for(name), 0, state, syn.measurement, seed=3, plan_hash="ref", workdir=None,
                              progress=False)
    out = {f"{name}/{a}": np.asarray(getattr(state, a)) for a in STATE_ARRAYS}
    for term, values in record.history.items():
        if term not in ("s_per_iter",):
            out[f"{name}/history/{term}"] = np.asarray(values, np.float64)
    return out


if __name__ == "__main__":
    from pathlib import Path

    arrays = {}
    for case in CASES:
        arrays.update(run_case(case))
        print(case, "done")
    np.savez_compressed(Path(__file__).parent / "data" / "engine_reference.npz", **arrays)
