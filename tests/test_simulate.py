"""``ptycore simulate``: files, metadata, counts, truth frame, and agreement with ptycore's own model."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import zarr

pytest.importorskip("abtem")
pytest.importorskip("ase")

import jax.numpy as jnp  # noqa: E402

from ptycore.cli import main  # noqa: E402
from ptycore.data.metadata import load_metadata  # noqa: E402
from ptycore.data.simulate import SimulationParams, plan_geometry, truth_cell_phase  # noqa: E402
from ptycore.physics import Grid, Optics, diffraction_patterns, make_probe, wavelength_A  # noqa: E402

pytestmark = pytest.mark.sim

LATTICE_A = 3.905
SCAN = (8, 8)
STEP_A = 0.4
DOSE = 1e6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "sto"
    rc = main(["simulate", "--out", str(out), "--scan-shape", *map(str, SCAN), "--scan-step-A", str(STEP_A),
               "--dose", str(DOSE), "--truth-slice-A", str(LATTICE_A / 2), "--seed", "3", "--quiet"])
    assert rc == 0
    return out


def _read(out):
    with h5py.File(out / "patterns.h5", "r") as f:
        patterns = f["patterns"][...]
    return patterns, load_metadata(out / "meta.yaml"), zarr.open_group(str(out / "truth.zarr"), mode="r")


def test_writes_the_ingest_format(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["meta.yaml", "patterns.h5", "truth.zarr"]
    assert not dataset.with_name(dataset.name + ".partial").exists()
    patterns, meta, truth = _read(dataset)
    assert patterns.shape == (*SCAN, 64, 64) and patterns.dtype == np.float32
    assert meta.scan_shape == SCAN and meta.scan_step_A == (STEP_A, STEP_A)
    assert meta.energy_kv == 300 and meta.convergence_mrad == 21.4 and meta.defocus_A == 150
    assert meta.dose_e_per_A2 == DOSE and meta.thickness_A == pytest.approx(LATTICE_A)
    assert meta.sample["crystal"] == "SrTiO3" and meta.sample["cells"] == [4, 4, 1]
    # the achieved detector pixel: the periodic window holds 4 unit cells
    assert meta.detector_pixel_mrad == pytest.approx(wavelength_A(300) / (4 * LATTICE_A) * 1e3)
    provenance = truth.attrs["provenance"]
    assert provenance["parameters"]["dose_e_per_A2"] == DOSE and provenance["parameters"]["seed"] == 3
    assert provenance["versions"]["abtem"]


def test_pattern_counts_are_poisson_around_the_dose(dataset):
    patterns, _, _ = _read(dataset)
    assert np.all(patterns >= 0) and np.array_equal(patterns, np.round(patterns))
    expected = DOSE * STEP_A * STEP_A  # electrons per position
    z = (patterns.sum(axis=(-2, -1)) - expected) / np.sqrt(expected)
    assert np.abs(z).max() < 5
    assert 0.6 < z.std() < 1.5  # Poisson scatter of the totals, not exact totals


def test_bright_field_disk_radius(dataset):
    patterns, meta, _ = _read(dataset)
    mean = patterns.mean(axis=(0, 1))
    n = mean.shape[0]
    y, x = np.indices(mean.shape) - n // 2
    r = np.hypot(y, x)
    assert np.unravel_index(np.argmax(mean * (r < 3)), mean.shape) == pytest.approx((n // 2, n // 2), abs=2)
    disk = mean > 0.5 * np.median(mean[r < 5])
    radius_px = np.sqrt(disk.sum() / np.pi)
    assert radius_px == pytest.approx(meta.convergence_mrad / meta.detector_pixel_mrad, abs=1.5)


def test_truth_object(dataset):
    patterns, meta, truth = _read(dataset)
    phase, phase_sum = truth["object_phase"][...], truth["object_phase_sum"][...]
    pixel = truth.attrs["pixel_size_A"]
    n = patterns.shape[-1]
    assert phase.dtype == np.float32 and phase.shape[:2] == (1, 2)
    assert truth.attrs["slice_thickness_A"] == pytest.approx(LATTICE_A / 2)
    assert pixel == pytest.approx(4 * LATTICE_A / n)
    np.testing.assert_allclose(phase[0].sum(axis=0), phase_sum, rtol=1e-5, atol=1e-6)
    # the field of view holds every probe window: scanned area plus half a window on each side
    positions = truth["positions_A"][...]
    assert positions.shape == (SCAN[0] * SCAN[1], 2)
    assert positions.min() - (n // 2) * pixel >= 0
    assert (positions.max(axis=0) + (n // 2) * pixel < np.array(phase.shape[-2:]) * pixel).all()
    # origin_A: scan position (0, 0) is on an Sr column, the strongest phase in the crystal
    origin = np.asarray(truth.attrs["origin_A"])
    np.testing.assert_allclose(positions[0], -origin, atol=1e-4)
    peak = np.unravel_index(np.argmax(phase_sum), phase_sum.shape)
    offset = (np.asarray(peak) * pixel + origin) / LATTICE_A  # scan-frame position in unit cells
    np.testing.assert_allclose(offset, np.round(offset), atol=0.5 * pixel / LATTICE_A)
    # one slice per layer: SrO (slice 0) and TiO2 (slice 1), each with its own columns
    sr_pixel = tuple(np.round(-origin / pixel).astype(int))
    ti_pixel = tuple(np.round((-origin + LATTICE_A / 2) / pixel).astype(int))
    assert phase[0, 0][sr_pixel] > 3 * phase[0, 1][sr_pixel]
    assert phase[0, 1][ti_pixel] > 1.5 * phase[0, 0][ti_pixel]
    # the probe is abTEM's on the reconstruction grid, carrying the electrons per position
    probe = truth["probe"][...]
    assert probe.shape == (1, n, n) and probe.dtype == np.complex64
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(DOSE * STEP_A * STEP_A, rel=1e-4)
    ours = np.abs(np.asarray(make_probe(Grid((n, n), pixel), 300, 21.4, meta.defocus_A))) ** 2
    assert np.corrcoef(ours.ravel(), np.abs(probe[0]).ravel() ** 2)[0, 1] > 0.999


def test_truth_depth_sum_does_not_depend_on_slicing():
    sums = []
    for truth_slice_A in (LATTICE_A, LATTICE_A / 2, 2 * LATTICE_A):
        params = SimulationParams(cells_z=2, detector_px=32, convergence_mrad=15, truth_slice_A=truth_slice_A)
        cell = truth_cell_phase(params, plan_geometry(params))
        assert cell.shape == (round(2 * LATTICE_A / truth_slice_A), 32, 32)
        sums.append(cell.sum(axis=0))
    np.testing.assert_allclose(sums[1], sums[0], atol=1e-4 * sums[0].max())
    np.testing.assert_allclose(sums[2], sums[0], atol=1e-4 * sums[0].max())


def test_noise_free_patterns_match_ptycore_forward_model_on_the_truth(tmp_path):
    """Pins every frame at once: scan order, (y, x) transposes, origin_A, positions_A and tilt sign.

    ptycore's model runs on the reconstruction grid (0.244 Å pixels, band limit 2/3 of its
    Nyquist), abTEM on a 2.5x finer one, so they agree to about 1 % rather than exactly; a
    wrong tilt sign, no tilt, or x/y swapped positions each give > 3 %.
    """
    out = tmp_path / "tilted"
    tilt = (15.0, -25.0)
    rc = main(["simulate", "--out", str(out), "--scan-shape", "3", "4", "--scan-step-A", "0.7", "0.45",
               "--cells-z", "2", "--truth-slice-A", str(LATTICE_A / 2), "--defocus-A", "60",
               "--tilt-mrad", *map(str, tilt), "--no-noise", "--quiet"])
    assert rc == 0
    patterns, meta, truth = _read(out)
    assert meta.sample["mistilt_mrad"] == list(tilt)
    electrons = meta.dose_e_per_A2 * 0.7 * 0.45
    np.testing.assert_allclose(patterns.sum(axis=(-2, -1)), electrons, rtol=1e-4)  # no noise: exact totals
    phase = jnp.asarray(truth["object_phase"][...])
    positions = truth["positions_A"][...]
    n = patterns.shape[-1]
    grid = Grid((n, n), truth.attrs["pixel_size_A"])
    probe = make_probe(grid, meta.energy_kv, meta.convergence_mrad, meta.defocus_A)[None] * np.sqrt(electrons)

    def model(pos, tilt_mrad):
        out = diffraction_patterns(Optics(grid, meta.energy_kv), jnp.ones_like(phase), phase, probe,
                                   jnp.asarray(pos), jnp.asarray(tilt_mrad, jnp.float32),
                                   truth.attrs["slice_thickness_A"])
        return np.asarray(out).reshape(patterns.shape)

    k = np.fft.fftshift(np.hypot(*grid.frequencies_invA()))
    inside = k < 0.6 * grid.nyquist_invA()

    def errors(model_patterns):
        data, fit = patterns.reshape(-1, n, n), model_patterns.reshape(-1, n, n)
        return np.array([np.linalg.norm(d[inside] - f[inside]) / np.linalg.norm(d[inside])
                         for d, f in zip(data, fit, strict=True)])

    assert errors(model(positions, tilt)).max() < 0.02
    assert errors(model(positions, (-tilt[0], -tilt[1]))).mean() > 0.03
    assert errors(model(positions, (0.0, 0.0))).mean() > 0.03
    assert errors(model(positions[:, ::-1].copy(), tilt)).mean() > 0.03


@pytest.mark.parametrize(
    "args, named",
    [
        (["--dose", "-1"], "--dose"),
        (["--dose", "0"], "--dose"),
        (["--scan-step-A", "0"], "--scan-step-A"),
        (["--crystal", "Unobtainium"], "Unobtainium"),
        (["--convergence-mrad", "45"], "--convergence-mrad"),
        (["--detector-px", "4"], "--detector-px"),
        (["--scan-shape", "0", "4"], "--scan-shape"),
    ],
)
def test_bad_arguments_fail_before_compute(tmp_path, capsys, args, named):
    out = tmp_path / "bad"
    rc = main(["simulate", "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and named in err
    assert not out.exists() and not out.with_name("bad.partial").exists()
    if named == "Unobtainium":
        assert "SrTiO3" in err  # lists the known crystals


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    tiny = ["--scan-shape", "2", "2", "--detector-px", "32", "--convergence-mrad", "15", "--quiet"]
    assert main(["simulate", "--out", str(out), *tiny]) != 0
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["simulate", "--out", str(out), *tiny, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.yaml", "patterns.h5", "truth.zarr"]


def test_missing_abtem_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "abtem", None)  # what an environment without abTEM sees
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ptycore[sim]'" in err
    assert not out.exists()
