"""Every shipped plan validates, and the multislice study plan says what it claims."""

from pathlib import Path

import pytest

from ptycore.plan import Schedule, load_plan

PLANS = sorted((Path(__file__).parent.parent / "config" / "plans").glob("*.yaml"))


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_shipped_plan_is_valid(path):
    plan = load_plan(path)
    assert plan.stages and plan.name == path.stem


def test_multislice_study_plan():
    stage = load_plan(Path(__file__).parent.parent / "config/plans/multislice-study.yaml").stages[0]
    assert stage.resample.probe_modes == 4
    assert stage.optimize["probe"].start == 5
    assert stage.optimize["positions"].start == 10 and stage.optimize["tilts"].start == 10
    assert {k: v.weight.at(0) for k, v in stage.losses.items()} == {"single": 1.0, "pacbed": 0.5, "sparse": 0.1}


def test_lm_then_gradient_plan():
    """ePIE single-slice start, a couple of LM steps on ~4 Å slices, then multislice-study's
    regularised gradient refinement at 0.3x its Adam steps (a polish, not a restart)."""
    root = Path(__file__).parent.parent / "config/plans"
    plan = load_plan(root / "lm-then-gradient.yaml")
    study = load_plan(root / "multislice-study.yaml").stages[0]
    start, lm, polish = plan.stages
    assert (start.engine, lm.engine, polish.engine) == ("epie", "lm", "gradient")
    assert lm.iterations <= 3 and lm.resample.slice_thickness_A == 4.0
    assert set(polish.losses) == set(study.losses) and polish.constraints == study.constraints
    for name, opt in polish.optimize.items():
        assert opt.lr.at(0) == pytest.approx(0.3 * study.optimize[name].lr.at(0)), name


def test_weight_schedules():
    assert Schedule(schedule="linear", start=0, end=1, from_iter=10, to_iter=20).at(15) == pytest.approx(0.5)
    assert Schedule(schedule="step", start=0, end=2, at_iter=5).at(4) == 0 and Schedule(
        schedule="step", start=0, end=2, at_iter=5).at(5) == 2
    cos = Schedule(schedule="cosine", start=1, end=0, to_iter=10)
    assert cos.at(0) == 1 and cos.at(10) == pytest.approx(0) and cos.at(5) == pytest.approx(0.5)
    pw = Schedule(schedule="piecewise", points=[(0, 0.0), (10, 1.0), (20, 0.0)])
    assert pw.at(5) == pytest.approx(0.5) and pw.at(15) == pytest.approx(0.5) and pw.at(50) == 0.0
