"""Zarr v3 stores: atomic writes, arrays, provenance and checksums.

Every output is written to ``<out>.partial`` and renamed into place only when complete, so a
killed job never leaves a store that looks finished. A store that already exists is never
overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ptycore.errors import InvalidArgument, InvalidData


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def refuse_existing(out: str | Path, overwrite: bool = False) -> None:
    """Raise before any compute if ``out`` exists and may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise InvalidArgument(f"{out}: output already exists (remove it or pass --overwrite)")


def open_input(path: str | Path, arrays: tuple[str, ...], made_by: str) -> zarr.Group:
    """Open an input store and check it holds ``arrays`` (it should come from 'ptycore made_by')."""
    group = open_store(path)
    for name in arrays:
        if name not in group:
            raise InvalidData(f"{path}: no {name!r} array (is this a store from 'ptycore {made_by}'?)")
    return group


@contextlib.contextmanager
def atomic_output(out: str | Path, *, overwrite: bool = False, keep_partial_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``out`` into; rename it to ``out`` on success.

    On error the temporary path is removed (or kept, for checkpoints) and ``out`` is untouched.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    tmp = partial_path(out)
    if tmp.exists() and not keep_partial_on_error:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_partial_on_error and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def create_store(path: str | Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="w", zarr_format=3)


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing store, raising :class:`InvalidData` with the path if it is not one."""
    path = Path(path)
    if not path.exists():
        raise InvalidData(f"{path}: store not found")
    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as err:  # zarr raises several types for a non-store
        raise InvalidData(f"{path}: not a zarr store ({err.__class__.__name__})") from None


def write_array(group: zarr.Group, name: str, data, *, chunks: Any = "auto", attrs: Mapping | None = None):
    """Write ``data`` as a compressed array ``name`` (nested names like 'history/loss' allowed)."""
    data = np.asarray(data)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, overwrite=True)
    arr[...] = data
    if attrs:
        arr.attrs.update(dict(attrs))
    return arr


def checksum(path: str | Path) -> str:
    """sha256 over a file, or over every file of a directory (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def provenance(**extra: Any) -> dict:
    """The common provenance record: versions, host, Slurm job, time; plus ``extra`` fields."""
    import ptycore

    record = {
        "ptycore_version": ptycore.__version__,
        "git_commit": git_commit(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "optax", "numpy", "zarr", "abtem")},
        "python": platform.python_version(),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "created": now_iso(),
    }
    record.update(extra)
    return json.loads(json.dumps(record, default=str))
