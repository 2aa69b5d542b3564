"""Ingest: raw patterns + acquisition metadata → ``data.zarr``, validated, oriented and checksummed.

The acquisition metadata is the YAML (``--meta``) over the pattern file's header: values the file
header carries (:mod:`ptycore.data.formats`) fill the keys the YAML leaves out, and the YAML
overrides the header; ``provenance.metadata_sources`` records where each key came from. Without
``--meta`` every required key must come from the header.

The patterns are streamed: a lazy view of the file (:mod:`ptycore.data.readers`) becomes a dask
array chunked along the scan, each chunk is checked and oriented, and written to the zarr array
chunk by chunk; the whole 4D array is never in memory. ``max_memory_mb`` sets the chunk size (the
working memory for patterns, on top of the interpreter and its libraries).

``data.zarr`` (zarr v3):

* ``patterns`` ``(n_pos, ky, kx)`` float32, zero frequency near the centre as the detector
  recorded it, chunked along ``n_pos``; the detector orientation fix of the metadata
  (``detector_flip``: transpose first, then flip_y, then flip_x) is applied here, once.
* ``positions_A`` ``(n_pos, 2)`` float32, nominal probe positions (y, x) in Å; position index
  ``iy * nx + ix``; scan index (0, 0) at (0, 0) Å; see :func:`scan_positions_A` for the rotation.
* ``detector_mask`` ``(ky, kx)`` bool, True = good pixel, oriented like the patterns (all True
  when no mask is given; see :mod:`ptycore.data.mask`). Non-finite values at bad pixels are
  stored as 0; the checks below look at good pixels only.
* attrs ``metadata`` (the validated acquisition record), ``scan_shape``, ``wavelength_A``,
  ``detector_pixel_mrad``, ``detector_shape``, ``stats`` (counts), ``orientation_applied``,
  ``detector_mask_bad_pixels``, ``provenance`` (with the sha256 of the pattern file, of every other
  file read — .hdr, .xml, Arina data files, mask file — and of the metadata file; the header
  values read, ``metadata_sources`` and the mask's sources).

Checks, per chunk while streaming (a failure names the frame and scan position, and no store is
left behind): every value finite; no value below the negative limit. Small negative values from
read noise or dark subtraction are normal and kept (``preprocess`` clips them); a frame is
rejected when a value is below ``-negative_tolerance`` (data units), or, by default, below
``-max(1, 0.05 * max(frame))``: more negative than 5 % of the frame's brightest pixel is not read
noise but a sign or offset error.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ptycore.data.metadata import (
    AcquisitionMetadata,
    DetectorFlip,
    check_pattern_axes,
    merge_header,
    parse_metadata,
    read_metadata_record,
)
from ptycore.data.readers import Frames, PatternSource, open_patterns
from ptycore.errors import InvalidArgument, InvalidData

MAX_CHUNK_PATTERNS = 256
DEFAULT_MAX_MEMORY_MB = 1024
#: default negative limit: -max(NEGATIVE_FLOOR, NEGATIVE_FRACTION * max(frame))
NEGATIVE_FLOOR = 1.0
NEGATIVE_FRACTION = 0.05


def scan_positions_A(scan_shape, scan_step_A, rotation_deg: float = 0.0) -> np.ndarray:
    """Nominal probe positions ``(ny * nx, 2)`` as (y, x) in Å, index ``iy * nx + ix``.

    The unrotated grid puts scan index (iy, ix) at ``(iy * dy, ix * dx)``. ``rotation_deg`` turns
    it about scan index (0, 0) from the x axis towards the y axis (y down, x right as arrays are
    shown): ``x' = x cos t - y sin t``, ``y' = x sin t + y cos t``; at 90° the fast scan (ix)
    runs along +y.
    """
    ny, nx = (int(s) for s in scan_shape)
    iy, ix = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    y, x = (iy * scan_step_A[0]).ravel(), (ix * scan_step_A[1]).ravel()
    t = math.radians(rotation_deg)
    xr = x * math.cos(t) - y * math.sin(t)
    yr = x * math.sin(t) + y * math.cos(t)
    return np.stack([yr, xr], axis=-1).astype(np.float32)


def orient(patterns: np.ndarray, flip: DetectorFlip) -> np.ndarray:
    """Apply the detector orientation fix to ``(..., ky, kx)``: transpose, then flip_y, then flip_x."""
    if flip.transpose:
        patterns = np.swapaxes(patterns, -1, -2)
    if flip.flip_y:
        patterns = patterns[..., ::-1, :]
    if flip.flip_x:
        patterns = patterns[..., :, ::-1]
    return patterns


def detector_pixel_mrad(meta: AcquisitionMetadata, wavelength: float) -> float:
    return float(meta.detector_pixel_mrad_at(wavelength))


def check_convergence_fits(meta: AcquisitionMetadata, detector_shape, pixel_mrad: float, where: str) -> None:
    """The bright-field disk (radius ``convergence_mrad``) must lie inside the detector."""
    half = min(detector_shape) / 2
    edge = half * pixel_mrad
    if meta.convergence_mrad > edge:
        raise InvalidData(f"{where}: convergence_mrad: {meta.convergence_mrad:g} mrad lies outside the detector "
                          f"(its edge is {edge:.4g} mrad from the centre: {half:g} px of {pixel_mrad:.4g} mrad)")


def chunk_patterns_for(frames: Frames, max_memory_mb: float, workers: int, chunk_patterns: int | None) -> int:
    """Patterns per chunk: what fits the memory budget with ``workers`` chunks in flight (plus one),
    counting the read block, its float32 copy, the oriented copy and zarr's encode buffers; at most
    256; aligned to whole scan rows (or a divisor of a row) for 4-D files."""
    ky, kx = frames.shape[1:]
    per_pattern = ky * kx * (frames.dtype.itemsize + 16)
    if chunk_patterns is None:
        budget = max_memory_mb * 2**20
        chunk = int(budget // ((workers + 1) * per_pattern))
        if chunk < 1:
            need = (workers + 1) * per_pattern / 2**20
            raise InvalidArgument(f"--max-memory-mb {max_memory_mb:g} is too small for one {ky}x{kx} pattern "
                                  f"per worker (needs at least {need:.2f} MB with {workers} workers)")
        chunk = min(chunk, MAX_CHUNK_PATTERNS)
    else:
        if chunk_patterns < 1:
            raise InvalidArgument(f"--chunk-patterns must be >= 1, got {chunk_patterns}")
        chunk = chunk_patterns
    chunk = min(chunk, frames.shape[0])
    if frames.scan_shape is not None:
        nx = frames.scan_shape[1]
        if chunk >= nx:
            chunk = chunk // nx * nx
        else:
            chunk = max(d for d in range(1, chunk + 1) if nx % d == 0)
    return chunk


def _scan_index(i: int, scan_shape) -> str:
    iy, ix = divmod(int(i), int(scan_shape[1]))
    return f"frame {int(i)} (scan y={iy}, x={ix})"


def check_block(data: np.ndarray, offset: int, label: str, scan_shape, negative_tolerance: float | None,
                good: np.ndarray | None = None) -> None:
    """Raise :class:`InvalidData` for a NaN/Inf value or counts below the negative limit (at the
    ``good`` pixels only, when a detector mask is given)."""
    pixels = data.reshape(len(data), -1) if good is None else data[:, good]
    finite = np.isfinite(pixels)
    if not finite.all():
        i = int(np.argmin(finite.all(axis=1)))
        n_bad = int(np.size(finite[i]) - np.count_nonzero(finite[i]))
        raise InvalidData(f"{label}: {_scan_index(offset + i, scan_shape)} contains NaN or Inf "
                          f"({n_bad} pixels" + (", not masked" if good is not None else "") + ")")
    if pixels.shape[1] == 0:
        return
    lows = pixels.min(axis=1)
    if negative_tolerance is None:
        limits = -np.maximum(NEGATIVE_FLOOR, NEGATIVE_FRACTION * pixels.max(axis=1))
        rule = f"-max({NEGATIVE_FLOOR:g}, {NEGATIVE_FRACTION:g} x frame max)"
    else:
        limits = np.full(len(data), -float(negative_tolerance))
        rule = f"-{negative_tolerance:g} (--negative-tolerance)"
    below = lows < limits
    if below.any():
        i = int(np.argmax(below))
        raise InvalidData(f"{label}: {_scan_index(offset + i, scan_shape)} has negative counts down to "
                          f"{lows[i]:.4g}, below the read-noise limit {limits[i]:.4g} = {rule}")


def detector_mask_for(source: PatternSource, meta: AcquisitionMetadata, where: str,
                      base: Path | None) -> tuple[np.ndarray, list[str], list[Path]]:
    """Good pixels ``(ky, kx)`` in the reader's frame: the detector's own mask, the metadata's
    ``detector_mask`` file and ``bad_pixels``; with the sources and the files read."""
    from ptycore.data.mask import bad_pixels_mask, load_mask_file

    shape = tuple(source.frames.shape[1:])
    good = np.ones(shape, bool)
    sources, files = [], []
    if source.mask is not None:
        good &= source.mask
        sources.append(source.mask_source)
    if meta.detector_mask is not None:
        file_mask, path = load_mask_file(meta.detector_mask, shape, where, base)
        good &= file_mask
        sources.append(f"detector_mask {path}")
        files.append(path)
    if meta.bad_pixels:
        good &= bad_pixels_mask(meta.bad_pixels, shape, where)
        sources.append(f"bad_pixels of {where} ({len(meta.bad_pixels)})")
    return good, sources, files


def _hints(record: dict, where: str) -> dict:
    """The metadata keys a reader needs before the header is read, checked enough to use."""
    hints = {}
    scan = record.get("scan_shape")
    if isinstance(scan, (list, tuple)) and len(scan) == 2 and all(isinstance(v, int) and v > 0 for v in scan):
        hints["scan_shape"] = tuple(scan)
    if record.get("pattern_axes") is not None:
        try:
            hints["pattern_axes"] = check_pattern_axes(record["pattern_axes"])
        except (ValueError, TypeError) as err:
            raise InvalidData(f"{where}: pattern_axes: {err}") from None
    edge = record.get("chip_edge_px")
    if isinstance(edge, int) and edge >= 0:
        hints["chip_edge_px"] = edge
    return hints


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on the terminal (stderr), or nothing; yields ``advance(n)`` (thread-safe)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def ingest(patterns: str | Path, meta_path: str | Path | None, out: str | Path, *, overwrite: bool = False,
           max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, chunk_patterns: int | None = None,
           negative_tolerance: float | None = None, workers: int = 2, progress: bool = False) -> dict:
    """Validate and write ``out`` (data.zarr); return a short summary. See the module docstring.

    ``meta_path`` None: the whole acquisition record comes from the pattern file's header."""
    import dask
    import dask.array as da

    from ptycore.physics.electron import wavelength_A
    from ptycore.store import atomic_output, checksum, create_store, provenance, refuse_existing, write_array

    if not max_memory_mb > 0:
        raise InvalidArgument(f"--max-memory-mb must be > 0, got {max_memory_mb}")
    if workers < 1:
        raise InvalidArgument(f"--workers must be >= 1, got {workers}")
    if negative_tolerance is not None and not negative_tolerance >= 0:
        raise InvalidArgument(f"--negative-tolerance must be >= 0, got {negative_tolerance}")
    record = read_metadata_record(meta_path) if meta_path is not None else {}
    meta_where = str(meta_path) if meta_path is not None else "metadata (no --meta)"
    out = Path(out)
    refuse_existing(out, overwrite)
    with open_patterns(patterns, **_hints(record, meta_where)) as source:
        frames = source.frames
        label = source.label
        merged, sources = merge_header(record, source.header, meta_where, source.header_source or str(source.path))
        hint = (f" (not in the header of {source.path}; give it in the metadata YAML"
                + (")" if meta_path is not None else ", --meta)"))
        meta = parse_metadata(merged, meta_where, sources=sources, missing_hint=hint)
        scan_shape = tuple(meta.scan_shape)
        where_scan = sources.get("scan_shape", meta_where)
        if frames.scan_shape is not None and tuple(frames.scan_shape) != scan_shape:
            raise InvalidData(f"{label}: patterns {frames.file_shape} have scan shape {list(frames.scan_shape)} "
                              f"but {where_scan} has scan_shape {list(scan_shape)}")
        if frames.shape[0] != scan_shape[0] * scan_shape[1]:
            raise InvalidData(f"{label}: {frames.shape[0]} patterns but {where_scan} scan_shape "
                              f"{list(scan_shape)} needs {scan_shape[0] * scan_shape[1]}")
        good_raw, mask_sources, mask_files = detector_mask_for(
            source, meta, meta_where, Path(meta_path).parent if meta_path is not None else None)
        flip = meta.detector_flip
        det_shape = frames.shape[1:][::-1] if flip.transpose else frames.shape[1:]
        good = np.ascontiguousarray(orient(good_raw, flip))
        all_good = bool(good_raw.all())
        wavelength = wavelength_A(meta.energy_kv)
        pixel_mrad = detector_pixel_mrad(meta, wavelength)
        check_convergence_fits(meta, det_shape, pixel_mrad, sources.get("convergence_mrad", meta_where))
        chunk = chunk_patterns_for(frames, max_memory_mb, workers, chunk_patterns)
        positions = scan_positions_A(scan_shape, meta.scan_step_A, meta.scan_rotation_deg)
        inputs = {str(source.path): checksum(source.path)}
        for extra in [*source.inputs, *mask_files]:
            inputs[str(extra)] = checksum(extra)
        if meta_path is not None:
            inputs[str(meta_path)] = checksum(meta_path)
        n_pos = frames.shape[0]
        n_chunks = math.ceil(n_pos / chunk)

        with atomic_output(out, overwrite=overwrite) as tmp, \
                progress_bar(n_chunks, f"ingest {source.path.name}", progress) as advance:
            group = create_store(tmp)
            target = group.create_array("patterns", shape=(n_pos,) + tuple(det_shape), dtype=np.float32,
                                        chunks=(chunk,) + tuple(det_shape))
            target.attrs.update({"units": "counts", "axes": "n_pos, ky, kx (zero frequency at the centre)"})

            def prepare(block, block_info=None):
                offset = block_info[0]["array-location"][0][0] if block_info else 0
                data = np.asarray(block, dtype=np.float32)
                if not all_good:
                    data = np.where(good_raw | np.isfinite(data), data, np.float32(0))
                check_block(data, offset, label, scan_shape, negative_tolerance, None if all_good else good_raw)
                advance(1)
                return np.ascontiguousarray(orient(data, flip))

            raw = da.from_array(frames, chunks=(chunk,) + frames.shape[1:], asarray=False, lock=False,
                                meta=np.empty((0, 0, 0), frames.dtype), name=f"read-{uuid.uuid4().hex}")
            oriented = raw.map_blocks(prepare, dtype=np.float32, chunks=(raw.chunks[0],) + tuple(
                (s,) for s in det_shape), meta=np.empty((0, 0, 0), np.float32))
            stored = da.store(oriented, target, lock=False, compute=False)
            totals = oriented.sum(axis=(1, 2), dtype=np.float64)
            # our own pool, joined before atomic_output removes the partial store on an error: dask
            # raises at the first bad chunk while other chunks are still being written
            pool = ThreadPoolExecutor(workers)
            try:
                _, totals, low, high = dask.compute(stored, totals, oriented.min(), oriented.max(),
                                                    scheduler="threads", pool=pool)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            write_array(group, "positions_A", positions, attrs={
                "units": "Å", "axes": "n_pos (index iy * nx + ix), (y, x)",
                "frame": "nominal scan: scan index (0, 0) at (0, 0) Å, rotated by scan_rotation_deg"})
            write_array(group, "detector_mask", good, attrs={
                "axes": "ky, kx (oriented like patterns)", "meaning": "True = good pixel",
                "sources": mask_sources})
            stats = {"mean_counts": float(np.mean(totals)), "min_total": float(np.min(totals)),
                     "max_total": float(np.max(totals)), "min_value": float(low), "max_value": float(high)}
            orientation = {**flip.model_dump(), "scan_rotation_deg": meta.scan_rotation_deg}
            group.attrs.update({
                "metadata": meta.model_dump(mode="json", exclude_none=True),
                "scan_shape": list(scan_shape),
                "wavelength_A": wavelength,
                "detector_pixel_mrad": pixel_mrad,
                "detector_shape": list(det_shape),
                "detector_mask_bad_pixels": int(good.size - np.count_nonzero(good)),
                "orientation_applied": orientation,
                "stats": stats,
                "provenance": provenance(
                    verb="ingest",
                    inputs=inputs,
                    patterns={"file": str(source.path), "dataset": source.dataset, "format": source.format,
                              "shape": list(frames.file_shape), "dtype": str(frames.dtype),
                              "pattern_axes": list(frames.axes), "reversed_axes": frames._reverse},
                    header=_jsonable(source.header),
                    metadata_sources=sources,
                    detector_mask={"sources": mask_sources, "bad_pixels": int(good.size - np.count_nonzero(good))},
                    orientation_applied=orientation,
                    chunk_patterns=chunk,
                    max_memory_mb=max_memory_mb,
                    workers=workers,
                    negative_limit=(f"-{negative_tolerance:g}" if negative_tolerance is not None
                                    else f"-max({NEGATIVE_FLOOR:g}, {NEGATIVE_FRACTION:g} x frame max)"),
                ),
            })
    return {"out": out, "n_pos": n_pos, "detector_shape": tuple(det_shape), "chunk_patterns": chunk,
            "bad_pixels": int(good.size - np.count_nonzero(good)), **stats}


def _jsonable(header: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in header.items()}
