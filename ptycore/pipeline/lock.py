"""The run lock: how the nightly run tells a live pipeline run from a stale Snakemake lock.

Snakemake locks the outputs of a run in ``.snakemake/locks/`` and leaves that lock behind when the
run is killed; ``snakemake --unlock`` clears it, also under a live run, which then loses its
outputs to the next run. So every pipeline run also holds a shared ``flock`` on
``.snakemake/ptycore-run.lock`` in its working directory, from the moment the Snakefile is read
until the process ends (the kernel drops it when the process dies, however it dies). Several runs
may hold it together (Snakemake's own lock keeps them from writing the same outputs). The nightly
run clears Snakemake's lock only while it holds the run lock exclusively, which it can only get
when no pipeline run is alive: then Snakemake's lock is provably stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

RUN_LOCK = ".snakemake/ptycore-run.lock"
#: set (to the lock's path) for a snakemake started by a process that holds the run lock exclusively
HELD_ENV = "PTYCORE_RUN_LOCK_HELD"

_held: list = []  # the open lock files of this process (held until it exits)


class RunLockBusy(RuntimeError):
    pass


def run_lock_path(workdir: str | Path = ".") -> Path:
    return Path(workdir) / RUN_LOCK


def _open(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")


def hold_run_lock(workdir: str | Path = ".", wait_s: float = 60.0) -> Path | None:
    """Take the shared run lock for the rest of this process's life (called by the Snakefile in
    Snakemake's main process). Waits up to ``wait_s`` while the nightly run holds it exclusively
    (a few seconds, to clear a stale lock), then raises :class:`RunLockBusy`. Returns the lock's
    path, or None where a parent process holds it for this one."""
    path = run_lock_path(workdir)
    if os.environ.get(HELD_ENV) and Path(os.environ[HELD_ENV]).resolve() == path.resolve():
        return None
    fh = _open(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                raise RunLockBusy(f"{path}: held by the nightly run while it clears a stale lock; "
                                  f"try again in a minute") from None
            time.sleep(0.2)
    _held.append(fh)
    return path


@contextlib.contextmanager
def exclusive_run_lock(workdir: str | Path = ".") -> Iterator[bool]:
    """Try to hold the run lock exclusively (no waiting): yields True when no pipeline run is
    alive in ``workdir`` (and none can start until the block ends), else False."""
    fh = _open(run_lock_path(workdir))
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def check_unlock(argv: list[str], workdir: str | Path = ".") -> None:
    """Refuse ``snakemake --unlock`` (in ``argv``) while a pipeline run is alive in ``workdir``: it
    would take that run's lock away (the nightly run's own --unlock, under its exclusive hold, passes)."""
    if "--unlock" not in argv or os.environ.get(HELD_ENV):
        return
    if run_alive(workdir):
        raise RunLockBusy(f"a pipeline run is alive in {Path(workdir).resolve()} (it holds {run_lock_path(workdir)}); "
                          f"not unlocking it (its lock is not stale)")


def run_alive(workdir: str | Path = ".") -> bool:
    """Whether a pipeline run (a process holding the run lock) is alive in ``workdir`` now."""
    with exclusive_run_lock(workdir) as free:
        return not free
