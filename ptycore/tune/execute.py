"""The main process of ``ptycore tune``: validate, open (or resume) the study, start the dask
cluster, keep one trial per worker in flight until enough have finished, write the outputs.

Trials run in dask workers (``ptycore.tune.trial.run_one``) and write to the shared storage
themselves; this process counts them, shows progress, and fails and reruns (``retries``) the
trials of workers that were lost (killed, out of memory, out of walltime) or of a previous run
of this command that was stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import yaml

from ptycore.errors import InvalidArgument, MissingDependency
from ptycore.tune.space import Space, base_plan_path, check_space, load_space, read_yaml_mapping
from ptycore.tune.trial import Job, make_pruner, make_sampler, make_storage, run_one

SPACE_RECORD = "space.json"
JOURNAL = "study.journal"
LOCK = ".tune.lock"


@dataclasses.dataclass
class Setup:
    space: Space
    space_path: Path
    out: Path
    data: list[Path]
    inits: list[Path | None]  # init config per dataset
    base_plan: dict
    base_init: dict
    storage: str


def _require_optuna():
    try:
        import distributed  # noqa: F401
        import optuna  # noqa: F401
    except ImportError as err:
        raise MissingDependency(f"ptycore tune needs the 'tune' extra ({err.name} is missing): "
                                "pip install -e '.[tune]'") from None


def prepare(space_path, out, *, plan=None, data=None, init_config=None, trials=None, workers=None, cluster=None,
            storage=None, root=".") -> Setup:
    """Validate the space against its plan, init configs and data, and the output folder; no compute."""
    from ptycore.store import open_input

    space_path = Path(space_path)
    space = load_space(space_path)
    updates = {}
    if trials is not None:
        updates["trials"] = trials
    if storage is not None:
        updates["storage"] = storage
    if workers is not None or cluster is not None:
        c = space.cluster.model_copy(update={k: v for k, v in (("workers", workers), ("kind", cluster))
                                             if v is not None})
        if workers is not None:
            c.slurm = c.slurm.model_copy(update={"maximum_jobs": workers,
                                                 "minimum_jobs": min(c.slurm.minimum_jobs, workers)})
        updates["cluster"] = c
    space = space.model_copy(update=updates)
    if data:
        entries = [(Path(p), Path(init_config) if init_config else (Path(space.init) if space.init else None))
                   for p in data]
    elif space.data:
        entries = [(Path(e.prepared), Path(e.init or init_config or space.init) if (e.init or init_config or
                                                                                     space.init) else None)
                   for e in space.data]
    elif space.datasets:  # the workflow's layout
        init = Path(init_config or space.init) if (init_config or space.init) else None
        entries = [(Path("results") / name / "prepared.zarr", init) for name in space.datasets]
    else:
        raise InvalidArgument(f"{space_path}: no data: give 'data' (prepared stores) or 'datasets' in the space, "
                              "or --data")
    for prepared, _ in entries:
        open_input(prepared, ("patterns", "positions_A"), "preprocess")
    plan_file = Path(plan) if plan is not None else base_plan_path(space, root)
    if not plan_file.is_file():
        raise InvalidArgument(f"{space_path}: plan: {space.plan!r}: plan file {plan_file} not found")
    base_plan = read_yaml_mapping(plan_file, f"{space_path}: plan")
    inits = {}
    for _, init in entries:
        if init is not None and init not in inits:
            inits[init] = read_yaml_mapping(init, f"{space_path}: init config")
    base_init = next(iter(inits.values()), {})
    if len(inits) > 1 and space.init_parameters():
        raise InvalidArgument(f"{space_path}: init parameters need one init config for every dataset, got "
                              f"{len(inits)}")
    check_space(space, str(space_path), base_plan, base_init)
    for init in inits:  # the base init configs themselves
        from ptycore.data.initialize import InitConfig
        from ptycore.data.preprocess import load_config

        load_config(init, InitConfig)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out}: exists and is not a study folder")
    record = out / SPACE_RECORD
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != json.loads(json.dumps(space.search_key())):
            changed = sorted(k for k in set(previous) | set(space.search_key())
                             if previous.get(k) != json.loads(json.dumps(space.search_key())).get(k))
            raise InvalidArgument(f"{out}: holds a study of a different search space (changed: {', '.join(changed)});"
                                  " give another --out, or remove it to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise InvalidArgument(f"{out}: exists and is not a ptycore tune study folder (no {SPACE_RECORD})")
    storage_spec = space.storage or str((out / JOURNAL).resolve())
    return Setup(space, space_path, out, [p.resolve() for p, _ in entries],
                 [i.resolve() if i else None for _, i in entries], base_plan, base_init, storage_spec)


# ---------------------------------------------------------------- the lock (one run per study folder)
def _acquire_lock(out: Path) -> Path:
    lock = out / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = lock.read_text().strip() if lock.exists() else ""
            host, _, pid = owner.partition(":")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a run on this machine that was killed
                continue
            raise InvalidArgument(f"{out}: another 'ptycore tune' runs this study ({owner}); wait for it, or remove "
                                  f"{lock} if that run is dead") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return lock
    raise InvalidArgument(f"{out}: cannot take the lock {lock}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- cluster
def make_cluster(space: Space, out: Path):
    """(cluster, trials at once): a LocalCluster, or an adaptive dask-jobqueue SLURMCluster."""
    import dask

    dask.config.set({"distributed.scheduler.allowed-failures": 0})  # a lost worker fails its trial (we rerun it)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # workers share a GPU without grabbing it
    c = space.cluster
    if c.kind == "local":
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=c.workers, threads_per_worker=c.threads_per_worker, processes=True,
                               memory_limit=c.memory_limit, dashboard_address=None)
        return cluster, c.workers
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise MissingDependency("cluster kind 'slurm' needs dask-jobqueue: pip install -e '.[tune]'") from None
    return SLURMCluster(**slurm_options(c.slurm, out)), c.slurm.maximum_jobs


def slurm_options(s, out: Path) -> dict:
    """SLURMCluster keyword arguments: one worker per job with its GPU(s), retiring (staggered)
    ``lifetime_margin_minutes`` before the walltime so no trial is cut by Slurm."""
    margin = s.lifetime_margin_minutes
    lifetime = max(s.walltime_minutes() - margin, 1.0)
    extra = [f"--gres=gpu:{s.gpus}"] if s.gpus else []
    prologue = ["export XLA_PYTHON_CLIENT_PREALLOCATE=false", *s.job_script_prologue]
    if os.environ.get("PYTHONPATH"):
        prologue.insert(0, f"export PYTHONPATH={os.environ['PYTHONPATH']}")
    options = {"cores": s.cores, "processes": 1, "memory": s.memory, "walltime": s.walltime,
               "job_extra_directives": extra + list(s.job_extra_directives),
               "worker_extra_args": ["--lifetime", f"{int(lifetime)}m", "--lifetime-stagger",
                                     f"{max(int(margin / 3), 1)}m"],
               "job_script_prologue": prologue, "python": s.python or sys.executable,
               "log_directory": str(out / "logs" / "slurm")}
    if s.partition:
        options["queue"] = s.partition
    if s.account:
        options["account"] = s.account
    return options


# ---------------------------------------------------------------- the study
def _state_counts(trials) -> dict:
    from optuna.trial import TrialState

    counts = {"complete": 0, "pruned": 0, "failed": 0, "lost": 0, "running": 0, "waiting": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            counts["lost" if t.user_attrs.get("lost") else "failed"] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.WAITING:
            counts["waiting"] += 1
    counts["finished"] = counts["complete"] + counts["pruned"] + counts["failed"]
    return counts


def fail_lost(study, trial, why: str, retries: int) -> bool:
    """Mark a RUNNING trial failed (user attrs ``error``, ``lost``) and, within ``retries``, queue
    the same parameters again. Returns whether it was requeued."""
    from optuna.trial import TrialState

    storage = study._storage  # user attrs of a trial another process owns: only through the storage
    storage.set_trial_user_attr(trial._trial_id, "error", why)
    storage.set_trial_user_attr(trial._trial_id, "lost", True)
    study.tell(trial.number, state=TrialState.FAIL)
    attempt = int(trial.user_attrs.get("attempt", 0))
    if attempt < retries and trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt + 1},
                            skip_if_exists=False)
        return True
    return False


def open_study(setup: Setup):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(setup.storage, setup.space.heartbeat_seconds)
    return optuna.create_study(study_name=setup.space.name, storage=storage, direction="minimize",
                               load_if_exists=True, sampler=make_sampler(setup.space, setup.space.seed),
                               pruner=make_pruner(setup.space))


def shared_inits(setup: Setup) -> list[str | None]:
    """Without init parameters every trial starts from the same init store: make it once per dataset."""
    from ptycore.data.initialize import initialize

    if setup.space.init_parameters():
        return [None] * len(setup.data)
    paths = []
    for d, (prepared, init) in enumerate(zip(setup.data, setup.inits, strict=True)):
        path = setup.out / "init" / f"init-{d}.zarr"
        if not path.exists():
            initialize(prepared, init, path)
        paths.append(str(path.resolve()))
    return paths


class _Progress:
    """Trials done / running / pruned / failed: a live line on a terminal, a log line per change otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.last = total, enabled, None
        self.reported: set[int] = set()
        self.live = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live("", console=Console(stderr=True), refresh_per_second=4, transient=False)
            self.live.start()

    def failed(self, trials) -> None:
        """One line per newly failed trial with its first error line."""
        from optuna.trial import TrialState

        for t in trials:
            if t.state == TrialState.FAIL and t.number not in self.reported:
                self.reported.add(t.number)
                if self.enabled:
                    msg = f"[tune] trial {t.number} failed: {t.user_attrs.get('error', 'no error recorded')}"
                    if self.live is not None:
                        self.live.console.print(msg, markup=False, highlight=False)
                    else:
                        print(msg, file=sys.stderr, flush=True)

    def update(self, counts: dict, best):
        text = (f"trials {counts['finished']}/{self.total}: {counts['complete']} complete, {counts['pruned']} pruned, "
                f"{counts['failed']} failed, {counts['running']} running")
        if counts["lost"]:
            text += f", {counts['lost']} lost (rerun)"
        if best is not None:
            text += f"; best {best.value:.5g} (trial {best.number})"
        if self.live is not None:
            self.live.update(text)
        elif self.enabled and text != self.last:
            print(f"[tune] {text}", file=sys.stderr, flush=True)
        self.last = text

    def close(self):
        if self.live is not None:
            self.live.stop()


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(done, key=lambda t: t.value) if done else None


def run_study(setup: Setup, *, progress: bool = True, poll_seconds: float = 0.5) -> dict:
    """Run trials until ``space.trials`` have finished (complete, pruned or failed), then write
    the outputs. Resumes a study already in the folder. Returns a summary."""
    _require_optuna()
    from distributed import Client

    from ptycore.tune.outputs import write_outputs

    space, out = setup.space, setup.out
    out.mkdir(parents=True, exist_ok=True)
    lock = _acquire_lock(out)
    try:
        (out / SPACE_RECORD).write_text(json.dumps(space.search_key(), indent=1) + "\n")
        (out / "space.yaml").write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
        study = open_study(setup)
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False):  # a new study: the given points first
            for point in space.enqueue:
                study.enqueue_trial(point, skip_if_exists=False)

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            fail_lost(study, t, "interrupted: the 'ptycore tune' run that started it stopped", space.retries)
        bar = _Progress(space.trials, progress)
        bar.reported.update(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        inits = shared_inits(setup)
        job = Job(space=space.model_dump(mode="json"), base_plan=setup.base_plan, base_init=setup.base_init,
                  data=tuple(str(p) for p in setup.data), shared_inits=tuple(inits), out=str(out.resolve()),
                  study_name=space.name, storage=setup.storage, sampler_seed=space.seed)
        started = time.time()
        cluster, parallel = make_cluster(space, out)
        try:
            if space.cluster.kind == "slurm":
                cluster.adapt(minimum_jobs=space.cluster.slurm.minimum_jobs,
                              maximum_jobs=space.cluster.slurm.maximum_jobs)
            with Client(cluster) as client, _catch_sigint():
                _loop(study, client, job, space, parallel, bar, poll_seconds)
        finally:
            bar.close()
            cluster.close()
        summary = write_outputs(study, setup)
        summary["seconds"] = time.time() - started
        return summary
    finally:
        lock.unlink(missing_ok=True)


class _STOP:
    requested = False


@contextlib.contextmanager
def _catch_sigint():
    """Ctrl-C (SIGINT) stops the study even when it lands inside a library call that swallows
    KeyboardInterrupt (dask's event-loop threads, optuna's storage): the request is remembered and
    the scheduling loop raises it at its next poll. Outside the main thread, nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP.requested = False

    def handler(signum, frame):
        _STOP.requested = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP.requested = False


def _loop(study, client, job: Job, space: Space, parallel: int, bar: _Progress, poll_seconds: float) -> None:
    in_flight = {}  # future -> task key
    try:
        _schedule(study, client, job, space, parallel, bar, poll_seconds, in_flight)
    except KeyboardInterrupt:  # Ctrl-C: stop the running trials now, and rerun them when the study resumes
        _stop_workers(client, space)
        from optuna.trial import TrialState

        keys = set(in_flight.values())
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("task") in keys:
                fail_lost(study, t, "interrupted: 'ptycore tune' was stopped", space.retries)
        raise


def _stop_workers(client, space: Space) -> None:
    """Kill local worker processes at once (closing the cluster would wait for their trials);
    Slurm workers end when the cluster closes (scancel)."""
    import signal

    if space.cluster.kind != "local":
        return
    try:
        pids = client.run(os.getpid, on_error="ignore")
    except Exception:  # noqa: BLE001 - the cluster may already be going down
        return
    for pid in pids.values():
        if isinstance(pid, int):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _schedule(study, client, job, space, parallel, bar, poll_seconds, in_flight) -> None:
    from optuna.trial import TrialState

    n_started = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))  # sampler seeds used
    while True:
        trials = study.get_trials(deepcopy=False)
        counts = _state_counts(trials)
        bar.failed(trials)
        bar.update(counts, _best(study))
        if counts["lost"] > max(space.trials, 4) * (space.retries + 1):
            raise InvalidArgument(f"{counts['lost']} trials lost their worker (killed, out of memory or time): "
                                  "see the dask worker logs; the study so far is kept")
        if counts["finished"] >= space.trials and not in_flight:
            return
        while len(in_flight) < parallel and counts["finished"] + len(in_flight) < space.trials:
            key = f"tune-trial-{uuid.uuid4().hex[:12]}"
            task = dataclasses.replace(job, sampler_seed=space.seed + n_started)
            n_started += 1
            in_flight[client.submit(run_one, task, key=key, pure=False, retries=0)] = key
        time.sleep(poll_seconds)
        if _STOP.requested:  # a Ctrl-C that a library call swallowed: stop here instead
            raise KeyboardInterrupt
        for future in [f for f in in_flight if f.done()]:
            key = in_flight.pop(future)
            why = None
            if future.status == "error":
                err = future.exception()
                why = f"worker lost: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("task") == key:  # its worker died (or retired) before it finished
                    fail_lost(study, t, why or "worker lost before the trial finished", space.retries)
