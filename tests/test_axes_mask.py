"""Pattern axis orders (pattern_axes, inferred, MATLAB v7.3 from fold_slice) and the detector mask
from metadata to prepared.zarr."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr
from _ptydata import assert_refused, write_meta

from ptycore.cli import main

SCAN, DET, HOT = (2, 3), (8, 10), (1, 5)  # a one-hot pixel (ky, kx) shows where the detector axes went


def one_hot():
    """(scan_y, scan_x, ky, kx) patterns: frame p has value p + 1 at HOT, 0 elsewhere."""
    patterns = np.zeros(SCAN + DET, np.float32)
    patterns[..., HOT[0], HOT[1]] = np.arange(1, 7, dtype=np.float32).reshape(SCAN)
    return patterns


def meta(tmp_path, **extra):
    return write_meta(tmp_path / "meta.yaml", {"energy_kv": 300, "convergence_mrad": 2, "scan_shape": list(SCAN),
                                               "scan_step_A": [1, 1], "detector_pixel_mrad": 1.0, **extra})


def ingest(tmp_path, patterns, meta_path, name="data.zarr"):
    out = tmp_path / name
    assert main(["ingest", "--patterns", str(patterns), "--meta", str(meta_path), "--out", str(out), "--quiet"]) == 0
    return zarr.open_group(str(out), mode="r")


def assert_canonical(group):
    """Every frame p has p + 1 at HOT and nothing elsewhere: axes and position order right."""
    frames = group["patterns"][...]
    assert frames.shape == (6,) + DET
    np.testing.assert_array_equal(frames[:, HOT[0], HOT[1]], np.arange(1, 7))
    assert frames.sum() == np.arange(1, 7).sum()


@pytest.mark.parametrize("layout, transpose, axes", [
    ("ky kx n_pos", (2, 3, 0, 1), None),  # fold_slice / MATLAB order, inferred from the shape
    ("ky kx scan_y scan_x", (2, 3, 0, 1), None),
    ("scan_x scan_y ky kx", (1, 0, 2, 3), ["scan_x", "scan_y", "ky", "kx"]),
    ("scan_y scan_x kx ky", (0, 1, 3, 2), ["scan_y", "scan_x", "kx", "ky"]),  # a transposed detector
    ("n_pos kx ky", (0, 1, 3, 2), ["n_pos", "kx", "ky"]),
])
def test_pattern_axes(tmp_path, layout, transpose, axes):
    data = one_hot().transpose(transpose)
    if "n_pos" in layout:
        names = layout.split()
        data = data.reshape(-1, *data.shape[2:]) if names[0] == "n_pos" else data.reshape(*data.shape[:2], -1)
    np.save(tmp_path / "p.npy", np.ascontiguousarray(data))
    group = ingest(tmp_path, tmp_path / "p.npy", meta(tmp_path, **({"pattern_axes": axes} if axes else {})))
    assert_canonical(group)
    assert group.attrs["provenance"]["patterns"]["pattern_axes"] == layout.split()


def test_ambiguous_shape_asks_for_pattern_axes(tmp_path, capsys):
    square = np.zeros((4, 4, 4, 4), np.float32)
    square[..., 2, 2] = 1
    np.save(tmp_path / "p.npy", square)
    m = meta(tmp_path, scan_shape=[4, 4], convergence_mrad=1)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(m), "--out", str(out)],
                   out, [tmp_path / "p.npy"], ["could be ['scan_y', 'scan_x', 'ky', 'kx'] or", "set pattern_axes"])
    m = meta(tmp_path, scan_shape=[4, 4], convergence_mrad=1, pattern_axes=["scan_y", "scan_x", "ky", "kx"])
    assert ingest(tmp_path, tmp_path / "p.npy", m)["patterns"].shape == (16, 4, 4)


@pytest.mark.parametrize("axes, expect", [
    (["ky", "kx", "scan"], "unknown axis 'scan'"),
    (["ky", "kx", "n_pos", "scan_y"], "must be an order of"),
    (["scan_y", "scan_x", "ky", "kx"], "names 4 axes but the array has 3"),
])
def test_bad_pattern_axes(tmp_path, capsys, axes, expect):
    np.save(tmp_path / "p.npy", one_hot().reshape(6, *DET))
    m = meta(tmp_path, pattern_axes=axes)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(m), "--out", str(out)],
                   out, [m], ["pattern_axes", expect])


def write_matlab_v73(path, name, array_in_matlab_order):
    """What MATLAB's save -v7.3 writes: HDF5 behind a 512-byte header, the array column-major, i.e.
    the HDF5 dataset has MATLAB's axes reversed. Written byte for byte as MATLAB lays it out."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(name, data=np.ascontiguousarray(array_in_matlab_order.transpose()))
        f[name].attrs["MATLAB_class"] = np.bytes_("single")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))
        fh.write(b"\x00" * 8 + b"\x00\x02" + b"IM")  # version 0x0200, endian indicator
    return path


@pytest.mark.parametrize("layout", ["ky kx n_pos", "ky kx scan_y scan_x"])
def test_fold_slice_matlab_v73(tmp_path, layout):
    """fold_slice keeps dp(ky, kx, n_pos) (or a 4-D ky, kx, scan); the HDF5 dataset holds it transposed."""
    dp = one_hot().transpose(2, 3, 0, 1)  # (ky, kx, scan_y, scan_x) as MATLAB indexes it
    if layout == "ky kx n_pos":
        dp = dp.reshape(*DET, 6)
    mat = write_matlab_v73(tmp_path / "data_roi0_dp.mat", "dp", dp)
    with h5py.File(mat) as f:
        assert f["dp"].shape == dp.shape[::-1]  # what a reader that ignores MATLAB's order would see
    group = ingest(tmp_path, mat, meta(tmp_path))
    assert_canonical(group)
    assert group.attrs["provenance"]["patterns"]["format"] == "matlab-v7.3"


def test_ptyrad_style_hdf5_with_explicit_axes(tmp_path):
    """An HDF5 file of (n_pos, kx, ky) patterns (a transposed detector) read with pattern_axes."""
    with h5py.File(tmp_path / "meas.h5", "w") as f:
        f["dp"] = one_hot().reshape(6, *DET).transpose(0, 2, 1)
    group = ingest(tmp_path, f"{tmp_path / 'meas.h5'}:dp", meta(tmp_path, pattern_axes=["n_pos", "kx", "ky"]))
    assert_canonical(group)


# ---------------------------------------------------------------- detector mask
def patterns_with_a_disk(n=16, scan=(2, 3)):
    yy, xx = np.mgrid[:n, :n]
    disk = ((yy - n // 2) ** 2 + (xx - n // 2) ** 2 <= 9).astype(np.float32) * 50 + 1
    return np.broadcast_to(disk, scan + (n, n)).copy()


def mask_meta(tmp_path, **extra):
    return write_meta(tmp_path / "meta.yaml", {"energy_kv": 300, "convergence_mrad": 2, "scan_shape": [2, 3],
                                               "scan_step_A": [1, 1], "detector_pixel_mrad": 0.5, **extra})


def preprocess(tmp_path, data, config, name="prepared.zarr"):
    cfg = write_meta(tmp_path / f"{name}.yaml", config)
    out = tmp_path / name
    assert main(["preprocess", "--data", str(data), "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    return zarr.open_group(str(out), mode="r")


def test_mask_from_file_and_bad_pixels_through_preprocess(tmp_path):
    patterns = patterns_with_a_disk()
    patterns[..., 2, 3] = np.nan  # a dead pixel reads NaN: accepted because it is masked
    patterns[..., 10, 11] = 1e6  # a hot pixel
    np.save(tmp_path / "p.npy", patterns)
    file_mask = np.ones((16, 16), bool)
    file_mask[10, 11] = False
    np.save(tmp_path / "mask.npy", file_mask)
    m = mask_meta(tmp_path, detector_mask="mask.npy", bad_pixels=[[2, 3]], detector_flip={"transpose": True})
    out = tmp_path / "data.zarr"
    assert main(["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(m), "--out", str(out),
                 "--quiet"]) == 0
    group = zarr.open_group(str(out), mode="r")
    good = group["detector_mask"][...]
    assert set(zip(*np.nonzero(~good), strict=True)) == {(3, 2), (11, 10)}  # oriented like the patterns
    assert group["patterns"][0, 3, 2] == 0 and np.isfinite(group["patterns"][...]).all()
    assert str(tmp_path / "mask.npy") in group.attrs["provenance"]["inputs"]

    # crop 12 around the disk at 8 placed for bin 2 (window 1..12), bin 2: a binned pixel is good only if
    # all 4 of its pixels are: (3, 2) → (2, 1) → (1, 0); (11, 10) → (10, 9) → (5, 4)
    prepared = preprocess(tmp_path, out, {"detector_crop": 12, "detector_bin": 2})
    assert prepared.attrs["preprocess"][1]["window"] == [1, 13, 1, 13]
    pmask = prepared["detector_mask"][...]
    assert pmask.shape == (6, 6)
    assert set(zip(*np.nonzero(~pmask), strict=True)) == {(1, 0), (5, 4)}
    frames = prepared["patterns"][...]
    assert (frames[:, ~pmask] == 0).all() and frames.max() < 1e5  # the hot pixel is gone from the counts
    assert prepared.attrs["detector_mask_bad_pixels"] == 2

    # padding: the new pixels were not measured
    padded = preprocess(tmp_path, out, {"detector_pad": 20}, name="padded.zarr")
    pmask = padded["detector_mask"][...]
    assert pmask.shape == (20, 20) and not pmask[:2].any() and not pmask[:, :2].any()
    assert pmask[2:18, 2:18].sum() == 16 * 16 - 2


def test_resample_fills_bad_pixels_and_maps_the_mask(tmp_path):
    patterns = patterns_with_a_disk()
    patterns[..., 4, 4] = 1e6
    np.save(tmp_path / "p.npy", patterns)
    m = mask_meta(tmp_path, bad_pixels=[[4, 4]])
    out = tmp_path / "data.zarr"
    assert main(["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(m), "--out", str(out),
                 "--quiet"]) == 0
    prepared = preprocess(tmp_path, out, {"detector_resample": 8})
    pmask = prepared["detector_mask"][...]
    assert (~pmask).sum() >= 1 and not pmask[2, 2]  # input pixel 4 of 16 lies in output pixel 2 of 8
    frames = prepared["patterns"][...]
    # the hot pixel did not ring through the Fourier interpolation: good pixels stay near the clean result
    clean = patterns_with_a_disk()
    np.save(tmp_path / "clean.npy", clean)
    assert main(["ingest", "--patterns", str(tmp_path / "clean.npy"), "--meta", str(mask_meta(tmp_path)),
                 "--out", str(tmp_path / "clean.zarr"), "--quiet"]) == 0
    reference = preprocess(tmp_path, tmp_path / "clean.zarr", {"detector_resample": 8}, name="ref.zarr")
    np.testing.assert_allclose(frames[:, pmask], reference["patterns"][...][:, pmask], atol=5.0)


def test_no_mask_gives_an_all_true_mask(tmp_path):
    np.save(tmp_path / "p.npy", patterns_with_a_disk())
    out = tmp_path / "data.zarr"
    assert main(["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(mask_meta(tmp_path)), "--out",
                 str(out), "--quiet"]) == 0
    assert zarr.open_group(str(out), mode="r")["detector_mask"][...].all()
    assert preprocess(tmp_path, out, {"detector_crop": 12})["detector_mask"][...].all()


@pytest.mark.parametrize("extra, expect", [
    ({"detector_mask": "missing.npy"}, ["detector_mask: file", "missing.npy", "not found"]),
    ({"detector_mask": "wrong.npy"}, ["detector_mask:", "shape (4, 4)", "(16, 16)"]),
    ({"bad_pixels": [[3, 40]]}, ["bad_pixels: [3, 40] lies outside the 16 x 16 detector"]),
])
def test_bad_mask_input(tmp_path, capsys, extra, expect):
    np.save(tmp_path / "p.npy", patterns_with_a_disk())
    np.save(tmp_path / "wrong.npy", np.ones((4, 4), bool))
    m = mask_meta(tmp_path, **extra)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(tmp_path / "p.npy"), "--meta", str(m), "--out", str(out)],
                   out, [m], [str(m), *expect])
