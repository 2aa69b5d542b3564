"""Two half-data reconstructions for a Fourier ring correlation (FRC).

``ptycore preprocess --half 1|2`` keeps the even / odd scan columns: the two halves split the
whole scan's prepared data exactly (same disk centre, dose scale and noise draws), each is a
regular raster, and ``ptycore init`` gives both the whole scan's object frame. With ``frc:
{enabled: true}`` the workflow reconstructs both halves with the same plan and evaluate reports
the FRC resolution between them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
import zarr
from _ptydata import assert_refused, simulate, write_h5, write_meta

from ptycore.cli import main

SCAN = (5, 7)  # an odd number of columns: half 1 has 4, half 2 has 3
STEP_A = (0.6, 0.5)
# the whole scan's steps that the halves must reproduce exactly: crop + bin, dose noise, read noise
CONFIG = {"detector_crop": 30, "detector_bin": 3, "dose_e_per_A2": 2.0e4, "read_noise": 0.5, "seed": 7}


def run(argv: list[str]) -> None:
    assert main([*argv, "--quiet"]) == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data.zarr of a 5 x 7 scan, its whole prepared store, both halves, and the init of each."""
    d = tmp_path_factory.mktemp("halves")
    patterns, meta, _ = simulate(scan=SCAN, n_det=48, det_mrad=2.0, step_A=STEP_A)
    write_h5(d / "patterns.h5", patterns)
    write_meta(d / "meta.yaml", {**meta, "scan_rotation_deg": 12.0})  # rotated: the box is not the hull
    run(["ingest", "--patterns", str(d / "patterns.h5"), "--meta", str(d / "meta.yaml"), "--out", str(d / "data.zarr")])
    cfg = d / "pre.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    stores = {}
    for name, extra in (("whole", []), ("half1", ["--half", "1"]), ("half2", ["--half", "2"])):
        run(["preprocess", "--data", str(d / "data.zarr"), "--config", str(cfg), *extra,
             "--out", str(d / f"{name}.zarr")])
        run(["init", "--data", str(d / f"{name}.zarr"), "--out", str(d / f"{name}-init.zarr")])
        stores[name] = (zarr.open_group(str(d / f"{name}.zarr"), mode="r"),
                        zarr.open_group(str(d / f"{name}-init.zarr"), mode="r"))
    return d, cfg, stores


def test_halves_split_the_whole_scan_into_two_regular_rasters(prepared):
    _, _, stores = prepared
    whole = stores["whole"][0]
    ny, nx = SCAN
    pos = whole["positions_A"][...].reshape(ny, nx, 2)
    pats = whole["patterns"][...].reshape(ny, nx, *whole["patterns"].shape[1:])
    halves = [stores["half1"][0], stores["half2"][0]]
    seen = []
    for k, half in enumerate(halves, start=1):
        cols = list(range(k - 1, nx, 2))
        attrs = dict(half.attrs)
        assert attrs["scan_shape"] == [ny, len(cols)] == attrs["metadata"]["scan_shape"]
        # exactly the whole scan's prepared columns, noise included
        np.testing.assert_array_equal(half["patterns"][...], pats[:, cols].reshape(-1, *pats.shape[2:]))
        hp = half["positions_A"][...]
        np.testing.assert_array_equal(hp, pos[:, cols].reshape(-1, 2))
        # a regular raster: one step along each scan axis, the x step twice the whole scan's
        grid = hp.reshape(ny, len(cols), 2).astype(np.float64)
        along_x, along_y = np.diff(grid, axis=1), np.diff(grid, axis=0)
        np.testing.assert_allclose(along_x, np.broadcast_to(along_x[0, 0], along_x.shape), atol=1e-5)
        np.testing.assert_allclose(along_y, np.broadcast_to(along_y[0, 0], along_y.shape), atol=1e-5)
        assert np.linalg.norm(along_x[0, 0]) == pytest.approx(2 * STEP_A[1], rel=1e-5)
        assert attrs["metadata"]["scan_step_A"] == pytest.approx([STEP_A[0], 2 * STEP_A[1]])
        assert attrs["metadata"]["dose_e_per_A2"] == pytest.approx(CONFIG["dose_e_per_A2"] / 2)
        # the same scan frame as the whole scan, and the same detector sampling
        assert attrs["scan_origin_A"] == whole.attrs["scan_origin_A"]
        assert attrs["pixel_size_A"] == whole.attrs["pixel_size_A"]
        np.testing.assert_allclose(attrs["scan_box_A"], [pos.reshape(-1, 2).min(0), pos.reshape(-1, 2).max(0)],
                                   atol=1e-5)
        assert attrs["preprocess"][-1]["step"] == "half" and attrs["provenance"]["config"]["half"] == k
        seen += [tuple(p) for p in hp]
    # disjoint, and together the whole scan
    assert len(seen) == len(set(seen)) == ny * nx
    assert set(seen) == {tuple(p) for p in pos.reshape(-1, 2)}


def test_both_halves_get_the_object_frame_of_the_whole_scan(prepared):
    _, _, stores = prepared
    whole = stores["whole"][1]
    ny, nx = SCAN
    whole_pos = whole["positions_A"][...].reshape(ny, nx, 2)
    for k in (1, 2):
        init = stores[f"half{k}"][1]
        assert init.attrs["origin_A"] == whole.attrs["origin_A"]
        assert init["object_phase"].shape == whole["object_phase"].shape
        np.testing.assert_array_equal(init["positions_A"][...], whole_pos[:, k - 1 :: 2].reshape(-1, 2))


@pytest.mark.parametrize("config, option, expect", [
    ({"half": 3}, [], ["pre.yaml: half: Input should be 1 or 2", "got 3"]),
    ({}, ["--half", "3"], ["--half: must be 1", "got 3"]),
    ({"scan_crop": [0, SCAN[0], 2, 3], "half": 1}, [], ["pre.yaml: half: the scan (after scan_crop) has 1 column"]),
    ({"scan_crop": [0, SCAN[0], 2, 3]}, ["--half", "2"], ["--half 2: the scan (after scan_crop) has 1 column"]),
], ids=["config 3", "option 3", "config one column", "option one column"])
def test_bad_half_refused(prepared, tmp_path, capsys, config, option, expect):
    """One line naming the key (or option) and the value; non-zero exit; no output."""
    d, _, _ = prepared
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "prepared.zarr"
    argv = ["preprocess", "--data", str(d / "data.zarr"), "--config", str(cfg), *option, "--out", str(out)]
    assert_refused(capsys, argv, out, [d / "data.zarr", cfg], expect)


# ---------------------------------------------------------------- the workflow
@pytest.mark.parametrize("case", ["default off", "one dataset on", "unknown plan"])
def test_frc_switch_adds_the_half_jobs(tmp_path, case):
    """Off by default; a dataset's own frc: true adds its halves' jobs only; a bad frc.plans is one line."""
    from test_workflow import TEST_CONFIG, job_counts, snakemake, write_config

    datasets = yaml.safe_load(TEST_CONFIG.read_text())["datasets"]
    change = {
        "default off": {},
        "one dataset on": {"datasets": [dict(d, frc=True) if d["name"] == "tiny" else d for d in datasets]},
        "unknown plan": {"frc": {"enabled": True, "plans": ["nope"]}},
    }[case]
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "frc.yaml", **change))
    if case == "unknown plan":
        assert proc.returncode != 0
        assert "invalid config: frc.plans: unknown plans ['nope'] (known: tiny)" in proc.output, proc.output
        return
    assert proc.returncode == 0, proc.output
    counts = job_counts(proc.output)
    halves = case == "one dataset on"
    assert (counts["preprocess"], counts["init"], counts["reconstruct"]) == ((4, 4, 8) if halves else (2, 2, 4))
    assert ("tiny~half1" in proc.output) == halves and "tiny-bad~half" not in proc.output


@pytest.mark.slow
def test_workflow_reconstructs_both_halves_and_evaluate_reports_the_frc(tmp_path):
    from test_workflow import ROOT, TEST_CONFIG, job_counts, missing_verbs, snakemake, write_config

    if missing_verbs():
        pytest.skip(f"verbs not written yet: {', '.join(missing_verbs())}")
    datasets = [d for d in yaml.safe_load(TEST_CONFIG.read_text())["datasets"] if d["name"] == "tiny"]
    config = write_config(tmp_path / "frc.yaml", datasets=datasets, frc={"enabled": True})
    proc = snakemake(tmp_path, "-n", "-p", configfile=config)
    assert proc.returncode == 0, proc.output
    # the whole dataset and each half: preprocess, init, every stage of the plan; one evaluate
    assert job_counts(proc.output) == {"simulate": 1, "ingest": 1, "preprocess": 3, "init": 3, "reconstruct": 6,
                                       "evaluate": 1, "aggregate": 1, "all": 1}, proc.output
    for k in (1, 2):
        assert f"--half {k} --out results/tiny~half{k}/prepared.zarr" in proc.output
    assert ("--half1 results/tiny~half1/tiny/stages/fine.zarr --half2 results/tiny~half2/tiny/stages/fine.zarr"
            in proc.output)

    evaluation = tmp_path / "results" / "tiny" / "tiny" / "eval"
    proc = snakemake(tmp_path, "--profile", str(ROOT / "profiles" / "local"), "--cores", "2", "results/tiny/tiny/eval",
                     configfile=config)
    assert proc.returncode == 0, proc.output
    metrics = json.loads((evaluation / "metrics.json").read_text())
    print("frc_resolution_A", metrics["frc_resolution_A"])
    # finite, and no finer than the Nyquist limit (the tiny, nearly noise-free data may reach it)
    assert math.isfinite(metrics["frc_resolution_A"])
    assert metrics["frc_resolution_A"] >= metrics["nyquist_A"] * (1 - 1e-9)
    assert (evaluation / "frc.png").exists()
    # each half: 8 x 4 positions, in the object frame of the whole dataset
    results = tmp_path / "results"
    whole_init = zarr.open_group(str(results / "tiny" / "init.zarr"), mode="r")
    whole = zarr.open_group(str(results / "tiny" / "tiny" / "stages" / "fine.zarr"), mode="r")
    for k in (1, 2):
        assert zarr.open_group(str(results / f"tiny~half{k}" / "prepared.zarr"), mode="r").attrs["scan_shape"] == [8, 4]
        assert zarr.open_group(str(results / f"tiny~half{k}" / "init.zarr"), mode="r").attrs["origin_A"] == \
            whole_init.attrs["origin_A"]
        half = zarr.open_group(str(results / f"tiny~half{k}" / "tiny" / "stages" / "fine.zarr"), mode="r")
        assert half["object_phase"].shape == whole["object_phase"].shape and half["positions_A"].shape == (32, 2)
