"""Readers for raw 4D-STEM patterns: one lazy ``(n_pos, ky, kx)`` view over any supported file.

``--patterns FILE[:dataset-path]`` names the file and, where the file holds several arrays, which
one. Formats are chosen by extension, or by content for HDF5 (an Arina master, an EMD / py4DSTEM
file, or plain HDF5). The facility detector formats (Merlin ``.mib``, Gatan ``.dm3/.dm4``, EMPAD
``.xml``/``.raw``, Dectris Arina, Velox / Berkeley EMD and py4DSTEM, MRC) are read through
rosettasciio with their headers: see :mod:`ptycore.data.formats`. Here, the plain arrays:

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
``.raw``                  EMPAD without its xml: float32 frames of 128 x 130 pixels, the last two
                          rows of each frame are metadata and are dropped; the number of frames
                          must equal ``prod(scan_shape)`` from the acquisition metadata.
``.zarr`` (directory)     a zarr array, or an array inside a zarr group (v2 or v3).
========================  =====================================================================

Axis order: ``pattern_axes`` in the metadata names the array's axes (e.g. ``[ky, kx, n_pos]`` as
fold_slice keeps ``dp``, ``[scan_y, scan_x, kx, ky]`` for a transposed detector; for a ``.mat``
file in MATLAB's order). Without it, a plain array is ``(scan_y, scan_x, ky, kx)`` or
``(n_pos, ky, kx)``, or detector-first ``(ky, kx, scan_y, scan_x)`` / ``(ky, kx, n_pos)`` where
only that layout fits the scan shape; where both fit, ingest asks for ``pattern_axes``. The view
flattens the scan (position index ``iy * nx + ix``) and reads only the frames asked for.
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
#: formats read through rosettasciio (see ptycore.data.formats), by extension
RSCIIO_SUFFIXES = {".mib": "merlin", ".dm3": "dm", ".dm4": "dm", ".mrc": "mrc"}
EMPAD_FRAME = (130, 128)  # rows, columns of one raw frame (two metadata rows at the bottom)
EMPAD_DETECTOR = (128, 128)
FORMATS = ("HDF5 (.h5/.hdf5/.nxs/.cxi), Merlin .mib, Gatan .dm3/.dm4, EMPAD .xml/.raw, Dectris Arina _master.h5, "
           "EMD (Velox, Berkeley, py4DSTEM), MRC, .npy, .npz, MATLAB .mat (v5, v7.3), zarr")


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


DEFAULT_AXES = {3: ("n_pos", "ky", "kx"), 4: ("scan_y", "scan_x", "ky", "kx")}
#: the layouts told apart by shape alone when pattern_axes is not given (a scan-first array as
#: numpy, HDF5 and zarr writers make it; a detector-first one as fold_slice / MATLAB make it)
INFERRED_AXES = {3: [("n_pos", "ky", "kx"), ("ky", "kx", "n_pos")],
                 4: [("scan_y", "scan_x", "ky", "kx"), ("ky", "kx", "scan_y", "scan_x")]}


def infer_axes(shape: tuple[int, ...], scan_shape, label: str) -> tuple[str, ...]:
    """The axis order of an array of ``shape`` given the scan: the one conventional layout that
    fits, the scan-first default when none fits (the shape check then names the mismatch), and an
    error asking for ``pattern_axes`` when both fit."""
    ndim = len(shape)
    if ndim not in DEFAULT_AXES or scan_shape is None:
        return DEFAULT_AXES.get(ndim, ())
    ny, nx = (int(s) for s in scan_shape)
    fits = [axes for axes in INFERRED_AXES[ndim]
            if all(shape[i] == {"n_pos": ny * nx, "scan_y": ny, "scan_x": nx}.get(a, shape[i])
                   for i, a in enumerate(axes))]
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        raise InvalidData(f"{label}: patterns of shape {tuple(shape)} with scan_shape {[ny, nx]} could be "
                          f"{list(fits[0])} or {list(fits[1])}; set pattern_axes in the metadata")
    return DEFAULT_AXES[ndim]


class Frames:
    """Lazy ``(n_pos, ky, kx)`` view over a 3-D or 4-D array-like (h5py dataset, memmap, zarr or
    dask array) whose axes are in any order.

    ``reverse_axes`` reads an array stored with its axes reversed (MATLAB v7.3): ``axes`` then
    names the axes in MATLAB's order. ``axes`` (``pattern_axes`` of the metadata) names each axis
    of the array, from scan_y, scan_x, n_pos, ky, kx; the default is (scan_y, scan_x, ky, kx) or
    (n_pos, ky, kx). Indexing with a slice along the first axis reads only those frames (a block
    of scan rows for a 4-D array); this is what ``dask.array.from_array`` calls. A layout whose
    scan axes are not the slowest reads with a stride (slower, still bounded in memory).
    """

    def __init__(self, array, label: str, *, reverse_axes: bool = False, axes=None):
        from ptycore.data.metadata import check_pattern_axes

        self._array = array
        self._reverse = reverse_axes
        self.label = label
        raw = tuple(int(s) for s in array.shape)
        shape = raw[::-1] if reverse_axes else raw
        if len(shape) not in (3, 4):
            raise InvalidData(f"{label}: patterns must be (scan_y, scan_x, ky, kx) or (n_pos, ky, kx) (or another "
                              f"order named by pattern_axes), got an array of shape {shape}")
        axes = DEFAULT_AXES[len(shape)] if axes is None else tuple(axes)
        try:
            check_pattern_axes(axes)
        except ValueError as err:
            raise InvalidData(f"{label}: pattern_axes: {err}") from None
        if len(axes) != len(shape):
            raise InvalidData(f"{label}: pattern_axes {list(axes)} names {len(axes)} axes but the array has "
                              f"{len(shape)} (shape {shape})")
        self.axes = axes
        self.file_shape = shape
        size = dict(zip(axes, shape, strict=True))
        self.scan_shape = (size["scan_y"], size["scan_x"]) if "scan_y" in size else None
        n_pos = size["scan_y"] * size["scan_x"] if "scan_y" in size else size["n_pos"]
        self.shape = (n_pos, size["ky"], size["kx"])
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        if self.dtype.kind not in "uif":
            raise InvalidData(f"{label}: patterns must be real numbers, got dtype {self.dtype}")
        if min(self.shape) < 1:
            raise InvalidData(f"{label}: patterns array is empty (shape {shape})")

    @property
    def frame_nbytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def _raw(self, by_axis: dict[str, slice]) -> np.ndarray:
        """Read the block selected per axis name and return it in (scan..., ky, kx) order."""
        key = tuple(by_axis.get(a, slice(None)) for a in self.axes)
        order = [self.axes.index(a) for a in DEFAULT_AXES[len(self.axes)]]
        try:
            block = self._array[key[::-1]] if self._reverse else self._array[key]
            if hasattr(block, "compute"):  # a dask array (rosettasciio's lazy readers)
                block = block.compute(scheduler="synchronous")
            block = np.asarray(block)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise InvalidData(f"{self.label}: cannot read the patterns ({_first_line(err)}); "
                              "is the file truncated or its compression filter unavailable?") from None
        if self._reverse:
            block = block.transpose()
        return block.transpose(order) if order != sorted(order) else block

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start`` to ``stop - 1`` as an array ``(stop - start, ky, kx)`` of the file's dtype."""
        n, ky, kx = self.shape
        start, stop = max(0, start), min(n, stop)
        if stop <= start:
            return np.empty((0, ky, kx), self.dtype)
        if self.scan_shape is None:
            return self._raw({"n_pos": slice(start, stop)})
        nx = self.scan_shape[1]
        y0, x0 = divmod(start, nx)
        y1, x1 = divmod(stop - 1, nx)
        if y0 == y1:
            return self._raw({"scan_y": slice(y0, y0 + 1), "scan_x": slice(x0, x1 + 1)}).reshape(-1, ky, kx)
        rows = self._raw({"scan_y": slice(y0, y1 + 1)}).reshape(-1, ky, kx)
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
    #: acquisition values from the file header (metadata keys and units), and where they were read
    header: dict = field(default_factory=dict)
    header_source: str | None = None
    #: the detector's own mask (ky, kx) as read, True = good pixel, and where it came from
    mask: np.ndarray | None = None
    mask_source: str | None = None
    #: other files the patterns were read from (checksummed in the provenance)
    inputs: list[Path] = field(default_factory=list)
    #: the reader knows the axis order (only an explicit pattern_axes changes it)
    fixed_axes: bool = False

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
    return PatternSource(path, name, "matlab-v7.3" if matlab else "hdf5", frames, _close=f.close)


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


def detect_format(path: Path, dataset: str | None = None) -> str:
    from ptycore.data import formats

    suffix = path.suffix.lower()
    if path.is_dir():
        return "zarr"
    if suffix in RSCIIO_SUFFIXES:
        return RSCIIO_SUFFIXES[suffix]
    if suffix == ".xml":
        return "empad-xml"
    if suffix == ".raw":
        return "empad-xml" if dataset is None and formats.empad_xml_for(path) is not None else "raw"
    if suffix in {".npy", ".npz", ".mat", ".zarr"}:
        return suffix[1:]
    import h5py

    if suffix in HDF5_SUFFIXES or h5py.is_hdf5(path):
        if dataset is None and h5py.is_hdf5(path):
            if formats.is_arina_master(path):
                return "arina"
            if formats.is_emd(path):
                return "emd"
        if suffix == ".emd" and dataset is None:
            return "emd"
        return "hdf5"
    raise InvalidData(f"{path}: unknown pattern file format {suffix or '(no extension)'!r} (readable: {FORMATS})")


def open_patterns(spec: str | Path, *, scan_shape: tuple[int, int] | None = None, pattern_axes=None,
                  chip_edge_px: int | None = None) -> PatternSource:
    """Open ``FILE[:dataset-path]`` read-only and return a :class:`PatternSource`.

    ``scan_shape`` (from the acquisition metadata, may be None) is needed for EMPAD .raw files
    without their xml, whose frames carry no shape, and to tell array layouts apart;
    ``pattern_axes`` names the array's axes (see :class:`Frames`); ``chip_edge_px`` is the chip
    boundary width flagged on a multi-chip Merlin. Raises :class:`InvalidData` naming the file
    (and dataset) on any problem.
    """
    from ptycore.data import formats

    path, dataset = parse_spec(spec)
    if not path.exists():
        raise InvalidData(f"{path}: pattern file not found")
    fmt = detect_format(path, dataset)
    openers: dict[str, Any] = {
        "hdf5": lambda: _open_hdf5(path, dataset),
        "npy": lambda: _open_npy(path, dataset),
        "npz": lambda: _open_npz(path, dataset),
        "mat": lambda: _open_mat(path, dataset),
        "raw": lambda: _open_empad(path, dataset, scan_shape),
        "zarr": lambda: _open_zarr(path, dataset),
        "empad-xml": lambda: formats.open_empad_xml(path if path.suffix.lower() == ".xml"
                                                    else formats.empad_xml_for(path), dataset),
        "merlin": lambda: formats.open_merlin(path, dataset, scan_shape, chip_edge_px),
        "arina": lambda: formats.open_arina(path, dataset),
        "emd": lambda: formats.open_rsciio_stack(path, dataset, "emd", "emd", "EMD"),
        "dm": lambda: formats.open_rsciio_stack(path, dataset, "digitalmicrograph", "digitalmicrograph",
                                                "Gatan DigitalMicrograph"),
        "mrc": lambda: formats.open_rsciio_stack(path, dataset, "mrc", "mrc", "MRC"),
    }
    source = openers[fmt]()
    try:
        _set_axes(source, scan_shape, pattern_axes)
    except BaseException:
        source.close()
        raise
    return source


def _set_axes(source: PatternSource, scan_shape, pattern_axes) -> None:
    """Re-read the array with the named axes, or the ones its shape shows (see :func:`infer_axes`)."""
    frames = source.frames
    if pattern_axes is None and source.fixed_axes:
        return
    axes = tuple(pattern_axes) if pattern_axes is not None else infer_axes(frames.file_shape, scan_shape, source.label)
    if axes != frames.axes:
        source.frames = Frames(frames._array, frames.label, reverse_axes=frames._reverse, axes=axes)
