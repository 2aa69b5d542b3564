"""Several processes, one reconstruction: ``jax.distributed`` initialisation from the launcher.

:func:`initialize` is called by ``ptycore reconstruct`` before JAX starts computing. It
connects the processes of one run, so that ``jax.devices()`` lists the devices of all of them
(the run's placement then shards the positions over every device; see
``ptycore/recon/placement.py``). How the processes find each other, first match wins:

1. **explicit**: ``PTYCORE_COORDINATOR`` (``host:port`` of process 0), ``PTYCORE_NUM_PROCESSES``,
   ``PTYCORE_PROCESS_ID`` and optionally ``PTYCORE_LOCAL_DEVICE_IDS`` (comma-separated device
   ids this process uses, e.g. ``0,1``; also read under Slurm and MPI). ``ptycore launch -n N``
   sets them on one machine; a facility whose launcher is neither Slurm nor MPI sets them itself.
2. **Slurm**: a job step started by ``srun`` with more than one task (``SLURM_STEP_NUM_TASKS``
   or ``SLURM_NTASKS`` > 1, ``SLURM_PROCID`` set): JAX reads the coordinator (the first node
   of the step), process count and id from Slurm's environment.
3. **MPI**: ``mpirun``/``mpiexec`` (Open MPI ``OMPI_COMM_WORLD_SIZE``, MPICH/Intel MPI
   ``PMI_SIZE``) > 1: detected through mpi4py (``cluster_detection_method="mpi4py"``; the extra
   ``mpi``).

With one process nothing happens. On CPU the processes' collectives go over gloo.
"""

from __future__ import annotations

import os

from ptycore.errors import InvalidArgument, MissingDependency

ENV_COORDINATOR = "PTYCORE_COORDINATOR"
ENV_NUM_PROCESSES = "PTYCORE_NUM_PROCESSES"
ENV_PROCESS_ID = "PTYCORE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "PTYCORE_LOCAL_DEVICE_IDS"

_initialized: dict | None = None


def _int_env(name: str, env) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"environment variable {name}={value!r} is not an integer") from None


def launcher(env=None) -> str | None:
    """Which launcher started this process as one of several: ``explicit``, ``slurm``, ``mpi``,
    or None (a single process)."""
    env = os.environ if env is None else env
    if env.get(ENV_COORDINATOR):
        return "explicit"
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks and "SLURM_PROCID" in env and tasks.isdigit() and int(tasks) > 1:
        return "slurm"
    size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
    if size and size.isdigit() and int(size) > 1:
        return "mpi"
    return None


def local_device_ids(env) -> list[int] | None:
    """The local devices this process uses: ``PTYCORE_LOCAL_DEVICE_IDS``; else [0] when the
    launcher bound one GPU to the task (``CUDA_VISIBLE_DEVICES`` names one, e.g. srun
    --gpus-per-task=1); else None, JAX's choice (under Slurm and MPI: the local task number,
    one GPU per task of a node that shows every task all its GPUs)."""
    ids = env.get(ENV_LOCAL_DEVICE_IDS)
    if ids:
        try:
            return [int(i) for i in ids.split(",")]
        except ValueError:
            raise InvalidArgument(f"{ENV_LOCAL_DEVICE_IDS}={ids!r} must be comma-separated integers") from None
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return [0] if len(visible) == 1 else None


def initialize(env=None) -> dict | None:
    """Connect this process to the others of its run (see the module docstring); returns what
    was used (for provenance) or None for a single process. Idempotent."""
    global _initialized
    if _initialized is not None:
        return _initialized
    env = os.environ if env is None else env
    how = launcher(env)
    if how is None:
        return None
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = local_device_ids(env)
    if how == "explicit":
        n = _int_env(ENV_NUM_PROCESSES, env)
        pid = _int_env(ENV_PROCESS_ID, env)
        if n < 1 or not 0 <= pid < n:
            raise InvalidArgument(f"{ENV_PROCESS_ID}={pid} must be in 0..{n - 1} ({ENV_NUM_PROCESSES}={n})")
        jax.distributed.initialize(coordinator_address=env[ENV_COORDINATOR], num_processes=n, process_id=pid,
                                   local_device_ids=local)
    elif how == "slurm":
        jax.distributed.initialize(local_device_ids=local)
    else:
        try:
            import mpi4py  # noqa: F401
        except ModuleNotFoundError:
            raise MissingDependency("started by mpirun/mpiexec with several processes, but mpi4py is not "
                                    "installed (pip install 'ptycore[mpi]')") from None
        jax.distributed.initialize(cluster_detection_method="mpi4py", local_device_ids=local)
    _initialized = {"launcher": how, "processes": jax.process_count(), "process_id": jax.process_index()}
    return _initialized


def info() -> dict | None:
    """What :func:`initialize` connected (``launcher``, ``processes``, ``process_id``), or None."""
    return _initialized


def is_writer() -> bool:
    """Whether this process writes outputs (process 0; the only one without jax.distributed)."""
    if _initialized is None:
        return True
    import jax

    return jax.process_index() == 0
