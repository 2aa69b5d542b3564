"""``ptycore preprocess``: crop / bin / resample / pad keep the disk centred and the sampling
consistent; dose noise is Poisson at the requested dose; steps are recorded; bad configs refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from _ptydata import assert_refused, simulate, write_h5, write_meta

from ptycore.cli import main
from ptycore.data.preprocess import PreprocessConfig, load_config, resample_detector
from ptycore.physics import wavelength_A

SHIFT = (3, -2)  # the raw detector's disk sits off centre by this many pixels


def disk_centre(pattern: np.ndarray) -> np.ndarray:
    """Intensity centre of mass of the bright-field disk (pixels above 10 % of the maximum)."""
    weights = np.where(pattern > 0.1 * pattern.max(), pattern, 0.0)
    yy, xx = np.indices(pattern.shape)
    return np.array([(weights * yy).sum(), (weights * xx).sum()]) / weights.sum()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data.zarr of a 6 x 6 scan on a 48 x 48 detector of 2 mrad pixels, disk off centre."""
    directory = tmp_path_factory.mktemp("pre")
    patterns, meta, _ = simulate(n_det=48, det_mrad=2.0)
    patterns = np.roll(patterns, SHIFT, axis=(2, 3))
    write_h5(directory / "patterns.h5", patterns)
    write_meta(directory / "meta.yaml", meta)
    out = directory / "data.zarr"
    assert main(["ingest", "--patterns", str(directory / "patterns.h5"), "--meta", str(directory / "meta.yaml"),
                 "--out", str(out), "--quiet"]) == 0
    return {"path": out, "patterns": patterns, "meta": meta}


def run_preprocess(tmp_path, data_path, config: dict, name="prepared.zarr"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    assert main(["preprocess", "--data", str(data_path), "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    return zarr.open_group(str(out), mode="r")


@pytest.mark.parametrize("bin_factor, crop, pad, tolerance_px", [(3, 30, 16, 0.02), (2, 32, 24, 0.25 + 0.02)])
def test_crop_bin_pad_keeps_disk_centred_and_sampling_consistent(tmp_path, data, bin_factor, crop, pad,
                                                                  tolerance_px):
    raw_mean = data["patterns"].reshape(-1, 48, 48).mean(axis=0)
    np.testing.assert_allclose(disk_centre(raw_mean), np.array([24, 24]) + SHIFT, atol=0.02)
    group = run_preprocess(tmp_path, data["path"], {"scan_crop": [1, 5, 0, 6], "detector_crop": crop,
                                                    "detector_bin": bin_factor, "detector_pad": pad})
    patterns = group["patterns"][...]
    assert patterns.shape == (24, pad, pad) and patterns.dtype == np.float32
    # the disk is centred at N//2: exactly for an odd bin, within 1/(2k) binned pixel for an even one
    centre = disk_centre(patterns.mean(axis=0))
    assert np.abs(centre - pad // 2).max() <= tolerance_px, centre
    # sampling: binned pixels, real-space pixel = lambda / (N * pixel), the disk's radius in mrad
    pixel_mrad = 2.0 * bin_factor
    attrs = dict(group.attrs)
    assert attrs["detector_pixel_mrad"] == pytest.approx(pixel_mrad)
    assert attrs["metadata"]["detector_pixel_mrad"] == pytest.approx(pixel_mrad)
    assert attrs["detector_shape"] == [pad, pad]
    lam = wavelength_A(data["meta"]["energy_kv"])
    assert attrs["pixel_size_A"] == pytest.approx(lam / (pad * pixel_mrad * 1e-3))
    bright = patterns.mean(axis=0) > 0.5 * patterns.mean(axis=0).max()
    radius_mrad = np.sqrt(bright.sum() / np.pi) * pixel_mrad
    assert radius_mrad == pytest.approx(data["meta"]["convergence_mrad"], rel=0.1)
    # counts: the crop keeps the whole disk, binning and padding keep every count
    raw = data["patterns"][1:5].reshape(24, 48, 48)
    np.testing.assert_allclose(patterns.sum(axis=(1, 2)), raw.sum(axis=(1, 2)), rtol=0.02)
    # scan crop: rows 1-4, all columns, re-origined; metadata follows
    assert attrs["scan_shape"] == [4, 6] and attrs["metadata"]["scan_shape"] == [4, 6]
    full = zarr.open_group(str(data["path"]), mode="r")["positions_A"][...].reshape(6, 6, 2)
    np.testing.assert_allclose(group["positions_A"][...], (full[1:5] - full[1, 0]).reshape(-1, 2), atol=1e-6)
    np.testing.assert_allclose(attrs["scan_origin_A"], full[1, 0], atol=1e-6)
    # steps in the documented order, in the attrs and the provenance, upstream kept
    names = [s["step"] for s in attrs["preprocess"]]
    assert names == ["scan_crop", "clip_negative", "detector_crop", "detector_bin", "detector_pad"]
    crop_step = attrs["preprocess"][2]
    np.testing.assert_allclose(crop_step["bright_field_centre_px"], np.array([24, 24]) + SHIFT, atol=0.5)
    assert attrs["provenance"]["preprocess"] == attrs["preprocess"]
    upstream = zarr.open_group(str(data["path"]), mode="r").attrs["provenance"]
    assert attrs["provenance"]["upstream"] == upstream and attrs["provenance"]["verb"] == "preprocess"


def test_resample_is_fourier_interpolation(tmp_path, data):
    group = run_preprocess(tmp_path, data["path"], {"detector_crop": 32, "detector_resample": 48})
    patterns = group["patterns"][...]
    attrs = dict(group.attrs)
    assert patterns.shape == (36, 48, 48)
    # the same angular range in finer pixels: real-space pixel unchanged by resampling
    assert attrs["detector_pixel_mrad"] == pytest.approx(2.0 * 32 / 48)
    lam = wavelength_A(data["meta"]["energy_kv"])
    assert attrs["pixel_size_A"] == pytest.approx(lam / (32 * 2.0e-3))
    np.testing.assert_allclose(disk_centre(patterns.mean(axis=0)), [24, 24], atol=0.05)
    cropped = data["patterns"].reshape(36, 48, 48)[:, 11:43, 6:38]  # the window around the disk
    np.testing.assert_allclose(patterns.sum(axis=(1, 2)), cropped.sum(axis=(1, 2)), rtol=1e-4)
    # back to 32 pixels gives the cropped patterns again (interpolation, not smoothing)
    np.testing.assert_allclose(resample_detector(patterns.astype(np.float64), 32), cropped, atol=2e-3 *
                               cropped.max())


@pytest.mark.parametrize("m, n", [(16, 24), (15, 22), (16, 9), (17, 30)])
def test_resample_round_trip_exact(m, n):
    rng = np.random.default_rng(0)
    patterns = rng.random((2, m, m))
    up = resample_detector(patterns, n)
    assert up.shape == (2, n, n)
    np.testing.assert_allclose(up.sum(axis=(1, 2)), patterns.sum(axis=(1, 2)))
    if n > m:  # upsampling loses nothing: coming back is exact
        np.testing.assert_allclose(resample_detector(up, m), patterns, atol=1e-12)


@pytest.fixture(scope="module")
def vacuum(tmp_path_factory):
    """data.zarr of 100 identical disk patterns (a vacuum scan) of 1000 counts each."""
    directory = tmp_path_factory.mktemp("vac")
    yy, xx = np.indices((24, 24))
    disk = ((yy - 12) ** 2 + (xx - 12) ** 2 <= 6**2).astype(np.float32)
    np.save(directory / "p.npy", np.broadcast_to(disk * 1000 / disk.sum(), (100, 24, 24)))
    write_meta(directory / "meta.yaml", {"energy_kv": 300, "convergence_mrad": 20, "scan_shape": [10, 10],
                                         "scan_step_A": [0.5, 0.4], "detector_pixel_mrad": 3.5})
    out = directory / "data.zarr"
    assert main(["ingest", "--patterns", str(directory / "p.npy"), "--meta", str(directory / "meta.yaml"),
                 "--out", str(out), "--quiet"]) == 0
    return {"path": out, "disk": disk}


def test_dose_draws_poisson_counts_at_the_target_dose(tmp_path, vacuum):
    dose = 2000.0  # e/Å²: 2000 * 0.5 * 0.4 = 400 counts per pattern
    group = run_preprocess(tmp_path, vacuum["path"], {"dose_e_per_A2": dose, "seed": 7}, "a.zarr")
    counts = group["patterns"][...]
    assert np.array_equal(counts, np.round(counts))  # whole electrons
    totals = counts.sum(axis=(1, 2))
    assert totals.mean() == pytest.approx(400, abs=3 * np.sqrt(400 / 100))
    # Poisson: per-pixel variance across identical patterns equals the mean
    inside = vacuum["disk"] > 0
    ratio = counts[:, inside].var(axis=0, ddof=1).mean() / counts[:, inside].mean()
    assert ratio == pytest.approx(1.0, abs=0.15)
    assert group.attrs["metadata"]["dose_e_per_A2"] == dose
    step = group.attrs["preprocess"][-1]
    assert step["step"] == "dose" and step["counts_per_pattern"] == pytest.approx(400) and step["seed"] == 7
    again = run_preprocess(tmp_path, vacuum["path"], {"dose_e_per_A2": dose, "seed": 7}, "b.zarr")
    other = run_preprocess(tmp_path, vacuum["path"], {"dose_e_per_A2": dose, "seed": 8}, "c.zarr")
    assert np.array_equal(again["patterns"][...], counts)
    assert not np.array_equal(other["patterns"][...], counts)


def test_read_noise_background_threshold_normalize(tmp_path, vacuum):
    clean = np.broadcast_to(vacuum["disk"] * 1000 / vacuum["disk"].sum(), (100, 24, 24))
    noisy = run_preprocess(tmp_path, vacuum["path"], {"read_noise": 2.0, "clip_negative": False}, "n.zarr")
    assert (noisy["patterns"][...] - clean).std() == pytest.approx(2.0, rel=0.05)
    # background 2 then threshold 1: the dark area becomes 0, the disk (8.85 per pixel) loses 2
    group = run_preprocess(tmp_path, vacuum["path"], {"background": 2.0, "threshold": 1.0,
                                                      "normalize_mean_counts": 1.0}, "b.zarr")
    expected = np.where(clean - 2 < 1, 0, clean - 2)
    expected = expected / expected.sum(axis=(1, 2)).mean()
    np.testing.assert_allclose(group["patterns"][...], expected, rtol=1e-5, atol=1e-8)
    names = [s["step"] for s in group.attrs["preprocess"]]
    assert names == ["background", "threshold", "clip_negative", "normalize"]


# ---------------------------------------------------------------- bad configs
@pytest.mark.parametrize("config, expect", [
    ({"dose_e_per_A2": 0}, ["dose_e_per_A2", "greater than 0", "got 0"]),
    ({"dose_e_per_A2": -5.0}, ["dose_e_per_A2", "greater than 0", "got -5.0"]),
    ({"scan_crop": [0, 7, 0, 6]}, ["scan_crop", "[0, 7, 0, 6]", "outside the scan of 6 x 6"]),
    ({"scan_crop": [3, 2, 0, 6]}, ["scan_crop", "y0 < y1"]),
    ({"detector_crop": 30, "detector_bin": 4}, ["detector_bin", "4 does not divide the detector size 30"]),
    ({"detector_bin": 5}, ["detector_bin", "5 does not divide the detector size 48"]),
    ({"detector_crop": 64}, ["detector_crop", "64 px is larger than the detector"]),
    ({"detector_crop": 16}, ["detector_crop", "16 px spans only +-16 mrad", "convergence_mrad 20"]),
    ({"detector_pad": 40}, ["detector_pad", "40 is smaller than the detector"]),
    ({"detector_bining": 2}, ["detector_bining", "unknown key", "did you mean 'detector_bin'"]),
])
def test_bad_config_refused(tmp_path, data, capsys, config, expect):
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "prepared.zarr"
    assert_refused(capsys, ["preprocess", "--data", str(data["path"]), "--config", str(cfg), "--out", str(out)],
                   out, [data["path"], cfg], [str(cfg), *expect])


def test_crop_window_leaving_the_detector_refused(tmp_path, data, capsys):
    """A disk near the detector edge: a centred crop window would leave the detector."""
    write_h5(tmp_path / "p.h5", np.roll(data["patterns"][:2, :2], (7, 2), axis=(2, 3)))  # disk at (34, 24)
    write_meta(tmp_path / "meta.yaml", {**data["meta"], "scan_shape": [2, 2]})
    ingested = tmp_path / "data.zarr"
    assert main(["ingest", "--patterns", str(tmp_path / "p.h5"), "--meta", str(tmp_path / "meta.yaml"),
                 "--out", str(ingested), "--quiet"]) == 0
    cfg = tmp_path / "pre.yaml"
    cfg.write_text("detector_crop: 40\n")
    out = tmp_path / "prepared.zarr"
    assert_refused(capsys, ["preprocess", "--data", str(ingested), "--config", str(cfg), "--out", str(out)],
                   out, [ingested, cfg],
                   [str(cfg), "detector_crop", "extends outside the 48 x 48 detector", "(34.0, 24.0)"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "config" / "preprocess").glob("*.yaml")))
def test_example_configs_are_valid(path):
    config = load_config(path, PreprocessConfig)
    assert config.clip_negative is True
