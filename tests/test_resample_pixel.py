"""Coarse-to-fine object pixels: a stage that fits only the central detector pixels
(``resample.detector_px``) works on coarser object pixels over the same field of view, and the
state is Fourier-resampled between stages (object, probe) while positions stay in Å."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
import zarr
from _synthetic import CONVERGENCE_MRAD, ENERGY_KV, make_synthetic, write_stores

from ptycore.cli import main
from ptycore.errors import InvalidData
from ptycore.physics import Grid, Optics, intensities, make_probe
from ptycore.plan import parse_plan
from ptycore.recon.context import Measurement
from ptycore.recon.reconstruct import check_compatible, input_checksums
from ptycore.recon.runner import run_stage, stage_measurement
from ptycore.recon.state import fourier_resample, resample_object_grid, resample_pixels, resample_probe_window

N_DET, PIXEL_A = 64, 0.2  # 1.54 mrad per detector pixel: the 21.4 mrad disc (radius 14 px) fits in 32 px
COARSE = 32


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_det=N_DET, scan=12, step_A=0.5, pixel_A=PIXEL_A)



def _band_limited_phase(h, w, offset=2.5):
    """A periodic phase with 3 rad and 1.5 rad waves (spanning > 2π), below the half-size Nyquist."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    phase = offset + 3.0 * np.cos(2 * np.pi * (3 * y / h + 5 * x / w)) + 1.5 * np.sin(
        2 * np.pi * (7 * y / h - 11 * x / w) + 0.3)
    return jnp.asarray(phase, jnp.float32)[None, None]


# ---------------------------------------------------------------- (1) object
def test_object_resampling_conserves_phase_and_round_trips():
    phase = _band_limited_phase(96, 80)
    assert float(phase.max() - phase.min()) > 2 * np.pi  # phase wrapping would destroy this
    coarse = fourier_resample(phase, (48, 40))
    # total phase x area is conserved: mean x (H dx)(W dx) on both grids, same field of view
    np.testing.assert_allclose(float(coarse.mean()) * 48 * 40 * 2.0**2, float(phase.mean()) * 96 * 80, rtol=1e-6)
    # a band-limited field is interpolated exactly: coarse pixels are the fine field's samples
    np.testing.assert_allclose(np.asarray(coarse), np.asarray(phase[..., ::2, ::2]), atol=1e-5)
    back = fourier_resample(coarse, (96, 80))
    assert float(jnp.max(jnp.abs(back - phase))) < 1e-5  # float32; achieved 2.5e-6

    # object arrays (modes, slices): phase and log-amplitude resampled; 64 -> 48 detector pixels
    amplitude = jnp.exp(-0.05 * (phase - phase.min()))  # band-limited log-amplitude
    amp, ph = resample_object_grid(jnp.tile(amplitude, (1, 2, 1, 1)), jnp.tile(phase, (1, 2, 1, 1)), (64, 64),
                                   (48, 48))
    assert ph.shape == (1, 2, 72, 60)  # 96 x 48/64, 80 x 48/64: the new pixel is exactly 64/48 dx
    amp2, ph2 = resample_object_grid(amp, ph, (48, 48), (64, 64))
    assert ph2.shape == (1, 2, 96, 80)
    np.testing.assert_allclose(float(ph.mean()), float(phase.mean()), rtol=1e-6)
    assert float(jnp.max(jnp.abs(ph2 - phase))) < 1e-5
    assert float(jnp.max(jnp.abs(amp2 - amplitude))) < 1e-5

    # a size not divisible by the ratio is edge-padded on the far side first (no position moves)
    _, odd = resample_object_grid(jnp.ones((1, 1, 101, 99)), jnp.ones((1, 1, 101, 99)), (64, 64), (32, 32))
    assert odd.shape == (1, 1, 51, 50)
    np.testing.assert_allclose(np.asarray(odd), 1.0, atol=1e-6)


# ---------------------------------------------------------------- (2) probe and data
def test_detector_crop_keeps_counts_in_fft_order(synthetic):
    full = synthetic.measurement
    crop = full.cropped(COARSE)
    assert crop.detector_shape == (COARSE, COARSE) and crop.pixel_size_A == pytest.approx(PIXEL_A * N_DET / COARSE)
    # the same as shifting to the detector's centred view, cropping the centre, shifting back
    centred = np.fft.fftshift(np.asarray(full.intensities), axes=(-2, -1))
    lo = N_DET // 2 - COARSE // 2
    expected = np.fft.ifftshift(centred[:, lo : lo + COARSE, lo : lo + COARSE], axes=(-2, -1))
    np.testing.assert_array_equal(np.asarray(crop.intensities), expected)
    assert crop.mean_counts < full.mean_counts  # counts scattered beyond the band are not rescaled in


def test_probe_resampling_matches_coarse_probe_and_cropped_counts():
    counts = 1e5
    fine_grid, coarse_grid = Grid((N_DET, N_DET), PIXEL_A), Grid((COARSE, COARSE), PIXEL_A * N_DET / COARSE)
    probe = make_probe(fine_grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A=100.0)[None] * np.sqrt(counts)
    coarse = resample_probe_window(probe, (COARSE, COARSE))
    # the same as a probe built directly on the coarse grid with the same optics
    direct = make_probe(coarse_grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A=100.0)
    corr = abs(np.vdot(np.asarray(coarse[0]), np.asarray(direct))) / (
        np.linalg.norm(np.asarray(coarse[0])) * np.linalg.norm(np.asarray(direct)))
    assert corr > 0.999, corr  # achieved 1 - 1e-7: the aperture and its soft edge are inside the band

    # power: exactly what lies in the kept band (here all of it: the aperture is inside)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(np.asarray(probe[0]), norm="ortho"))) ** 2
    lo = N_DET // 2 - COARSE // 2
    in_band = spectrum[lo : lo + COARSE, lo : lo + COARSE].sum()
    np.testing.assert_allclose(float(jnp.sum(jnp.abs(coarse) ** 2)), in_band, rtol=1e-5)

    # counts: the coarse model with the resampled probe gives the cropped vacuum patterns pixel by pixel
    def vacuum(grid, p, n):
        pos = jnp.asarray([[n / 2 * grid.pixel_size_A + 0.3, n / 2 * grid.pixel_size_A - 0.1]], jnp.float32)
        shape = (1, 1, n + 2, n + 2)
        return intensities(Optics(grid, ENERGY_KV), jnp.ones(shape), jnp.zeros(shape), p, pos, jnp.zeros(2), 10.0)

    data = Measurement(vacuum(fine_grid, probe, N_DET), PIXEL_A, ENERGY_KV, CONVERGENCE_MRAD, (1, 1))
    crop = data.cropped(COARSE)
    model = vacuum(coarse_grid, coarse, COARSE)
    np.testing.assert_allclose(np.asarray(model), np.asarray(crop.intensities), atol=1e-4 * counts / COARSE**2)
    np.testing.assert_allclose(crop.mean_counts, float(jnp.sum(jnp.abs(coarse) ** 2)), rtol=1e-4)

    # back to the full window: zero-padded far field, power conserved, the probe recovered
    back = resample_probe_window(coarse, (N_DET, N_DET))
    np.testing.assert_allclose(float(jnp.sum(jnp.abs(back) ** 2)), float(jnp.sum(jnp.abs(coarse) ** 2)), rtol=1e-5)
    assert float(jnp.max(jnp.abs(back - probe))) < 1e-4 * float(jnp.max(jnp.abs(probe)))


def test_state_resampling_keeps_positions_and_holds_every_window(synthetic):
    state = synthetic.flat_state()
    coarse = resample_pixels(state, (COARSE, COARSE), PIXEL_A * N_DET / COARSE)
    assert coarse.probe.shape == (1, COARSE, COARSE)
    assert coarse.object_phase.shape[-2:] == tuple(-(-s // 2) for s in state.object_phase.shape[-2:])
    np.testing.assert_array_equal(np.asarray(coarse.positions_A), np.asarray(state.positions_A))
    assert float(coarse.slice_thickness_A) == float(state.slice_thickness_A)
    top_left = np.floor(np.asarray(coarse.positions_A) / (PIXEL_A * N_DET / COARSE) - COARSE // 2)
    assert top_left.min() >= 0 and (top_left + COARSE + 1).max(axis=0).tolist() <= list(coarse.object_phase.shape[-2:])
    fine = resample_pixels(coarse, (N_DET, N_DET), PIXEL_A)
    assert fine.probe.shape == (1, N_DET, N_DET) and fine.object_phase.shape == state.object_phase.shape


# ---------------------------------------------------------------- (3) plan validation
@pytest.mark.parametrize(("value", "message"), [
    (33, "stages[0].resample.detector_px: must be even"),
    (8, "stages[0].resample.detector_px: must be >= 16"),
    ("big", "stages[0].resample.detector_px"),
])
def test_invalid_detector_px_names_the_field(tmp_path, capsys, value, message):
    plan = tmp_path / "bad.yaml"
    plan.write_text(yaml.safe_dump({"stages": [{"name": "a", "iterations": 2, "resample": {"detector_px": value},
                                                "optimize": {"object_phase": {"lr": 0.01}}}]}))
    rc = main(["reconstruct", "--plan", str(plan), "--data", str(tmp_path / "nope.zarr"),
               "--init", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "r.zarr")])
    err = capsys.readouterr().err
    assert rc != 0 and message in err, err


@pytest.mark.parametrize(("detector_px", "message"), [
    (96, "stage 'coarse': resample.detector_px 96 is larger than the detector (64×64 pixels)"),
    (24, "stage 'coarse': resample.detector_px 24 keeps angles up to 16.9 mrad, inside the probe's convergence "
         "semi-angle 21.4 mrad"),
])
def test_detector_px_that_does_not_fit_the_data_fails_at_start(tmp_path, synthetic, capsys, detector_px, message):
    write_stores(synthetic, tmp_path / "prepared.zarr", tmp_path / "init.zarr")
    plan = tmp_path / "plan.yaml"
    stage = {"iterations": 2, "optimize": {"object_phase": {"lr": 0.01}}}
    plan.write_text(yaml.safe_dump({"stages": [{"name": "first", **stage},
                                               {"name": "coarse", "resample": {"detector_px": detector_px}, **stage}]}))
    rc = main(["reconstruct", "--plan", str(plan), "--data", str(tmp_path / "prepared.zarr"),
               "--init", str(tmp_path / "init.zarr"), "--out", str(tmp_path / "r.zarr"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r.zarr").exists() and not (tmp_path / "r.zarr.partial").exists()  # before any compute


def test_init_on_another_field_of_view_is_rejected(synthetic):
    state = synthetic.flat_state()
    m = synthetic.measurement
    check_compatible(resample_pixels(state, (COARSE, COARSE), 0.4), 0.4, m, "coarse.zarr", "data")  # a detector crop
    with pytest.raises(InvalidData, match=r"init.zarr: probe window 64×64 of 0.25 Å pixels spans 16×16 Å, but "
                                          r"data's detector 64×64 at 0.2 Å spans 12.8×12.8 Å"):
        check_compatible(state, 0.25, m, "init.zarr", "data")
    with pytest.raises(InvalidData, match="143 positions but data has 144 patterns"):
        check_compatible(state._replace(positions_A=state.positions_A[1:]), PIXEL_A, m, "init.zarr", "data")


# ---------------------------------------------------------------- (4) end to end
def _stages(coarse_iterations, fine_iterations, engine="lsqml"):
    common = {"engine": engine, "batch_size": 16, "losses": {"single": 1.0}, "checkpoint_every": 2,
              "optimize": {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}},
              "constraints": {"object_amplitude_bounds": {"max": 1.0}}}
    return [{"name": "coarse", "iterations": coarse_iterations, "resample": {"detector_px": COARSE}, **common},
            {"name": "fine", "iterations": fine_iterations, **common}]


def test_two_stage_coarse_to_fine_recovers_object(synthetic):
    """LSQML, 10 iterations on the central 32×32 detector pixels (0.4 Å object pixels), then 10 on
    all 64×64 (0.2 Å), from a flat object: achieved phase SSIM 0.955 after the coarse stage
    (upsampled) and 0.978 at the end (1e5 counts/pattern)."""
    plan = parse_plan({"stages": _stages(10, 10)})
    state = synthetic.flat_state()
    state, coarse = run_stage(plan.stages[0], 0, state, synthetic.measurement, seed=0, plan_hash="t", workdir=None,
                              progress=False)
    assert coarse.pixel_size_A == pytest.approx(0.4) and state.probe.shape == (1, COARSE, COARSE)
    assert coarse.history["single"][-1] < 0.9 * coarse.history["single"][0]
    upsampled = fourier_resample(state.object_phase, synthetic.truth_phase.shape)
    assert synthetic.phase_ssim(upsampled[0, 0]) > 0.9
    state, fine = run_stage(plan.stages[1], 1, state, synthetic.measurement, seed=0, plan_hash="t", workdir=None,
                            progress=False)
    assert fine.pixel_size_A == pytest.approx(PIXEL_A) and state.probe.shape == (1, N_DET, N_DET)
    assert state.object_phase.shape[-2:] == synthetic.truth_phase.shape
    ssim = synthetic.phase_ssim(state.object_phase[0, 0])
    assert ssim > 0.95, ssim


@pytest.fixture(scope="module")
def one_call(tmp_path_factory, synthetic):
    """Stores and the plan (coarse 6 + fine 4 LSQML iterations) run in one ``reconstruct`` call."""
    root = tmp_path_factory.mktemp("coarse_to_fine")
    write_stores(synthetic, root / "prepared.zarr", root / "init.zarr")
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"name": "c2f", "seed": 2, "stages": _stages(6, 4)}))
    common = ["--plan", str(plan), "--data", str(root / "prepared.zarr"), "--quiet"]
    assert main(["reconstruct", *common, "--init", str(root / "init.zarr"), "--out", str(root / "all.zarr")]) == 0
    return root, common


def test_stage_by_stage_equals_one_call(one_call):
    root, common = one_call
    assert main(["reconstruct", *common, "--init", str(root / "init.zarr"), "--stage", "coarse",
                 "--out", str(root / "coarse.zarr")]) == 0
    assert main(["reconstruct", *common, "--init", str(root / "coarse.zarr"), "--stage", "fine",
                 "--out", str(root / "fine.zarr")]) == 0
    coarse = zarr.open_group(str(root / "coarse.zarr"))
    assert coarse.attrs["pixel_size_A"] == pytest.approx(0.4) and coarse["probe"].shape == (1, COARSE, COARSE)
    assert coarse.attrs["provenance"]["stage_grids"]["coarse"] == {"pixel_size_A": pytest.approx(0.4),
                                                                   "detector_px": [COARSE, COARSE]}
    fine, everything = zarr.open_group(str(root / "fine.zarr")), zarr.open_group(str(root / "all.zarr"))
    for g in (fine, everything):  # the result is on the data's grid again
        assert g.attrs["pixel_size_A"] == pytest.approx(PIXEL_A) and g["probe"].shape == (1, N_DET, N_DET)
        assert g.attrs["stages"] == ["coarse", "fine"]
    for name in ("object_phase", "object_amplitude", "probe", "positions_A"):
        np.testing.assert_allclose(fine[name][...], everything[name][...], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(fine["history/single"][...], everything["history/single"][...], rtol=1e-6)


def test_resume_checkpoint_on_the_coarse_grid(one_call, synthetic):
    """A run killed after 4 of the coarse stage's 6 iterations (its checkpoint holds the 32-px
    carry) continues with --resume to the same arrays as the uninterrupted run."""
    root, common = one_call
    out = root / "resumed.zarr"
    plan = parse_plan(yaml.safe_load((root / "plan.yaml").read_text()))
    killed = plan.stages[0].model_copy(update={"iterations": 4})
    run_stage(killed, 0, synthetic.flat_state(), synthetic.measurement, seed=plan.seed, plan_hash=plan.hash(),
              workdir=root / "resumed.zarr.partial", progress=False,
              inputs=input_checksums(root / "prepared.zarr", root / "init.zarr"))
    assert (root / "resumed.zarr.partial" / "checkpoints" / "coarse.npz").exists()
    assert main(["reconstruct", *common, "--init", str(root / "init.zarr"), "--out", str(out), "--resume"]) == 0
    resumed, everything = zarr.open_group(str(out)), zarr.open_group(str(root / "all.zarr"))
    assert resumed.attrs["provenance"]["stage_timings"]["coarse"]["resumed_from"] == 4
    for name in ("object_phase", "object_amplitude", "probe"):
        np.testing.assert_allclose(resumed[name][...], everything[name][...], rtol=1e-6, atol=1e-6, err_msg=name)
    assert resumed.attrs["pixel_size_A"] == pytest.approx(PIXEL_A)


def test_stage_measurement_is_the_crop(synthetic):
    stage = parse_plan({"stages": _stages(1, 1)}).stages[0]
    m = stage_measurement(stage, synthetic.measurement)
    assert m.detector_shape == (COARSE, COARSE) and m.pixel_size_A == pytest.approx(0.4)
    assert stage_measurement(parse_plan({"stages": _stages(1, 1)}).stages[1], synthetic.measurement) is \
        synthetic.measurement
