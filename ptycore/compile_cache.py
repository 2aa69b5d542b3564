"""JAX's persistent compilation cache for every ``ptycore`` process.

A Snakemake DAG starts one process per rule, a nightly batch runs the same plan on many datasets
of the same shape, and ``--resume`` restarts a stage: each would compile the same programs again
(tens of seconds on a CPU, more for multislice and networks). With the cache the compiled
executable is read back from disk instead (keyed by JAX on the program, its shapes, the compile
options and the backend, so a different plan, shape or device compiles anew and nothing stale is
reused). The compiled numbers are the same either way.

Where: ``$PTYCORE_COMPILATION_CACHE`` (a folder; ``off`` disables it), else
``$XDG_CACHE_HOME/ptycore/jax`` (``~/.cache/ptycore/jax``). A ``JAX_COMPILATION_CACHE_DIR`` set by
the user is left to JAX. A folder that cannot be created is skipped silently: the cache only saves
time. JAX's own settings apply as usual (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``: only
programs that took at least that long to compile are stored, 1 s by default).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PTYCORE_COMPILATION_CACHE"


def cache_dir() -> Path | None:
    """The folder ``enable()`` would use, or None where the cache is off or left to JAX."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = os.environ.get(ENV, "").strip()
    if value.lower() in {"off", "0", "false", "no", "none"}:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ptycore" / "jax"


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (before the first compile).
    Returns the folder, or None where the cache stays off."""
    path = cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
