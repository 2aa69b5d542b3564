"""A tiny version of each shipped study: every derived plan (first seed) runs for a few
iterations on a small synthetic dataset, and the factor it varies reaches the engine.

The full studies run through the DAG with `snakemake figures` (tests/test_studies.py runs a
tiny study through the real DAG twice and checks identical numbers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from _synthetic import make_synthetic

from ptycore.plan import parse_plan
from ptycore.recon.runner import run_stage
from ptycore.studies import default_plan_path, expand, load_study

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "config" / "studies").glob("*.yaml"))


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_det=32, scan=6, step_A=0.6, pixel_A=0.3)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_tiny_version_of_shipped_study_runs(path, synthetic):
    study = load_study(path)
    base = yaml.safe_load(default_plan_path(study.plan, ROOT).read_text())
    runs = [r for r in expand(study, base, str(path)) if r.seed == study.seeds[0]]
    assert len(runs) >= 3
    finals = {}
    for run in runs:
        plan = run.plan
        for stage in plan["stages"]:  # tiny: 3 iterations, onsets scaled to match
            scale = 3 / stage["iterations"]
            stage["iterations"] = 3
            for opt in stage["optimize"].values():
                if isinstance(opt, dict) and opt.get("start"):
                    opt["start"] = math.floor(int(opt["start"]) * scale)
        stage = parse_plan(plan).stages[0]
        state, record = run_stage(stage, 0, synthetic.flat_state(), synthetic.measurement, seed=run.seed,
                                  plan_hash=run.run_id, workdir=None, progress=False)
        loss = record.history["single"]
        assert len(loss) == 3 and all(math.isfinite(v) for v in loss), run.run_id
        assert record.compilations == 1
        finals[run.run_id] = loss[-1]
    # the factor changes the computation: not every level ends at the same loss
    assert len({round(v, 7) for v in finals.values()}) > 1, finals
