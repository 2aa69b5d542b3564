"""``ptycore tune``: the search space is validated before any compute; a real study on a dask
LocalCluster (2 workers) over a tiny simulated dataset prunes, records a crashing trial as
failed, resumes, and its best plan reproduces its objective and beats a deliberately poor base
plan against the truth; a killed worker and a stopped study are recovered; the RDB storage
(SQLite URL); the Slurm job script; the Snakemake ``tune`` target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _synthetic import make_synthetic, write_stores

pytest.importorskip("optuna")
pytest.importorskip("distributed")

import optuna  # noqa: E402

from ptycore.cli import main  # noqa: E402
from ptycore.physics import wavelength_A  # noqa: E402
from ptycore.plan import load_plan  # noqa: E402
from ptycore.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = "stages[main].optimize.object_phase.lr"
DEFOCUS = "init.defocus_A"
TRUE_DEFOCUS_A = 100.0  # make_synthetic's probe
GOOD_LR = 0.02


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Tiny data (6×6 scan, 32 px detector) whose metadata gives a defocus 20 % off, and a base
    plan whose object learning rate is 30× too small."""
    d = tmp_path_factory.mktemp("tune-case")
    syn = make_synthetic(n_det=32, scan=6, step_A=0.6, pixel_A=0.3)
    write_stores(syn, d / "prepared.zarr", d / "unused-init.zarr")
    group = open_store(d / "prepared.zarr", mode="r+")
    meta = dict(group.attrs["metadata"])
    meta.update(scan_step_A=[0.6, 0.6], defocus_A=0.8 * TRUE_DEFOCUS_A, thickness_A=10.0,
                detector_pixel_mrad=wavelength_A(300.0) / (32 * 0.3) * 1e3)
    group.attrs["metadata"] = meta
    plan = {"name": "poor", "seed": 0, "stages": [{
        "name": "main", "engine": "gradient", "iterations": 12, "resample": {"slices": 1}, "batch_size": 8,
        "validation_fraction": 0.15, "optimize": {"object_phase": {"optimizer": "adam", "lr": GOOD_LR / 30}},
        "losses": {"single": 1.0}}]}
    (d / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (d / "init.yaml").write_text("probe: aperture\nmargin_px: 4\n")
    return {"dir": d, "syn": syn, "prepared": d / "prepared.zarr", "plan": d / "plan.yaml", "init": d / "init.yaml"}


def write_space(case, path: Path, **changes) -> Path:
    space = {
        "plan": str(case["plan"]), "init": str(case["init"]), "data": [{"prepared": str(case["prepared"])}],
        "trials": 8, "report_every": 3, "seed": 3,
        "pruner": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 6},
        "sampler": {"kind": "tpe", "n_startup_trials": 3},
        "parameters": {LR: {"low": 2e-3, "high": 0.1, "log": True}, DEFOCUS: {"low": 70.0, "high": 130.0}},
        # two good points (run together, before any trial completed: never pruned); a crash (a
        # defocus that overflows the probe's aberration phase: the reconstruction diverges at
        # once); then a point far worse than the good ones at every iteration, which starts only
        # once a worker is free, i.e. after the good ones (nearly) completed. Enqueued points may
        # lie outside the ranges.
        "enqueue": [{LR: GOOD_LR, DEFOCUS: 95.0}, {LR: 0.05, DEFOCUS: 105.0}, {LR: GOOD_LR, DEFOCUS: 1e39},
                    {LR: 1e-4, DEFOCUS: 75.0}],
        "cluster": {"kind": "local", "workers": 2},
    }
    space.update(changes)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def load(out: Path) -> optuna.Study:
    """The study of a study folder (journal storage), read as a user would."""
    from ptycore.tune.trial import make_storage

    name = json.loads((out / "space.json").read_text())["name"]
    return optuna.load_study(study_name=name, storage=make_storage(str(out / "study.journal")))


# ---------------------------------------------------------------- the search space
BAD_SPACES = [
    ({"parameters": {"stages[main].optimize.nope.lr": {"low": 1e-3, "high": 1e-1}}},
     ["stages[main].optimize.nope.lr", "the base plan has no 'nope' here"]),
    ({"parameters": {LR: {"low": 0.1, "high": 0.01}}}, ["parameters", "must be > low"]),
    ({"parameters": {LR: {"low": 0.0, "high": 0.1, "log": True}}}, ["log range needs low > 0"]),
    ({"parameters": {"stages[other].iterations": {"low": 2, "high": 4}}}, ["no element named 'other'"]),
    ({"parameters": {"init.defocus": {"low": 1.0, "high": 2.0}}}, ["no init field 'defocus'"]),
    ({"parameters": {"init.slices": {"low": 0, "high": 3}}}, ["init.slices", "must be >= 1"]),
    ({"fixed": {"stages[main].validation_fraction": 0.0}}, ["validation_fraction > 0", "'main'"]),
    ({"enqueue": [{"stages[main].batch_size": 4}]}, ["enqueue[0]", "not one of the parameters"]),
    ({"objectve": "validation"}, ["objectve", "unknown key"]),
    ({"plan": "no-such-plan"}, ["no-such-plan", "not found"]),
    # lr: .nan, wherever it comes from
    ({"fixed": {LR: float("nan")}, "parameters": {DEFOCUS: {"low": 70.0, "high": 130.0}}},
     ["fixed", "lr", "is not a number (NaN)"]),
    ({"parameters": {LR: {"choices": [0.01, float("nan")]}}}, [LR, "= nan", "is not a number (NaN)"]),
    ({"parameters": {LR: {"low": float("nan"), "high": 0.1}}}, ["parameters", "lr.low", "is not a number (NaN)"]),
    ({"enqueue": [{LR: float("nan"), DEFOCUS: 100.0}]}, ["enqueue[0]", "lr", "is not a number (NaN)"]),
    ({"parameters": {"init.convergence_mrad": {"low": 10.0, "high": 250.0}}},
     ["'init.convergence_mrad' = 250.0", "convergence_mrad", "200"]),
]


@pytest.mark.parametrize("change,expect", BAD_SPACES, ids=[e[0] for _, e in BAD_SPACES])
def test_a_bad_space_is_refused_in_one_line_before_any_compute(case, tmp_path, capsys, change, expect):
    if "parameters" in change:
        change = {**change, "enqueue": []}
    space = write_space(case, tmp_path / "space.yaml", **change)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["tune", "--space", str(space), "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1, lines
    assert lines[0].startswith("ptycore tune: error: "), lines[0]
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert not out.exists()


def test_missing_data_is_refused(case, tmp_path, capsys):
    space = write_space(case, tmp_path / "space.yaml")
    rc = main(["tune", "--space", str(space), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "nope.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "nope.zarr" in err and "not found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the convergence angle, an init parameter
def _power_beyond(probe: np.ndarray, pixel_A: float, mrad: float) -> float:
    """Fraction of the probe's power (all modes) at angles > ``mrad`` in its Fourier plane."""
    from ptycore.physics import Grid
    from ptycore.physics.probe import angular_coordinates

    alpha, _ = angular_coordinates(Grid(probe.shape[-2:], pixel_A), wavelength_A(300.0))
    power = np.abs(np.fft.fft2(np.fft.ifftshift(probe, axes=(-2, -1)))) ** 2
    return float(power[..., np.asarray(alpha) > mrad * 1e-3].sum() / power.sum())


def test_init_convergence_mrad_sets_the_probe_and_the_reconstructions_aperture(case, tmp_path):
    """The data's metadata says 21.4 mrad; an init config with ``convergence_mrad: 15`` builds a
    15 mrad probe, and the reconstruction's probe-aperture constraint cuts at 15 mrad too (from
    the init store, not the data), also in a second stage started from that result."""
    from ptycore.data.initialize import initialize
    from ptycore.recon.reconstruct import reconstruct

    pixel_A = float(open_store(case["prepared"]).attrs["pixel_size_A"])
    (tmp_path / "narrow.yaml").write_text("probe: aperture\nmargin_px: 4\nconvergence_mrad: 15.0\n")
    initialize(case["prepared"], tmp_path / "narrow.yaml", tmp_path / "narrow-init.zarr")
    initialize(case["prepared"], case["init"], tmp_path / "data-init.zarr")
    narrow, data = open_store(tmp_path / "narrow-init.zarr"), open_store(tmp_path / "data-init.zarr")
    assert narrow.attrs["convergence_mrad"] == 15.0 and "convergence_mrad" not in data.attrs
    assert narrow.attrs["init"]["convergence_mrad"] == 15.0 and data.attrs["init"]["convergence_mrad"] is None
    # the probes: 15 mrad (one detector pixel, 2 mrad, of soft edge) against the data's 21.4 mrad
    assert _power_beyond(np.asarray(narrow["probe"][...]), pixel_A, 17.0) < 1e-4
    assert _power_beyond(np.asarray(data["probe"][...]), pixel_A, 17.0) > 0.2

    plan = yaml.safe_load(case["plan"].read_text())
    stage = plan["stages"][0]
    stage.update(iterations=6, validation_fraction=0.0, constraints={"probe_aperture": {"scale": 1.0}})
    stage["optimize"] = {"object_phase": {"optimizer": "adam", "lr": GOOD_LR},
                         "probe": {"optimizer": "adam", "lr": 0.05}}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    results = {}
    for name in ("narrow", "data"):
        results[name] = tmp_path / f"{name}.zarr"
        reconstruct(plan_path=tmp_path / "plan.yaml", data_path=case["prepared"],
                    init_path=tmp_path / f"{name}-init.zarr", out_path=results[name], progress=False)
    narrow_probe = np.asarray(open_store(results["narrow"])["probe"][...])
    data_probe = np.asarray(open_store(results["data"])["probe"][...])
    assert _power_beyond(narrow_probe, pixel_A, 15.0) < 1e-6  # the constraint cut at 15 mrad
    assert _power_beyond(data_probe, pixel_A, 15.0) > 0.2  # from the data's init: cut at 21.4
    assert open_store(results["narrow"]).attrs["convergence_mrad"] == 15.0
    assert "convergence_mrad" not in open_store(results["data"]).attrs
    # the next stage, from the result: still 15 mrad
    reconstruct(plan_path=tmp_path / "plan.yaml", data_path=case["prepared"], init_path=results["narrow"],
                out_path=tmp_path / "next.zarr", progress=False)
    assert open_store(tmp_path / "next.zarr").attrs["convergence_mrad"] == 15.0
    assert _power_beyond(np.asarray(open_store(tmp_path / "next.zarr")["probe"][...]), pixel_A, 15.0) < 1e-6


def test_convergence_outside_the_detector_is_refused_by_init(case, tmp_path, capsys):
    (tmp_path / "wide.yaml").write_text("convergence_mrad: 40.0\n")  # the detector's edge: 32.8 mrad
    rc = main(["init", "--data", str(case["prepared"]), "--config", str(tmp_path / "wide.yaml"),
               "--out", str(tmp_path / "init.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "wide.yaml: convergence_mrad: 40 mrad lies outside the detector" in err
    assert not (tmp_path / "init.zarr").exists()


def test_a_space_can_tune_the_convergence_angle(case, tmp_path):
    from ptycore.tune.execute import prepare

    space = write_space(case, tmp_path / "conv.yaml", enqueue=[],
                        parameters={LR: {"low": 2e-3, "high": 0.1, "log": True},
                                    "init.convergence_mrad": {"low": 17.0, "high": 26.0}})
    setup = prepare(space, tmp_path / "out")
    assert setup.space.init_parameters()["convergence_mrad"].bounds() == [17.0, 26.0]


# ---------------------------------------------------------------- a real study
@pytest.fixture(scope="module")
def study_run(case, tmp_path_factory):
    base = tmp_path_factory.mktemp("tune-study")
    space = write_space(case, base / "tiny.yaml")
    out = base / "out"
    proc = subprocess.run([sys.executable, "-m", "ptycore.cli", "tune", "--space", str(space), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"space": space, "out": out, "proc": proc}


def test_study_runs_trials_in_parallel_prunes_and_records_a_crash(study_run):
    out = study_run["out"]
    study = load(out)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 8
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1  # the far worse point at least
    assert trials[3].state == optuna.trial.TrialState.PRUNED, trials[3].intermediate_values
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [2]
    error = failed[0].user_attrs["error"]
    assert error and "\n" not in error
    assert f"trial 2 failed: {error}" in study_run["proc"].stderr
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2
    # two workers, and their trials overlapped in time
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    # seeds recorded: each trial's sampler seed and its plan's seed
    assert sorted(t.user_attrs["sampler_seed"] for t in trials) == list(range(3, 11))
    assert {t.user_attrs["plan_seed"] for t in trials} == {0}


def test_study_outputs(study_run):
    out = study_run["out"]
    rows = (out / "study.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("trial", "state", "objective", "seconds", "worker", LR, DEFOCUS, "error"):
        assert column in header
    assert len(rows) == 9
    table = open_store(out / "study.zarr")
    assert table["objective"].shape == (8,) and list(table["state"][...]).count("fail") == 1
    complete = [t for t in load(out).get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    figures = ["history.png", "intermediate.png", "parallel_coordinate.png"]
    figures += ["importances.png"] if len(complete) >= 3 else []
    for name in figures:
        assert (out / "figures" / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "Best trial" in html and "data:image/png;base64" in html
    for t in load(out).get_trials():
        folder = out / "trials" / f"{t.number:04d}"
        assert (folder / "plan.yaml").is_file() and (folder / "init.yaml").is_file()
        assert (folder / "result-0.zarr").is_dir() == (t.state == optuna.trial.TrialState.COMPLETE)
        assert not list(folder.glob("*.partial"))


def _final_validation(result: Path) -> float:
    return float(np.asarray(open_store(result)["history/validation"][...])[-1])


def _ssim(case, result: Path) -> float:
    """Phase SSIM against the truth over the scanned area, each cropped by its own positions."""
    from skimage.metrics import structural_similarity

    group = open_store(result)
    phase = np.asarray(group["object_phase"][...]).sum(axis=(0, 1))
    pos = np.asarray(group["positions_A"][...])
    syn = case["syn"]

    def crop(image, positions):
        lo = np.ceil(positions.min(0) / syn.pixel_size_A).astype(int)
        hi = np.floor(positions.max(0) / syn.pixel_size_A).astype(int)
        return image[lo[0]:hi[0], lo[1]:hi[1]]

    a, b = crop(phase, pos), crop(syn.truth_phase, syn.positions_A)
    a = a - a.mean() + b.mean()
    return structural_similarity(a, b, data_range=float(b.max() - b.min()))


def test_best_plan_reproduces_its_objective_and_beats_the_poor_base_plan(case, study_run, tmp_path):
    from ptycore.data.initialize import initialize
    from ptycore.recon.reconstruct import reconstruct

    out = study_run["out"]
    best = load(out).best_trial
    plan = load_plan(out / "best" / "plan.yaml")
    assert plan.stages[0].optimize["object_phase"].lr.value == pytest.approx(best.params[LR])
    init_cfg = yaml.safe_load((out / "best" / "init.yaml").read_text())
    assert init_cfg["defocus_A"] == pytest.approx(best.params[DEFOCUS])
    # rerun the best plan from its own init config, by hand
    initialize(case["prepared"], out / "best" / "init.yaml", tmp_path / "init.zarr")
    reconstruct(plan_path=out / "best" / "plan.yaml", data_path=case["prepared"], init_path=tmp_path / "init.zarr",
                out_path=tmp_path / "best.zarr", progress=False)
    assert _final_validation(tmp_path / "best.zarr") == pytest.approx(best.value, rel=1e-5)
    # the base plan from the base init config (lr 30x too small, defocus 20 % off)
    initialize(case["prepared"], case["init"], tmp_path / "base-init.zarr")
    reconstruct(plan_path=case["plan"], data_path=case["prepared"], init_path=tmp_path / "base-init.zarr",
                out_path=tmp_path / "base.zarr", progress=False)
    base_value = _final_validation(tmp_path / "base.zarr")
    assert best.value < 0.8 * base_value
    ssim_best, ssim_base = _ssim(case, tmp_path / "best.zarr"), _ssim(case, tmp_path / "base.zarr")
    assert ssim_best > ssim_base + 0.2, (ssim_best, ssim_base)


def test_rerun_continues_the_study(study_run):
    out = study_run["out"]
    before = {t.number: (t.state, t.value, t.params) for t in load(out).get_trials()}
    proc = subprocess.run([sys.executable, "-m", "ptycore.cli", "tune", "--space", str(study_run["space"]),
                           "--out", str(out), "--trials", "10", "--quiet"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = load(out).get_trials()
    assert len(after) == 10
    assert {t.number: (t.state, t.value, t.params) for t in after[:8]} == before
    assert "10 trials" in proc.stdout and len((out / "study.csv").read_text().splitlines()) == 11


def test_a_changed_space_is_not_resumed(study_run, tmp_path, capsys, case):
    space = write_space(case, tmp_path / "tiny.yaml", parameters={LR: {"low": 1e-3, "high": 0.2, "log": True},
                                                                 DEFOCUS: {"low": 70.0, "high": 130.0}})
    rc = main(["tune", "--space", str(space), "--out", str(study_run["out"])])
    err = capsys.readouterr().err
    assert rc != 0 and "different search space" in err and "parameters" in err


# ---------------------------------------------------------------- lost workers, interruptions
def _wait_for(predicate, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def _running_with_reports(out: Path):
    if not (out / "space.json").exists() or not (out / "study.journal").exists():
        return None
    try:
        study = load(out)
    except KeyError:  # the journal is there, the study's record not yet
        return None
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        if t.intermediate_values and "pid" in t.user_attrs:
            return t
    return None


def _slow_space(case, path: Path, trials: int, workers: int) -> Path:
    """Trials of 200 iterations (several seconds each), no pruning, no crash points."""
    return write_space(case, path, trials=trials, enqueue=[], pruner={"kind": "none"}, report_every=5,
                       fixed={"stages[main].iterations": 200}, cluster={"kind": "local", "workers": workers},
                       parameters={LR: {"low": 2e-3, "high": 0.1, "log": True}})


def test_a_killed_worker_fails_its_trial_which_is_rerun(case, tmp_path):
    space, out = _slow_space(case, tmp_path / "kill.yaml", trials=3, workers=2), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ptycore.cli", "tune", "--space", str(space), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        victim = _wait_for(lambda: _running_with_reports(out))
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    trials = {t.number: t for t in load(out).get_trials()}
    lost = trials[victim.number]
    assert lost.state == optuna.trial.TrialState.FAIL and lost.user_attrs["lost"] is True
    assert lost.user_attrs["error"].startswith("worker lost"), lost.user_attrs["error"]
    retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].params == lost.params
    assert retry[0].state == optuna.trial.TrialState.COMPLETE
    finished = [t for t in trials.values() if t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == 3


def test_a_stopped_study_restarts_with_its_earlier_trials(case, tmp_path):
    space, out = _slow_space(case, tmp_path / "stop.yaml", trials=3, workers=1), tmp_path / "out"
    cmd = [sys.executable, "-m", "ptycore.cli", "tune", "--space", str(space), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        def second_running():
            t = _running_with_reports(out)
            return t if t is not None and t.number == 1 else None

        _wait_for(second_running)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    first = {t.number: t for t in load(out).get_trials()}
    assert first[0].state == optuna.trial.TrialState.COMPLETE
    assert not (out / ".tune.lock").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = {t.number: t for t in load(out).get_trials()}
    assert trials[0].value == first[0].value and trials[0].params == first[0].params
    assert trials[1].state == optuna.trial.TrialState.FAIL and "interrupted" in trials[1].user_attrs["error"]
    assert any(t.user_attrs.get("retry_of") == 1 for t in trials.values())
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values()) == 3


# ---------------------------------------------------------------- RDB storage, Slurm, Snakemake
def test_rdb_storage_with_a_sqlite_url(case, tmp_path):
    from ptycore.tune.execute import prepare, run_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = _slow_space(case, tmp_path / "rdb.yaml", trials=2, workers=1)
    setup = prepare(space, tmp_path / "out", storage=url)
    summary = run_study(setup, progress=False)
    assert summary["complete"] == 2
    from ptycore.tune.trial import make_storage

    storage = make_storage(url)
    assert storage.heartbeat_interval == 60  # trials killed without a goodbye are failed and retried
    study = optuna.load_study(study_name="rdb", storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2
    assert not (tmp_path / "out" / "study.journal").exists()


def test_slurm_job_script_asks_for_a_gpu_and_the_walltime(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    from ptycore.tune.execute import slurm_options
    from ptycore.tune.space import Slurm

    s = Slurm(partition="gpu", account="proj", walltime="01:30:00", cores=8, memory="32GB", gpus=1,
              lifetime_margin_minutes=12, job_extra_directives=["--qos=normal"])
    with SLURMCluster(**slurm_options(s, tmp_path), scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH -t 01:30:00", "#SBATCH -p gpu", "#SBATCH -A proj",
                 "#SBATCH --qos=normal", "#SBATCH --cpus-per-task=8"):
        assert line in script, (line, script)
    assert "--lifetime 78m --lifetime-stagger 4m" in script  # 90 min walltime - 12 min margin
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in script


def _slurm_answers() -> bool:
    import shutil

    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


#: CI's one-node Slurm (.ci/local_slurm.sh): account ci, partition debug; 2 one-core jobs at most
CI_SLURM = {"partition": "debug", "account": "ci", "walltime": "00:20:00", "cores": 1, "memory": "2GB", "gpus": 0,
            "minimum_jobs": 0, "maximum_jobs": 2, "lifetime_margin_minutes": 3}


@pytest.mark.slurm
def test_the_study_through_a_slurm_cluster(case, tmp_path):
    """The tiny study (8 trials, 2 parameters) with its workers as Slurm jobs of a dask-jobqueue
    SLURMCluster on CI's single-node Slurm (start it with: bash .ci/local_slurm.sh). The jobs
    find the project's Python because the worker command is this interpreter (``python`` of the
    cluster config: ``sys.executable``) and PYTHONPATH is exported in the job script."""
    if not _slurm_answers():
        pytest.skip("no Slurm cluster answers (start one with: bash .ci/local_slurm.sh)")
    pytest.importorskip("dask_jobqueue")
    space = write_space(case, tmp_path / "slurm.yaml", cluster={"kind": "slurm", "slurm": CI_SLURM})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ptycore.cli", "tune", "--space", str(space), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = load(out).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 8
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [2]  # the crash point
    assert trials[3].state == optuna.trial.TrialState.PRUNED, trials[3].intermediate_values
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2
    # every trial ran in one of the 2 Slurm jobs (the 2 workers the cluster scaled to), of the
    # account and partition asked for, and their trials overlapped in time
    jobs = {t.user_attrs.get("slurm_job_id") for t in trials}
    assert None not in jobs and len(jobs) == 2, jobs
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(jobs)), "-o", "JobID,Partition,Account"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    rows = {r.split("|")[0]: r.split("|") for r in sacct.splitlines() if r}
    assert set(rows) == jobs, (rows, jobs)
    assert {r[1] for r in rows.values()} == {"debug"} and {r[2] for r in rows.values()} == {"ci"}
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert sorted((out / "logs" / "slurm").glob("dask-worker-*.err"))  # the jobs' logs in the study folder
    # the study folder is the same as on a LocalCluster: table, best plan (ready to run), report
    assert len((out / "study.csv").read_text().splitlines()) == 9
    assert "slurm_job_id" in (out / "study.csv").read_text().splitlines()[0].split(",")
    best = load(out).best_trial
    assert load_plan(out / "best" / "plan.yaml").stages[0].optimize["object_phase"].lr.value == pytest.approx(
        best.params[LR])
    assert "Best trial" in (out / "report.html").read_text()


@pytest.mark.slurm
def test_slurm_workers_on_the_gpu_partition_get_one_gpu_each(case, tmp_path):
    """Workers as jobs on the gpu partition with --gres=gpu:1 (CI's node has one fake GPU, so one
    worker): Slurm allocates the GPU to the job, and JAX, left to choose its platform (as on a
    real cluster), falls back to the CPU there without failing the trials."""
    if not _slurm_answers():
        pytest.skip("no Slurm cluster answers (start one with: bash .ci/local_slurm.sh)")
    pytest.importorskip("dask_jobqueue")
    slurm = {**CI_SLURM, "partition": "gpu", "gpus": 1, "maximum_jobs": 1}
    space = _slow_space(case, tmp_path / "gpu.yaml", trials=2, workers=1)
    space.write_text(yaml.safe_dump({**yaml.safe_load(space.read_text()), "fixed": {"stages[main].iterations": 6},
                                     "cluster": {"kind": "slurm", "slurm": slurm}}))
    out = tmp_path / "out"
    env = {k: v for k, v in _env().items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-m", "ptycore.cli", "tune", "--space", str(space), "--out", str(out),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = load(out).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    jobs = {t.user_attrs["slurm_job_id"] for t in trials}
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(jobs)), "-o", "JobID,Partition"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [r.split("|") for r in sacct.splitlines() if r]
    assert {r[0] for r in rows} == jobs and all(r[1] == "gpu" for r in rows), rows
    assert [t.user_attrs.get("cuda_visible_devices") for t in trials] == ["0", "0"]  # the node's one (fake) GPU
    for t in trials:
        prov = open_store(out / "trials" / f"{t.number:04d}" / "result-0.zarr").attrs["provenance"]
        assert prov["platform"] == "cpu"


def test_snakemake_tune_target(case, tmp_path):
    """`snakemake tune` runs each space in config tune on the workflow's datasets (dry run: the
    chain from the dataset to results/tune/NAME)."""
    from test_workflow import TEST_CONFIG, job_counts, snakemake, write_config

    space = {"plan": "config/test/plans/tiny-single.yaml", "datasets": ["tiny"], "trials": 2,
             "fixed": {"stages[*].validation_fraction": 0.1},
             "parameters": {"stages[0].batch_size": {"choices": [8, 16]}}}
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump(space))
    config = write_config(tmp_path / "config.yaml", TEST_CONFIG, tune=[str(tmp_path / "lr.yaml")])
    proc = snakemake(tmp_path, "-n", "-p", "tune", configfile=config)
    assert proc.returncode == 0, proc.output
    counts = job_counts(proc.output)
    assert counts.get("tune_study") == 1 and counts.get("preprocess") == 1 and "reconstruct" not in counts, counts
    assert "ptycore tune --space" in proc.output and "results/tune/lr" in proc.output


@pytest.mark.slow
def test_snakemake_tune_target_runs(tmp_path):
    """The real chain on the workflow's tiny simulated dataset: simulate → ingest → preprocess → tune."""
    from test_workflow import TEST_CONFIG, snakemake, write_config

    space = {"plan": "config/test/plans/tiny-single.yaml", "datasets": ["tiny"], "trials": 2,
             "fixed": {"stages[*].validation_fraction": 0.1}, "cluster": {"workers": 1},
             "parameters": {"stages[0].optimize.object_phase.lr": {"low": 0.005, "high": 0.05, "log": True}}}
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump(space))
    config = write_config(tmp_path / "config.yaml", TEST_CONFIG, tune=[str(tmp_path / "lr.yaml")])
    proc = snakemake(tmp_path, "--cores", "2", "tune", configfile=config)
    assert proc.returncode == 0, proc.output
    out = tmp_path / "results" / "tune" / "lr"
    assert load_plan(out / "best" / "plan.yaml").stages[0].validation_fraction == 0.1
    assert len((out / "study.csv").read_text().splitlines()) == 3


SHIPPED = sorted((ROOT / "config" / "tune").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_spaces_validate_against_their_plans(path):
    from ptycore.tune.space import base_plan_path, check_space, load_space, read_yaml_mapping

    space = load_space(path)
    base_init = read_yaml_mapping(ROOT / space.init, "init") if space.init else {}
    check_space(space, str(path), read_yaml_mapping(base_plan_path(space, ROOT), "plan"), base_init)
    assert space.datasets and len(space.parameters) >= 2
