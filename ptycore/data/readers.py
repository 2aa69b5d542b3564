"""Readers for raw 4D-STEM patterns: one lazy ``(n_pos, ky, kx)`` view over any supported file.

``--patterns FILE[:dataset-path]`` names the file and, where the file holds several arrays, which
one. Supported formats (chosen by extension, or by content for an unknown extension):

========================  =====================================================================
``.h5 .hdf5 .hdf .nxs     HDF5 through h5py, with the hdf5plugin filters registered (bitshuffle/LZ4,
.emd .cxi``               Blosc, Zstd, ...). Without a dataset path the only dataset with >= 3
                          dimensions is used; several candidates are an error that lists them.
``.npy``                  memory-mapped (never loaded whole).
``.npz``                  one member (by name, or the only one with >= 3 dimensions); a member of a
                          zip archive cannot be memory-mapped, so that one array is loaded.
``.mat``                  MATLAB v7.3 (HDF5 inside) is read lazily with its axes reversed, so the
                          array has the shape MATLAB shows; v5 and older through scipy.io (the one
                          variable is loaded).
``.raw``                  EMPAD: float32 frames of 128 x 130 pixels, the last two rows of each frame
                          are metadata and are dropped; the number of frames must equal
                          ``prod(scan_shape)`` from the acquisition metadata.
``.zarr`` (directory)     a zarr array, or an array inside a zarr group (v2 or v3).
========================  =====================================================================

Arrays are ``(scan_y, scan_x, ky, kx)`` or ``(n_pos, ky, kx)``; the view flattens the scan
(position index ``iy * nx + ix``) and reads only the frames asked for.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptycore.errors import InvalidData

HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".emd", ".cxi"}
EMPAD_FRAME = (130, 128)  # rows, columns of one raw frame (two metadata rows at the bottom)
EMPAD_DETECTOR = (128, 128)
FORMATS = "HDF5 (.h5/.hdf5), .npy, .npz, MATLAB .mat (v5, v7.3), EMPAD .raw, zarr"


def parse_spec(spec: str | Path) -> tuple[Path, str | None]:
    """Split ``FILE[:dataset-path]``: the longest prefix (before a ':') that exists is the file."""
    text = str(spec)
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    cuts = [i for i, ch in enumerate(text) if ch == ":"]
    for i in reversed(cuts):
        if Path(text[:i]).exists():
            return Path(text[:i]), text[i + 1 :] or None
    return Path(text[: cuts[0]]), text[cuts[0] + 1 :] or None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else err.__class__.__name__


class Frames:
    """Lazy ``(n_pos, ky, kx)`` view over a 3-D or 4-D array-like (h5py dataset, memmap, zarr array).

    ``reverse_axes`` reads an array stored with its axes reversed (MATLAB v7.3). Indexing with a
    slice along the first axis reads only those frames; this is what ``dask.array.from_array``
    calls.
    """

    def __init__(self, array, label: str, *, reverse_axes: bool = False):
        self._array = array
        self._reverse = reverse_axes
        self.label = label
        raw = tuple(int(s) for s in array.shape)
        shape = raw[::-1] if reverse_axes else raw
        if len(shape) not in (3, 4):
            raise InvalidData(f"{label}: patterns must be (scan_y, scan_x, ky, kx) or (n_pos, ky, kx), "
                              f"got an array of shape {shape}")
        self.file_shape = shape
        self.scan_shape = shape[:2] if len(shape) == 4 else None
        n_pos = shape[0] * shape[1] if len(shape) == 4 else shape[0]
        self.shape = (n_pos, shape[-2], shape[-1])
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        if self.dtype.kind not in "uif":
            raise InvalidData(f"{label}: patterns must be real numbers, got dtype {self.dtype}")
        if min(self.shape) < 1:
            raise InvalidData(f"{label}: patterns array is empty (shape {shape})")

    @property
    def frame_nbytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _raw(self, key: tuple) -> np.ndarray:
        try:
            if self._reverse:
                return np.asarray(self._array[key[::-1]]).transpose()
            return np.asarray(self._array[key])
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise InvalidData(f"{self.label}: cannot read the patterns ({_first_line(err)}); "
                              "is the file truncated or its compression filter unavailable?") from None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start`` to ``stop - 1`` as an array ``(stop - start, ky, kx)`` of the file's dtype."""
        n, ky, kx = self.shape
        start, stop = max(0, start), min(n, stop)
        if stop <= start:
            return np.empty((0, ky, kx), self.dtype)
        full = slice(None)
        if self.scan_shape is None:
            return self._raw((slice(start, stop), full, full))
        nx = self.scan_shape[1]
        y0, x0 = divmod(start, nx)
        y1, x1 = divmod(stop - 1, nx)
        if y0 == y1:
            return self._raw((slice(y0, y0 + 1), slice(x0, x1 + 1), full, full)).reshape(-1, ky, kx)
        rows = self._raw((slice(y0, y1 + 1), full, full, full)).reshape(-1, ky, kx)
        return rows[x0 : x0 + (stop - start)]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        first = key[0]
        if isinstance(first, (int, np.integer)):
            block = self.read(int(first), int(first) + 1)[0]
            return block[key[1:]] if len(key) > 1 else block
        if not isinstance(first, slice):
            raise TypeError("Frames supports slices along the first axis only")
        start, stop, step = first.indices(self.shape[0])
        block = self.read(start, stop) if step == 1 else self.read(start, stop)[::step]
        return block[(slice(None),) + tuple(key[1:])] if len(key) > 1 else block


@dataclass
class PatternSource:
    """An opened pattern file: the lazy frames, where they came from, and how to close the file."""

    path: Path
    dataset: str | None
    format: str
    frames: Frames
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset else str(self.path)

    def close(self) -> None:
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _candidates_text(candidates: list[tuple[str, tuple]]) -> str:
    if not candidates:
        return "none with >= 3 dimensions"
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in candidates)


def _choose(path: Path, dataset: str | None, candidates: list[tuple[str, tuple]], what: str) -> str:
    """The dataset to read: the one named, or the only candidate with >= 3 dimensions."""
    if dataset is not None:
        return dataset
    if len(candidates) == 1:
        return candidates[0][0]
    if not candidates:
        raise InvalidData(f"{path}: no {what} with >= 3 dimensions to read patterns from")
    raise InvalidData(f"{path}: several {what}s could hold the patterns, name one as {path}:NAME "
                      f"(candidates: {_candidates_text(candidates)})")


# ---------------------------------------------------------------- HDF5 (and MATLAB v7.3)
def _open_hdf5(path: Path, dataset: str | None, *, matlab: bool = False) -> PatternSource:
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle, LZ4, Blosc, Zstd, ... filters)

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InvalidData(f"{path}: not a readable HDF5 file ({_first_line(err)})") from None
    try:
        candidates: list[tuple[str, tuple]] = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 3 and not name.startswith("#refs#"):
                shape = obj.shape[::-1] if matlab else obj.shape
                candidates.append(("/" + name, shape))

        f.visititems(visit)
        what = "MATLAB variable" if matlab else "dataset"
        name = _choose(path, dataset, candidates, what)
        obj = f.get(name)
        if obj is None:
            raise InvalidData(f"{path}: no {what} {name!r} (candidates: {_candidates_text(candidates)})")
        if not isinstance(obj, h5py.Dataset):
            raise InvalidData(f"{path}: {name!r} is a group, not a dataset "
                              f"(candidates: {_candidates_text(candidates)})")
        frames = Frames(obj, f"{path}:{name}", reverse_axes=matlab)
        frames.read(0, 1), frames.read(frames.shape[0] - 1, frames.shape[0])  # fail early on a bad file
    except BaseException:
        f.close()
        raise
    return PatternSource(path, name, "matlab-v7.3" if matlab else "hdf5", frames, f.close)


# ---------------------------------------------------------------- numpy
def _open_npy(path: Path, dataset: str | None) -> PatternSource:
    if dataset is not None:
        raise InvalidData(f"{path}: a .npy file holds one array; drop ':{dataset}'")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InvalidData(f"{path}: not a readable .npy file ({_first_line(err)})") from None
    return PatternSource(path, None, "npy", Frames(array, str(path)))


def _npz_members(path: Path) -> list[tuple[str, tuple]]:
    members = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = reader(fh)
            members.append((info.filename[: -len(".npy")], shape))
    return members


def _open_npz(path: Path, dataset: str | None) -> PatternSource:
    try:
        members = _npz_members(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise InvalidData(f"{path}: not a readable .npz file ({_first_line(err)})") from None
    big = [(n, s) for n, s in members if len(s) >= 3]
    name = _choose(path, dataset, big, "array")
    if name not in dict(members):
        raise InvalidData(f"{path}: no array {name!r} (candidates: {_candidates_text(big)})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            array = npz[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise InvalidData(f"{path}: cannot read array {name!r} ({_first_line(err)})") from None
    return PatternSource(path, name, "npz", Frames(array, f"{path}:{name}"))


# ---------------------------------------------------------------- MATLAB
def _open_mat(path: Path, dataset: str | None) -> PatternSource:
    import h5py

    if h5py.is_hdf5(path):
        return _open_hdf5(path, dataset, matlab=True)
    import scipy.io

    try:
        variables = scipy.io.whosmat(path)
    except Exception as err:  # scipy raises several types on a damaged file
        raise InvalidData(f"{path}: not a readable MATLAB file ({_first_line(err)})") from None
    big = [(n, tuple(s)) for n, s, _ in variables if len(s) >= 3]
    name = _choose(path, dataset, big, "MATLAB variable")
    if name not in {n for n, _, _ in variables}:
        raise InvalidData(f"{path}: no MATLAB variable {name!r} (candidates: {_candidates_text(big)})")
    try:
        array = scipy.io.loadmat(path, variable_names=[name])[name]
    except Exception as err:
        raise InvalidData(f"{path}: cannot read MATLAB variable {name!r} ({_first_line(err)})") from None
    return PatternSource(path, name, "matlab-v5", Frames(np.asarray(array), f"{path}:{name}"))


# ---------------------------------------------------------------- EMPAD
def _open_empad(path: Path, dataset: str | None, scan_shape: tuple[int, int] | None) -> PatternSource:
    if dataset is not None:
        raise InvalidData(f"{path}: an EMPAD .raw file holds one scan; drop ':{dataset}'")
    frame_bytes = EMPAD_FRAME[0] * EMPAD_FRAME[1] * 4
    size = path.stat().st_size
    if size == 0 or size % frame_bytes:
        raise InvalidData(f"{path}: not an EMPAD raw file: {size} bytes is not a whole number of "
                          f"{EMPAD_FRAME[1]}x{EMPAD_FRAME[0]} float32 frames ({frame_bytes} bytes each)")
    n_frames = size // frame_bytes
    if scan_shape is None:
        raise InvalidData(f"{path}: an EMPAD .raw file needs scan_shape from the acquisition metadata")
    if n_frames != scan_shape[0] * scan_shape[1]:
        raise InvalidData(f"{path}: {n_frames} EMPAD frames but scan_shape {list(scan_shape)} needs "
                          f"{scan_shape[0] * scan_shape[1]}")
    raw = np.memmap(path, dtype="<f4", mode="r", shape=(scan_shape[0], scan_shape[1]) + EMPAD_FRAME)
    frames = Frames(raw[:, :, : EMPAD_DETECTOR[0], :], str(path))
    return PatternSource(path, None, "empad", frames)


# ---------------------------------------------------------------- zarr
def _open_zarr(path: Path, dataset: str | None) -> PatternSource:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a non-store
        raise InvalidData(f"{path}: not a readable zarr store ({_first_line(err)})") from None
    if isinstance(node, zarr.Array):
        if dataset is not None:
            raise InvalidData(f"{path}: is a single zarr array; drop ':{dataset}'")
        return PatternSource(path, None, "zarr", Frames(node, str(path)))
    candidates = [(name, tuple(a.shape)) for name, a in node.members(max_depth=None) if isinstance(a, zarr.Array)]
    big = [(n, s) for n, s in candidates if len(s) >= 3]
    name = _choose(path, dataset, big, "zarr array")
    try:
        array = node[name.strip("/")]
    except (KeyError, FileNotFoundError):
        raise InvalidData(f"{path}: no zarr array {name!r} (candidates: {_candidates_text(big)})") from None
    if not isinstance(array, zarr.Array):
        raise InvalidData(f"{path}: {name!r} is a group, not an array (candidates: {_candidates_text(big)})")
    return PatternSource(path, name, "zarr", Frames(array, f"{path}:{name}"))


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if path.is_dir():
        return "zarr"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in {".npy", ".npz", ".mat", ".raw", ".zarr"}:
        return suffix[1:]
    import h5py

    if h5py.is_hdf5(path):
        return "hdf5"
    raise InvalidData(f"{path}: unknown pattern file format {suffix or '(no extension)'!r} (readable: {FORMATS})")


def open_patterns(spec: str | Path, *, scan_shape: tuple[int, int] | None = None) -> PatternSource:
    """Open ``FILE[:dataset-path]`` read-only and return a :class:`PatternSource`.

    ``scan_shape`` (from the acquisition metadata) is needed for EMPAD files, whose frames carry
    no shape. Raises :class:`InvalidData` naming the file (and dataset) on any problem.
    """
    path, dataset = parse_spec(spec)
    if not path.exists():
        raise InvalidData(f"{path}: pattern file not found")
    fmt = detect_format(path)
    openers: dict[str, Any] = {
        "hdf5": lambda: _open_hdf5(path, dataset),
        "npy": lambda: _open_npy(path, dataset),
        "npz": lambda: _open_npz(path, dataset),
        "mat": lambda: _open_mat(path, dataset),
        "raw": lambda: _open_empad(path, dataset, scan_shape),
        "zarr": lambda: _open_zarr(path, dataset),
    }
    return openers[fmt]()
