"""ptycore.pipeline, the workflow's logic, without snakemake: the step table and the jobs of a
dataset × plan, each dataset's plans, raw files that do not exist, studies expanded without
writing, failure collection and the one error-line reader, the atomic aggregate swap, the run
lock, and the nightly entry point's decisions (with a stand-in for snakemake on PATH)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ptycore.errors import first_error_line
from ptycore.pipeline import layout
from ptycore.pipeline.config import ConfigError, cli_options, resources_for
from ptycore.pipeline.failures import (
    aggregate_despite_failures,
    build_aggregate,
    clear_stale_failures,
    failed_runs,
    replace_dir,
    wanted_aggregates,
)
from ptycore.pipeline.lock import (
    HELD_ENV,
    RunLockBusy,
    check_unlock,
    exclusive_run_lock,
    hold_run_lock,
    run_alive,
    run_lock_path,
)
from ptycore.pipeline.model import Pipeline
from ptycore.pipeline.nightly import snakemake_command, working_directory

ROOT = Path(__file__).resolve().parents[1]


def write_plan(path: Path, *stages: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": path.stem, "stages": [{"name": s, "iterations": 1} for s in stages]}))
    return str(path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with two plans, a: [coarse, fine] and b: [main]."""
    monkeypatch.chdir(tmp_path)
    write_plan(tmp_path / "config" / "plans" / "a.yaml", "coarse", "fine")
    write_plan(tmp_path / "config" / "plans" / "b.yaml", "main")
    return tmp_path


def sim(name, **extra):
    return {"name": name, "simulate": {"seed": 1}, **extra}


def config(**changes):
    base = {"datasets": [], "plans": ["a"], "frc": {}, "figures": {}, "studies": [], "resources": {}, "slurm": {},
            "inbox": None, "preprocess": None, "init": None}
    base.update(changes)
    return base


# ---------------------------------------------------------------- the step table
def test_rules_and_jobs_read_one_table():
    assert layout.output_pattern("reconstruct") == "results/{dataset}/{plan}/stages/{stage}.zarr"
    assert layout.log_pattern("reconstruct") == "results/logs/{dataset}/{plan}/reconstruct-{stage}.log"
    assert layout.benchmark_pattern("ingest") == "results/benchmarks/{dataset}/ingest.tsv"
    assert layout.log_pattern("evaluate") == "results/logs/{dataset}/{plan}/evaluate.log"
    # simulate and ingest never run for a half dataset, the others do
    assert layout.dataset_constraint("ingest") == layout.NAME_RE
    assert layout.dataset_constraint("preprocess") == layout.DATASET_RE
    jobs = layout.jobs("sto", "a", ["coarse", "fine"], simulated=True, frc=False)
    assert [(j.label, j.output, j.log) for j in jobs] == [
        ("simulate", "results/sto/simulated", "results/logs/sto/simulate.log"),
        ("ingest", "results/sto/data.zarr", "results/logs/sto/ingest.log"),
        ("preprocess", "results/sto/prepared.zarr", "results/logs/sto/preprocess.log"),
        ("init", "results/sto/init.zarr", "results/logs/sto/init.log"),
        ("reconstruct-coarse", "results/sto/a/stages/coarse.zarr", "results/logs/sto/a/reconstruct-coarse.log"),
        ("reconstruct-fine", "results/sto/a/stages/fine.zarr", "results/logs/sto/a/reconstruct-fine.log"),
        ("evaluate", "results/sto/a/eval", "results/logs/sto/a/evaluate.log"),
    ]


def test_measured_dataset_has_no_simulate_and_frc_adds_each_half_before_evaluate():
    jobs = layout.jobs("scan", "b", ["main"], simulated=False, frc=True)
    assert [j.label for j in jobs] == ["ingest", "preprocess", "init", "reconstruct-main",
                                       "half1 preprocess", "half1 init", "half1 reconstruct-main",
                                       "half2 preprocess", "half2 init", "half2 reconstruct-main", "evaluate"]
    assert jobs[4].output == "results/scan~half1/prepared.zarr"
    assert jobs[9].log == "results/logs/scan~half2/b/reconstruct-main.log"
    assert layout.split_half("scan~half2") == ("scan", 2) and layout.split_half("scan") == ("scan", None)


# ---------------------------------------------------------------- datasets and plans
def test_a_datasets_own_plans_apply_to_it_alone(project):
    """Failure 4: a dataset's plans: list was applied to every dataset."""
    pipe = Pipeline(config(datasets=[sim("own", plans=["b"]), sim("other")]), basedir=project)
    assert pipe.dataset_plans("own") == ["b"]
    assert pipe.dataset_plans("other") == ["a"]  # the top-level plans, as the schema says
    assert pipe.pairs() == [("own", "b"), ("other", "a")]
    assert "results/other/b/eval" not in pipe.dataset_stores("other")
    assert pipe.evals() == ["results/own/b/eval", "results/other/a/eval"]


def test_dataset_stores_come_from_the_jobs_of_each_plan(project):
    pipe = Pipeline(config(datasets=[sim("sto", frc=True)], plans=["a", "b"]), basedir=project)
    stores = pipe.dataset_stores("sto")
    assert stores[:4] == ["results/sto/simulated", "results/sto/data.zarr", "results/sto/prepared.zarr",
                          "results/sto/init.zarr"]
    assert "results/sto~half2/a/stages/fine.zarr" in stores and "results/sto~half1/b/stages/main.zarr" in stores
    assert len(stores) == len(set(stores))
    assert pipe.evaluate_inputs("sto", "a")["half2"] == "results/sto~half2/a/stages/fine.zarr"
    assert pipe.reconstruct_inputs("sto~half1", "a", "fine")["init"] == "results/sto~half1/a/stages/coarse.zarr"
    assert pipe.preprocess_data("sto~half1") == "results/sto/data.zarr"


@pytest.mark.parametrize(("cfg", "message"), [
    (config(plans=["nope"]), "plan "),
    (config(datasets=[sim("x"), sim("x")]), "datasets: name 'x' appears twice"),
    (config(frc={"plans": ["z"]}), "frc.plans: unknown plans ['z'] (known: a)"),
])
def test_bad_config_is_one_error(project, cfg, message):
    with pytest.raises(ConfigError, match=None) as err:
        Pipeline(cfg, basedir=project)
    assert message in str(err.value)


def test_unknown_stage_names_the_plans_stages(project):
    pipe = Pipeline(config(datasets=[sim("sto")]), basedir=project)
    with pytest.raises(ConfigError, match=r"plan 'a' has no stage 'x' \(stages: coarse, fine\)"):
        pipe.reconstruct_inputs("sto", "a", "x")


def test_a_raw_file_that_does_not_exist_is_no_input_so_only_its_ingest_fails(project):
    """Failure 5: a missing patterns path stopped the whole DAG at parse time."""
    (project / "meta.yaml").write_text("energy_kv: 300\n")
    measured = {"name": "scan", "patterns": str(project / "gone.h5") + ":entry/data",
                "metadata": str(project / "meta.yaml")}
    pipe = Pipeline(config(datasets=[measured]), basedir=project)
    assert pipe.ingest_inputs("scan") == {"metadata": str(project / "meta.yaml")}
    assert pipe.ingest_patterns("scan") == f"{project}/gone.h5:entry/data"  # still given to ingest
    (project / "gone.h5").write_bytes(b"")
    assert pipe.ingest_inputs("scan")["patterns"] == str(project / "gone.h5")


def test_studies_expand_in_memory_and_write_nothing(project):
    (project / "config" / "plans" / "base.yaml").write_text((ROOT / "config/test/plans/tiny-single.yaml").read_text())
    (project / "study.yaml").write_text(yaml.safe_dump({
        "name": "bs", "plan": "base", "datasets": ["sto"],
        "factors": [{"name": "batch_size", "field": "stages[0].batch_size", "values": [8, 16]}]}))
    pipe = Pipeline(config(datasets=[sim("sto")], studies=["study.yaml"]), basedir=project)
    study = pipe.study("bs")
    assert study.pairs == [("sto", "study-bs-8-s0"), ("sto", "study-bs-16-s0")]
    plan = pipe.plan("study-bs-16-s0")
    assert plan.path == "results/studies/bs/plans/study-bs-16-s0.yaml" and plan.stages == ["main"]
    assert yaml.safe_load(plan.text)["stages"][0]["batch_size"] == 16
    assert yaml.safe_load(study.spec_text)["factor"] == "batch_size"
    assert not (project / "results").exists()
    assert pipe.pairs() == [("sto", "a")]  # `all` never runs a study's plans
    assert set(pipe.aggregates()) == {"aggregate", "figures", "studies/bs"}


def test_resources_and_options():
    cfg = config(resources={"reconstruct": {"mem_mb": 9000}}, slurm={"gpu_partition": "a100"})
    res = resources_for(cfg, "reconstruct")
    assert res["mem_mb"] == 9000 and res["gres"] == "gpu:1" and res["slurm_partition"] == "a100"
    assert "slurm_partition" not in resources_for(config(), "init") or os.environ.get("PTYCORE_SLURM_PARTITION")
    assert cli_options({"seed": 1, "scan_shape": [8, 8], "no_noise": True, "dose": None}) == \
        "--no-noise --scan-shape 8 8 --seed 1"


# ---------------------------------------------------------------- failures
@pytest.mark.parametrize(("text", "line"), [
    ("it 1 loss 0.3\nptycore reconstruct: error: stage 'main' diverged\nmore error text\n",
     "ptycore reconstruct: error: stage 'main' diverged"),
    ("warning: error_weight is 0\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
     "ValueError: bad shape\n", "ValueError: bad shape"),
    ("loading\nRuntimeError while reading chunk 3\ncleaning up\n", "RuntimeError while reading chunk 3"),
    ("step 1\nbash: ptycore: command not found\n", "bash: ptycore: command not found"),
    ("\n\n", None),
])
def test_first_error_line(tmp_path, text, line):
    log = tmp_path / "step.log"
    log.write_text(text)
    assert first_error_line(log) == line
    assert first_error_line(tmp_path / "missing.log") is None


def test_aggregate_reads_errors_with_the_same_function():
    import ptycore.aggregate

    assert ptycore.aggregate.first_error_line is first_error_line


def make_eval(dataset, plan):
    d = Path(layout.path("evaluate", dataset, plan))
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"dataset": dataset, "plan": plan, "final_loss": 0.5}))


def test_failed_runs_name_the_first_missing_step_and_its_error(project):
    pipe = Pipeline(config(datasets=[sim("good"), sim("broken"), sim("waiting")]), basedir=project)
    for job in pipe.jobs("good", "a"):
        Path(job.output).mkdir(parents=True)
    for job in pipe.jobs("broken", "a")[:4]:  # up to init.zarr
        Path(job.output).mkdir(parents=True)
    log = Path("results/logs/broken/a/reconstruct-coarse.log")
    log.parent.mkdir(parents=True)
    log.write_text("[coarse] iter 1/3\nptycore reconstruct: error: stage 'coarse' diverged at iteration 2\n")
    assert failed_runs(pipe, pipe.pairs()) == [
        {"dataset": "broken", "plan": "a", "step": "reconstruct-coarse", "log": str(log),
         "error": "ptycore reconstruct: error: stage 'coarse' diverged at iteration 2"},
        {"dataset": "waiting", "plan": "a", "step": "simulate", "log": "results/logs/waiting/simulate.log",
         "error": "not run (stopped before this step)"},
    ]


def test_replace_dir_swaps_in_the_new_and_drops_the_old(tmp_path):
    out, new = tmp_path / "aggregate", tmp_path / ".new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aggregate"]


def test_failed_build_leaves_the_old_aggregate_in_place(tmp_path):
    """Failure 10: the failure hook deleted results/aggregate before rebuilding it."""
    out = tmp_path / "aggregate"
    out.mkdir()
    (out / "report.html").write_text("last night's")
    with pytest.raises(Exception, match="nothing to aggregate"):
        build_aggregate([], out, failures=None, title="t")
    assert (out / "report.html").read_text() == "last night's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aggregate"]


def test_failure_hook_builds_what_completed_and_marks_it_for_rebuilding(project):
    pipe = Pipeline(config(datasets=[sim("good"), sim("broken")]), basedir=project)
    for job in pipe.jobs("good", "a")[:-1]:
        Path(job.output).mkdir(parents=True)
    make_eval("good", "a")
    old = Path("results/aggregate")
    old.mkdir()
    (old / "stale.txt").write_text("from an earlier run")
    said = []
    assert wanted_aggregates(pipe, {"dataset_good"}) == []
    assert wanted_aggregates(pipe, {"all"}) == ["aggregate"]
    assert aggregate_despite_failures(pipe, {"all"}, say=said.append) == ["aggregate"]
    assert said[0].startswith("FAILED broken / a at simulate: not run")
    failures = json.loads(Path("results/logs/aggregate-failures.json").read_text())
    assert [(f["dataset"], f["step"]) for f in failures] == [("broken", "simulate")]
    rows = sorted(Path("results/aggregate/metrics.csv").read_text().splitlines()[1:])
    assert len(rows) == 2 and rows[0].startswith("broken,a,failed,simulate") and rows[1].startswith("good,a,ok")
    assert not (old / "stale.txt").exists()
    assert sorted(p.name for p in Path("results").iterdir()) == ["aggregate", "good", "logs"]
    stamp = Path(layout.rebuild_stamp_path("aggregate"))
    assert stamp.stat().st_mtime_ns >= Path("results/aggregate").stat().st_mtime_ns
    # the next run, all well, rebuilds the aggregate (newer than the failures list): the list goes
    time.sleep(0.01)
    Path("results/aggregate/.snakemake_timestamp").write_text("")
    assert clear_stale_failures(pipe) == ["results/logs/aggregate-failures.json"]


# ---------------------------------------------------------------- the run lock
HOLDER = textwrap.dedent("""
    import sys, time
    from ptycore.pipeline.lock import hold_run_lock
    hold_run_lock(sys.argv[1])
    print("holding", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def live_run(tmp_path):
    """A process holding the run lock of tmp_path, as a pipeline run's snakemake does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "holding"
    yield proc
    proc.kill()
    proc.wait()


def test_run_lock_tells_a_live_run_from_a_dead_one(tmp_path, live_run):
    assert run_alive(tmp_path)
    with exclusive_run_lock(tmp_path) as free:
        assert not free
    live_run.kill()
    live_run.wait()  # killed: the kernel drops its lock
    assert not run_alive(tmp_path)
    with exclusive_run_lock(tmp_path) as free:
        assert free
        with open(run_lock_path(tmp_path)) as other:  # and while held, no run can take it
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)


def test_runs_share_the_lock_and_a_child_of_the_holder_skips_it(tmp_path, live_run, monkeypatch):
    assert hold_run_lock(tmp_path, wait_s=0) == run_lock_path(tmp_path)  # two runs together: fine
    monkeypatch.setenv(HELD_ENV, str(run_lock_path(tmp_path).resolve()))
    assert hold_run_lock(tmp_path, wait_s=0) is None


def test_a_manual_unlock_of_a_live_run_is_refused(tmp_path, live_run):
    with pytest.raises(RunLockBusy, match="a pipeline run is alive in .*not unlocking it"):
        check_unlock(["snakemake", "--unlock"], tmp_path)
    check_unlock(["snakemake", "-n"], tmp_path)
    live_run.kill()
    live_run.wait()
    check_unlock(["snakemake", "--unlock"], tmp_path)  # a dead run's lock is stale: clearing it is fine


# ---------------------------------------------------------------- nightly
def test_nightly_command_reads_the_working_directory_and_keeps_targets_apart():
    assert working_directory(["-n", "--directory", "/data/run"]) == Path("/data/run")
    assert working_directory(["-d", "/x"]) == Path("/x") and working_directory([]) == Path(".")
    cmd = snakemake_command("profiles/local", ["-n", "dataset_x"])
    assert cmd[1:] == ["--profile", "profiles/local", "--keep-going", "--rerun-incomplete", "--rerun-triggers=mtime",
                       "-n", "dataset_x"]
    from snakemake.cli import get_argument_parser  # the night's command parses (failure 1)

    args = get_argument_parser().parse_args(cmd[1:] + ["all"])
    assert [t.name for t in args.rerun_triggers] == ["MTIME"] and args.targets == ["dataset_x", "all"]


FAKE_SNAKEMAKE = """#!/bin/sh
echo "$@" >> "$RECORD"
"""


@pytest.fixture
def fake_snakemake(tmp_path, monkeypatch):
    """A stand-in `snakemake` on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "snakemake").write_text(FAKE_SNAKEMAKE)
    (bin_dir / "snakemake").chmod(0o755)
    record = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RECORD=str(record), PYTHONPATH=str(ROOT), PTYCORE_PROFILE="profiles/local",
               PTYCORE_NIGHTLY_LOCK=str(tmp_path / "nightly.lock"))
    return env, record


def nightly(env, *args):
    return subprocess.run([sys.executable, "-m", "ptycore.pipeline.nightly", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_nightly_clears_a_stale_lock_then_runs(tmp_path, fake_snakemake):
    env, record = fake_snakemake
    proc = nightly(env, "--directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        f"--profile profiles/local --unlock --directory {tmp_path}",
        f"--profile profiles/local --keep-going --rerun-incomplete --rerun-triggers=mtime --directory {tmp_path}",
    ]


def test_nightly_never_unlocks_a_live_run(tmp_path, fake_snakemake, live_run):
    """Failure 6: nightly.sh unlocked unconditionally, so it and a manual run deleted each other's outputs."""
    env, record = fake_snakemake
    proc = nightly(env, "--directory", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "a pipeline run is going in" in proc.stdout and "skipping tonight" in proc.stdout
    assert not record.exists(), "snakemake was called while a run is alive"


def test_nightly_skips_while_the_previous_night_runs(tmp_path, fake_snakemake):
    env, record = fake_snakemake
    with open(tmp_path / "nightly.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = nightly(env, "--directory", str(tmp_path))
    assert proc.returncode == 0 and "previous nightly run still going" in proc.stdout
    assert not record.exists()
