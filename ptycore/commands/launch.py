"""``ptycore launch -n N -- VERB ...``: run N processes of one ptycore verb on this machine,
connected by ``jax.distributed`` (coordinator on 127.0.0.1), e.g. one reconstruction over two
GPUs of a workstation, or the multi-process test on CPU. On a cluster, ``srun`` or ``mpirun``
start the processes instead (see ptycore/distributed.py)."""

from __future__ import annotations

HELP = "run N connected processes of one verb on this machine (jax.distributed), e.g. 'launch -n 2 -- reconstruct ...'"


def add_arguments(p):
    import argparse

    p.add_argument("-n", "--processes", type=int, required=True, metavar="N", help="number of processes")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--devices-per-process", type=int, metavar="K", default=1,
                   help="give process i the local GPUs i·K … i·K+K-1 (default 1: one GPU each); no effect on the "
                        "CPU (one device per process, or XLA_FLAGS' virtual count)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="[--] [ptycore] VERB ARGS... (the ptycore command each process runs; written as for srun or "
                        "mpirun, 'ptycore launch -n 2 ptycore reconstruct ...', works too)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> int:
    import os
    import signal
    import subprocess
    import sys
    import time

    from ptycore.distributed import ENV_COORDINATOR, ENV_LOCAL_DEVICE_IDS, ENV_NUM_PROCESSES, ENV_PROCESS_ID
    from ptycore.errors import InvalidArgument

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "ptycore":  # as srun/mpirun take it (the workflow's launcher)
        command = command[1:]
    if not command:
        raise InvalidArgument("no command to launch: give it after '--', e.g. 'ptycore launch -n 2 -- reconstruct ...'")
    if command[0] in ("launch", "tune"):
        raise InvalidArgument(f"'{command[0]}' cannot be launched as several processes")
    if args.processes < 1:
        raise InvalidArgument(f"-n must be >= 1, got {args.processes}")
    if args.devices_per_process < 1:
        raise InvalidArgument(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    port = args.port or _free_port()
    procs = []
    for i in range(args.processes):
        env = {**os.environ, ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(args.processes),
               ENV_PROCESS_ID: str(i)}
        if args.devices_per_process:
            k = args.devices_per_process
            env[ENV_LOCAL_DEVICE_IDS] = ",".join(str(i * k + j) for j in range(k))
        # process 0 talks; the others' progress would repeat it
        out = None if i == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "ptycore.cli", *command], env=env, stdout=out))
    codes = [None] * len(procs)
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            failed = [c for c in codes if c not in (None, 0)]
            if failed:  # one process failed: the others would wait for it forever in a collective
                for i, p in enumerate(procs):
                    if codes[i] is None:
                        p.send_signal(signal.SIGTERM)
                for i, p in enumerate(procs):
                    if codes[i] is None:
                        try:
                            codes[i] = p.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            p.kill()
                            codes[i] = p.wait()
                return failed[0]
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        return max(p.wait() for p in procs) or 130
    return 0
