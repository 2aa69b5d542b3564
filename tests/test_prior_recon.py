"""The learned prior in reconstruction: the RED ``prior`` term (gradient, grids, plan rules), a
prior-regularised gradient stage against the data-only one on held-out positions, LM with the
prior residuals, DPS recovering a known object, and the hallucination check. The denoisers here
are analytic (the MMSE denoisers of a Gaussian and of a Gaussian mixture), so the tests measure
the machinery, not trained weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from _synthetic import make_synthetic, write_stores

from ptycore.cli import main
from ptycore.errors import InvalidPlan
from ptycore.plan import parse_plan
from ptycore.prior.check import prior_shift
from ptycore.prior.guidance import Prior, PriorMap, register_denoiser, unregister_denoiser
from ptycore.recon.context import Context
from ptycore.recon.engines import make_engine
from ptycore.recon.engines.dps import guidance_weight, noise_levels
from ptycore.recon.runner import run_stage

MEAN_RAD, TAU_RAD = 0.2, 0.3


def gaussian_mmse(x, sigma):
    """The exact MMSE denoiser of the prior N(MEAN_RAD, TAU_RAD^2) per pixel."""
    return MEAN_RAD + TAU_RAD**2 / (TAU_RAD**2 + sigma**2) * (x - MEAN_RAD)


@pytest.fixture(scope="module")
def syn():
    """One tiny dataset for every test here (its forward model compiles once)."""
    return make_synthetic(n_det=24, scan=6, step_A=0.6, pixel_A=0.3, counts=1e5)


@pytest.fixture
def registered():
    names = []

    def register(name, prior):
        register_denoiser(name, prior)
        names.append(name)
        return name

    yield register
    for name in names:
        unregister_denoiser(name)


def _plan(stages, prior="gauss", **top):
    return parse_plan({"prior": {"path": prior}, **top, "stages": stages})


def test_red_gradient_is_weight_times_x_minus_denoised(registered, syn):
    """Matching grids (the map is the identity): the gradient of W · prior w.r.t. the object phase
    is W (x - D_sigma(x)) at every pixel, through the problem the engines use."""
    registered("gauss", Prior(gaussian_mmse, syn.pixel_size_A, syn.slice_thickness_A))
    weight, sigma = 0.37, 0.15
    stage = _plan([{"name": "red", "iterations": 2, "batch_size": 12, "optimize": {"object_phase": {"lr": 0.01}},
                    "losses": {"single": 1.0, "prior": {"weight": weight, "sigma_rad": sigma}}}]).stages[0]
    rng = np.random.default_rng(0)
    state = syn.flat_state()._replace(object_phase=jnp.asarray(rng.normal(0, 0.3, (1, 1) + syn.truth_phase.shape),
                                                               jnp.float32))
    ctx = Context.build(syn.measurement, state.positions_A, state.object_phase.shape[-2:])
    eng = make_engine(stage, ctx, syn.measurement, state, 0)
    assert eng.problem.prior_map.identity
    target = eng.problem.prior_target(state, sigma)
    idx, mask = eng.batches(0)

    def prior_only(phase):
        terms = eng.problem.loss_terms(state._replace(object_phase=phase), syn.measurement.intensities,
                                       jnp.asarray(idx[0]), jnp.asarray(mask[0]), target)
        return weight * terms["prior"]

    grad = jax.grad(prior_only)(state.object_phase)
    x = np.asarray(state.object_phase)
    expected = weight * (x - gaussian_mmse(x, sigma))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)
    # LM's prior residuals: the same gradient, and the Gauss-Newton block W P^T P = W I here
    lm_stage = _plan([{"name": "lm", "engine": "lm", "iterations": 2, "batch_size": 12,
                       "optimize": {"object_phase": {"lr": 1.0}},
                       "losses": {"single": 1.0, "prior": {"weight": weight, "sigma_rad": sigma}}}]).stages[0]
    lm = make_engine(lm_stage, ctx, syn.measurement, state, 0)
    params = lm.parameters.view(state, lm.parameters.carried(state))
    value, lm_grad, _, raw = lm.prior_parts(params, state, lm.prior_target(params, state, sigma), weight)
    np.testing.assert_allclose(np.asarray(lm_grad["object_phase"]), expected, rtol=1e-5, atol=1e-7)
    assert float(value) == pytest.approx(weight * 0.5 * np.sum((x - gaussian_mmse(x, sigma)) ** 2), rel=1e-5)
    v = {"object_phase": jnp.asarray(rng.normal(size=x.shape), jnp.float32)}
    np.testing.assert_allclose(np.asarray(lm.prior_product(v, weight)["object_phase"]),
                               weight * np.asarray(v["object_phase"]), rtol=1e-5, atol=1e-7)


def test_prior_grid_sums_slices_and_resamples_laterally():
    """Four 2 Å slices on 0.2 Å pixels against a prior of 4 Å slabs on 0.4 Å pixels: two slabs,
    each the sum of its two slices (total phase kept), on half the pixels; back, a slab is
    divided between its slices; a band-limited field survives the lateral round trip."""
    prior = Prior(lambda x, s: x, pixel_size_A=0.4, slice_thickness_A=4.0)
    pmap = PriorMap(prior, (32, 32), 4, 0.2, 2.0)
    assert (pmap.prior_slices, pmap.lateral_shape) == (2, (16, 16))
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    smooth = np.cos(2 * np.pi * yy / 8) * np.sin(2 * np.pi * xx / 16)
    phase = jnp.asarray(np.stack([smooth * k for k in (1.0, 2.0, 3.0, 4.0)])[None], jnp.float32)
    x = pmap.to_prior(phase)
    assert x.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(np.asarray(x[0, 0]), 3 * smooth[::2, ::2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(x[0, 1]), 7 * smooth[::2, ::2], atol=1e-5)
    back = pmap.from_prior(x)
    np.testing.assert_allclose(np.asarray(back[0, 0]), 1.5 * smooth, atol=1e-5)
    np.testing.assert_allclose(np.asarray(back.sum(1)), np.asarray(phase.sum(1)), atol=1e-4)


def test_plan_rules_for_the_prior():
    one = {"name": "s", "iterations": 2, "optimize": {"object_phase": {"lr": 0.1}}}
    with pytest.raises(InvalidPlan, match=r"losses.prior: engine 'epie' cannot use it; use a gradient or lm stage"):
        parse_plan({"stages": [{**one, "engine": "epie", "losses": {"single": 1.0, "prior": 0.1}}]})
    with pytest.raises(InvalidPlan, match=r"dps engine samples with the prior itself"):
        parse_plan({"stages": [{**one, "engine": "dps", "losses": {"single": 1.0, "prior": 0.1}}]})
    with pytest.raises(InvalidPlan, match=r"losses.tv_z.sigma_rad: only the prior loss"):
        parse_plan({"stages": [{**one, "losses": {"single": 1.0, "tv_z": {"weight": 0.1, "sigma_rad": 0.1}}}]})
    with pytest.raises(InvalidPlan, match=r"stage 's': prior: nothing in this stage uses it"):
        parse_plan({"stages": [{**one, "prior": {"path": "shipped"}}]})
    with pytest.raises(InvalidPlan, match=r"stage 'd': constraints: the dps engine applies none .*phase_positive"):
        parse_plan({"stages": [{"name": "d", "engine": "dps", "iterations": 3, "constraints": {"phase_positive": {}}}]})
    with pytest.raises(InvalidPlan, match=r"sigma_end_rad 0.5 must be below sigma_start_rad 0.2"):
        parse_plan({"stages": [{"name": "d", "engine": "dps", "iterations": 3,
                                "dps": {"sigma_start_rad": 0.2, "sigma_end_rad": 0.5}}]})
    # the plan's prior (and its sigma) goes to every stage that uses one; a stage may name its own
    plan = parse_plan({"prior": {"path": "a", "sigma_rad": 0.07}, "stages": [
        {**one, "losses": {"single": 1.0, "prior": 0.1}},
        {"name": "d", "engine": "dps", "iterations": 3, "prior": {"path": "b"}}]})
    assert plan.stages[0].prior.path == "a" and plan.stages[0].losses["prior"].sigma_rad.at(0) == 0.07
    assert plan.stages[1].prior.path == "b" and list(plan.stages[1].optimize) == ["object_phase"]
    # a plan without a prior resolves as before (no prior / sigma_rad keys): its hash is unchanged
    plain = parse_plan({"stages": [one]}).resolved()
    assert "prior" not in plain and "prior" not in plain["stages"][0]
    assert "sigma_rad" not in plain["stages"][0]["losses"]["single"]


def test_noise_level_outside_the_trained_range_is_refused(registered, syn):
    registered("narrow", Prior(gaussian_mmse, syn.pixel_size_A, syn.slice_thickness_A, sigma_min_rad=0.01,
                               sigma_max_rad=0.5, source="narrow"))
    stage = _plan([{"name": "d", "engine": "dps", "iterations": 3, "dps": {"sigma_start_rad": 0.8}}],
                  prior="narrow").stages[0]
    with pytest.raises(InvalidPlan, match=r"stage 'd': dps.sigma_start_rad 0.8 rad is outside the range the prior "
                                          r"'narrow' was trained on \(0.01 to 0.5 rad\)"):
        run_stage(stage, 0, syn.flat_state(), syn.measurement, seed=0, plan_hash="t", workdir=None, progress=False)


def _mean_filter(x, sigma):
    """A smoothing denoiser (3x3 mean, circular): a generic prior that knows nothing of the object."""
    return sum(jnp.roll(x, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0


def test_prior_stage_keeps_the_held_out_loss_within_5_percent(registered, syn):
    """A gradient stage with a mean-filter prior (weight 1e-4, sigma 0.05 rad) against the same
    stage without it, 20 % of the positions held out: the held-out loss is within 5 % of the
    data-only one (measured: 0.987x), and the prior did act (the object differs)."""
    registered("mean", Prior(_mean_filter, syn.pixel_size_A, syn.slice_thickness_A))
    base = {"name": "g", "iterations": 12, "batch_size": 8, "validation_fraction": 0.2,
            "optimize": {"object_phase": {"lr": 0.02}}}
    results = {}
    for key, losses in (("data", {"single": 1.0}), ("prior", {"single": 1.0, "prior": {"weight": 1e-4,
                                                                                      "sigma_rad": 0.05}})):
        stage = _plan([{**base, "losses": losses}], prior="mean").stages[0]
        results[key] = run_stage(stage, 0, syn.flat_state(), syn.measurement, seed=0, plan_hash="t",
                                 workdir=None, progress=False)
    (data_state, data_rec), (prior_state, prior_rec) = results["data"], results["prior"]
    assert prior_rec.compilations == 1 and len(prior_rec.history["prior"]) == 12
    ratio = prior_rec.history["validation"][-1] / data_rec.history["validation"][-1]
    assert ratio < 1.05, ratio
    shift = prior_shift(data_state.object_phase, prior_state.object_phase)
    assert shift["rms_phase_difference_rad"] > 1e-4


def test_red_target_renewed_every_k_iterations(registered, syn):
    """``denoise_every: 2`` in a gradient stage: the RED target is the denoised object of
    iterations 0 and 2 (held over iteration 1, so its loss differs from renewing every iteration)
    and the stage still compiles once; lm stages and other losses refuse the field."""
    registered("gauss", Prior(gaussian_mmse, syn.pixel_size_A, syn.slice_thickness_A))
    sigma = 0.15
    state = syn.flat_state()
    ctx = Context.build(syn.measurement, state.positions_A, state.object_phase.shape[-2:])
    runs = {}
    for every in (1, 2):
        stage = _plan([{"name": "red", "iterations": 3, "batch_size": 12, "optimize": {"object_phase": {"lr": 0.05}},
                        "losses": {"single": 1.0, "prior": {"weight": 1e-2, "sigma_rad": sigma,
                                                             "denoise_every": every}}}]).stages[0]
        eng = make_engine(stage, ctx, syn.measurement, state, 0)
        carry, held, before, priors = eng.init_carry(state), [], [], []
        for it in range(3):
            before.append(np.asarray(eng.to_state(carry).object_phase))
            carry, terms = eng.iteration(carry, it)
            held.append(None if eng._held_target is None else np.asarray(eng._held_target))
            priors.append(float(jax.device_get(terms)["prior"]))
        runs[every] = (eng, held, before, priors)
    eng, held, before, priors = runs[2]
    assert eng.compilations() == 1 and runs[1][1] == [None] * 3
    for it, source in ((0, 0), (1, 0), (2, 2)):
        np.testing.assert_allclose(held[it], gaussian_mmse(before[source], sigma), rtol=1e-5, atol=1e-7)
    assert priors[0] == pytest.approx(runs[1][3][0], rel=1e-6) and priors[1] != pytest.approx(runs[1][3][1], rel=1e-4)
    one = {"name": "s", "iterations": 2, "optimize": {"object_phase": {"lr": 1.0}}}
    with pytest.raises(InvalidPlan, match=r"losses.prior.denoise_every: only the prior loss of a gradient stage"):
        parse_plan({"stages": [{**one, "engine": "lm", "losses": {"single": 1.0,
                                                                  "prior": {"weight": 0.1, "denoise_every": 3}}}]})
    with pytest.raises(InvalidPlan, match=r"losses.sparse.denoise_every"):
        parse_plan({"stages": [{**one, "losses": {"single": 1.0, "sparse": {"weight": 0.1, "denoise_every": 3}}}]})
    assert "denoise_every" not in _plan([{**one, "losses": {"single": 1.0, "prior": 0.1}}]).resolved()[
        "stages"][0]["losses"]["prior"]


def test_lm_with_prior_residuals_never_raises_the_augmented_loss(registered, syn):
    """LM with a strong Gaussian prior (W = 1e-3): every accepted step lowers the prior-augmented
    objective (data + W/2 |x - D(x)|^2 with the step's target), rejected steps change nothing, and
    the prior pulls the phase towards the prior mean against the data-only LM."""
    registered("gauss", Prior(gaussian_mmse, syn.pixel_size_A, syn.slice_thickness_A))
    base = {"name": "lm", "engine": "lm", "iterations": 8, "batch_size": 12,
            "optimize": {"object_phase": {"lr": 1.0}}, "lm": {"damping": 1e-6, "damping_min": 1e-8}}
    stage = _plan([{**base, "losses": {"single": 1.0, "prior": {"weight": 1e-3, "sigma_rad": 0.2}}}]).stages[0]
    state = syn.flat_state()
    ctx = Context.build(syn.measurement, state.positions_A, state.object_phase.shape[-2:])
    eng = make_engine(stage, ctx, syn.measurement, state, 0)
    carry = eng.init_carry(state)
    accepted = 0
    for it in range(8):
        before = np.asarray(eng.to_state(carry).object_phase)
        carry, terms = eng.iteration(carry, it)
        terms = jax.device_get(terms)
        if terms["accepted"]:
            accepted += 1
            assert terms["lm_objective"] <= terms["lm_objective_start"]
        else:
            np.testing.assert_array_equal(before, np.asarray(eng.to_state(carry).object_phase))
    assert accepted >= 3
    plain = _plan([base]).stages[0]
    data_only, _ = run_stage(plain, 0, state, syn.measurement, seed=0, plan_hash="t", workdir=None, progress=False)
    with_prior = np.asarray(eng.to_state(carry).object_phase)
    # the Gaussian prior shrinks the phase towards its mean: less spread than the data-only result
    assert np.std(with_prior) < np.std(np.asarray(data_only.object_phase))


def test_prior_on_another_grid_in_gradient_and_dps_stages(registered, syn):
    """A prior of 20 Å slabs on 0.6 Å pixels (U-Net-like: sides multiples of 4) for an object of two
    10 Å slices on 0.3 Å pixels: one slab on half the pixels, padded for the denoiser; a gradient
    stage with the prior term and a DPS stage both run in one compilation and stay finite."""
    registered("coarse", Prior(_mean_filter, 2 * syn.pixel_size_A, 2 * syn.slice_thickness_A, multiple=4))
    plan = _plan([
        {"name": "red", "iterations": 3, "batch_size": 12, "resample": {"slices": 2},
         "optimize": {"object_phase": {"lr": 0.01}}, "losses": {"single": 1.0, "prior": 1e-3}},
        {"name": "dps", "engine": "dps", "iterations": 3, "batch_size": 12}], prior="coarse")
    state = syn.flat_state()
    for i, stage in enumerate(plan.stages):
        state, record = run_stage(stage, i, state, syn.measurement, seed=0, plan_hash="t", workdir=None,
                                  progress=False)
        assert record.compilations == 1 and state.object_phase.shape[1] == 2
        assert all(np.isfinite(v).all() for k, v in record.history.items() if k != "probe_mode_powers")
    assert record.history["prior_shift_rms_rad"][-1] > 0


def _mixture_denoiser(components, tau):
    """The exact MMSE denoiser of the mixture of N(mu_k, tau^2 I), equal weights."""

    def denoise(x, sigma):
        var = tau**2 + sigma**2
        logits = -jnp.sum((x[None] - components) ** 2, axis=(1, 2)) / (2 * var)
        w = jax.nn.softmax(logits)
        return jnp.einsum("k,kyx->yx", w, components + (tau**2 / var) * (x[None] - components))

    return denoise


def test_dps_recovers_a_known_object_with_the_guidance(registered, syn):
    """A mixture prior whose components are the truth, the (poor) warm start itself and two decoys
    (the truth shifted by half its field; at half strength): from a 2-iteration gradient warm start
    (phase SSIM ~0.5), 20 DPS steps with guidance reach SSIM >= 0.9 (measured 0.95); without guidance
    the sampler stays at the warm start's component (the prior alone cannot tell them apart); one
    compilation; the history has sigma, the guidance weight and the data loss per step."""
    warm_plan = parse_plan({"stages": [{"name": "g", "iterations": 2, "batch_size": 12,
                                        "optimize": {"object_phase": {"lr": 0.01}}}]})
    warm, _ = run_stage(warm_plan.stages[0], 0, syn.flat_state(), syn.measurement, seed=0, plan_hash="t",
                        workdir=None, progress=False)
    warm_ssim = syn.phase_ssim(warm.object_phase[0, 0])
    truth = jnp.asarray(syn.truth_phase)
    components = jnp.stack([truth, warm.object_phase[0, 0], jnp.roll(truth, 6, 1), 0.5 * truth])
    registered("mixture", Prior(_mixture_denoiser(components, 0.05), syn.pixel_size_A, syn.slice_thickness_A))
    ssim, records = {}, {}
    for guidance in (0.0, 0.3):
        stage = _plan([{"name": "dps", "engine": "dps", "iterations": 20, "batch_size": 12,
                        "dps": {"sigma_start_rad": 1.0, "sigma_end_rad": 0.01, "guidance_rad": guidance}}],
                      prior="mixture").stages[0]
        state, records[guidance] = run_stage(stage, 0, warm, syn.measurement, seed=0, plan_hash="t", workdir=None,
                                             progress=False)
        ssim[guidance] = syn.phase_ssim(state.object_phase[0, 0])
        # only the phase is refined
        np.testing.assert_array_equal(np.asarray(state.probe), np.asarray(warm.probe))
    assert warm_ssim < 0.7 and ssim[0.0] < 0.7, (warm_ssim, ssim)
    assert ssim[0.3] >= 0.9, ssim
    rec = records[0.3]
    assert rec.compilations == 1
    assert rec.history["single"][-1] < rec.history["single"][0]
    np.testing.assert_allclose(rec.history["sigma_rad"], noise_levels(1.0, 0.01, 20)[:-1], rtol=1e-6)
    assert rec.history["guidance_weight_rad"][0] > rec.history["guidance_weight_rad"][-1] > 0


def test_dps_resumes_from_its_checkpoint_to_the_uninterrupted_result(registered, syn, tmp_path):
    """Stopped after step 4 of 6 (checkpoints every 2), ``resume`` continues from the checkpoint
    (noised start, Adam moments, per-step noise keys) to the arrays of an uninterrupted run."""
    registered("gauss", Prior(gaussian_mmse, syn.pixel_size_A, syn.slice_thickness_A))
    stage = _plan([{"name": "dps", "engine": "dps", "iterations": 6, "batch_size": 12, "checkpoint_every": 2,
                    "dps": {"eta": 0.5, "sigma_start_rad": 0.3}}]).stages[0]
    run = dict(seed=0, plan_hash="t", progress=False)
    full, _ = run_stage(stage, 0, syn.flat_state(), syn.measurement, workdir=tmp_path / "full", **run)

    def stop_after_4(it, scalars):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, 0, syn.flat_state(), syn.measurement, workdir=tmp_path / "cut", on_iteration=stop_after_4,
                  **run)
    resumed, record = run_stage(stage, 0, syn.flat_state(), syn.measurement, workdir=tmp_path / "cut", resume=True,
                                **run)
    assert record.resumed_from == 4 and len(record.history["sigma_rad"]) == 6
    np.testing.assert_array_equal(np.asarray(resumed.object_phase), np.asarray(full.object_phase))


def test_guidance_through_the_denoiser(registered, syn):
    """With the Gaussian MMSE denoiser (Jacobian a scalar times the identity) the gradient through
    the denoiser is the gradient at x0 scaled, so the RMS-normalised guidance, hence the result,
    is the same both ways; with the mean filter (a blur) it is not."""
    phases = {}
    for name, fn in (("gauss", gaussian_mmse), ("mean", _mean_filter)):
        registered(name, Prior(fn, syn.pixel_size_A, syn.slice_thickness_A))
        for through in (False, True):
            stage = _plan([{"name": "dps", "engine": "dps", "iterations": 3, "batch_size": 12,
                            "dps": {"adam": False, "through_denoiser": through, "guidance_rad": 0.05}}],
                          prior=name).stages[0]
            state, _ = run_stage(stage, 0, syn.flat_state(), syn.measurement, seed=0, plan_hash="t", workdir=None,
                                 progress=False)
            phases[name, through] = np.asarray(state.object_phase)
    np.testing.assert_allclose(phases["gauss", True], phases["gauss", False], atol=1e-5)
    assert np.abs(phases["mean", True] - phases["mean", False]).max() > 1e-3


def test_noise_schedule_and_guidance_weight():
    sig = noise_levels(0.5, 0.01, 6)
    assert sig[0] == pytest.approx(0.5) and sig[5] == pytest.approx(0.01) and sig[6] == 0
    assert np.all(np.diff(sig) < 0)
    geo = noise_levels(0.5, 0.005, 3, "geometric")
    np.testing.assert_allclose(geo[:3], [0.5, 0.05, 0.005])
    # MEP-Diffusion: g ∝ sigmoid(4 - logSNR)^(1/2), logSNR = -2 ln(sigma / sigma_data)
    assert guidance_weight(1.0, 1.0, 2.0) == pytest.approx(2.0 / np.sqrt(1 + np.exp(-4.0)))
    assert guidance_weight(0.01, 1.0, 1.0) == pytest.approx(np.sqrt(1 / (1 + np.exp(-(4 + 2 * np.log(0.01))))))


def test_prior_shift_reports_rms_and_ssim():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (1, 2, 32, 32)).astype(np.float32)
    same = prior_shift(a, a)
    assert same["rms_phase_difference_rad"] == 0 and same["ssim_phase_sum"] == pytest.approx(1.0)
    moved = prior_shift(a, a + 0.5)  # a constant offset is not a change the data can see
    assert moved["rms_phase_difference_rad"] == pytest.approx(0.0, abs=1e-6)
    other = prior_shift(a, rng.normal(0, 1, a.shape).astype(np.float32))
    assert other["rms_phase_difference_rad"] > 1 and other["ssim_phase_sum"] < 0.2 and other["ssim_3d"] < 0.2


def test_reconstruct_and_evaluate_with_a_prior(tmp_path, registered, syn, capsys):
    """The verbs: reconstruct with a prior plan (the prior named by the plan, in the provenance's
    resolved plan), evaluate --data-only reports prior_check; a prior that cannot be loaded is one
    line naming it, before any compute, and no output."""
    registered("mean", Prior(_mean_filter, syn.pixel_size_A, syn.slice_thickness_A))
    write_stores(syn, tmp_path / "prepared.zarr", tmp_path / "init.zarr")
    stage = {"name": "g", "iterations": 4, "batch_size": 12, "validation_fraction": 0.2,
             "optimize": {"object_phase": {"lr": 0.02}}, "losses": {"single": 1.0}}
    plans = {"data": {"stages": [stage]},
             "prior": {"prior": {"path": "mean"}, "stages": [{**stage, "losses": {"single": 1.0, "prior": 1e-3}}]},
             "missing": {"prior": {"path": "no-such-prior"},
                         "stages": [{**stage, "losses": {"single": 1.0, "prior": 1e-3}}]}}
    common = ["--data", str(tmp_path / "prepared.zarr"), "--init", str(tmp_path / "init.zarr"), "--quiet"]
    for name, plan in plans.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(plan))
    for name in ("data", "prior"):
        assert main(["reconstruct", "--plan", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / f"{name}.zarr"),
                     *common]) == 0
    import zarr

    resolved = zarr.open_group(str(tmp_path / "prior.zarr"), mode="r").attrs["provenance"]["plan"]
    assert resolved["stages"][0]["prior"]["path"] == "mean"
    capsys.readouterr()
    rc = main(["reconstruct", "--plan", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "missing.zarr"),
               *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "no-such-prior" in err[0], err
    assert not (tmp_path / "missing.zarr").exists() and not (tmp_path / "missing.zarr.partial").exists()
    assert main(["evaluate", "--result", str(tmp_path / "prior.zarr"), "--data-only", str(tmp_path / "data.zarr"),
                 "--out", str(tmp_path / "eval"), "--no-figures", "--quiet"]) == 0
    check = json.loads((tmp_path / "eval" / "metrics.json").read_text())["prior_check"]
    assert check["rms_phase_difference_rad"] > 0 and 0 < check["ssim_phase_sum"] < 1
    assert check["validation_loss_data_only"] > 0 and check["validation_loss_prior"] > 0
    assert check["validation_ratio"] == pytest.approx(check["validation_loss_prior"]
                                                      / check["validation_loss_data_only"])


@pytest.mark.slow
def test_prior_stages_on_two_devices_match_one(tmp_path):
    """The RED term (gradient, LM) and DPS on 2 virtual devices compute what one does (float32
    rounding; measured 1.6e-5 of the phase's largest value at most)."""
    out = tmp_path / "devices.json"
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    proc = subprocess.run([sys.executable, str(here / "_prior_devices.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for name, diff in result.items():
        assert diff["phase"] < 1e-3 and diff["history"] < 1e-3, (name, diff)
    assert "validation" in result["dps"]["terms"] and "prior" in result["lm"]["terms"]
