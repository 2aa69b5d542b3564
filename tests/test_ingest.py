"""``ptycore ingest``: layout of data.zarr, orientation, positions, checksums, bad input, memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from _ptydata import assert_refused, sha256, write_h5, write_meta, write_raw_dataset

from ptycore.cli import main
from ptycore.physics import wavelength_A
from ptycore.store import checksum


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raw")
    h5, meta_path, patterns, meta = write_raw_dataset(directory)
    return {"dir": directory, "h5": h5, "meta": meta_path, "patterns": patterns, "record": meta}


def ingest(tmp_path, patterns, meta, *extra, name="data.zarr"):
    out = tmp_path / name
    assert main(["ingest", "--patterns", str(patterns), "--meta", str(meta), "--out", str(out), "--quiet",
                 *extra]) == 0
    return zarr.open_group(str(out), mode="r"), out


def test_data_store_layout(tmp_path, raw):
    group, out = ingest(tmp_path, f"{raw['h5']}:patterns", raw["meta"], "--chunk-patterns", "12")
    patterns = raw["patterns"]
    sy, sx, ky, kx = patterns.shape
    assert group["patterns"].dtype == np.float32 and group["patterns"].shape == (sy * sx, ky, kx)
    assert group["patterns"].chunks == (12, ky, kx)  # chunked along the scan, whole rows
    np.testing.assert_array_equal(group["patterns"][...], patterns.reshape(-1, ky, kx))
    pos = group["positions_A"][...]
    assert pos.dtype == np.float32 and pos.shape == (sy * sx, 2)
    dy, dx = raw["record"]["scan_step_A"]
    np.testing.assert_allclose(pos[1 * sx + 4], [dy, 4 * dx], rtol=1e-6)  # index iy * nx + ix
    np.testing.assert_allclose(pos[0], [0, 0])
    attrs = dict(group.attrs)
    assert attrs["scan_shape"] == [sy, sx]
    assert attrs["metadata"]["energy_kv"] == raw["record"]["energy_kv"]
    assert attrs["metadata"]["defocus_A"] == raw["record"]["defocus_A"]
    assert attrs["wavelength_A"] == pytest.approx(wavelength_A(raw["record"]["energy_kv"]))
    assert attrs["detector_pixel_mrad"] == raw["record"]["detector_pixel_mrad"]
    assert attrs["stats"]["mean_counts"] == pytest.approx(patterns.sum(axis=(2, 3)).mean(), rel=1e-5)
    prov = attrs["provenance"]
    assert prov["verb"] == "ingest"
    assert prov["inputs"][str(raw["h5"])] == checksum(raw["h5"]) == "sha256:" + sha256(raw["h5"])
    assert prov["inputs"][str(raw["meta"])] == checksum(raw["meta"])
    assert not Path(str(out) + ".partial").exists()


def one_hot_patterns(scan=(2, 3), det=(8, 8), at=(1, 5)):
    patterns = np.zeros(scan + det, np.float32)
    patterns[..., at[0], at[1]] = 100.0
    return patterns


@pytest.mark.parametrize("flip, expected", [
    ({}, (1, 5)),
    ({"transpose": True}, (5, 1)),
    ({"flip_y": True}, (6, 5)),
    ({"flip_x": True}, (1, 2)),
    ({"transpose": True, "flip_y": True}, (2, 1)),  # transpose first, then flip
])
def test_detector_orientation_applied_once(tmp_path, flip, expected):
    npy = tmp_path / "p.npy"
    np.save(npy, one_hot_patterns())
    meta = write_meta(tmp_path / "meta.yaml", {
        "energy_kv": 200, "convergence_mrad": 10, "scan_shape": [2, 3], "scan_step_A": [1, 1],
        "detector_pixel_mrad": 5.0, "detector_flip": flip})
    group, _ = ingest(tmp_path, npy, meta)
    frames = group["patterns"][...]
    assert all(np.unravel_index(np.argmax(f), f.shape) == expected for f in frames)
    assert group.attrs["orientation_applied"]["transpose"] == flip.get("transpose", False)


def test_non_square_detector_transpose_and_scan_rotation(tmp_path):
    patterns = one_hot_patterns(scan=(3, 4), det=(6, 10), at=(2, 7))
    np.save(tmp_path / "p.npy", patterns.reshape(12, 6, 10))  # (n_pos, ky, kx)
    meta = write_meta(tmp_path / "meta.yaml", {
        "energy_kv": 300, "convergence_mrad": 10, "scan_shape": [3, 4], "scan_step_A": [0.5, 0.8],
        "detector_pixel_mrad": 5.0, "detector_flip": {"transpose": True}, "scan_rotation_deg": 90})
    group, _ = ingest(tmp_path, tmp_path / "p.npy", meta)
    assert group["patterns"].shape == (12, 10, 6) and group.attrs["detector_shape"] == [10, 6]
    assert np.argmax(group["patterns"][0]) == np.ravel_multi_index((7, 2), (10, 6))
    pos = group["positions_A"][...].reshape(3, 4, 2)
    np.testing.assert_allclose(pos[0, 1], [0.8, 0.0], atol=1e-6)  # 90°: fast scan (x) turns onto +y
    np.testing.assert_allclose(pos[1, 0], [0.0, -0.5], atol=1e-6)


def test_scan_rotation_keeps_distances(tmp_path):
    from ptycore.data.ingest import scan_positions_A

    plain = scan_positions_A((4, 5), (0.4, 0.7), 0.0).astype(np.float64)
    turned = scan_positions_A((4, 5), (0.4, 0.7), 33.0).astype(np.float64)
    d0 = np.linalg.norm(plain[:, None] - plain[None], axis=-1)
    d1 = np.linalg.norm(turned[:, None] - turned[None], axis=-1)
    np.testing.assert_allclose(d1, d0, atol=1e-5)
    angle = math.degrees(math.atan2(turned[1, 0], turned[1, 1]))  # direction of the fast scan
    assert angle == pytest.approx(33.0, abs=1e-4)


def test_detector_pixel_in_inverse_angstrom(tmp_path, raw):
    record = dict(raw["record"])
    mrad = record.pop("detector_pixel_mrad")
    lam = wavelength_A(record["energy_kv"])
    record["detector_pixel_invA"] = mrad * 1e-3 / lam
    meta = write_meta(tmp_path / "meta.yaml", record)
    group, _ = ingest(tmp_path, raw["h5"], meta)
    assert group.attrs["detector_pixel_mrad"] == pytest.approx(mrad)


def test_empad_raw_scan_shape_from_metadata(tmp_path):
    frames = np.zeros((6, 130, 128), "<f4")
    frames[:, 64, 64] = np.arange(1, 7)
    frames[:, 128:] = 7e8  # metadata rows
    frames.tofile(tmp_path / "scan.raw")
    meta = write_meta(tmp_path / "meta.yaml", {
        "energy_kv": 300, "convergence_mrad": 20, "scan_shape": [2, 3], "scan_step_A": [1, 1],
        "detector_pixel_mrad": 0.5})
    group, _ = ingest(tmp_path, tmp_path / "scan.raw", meta)
    assert group["patterns"].shape == (6, 128, 128)
    np.testing.assert_array_equal(group["patterns"][:, 64, 64], np.arange(1, 7))
    assert group["patterns"][...].max() == 6


def test_small_negative_read_noise_is_kept(tmp_path, raw):
    noisy = raw["patterns"] + np.random.default_rng(1).normal(0, 0.3, raw["patterns"].shape).astype(np.float32)
    assert noisy.min() < -0.5
    h5 = write_h5(tmp_path / "noisy.h5", noisy)
    group, _ = ingest(tmp_path, h5, raw["meta"])
    assert group["patterns"][...].min() == pytest.approx(noisy.min())


# ---------------------------------------------------------------- bad input
def bad_meta(tmp_path, raw, change=None, drop=None):
    record = dict(raw["record"])
    if drop:
        record.pop(drop)
    record.update(change or {})
    return write_meta(tmp_path / "meta.yaml", record)


def test_truncated_hdf5(tmp_path, raw, capsys):
    data = Path(raw["h5"]).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(cut), "--meta", str(raw["meta"]), "--out", str(out)],
                   out, [cut, raw["meta"]], [str(cut), "not a readable HDF5 file", "truncated"])


def test_wrong_dataset_path(tmp_path, raw, capsys):
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", f"{raw['h5']}:/entry/nope", "--meta", str(raw["meta"]),
                            "--out", str(out)], out, [raw["h5"]], [str(raw["h5"]), "'/entry/nope'", "/patterns"])


@pytest.mark.parametrize("scan, expect", [
    ([5, 6], ["scan shape [6, 6]", "scan_shape [5, 6]"]),
    ([6, 7], ["scan shape [6, 6]", "scan_shape [6, 7]"]),
])
def test_pattern_shape_not_matching_scan(tmp_path, raw, capsys, scan, expect):
    meta = bad_meta(tmp_path, raw, {"scan_shape": scan})
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(raw["h5"]), "--meta", str(meta), "--out", str(out)],
                   out, [raw["h5"], meta], [str(raw["h5"]), *expect])


def test_flat_pattern_count_not_matching_scan(tmp_path, raw, capsys):
    npy = tmp_path / "p.npy"
    np.save(npy, raw["patterns"].reshape(36, 32, 32)[:35])
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(npy), "--meta", str(raw["meta"]), "--out", str(out)],
                   out, [npy], [str(npy), "35 patterns", "needs 36"])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_frame(tmp_path, raw, capsys, value):
    patterns = raw["patterns"].copy()
    patterns[3, 2, 10, 11] = value  # frame 3 * 6 + 2 = 20, beyond the first chunk
    h5 = write_h5(tmp_path / "bad.h5", patterns)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(h5), "--meta", str(raw["meta"]), "--out", str(out),
                            "--chunk-patterns", "6"], out, [h5], [str(h5), "frame 20 (scan y=3, x=2)", "NaN or Inf"])


def test_negative_counts(tmp_path, raw, capsys):
    patterns = raw["patterns"].copy()
    patterns[1, 1] -= 10.0  # a dark offset error, far beyond read noise
    h5 = write_h5(tmp_path / "neg.h5", patterns)
    out = tmp_path / "data.zarr"
    line = assert_refused(capsys, ["ingest", "--patterns", str(h5), "--meta", str(raw["meta"]), "--out", str(out)],
                          out, [h5], [str(h5), "frame 7 (scan y=1, x=1)", "negative counts down to -10"])
    assert "read-noise limit" in line
    # a user who knows the offset is harmless raises the limit
    assert main(["ingest", "--patterns", str(h5), "--meta", str(raw["meta"]), "--out", str(out), "--quiet",
                 "--negative-tolerance", "20"]) == 0


@pytest.mark.parametrize("change, drop, expect", [
    (None, "energy_kv", ["energy_kv", "required key is missing"]),
    ({"convergance_mrad": 20}, "convergence_mrad", ["convergance_mrad", "did you mean 'convergence_mrad'"]),
    ({"convergence_mrad": 45.0}, None, ["convergence_mrad", "45 mrad lies outside the detector", "40 mrad"]),
    ({"scan_step_A": [0.5, -0.5]}, None, ["scan_step_A", "> 0"]),
])
def test_bad_metadata(tmp_path, raw, capsys, change, drop, expect):
    meta = bad_meta(tmp_path, raw, change, drop)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(raw["h5"]), "--meta", str(meta), "--out", str(out)],
                   out, [raw["h5"], meta], [str(meta), *expect])


def test_refuses_to_overwrite(tmp_path, raw, capsys):
    _, out = ingest(tmp_path, raw["h5"], raw["meta"])
    before = sha256(out)
    assert main(["ingest", "--patterns", str(raw["h5"]), "--meta", str(raw["meta"]), "--out", str(out)]) != 0
    assert "already exists" in capsys.readouterr().err and sha256(out) == before


# ---------------------------------------------------------------- larger than the memory budget
MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from ptycore.cli import main
    small, big, meta_small, meta_big, out_small, out_big, budget = sys.argv[1:]
    # a small ingest first: libraries load their code (shared objects count in the RSS) once
    assert main(["ingest", "--patterns", small, "--meta", meta_small, "--out", out_small, "--quiet"]) == 0
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = main(["ingest", "--patterns", big, "--meta", meta_big, "--out", out_big, "--max-memory-mb", budget,
               "--quiet"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rc": rc, "base_kb": base, "peak_kb": peak}))
""")


def test_file_larger_than_memory_budget_is_streamed(tmp_path):
    scan, n = (32, 32), 128  # 1024 patterns of 128 x 128 float32: 64 MiB in the file
    yy, xx = np.mgrid[:n, :n]
    disk = (((yy - n // 2) ** 2 + (xx - n // 2) ** 2) < 20**2).astype(np.float32)
    paths = {}
    for name, shape in [("small", (2, 2)), ("big", scan)]:
        paths[name] = tmp_path / f"{name}.h5"
        with h5py.File(paths[name], "w") as f:
            dset = f.create_dataset("patterns", shape=shape + (n, n), dtype="f4")
            for iy in range(shape[0]):
                dset[iy] = disk * (1 + iy * shape[1] + np.arange(shape[1], dtype=np.float32))[:, None, None]
        write_meta(tmp_path / f"{name}.yaml", {"energy_kv": 300, "convergence_mrad": 20, "scan_shape": list(shape),
                                               "scan_step_A": [0.5, 0.5], "detector_pixel_mrad": 1.0})
    file_mb = paths["big"].stat().st_size / 2**20
    budget_mb = 8
    out = tmp_path / "big.zarr"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = [str(paths["small"]), str(paths["big"]), str(tmp_path / "small.yaml"), str(tmp_path / "big.yaml"),
            str(tmp_path / "small.zarr"), str(out), str(budget_mb)]
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    grown_mb = (result["peak_kb"] - result["base_kb"]) / 1024  # ru_maxrss is in KiB on Linux
    # loading the file would grow the process by at least its 64 MiB; streaming stays near the budget
    assert grown_mb <= 2 * budget_mb and grown_mb < 0.25 * file_mb, (grown_mb, file_mb)
    group = zarr.open_group(str(out), mode="r")
    chunk = group.attrs["provenance"]["chunk_patterns"]
    assert chunk * n * n * 4 <= budget_mb * 2**20 and group["patterns"].chunks[0] == chunk
    for i in (0, 517, 1023):  # spot-check frames in different chunks
        np.testing.assert_array_equal(group["patterns"][i], disk * (1 + i))
