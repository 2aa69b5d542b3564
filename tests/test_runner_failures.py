"""What a night batch must survive in `reconstruct` (issue 14, failures 2, 3, 8 and 9): a finite
divergence, a resume with other inputs, an unreadable checkpoint, a full disk while writing one,
SIGTERM (Slurm at walltime or preemption), and --resume with no checkpoint or a finished output."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
import zarr
from _ptydata import sha256
from _synthetic import make_synthetic, write_stores

from ptycore.cli import main
from ptycore.plan import parse_plan
from ptycore.recon.runner import StopSignals, divergence, run_stage

STATE_ARRAYS = ("object_phase", "object_amplitude", "probe", "positions_A")


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, synthetic):
    """Data and init of one dataset, and of another with the same geometry (other noise; other
    initial positions)."""
    d = tmp_path_factory.mktemp("stores")
    write_stores(synthetic, d / "prepared.zarr", d / "init.zarr")
    write_stores(make_synthetic(seed=1), d / "other-prepared.zarr", d / "other-init.zarr",
                 positions_A=synthetic.positions_A + 0.05)
    plan = {"name": "t", "seed": 3, "stages": [{
        "name": "main", "iterations": 200, "batch_size": 16, "checkpoint_every": 3,
        "optimize": {"object_phase": {"lr": 0.02}, "probe": {"lr": 0.01, "start": 2}},
        "losses": {"single": 1.0, "sparse": 0.05}, "constraints": {"probe_orthogonalize": {}}}]}
    (d / "plan.yaml").write_text(yaml.safe_dump(plan))
    return d


def _args(d, data="prepared.zarr", init="init.zarr", plan="plan.yaml"):
    return ["--plan", str(d / plan), "--data", str(d / data), "--init", str(d / init)]


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("ptycore reconstruct: error:")]


@pytest.fixture(scope="module")
def full_run(stores):
    out = stores / "full.zarr"
    assert main(["reconstruct", *_args(stores), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(stores):
    """A real `ptycore reconstruct` process sent SIGTERM once its first checkpoint exists."""
    out = stores / "interrupted.zarr"
    ckpt = stores / "interrupted.zarr.partial" / "checkpoints" / "main.npz"
    proc = subprocess.Popen([sys.executable, "-m", "ptycore.cli", "reconstruct", *_args(stores), "--out", str(out),
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, out


def _copy_partial(interrupted, tmp_path, name="resumed.zarr"):
    src = interrupted[2].with_name(interrupted[2].name + ".partial")
    out = tmp_path / name
    shutil.copytree(src, tmp_path / (name + ".partial"))
    return out, tmp_path / (name + ".partial") / "checkpoints" / "main.npz"


# ---------------------------------------------------------------- failure 9: SIGTERM
def test_sigterm_writes_checkpoint_and_exits_with_one_line(interrupted):
    rc, err, out = interrupted
    assert rc == 128 + signal.SIGTERM, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    m = re.search(r"interrupted by SIGTERM after iteration (\d+) of stage 'main' \((\d+)/200 done\); "
                  r"checkpoint written to (\S+); rerun with --resume", lines[0])
    assert m, lines[0]
    it = int(m.group(1))
    assert 2 <= it < 199 and int(m.group(2)) == it + 1
    assert not out.exists()
    with np.load(m.group(3)) as f:  # the checkpoint holds the iteration it stopped after
        assert json.loads(str(f["meta"]))["iteration"] == it


def test_resume_after_sigterm_gives_the_uninterrupted_arrays(interrupted, stores, full_run, tmp_path):
    out, _ = _copy_partial(interrupted, tmp_path)
    stopped_after = int(re.search(r"after iteration (\d+)", interrupted[1]).group(1))
    assert main(["reconstruct", *_args(stores), "--out", str(out), "--resume", "--quiet"]) == 0
    resumed, full = zarr.open_group(str(out)), zarr.open_group(str(full_run))
    assert resumed.attrs["provenance"]["stage_timings"]["main"]["resumed_from"] == stopped_after + 1
    for name in STATE_ARRAYS:
        np.testing.assert_array_equal(resumed[name][...], full[name][...], err_msg=name)
    np.testing.assert_array_equal(resumed["history/single"][...], full["history/single"][...])
    assert not out.with_name(out.name + ".partial").exists()


def test_stop_signals_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread before kill returns
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---------------------------------------------------------------- failure 3: resume with other inputs
@pytest.mark.parametrize(("role", "other"), [("data", {"data": "other-prepared.zarr"}),
                                              ("init", {"init": "other-init.zarr"})])
def test_resume_refuses_a_checkpoint_of_other_inputs(interrupted, stores, tmp_path, capsys, role, other):
    out, ckpt = _copy_partial(interrupted, tmp_path)
    before = sha256(ckpt)
    capsys.readouterr()
    rc = main(["reconstruct", *_args(stores, **other), "--out", str(out), "--resume", "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1, lines
    assert f"{ckpt}: checkpoint was made from --{role} " in lines[0] and "remove it or run without --resume" in lines[0]
    assert sha256(ckpt) == before and not out.exists()


def test_resume_refuses_a_checkpoint_of_another_plan(interrupted, stores, tmp_path, capsys):
    out, ckpt = _copy_partial(interrupted, tmp_path)
    plan = yaml.safe_load((stores / "plan.yaml").read_text())
    plan["stages"][0]["optimize"]["object_phase"]["lr"] = 0.03
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    rc = main(["reconstruct", "--plan", str(tmp_path / "plan.yaml"), "--data", str(stores / "prepared.zarr"),
               "--init", str(stores / "init.zarr"), "--out", str(out), "--resume", "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "checkpoint belongs to a different plan" in lines[0], lines


# ---------------------------------------------------------------- failure 8: unreadable checkpoint, full disk
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_checkpoint_is_one_line(interrupted, stores, tmp_path, capsys, damage):
    out, ckpt = _copy_partial(interrupted, tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    capsys.readouterr()
    rc = main(["reconstruct", *_args(stores), "--out", str(out), "--resume", "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"ptycore reconstruct: error: {ckpt}: checkpoint is ") and \
        "run without --resume" in lines[0], lines[0]  # unreadable (or damaged, when checked before the run)
    assert not out.exists()


def test_full_disk_while_checkpointing_leaves_no_temporary_file(synthetic, tmp_path, monkeypatch):
    stage = parse_plan({"stages": [{"name": "main", "iterations": 9, "batch_size": 16, "checkpoint_every": 3,
                                    "optimize": {"object_phase": {"lr": 0.02}}}]}).stages[0]
    real_savez, calls = np.savez, []

    def savez_then_disk_full(file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 1:
            return real_savez(file, *args, **kwargs)
        with open(file, "wb") as f:  # a part is written, then the disk is full
            f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(np, "savez", savez_then_disk_full)
    with pytest.raises(OSError) as err:
        run_stage(stage, 0, synthetic.flat_state(), synthetic.measurement, seed=0, plan_hash="h",
                  workdir=tmp_path, progress=False)
    assert err.value.errno == errno.ENOSPC and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["main.npz"]  # no *.tmp.npz
    with np.load(tmp_path / "checkpoints" / "main.npz") as f:  # the earlier checkpoint, intact
        assert json.loads(str(f["meta"]))["iteration"] == 2


# ---------------------------------------------------------------- --resume with nothing or everything done
def test_resume_with_no_checkpoint_starts_from_scratch(stores, full_run, tmp_path):
    out = tmp_path / "fresh.zarr"
    assert main(["reconstruct", *_args(stores), "--out", str(out), "--resume", "--quiet"]) == 0
    g = zarr.open_group(str(out))
    assert g.attrs["provenance"]["stage_timings"]["main"]["resumed_from"] is None
    np.testing.assert_array_equal(g["object_phase"][...], zarr.open_group(str(full_run))["object_phase"][...])


def test_resume_when_the_result_exists(stores, full_run, capsys):
    before = sha256(full_run)
    capsys.readouterr()
    assert main(["reconstruct", *_args(stores), "--out", str(full_run), "--resume", "--quiet"]) == 0
    assert "already complete" in capsys.readouterr().out
    rc = main(["reconstruct", *_args(stores, data="other-prepared.zarr"), "--out", str(full_run), "--resume"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "was not made by this plan from these inputs" in lines[0], lines
    assert sha256(full_run) == before


# ---------------------------------------------------------------- failure 2: a finite divergence
def _wild_plan(path, lr):
    path.write_text(yaml.safe_dump({"stages": [{
        "name": "wild", "iterations": 30, "batch_size": 16, "checkpoint_every": 2,
        "optimize": {"object_phase": {"lr": lr}, "object_amplitude": {"lr": lr}, "probe": {"lr": lr}},
        "losses": {"single": 1.0}}]}))
    return path


def test_lr_1e6_diverges_with_one_line_and_no_result(stores, tmp_path, capsys):
    plan = _wild_plan(tmp_path / "plan.yaml", 1e6)
    out = tmp_path / "r.zarr"
    capsys.readouterr()
    rc = main(["reconstruct", *_args(stores), "--plan", str(plan), "--out", str(out), "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 3 and len(lines) == 1, lines
    assert "stage 'wild' diverged at iteration 0" in lines[0] and "lower the learning rates" in lines[0]
    assert not out.exists()


def test_divergence_after_good_iterations_keeps_the_last_good_checkpoint(stores, tmp_path, capsys):
    # good for 7 iterations (checkpoints after iterations 1, 3, 5), then lr 1e6
    plan = _wild_plan(tmp_path / "plan.yaml", {"schedule": "step", "start": 0.01, "end": 1e6, "at_iter": 7})
    out = tmp_path / "r.zarr"
    capsys.readouterr()
    rc = main(["reconstruct", *_args(stores), "--plan", str(plan), "--out", str(out), "--quiet"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 3 and len(lines) == 1, lines
    assert "stage 'wild' diverged at iteration 7" in lines[0], lines[0]
    ckpt = out.with_name(out.name + ".partial") / "checkpoints" / "wild.npz"
    assert f"last good checkpoint: iteration 5 in {ckpt}" in lines[0], lines[0]
    with np.load(ckpt) as f:  # the bad carry did not overwrite it
        meta = json.loads(str(f["meta"]))
        assert all(np.all(np.isfinite(f[k])) for k in f.files if k != "meta")
    assert meta["iteration"] == 5
    assert len(meta["history"]["single"]) == 6 and max(meta["history"]["single"]) < 1
    assert not out.exists()


def test_divergence_criteria(synthetic):
    state = synthetic.flat_state()
    counts = synthetic.measurement.mean_counts
    history = {"single": [0.065, 0.05, 0.04]}
    assert divergence({"single": 0.041}, history, state, counts) is None
    assert "over 1000× its best 0.04" in divergence({"single": 3.7e11}, history, state, counts)
    assert "not finite" in divergence({"single": float("nan")}, history, state, counts)
    # a fit of noise-free data to 1e-7 that rises back to 1e-4, still below its start: not diverged
    assert divergence({"poisson": 1e-4}, {"poisson": [0.03, 1e-7]}, state, counts) is None
    wild = state._replace(object_phase=state.object_phase.at[0, 0, 3, 3].set(-7e7))
    assert "object phase reaches 7e+07 rad" in divergence({"single": 0.04}, history, wild, counts)
    bright = state._replace(probe=state.probe * 1e4)  # 1e8 × the power
    assert "probe power" in divergence({"single": 0.04}, history, bright, counts)
    nan_position = state._replace(positions_A=state.positions_A.at[0, 0].set(np.nan))
    assert "state" in divergence({"single": 0.04}, history, nan_position, counts)


def test_restart_stale_discards_a_checkpoint_of_another_plan(tmp_path, capsys):
    """--resume refuses a checkpoint of another plan; with --restart-stale (the workflow's retries)
    it is removed with a warning and the stage starts from iteration 0."""
    from _synthetic import make_synthetic

    from ptycore.errors import InvalidData
    from ptycore.plan import parse_plan
    from ptycore.recon.runner import run_stage

    syn = make_synthetic(n_det=32, scan=6)
    stage = parse_plan({"stages": [{"name": "s", "iterations": 3, "batch_size": 12, "checkpoint_every": 1,
                                    "optimize": {"object_phase": {"lr": 0.02}}}]}).stages[0]
    common = dict(seed=0, workdir=tmp_path, progress=False)
    run_stage(stage, 0, syn.flat_state(), syn.measurement, plan_hash="old", **common)
    assert (tmp_path / "checkpoints" / "s.npz").exists()
    with pytest.raises(InvalidData, match="belongs to a different plan"):
        run_stage(stage, 0, syn.flat_state(), syn.measurement, plan_hash="new", resume=True, **common)
    _, record = run_stage(stage, 0, syn.flat_state(), syn.measurement, plan_hash="new", resume=True,
                          restart_stale=True, **common)
    assert record.resumed_from is None and len(record.history["single"]) == 3
    assert "starts over" in capsys.readouterr().err
