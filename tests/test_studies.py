"""Studies (config/studies/*.yaml, ptycore.studies): validation, expansion into derived plans,
the shipped studies, convergence time, and a tiny study through the real Snakemake DAG twice
(identical numbers in the study table)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_workflow import DEFAULT_CONFIG, ROOT, job_counts, missing_verbs, snakemake

from ptycore.errors import InvalidArgument, InvalidPlan
from ptycore.plan import load_plan
from ptycore.studies import convergence_time, expand, load_study, materialise, set_field

STUDY_CONFIG = ROOT / "config" / "test" / "study-config.yaml"
SHIPPED = sorted((ROOT / "config" / "studies").glob("*.yaml"))
BASE = yaml.safe_load((ROOT / "config" / "plans" / "multislice-study.yaml").read_text())


def write_study(tmp_path: Path, **study) -> Path:
    record = {"plan": "multislice-study", "datasets": ["srtio3-2cells"],
              "factors": [{"name": "batch_size", "field": "stages[0].batch_size", "values": [16, 64]}]}
    record.update(study)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


# ---------------------------------------------------------------- validation
def test_unknown_key_is_rejected_with_a_readable_message(tmp_path):
    path = write_study(tmp_path, factors=[{"name": "g", "field": "stages[0].grouping", "values": ["random"],
                                           "levles": []}])
    with pytest.raises(InvalidArgument) as err:
        load_study(path)
    assert str(err.value) == f"{path}: factors[0].levles: unknown key"
    path = write_study(tmp_path, seed=[0])
    with pytest.raises(InvalidArgument, match=r"study\.yaml: seed: unknown key"):
        load_study(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"factors": []}, "factors: List should have at least 1 item"),
    ({"factors": [{"name": "g", "field": "stages[0].grouping"}]}, "give 'levels', or 'field' with a non-empty"),
    ({"factors": [{"name": "g", "field": "x", "values": [1, "1"]}]}, "level labels must be unique"),
    ({"seeds": [0, 0]}, "seeds must be unique"),
    ({"datasets": []}, "datasets: List should have at least 1 item"),
])
def test_bad_study_names_the_field(tmp_path, change, message):
    with pytest.raises(InvalidArgument, match=message):
        load_study(write_study(tmp_path, **change))


def test_name_defaults_to_the_file_stem(tmp_path):
    assert load_study(write_study(tmp_path)).name == "study"


# ---------------------------------------------------------------- expansion
def test_level_overrides_land_in_the_right_plan_field(tmp_path):
    study = load_study(write_study(tmp_path, seeds=[3, 4], factors=[
        {"name": "batch_size", "field": "stages[*].batch_size", "values": [16, 64]},
        {"name": "schedule", "levels": [
            {"value": "constant", "set": {"stages[main].losses.pacbed": 0.2, "stages[0].losses.sparse": None}},
            {"value": "linear", "label": "lin", "set": {
                "stages[0].losses.tv_xy": {"schedule": "linear", "start": 0.01, "end": 0.0, "to_iter": 100},
                "stages[0].optimize.positions.start": 150}}]}]))
    runs = expand(study, BASE)
    assert [r.run_id for r in runs] == ["16-constant-s3", "16-constant-s4", "16-lin-s3", "16-lin-s4",
                                        "64-constant-s3", "64-constant-s4", "64-lin-s3", "64-lin-s4"]
    by_id = {r.run_id: r for r in runs}
    run = by_id["64-lin-s4"]
    assert run.levels == {"batch_size": 64, "schedule": "linear"} and run.seed == 4
    stage = run.plan["stages"][0]
    assert run.plan["seed"] == 4 and stage["batch_size"] == 64
    assert stage["optimize"]["positions"]["start"] == 150 and stage["optimize"]["tilts"]["start"] == 10
    assert stage["losses"]["tv_xy"]["schedule"] == "linear" and stage["losses"]["pacbed"] == 0.5
    constant = by_id["16-constant-s3"].plan["stages"][0]
    assert constant["losses"] == {"single": 1.0, "pacbed": 0.2} and constant["batch_size"] == 16
    # the base plan is untouched, everything else equal to it
    assert BASE["stages"][0]["batch_size"] == 32 and "tv_xy" not in BASE["stages"][0]["losses"]
    rest = {k: v for k, v in constant.items() if k not in ("batch_size", "losses")}
    assert rest == {k: v for k, v in BASE["stages"][0].items() if k not in ("batch_size", "losses")}


def test_bad_override_names_the_level_and_the_field(tmp_path):
    study = load_study(write_study(tmp_path, factors=[
        {"name": "g", "levels": [{"value": "x", "set": {"stages[0].optimise.positions.start": 5}}]}]))
    with pytest.raises(InvalidPlan, match=r"level g='x': stages\[0\]\.optimise\.positions\.start: the base plan "
                                          r"has no 'optimise' here"):
        expand(study, BASE)
    study = load_study(write_study(tmp_path, factors=[{"name": "g", "field": "stages[0].grouping",
                                                       "values": ["diagonal"]}]))
    with pytest.raises(InvalidPlan, match=r"level g='diagonal', derived plan: stages\[0\]\.grouping: Input should"):
        expand(study, BASE)
    with pytest.raises(ValueError, match="stage names cannot be overridden"):
        set_field({"stages": [{"name": "a"}]}, "stages[0].name", "b")


def test_derived_plans_are_deterministic_and_not_rewritten(tmp_path):
    path = write_study(tmp_path, name="bs")
    plan = ROOT / "config" / "plans" / "multislice-study.yaml"
    _, runs = materialise(path, tmp_path / "a", plan)
    _, again = materialise(path, tmp_path / "b", plan)
    assert [r.run_id for r in runs] == [r.run_id for r in again] == ["16-s0", "64-s0"]
    files = sorted((tmp_path / "a" / "plans").iterdir())
    assert [f.name for f in files] == ["study-bs-16-s0.yaml", "study-bs-64-s0.yaml"]
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / "plans" / f.name).read_bytes()
        assert load_plan(f).stages[0].batch_size == int(f.stem.split("-")[2])
    os.utime(files[0], (1, 1))
    materialise(path, tmp_path / "a", plan)
    assert files[0].stat().st_mtime == 1, "an unchanged plan was rewritten (would rerun its jobs)"
    spec = yaml.safe_load((tmp_path / "a" / "aggregate.yaml").read_text())
    assert spec["factor"] == "batch_size"
    assert spec["runs"][1] == {"dataset": "srtio3-2cells", "plan": "study-bs-64-s0", "value": 64,
                               "columns": {"run": "64-s0", "batch_size": 64, "seed": 0}}
    # a level removed from the study: its derived plan goes too
    record = yaml.safe_load(path.read_text())
    record["factors"][0]["values"] = [16]
    path.write_text(yaml.safe_dump(record))
    materialise(path, tmp_path / "a", plan)
    assert [f.name for f in (tmp_path / "a" / "plans").iterdir()] == ["study-bs-16-s0.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_studies_validate(path, tmp_path):
    study, runs = materialise(path, tmp_path, ROOT / "config" / "plans" / f"{load_study(path).plan}.yaml")
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(study.datasets) <= {d["name"] for d in config["datasets"]}
    assert len(runs) == np.prod([len(f.levels) for f in study.factors]) * len(study.seeds)
    for f in (tmp_path / "plans").iterdir():
        load_plan(f)


def test_shipped_study_levels():
    runs = expand(load_study(ROOT / "config" / "studies" / "late-refinement.yaml"), BASE)
    for run in runs:
        opt = run.plan["stages"][0]["optimize"]
        iterations = run.plan["stages"][0]["iterations"]
        n = run.levels["refined_final_iterations"]
        assert iterations - opt["positions"]["start"] == n == iterations - opt["tilts"]["start"]
    runs = expand(load_study(ROOT / "config" / "studies" / "batch-geometry.yaml"), BASE)
    assert {(r.plan["stages"][0]["batch_size"], r.plan["stages"][0]["grouping"]) for r in runs} == {
        (b, g) for b in (16, 32, 64) for g in ("random", "compact", "sparse")}


def test_convergence_time():
    loss = [10.0, 5.0, 2.0, 1.5, 1.0]  # total drop 9; 90 % = 8.1 reached at index 3 (drop 8.5)
    assert convergence_time(loss, [2.0, 1.0, 1.0, 1.0, 1.0]) == (4, 5.0)
    assert convergence_time(loss, None, 0.5) == (2, None)  # drop 5 >= 4.5 at index 1
    assert convergence_time([1.0, 2.0]) == (None, None)
    assert convergence_time([np.nan, 4.0, 1.0]) == (3, None)


# ---------------------------------------------------------------- the workflow
def test_default_config_runs_no_study_and_all_excludes_study_plans(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert not config.get("studies"), "make demo must not run the studies"
    proc = snakemake(tmp_path, "-n", "all", configfile=STUDY_CONFIG)
    assert proc.returncode == 0, proc.output
    assert "study-tiny-" not in proc.output  # `all` runs the config's plans, never a study's
    proc = snakemake(tmp_path, "-n", "-p", "figures", configfile=STUDY_CONFIG)
    assert proc.returncode == 0, proc.output
    # the derived plans and the study's aggregate spec are written by jobs, not while snakemake reads
    # the workflow: a dry run writes nothing
    assert job_counts(proc.output) == {"simulate": 1, "ingest": 1, "preprocess": 1, "init": 1, "reconstruct": 2,
                                       "evaluate": 2, "study_plan": 2, "study_spec": 1, "study_aggregate": 1,
                                       "figures": 1}
    assert not (tmp_path / "results").exists(), sorted(p.name for p in (tmp_path / "results").rglob("*"))
    assert "--plan results/studies/tiny/plans/study-tiny-compact-s0.yaml" in proc.output
    assert "--study results/studies/tiny/aggregate.yaml" in proc.output
    assert "--out results/figures/tiny" in proc.output


def test_shipped_studies_dry_run_with_the_default_config(tmp_path):
    studies = [str(p.relative_to(ROOT)) for p in SHIPPED]
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["studies"] = studies
    path = tmp_path / "with-studies.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", "figures", configfile=path)
    assert proc.returncode == 0, proc.output
    counts = job_counts(proc.output)
    runs = sum(len(expand(load_study(p), BASE)) * len(load_study(p).datasets) for p in SHIPPED)
    assert counts["evaluate"] == runs + 2  # + the overview's default plan on both datasets
    assert counts["study_aggregate"] == 3 and counts["figures_aggregate"] == 1


def test_study_naming_an_unknown_dataset_fails_readably(tmp_path):
    study = write_study(tmp_path, datasets=["nope"], plan="config/test/plans/tiny-single.yaml")
    config = yaml.safe_load(STUDY_CONFIG.read_text())
    config["studies"] = [str(study)]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", "figures", configfile=path)
    assert proc.returncode != 0
    assert f"invalid config: study {study}: datasets: unknown ['nope'] (known: tiny)" in proc.output, proc.output


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_study_through_the_dag_twice_gives_identical_numbers(tmp_path):
    if missing_verbs():
        pytest.skip(f"verbs not written yet: {', '.join(missing_verbs())}")
    tables = []
    for name in ("first", "second"):
        workdir = tmp_path / name
        workdir.mkdir()
        proc = snakemake(workdir, "--profile", str(ROOT / "profiles" / "local"), "--cores", "2", "figures",
                         configfile=STUDY_CONFIG)
        assert proc.returncode == 0, proc.output
        out = workdir / "results" / "figures" / "tiny"
        for f in ("table.csv", "report.html", "study_ssim_phase_sum.png", "study_final_loss.png"):
            assert (out / f).is_file(), f
        tables.append(read_table(out / "table.csv"))
        if name == "first":  # derived plans are not rewritten: nothing to redo
            proc = snakemake(workdir, "-n", "figures", configfile=STUDY_CONFIG)
            assert proc.returncode == 0 and "Nothing to be done" in proc.output, proc.output
            shutil.rmtree(workdir / "results" / "tiny" / "simulated")  # keep tmp small
    first, second = tables
    assert [(r["run"], r["grouping"], r["seed"], r["status"]) for r in first] == [
        ("random-s0", "random", "0", "ok"), ("compact-s0", "compact", "0", "ok")]
    deterministic = ["ssim_phase_sum", "final_loss", "iterations", "iterations_to_90pct_loss_drop"]
    for a, b in zip(first, second, strict=True):
        assert all(a[k] != "" for k in deterministic), a
        assert {k: a[k] for k in deterministic} == {k: b[k] for k in deterministic}  # bit-identical (repr)
    assert first[0]["ssim_phase_sum"] != first[1]["ssim_phase_sum"]  # the factor did something


def test_failed_study_run_is_named_in_the_study_table(tmp_path):
    """--keep-going: a study run that fails leaves the study's figures built from what completed
    (here nothing), its table naming the failed run and its error."""
    if missing_verbs():
        pytest.skip(f"verbs not written yet: {', '.join(missing_verbs())}")
    config = yaml.safe_load(STUDY_CONFIG.read_text())
    config["datasets"] = [d for d in yaml.safe_load((ROOT / "config" / "test" / "config.yaml").read_text())["datasets"]
                          if d["name"] == "tiny-bad"]
    study = yaml.safe_load((ROOT / "config" / "test" / "studies" / "tiny.yaml").read_text())
    study["datasets"] = ["tiny-bad"]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(study))
    config["studies"] = [str(tmp_path / "tiny.yaml")]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--profile", str(ROOT / "profiles" / "local"), "--cores", "1", "figures",
                     configfile=tmp_path / "bad.yaml")
    assert proc.returncode != 0
    assert "FAILED tiny-bad / study-tiny-random-s0 at simulate: ptycore simulate: error: --dose" in proc.output
    rows = read_table(tmp_path / "results" / "figures" / "tiny" / "table.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("random-s0", "failed"), ("compact-s0", "failed")]
    assert all(r["error"].startswith("ptycore simulate: error: --dose") for r in rows), rows


def test_crossed_study_table_and_figure_through_aggregate(tmp_path):
    """aggregate --study with the spec a crossed study writes: one table row per run × dataset with
    its levels and seed, and one line per level of the second factor in the figure."""
    from ptycore.aggregate import aggregate
    from ptycore.studies import aggregate_spec

    study = load_study(ROOT / "config" / "studies" / "batch-geometry.yaml")
    runs = expand(study, BASE)
    spec = aggregate_spec(study, runs)
    evals = []
    for i, entry in enumerate(spec["runs"]):
        d = tmp_path / "results" / entry["dataset"] / entry["plan"] / "eval"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"dataset": entry["dataset"], "plan": entry["plan"],
                                                     "ssim_phase_sum": 0.5 + i / 100, "final_loss": 1.0}))
        evals.append(str(d))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    aggregate(evals[:-1], tmp_path / "out", study=tmp_path / "spec.yaml")  # the last run did not finish
    rows = read_table(tmp_path / "out" / "table.csv")
    assert len(rows) == len(runs) == 18
    assert (rows[0]["run"], rows[0]["batch_size"], rows[0]["grouping"], rows[0]["seed"], rows[0]["status"]) == (
        "16-random-s0", "16", "random", "0", "ok")
    assert float(rows[3]["ssim_phase_sum"]) == 0.53
    assert rows[-1]["status"] == "missing" and rows[-1]["run"] == "64-sparse-s1"
    assert (tmp_path / "out" / "study_ssim_phase_sum.png").is_file()
    assert {e["series"] for e in spec["runs"]} == {"grouping=random", "grouping=compact", "grouping=sparse"}
