"""``ptycore evaluate`` and ``ptycore inspect`` on stores made here with numpy (no other verbs).

The truth is an analytic two-slice 'crystal' (columns on a 3.905 Å lattice, the second slice's
columns at the cell centre, a defect in each) sampled in the truth's frame as ``ptycore simulate``
writes it: pixel [0, 0] at ``origin_A`` of the scan frame, ``positions_A`` the scan positions in
the truth's own frame. A 'result' samples the same function in a result frame (scan positions +
padding + jitter), shifted by a known residual, plus a phase offset and noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from ptycore.cli import main
from ptycore.evaluate import (
    FIGURES,
    METRICS_SCHEMA,
    compare_with_truth,
    evaluate,
    halves_frc,
    load_reconstruction,
)
from ptycore.metrics import compare_phase, fourier_ring_correlation
from ptycore.store import create_store, write_array

LATTICE_A = 3.905
SCAN, STEP_A = (12, 12), 0.5
ORIGIN_A = (-3.0, -3.0)
SHIFT_A = (0.37, -0.21)  # residual shift of the result beyond the nominal frame map
OFFSET_RAD = 1.3


def crystal(y_A, x_A, s: int) -> np.ndarray:
    """Projected phase of slice ``s`` at the points (y_A[:, None], x_A[None, :]) of the scan frame."""
    yy, xx = np.meshgrid(y_A, x_A, indexing="ij")
    c = s * LATTICE_A / 2
    cols = (0.5 * (np.cos(2 * np.pi * (yy - c) / LATTICE_A) * np.cos(2 * np.pi * (xx - c) / LATTICE_A) + 1)) ** 3
    defect = np.exp(-((yy - 2.1) ** 2 + (xx - 3.3) ** 2) / 0.6)
    return 0.5 * cols + (0.4 if s == 0 else -0.2) * defect


def scan_positions() -> np.ndarray:
    iy, ix = np.meshgrid(np.arange(SCAN[0]), np.arange(SCAN[1]), indexing="ij")
    return np.stack([iy * STEP_A, ix * STEP_A], -1).reshape(-1, 2).astype(np.float64)


def write_truth(path, pixel_A=0.2, n_slices=2, shape=(90, 90), attrs=None):
    y = ORIGIN_A[0] + np.arange(shape[0]) * pixel_A
    x = ORIGIN_A[1] + np.arange(shape[1]) * pixel_A
    phase = np.stack([crystal(y, x, s) for s in range(n_slices)])[None].astype(np.float32)
    g = create_store(path)
    write_array(g, "object_phase", phase)
    write_array(g, "object_phase_sum", phase[0].sum(0))
    write_array(g, "positions_A", (scan_positions() - np.asarray(ORIGIN_A)).astype(np.float32))
    g.attrs.update({"pixel_size_A": pixel_A, "slice_thickness_A": 3.905, "origin_A": list(ORIGIN_A)}
                   if attrs is None else attrs)
    return path


def write_result(path, pixel_A=0.25, n_slices=2, shift_A=SHIFT_A, offset=OFFSET_RAD, noise=0.003, seed=0,
                 wrong=False, history=True, split_slices=1):
    """A result store; ``split_slices`` > 1 cuts each truth slice into that many equal parts."""
    rng = np.random.default_rng(seed)
    pad = 3.5
    scan = scan_positions()
    positions = scan + pad + rng.normal(0, 0.02, scan.shape)  # result frame
    d = positions.mean(0) - scan.mean(0)  # result frame = scan frame + d (least squares)
    shape = tuple(int(np.ceil((scan[:, a].max() + 2 * pad) / pixel_A)) for a in (0, 1))
    y = np.arange(shape[0]) * pixel_A - d[0] - shift_A[0]
    x = np.arange(shape[1]) * pixel_A - d[1] - shift_A[1]
    if wrong:  # another lattice: stretched and shifted
        slices = [crystal(1.3 * y + 0.9, 0.8 * x - 0.4, s) for s in range(n_slices)]
    else:
        slices = [crystal(y, x, s) for s in range(n_slices)]
    slices = [part for s in slices for part in [s / split_slices] * split_slices]
    phase = np.stack(slices) + offset / len(slices) + noise * rng.normal(size=(len(slices),) + shape)
    g = create_store(path)
    write_array(g, "object_phase", phase[None].astype(np.float32))
    write_array(g, "object_amplitude", np.exp(-0.05 * phase)[None].astype(np.float32))
    yy, xx = np.mgrid[-16:16, -16:16]
    probe = np.stack([np.exp(-(yy**2 + xx**2) / 40 + 1j * (yy**2 + xx**2) / 30),
                      0.3 * xx / 16 * np.exp(-(yy**2 + xx**2) / 40)]).astype(np.complex64)
    write_array(g, "probe", probe)
    write_array(g, "positions_A", positions.astype(np.float32))
    write_array(g, "tilts_mrad", np.zeros(2, np.float32))
    write_array(g, "slice_thickness_A", np.float32(3.905 * 2 / len(slices)))
    if history:
        it = np.arange(30)
        write_array(g, "history/stage", np.r_[np.zeros(20), np.ones(10)].astype(np.int32))
        write_array(g, "history/single", (0.3 * np.exp(-it / 10) + 0.05).astype(np.float32))
        write_array(g, "history/pacbed", np.r_[np.full(20, np.nan), 0.02 * np.exp(-it[20:] / 5)].astype(np.float32))
        write_array(g, "history/validation", (0.3 * np.exp(-it / 12) + 0.07).astype(np.float32))
        write_array(g, "history/s_per_iter", np.r_[2.0, np.full(19, 0.1), 1.5, np.full(9, 0.2)].astype(np.float32))
        write_array(g, "history/probe_mode_powers", np.tile([0.92, 0.08], (30, 1)).astype(np.float32))
    g.attrs.update({
        "pixel_size_A": pixel_A,
        "stages": ["single-slice", "refine"],
        "provenance": {
            "verb": "reconstruct", "plan": {"name": "default", "seed": 0, "stages": []}, "plan_hash": "sha256:abc",
            "stages_run": ["single-slice", "refine"], "hostname": "node-7", "device_kind": "cpu",
            "inputs": {"results/sto-2cells/prepared.zarr": "sha256:1", "results/sto-2cells/init.zarr": "sha256:2"},
            "versions": {"jax": "0.4.38", "numpy": "2.0"}, "ptycore_version": "0.1.0", "wall_seconds": 12.5,
            "stage_timings": {"single-slice": {"seconds": 4.0, "iterations": 20, "first_iteration_seconds": 2.0,
                                               "compilations": 1, "resumed_from": None},
                              "refine": {"seconds": 3.3, "iterations": 10, "first_iteration_seconds": 1.5,
                                         "compilations": 1, "resumed_from": None}},
            "upstream": {"verb": "init", "upstream": {"verb": "preprocess"}},
        },
    })
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {
        "truth": write_truth(root / "truth.zarr"),
        "result": write_result(root / "result.zarr"),
        "init": write_result(root / "init.zarr", seed=1, noise=0.0, history=False),
        "half": write_result(root / "half.zarr", seed=0, noise=0.05),
        "wrong": write_result(root / "wrong.zarr", wrong=True),
        "root": root,
    }


# ---------------------------------------------------------------- alignment and truth metrics
@pytest.mark.parametrize("pixel_A", [0.25, 0.2, 0.16])  # coarser than, equal to, finer than the truth
def test_shifted_offset_copy_of_the_truth_scores_ssim_near_one(tmp_path, stores, pixel_A):
    result = write_result(tmp_path / "r.zarr", pixel_A=pixel_A)
    m = evaluate(result, tmp_path / "eval", truth=stores["truth"], figures=False)
    assert m["ssim_phase_sum"] > 0.99 and m["psnr_phase_sum"] > 30
    assert len(m["ssim_per_slice"]) == 2 and min(m["ssim_per_slice"]) > 0.99
    assert m["slices_compared"] == "matched"
    np.testing.assert_allclose(m["registration_shift_A"], SHIFT_A, atol=0.02)
    assert m["phase_offset_rad"] == pytest.approx(OFFSET_RAD, abs=0.01)
    assert m["compared_pixel_size_A"] == pytest.approx(max(pixel_A, 0.2))
    assert min(m["compared_shape"]) >= 16


def test_registration_does_not_step_off_the_truth_field(stores, monkeypatch):
    """A poor reconstruction of a crystal correlates with the truth at many lattice shifts: a
    registration step that would leave the truth's field is not taken (metrics at the last shift
    inside it, with a warning), where it used to make ``evaluate`` fail on a covered scan."""
    import ptycore.evaluate as ev

    steps = iter([np.array([2.0, -1.0]), np.array([400.0, 0.0])])  # pixels: the second walks off
    monkeypatch.setattr(ev, "register", lambda reference, moving: next(steps))
    c = compare_with_truth(load_reconstruction(stores["wrong"]), load_reconstruction(stores["truth"]), 0.5)
    np.testing.assert_allclose(c.metrics["registration_shift_A"], np.array([2.0, -1.0]) * 0.25)
    assert any("registration stopped at the truth's edge" in w for w in c.warnings), c.warnings
    assert np.isfinite(c.metrics["ssim_phase_sum"])


def test_registration_finds_no_shift_where_there_is_none_and_matters(tmp_path, stores):
    result = write_result(tmp_path / "r.zarr", shift_A=(0.0, 0.0))
    m = evaluate(result, tmp_path / "a", truth=stores["truth"], figures=False)
    assert m["ssim_phase_sum"] > 0.99 and np.abs(m["registration_shift_A"]).max() < 0.02
    # the 0.99 bar is a real test of the alignment: one pixel of misregistration costs far more
    comparison = compare_with_truth(load_reconstruction(result), load_reconstruction(stores["truth"]), 0.5)
    misregistered = compare_phase(comparison.result[1:, 1:], comparison.truth[:-1, :-1])
    assert misregistered["ssim"] < 0.9


def test_wrong_object_scores_low(tmp_path, stores):
    m = evaluate(stores["wrong"], tmp_path / "eval", truth=stores["truth"], figures=False)
    assert m["ssim_phase_sum"] < 0.6 and m["correlation_phase_sum"] < 0.6
    assert max(m["ssim_per_slice"]) < 0.6


def test_different_slice_count_is_compared_conserving_total_phase(tmp_path, stores):
    four = write_result(tmp_path / "four.zarr", split_slices=2)  # 4 slices, each half a truth slice
    m = evaluate(four, tmp_path / "e4", truth=stores["truth"], figures=False)
    assert m["n_slices"] == 4 and m["n_slices_truth"] == 2 and m["slices_compared"] == "resampled"
    assert m["ssim_phase_sum"] > 0.99 and min(m["ssim_per_slice"]) > 0.99
    assert any("remapped" in w for w in m["warnings"])
    one = write_result(tmp_path / "one.zarr", n_slices=1)  # a single-slice result of a 2-slice truth ...
    truth1 = write_truth(tmp_path / "t1.zarr", n_slices=1)
    m1 = evaluate(one, tmp_path / "e1", truth=truth1, figures=False)
    assert m1["ssim_phase_sum"] > 0.99 and m1["slices_compared"] == "matched"


def test_a_scan_smaller_than_the_comparison_window_is_evaluated_about_its_centre(tmp_path, stores):
    """A 3 x 3 scan (1 Å across) leaves nothing inside the margin: evaluated over 8 pixels, and said so."""
    result = zarr.open_group(str(write_result(tmp_path / "r.zarr")), mode="r+")
    positions = result["positions_A"][...].reshape(*SCAN, 2)[:3, :3].reshape(-1, 2)  # position 0 is still (0, 0)
    del result["positions_A"]
    write_array(result, "positions_A", positions)
    m = evaluate(tmp_path / "r.zarr", tmp_path / "eval", truth=stores["truth"], figures=False)
    assert m["compared_shape"] == [8, 8]
    assert m["ssim_phase_sum"] > 0.95  # the mapping falls back to origin_A (different position count)
    assert any("without one" in w for w in m["warnings"]) and any("about its centre" in w for w in m["warnings"])
    assert any("origin_A" in w for w in m["warnings"])


def _half2_result(path, positions_shift_A=(0.0, 0.0)):
    """A result of the odd scan columns only (as from ``ptycore preprocess --half 2``): its position 0
    is scan index (0, 1), one step right of scan (0, 0). Returns (path, origin_A of its pixel [0, 0])."""
    write_result(path)
    g = zarr.open_group(str(path), mode="r+")
    positions = g["positions_A"][...].astype(np.float64)
    d = positions.mean(0) - scan_positions().mean(0)  # result frame = scan frame + d (see write_result)
    odd = positions.reshape(*SCAN, 2)[:, 1::2].reshape(-1, 2) + np.asarray(positions_shift_A)
    del g["positions_A"]
    write_array(g, "positions_A", odd.astype(np.float32))
    return path, -d


def test_a_half_scan_result_is_mapped_to_the_truth_by_the_origins_not_by_its_first_position(tmp_path, stores):
    """Half 2's position 0 is one scan step from scan (0, 0): the origin_A fallback uses the frames' origins,
    from the result's own attr or from its --init store (moved with the positions), so no step is left over."""
    truth = load_reconstruction(stores["truth"])
    path, origin = _half2_result(tmp_path / "half2.zarr")
    rec = load_reconstruction(path)
    by_position0 = compare_with_truth(rec, truth, 0.5)  # no origin known: the first position (a step off)
    assert any("first position" in w for w in by_position0.warnings)
    np.testing.assert_allclose(by_position0.metrics["registration_shift_A"], np.add(SHIFT_A, (0.0, -STEP_A)),
                               atol=0.05)

    zarr.open_group(str(path), mode="r+").attrs["origin_A"] = origin.tolist()
    m = evaluate(path, tmp_path / "e1", truth=stores["truth"], figures=False)
    assert any("origin_A of both" in w for w in m["warnings"])
    np.testing.assert_allclose(m["registration_shift_A"], SHIFT_A, atol=0.02)
    assert m["ssim_phase_sum"] > 0.99

    # a result store without origin_A: its init's, moved by the positions' mean shift from the init (an
    # init whose frame starts 0.3 Å further on, the result padded by 0.3 Å since: the same frame as above)
    init_path, _ = _half2_result(tmp_path / "init.zarr", positions_shift_A=(-0.3, -0.3))
    zarr.open_group(str(init_path), mode="r+").attrs["origin_A"] = (origin + 0.3).tolist()
    m = evaluate(_half2_result(tmp_path / "padded.zarr")[0], tmp_path / "e2", truth=stores["truth"], init=init_path,
                 figures=False)
    assert any("origin_A of both" in w for w in m["warnings"])
    np.testing.assert_allclose(m["registration_shift_A"], SHIFT_A, atol=0.02)


# ---------------------------------------------------------------- FRC of two halves
HALF_PIXEL_A, HALF_PAD_A, HALF_SCAN, HALF_NOISE = 0.2, 3.0, (24, 25), 0.3
#: the halves' common scanned area, 0.5 Å margin: y 3.5..14.0 Å (rows 18..70), x 4.0..14.0 Å (half 2's
#: columns start one step in and half 1's end one step further out; pixels 20..70)
HALF_BOX = (18, 20, 53, 51)


def half_scene(shape) -> np.ndarray:
    """One band-limited random phase (rad) on a phase ramp: the object both halves reconstruct."""
    from scipy.ndimage import gaussian_filter

    y, x = (np.arange(n) * HALF_PIXEL_A for n in shape)
    texture = 2.0 * gaussian_filter(np.random.default_rng(5).normal(size=shape), 1.0)
    return texture + 0.5 * y[:, None] + 1.0 * x[None, :]


def write_half(path, phase, positions, attrs=None):
    g = create_store(path)
    write_array(g, "object_phase", phase[None, None].astype(np.float32))
    write_array(g, "positions_A", positions.astype(np.float32))
    g.attrs.update({"pixel_size_A": HALF_PIXEL_A, **(attrs or {})})
    return path


@pytest.fixture(scope="module")
def half_images():
    """(scan positions (ny, nx, 2) in the object frame, the two halves' phases): one scene, independent noise."""
    ny, nx = HALF_SCAN
    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    scan = np.stack([iy * STEP_A, ix * STEP_A], -1) + HALF_PAD_A
    shape = tuple(int(np.ceil((scan[..., a].max() + HALF_PAD_A) / HALF_PIXEL_A)) for a in (0, 1))
    scene = half_scene(shape)
    rng = np.random.default_rng(11)
    return scan, [scene + HALF_NOISE * rng.normal(size=shape) for _ in range(2)]


def reference_frc(images, box=HALF_BOX):
    """The FRC of the two halves cropped identically (no registration)."""
    y0, x0, h, w = box
    return fourier_ring_correlation(*(np.float32(im)[y0 : y0 + h, x0 : x0 + w] for im in images), HALF_PIXEL_A)


def assert_same_curve(frc, reference):
    """Ring for ring where the signal dominates (reference above the 1/7 threshold; ring 0, the mean, is
    removed): only the registration's sub-pixel error on the noise (< 0.15 px) is left between the two."""
    signal = np.nonzero(reference.frc[1:] > reference.threshold)[0] + 1
    assert len(signal) >= 10
    diff = np.abs(frc.frc[signal] - reference.frc[signal])
    assert diff.max() < 0.06 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_halves_in_one_frame_are_cropped_at_one_box_and_give_the_frc_of_identical_crops(tmp_path, half_images):
    """Even / odd scan columns in one object frame: their scanned areas start one scan step (2.5 px) apart.
    Both are cropped at the common area, so the FRC is that of identical crops; cropping each at its own
    corner and registering the step away (a whole-step periodic shift) bends the curve."""
    scan, images = half_images
    paths = [write_half(tmp_path / f"half{k}.zarr", images[k - 1], scan[:, k - 1 :: 2].reshape(-1, 2))
             for k in (1, 2)]
    result = halves_frc(*(load_reconstruction(p) for p in paths), 0.5)
    reference = reference_frc(images)
    assert result.frames == "shared" and result.offset_px == (0, 0) and result.box == HALF_BOX
    assert result.warnings == []
    assert np.abs(result.shift_px).max() < 0.15  # only the noise's registration error is left
    # the curve of identical crops; cropped at their own corners, the halves were registered by 1.56 px
    # instead of the 2 px between the crops (the Hann-windowed correlation of a phase ramp): 0.14 lower
    # in the signal rings, 0.07 on average
    assert_same_curve(result.frc, reference)
    assert result.frc.resolution_A == pytest.approx(reference.resolution_A, rel=0.03)
    assert 2 * HALF_PIXEL_A < reference.resolution_A < 1.0  # the threshold is crossed inside the band
    m = evaluate(paths[0], tmp_path / "eval", half1=paths[0], half2=paths[1], figures=False)
    assert m["frc_resolution_A"] == pytest.approx(result.frc.resolution_A)
    assert not any("halves" in w for w in m["warnings"])


@pytest.mark.parametrize("case", ["origin_A", "no origin_A"])
def test_halves_made_in_different_frames_are_still_compared_over_their_common_area(tmp_path, half_images, case):
    """Half 2 in its own object frame (3 pixels to the right, 3 columns narrower), as separately initialised
    stores are: related by origin_A where both stores have it, else by registration alone; either way
    half 2's crop is moved by whole pixels and the FRC is that of identical crops."""
    scan, images = half_images
    cut = 3
    attrs = [{"origin_A": [-HALF_PAD_A, -HALF_PAD_A]},
             {"origin_A": [-HALF_PAD_A, -HALF_PAD_A + cut * HALF_PIXEL_A]}] if case == "origin_A" else [{}, {}]
    half1 = write_half(tmp_path / "half1.zarr", images[0], scan[:, 0::2].reshape(-1, 2), attrs[0])
    half2 = write_half(tmp_path / "half2.zarr", images[1][:, cut:],
                       scan[:, 1::2].reshape(-1, 2) - (0.0, cut * HALF_PIXEL_A), attrs[1])
    result = halves_frc(load_reconstruction(half1), load_reconstruction(half2), 0.5)
    assert result.offset_px == (0, -cut) and result.box == HALF_BOX
    assert result.frames == ("origin_A" if case == "origin_A" else "registered")
    assert any("registration only" in w for w in result.warnings) == (case == "no origin_A")
    assert np.abs(result.shift_px).max() < 0.15
    assert_same_curve(result.frc, reference_frc(images))


def test_halves_that_barely_overlap_are_compared_over_the_smallest_window(tmp_path, half_images):
    """Two tiny scans (3 x 3 positions, 1 Å) one step apart: the FRC still runs, over 8 x 8 pixels."""
    scan, images = half_images
    paths = [write_half(tmp_path / f"half{k}.zarr", images[k - 1], scan[:3, k - 1 : k + 2].reshape(-1, 2))
             for k in (1, 2)]
    result = halves_frc(*(load_reconstruction(p) for p in paths), 0.5)
    assert result.box[2:] == (8, 8) and result.offset_px == (0, 0)
    assert np.all(np.isfinite(result.frc.frc))


# ---------------------------------------------------------------- metrics without truth
def test_metrics_without_truth(tmp_path, stores):
    m = evaluate(stores["result"], tmp_path / "eval", figures=False)
    assert m["status"] == "ok" and m["truth"] is None and m["ssim_phase_sum"] is None
    assert m["dataset"] == "sto-2cells" and m["plan"] == "default"  # from the provenance
    assert m["stages"] == ["single-slice", "refine"]
    assert m["iterations"] == 30
    assert m["s_per_iter_median"] == pytest.approx(0.1)  # the first iteration of each stage left out
    assert m["s_per_iter_median_by_stage"] == pytest.approx({"single-slice": 0.1, "refine": 0.2})
    assert m["data_fit_term"] == "single"
    assert m["final_loss"] == pytest.approx(0.3 * np.exp(-29 / 10) + 0.05, rel=1e-5)
    assert m["final_terms"]["pacbed"] == pytest.approx(0.02 * np.exp(-29 / 5), rel=1e-5)
    assert m["validation_loss"] == pytest.approx(0.3 * np.exp(-29 / 12) + 0.07, rel=1e-5)
    assert m["probe_mode_powers"][0] > 0.9 and sum(m["probe_mode_powers"]) == pytest.approx(1.0)
    # the lattice has reflections out to 3 / 3.905 Å⁻¹ (columns cubed): the limit is finite, above Nyquist
    assert 2 * 0.25 <= m["information_limit_A"] < 2.0
    assert m["frc_resolution_A"] is None and m["position_correction_rms_A"] is None
    assert set(METRICS_SCHEMA) <= set(m)
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["final_loss"] == pytest.approx(m["final_loss"])


def test_cli_writes_metrics_figures_and_a_self_contained_report(tmp_path, stores, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--result", str(stores["result"]), "--truth", str(stores["truth"]), "--init",
               str(stores["init"]), "--half1", str(stores["result"]), "--half2", str(stores["half"]),
               "--dataset", "sto", "--plan", "p1", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert not out.with_name("eval.partial").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "sto" and m["plan"] == "p1"
    assert m["ssim_phase_sum"] > 0.99
    assert 0.4 < m["frc_resolution_A"] < 3.0  # the halves differ by noise only
    assert 0.01 < m["position_correction_rms_A"] < 0.1  # two jitters of 0.02 Å per axis
    assert set(m["figures"]) == set(FIGURES)  # every figure applies here
    html = (out / "report.html").read_text()
    for name in m["figures"]:
        assert (out / name).stat().st_size > 5000
        assert f'alt="{name}" src="data:image/png;base64,' in html
    assert "node-7" in html and "single-slice" in html and "jax 0.4.38" in html  # provenance summary
    assert "init ← preprocess" in html
    assert 'src="http' not in html and "<script" not in html and "<link" not in html  # self-contained


def test_evaluation_refuses_to_overwrite(tmp_path, stores, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--result", str(stores["result"]), "--out", str(out), "--no-figures", "--quiet"]) == 0
    assert main(["evaluate", "--result", str(stores["result"]), "--out", str(out), "--no-figures", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate", "--result", str(stores["result"]), "--out", str(out), "--no-figures", "--quiet",
                 "--overwrite"]) == 0


def _bad_truth(path, case):
    if case == "no pixel size":
        return write_truth(path, attrs={"origin_A": list(ORIGIN_A)})
    if case == "pixel size 10x":
        return write_truth(path, pixel_A=2.5)
    if case == "too small":  # covers less than the scanned area
        return write_truth(path, shape=(20, 20))
    raise AssertionError(case)


@pytest.mark.parametrize("case, culprit, message", [
    ("missing result", "result", "store not found"),
    ("no object_phase", "result", "no object_phase"),
    ("missing truth", "truth", "store not found"),
    ("no pixel size", "truth", "pixel_size_A is missing"),
    ("pixel size 10x", "truth", "cannot be resampled"),
    ("too small", "truth", "does not cover the scanned area"),
])
def test_bad_input_is_one_line_naming_the_file_and_leaves_no_output(tmp_path, stores, capsys, case, culprit,
                                                                   message):
    result, truth = stores["result"], stores["truth"]
    if case == "missing result":
        result = tmp_path / "nothere.zarr"
    elif case == "no object_phase":  # a prepared store, say
        result = tmp_path / "prepared.zarr"
        g = create_store(result)
        write_array(g, "patterns", np.zeros((4, 8, 8), np.float32))
        g.attrs["pixel_size_A"] = 0.25
    elif case == "missing truth":
        truth = tmp_path / "no-truth.zarr"
    else:
        truth = _bad_truth(tmp_path / "bad-truth.zarr", case)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--result", str(result), "--truth", str(truth), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("ptycore evaluate: error: ")
    assert str(result if culprit == "result" else truth) in err and message in err
    assert not out.exists() and not out.with_name("eval.partial").exists()


# ---------------------------------------------------------------- inspect
def test_inspect_any_store(stores, capsys, tmp_path):
    assert main(["inspect", str(stores["result"])]) == 0
    text = capsys.readouterr().out
    assert "object_phase" in text and "(1, 2, 50, 50)" in text and "float32" in text and "complex64" in text
    assert "pixel_size_A: 0.25" in text
    assert "plan: default (sha256:abc)" in text and "node-7" in text and "upstream: init <- preprocess" in text
    assert "history (30 iterations)" in text
    assert any(line.split()[:2] == ["validation", f"{0.3 * np.exp(-29 / 12) + 0.07:.6g}"]
               for line in text.splitlines())
    assert "[0.92, 0.08]" in text  # probe mode powers, last row
    assert main(["inspect", str(stores["truth"])]) == 0
    text = capsys.readouterr().out
    assert "object_phase_sum" in text and "origin_A: [-3.0, -3.0]" in text and "history" not in text
    g = zarr.open_group(str(tmp_path / "nested.zarr"), mode="w", zarr_format=3)
    g.create_group("a").create_group("b").create_array("x", shape=(3,), dtype="i4")
    assert main(["inspect", str(tmp_path / "nested.zarr")]) == 0
    assert "a/b/x" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "nothere.zarr")]) == 2
    assert "nothere.zarr: store not found" in capsys.readouterr().err
    assert main(["inspect", str(stores["root"])]) == 2
    assert "not a zarr store (it holds" in capsys.readouterr().err
