"""End to end on abTEM data: simulate → ingest → preprocess → init → reconstruct → evaluate.

The acceptance case of the reconstruction issues: thin SrTiO3 (1 unit cell), 300 kV,
21.4 mrad, 150 Å defocus, dose 1e6 e/Å², 16×16 scan. Each engine's shipped plan must reach a
depth-summed phase SSIM >= 0.8 against abTEM's truth (after offset removal, registration and
cropping to the scanned area). Achieved on this machine: gradient-single-slice (200
iterations) 0.87, epie-quick (30) 0.88, the LSQML stage of lsqml-then-gradient (20) 0.88;
correlations 0.95-0.96.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptycore.cli import main

pytest.importorskip("abtem")
pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parent.parent


def _prepare(tmp, *simulate_args):
    """simulate (abTEM) → ingest → preprocess → init in ``tmp``; returns (sim, run) directories."""
    sim, run = tmp / "sim", tmp / "run"
    assert main(["simulate", "--out", str(sim), *simulate_args, "--quiet"]) == 0
    assert main(["ingest", "--patterns", f"{sim}/patterns.h5:patterns", "--meta", str(sim / "meta.yaml"),
                 "--out", str(run / "data.zarr")]) == 0
    assert main(["preprocess", "--data", str(run / "data.zarr"), "--config",
                 str(ROOT / "config/preprocess/default.yaml"), "--out", str(run / "prepared.zarr")]) == 0
    assert main(["init", "--data", str(run / "prepared.zarr"), "--out", str(run / "init.zarr")]) == 0
    return sim, run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("sto"))


@pytest.mark.parametrize(("plan", "stage", "max_iterations"), [
    ("gradient-single-slice", None, 200),
    ("epie-quick", "main", 30),
    ("lsqml-then-gradient", "lsqml", 30),
])
def test_shipped_plan_recovers_simulated_srtio3(prepared, plan, stage, max_iterations):
    sim, run = prepared
    out = run / f"{plan}.zarr"
    args = ["reconstruct", "--plan", str(ROOT / f"config/plans/{plan}.yaml"), "--data", str(run / "prepared.zarr"),
            "--init", str(run / "init.zarr"), "--out", str(out), "--quiet"]
    assert main(args + (["--stage", stage] if stage else [])) == 0
    assert main(["evaluate", "--result", str(out), "--truth", str(sim / "truth.zarr"), "--init",
                 str(run / "init.zarr"), "--out", str(run / f"eval-{plan}"), "--no-figures", "--quiet"]) == 0
    metrics = json.loads((run / f"eval-{plan}" / "metrics.json").read_text())
    assert metrics["iterations"] <= max_iterations
    assert metrics["ssim_phase_sum"] >= 0.8, metrics["ssim_phase_sum"]
    assert metrics["correlation_phase_sum"] >= 0.9, metrics["correlation_phase_sum"]


@pytest.fixture(scope="module")
def thick(tmp_path_factory):
    """SrTiO3 4 unit cells (15.6 Å), 300 kV, 21.4 mrad, dose 1e6 e/Å², 10x10 scan (abTEM)."""
    return _prepare(tmp_path_factory.mktemp("sto4"), "--cells-z", "4", "--scan-shape", "10", "10")


@pytest.mark.slow
def test_lm_plan_reaches_the_gradient_plan_on_multislice_srtio3(thick):
    """The LM plan (ePIE single-slice start, then 8 LM steps) recovers 4 unit cells to SSIM >= 0.95
    and within 0.03 of the gradient plan after its 200 iterations (multislice-study), on the same
    data and start. On the 16x16 set of bench/lm_ladder.py it ends above the gradient plan (0.995
    against 0.991, README); the margin keeps this 12x12 check from failing on a rounding-level
    difference between two plans that both end near 0.99."""
    sim, run = thick
    ssim = {}
    for plan in ("multislice-study", "lm-multislice"):
        out = run / f"{plan}.zarr"
        assert main(["reconstruct", "--plan", str(ROOT / f"config/plans/{plan}.yaml"), "--data",
                     str(run / "prepared.zarr"), "--init", str(run / "init.zarr"), "--out", str(out), "--quiet"]) == 0
        assert main(["evaluate", "--result", str(out), "--truth", str(sim / "truth.zarr"), "--init",
                     str(run / "init.zarr"), "--out", str(run / f"eval-{plan}"), "--no-figures", "--quiet"]) == 0
        ssim[plan] = json.loads((run / f"eval-{plan}" / "metrics.json").read_text())["ssim_phase_sum"]
    assert ssim["lm-multislice"] >= ssim["multislice-study"] - 0.03, ssim
    assert ssim["lm-multislice"] >= 0.95, ssim
