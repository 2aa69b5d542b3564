"""Zarr v3 stores: atomic writes, arrays, provenance, checksums and a manifest checked on open.

Every output is written to ``<out>.partial`` and renamed into place only when complete, so a
killed job never leaves a store that looks finished. A store that already exists is never
overwritten unless asked; with ``--overwrite`` the old output is renamed aside, the new one
renamed into place, and only then is the old one deleted (restored if the swap fails, or by the
next run if it was killed between the two renames), so a failed or killed run never loses the
previous result. On an error the temporary output is
removed; a reconstruction keeps its checkpoints for ``--resume`` but not half-written temporary
files (``*.tmp``, ``*.tmp.npz``).

Whole stores. Zarr reads a missing chunk as the fill value (zeros) without complaint, so a store
with a deleted chunk would silently feed zeros downstream. When an output is complete,
:func:`seal_store` records a manifest in the store's root attributes (``ptycore_manifest``):
every file of the store (chunk and metadata files, the root ``zarr.json`` aside) with its size
in bytes and its CRC-32. :func:`open_store` checks on every open that each recorded file is
still there: one ``stat`` per file, so opening a store of thousands of chunks stays in the
milliseconds, where hashing gigabytes on every open would take minutes (that is why contents
are not hashed on open). A chunk whose bytes are damaged fails zarr's decoding when it is read;
the CLI then runs :func:`verify_store` with the CRCs over the stores the verb opened to name the
damaged chunk (``ptycore inspect --verify`` runs the same full check on demand). Stores without
a manifest (written by other tools, or by hand) are opened unchecked. Changing a sealed store by
hand is possible; a chunk it deletes (zarr removes a chunk set entirely to the fill value) is
then reported as missing. The recorded chunk layout does not depend on the codecs or sharding:
every file is listed, whatever ``write_array`` chose.
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
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ptycore.errors import InvalidArgument, InvalidData, StorageError

#: root attribute holding the manifest written by :func:`seal_store`
MANIFEST_KEY = "ptycore_manifest"
#: stores opened by :func:`open_store` in this process, for naming a damaged one after a read error
_opened: list[Path] = []


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def refuse_existing(out: str | Path, overwrite: bool = False) -> None:
    """Raise before any compute if ``out`` exists and may not be replaced, or cannot be written."""
    if Path(out).exists() and not overwrite:
        raise InvalidArgument(f"{out}: output already exists (remove it or pass --overwrite)")
    check_writable(out)


def check_writable(out: str | Path) -> None:
    """Raise :class:`StorageError` if ``out`` could not be created: its nearest existing parent is
    a file, or a directory this process may not write (read-only file system, permissions).
    Cheap and without side effects (``access(2)``), so verbs call it before any compute."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StorageError(f"{out}: cannot be created, {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise StorageError(f"{out}: cannot be created, {parent} {why}")


def open_input(path: str | Path, arrays: tuple[str, ...], made_by: str) -> zarr.Group:
    """Open an input store and check it holds ``arrays`` (it should come from 'ptycore made_by')."""
    group = open_store(path)
    for name in arrays:
        if name not in group:
            raise InvalidData(f"{path}: no {name!r} array (is this a store from 'ptycore {made_by}'?)")
    return group


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_temporaries(tmp: Path) -> None:
    """Delete half-written temporary files (``*.tmp``, ``*.tmp.npz``, ...) below ``tmp``."""
    if not tmp.is_dir():
        return
    for p in sorted(tmp.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if ".tmp" in p.suffixes:
            _remove(p)


def _zarr_roots(tmp: Path) -> list[Path]:
    """The zarr stores an output consists of: ``tmp`` itself, or its top-level ``*/zarr.json`` dirs."""
    if (tmp / "zarr.json").is_file():
        return [tmp]
    if not tmp.is_dir():
        return []
    return sorted(p.parent for p in tmp.glob("*/zarr.json"))


def _recover_aside(out: Path) -> None:
    """A run killed between the two renames of :func:`_replace` leaves the old output at
    ``<out>.old-PID``: put it back if ``out`` is missing, delete it if the new one made it."""
    asides = sorted(out.parent.glob(f"{out.name}.old-*")) if out.parent.is_dir() else []
    for aside in asides:
        if not out.exists():
            os.replace(aside, out)
        else:
            _remove(aside)


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is renamed aside first and deleted only after
    the new one is in place (and put back if the move fails)."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    aside = out.with_name(f"{out.name}.old-{os.getpid()}")
    _remove(aside)
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _remove(aside)


@contextlib.contextmanager
def atomic_output(out: str | Path, *, overwrite: bool = False, keep_partial_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``out`` into; seal its stores and rename it to ``out`` on success.

    On error the temporary path is removed (or, for checkpoints, kept without its ``*.tmp*``
    files) and ``out`` is untouched. An existing ``out`` (with ``overwrite``) is replaced only
    once the new output is complete (see the module docstring).
    """
    out = Path(out)
    _recover_aside(out)
    refuse_existing(out, overwrite)
    tmp = partial_path(out)
    if (tmp.exists() or tmp.is_symlink()) and not keep_partial_on_error:
        _remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        for root in _zarr_roots(tmp):
            seal_store(root)
    except BaseException:
        if keep_partial_on_error:
            _remove_temporaries(tmp)
        else:
            _remove(tmp)
        raise
    try:
        _replace(tmp, out)
    except BaseException:
        if not keep_partial_on_error:
            _remove(tmp)
        raise


def create_store(path: str | Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="w", zarr_format=3)


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an existing store, raising :class:`InvalidData` with the path if it is not one or if
    a file its manifest lists is missing (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InvalidData(f"{path}: store not found")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as err:  # zarr raises several types for a non-store
        raise InvalidData(f"{path}: not a zarr store ({err.__class__.__name__})") from None
    check_complete(path, group)
    if path not in _opened:
        _opened.append(path)
    return group


def _manifest_of(path: Path, group: zarr.Group | None = None) -> dict | None:
    if group is None:
        group = zarr.open_group(str(path), mode="r")
    manifest = group.attrs.get(MANIFEST_KEY)
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _describe(rel: str) -> str:
    """'patterns/c/3/0/0' -> "array 'patterns' chunk c/3/0/0"; 'history/loss/zarr.json' -> its metadata."""
    if "/c/" in f"/{rel}":
        name, _, key = f"/{rel}".partition("/c/")
        return f"array {name.strip('/')!r} chunk c/{key}"
    if rel == "c" or rel.startswith("c/"):
        return f"chunk {rel}"
    node = rel.removesuffix("zarr.json").strip("/")
    return f"metadata of {node!r}" if node else "root metadata"


def seal_store(path: str | Path) -> None:
    """Record the manifest (every file, its size and CRC-32) in the root attributes of the store."""
    path = Path(path)
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel != "zarr.json":
            files[rel] = [f.stat().st_size, _crc32(f)]
    zarr.open_group(str(path), mode="r+").attrs[MANIFEST_KEY] = {"format": 1, "checksum": "crc32", "files": files}


def check_complete(path: str | Path, group: zarr.Group | None = None) -> None:
    """Raise :class:`InvalidData` naming the first file of the manifest that is missing (cheap: stat only)."""
    path = Path(path)
    manifest = _manifest_of(path, group)
    if manifest is None:
        return
    missing = [rel for rel in manifest["files"] if not (path / rel).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        raise InvalidData(f"{path}: {_describe(missing[0])} is missing{more}: the store is incomplete (deleted or "
                          "lost files would read as zeros); write it again")


def verify_store(path: str | Path) -> int:
    """Full check of a sealed store: every file present with the size and CRC-32 it was written
    with. Returns the number of files checked (0: no manifest); raises :class:`InvalidData`."""
    path = Path(path)
    manifest = _manifest_of(path)
    if manifest is None:
        return 0
    check_complete(path)
    for rel, (size, crc) in manifest["files"].items():
        f = path / rel
        actual = f.stat().st_size
        if actual != size:
            raise InvalidData(f"{path}: {_describe(rel)} is corrupt ({actual} bytes, written as {size}); "
                              "write the store again")
        if _crc32(f) != crc:
            raise InvalidData(f"{path}: {_describe(rel)} is corrupt (its bytes differ from those written); "
                              "write the store again")
    return len(manifest["files"])


def opened_stores() -> list[Path]:
    """Stores opened by :func:`open_store` in this process, in order."""
    return list(_opened)


def forget_opened() -> None:
    _opened.clear()


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
