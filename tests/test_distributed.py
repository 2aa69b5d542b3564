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
#: the same for an Adam stage on 4 devices: Adam divides by sqrt(v) + eps, so on pixels whose
#: gradient is near eps (the unlit padding) a rounding-level change of the gradient moves the step
#: by a visible fraction of it (measured 3.6e-4 of the phase's largest value on 4 devices on a
#: 2-core CPU, 2026-12-02, with the final loss equal to 8 digits). A missing all-reduce
#: of one device's sums differs by O(1).
STATE_RTOL_ADAM = 1e-3
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
    rtol = STATE_RTOL_ADAM if name == "gradient" else STATE_RTOL
    for array, diff in r["state"].items():
        assert diff < rtol, f"{name}: {array} differs by {diff:.3g} (relative) on {N_DEVICES} devices"
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
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}
    env.pop("XLA_FLAGS", None)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "ptycore.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def _result(path):
    from ptycore.recon.state import load_state
    from ptycore.store import open_store

    state, _ = load_state(path)
    return state, dict(open_store(path).attrs)["provenance"]


def _chunk_patterns(prepared, positions_per_chunk: int) -> int:
    """Rewrite the prepared store's patterns in chunks of ``positions_per_chunk`` positions (as
    ``ptycore preprocess`` writes scan rows); returns the number of chunks."""
    import numpy as np
    import zarr

    from ptycore.store import write_array

    group = zarr.open_group(str(prepared), mode="r+")
    patterns = np.asarray(group["patterns"][...])
    write_array(group, "patterns", patterns, chunks=(positions_per_chunk,) + patterns.shape[1:])
    return -(-patterns.shape[0] // positions_per_chunk)


@pytest.mark.slow
def test_two_processes_of_two_devices_read_their_own_positions_and_give_the_result_of_one(tmp_path):
    """``ptycore launch -n 2`` starts two real processes of two virtual CPU devices each
    (``--xla_force_host_platform_device_count=2``), connected by jax.distributed on 127.0.0.1
    (gloo): the positions are sharded over 4 devices, each process reads from the prepared store
    only the patterns of its two devices' positions, and process 0 writes the result, the same as
    one process on one device within STATE_RTOL (float32 sums in another order)."""
    import numpy as np

    plan = _stores(tmp_path)
    n_chunks = _chunk_patterns(tmp_path / "prepared.zarr", 8)  # one scan row (8 positions) per chunk
    common = ["--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--quiet"]
    one = _cli(["reconstruct", *common, "--out", "one.zarr"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(["launch", "-n", "2", "--", "reconstruct", *common, "--out", "two.zarr"], tmp_path,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert two.returncode == 0, two.stderr[-2000:]
    s1, _ = _result(tmp_path / "one.zarr")
    s2, prov = _result(tmp_path / "two.zarr")
    placement = prov["placement"]
    assert (placement["devices"], placement["processes"], placement["mesh"]) == (4, 2, {"positions": 4}), placement
    assert prov["memory_estimate"]["devices"] == 4
    stage = placement["stages"]["main"]
    n_pos = s1.positions_A.shape[0]
    per_device = stage["positions_per_device"]
    assert sum(per_device) == n_pos and max(per_device) - min(per_device) <= 1, per_device
    reads = stage["processes"]
    # each process read exactly its two devices' positions: half of them, not all
    assert [r["positions_read"] for r in reads] == [per_device[0] + per_device[1], per_device[2] + per_device[3]]
    # a device's positions are contiguous runs of a batch: a process decodes only some of the chunks
    assert all(r["devices"] == 2 and 0 < r["chunks_read"] < n_chunks for r in reads), reads
    assert all(r["patterns_bytes_per_device"] == max(per_device) * 32 * 32 * 4 for r in reads), reads
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


# ------------------------------------------------------------------ the workflow on N devices
def _workflow_config(tmp_path, *, dataset_devices=None, plan_devices=None, reconstruct=None):
    """The tiny workflow-test config with one good dataset; its plan (a copy of the tiny plan)
    and dataset ask for the given devices."""
    import yaml
    from test_workflow import ROOT, TEST_CONFIG, write_config

    plan = yaml.safe_load((ROOT / "config" / "test" / "plans" / "tiny.yaml").read_text())
    if plan_devices is not None:
        plan["devices"] = plan_devices
    plan_path = tmp_path / "tiny.yaml"
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    config = yaml.safe_load(TEST_CONFIG.read_text())
    dataset = next(d for d in config["datasets"] if d["name"] == "tiny")
    if dataset_devices is not None:
        dataset["devices"] = dataset_devices
    resources = dict(config["resources"])
    if reconstruct:
        resources["reconstruct"] = {**resources["reconstruct"], **reconstruct}
    return write_config(tmp_path / "config.yaml", datasets=[dataset], plans=[str(plan_path)], resources=resources)


def _reconstruct_jobs(output: str) -> dict[str, dict]:
    """Each reconstruct job of a dry run (-n -p): stage -> {'resources': {key: value}, 'command': ...}."""
    import re

    jobs = {}
    for block in output.split("rule reconstruct:")[1:]:
        stage = re.search(r"wildcards: .*stage=(\w+)", block).group(1)
        resources = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block).group(1).split(", "))
        command = re.search(r"Shell command: (.*)", block).group(1)
        jobs[stage] = {"resources": resources, "command": command}
    return jobs


def _dry_run(tmp_path, config, profile):
    from test_workflow import ROOT, snakemake

    proc = snakemake(tmp_path, "-n", "-p", "--profile", str(ROOT / "profiles" / profile), configfile=config)
    assert proc.returncode == 0, proc.output[-3000:]
    return _reconstruct_jobs(proc.output)


def test_one_device_job_is_plain_reconstruct_on_both_profiles(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    config = _workflow_config(tmp_path)
    for profile in ("local", "slurm"):
        for job in _dry_run(tmp_path, config, profile).values():
            assert job["command"].startswith("ptycore reconstruct --plan "), (profile, job["command"])
            res = job["resources"]
            assert res["gres"] == "gpu:1" and res["mem_mb"] == "3000", (profile, res)
            assert not {"tasks", "gpu", "tasks_per_gpu", "nodes"} & set(res), (profile, res)
            assert profile == "local" or "mpi" not in res  # on Slurm no MPI job: no srun step of N tasks


def test_plan_devices_two_starts_two_processes_locally_and_two_srun_tasks_on_slurm(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    config = _workflow_config(tmp_path, plan_devices=2)
    local = _dry_run(tmp_path, config, "local")
    assert set(local) == {"coarse", "fine"}
    for job in local.values():
        assert job["command"].startswith("ptycore launch -n 2 ptycore reconstruct --plan "), job["command"]
    slurm = _dry_run(tmp_path, config, "slurm")
    for job in slurm.values():
        assert job["command"].startswith("srun -n 2 ptycore reconstruct --plan "), job["command"]
        res = job["resources"]
        # two tasks, one GPU each, the launcher srun; memory is per node: two processes' worth
        assert (res["tasks"], res["gpu"], res["tasks_per_gpu"], res["mpi"]) == ("2", "2", "1", "srun"), res
        assert "gres" not in res and res["mem_mb"] == "6000" and res["slurm_partition"] == "gpu", res


def test_a_datasets_devices_override_its_plans_and_span_nodes(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    config = _workflow_config(tmp_path, plan_devices=2, dataset_devices=8,
                              reconstruct={"gpus_per_node": 4, "launcher": "mpirun"})
    for job in _dry_run(tmp_path, config, "slurm").values():
        assert job["command"].startswith("mpirun -n 8 ptycore reconstruct "), job["command"]
        res = job["resources"]
        assert (res["tasks"], res["gpu"], res["nodes"], res["mpi"]) == ("8", "8", "2", "mpirun"), res
        assert res["mem_mb"] == str(3000 * 4), res  # 4 tasks on a node


def test_sbatch_of_a_two_device_job(tmp_path):
    """What snakemake-executor-plugin-slurm submits for the resources of a job on 2 GPUs: 2 tasks,
    2 GPUs, one task per GPU; and for 1 device the gres as before and one task."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    from ptycore.pipeline.config import device_scaled_resources

    class Resources(dict):
        __getattr__ = dict.__getitem__

    class Job:
        def __init__(self, res):
            self.resources = Resources({k: v for k, v in res.items() if v is not None})
            self.threads = 4

    config = {"resources": {"reconstruct": {"cpus": 4, "mem_mb": 8000, "runtime": 60, "gpu": True}}}
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "-A ci", "partition": "-p gpu",
              "workdir": None}

    def sbatch(n):
        res = device_scaled_resources(config, "reconstruct", lambda wc: n)
        job = Job({k: v(None, 1) if callable(v) else v for k, v in res.items()})
        return (get_submit_command(job, params) + set_gres_string(job)).split()

    two = sbatch(2)
    assert {"--ntasks=2", "--gpus=2", "--ntasks-per-gpu=1", "--cpus-per-task=4", "--mem", "16000"} <= set(two), two
    assert not any(w.startswith("--gres") for w in two), two
    one = sbatch(1)
    assert {"--gres=gpu:1", "--cpus-per-task=4", "8000"} <= set(one), one
    assert not any(w.startswith(("--ntasks", "--gpus")) for w in one), one


def test_device_resources_of_a_cpu_rule():
    """A cluster without GPUs (resources.reconstruct.gpu: false): N tasks, no GPU request."""
    from ptycore.pipeline.config import device_resources, launch_prefix

    config = {"resources": {"reconstruct": {"gpu": False, "mem_mb": 1000}}}
    assert device_resources(config, "reconstruct", 1) == {}
    assert device_resources(config, "reconstruct", 3) == {"tasks": 3, "mpi": "srun", "gres": None, "mem_mb": 3000}
    assert launch_prefix(1, "srun") == "" and launch_prefix(3, "srun") == "srun -n 3 "


@pytest.mark.parametrize(("where", "value", "message"), [
    ("plan", 0, "devices: must be an integer >= 1, got 0"),
    ("dataset", 0, "invalid config: datasets[0].devices: 0 is less than the minimum of 1"),
    ("dataset", "two", "invalid config: datasets[0].devices: 'two' is not of type 'integer'"),
])
def test_bad_devices_are_one_line(tmp_path, where, value, message):
    from test_workflow import snakemake

    config = _workflow_config(tmp_path, **{f"{where}_devices": value})
    proc = snakemake(tmp_path, "-n", configfile=config)
    assert proc.returncode != 0
    assert message in proc.output, proc.output[-2000:]


def test_plan_devices_field():
    from ptycore.errors import InvalidPlan
    from ptycore.plan import parse_plan

    record = {"stages": [{"name": "s", "engine": "gradient", "iterations": 1,
                          "optimize": {"object_phase": {"lr": 0.1}}}]}
    one, two = parse_plan(record), parse_plan({**record, "devices": 2})
    assert (one.devices, two.devices) == (1, 2)
    assert one.hash() == two.hash()  # where it runs is not what it computes: checkpoints carry over
    with pytest.raises(InvalidPlan, match=r"devices: must be >= 1"):
        parse_plan({**record, "devices": 0})


def test_a_plan_for_two_devices_in_one_single_device_process_is_refused(tmp_path):
    import yaml

    plan = _stores(tmp_path)
    record = yaml.safe_load(plan.read_text())
    plan.write_text(yaml.safe_dump({**record, "devices": 2}))
    args = ["reconstruct", "--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--out", "o.zarr"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ptycore reconstruct: error: the plan asks for 2 devices (devices: 2) and this process has 1: start it as "
        "2 processes ('ptycore launch -n 2 -- reconstruct ...', srun or mpirun) or pass --devices 1"]
    assert not (tmp_path / "o.zarr").exists()


def test_launch_takes_the_command_as_srun_does(tmp_path):
    """``ptycore launch -n 2 ptycore VERB ...`` (the workflow's form, as for srun and mpirun)."""
    proc = _cli(["launch", "-n", "2", "ptycore", "launch", "-n", "2", "--", "inspect"], tmp_path)
    assert proc.returncode == 2
    assert "'launch' cannot be launched as several processes" in proc.stderr


@pytest.mark.slow
def test_local_workflow_runs_a_two_device_plan_as_two_processes(tmp_path):
    """profiles/local, a plan with devices: 2: each reconstruct job is two connected processes
    (ptycore launch), whose result store records 2 devices over 2 processes."""
    from test_workflow import ROOT, job_counts, missing_verbs, snakemake

    if missing_verbs():
        pytest.skip(f"verbs not written yet: {', '.join(missing_verbs())}")
    config = _workflow_config(tmp_path, plan_devices=2)
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake(work, "--profile", str(ROOT / "profiles" / "local"), "--cores", "2", configfile=config)
    assert proc.returncode == 0, proc.output[-3000:]
    assert job_counts(proc.output)["reconstruct"] == 2
    for stage in ("coarse", "fine"):
        _, prov = _result(work / "results" / "tiny" / "tiny" / "stages" / f"{stage}.zarr")
        placement = prov["placement"]
        assert (placement["devices"], placement["processes"], placement["launcher"]) == (2, 2, "explicit"), placement
    log = (work / "results" / "logs" / "tiny" / "tiny" / "reconstruct-coarse.log").read_text()
    # the coarse stage draws random batches: one warning line (from process 0 only) says so
    assert log.count("random grouping on 2 devices") == 1, log
    assert "random grouping" not in (work / "results" / "logs" / "tiny" / "tiny" / "reconstruct-fine.log").read_text()
    assert (work / "results" / "tiny" / "tiny" / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_killed_two_process_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path):
    """``ptycore launch -n 2``, killed (SIGKILL to every process, as a node failure) after its
    first checkpoints, then launched again with --resume: both processes restart from process
    0's checkpoint and the result equals the uninterrupted two-process run's."""
    import signal
    import time

    import numpy as np
    import yaml

    plan = _stores(tmp_path)
    record = yaml.safe_load(plan.read_text())
    record["stages"][0].update(iterations=150, checkpoint_every=5)
    plan.write_text(yaml.safe_dump(record))
    common = ["--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--quiet"]
    whole = _cli(["launch", "-n", "2", "--", "reconstruct", *common, "--out", "whole.zarr"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "ptycore.cli", "launch", "-n", "2", "--", "reconstruct", *common, "--out", "cut.zarr"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = tmp_path / "cut.zarr.partial" / "checkpoints" / "main.npz"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: give it more iterations"
    assert ckpt.exists(), "no checkpoint within 300 s"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes, at once
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not (tmp_path / "cut.zarr").exists()

    resumed = _cli(["launch", "-n", "2", "--", "reconstruct", *common, "--resume", "--out", "cut.zarr"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    s_whole, _ = _result(tmp_path / "whole.zarr")
    s_cut, prov = _result(tmp_path / "cut.zarr")
    timing = prov["stage_timings"]["main"]
    assert 0 < timing["resumed_from"] < 150, timing  # it continued from a checkpoint, not from iteration 0
    assert prov["placement"]["processes"] == 2
    for name in ("object_phase", "object_amplitude", "probe", "positions_A"):
        a, b = np.asarray(getattr(s_whole, name)), np.asarray(getattr(s_cut, name))
        assert np.max(np.abs(a - b)) <= 1e-6 * max(float(np.max(np.abs(a))), 1.0), name
    assert not (tmp_path / "cut.zarr.partial").exists()


@pytest.mark.mpi
def test_mpirun_two_processes_detected_through_mpi4py_give_the_result_of_one(tmp_path):
    """``mpirun -n 2 ptycore reconstruct`` (Open MPI): jax.distributed finds the two processes
    through mpi4py; process 0 writes the result, the same as one process's."""
    import shutil

    import numpy as np

    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]'")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun (Debian: apt-get install openmpi-bin libopenmpi-dev)")
    plan = _stores(tmp_path)
    common = ["--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--quiet"]
    one = _cli(["reconstruct", *common, "--out", "one.zarr"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent),
           # Open MPI refuses root (CI containers) without both
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([mpirun, "-n", "2", "--oversubscribe", sys.executable, "-m", "ptycore.cli", "reconstruct",
                           *common, "--out", "two.zarr"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    s1, _ = _result(tmp_path / "one.zarr")
    s2, prov = _result(tmp_path / "two.zarr")
    placement = prov["placement"]
    assert (placement["launcher"], placement["processes"], placement["devices"]) == ("mpi", 2, 2), placement
    for name in ("object_phase", "object_amplitude", "probe"):
        a, b = np.asarray(getattr(s1, name)), np.asarray(getattr(s2, name))
        assert np.max(np.abs(a - b)) < STATE_RTOL * np.max(np.abs(a)), name


# ------------------------------------------------------------------ reading per process
def test_stored_patterns_read_only_the_asked_positions_as_the_full_load_does(tmp_path):
    """What a process of several reads (ptycore.recon.context.StoredPatterns): the asked-for
    positions only, decoded from the chunks that hold them, the same arrays as the whole-store
    load (FFT order, clipped), also through a stage's detector crop."""
    import numpy as np

    from ptycore.physics.fourier import fft_order_band
    from ptycore.recon.context import load_measurement

    _stores(tmp_path)
    n_chunks = _chunk_patterns(tmp_path / "prepared.zarr", 8)
    full = load_measurement(tmp_path / "prepared.zarr")
    lazy = load_measurement(tmp_path / "prepared.zarr", per_process=True)
    assert lazy.intensities is None and lazy.shape == full.shape == (64, 32, 32)
    wanted = np.array([3, 4, 5, 17, 60])
    np.testing.assert_array_equal(lazy.read_rows(wanted), np.asarray(full.intensities)[wanted])
    assert (lazy.stored.positions_read, lazy.stored.chunks_read) == (5, 3)  # rows 0, 2, 7 of 8
    assert n_chunks == 8
    crop = lazy.cropped(16)
    keep = fft_order_band(32, 16)
    assert crop.detector_shape == (16, 16) and crop.pixel_size_A == pytest.approx(2 * full.pixel_size_A)
    np.testing.assert_array_equal(crop.read_rows(wanted), np.asarray(full.intensities)[wanted][:, keep][:, :, keep])


def test_a_bad_pattern_read_per_device_is_one_line_naming_it(tmp_path):
    """On N devices the patterns are checked as they are placed: a NaN is reported (by every
    process alike) with its position, before any iteration, and nothing is written."""
    import numpy as np
    import zarr

    plan = _stores(tmp_path)
    group = zarr.open_group(str(tmp_path / "prepared.zarr"), mode="r+")
    patterns = np.asarray(group["patterns"][...])
    patterns[37, 3, 4] = np.nan
    group["patterns"][...] = patterns
    args = ["reconstruct", "--plan", str(plan), "--data", "prepared.zarr", "--init", "init.zarr", "--out", "o.zarr",
            "--devices", "2", "--quiet"]
    proc = _cli(args, tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "ptycore reconstruct: error: prepared.zarr: patterns contain NaN or Inf (position 37)"], proc.stderr
    assert not (tmp_path / "o.zarr").exists()
    partial = tmp_path / "o.zarr.partial"  # the work directory a resume would use: nothing in it
    assert not partial.exists() or not any(partial.iterdir())


def test_inspect_shows_the_devices_and_each_devices_memory_per_stage():
    """What ``ptycore inspect`` prints of a run on 4 GPUs over 2 processes (the provenance as
    ``reconstruct`` writes it): positions per device, what each process read, and per stage the
    estimate per device with each device's measured peak."""
    from ptycore.commands.inspect import placement_lines

    prov = {"placement": {"devices": 4, "processes": 2, "launcher": "slurm", "stages": {"fine": {
        "positions_per_device": [9, 9, 9, 9], "processes": [{"positions_read": 18}, {"positions_read": 18}]}}},
        "stage_memory": {"coarse": {"devices": ["gpu:0", "gpu:1", "gpu:2", "gpu:3"], "estimate_GB_per_device": 1.5,
                                    "peak_GB": [1.2, 1.25, 1.2, 1.3]},
                         "fine": {"devices": ["cpu:0"], "estimate_GB_per_device": 0.25, "peak_GB": ["n/a"]}}}
    lines = [x.strip() for x in placement_lines(prov)]
    assert lines[0] == "devices: 4 over 2 process(es) (launcher slurm)"
    assert lines[1] == "fine: positions per device 9, 9, 9, 9; read from the store per process 18, 18"
    assert lines[3] == "coarse: 1.5 GB on each of 4 device(s); measured 1.2, 1.25, 1.2, 1.3 GB"
    assert lines[4] == "fine: 0.25 GB on each of 1 device(s); measured n/a (not reported on this platform)"
    assert placement_lines({"placement": {"devices": 1, "processes": 1}}) == []
