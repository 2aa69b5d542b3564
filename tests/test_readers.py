"""Readers: every format written here by the test itself, read back frame by frame."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest
import scipy.io
import zarr

from ptycore.data.readers import EMPAD_FRAME, open_patterns, parse_spec
from ptycore.errors import InvalidData


def stack(shape=(3, 4, 8, 6), dtype=np.float32, seed=0):
    """Patterns whose every value differs (so a misplaced frame or axis is visible)."""
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(dtype)


def flat(a):
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def read_all(spec, **kw):
    with open_patterns(spec, **kw) as src:
        return src.frames[:], src


# HDF5 filter ids as registered by hdf5plugin: a user checks the file really used the filter
COMPRESSIONS = {
    "none": ({}, None),
    "gzip": ({"compression": "gzip", "shuffle": True}, h5py.h5z.FILTER_DEFLATE),
    "bitshuffle-lz4": (dict(hdf5plugin.Bitshuffle(cname="lz4")), hdf5plugin.BSHUF_ID),
    "blosc-zstd": (dict(hdf5plugin.Blosc(cname="zstd", clevel=5)), hdf5plugin.BLOSC_ID),
    "zstd": (dict(hdf5plugin.Zstd()), hdf5plugin.ZSTD_ID),
}


def filter_ids(dataset) -> set[int]:
    plist = dataset.id.get_create_plist()
    return {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_hdf5_compressed_4d(tmp_path, name):
    kwargs, filter_id = COMPRESSIONS[name]
    data = stack()
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data", data=data, chunks=(1, 4, 8, 6) if kwargs else None, **kwargs)
        if filter_id:
            assert filter_id in filter_ids(f["entry/data"])
    frames, src = read_all(path)  # the only >= 3-D dataset is found without a path
    assert src.dataset == "/entry/data" and src.format == "hdf5"
    np.testing.assert_array_equal(frames, flat(data))


def test_hdf5_reads_frames_across_scan_rows(tmp_path):
    data = stack((3, 4, 5, 5), np.uint16)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["patterns"] = data
    with open_patterns(f"{path}:patterns") as src:
        assert src.frames.shape == (12, 5, 5) and src.frames.scan_shape == (3, 4)
        for start, stop in [(0, 1), (3, 9), (5, 7), (4, 8), (11, 12), (0, 12)]:
            np.testing.assert_array_equal(src.frames.read(start, stop), flat(data)[start:stop])
        np.testing.assert_array_equal(src.frames[2:7, 1:3], flat(data)[2:7, 1:3])


def test_hdf5_several_candidates_and_wrong_path(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["a"] = stack((2, 4, 4), seed=1)
        f["grp/b"] = stack((2, 2, 4, 4), seed=2)
        f["small"] = np.zeros((4, 4))
    with pytest.raises(InvalidData, match=r"several datasets.*/a \(2, 4, 4\).*/grp/b \(2, 2, 4, 4\)"):
        open_patterns(path)
    with pytest.raises(InvalidData, match=r"no dataset '/nope'.*candidates: /a"):
        open_patterns(f"{path}:/nope")
    with pytest.raises(InvalidData, match="is a group"):
        open_patterns(f"{path}:grp")
    frames, _ = read_all(f"{path}:/grp/b")
    np.testing.assert_array_equal(frames, flat(stack((2, 2, 4, 4), seed=2)))


def test_npy_3d_and_4d_are_memory_mapped(tmp_path):
    for shape in [(5, 6, 6), (2, 3, 6, 6)]:
        data = stack(shape, np.float64)
        path = tmp_path / f"p{len(shape)}.npy"
        np.save(path, data)
        with open_patterns(path) as src:
            assert isinstance(src.frames._array, np.memmap)
            np.testing.assert_array_equal(src.frames[:], flat(data))


def test_npz_named_and_automatic(tmp_path):
    data = stack((2, 2, 4, 4))
    path = tmp_path / "p.npz"
    np.savez_compressed(path, patterns=data, positions=np.zeros((4, 2)))
    frames, src = read_all(path)
    assert src.dataset == "patterns"
    np.testing.assert_array_equal(frames, flat(data))
    np.savez(path, a=data, b=data + 1)
    with pytest.raises(InvalidData, match="several arrays"):
        open_patterns(path)
    np.testing.assert_array_equal(read_all(f"{path}:b")[0], flat(data + 1))


def test_matlab_v5_and_v73_give_the_same_array(tmp_path):
    data = stack((2, 3, 5, 4), np.float64)
    v5 = tmp_path / "v5.mat"
    scipy.io.savemat(v5, {"dp": data, "note": np.zeros((1, 3))})
    # v7.3: an HDF5 file with MATLAB's 512-byte header, arrays stored column-major (axes reversed)
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:
        f.create_dataset("dp", data=np.ascontiguousarray(data.transpose()), compression="gzip")
        f["dp"].attrs["MATLAB_class"] = np.bytes_("double")
    with open(v73, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(128))
    for path, fmt in [(v5, "matlab-v5"), (v73, "matlab-v7.3")]:
        frames, src = read_all(path)
        assert src.format == fmt and src.frames.file_shape == (2, 3, 5, 4)
        np.testing.assert_array_equal(frames, flat(data))
    with pytest.raises(InvalidData, match="no MATLAB variable 'x'"):
        open_patterns(f"{v5}:x")


def test_empad_raw_drops_the_two_metadata_rows(tmp_path):
    rows, cols = EMPAD_FRAME
    frames = stack((6, rows, cols))
    frames[:, 128:, :] = 1e9  # metadata rows must not reach the patterns
    path = tmp_path / "scan_x3_y2.raw"
    frames.astype("<f4").tofile(path)
    out, src = read_all(path, scan_shape=(2, 3))
    assert out.shape == (6, 128, 128) and out.max() < 1e9
    np.testing.assert_array_equal(out, frames[:, :128, :])
    with pytest.raises(InvalidData, match=r"6 EMPAD frames but scan_shape \[4, 4\] needs 16"):
        open_patterns(path, scan_shape=(4, 4))
    (tmp_path / "bad.raw").write_bytes(b"\0" * 1000)
    with pytest.raises(InvalidData, match="not an EMPAD raw file"):
        open_patterns(tmp_path / "bad.raw", scan_shape=(1, 1))


def test_zarr_array_and_group(tmp_path):
    data = stack((2, 3, 4, 4))
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 3, 4, 4), dtype="f4")
    arr[...] = data
    np.testing.assert_array_equal(read_all(tmp_path / "a.zarr")[0], flat(data))
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("scan/frames", shape=data.shape, dtype="f4")[...] = data
    g.create_array("positions", shape=(6, 2), dtype="f4")
    frames, src = read_all(tmp_path / "g.zarr")
    assert src.dataset == "scan/frames"
    np.testing.assert_array_equal(frames, flat(data))
    with pytest.raises(InvalidData, match="no zarr array 'missing'"):
        open_patterns(f"{tmp_path / 'g.zarr'}:missing")


def test_spec_parsing_and_unknown_format(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"")
    assert parse_spec(f"{path}:/entry/data") == (path, "/entry/data")
    assert parse_spec(str(path)) == (path, None)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InvalidData, match="unknown pattern file format '.txt'"):
        open_patterns(tmp_path / "x.txt")
    with pytest.raises(InvalidData, match="pattern file not found"):
        open_patterns(tmp_path / "missing.h5:data")
    np.save(tmp_path / "c.npy", np.ones((2, 3, 3), complex))
    with pytest.raises(InvalidData, match="must be real numbers"):
        open_patterns(tmp_path / "c.npy")
