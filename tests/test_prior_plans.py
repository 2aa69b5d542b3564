"""Every shipped plan that uses the learned prior asks the shipped prior only for noise levels it was
trained on (a plan outside that range is refused when its stage starts, after the earlier stages ran)."""

from pathlib import Path

import pytest

from ptycore.plan import load_plan
from ptycore.prior.guidance import load_stage_prior, stage_noise_levels

PLANS = sorted((Path(__file__).resolve().parent.parent / "config/plans").glob("*.yaml"))


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_shipped_plan_noise_levels_inside_the_shipped_prior(path):
    plan = load_plan(path)
    for stage in plan.stages:
        if "prior" not in stage.losses and stage.engine != "dps":
            continue
        prior = load_stage_prior(stage)  # raises InvalidPlan naming the field outside the range
        for field, sigma in stage_noise_levels(stage):
            assert prior.sigma_min_rad * (1 - 1e-6) <= sigma <= prior.sigma_max_rad * (1 + 1e-6), (stage.name, field)


def test_thick_prior_uses_the_prior_in_the_multislice_refinement():
    """The prior acts from the first multislice iteration (not on the single slice, whose 2 Å slabs
    would be a fiction), and its weight follows the data's counts: W = 1 / (4 N sigma^2 sqrt(Phi)),
    halved for twice the counts per pattern."""
    from ptycore.recon.autoplan import NOMINAL, DataFacts

    plan = load_plan(Path(__file__).resolve().parent.parent / "config/plans/thick-prior.yaml")
    uses = ["prior" in s.losses or s.engine == "dps" for s in plan.stages]
    assert uses == [False, True] and plan.stages[0].resample.slices == 1 and plan.stages[1].resample.slices > 1
    weights = []
    for counts in (1.6e5, 3.2e5):
        resolved, _ = plan.resolve(DataFacts(**{**NOMINAL.__dict__, "mean_counts": counts}))
        prior = resolved.stages[1].losses["prior"]
        n = counts * NOMINAL.n_positions
        assert prior.weight.start == pytest.approx(1 / (4 * n * prior.sigma_rad.start**2 * 0.1))
        assert prior.weight.to_iter == prior.sigma_rad.to_iter == resolved.stages[1].iterations
        weights.append(prior.weight.end)
    assert weights[1] == pytest.approx(weights[0] / 2)


def test_dps_defaults_inside_the_shipped_prior():
    """A dps stage that gives no noise levels asks the shipped prior only for levels it was trained on."""
    from ptycore.plan import parse_plan

    stage = parse_plan({"stages": [{"name": "d", "engine": "dps", "iterations": 3}]}).stages[0]
    prior = load_stage_prior(stage)  # raises InvalidPlan naming the field outside the range
    levels = dict(stage_noise_levels(stage))
    assert prior.sigma_min_rad < levels["dps.sigma_end_rad"] < levels["dps.sigma_start_rad"] < prior.sigma_max_rad
