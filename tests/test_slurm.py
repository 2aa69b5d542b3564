"""profiles/slurm against a real Slurm: the tiny workflow-test DAG submitted as Slurm jobs.

Needs a running cluster: `bash .ci/local_slurm.sh` (as root) starts a single-node one (partitions
`debug` and `gpu`, account `ci`, a fake GPU). The profile used is a CI copy of profiles/slurm that
changes only the account, the partitions and the status-check waits. Skipped when `sinfo` does
not answer.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
import zarr
from test_workflow import ROOT, TEST_CONFIG, job_counts, missing_verbs, snakemake, write_config

pytestmark = pytest.mark.slurm

#: what the CI copy of profiles/slurm changes (the cluster .ci/local_slurm.sh starts)
CI_OVERRIDES = {
    "default-resources": {"slurm_account": "ci", "slurm_partition": "debug"},
    "set-resources": {"reconstruct": {"slurm_partition": "gpu"}},
    "slurm-init-seconds-before-status-checks": 2,
    "seconds-between-status-checks": 2,
}


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def ci_profile(base):
    """The CI copy of profiles/slurm in base/ci_slurm_profile."""
    profile = base / "ci_slurm_profile"
    profile.mkdir()
    config = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    config.update(CI_OVERRIDES)
    (profile / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return profile


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    if not _slurm_answers():
        pytest.skip("no Slurm cluster answers (start one with: bash .ci/local_slurm.sh)")
    if missing_verbs():
        pytest.skip(f"verbs not written yet: {', '.join(missing_verbs())}")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    base = tmp_path_factory.mktemp("slurm")
    profile = ci_profile(base)
    workdir = base / "work"
    workdir.mkdir()
    proc = snakemake(workdir, "--profile", str(profile), timeout=1800)
    return workdir, proc, profile


def _sacct(job_ids) -> dict[str, dict[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,Partition,State,Account"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = {}
    for line in out.splitlines():
        job, partition, state, account = line.split("|")
        rows[job] = {"partition": partition, "state": state, "account": account}
    return rows


def test_jobs_ran_through_slurm_and_gpu_rules_on_the_gpu_partition(slurm_run):
    workdir, proc, _ = slurm_run
    assert proc.returncode != 0, "the bad dataset must make the run fail"
    assert "executor: slurm" in proc.output or "slurm" in proc.output.lower()
    results = workdir / "results"
    # every reconstruct job ran as a Slurm job in the gpu partition, on the CPU (fake GPU)
    job_ids = {}
    for stage in ("coarse", "fine"):
        store = zarr.open_group(str(results / "tiny" / "tiny" / "stages" / f"{stage}.zarr"), mode="r")
        prov = store.attrs["provenance"]
        assert prov["slurm_job_id"], f"{stage}: no Slurm job id in the provenance"
        assert prov["platform"] == "cpu", "CUDA_VISIBLE_DEVICES=0 without a GPU must leave JAX on the CPU"
        job_ids[stage] = str(prov["slurm_job_id"])
    ingest = zarr.open_group(str(results / "tiny" / "data.zarr"), mode="r")
    ingest_job = (ingest.attrs.get("provenance") or {}).get("slurm_job_id")
    if ingest_job:
        job_ids["ingest"] = str(ingest_job)
    rows = _sacct(job_ids.values())
    for name, job in job_ids.items():
        assert rows[job]["state"] == "COMPLETED", (name, rows[job])
        assert rows[job]["account"] == "ci", (name, rows[job])
    assert rows[job_ids["coarse"]]["partition"] == "gpu" and rows[job_ids["fine"]]["partition"] == "gpu"
    if "ingest" in job_ids:
        assert rows[job_ids["ingest"]]["partition"] == "debug"
    assert (results / "tiny" / "tiny" / "eval" / "metrics.json").exists()


def test_bad_dataset_fails_only_its_branch_on_slurm_too(slurm_run):
    workdir, proc, _ = slurm_run
    results = workdir / "results"
    assert "ptycore simulate: error: --dose" in (results / "logs" / "tiny-bad" / "simulate.log").read_text()
    assert "FAILED tiny-bad / tiny at simulate" in proc.output
    assert (results / "aggregate").is_dir()


def test_rerun_on_slurm_finishes_the_aggregate_then_has_nothing_to_do(slurm_run, tmp_path):
    workdir, _, profile = slurm_run
    datasets = yaml.safe_load(TEST_CONFIG.read_text())["datasets"]
    good = write_config(tmp_path / "good.yaml", datasets=[d for d in datasets if d["name"] == "tiny"])
    # the aggregate was built by the error hook, outside snakemake's records: only it is left
    proc = snakemake(workdir, "--profile", str(profile), configfile=good, timeout=900)
    assert proc.returncode == 0, proc.output
    assert job_counts(proc.output) == {"aggregate": 1, "all": 1}, proc.output
    proc = snakemake(workdir, "-n", configfile=good)
    assert proc.returncode == 0 and "Nothing to be done" in proc.output, proc.output


# ---------------------------------------------------------------- one reconstruction, two Slurm tasks
def test_two_device_plan_runs_as_an_srun_step_of_two_tasks_that_jax_distributed_detects(tmp_path):
    """A plan with devices: 2 through the CI copy of profiles/slurm: each reconstruct job is one
    Slurm job of 2 tasks whose command runs `srun -n 2 ptycore reconstruct`; both tasks connect
    through jax.distributed from Slurm's environment, and the result records 2 processes. The CI
    node has one (fake) GPU, so the config asks for CPU tasks (resources.reconstruct.gpu: false),
    as on a CPU cluster."""
    from test_distributed import _workflow_config

    if not _slurm_answers():
        pytest.skip("no Slurm cluster answers (start one with: bash .ci/local_slurm.sh)")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")
    profile = ci_profile(tmp_path)
    config = _workflow_config(tmp_path, plan_devices=2, reconstruct={"gpu": False})
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = snakemake(workdir, "--profile", str(profile), configfile=config, timeout=1200)
    assert proc.returncode == 0, proc.output[-4000:]
    results = workdir / "results"
    jobs = {}
    for stage in ("coarse", "fine"):
        store = zarr.open_group(str(results / "tiny" / "tiny" / "stages" / f"{stage}.zarr"), mode="r")
        prov = store.attrs["provenance"]
        placement = prov["placement"]
        assert (placement["launcher"], placement["processes"], placement["devices"]) == ("slurm", 2, 2), placement
        jobs[stage] = str(prov["slurm_job_id"])
    out = subprocess.run(["sacct", "-n", "-P", "-j", ",".join(jobs.values()), "-o", "JobID,NTasks,State"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    steps = [line.split("|") for line in out.splitlines()]
    for stage, job in jobs.items():
        # the batch job, and in it one srun step of two tasks that completed
        two_task_steps = [s for s in steps if s[0].startswith(f"{job}.") and s[0].split(".")[1].isdigit()
                          and s[1] == "2" and s[2] == "COMPLETED"]
        assert two_task_steps, (stage, out)
    assert (results / "tiny" / "tiny" / "eval" / "metrics.json").exists()
