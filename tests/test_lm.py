"""The Levenberg-Marquardt engine: its Gauss-Newton products and damped steps against dense
linear algebra in float64, an independent LM (optimistix), the gain-ratio rules, the
preconditioner, and recovery of a known object."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _synthetic import make_synthetic
from jax.flatten_util import ravel_pytree

from ptycore.plan import parse_plan
from ptycore.recon.context import Context
from ptycore.recon.engines import make_engine
from ptycore.recon.runner import run_stage
from ptycore.recon.state import State


@pytest.fixture
def x64():
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _stage(optimize=None, iterations=10, **options):
    optimize = optimize or {"object_phase": {"lr": 1.0}}
    return parse_plan({"stages": [{"name": "lm", "engine": "lm", "iterations": iterations, "batch_size": 4,
                                   "optimize": optimize, "lm": options}]}).stages[0]


def _tiny(dtype=np.float64, slices=2, modes=2):
    """A 3x3 scan, 16x16 detector, two slices and two probe modes, in ``dtype``."""
    syn = make_synthetic(n_det=16, scan=3, step_A=0.7, pixel_A=0.3, counts=1e4)
    rng = np.random.default_rng(0)
    shape = (1, slices) + syn.truth_phase.shape
    probe = np.concatenate([np.asarray(syn.probe), 0.4 * np.roll(np.asarray(syn.probe), 1, axis=-1)])[:modes]
    real, cplx = dtype, (np.complex128 if dtype == np.float64 else np.complex64)
    state = State(jnp.asarray(rng.uniform(0.85, 1.0, shape), real), jnp.asarray(rng.uniform(0, 0.3, shape), real),
                  jnp.asarray(probe, cplx), jnp.asarray(syn.positions_A + rng.normal(0, 0.05, (9, 2)), real),
                  jnp.zeros(2, real), jnp.asarray(3.0, real))
    measurement = syn.measurement
    measurement = type(measurement)(jnp.asarray(measurement.intensities, real), measurement.pixel_size_A,
                                    measurement.energy_kv, measurement.convergence_mrad, measurement.scan_shape)
    return syn, state, measurement


ALL = {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}, "probe": {"lr": 1.0},
       "positions": {"lr": 1.0}}


def _engine(state, measurement, optimize=None, **options):
    ctx = Context.build(measurement, state.positions_A, state.object_phase.shape[-2:])
    return make_engine(_stage(optimize or ALL, **options), ctx, measurement, state, 0)


def _dense(eng, state, measurement):
    """Everything by dense linear algebra: the flat parameters, J (jacfwd of all amplitudes), h, g."""
    params = eng.parameters.view(state, eng.parameters.carried(state))
    flat, unravel = ravel_pytree(params)
    idx, mask = eng.batches(0)
    idx, mask = np.asarray(idx).ravel(), np.asarray(mask).ravel()
    keep = mask > 0
    order = jnp.asarray(idx[keep])

    def amplitudes(x):
        return eng.amplitudes(unravel(x), state, order).ravel()

    jac = np.asarray(jax.jacfwd(amplitudes)(flat))
    a = amplitudes(flat).reshape((len(order),) + measurement.detector_shape)
    r, h, _ = eng.problem.residuals(a, measurement.intensities[order], jnp.ones(len(order)))
    h, r = np.asarray(h).ravel(), np.asarray(r).ravel()
    return params, flat, unravel, jac, h, r


@pytest.mark.parametrize("noise_model", ["amplitude", "poisson"])
def test_gauss_newton_product_equals_dense_jacobian(x64, noise_model):
    """G v (jvp then linear transpose, accumulated over batches) = J^T diag(h) J v / N from the
    dense Jacobian, for every parameter kind at once, to float64 precision."""
    syn, state, measurement = _tiny()
    eng = _engine(state, measurement, noise_model=noise_model)
    params, flat, unravel, jac, h, r = _dense(eng, state, measurement)
    rng = np.random.default_rng(1)
    v = rng.normal(size=flat.shape)
    idx, mask = eng.batches(0)
    gv = eng.gauss_newton_product(params, state, unravel(jnp.asarray(v)), measurement.intensities, idx, mask)
    ours = np.asarray(ravel_pytree(gv)[0])
    dense = jac.T @ (h * (jac @ v)) * eng.norm
    np.testing.assert_allclose(ours, dense, rtol=1e-9, atol=1e-12 * np.max(np.abs(dense)))
    # and the gradient is J^T (h r) / N
    _, grad, _, _ = eng.gradient(params, state, measurement.intensities, idx, mask)
    np.testing.assert_allclose(np.asarray(ravel_pytree(grad)[0]), jac.T @ (h * r) * eng.norm, rtol=1e-9,
                               atol=1e-12 * np.max(np.abs(jac.T @ (h * r) * eng.norm)))


def test_damped_step_equals_dense_normal_equations(x64):
    """With CG run to convergence, the step solves (G + lambda D) d = -g as the dense solve does."""
    syn, state, measurement = _tiny()
    optimize = {"object_phase": {"lr": 1.0}, "probe": {"lr": 1.0}}
    eng = _engine(state, measurement, optimize, cg_iterations=500, cg_tolerance=1e-12)
    params, flat, unravel, jac, h, r = _dense(eng, state, measurement)
    idx, mask = eng.batches(0)
    _, grad, scale, _ = eng.gradient(params, state, measurement.intensities, idx, mask)
    damping = 0.3
    active = {n: jnp.bool_(True) for n in params}
    step, _, k = eng.solve(params, state, grad, scale, damping, jax.tree_util.tree_map(jnp.zeros_like, params),
                           active, measurement.intensities, idx, mask)
    d_flat = np.asarray(ravel_pytree(scale)[0])
    d_flat = np.maximum(d_flat, 1e-6 * d_flat.max())
    system = jac.T @ (h[:, None] * jac) * eng.norm + damping * np.diag(d_flat)
    dense = np.linalg.solve(system, -np.asarray(ravel_pytree(grad)[0]))
    np.testing.assert_allclose(np.asarray(ravel_pytree(step)[0]), dense, rtol=1e-6, atol=1e-8 * np.abs(dense).max())
    assert int(k) < 500
    # damping_floor f: each parameter's damping scale is max(D, f max D) (its weakly lit pixels damped more)
    floored = _engine(state, measurement, optimize, cg_iterations=500, cg_tolerance=1e-12, damping_floor=0.2)
    step_f, _, _ = floored.solve(params, state, grad, scale, damping, jax.tree_util.tree_map(jnp.zeros_like, params),
                                 active, measurement.intensities, idx, mask)
    d_floor = np.asarray(ravel_pytree({n: np.maximum(x, 0.2 * np.max(x)) for n, x in scale.items()})[0])
    dense_f = np.linalg.solve(system + damping * np.diag(d_floor - d_flat), -np.asarray(ravel_pytree(grad)[0]))
    np.testing.assert_allclose(np.asarray(ravel_pytree(step_f)[0]), dense_f, rtol=1e-6,
                               atol=1e-8 * np.abs(dense_f).max())
    assert np.abs(dense_f - dense).max() > 1e-3 * np.abs(dense).max()  # the floor changes the step


def test_step_agrees_with_lineax_least_squares(x64):
    """An independent solver on the same problem: lineax's QR on the augmented least-squares
    problem ``[sqrt(h/N) J; sqrt(lambda D)] d = -[sqrt(h/N) r; 0]`` gives the step our PCG finds
    on the normal equations. One slice and one probe mode (the dense tests above have two of
    each): the QR of the augmented matrix grows as the cube of the parameter count."""
    lx = pytest.importorskip("lineax")
    syn, state, measurement = _tiny(slices=1, modes=1)
    eng = _engine(state, measurement, ALL, cg_iterations=500, cg_tolerance=1e-12)
    params, flat, unravel, jac, h, r = _dense(eng, state, measurement)
    idx, mask = eng.batches(0)
    _, grad, scale, _ = eng.gradient(params, state, measurement.intensities, idx, mask)
    damping = 0.1
    active = {n: jnp.bool_(True) for n in params}
    step, _, _ = eng.solve(params, state, grad, scale, damping, jax.tree_util.tree_map(jnp.zeros_like, params),
                           active, measurement.intensities, idx, mask)
    d_flat = np.asarray(ravel_pytree(scale)[0])
    d_flat = np.maximum(d_flat, 1e-6 * d_flat.max())
    weight = np.sqrt(h * eng.norm)
    matrix = np.vstack([weight[:, None] * jac, np.diag(np.sqrt(damping * d_flat))])
    rhs = np.concatenate([-weight * r, np.zeros_like(d_flat)])
    solution = lx.linear_solve(lx.MatrixLinearOperator(jnp.asarray(matrix)), jnp.asarray(rhs), lx.QR())
    theirs = np.asarray(solution.value)
    np.testing.assert_allclose(np.asarray(ravel_pytree(step)[0]), theirs, rtol=1e-5, atol=1e-7 * np.abs(theirs).max())


def test_accepted_steps_never_raise_the_loss_and_rejected_steps_change_nothing():
    """From a far start with almost no damping some steps are rejected: those leave the state
    bit-for-bit unchanged; accepted ones lower the objective."""
    syn = make_synthetic(n_det=32, scan=8, step_A=0.6, counts=1e5)
    state = syn.flat_state()
    eng = _engine(state, syn.measurement, ALL, damping=1e-6, damping_min=1e-8, preconditioner=True)
    carry = eng.init_carry(state)
    seen = {"accepted": 0, "rejected": 0}
    previous = None
    for it in range(12):
        before = jax.tree_util.tree_map(np.asarray, eng.to_state(carry))
        carry, terms = eng.iteration(carry, it)
        terms = jax.device_get(terms)
        after = eng.to_state(carry)
        if terms["accepted"]:
            seen["accepted"] += 1
            if previous is not None:
                assert terms["lm_objective"] < previous
        else:
            seen["rejected"] += 1
            for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))
            assert float(terms["lm_objective"]) == pytest.approx(float(previous), rel=1e-5)  # recomputed sum
        previous = np.float32(terms["lm_objective"])
    assert seen["accepted"] >= 3 and seen["rejected"] >= 1, seen


def test_preconditioner_lowers_the_cg_iterations():
    """Same system, same tolerance: the illumination (Jacobi) preconditioner needs fewer CG
    iterations than none (measured 45 against 200, the cap, with tolerance 1e-3)."""
    syn = make_synthetic(n_det=32, scan=8, step_A=0.6, counts=1e5)
    state = syn.flat_state()
    counts = {}
    for pre in (True, False):
        eng = _engine(state, syn.measurement, {"object_phase": {"lr": 1.0}, "probe": {"lr": 1.0}},
                      preconditioner=pre, cg_iterations=200, cg_tolerance=1e-3)
        params = eng.parameters.view(state, eng.parameters.carried(state))
        idx, mask = eng.batches(0)
        _, grad, scale, _ = eng.gradient(params, state, syn.measurement.intensities, idx, mask)
        active = {n: jnp.bool_(True) for n in params}
        _, _, k = eng.solve(params, state, grad, scale, 1e-2, jax.tree_util.tree_map(jnp.zeros_like, params),
                            active, syn.measurement.intensities, idx, mask)
        counts[pre] = int(k)
    assert counts[True] < counts[False], counts


def test_recovers_known_object_in_few_steps_without_recompiling():
    """Flat start, 1e5 counts per pattern: 6 LM steps reach phase SSIM > 0.98 (achieved 0.996),
    one compilation; the history has the LM terms."""
    syn = make_synthetic()
    stage = _stage({"object_phase": {"lr": 1.0}, "probe": {"lr": 1.0, "start": 3}}, iterations=6)
    state, record = run_stage(stage, 0, syn.flat_state(), syn.measurement, seed=0, plan_hash="t", workdir=None,
                              progress=False)
    assert syn.phase_ssim(state.object_phase[0, 0]) > 0.98
    assert record.compilations == 1
    for key in ("lm_objective", "damping", "cg_iterations", "gain_ratio", "accepted", "gradient_equivalents"):
        assert len(record.history[key]) == 6, key
    assert record.history["single"][-1] < record.history["single"][0]
