"""``ptycore init`` and the whole ingest → preprocess → init chain on a small simulated dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from _ptydata import assert_refused, write_meta, write_raw_dataset

from ptycore.cli import main
from ptycore.physics import wavelength_A


def far_field(probe: np.ndarray) -> np.ndarray:
    """Detector-frame far field (zero frequency at N//2) of a probe centred in its window."""
    return np.fft.fftshift(np.fft.fft2(probe, norm="ortho"), axes=(-2, -1))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """raw → data.zarr → prepared.zarr (32 x 32 detector of 2.5 mrad, 6 x 6 scan, 20 Å thick)."""
    d = tmp_path_factory.mktemp("chain")
    h5, meta_path, patterns, meta = write_raw_dataset(d / "raw")
    assert main(["ingest", "--patterns", f"{h5}:patterns", "--meta", str(meta_path), "--out",
                 str(d / "data.zarr"), "--quiet"]) == 0
    assert main(["preprocess", "--data", str(d / "data.zarr"), "--out", str(d / "prepared.zarr"), "--quiet"]) == 0
    return {"dir": d, "prepared": d / "prepared.zarr", "data": d / "data.zarr", "patterns": patterns, "meta": meta}


def run_init(tmp_path, prepared, config: dict | None, name="init.zarr"):
    out = tmp_path / name
    argv = ["init", "--data", str(prepared), "--out", str(out), "--quiet"]
    if config is not None:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        argv += ["--config", str(cfg)]
    assert main(argv) == 0
    return zarr.open_group(str(out), mode="r"), out


def test_chain_gives_state_matching_the_metadata(tmp_path, chain):
    group, out = run_init(tmp_path, chain["prepared"], None)
    prepared = zarr.open_group(str(chain["prepared"]), mode="r")
    data = prepared["patterns"][...]
    n = data.shape[-1]
    meta = chain["meta"]
    # sampling: the pixel follows from the detector, as the simulation had it
    lam = wavelength_A(meta["energy_kv"])
    pixel = group.attrs["pixel_size_A"]
    assert pixel == pytest.approx(lam / (n * meta["detector_pixel_mrad"] * 1e-3))
    assert pixel == prepared.attrs["pixel_size_A"]
    # the result-store layout
    probe = group["probe"][...]
    assert probe.dtype == np.complex64 and probe.shape == (1, n, n)
    assert group["object_phase"].dtype == np.float32 and group["object_phase"].ndim == 4
    assert group["object_amplitude"].shape == group["object_phase"].shape
    assert group["object_phase"].shape[:2] == (1, 1)
    np.testing.assert_array_equal(group["object_amplitude"][...], 1.0)
    np.testing.assert_array_equal(group["object_phase"][...], 0.0)
    np.testing.assert_array_equal(group["tilts_mrad"][...], [0.0, 0.0])
    assert group["slice_thickness_A"].shape == () and float(group["slice_thickness_A"][...]) == meta["thickness_A"]
    # probe: intensity = mean counts, far field = the data's bright-field disk
    mean = data.mean(axis=0)
    assert (np.abs(probe) ** 2).sum() == pytest.approx(mean.sum(), rel=1e-5)
    model = np.abs(far_field(probe[0])) ** 2
    corr = (model * mean).sum() / np.sqrt((model**2).sum() * (mean**2).sum())
    assert corr > 0.99
    # positions: every window inside the object with the default margin of 8 px
    pos = group["positions_A"][...]
    assert pos.dtype == np.float32 and pos.shape == (36, 2)
    top_left = np.floor(pos / np.float32(pixel) - n // 2)
    hy, wx = group["object_phase"].shape[2:]
    assert top_left.min() >= 8 and (top_left[:, 0] + n + 8).max() <= hy and (top_left[:, 1] + n + 8).max() <= wx
    # origin_A maps object-frame positions back to the ingested scan frame
    nominal = zarr.open_group(str(chain["data"]), mode="r")["positions_A"][...]
    np.testing.assert_allclose(pos + np.asarray(group.attrs["origin_A"]), nominal, atol=1e-5)
    assert group.attrs["provenance"]["upstream"]["verb"] == "preprocess"
    # reconstruct reads both stores and accepts them together
    from ptycore.recon.context import load_measurement
    from ptycore.recon.reconstruct import check_compatible
    from ptycore.recon.state import load_state

    state, init_pixel = load_state(out)
    check_compatible(state, init_pixel, load_measurement(chain["prepared"]), out, chain["prepared"])


def test_vacuum_probe_is_the_mean_pattern_with_the_aberration_phase(tmp_path, chain):
    vac, _ = run_init(tmp_path, chain["prepared"], {"probe": "vacuum"}, "vac.zarr")
    ap, _ = run_init(tmp_path, chain["prepared"], None, "ap.zarr")
    mean = zarr.open_group(str(chain["prepared"]), mode="r")["patterns"][...].mean(axis=0)
    fv, fa = far_field(vac["probe"][0]), far_field(ap["probe"][0])
    np.testing.assert_allclose(np.abs(fv) ** 2, mean, rtol=1e-4, atol=1e-6 * mean.max())
    disk = np.abs(fa) ** 2 > 0.5 * (np.abs(fa) ** 2).max()
    phase_difference = np.angle(fv[disk] * np.conj(fa[disk]))
    assert np.abs(phase_difference).max() < 1e-3  # same defocus phase (sign included) as the aperture probe


def test_modes_slices_tilts_affine(tmp_path, chain):
    affine = [[1.02, 0.0], [0.0, 0.98]]
    group, _ = run_init(tmp_path, chain["prepared"], {
        "probe_modes": 3, "obj_modes": 2, "slices": 4, "per_position_tilts": True, "tilts_mrad": [1.0, -2.0],
        "affine": affine, "margin_px": 4})
    probe = group["probe"][...]
    mean_counts = zarr.open_group(str(chain["prepared"]), mode="r")["patterns"][...].sum(axis=(1, 2)).mean()
    assert probe.shape == (3, 32, 32)
    powers = (np.abs(probe) ** 2).sum(axis=(1, 2))
    assert powers.sum() == pytest.approx(mean_counts, rel=1e-4) and powers[0] > powers[1] > powers[2]
    gram = np.abs(np.einsum("ayx,byx->ab", probe.conj(), probe))
    assert (gram - np.diag(np.diag(gram))).max() < 1e-4 * powers.max()
    amp, phase = group["object_amplitude"][...], group["object_phase"][...]
    assert amp.shape[:2] == (2, 4)
    np.testing.assert_allclose((amp**2).sum(axis=0), 1.0, rtol=1e-6)  # a flat object passes all the probe
    assert np.all(phase[0] == 0) and 0 < phase[1].std() < 0.05
    assert float(group["slice_thickness_A"][...]) == pytest.approx(chain["meta"]["thickness_A"] / 4)
    tilts = group["tilts_mrad"][...]
    assert tilts.shape == (36, 2) and np.all(tilts == [1.0, -2.0])
    nominal = zarr.open_group(str(chain["prepared"]), mode="r")["positions_A"][...]
    pos = group["positions_A"][...]
    np.testing.assert_allclose(pos - pos[0], (nominal - nominal[0]) @ np.asarray(affine).T, atol=1e-5)
    assert np.floor(pos / np.float32(group.attrs["pixel_size_A"]) - 16).min() >= 4


def test_from_result_resamples_pixel_and_slices_conserving_phase(tmp_path, chain):
    first, first_path = run_init(tmp_path, chain["prepared"], {"slices": 2}, "first.zarr")
    p1 = first.attrs["pixel_size_A"]
    hy, wx = first["object_phase"].shape[2:]
    yy, xx = np.indices((hy, wx)) * p1
    centre = np.array([hy / 2, wx / 2]) * p1
    bump = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 1.2**2))
    writable = zarr.open_group(str(first_path), mode="r+")
    writable["object_phase"][0, 0] = 0.4 * bump
    writable["object_phase"][0, 1] = 0.2 * bump
    # a finer real-space pixel: pad the detector from 32 to 48
    cfg = tmp_path / "pad.yaml"
    cfg.write_text("detector_pad: 48\n")
    finer = tmp_path / "finer.zarr"
    assert main(["preprocess", "--data", str(chain["data"]), "--config", str(cfg), "--out", str(finer),
                 "--quiet"]) == 0
    second, _ = run_init(tmp_path, finer, {"slices": 3, "from_result": str(first_path)}, "second.zarr")
    p2 = second.attrs["pixel_size_A"]
    assert p2 == pytest.approx(p1 * 32 / 48)
    phase = second["object_phase"][...][0]
    assert phase.shape[0] == 3
    total = phase.sum(axis=0)
    # the total phase through the sample is conserved, pixel for pixel and integrated over the area
    assert total.max() == pytest.approx(0.6, rel=0.02)
    assert total.sum() * p2**2 == pytest.approx(0.6 * bump.sum() * p1**2, rel=0.01)
    # at the same place in the scan frame
    peak1 = np.asarray(first.attrs["origin_A"]) + centre
    peak2 = np.asarray(second.attrs["origin_A"]) + np.array(np.unravel_index(np.argmax(total), total.shape)) * p2
    assert np.abs(peak1 - peak2).max() <= p2
    # slices remapped by depth overlap: 2 → 3 puts 2/3, 1/3 + 1/3, 2/3 of the old slices in the new
    at = np.unravel_index(np.argmax(total), total.shape)
    np.testing.assert_allclose(phase[:, at[0], at[1]] / total[at], [0.4 * 2 / 3, 0.2, 0.2 * 2 / 3] / np.float32(0.6),
                               rtol=0.02)
    np.testing.assert_allclose(second["object_amplitude"][...], 1.0, rtol=1e-5)
    assert float(second["slice_thickness_A"][...]) == pytest.approx(chain["meta"]["thickness_A"] / 3)


@pytest.mark.parametrize("config, expect", [
    ({"probe_mode": 2}, ["probe_mode", "unknown key", "did you mean 'probe_modes'"]),
    ({"probe": "gaussian"}, ["probe", "'aperture' or 'vacuum'", "gaussian"]),
    ({"slices": 0}, ["slices", "greater than or equal to 1"]),
    ({"aberrations": {"C31": 10.0}}, ["aberrations", "unknown aberration 'C31'"]),
    ({"from_result": "/nonexistent/stage.zarr"}, ["from_result", "/nonexistent/stage.zarr not found"]),
])
def test_bad_init_config_refused(tmp_path, chain, capsys, config, expect):
    cfg = tmp_path / "init.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "init.zarr"
    assert_refused(capsys, ["init", "--data", str(chain["prepared"]), "--config", str(cfg), "--out", str(out)],
                   out, [chain["prepared"], cfg], [str(cfg), *expect])


def test_unknown_thickness_refused(tmp_path, capsys):
    yy, xx = np.indices((16, 16))
    np.save(tmp_path / "p.npy", np.broadcast_to(((yy - 8) ** 2 + (xx - 8) ** 2 < 16).astype(np.float32), (4, 16, 16)))
    write_meta(tmp_path / "meta.yaml", {"energy_kv": 300, "convergence_mrad": 20, "scan_shape": [2, 2],
                                        "scan_step_A": [1, 1], "detector_pixel_mrad": 5.0})
    for verb, argv in [("ingest", ["--patterns", str(tmp_path / "p.npy"), "--meta", str(tmp_path / "meta.yaml"),
                                   "--out", str(tmp_path / "data.zarr")]),
                       ("preprocess", ["--data", str(tmp_path / "data.zarr"), "--out", str(tmp_path / "prep.zarr")])]:
        assert main([verb, *argv, "--quiet"]) == 0
    out = tmp_path / "init.zarr"
    cfg = write_meta(tmp_path / "init.yaml", {"slices": 4})  # one slice starts anyway (tests/test_autoplan.py)
    assert_refused(capsys, ["init", "--data", str(tmp_path / "prep.zarr"), "--config", str(cfg), "--out", str(out)],
                   out, [tmp_path / "prep.zarr"], ["prep.zarr", "thickness is unknown", "thickness_A"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "config" / "init").glob("*.yaml")))
def test_example_configs_are_valid(path):
    from ptycore.data.initialize import InitConfig
    from ptycore.data.preprocess import load_config

    assert load_config(path, InitConfig).slices >= 1
