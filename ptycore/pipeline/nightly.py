"""The nightly run (``workflow/scripts/nightly.sh``, from cron): every dataset of the config and of
its inbox, evaluated and aggregated, with ``--keep-going`` (a bad dataset fails only its own branch)
and ``--rerun-triggers mtime`` (a dataset is redone only when its files change, not when the
workflow's code or parameters do).

One nightly run at a time: a run that finds the nightly lock (``PTYCORE_NIGHTLY_LOCK``, default
``.nightly.lock``) held skips the night. A Snakemake lock left behind by a killed run is cleared
first, but only when it is provably stale, i.e. no pipeline run is alive in the working directory
(:mod:`ptycore.pipeline.lock`); while a manual run is going, the night is skipped instead.

    python -m ptycore.pipeline.nightly [SNAKEMAKE ARGUMENTS ...]

``PTYCORE_PROFILE`` names the profile (default ``profiles/slurm``); the extra arguments go to
snakemake (``-n``: what tonight would run; ``--directory DIR``: the working directory).
Exit status: snakemake's; 0 for a skipped night.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ptycore.pipeline.lock import HELD_ENV, exclusive_run_lock, run_lock_path


def working_directory(args: list[str]) -> Path:
    """The working directory snakemake will run in: its ``--directory``/``-d`` argument, else here."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--directory", "-d")
    known, _ = parser.parse_known_args(args)
    return Path(known.directory or ".")


def snakemake_command(profile: str, args: list[str]) -> list[str]:
    """The night's snakemake command: default target ``all``. Options that take several values are
    written ``--option=value``, so that no later argument is read as one more value."""
    return [_snakemake(), "--profile", profile, "--keep-going", "--rerun-incomplete", "--rerun-triggers=mtime", *args]


def _snakemake() -> str:
    return shutil.which("snakemake") or "snakemake"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    profile = os.environ.get("PTYCORE_PROFILE") or "profiles/slurm"
    nightly_lock = Path(os.environ.get("PTYCORE_NIGHTLY_LOCK") or ".nightly.lock")
    print(f"== ptycore nightly {dt.datetime.now().isoformat(timespec='seconds')} profile={profile}", flush=True)
    lock_file = open(nightly_lock, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"previous nightly run still going (lock {nightly_lock}); skipping", flush=True)
        return 0
    workdir = working_directory(args)
    with exclusive_run_lock(workdir) as no_run_alive:
        if not no_run_alive:
            print(f"a pipeline run is going in {workdir.resolve()} (it holds {run_lock_path(workdir)}); "
                  f"skipping tonight, its lock and outputs untouched", flush=True)
            return 0
        # No pipeline run is alive here, and none can start while this block holds the run lock:
        # a Snakemake lock left by a killed run is stale, clear it.
        env = dict(os.environ, **{HELD_ENV: str(run_lock_path(workdir).resolve())})
        subprocess.run([_snakemake(), "--profile", profile, "--unlock", *args], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the night itself; it keeps the nightly lock (inherited) until it ends
    os.set_inheritable(lock_file.fileno(), True)
    cmd = snakemake_command(profile, args)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
