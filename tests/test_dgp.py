"""Deep generative prior (issue 18): the U-Net, the network parameterisations of object and probe,
pre-training, plan validation, stores, inspect and resume. Tiny networks (2 levels, 4 filters)
on small synthetic data keep it fast."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
import zarr
from _synthetic import lattice_phase, make_synthetic, write_stores

from ptycore.cli import main
from ptycore.errors import InvalidPlan
from ptycore.plan import parse_plan
from ptycore.recon.networks import NetworkObject, NetworkProbe, UNet, parameter_count, unet_parameter_count
from ptycore.recon.reconstruct import reconstruct
from ptycore.recon.runner import run_stage
from ptycore.recon.state import State

TINY = {"model": "dgp", "levels": 2, "filters": 4, "pretrain_lr": 0.01}


def _net_cfg(field="object", **kw):
    stage = {"name": "s", "iterations": 5, field: {**TINY, **kw}}
    return getattr(parse_plan({"stages": [stage]}).stages[0], field)


def _state(slices=1, modes=1, shape=(37, 42), probe_px=24):
    phase = np.stack([lattice_phase(shape, 0.25) * (1 + 0.1 * s) for s in range(slices)])[None]
    amplitude = 1.0 - 0.1 * phase
    yy, xx = np.mgrid[:probe_px, :probe_px] - probe_px / 2
    probe = np.stack([np.exp(-(yy**2 + xx**2) / (8.0 + 4 * m)) * np.exp(0.3j * m * xx) for m in range(modes)])
    return State(jnp.asarray(amplitude, jnp.float32), jnp.asarray(phase, jnp.float32),
                 jnp.asarray(probe * 30, jnp.complex64), jnp.zeros((4, 2), jnp.float32), jnp.zeros(2, jnp.float32),
                 jnp.float32(2.0))


# ---------------------------------------------------------------- the U-Net and its size
def _hand_count(channels, levels, filters):
    """The U-Net's parameters counted layer by layer: conv3x3 = 9·in·out + out, a group norm
    2·channels, transposed conv 2x2 = 4·in·out + out, the 1x1 head = in·out + out."""
    conv3 = lambda i, o: 9 * i * o + o  # noqa: E731
    block = lambda i, o: conv3(i, o) + 2 * o + conv3(o, o) + 2 * o  # noqa: E731
    widths = [filters * 2**k for k in range(levels)]  # 16, 32, 64 for the default
    n, c = 0, channels
    for w in widths:  # encoder
        n += block(c, w)
        c = w
    n += block(c, c)  # bottleneck at the deepest width
    for w in reversed(widths):  # decoder: up, concatenate the skip, block
        n += 4 * c * w + w + block(2 * w, w)
        c = w
    return n + c * channels + channels


@pytest.mark.parametrize("channels", [1, 2, 16])
def test_default_unet_parameter_count_equals_the_hand_count(channels):
    """The network as built (abstractly, by equinox.filter_eval_shape: the same layers and arrays'
    shapes without computing their initial values; the small one for real) against the count by hand."""
    net = eqx.filter_eval_shape(UNet, channels, levels=3, filters=16, key=jax.random.PRNGKey(0))
    assert parameter_count(net) == _hand_count(channels, 3, 16) == unet_parameter_count(channels, 3, 16)
    assert parameter_count(UNet(channels, 2, 4, key=jax.random.PRNGKey(1))) == _hand_count(channels, 2, 4)


def test_layer_recipe_against_the_papers_table_1():
    """Table 1 of McCray et al. (object DGPs of their Fig. 5, F = 8 for 2 and 3 layers, F = 16 for
    4): 3.9e4, 1.6e5, 2.6e6 trainable parameters. Their DGP for that complex object is
    complex-valued (2 real numbers per weight); our recipe with 1 complex channel gives the same
    counts to the 2 digits printed. Our networks are real-valued: half of that per channel."""
    table = {(2, 8): 3.9e4, (3, 8): 1.6e5, (4, 16): 2.6e6}
    for (levels, filters), paper in table.items():
        complex_count = 2 * unet_parameter_count(1, levels, filters)
        assert float(f"{complex_count:.1e}") == paper, (levels, filters, complex_count)


def test_circular_padding_makes_the_network_shift_equivariant():
    net = UNet(2, 2, 4, key=jax.random.PRNGKey(2))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16))
    shifted = net(jnp.roll(x, (4, 8), axis=(1, 2)))  # by multiples of 2**levels: exact
    np.testing.assert_allclose(shifted, jnp.roll(net(x), (4, 8), axis=(1, 2)), atol=1e-5)


# ---------------------------------------------------------------- the parameterisations
@pytest.mark.parametrize("slices", [1, 4, 8])
def test_object_network_output_has_the_objects_shape_and_dtype(slices):
    state = _state(slices=slices)
    part = NetworkObject(_net_cfg(), state, seed=0, stage_index=1)
    carried = part.carried(state)
    assert part.channels == 2 * slices  # phase and amplitude of every slice
    out = part.finish(state, carried)
    for name in ("object_phase", "object_amplitude"):
        assert getattr(out, name).shape == getattr(state, name).shape and getattr(out, name).dtype == jnp.float32
    same = NetworkObject(_net_cfg(identical_slices=True, output="phase"), state, seed=0, stage_index=1)
    out = same.finish(state, same.carried(state))
    assert same.channels == 1 and out.object_phase.shape == state.object_phase.shape
    np.testing.assert_array_equal(out.object_phase[:, 0], out.object_phase[:, -1])
    np.testing.assert_array_equal(out.object_amplitude, state.object_amplitude)  # phase only: kept


@pytest.mark.parametrize("modes", [1, 3])
def test_probe_network_output_is_a_complex_probe_of_the_same_shape(modes):
    state = _state(modes=modes)
    part = NetworkProbe(_net_cfg("probe"), state, seed=0, stage_index=0)
    out = part.finish(state, part.carried(state))
    assert part.channels == 2 * modes and out.probe.shape == state.probe.shape and out.probe.dtype == jnp.complex64


def test_pretraining_reproduces_a_known_object_and_probe():
    """150 AdamW steps (lr 0.01) of a 2-level, 8-filter U-Net: measured rms error 1.0 % of the
    phase range (2 slices, amplitude and phase); the probe's 3 % of its peak."""
    state = _state(slices=2, modes=2, shape=(32, 32))
    obj = NetworkObject(_net_cfg(pretrain_iterations=150, input_noise=0.0, filters=8), state, seed=0, stage_index=0)
    carried, losses = obj.pretrain(obj.carried(state))
    assert len(losses) == 150 and losses[-1] < 0.002 * losses[0]
    out = obj.finish(state, carried)
    span = float(np.ptp(state.object_phase))
    assert float(jnp.sqrt(jnp.mean((out.object_phase - state.object_phase) ** 2))) < 0.02 * span
    probe = NetworkProbe(_net_cfg("probe", pretrain_iterations=150, filters=8), state, seed=0, stage_index=0)
    carried, losses = probe.pretrain(probe.carried(state))
    out = probe.finish(state, carried)
    peak = float(jnp.max(jnp.abs(state.probe)))
    assert float(jnp.sqrt(jnp.mean(jnp.abs(out.probe - state.probe) ** 2))) < 0.05 * peak


def test_input_noise_is_fresh_each_step_and_seeded():
    state = _state()
    part = NetworkObject(_net_cfg(input_noise=0.025), state, seed=4, stage_index=1)
    carried = part.carried(state)
    params = part.view(state, carried)
    first = part.render(params, state, carried).object_phase
    _, later = part.apply(state, carried, params, jax.tree_util.tree_map(jnp.zeros_like, params))
    assert later["step"] == 1
    assert not np.array_equal(first, part.render(params, state, later).object_phase)  # a new draw
    again = NetworkObject(_net_cfg(input_noise=0.025), state, seed=4, stage_index=1)
    np.testing.assert_array_equal(first, again.render(params, state, again.carried(state)).object_phase)
    noise_free = part.finish(state, carried).object_phase
    assert 0 < float(jnp.max(jnp.abs(first - noise_free))) < float(np.ptp(state.object_phase))


# ---------------------------------------------------------------- plan validation
@pytest.mark.parametrize("stage, message", [
    ({"object": {**TINY, "levls": 3}}, "stage 's': object.levls: unknown key (did you mean 'levels'?)"),
    ({"probe": {"levels": 3}}, "stage 's': probe.model: required key is missing"),
    ({"object": {**TINY, "model": "vae"}}, "stages[0].object.model"),
    ({"object": {**TINY, "levels": 0}}, "stages[0].object.levels: must be >= 1"),
    ({"object": {**TINY, "lr": -1}}, "stages[0].object.lr: must be >= 0"),
    ({"object": {**TINY, "output": "complex"}}, "stages[0].object.output"),
    ({"object": TINY, "engine": "lm"}, "stage 's': object: {model: dgp} needs engine 'gradient', not 'lm'"),
    ({"object": TINY, "optimize": {"object_phase": {"lr": 0.01}}},
     "stage 's': optimize.object_phase: the object is generated by its network"),
    ({"probe": TINY, "optimize": {"probe": {"lr": 0.01}}}, "optimize.probe: the probe is generated by its network"),
    ({"object": TINY, "constraints": {"kz_filter": {}}}, "constraints.kz_filter changes object pixels"),
    ({"probe": TINY, "constraints": {"probe_orthogonalize": {}}}, "constraints.probe_orthogonalize changes probe"),
    ({"object": {**TINY, "start": 9}}, "object.start 9 is beyond the stage's 5 iterations"),
    ({"object": "dgp"}, "stage 's': object: a mapping like"),
])
def test_bad_network_options_are_rejected_naming_stage_and_field(stage, message):
    with pytest.raises(InvalidPlan) as err:
        parse_plan({"stages": [{"name": "s", "iterations": 5, **stage}]}, "plan.yaml")
    text = str(err.value)
    assert text.startswith("plan.yaml: stages[0]") and message in text and "\n" not in text, text


def test_a_network_stage_needs_no_optimize_and_pixel_plans_keep_their_hash():
    plan = parse_plan({"stages": [{"name": "s", "iterations": 5, "object": TINY}]})
    assert plan.stages[0].optimize == {} and plan.stages[0].object.optimizer == "adamw"
    pixel = {"stages": [{"name": "s", "iterations": 5, "optimize": {"object_phase": {"lr": 0.01}}}]}
    assert "object" not in parse_plan(pixel).resolved()["stages"][0]  # no new keys in pixel plans


# ---------------------------------------------------------------- the gradient engine with networks
def test_network_onset_does_not_recompile_and_progress_shows_size_and_pretraining(capsys):
    syn = make_synthetic(n_det=32, scan=6, counts=1e3)
    stage = parse_plan({"stages": [{"name": "d", "iterations": 4, "batch_size": 18,
                                    "object": {**TINY, "output": "phase", "pretrain_iterations": 5, "start": 2},
                                    "probe": {**TINY, "pretrain_iterations": 3},
                                    "optimize": {"positions": {"lr": 0.001, "start": 1}}}]}).stages[0]
    state = syn.flat_state()
    out, record = run_stage(stage, 0, state, syn.measurement, seed=0, plan_hash="h", workdir=None, progress=True)
    assert record.compilations == 1
    err = capsys.readouterr().err
    assert f"[d] object network: U-Net 2 levels, 4 filters, 1 channels, {unet_parameter_count(1, 2, 4):,} " \
           "parameters; pre-training 5 it: loss" in err and "[d] probe network: U-Net" in err
    assert len(record.pretrain["object"]) == 5 and len(record.pretrain["probe"]) == 3
    assert record.networks["object"]["parameters"] == unet_parameter_count(1, 2, 4)
    assert record.networks["probe"]["parameters"] == unet_parameter_count(2, 2, 4)
    assert record.network_arrays["object"]["step"] == 4 * 2  # 4 iterations of 2 batches
    assert out.object_phase.shape == state.object_phase.shape and np.isfinite(np.asarray(out.object_phase)).all()


# ---------------------------------------------------------------- stores, inspect, resume
def _plan(tmp_path, checkpoint_every=2):
    plan = {"name": "dgp-test", "seed": 7, "stages": [
        {"name": "warm", "iterations": 3, "batch_size": 16, "losses": {"poisson": 1.0},
         "optimize": {"object_phase": {"lr": 0.02}}},
        {"name": "dgp", "iterations": 6, "batch_size": 16, "losses": {"poisson": 1.0},
         "checkpoint_every": checkpoint_every,
         "object": {**TINY, "output": "phase", "pretrain_iterations": 10, "lr": 0.003},
         "probe": {**TINY, "pretrain_iterations": 4, "lr": 0.0005, "start": 2}}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dgp")
    syn = make_synthetic(n_det=32, scan=8, counts=1e3)
    write_stores(syn, d / "prepared.zarr", d / "init.zarr")
    args = {"plan_path": _plan(d), "data_path": d / "prepared.zarr", "init_path": d / "init.zarr"}
    reconstruct(**args, out_path=d / "full.zarr", progress=False)

    class Kill(Exception):
        pass

    def kill(it, scalars):  # dies after the DGP stage's 4th iteration (its checkpoint: after the 4th)
        if it == 3 + 3:
            raise Kill

    with pytest.raises(Kill):
        reconstruct(**args, out_path=d / "killed.zarr", progress=False, on_iteration=kill)
    assert (d / "killed.zarr.partial" / "checkpoints" / "dgp.npz").exists()
    reconstruct(**args, out_path=d / "killed.zarr", resume=True, progress=False)
    return d


def test_result_store_holds_rendered_arrays_networks_and_pretraining(runs):
    g = zarr.open_group(str(runs / "full.zarr"), mode="r")
    assert g["object_phase"].shape[1:] == (1, 59, 59) and g["probe"].dtype == np.complex64
    obj = g["networks/dgp/object"]
    assert obj["weights"].shape == (unet_parameter_count(1, 2, 4),)
    assert obj["optimizer_state"].shape[0] > 2 * obj["weights"].shape[0]  # AdamW: two moments and counters
    assert obj.attrs["parameters"] == unet_parameter_count(1, 2, 4) and obj.attrs["step"] == 6 * 4
    assert g["history/pretrain_object/dgp"].shape == (10,) and g["history/pretrain_probe/dgp"].shape == (4,)
    assert g["history/poisson"].shape == (9,)  # per-iteration history unchanged: 3 + 6 iterations
    nets = g.attrs["provenance"]["networks"]["dgp"]
    assert nets["object"]["pretrain_iterations"] == 10 and nets["probe"]["levels"] == 2


def test_resume_after_a_kill_gives_the_uninterrupted_arrays(runs):
    resumed, full = zarr.open_group(str(runs / "killed.zarr"), mode="r"), zarr.open_group(str(runs / "full.zarr"))
    assert resumed.attrs["provenance"]["stage_timings"]["dgp"]["resumed_from"] == 4
    names = ["object_phase", "object_amplitude", "probe", "positions_A", "history/poisson",
             "history/pretrain_object/dgp"]
    names += [f"networks/dgp/{f}/{k}" for f in ("object", "probe") for k in ("weights", "optimizer_state")]
    for name in names:
        np.testing.assert_array_equal(resumed[name][...], full[name][...], err_msg=name)


def test_inspect_lists_the_networks(runs, capsys):
    assert main(["inspect", str(runs / "full.zarr")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "dgp/object:" in x)
    assert f"{unet_parameter_count(1, 2, 4):,} parameters" in line and "2 levels, 4 filters" in line
    assert "pre-training loss" in line and "dgp/probe:" in out


def test_noise_sigma_is_a_fraction_of_the_input_range():
    state = _state()
    part = NetworkObject(_net_cfg(output="phase"), state, seed=0, stage_index=0)
    carried = part.carried(state)
    assert math.isclose(float(np.ptp(carried["input"])), 1.0, rel_tol=1e-5)  # normalised to unit range
    assert math.isclose(float(carried["scale"][0, 0, 0]), float(np.ptp(state.object_phase)), rel_tol=1e-5)


# ---------------------------------------------------------------- quality at low dose
@pytest.mark.slow
def test_dgp_at_low_dose_is_as_good_as_pixels_at_equal_iterations():
    """1e2 counts per pattern (8x8 scan, 32 px detector): a 10-iteration pixel warm start, then
    30 more iterations either of pixels (Adam, lr 0.02) or of a 2-level, 8-filter DGP (50 steps of
    pre-training, AdamW lr 3e-3). Measured (CPU, seed 1): warm start SSIM 0.719, pixels 0.774,
    DGP 0.780; the DGP must reach 0.75 and stay within 0.02 of the pixels."""
    syn = make_synthetic(n_det=32, scan=8, counts=1e2)

    def stage(name, **kw):
        return parse_plan({"stages": [{"name": name, "iterations": kw.pop("iterations", 30), "batch_size": 16,
                                       "losses": {"poisson": 1.0}, **kw}]}).stages[0]

    def run(cfg, state, index):
        return run_stage(cfg, index, state, syn.measurement, seed=1, plan_hash="h", workdir=None, progress=False)

    warm, _ = run(stage("warm", iterations=10, optimize={"object_phase": {"lr": 0.02}}), syn.flat_state(), 0)
    pixel, _ = run(stage("pixel", optimize={"object_phase": {"lr": 0.02}}), warm, 1)
    dgp, record = run(stage("dgp", object={**TINY, "filters": 8, "output": "phase", "pretrain_iterations": 50,
                                           "lr": 3e-3}), warm, 1)
    ssim = {name: syn.phase_ssim(s.object_phase[0, 0]) for name, s in (("warm", warm), ("pixel", pixel),
                                                                        ("dgp", dgp))}
    assert ssim["dgp"] > ssim["warm"] and ssim["dgp"] >= 0.75, ssim
    assert ssim["dgp"] >= ssim["pixel"] - 0.02, ssim


def test_report_lists_the_networks(runs):
    from ptycore.report import provenance_html

    html = provenance_html(zarr.open_group(str(runs / "full.zarr"), mode="r").attrs["provenance"])
    assert "<h3>Networks</h3>" in html and "U-Net 2 levels, 4 filters" in html
