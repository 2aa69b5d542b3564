"""One reconstruction on several devices (ptycore/recon/placement.py): every engine on 4 virtual
CPU devices gives the result of one device up to float32 rounding (the sums over positions
are taken in another order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
N_DEVICES = 4
#: largest difference of a state array, relative to its largest value, N devices vs one: float32
#: rounding of sums taken in another order, grown over a few iterations (Adam's normalised steps
#: amplify it most; measured 3e-5 on 2 devices for the gradient case)
STATE_RTOL = 2e-4
#: largest relative difference of a reported loss per iteration
HISTORY_RTOL = 2e-4


def _compare(tmp_path, n_devices: int, *cases: str) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(HERE / "_distributed_cases.py"), str(n_devices), str(out), *cases],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case on N_DEVICES (about 5 min on 2 CPU cores: the slow tests)."""
    return _compare(tmp_path_factory.mktemp("dist"), N_DEVICES)


def test_epie_on_two_devices_matches_one(tmp_path):
    """The quick check (CI without the slow tests): ePIE, compact batches, 2 devices."""
    r = _compare(tmp_path, 2, "epie")
    assert r["devices"] == 2
    assert max(r["epie"]["state"].values()) < STATE_RTOL, r["epie"]["state"]
    assert max(r["epie"]["history"].values()) < HISTORY_RTOL, r["epie"]["history"]


@pytest.mark.slow
def test_runs_on_the_virtual_devices(results):
    assert results["devices"] == N_DEVICES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradient", "gradient_poisson", "epie", "lsqml", "lsqml_poisson", "lm"])
def test_engine_on_n_devices_matches_one(results, name):
    r = results[name]
    for array, diff in r["state"].items():
        assert diff < STATE_RTOL, f"{name}: {array} differs by {diff:.3g} (relative) on {N_DEVICES} devices"
    for term, diff in r["history"].items():
        assert diff < HISTORY_RTOL, f"{name}: history {term} differs by {diff:.3g} on {N_DEVICES} devices"
    assert r["compilations"] == [1, 1]  # one compiled iteration on N devices too


@pytest.mark.slow
def test_random_grouping_on_n_devices_still_fits(results):
    """Random batches are drawn per device (stratified) on N devices: not the same batches as on
    one device, but the same fit."""
    r = results["gradient_random"]
    first, (one, many) = r["first_fit"], r["final_fit"]
    assert many < first  # it fits
    assert abs(many - one) < 0.05 * one


# ------------------------------------------------------------------ several processes
def _stores(tmp_path):
    import yaml
    from _synthetic import make_synthetic, write_stores

    syn = make_synthetic(n_det=32, scan=8, step_A=0.6, counts=2e4)
    write_stores(syn, tmp_path / "prepared.zarr", tmp_path / "init.zarr")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"stages": [{
        "name": "main", "engine": "lsqml", "iterations": 4, "batch_size": 16, "grouping": "compact",
        "checkpoint_every": 2, "optimize": {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0},
                                            "probe": {"lr": 1.0, "start": 1}}}]}))
    return plan


def _cli(args, tmp_path, **extra_env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent), **extra_env}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "ptycore.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def _result(path):
    from ptycore.recon.state import load_state
    from ptycore.store import open_store

    state, _ = load_state(path)
    return state, dict(open_store(path).attrs)["provenance"]


@pytest.mark.slow
def test_two_processes_give_the_result_of_one(tmp_path):
    """``ptycore launch -n 2`` starts two real processes (one CPU device each) connected by
    jax.distributed on 127.0.0.1; process 0 writes the result, the same as one process's."""
    import numpy as np

    plan = _stores(tmp_path)
    common = ["--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--quiet"]
    one = _cli(["reconstruct", *common, "--out", "one.zarr"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(["launch", "-n", "2", "--", "reconstruct", *common, "--out", "two.zarr"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    s1, _ = _result(tmp_path / "one.zarr")
    s2, prov = _result(tmp_path / "two.zarr")
    assert prov["placement"]["devices"] == 2 and prov["placement"]["processes"] == 2
    assert prov["memory_estimate"]["devices"] == 2
    for name in ("object_phase", "object_amplitude", "probe"):
        a, b = np.asarray(getattr(s1, name)), np.asarray(getattr(s2, name))
        assert np.max(np.abs(a - b)) < STATE_RTOL * np.max(np.abs(a)), name
    assert not (tmp_path / "two.zarr.partial").exists()


def test_launch_without_a_command_is_one_line(tmp_path):
    proc = _cli(["launch", "-n", "2"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ptycore launch: error: no command to launch: give it after '--', "
        "e.g. 'ptycore launch -n 2 -- reconstruct ...'"]


def test_launcher_detection():
    from ptycore.distributed import launcher

    assert launcher({}) is None
    assert launcher({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # one task: nothing to connect
    assert launcher({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}) == "slurm"
    assert launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert launcher({"PMI_SIZE": "2"}) == "mpi"
    assert launcher({"PTYCORE_COORDINATOR": "10.0.0.1:1234", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) == "explicit"


def test_memory_estimate_is_per_device():
    """On N devices a device holds 1/N of the patterns and of each batch's waves, and the whole
    state (replicated)."""
    from ptycore.plan import parse_plan
    from ptycore.recon import memory

    stages = parse_plan({"stages": [{"name": "s", "engine": "gradient", "iterations": 1, "batch_size": 256,
                                     "optimize": {"object_phase": {"lr": 0.1}}}]}).stages
    shapes = memory.stage_shapes(stages, n_positions=40000, detector_px=(128, 128),
                                 state_shapes={"object": (1, 8, 900, 900), "probe": (4, 128, 128),
                                               "slice_thickness_A": 2.0})
    one = memory.estimate(shapes, stored_detector_px=(128, 128))
    four = memory.estimate(shapes, stored_detector_px=(128, 128), devices=4)
    assert four.parts["data"] == one.parts["data"] // 4
    assert four.parts["working set"] < 0.3 * one.parts["working set"]
    assert four.parts["optimiser"] == one.parts["optimiser"]  # replicated
    assert four.device < one.device
