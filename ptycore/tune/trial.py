"""One trial, run inside a dask worker: sample, write its plan (and init config), initialise,
reconstruct each dataset with per-iteration reports to the pruner, return the objective.

The worker opens the study in the shared storage itself (``optuna.load_study``) and runs
``study.optimize(objective, n_trials=1)``, so reports, pruning decisions and (RDB storage)
heartbeats go straight to the storage; the main process only counts and schedules.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ptycore.tune.space import Space, objective_term, trial_init, trial_plan

PLAN_FILE = "plan.yaml"
INIT_FILE = "init.yaml"


@dataclass(frozen=True)
class Job:
    """Everything a worker needs (picklable, paths absolute)."""

    space: dict  # Space.model_dump()
    base_plan: dict
    base_init: dict
    data: tuple[str, ...]  # prepared stores
    shared_inits: tuple[str | None, ...]  # init store per dataset when no init parameter is tuned
    out: str
    study_name: str
    storage: str  # journal file path or RDB URL
    sampler_seed: int


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def trial_dir(out: str | Path, number: int) -> Path:
    return Path(out) / "trials" / f"{number:04d}"


def make_storage(storage: str, heartbeat_seconds: int = 60):
    """A journal file (path; NFS-safe lock) or an RDB URL (with heartbeats and one retry of a
    trial whose worker stopped sending them)."""
    import warnings

    import optuna
    import optuna.storages as storages
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if "://" in storage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}
            return storages.RDBStorage(storage, heartbeat_interval=heartbeat_seconds,
                                       grace_period=2 * heartbeat_seconds, **retry)
    return storages.JournalStorage(JournalFileBackend(storage, lock_obj=JournalFileOpenLock(storage)))


def make_sampler(space: Space, seed: int):
    import optuna

    if space.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.n_startup_trials,
                                      constant_liar=space.sampler.constant_liar,
                                      multivariate=space.sampler.multivariate)


def make_pruner(space: Space):
    import optuna

    p = space.pruner
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource="auto",
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                       interval_steps=1)


def total_steps(plan: dict) -> int:
    return sum(int(s["iterations"]) for s in plan["stages"])


def _worker_identity() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):  # a SLURMCluster worker: the job that ran the trial
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # the GPU(s) the job was given
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    try:
        from distributed import get_worker

        worker = get_worker()
        info["worker"] = worker.address
        info["task"] = str(worker.get_current_task())
    except (ImportError, ValueError):
        info["worker"] = f"{info['host']}:{info['pid']}"
    return info


def objective(trial, job: Job) -> float:
    """Run the trial; raise ``optuna.TrialPruned`` to prune. Any other error is recorded on the
    trial (user attr ``error``: its first line) and re-raised, so Optuna marks it failed."""
    import optuna

    from ptycore.data.initialize import initialize
    from ptycore.plan import parse_plan
    from ptycore.recon.reconstruct import reconstruct

    space = Space.model_validate(job.space)
    for key, value in _worker_identity().items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("sampler_seed", job.sampler_seed)
    started = time.time()
    folder = trial_dir(job.out, trial.number)
    try:
        plan_values = {k: p.suggest(trial, k) for k, p in space.plan_parameters().items()}
        init_values = {k: p.suggest(trial, f"init.{k}") for k, p in space.init_parameters().items()}
        plan_record = trial_plan(space, job.base_plan, plan_values, f"tune-{space.name}-{trial.number:04d}")
        plan = parse_plan(plan_record, f"trial {trial.number} plan")
        trial.set_user_attr("plan_seed", plan.seed)
        if folder.exists():  # a rerun of the same trial number (never normally): start clean
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / PLAN_FILE).write_text(yaml.safe_dump(plan_record, sort_keys=False))
        init_config = None
        if init_values:
            init_config = folder / INIT_FILE
            init_config.write_text(yaml.safe_dump(trial_init(job.base_init, init_values), sort_keys=False))
        term = objective_term(plan, space.objective)
        n_steps = total_steps(plan_record)
        last_it = n_steps - 1
        values = []
        for d, prepared in enumerate(job.data):
            init_store = job.shared_inits[d]
            if init_store is None:
                init_store = folder / f"init-{d}.zarr"
                initialize(prepared, init_config, init_store)
            seen = {}

            def report(it, scalars, d=d, seen=seen):
                if term not in scalars:
                    return
                seen["value"] = scalars[term]
                if (it + 1) % space.report_every == 0 or it == last_it:
                    trial.report(scalars[term], d * n_steps + it)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at iteration {it + 1} of dataset {d}")

            reconstruct(plan_path=folder / PLAN_FILE, data_path=prepared, init_path=init_store,
                        out_path=folder / f"result-{d}.zarr", progress=False, on_iteration=report)
            if "value" not in seen or not math.isfinite(seen["value"]):
                raise RuntimeError(f"the last stage reported no {term!r} loss")
            values.append(float(seen["value"]))
        trial.set_user_attr("objective_per_dataset", values)
        return float(sum(values) / len(values))
    except optuna.TrialPruned:
        _drop_partials(folder)
        raise
    except Exception as err:
        trial.set_user_attr("error", first_line(err))
        _drop_partials(folder)
        raise
    finally:
        trial.set_user_attr("seconds", round(time.time() - started, 3))


def _drop_partials(folder: Path) -> None:
    """Pruned or failed trials keep their plan, not the half-written stores and checkpoints."""
    if folder.is_dir():
        for partial in folder.glob("*.partial"):
            shutil.rmtree(partial, ignore_errors=True)


def run_one(job: Job) -> int | None:
    """The dask task: one trial of the study. Returns its number (None if Optuna gave none)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's error is its user attr 'error'
    # enqueued points may lie outside the ranges on purpose (e.g. the base plan's own values)
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range", category=UserWarning)
    space = Space.model_validate(job.space)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from ptycore import compile_cache

    compile_cache.enable()  # trials of one study compile the same programs: share them
    study = optuna.load_study(study_name=job.study_name, storage=make_storage(job.storage, space.heartbeat_seconds),
                              sampler=make_sampler(space, job.sampler_seed),
                              pruner=make_pruner(space))
    numbers = []

    def remember(study, frozen):
        numbers.append(frozen.number)

    study.optimize(lambda t: objective(t, job), n_trials=1, catch=(Exception,), callbacks=[remember],
                   gc_after_trial=True)
    return numbers[0] if numbers else None
