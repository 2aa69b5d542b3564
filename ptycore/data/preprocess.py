"""Preprocess: ``data.zarr`` → ``prepared.zarr`` by a validated list of steps in a fixed order.

The steps, always in this order (each one only when its key is set in the config):

1. ``scan_crop: [y0, y1, x0, x1]`` keep scan rows y0..y1-1 and columns x0..x1-1 (half-open, like
   Python slices). Positions are re-origined so the new scan index (0, 0) is at (0, 0) Å; where it
   lay in the ingested scan frame is the attr ``scan_origin_A``.
2. ``background: B`` subtract B counts from every detector pixel.
3. ``threshold: T`` set values below T to 0.
4. ``clip_negative: true`` (default) set negative values to 0.
5. ``detector_crop: N`` a square N x N window around the bright-field disk. The disk centre is
   the centre of mass of the largest connected region of the mean pattern above half of its
   (99.9th-percentile) maximum, rounded to a pixel, and is put at pixel N//2; when ``detector_bin``
   k is also set, the window is placed so that the disk centre falls on the centre of binned
   pixel (N/k)//2 (exactly for odd k; 1/(2k) binned pixel off for even k, the best possible).
6. ``detector_bin: k`` sum k x k blocks from pixel 0; k must divide the detector size.
7. ``detector_resample: N`` Fourier interpolation to N x N over the same angular range (the
   detector pixel becomes ``pixel * M / N``; total counts and the zero frequency's pixel N//2
   are kept; the Nyquist frequency is split / folded so that M → N → M is exact).
8. ``detector_pad: N`` pad with zeros to N x N, keeping the zero frequency at pixel N//2 (a finer
   real-space pixel).
9. ``dose_e_per_A2: D`` scale all patterns by one factor so that the mean total counts per
   pattern is ``D * dy * dx`` (the scan step), then draw Poisson counts (``seed``).
10. ``read_noise: sigma`` add Gaussian noise of sigma counts (``seed``), after Poisson.
11. ``normalize_mean_counts: C`` scale by one factor so that the mean total counts per pattern
    (before noise) is C.
12. ``half: 1 | 2`` keep every other scan column of the (cropped) scan: half 1 the even columns
    (0, 2, 4, ...), half 2 the odd ones (1, 3, 5, ...); ``ptycore preprocess --half`` sets it too.
    Every step above still sees the whole scan (the disk centre, the dose scale and the noise
    draws are the whole scan's), so the two halves are exactly the columns of the whole scan's
    prepared store: two independent half datasets for a Fourier ring correlation. Each half is a
    regular raster (scan_shape ``[ny, ceil(nx / 2)]`` or ``[ny, floor(nx / 2)]``, metadata
    ``scan_step_A`` ``[dy, 2 dx]``, ``dose_e_per_A2`` halved) whose positions stay in the whole
    scan's frame (its scan index (0, 0) at (0, 0) Å, the same ``scan_origin_A``), and the attr
    ``scan_box_A`` ``[[y_min, x_min], [y_max, x_max]]`` (the whole scan's positions) makes
    ``ptycore init`` build the object frame of the whole scan for either half: the two half
    reconstructions and the whole one share one object frame (pixel [0, 0] at the same place).

The detector mask (``detector_mask`` of data.zarr, all True when absent) goes through steps 5-8
with the patterns and is written to ``prepared.zarr`` as ``detector_mask`` (True = good pixel);
bad pixels are 0 in the prepared patterns. How each step transforms it: :mod:`ptycore.data.mask`.

The detector must be square at the end (angular pixels are square: the metadata has one detector
pixel size); ``detector_crop`` makes a non-square detector square. ``prepared.zarr`` has the
layout of ``data.zarr`` plus attrs ``pixel_size_A`` (= wavelength / (N * detector pixel in rad)),
``detector_shape``, ``detector_pixel_mrad``, ``scan_origin_A``, ``bright_field_centre_px`` (of the
prepared mean pattern), ``scan_box_A`` (only with ``half``), ``preprocess`` (the steps applied, in
order, with their parameters and results) and ``provenance`` (with ``preprocess`` and the input
store's provenance under ``upstream``).

Patterns are processed in chunks of scan rows: memory holds a few chunks, never the dataset.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ptycore.errors import InvalidArgument, InvalidData

#: bytes of input patterns read at once (a chunk of whole scan rows)
READ_BLOCK_BYTES = 64 * 2**20


# ---------------------------------------------------------------- config files (shared with init)
def validation_message(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    """One line naming the key, what is wrong with it and the value given."""
    errors = err.errors()
    # a misspelt key shows up as an unknown key and a missing one: name the misspelling
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = list(model.model_fields)
        hint = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        return f"{source}: {where}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint
                                                    else f" (known keys: {', '.join(known)})")
    if first["type"] == "missing":
        return f"{source}: {where}: required key is missing"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {where}: {msg} (got {first.get('input')!r})"


def load_config(path: str | Path | None, model: type[BaseModel]):
    """Read and validate a YAML config; no path gives the defaults. Errors name file and key."""
    if path is None:
        return model()
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: config file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    record = {} if record is None else record
    if not isinstance(record, dict):
        raise InvalidArgument(f"{path}: expected a mapping of keys, got {type(record).__name__}")
    try:
        return model.model_validate(record)
    except ValidationError as err:
        raise InvalidArgument(validation_message(err, str(path), model)) from None


class PreprocessConfig(BaseModel):
    """The preprocess steps; see the module docstring for their fixed order."""

    model_config = ConfigDict(extra="forbid")

    scan_crop: tuple[int, int, int, int] | None = Field(default=None, description="[y0, y1, x0, x1], half-open")
    background: float | None = Field(default=None, description="counts subtracted from every pixel")
    threshold: float | None = Field(default=None, description="values below are set to 0")
    clip_negative: bool = True
    detector_crop: int | None = Field(default=None, ge=2, description="square window N around the disk")
    detector_bin: int | None = Field(default=None, ge=1, description="sum k x k blocks")
    detector_resample: int | None = Field(default=None, ge=2, description="Fourier interpolation to N x N")
    detector_pad: int | None = Field(default=None, ge=2, description="zero-pad to N x N")
    dose_e_per_A2: float | None = Field(default=None, gt=0, description="target dose; Poisson counts drawn")
    read_noise: float | None = Field(default=None, ge=0, description="Gaussian read noise sigma in counts")
    seed: int = Field(default=0, ge=0, description="seed of the noise")
    normalize_mean_counts: float | None = Field(default=None, gt=0, description="mean total counts per pattern")
    half: Literal[1, 2] | None = Field(default=None, description="keep scan columns 0, 2, ... (1) or 1, 3, ... (2)")

    @field_validator("scan_crop")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not (v[0] < v[1] and v[2] < v[3]):
            raise ValueError("must be [y0, y1, x0, x1] with y0 < y1 and x0 < x1")
        return v


# ---------------------------------------------------------------- detector operations (numpy)
def crop_detector(patterns: np.ndarray, start: tuple[int, int], size: int) -> np.ndarray:
    return patterns[..., start[0] : start[0] + size, start[1] : start[1] + size]


def bin_detector(patterns: np.ndarray, k: int) -> np.ndarray:
    """Sum k x k blocks (k must divide both detector sizes)."""
    if k == 1:
        return patterns
    *lead, ny, nx = patterns.shape
    return patterns.reshape(*lead, ny // k, k, nx // k, k).sum(axis=(-3, -1))


def pad_detector(patterns: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad to size x size, the old pixel (M//2, M//2) landing on (size//2, size//2)."""
    pads = [(0, 0)] * (patterns.ndim - 2)
    for m in patterns.shape[-2:]:
        before = size // 2 - m // 2
        pads.append((before, size - m - before))
    return np.pad(patterns, pads)


def resample_detector(patterns: np.ndarray, size: int) -> np.ndarray:
    """Fourier interpolation of ``(..., M, M)`` patterns to ``(..., size, size)``: the same angular
    range in finer or coarser pixels; total counts kept, zero frequency at pixel size//2."""
    from ptycore.physics.fourier import resize_spectrum_axis  # (imports jax: only when resampling)

    axes = (-2, -1)
    spec = np.fft.fft2(np.fft.ifftshift(patterns.astype(np.float64), axes=axes))  # FFT order
    for axis in axes:
        spec = resize_spectrum_axis(spec, size, axis, real=True)
    return np.fft.fftshift(np.fft.ifft2(spec), axes=axes).real


def bright_field_centre(mean_pattern: np.ndarray) -> tuple[float, float]:
    """Centre (y, x) in pixels of the bright-field disk: centre of mass of the largest connected
    region above half of the mean pattern's 99.9th-percentile value."""
    from scipy import ndimage

    top = float(np.percentile(mean_pattern, 99.9))
    if not top > 0:
        raise InvalidData("the mean pattern has no positive counts: no bright-field disk to centre on")
    labels, n = ndimage.label(mean_pattern > 0.5 * top)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    cy, cx = ndimage.center_of_mass(mask)
    return float(cy), float(cx)


# ---------------------------------------------------------------- the plan: geometry, validated up front
class Plan:
    """The steps for one dataset, checked against its shapes before any pattern is read."""

    def __init__(self, config: PreprocessConfig, attrs: dict, patterns_shape, source: str, config_source: str,
                 half_option: bool = False):
        from ptycore.data.metadata import parse_metadata

        self.config = config
        self.source = source
        self.cfg = config_source
        self.half_option = half_option  # `half` came from --half, not from the config file
        if "metadata" not in attrs:
            raise InvalidData(f"{source}: attribute 'metadata' is missing (is this a store from 'ptycore ingest'?)")
        self.meta = parse_metadata(dict(attrs["metadata"]), f"{source} attrs.metadata")
        self.scan_shape = tuple(int(s) for s in attrs.get("scan_shape", self.meta.scan_shape))
        if len(patterns_shape) != 3 or patterns_shape[0] != self.scan_shape[0] * self.scan_shape[1]:
            raise InvalidData(f"{source}: patterns {tuple(patterns_shape)} do not match scan_shape "
                              f"{list(self.scan_shape)} (expected (n_pos, ky, kx) with n_pos = ny * nx)")
        from ptycore.physics.electron import wavelength_A

        self.wavelength_A = float(attrs.get("wavelength_A", wavelength_A(self.meta.energy_kv)))
        self.input_pixel_mrad = float(attrs.get("detector_pixel_mrad", self.meta.detector_pixel_mrad_at(
            self.wavelength_A)))
        self.input_detector = tuple(int(s) for s in patterns_shape[1:])
        self.good: np.ndarray | None = None  # the input detector mask, when it flags any pixel
        self._check()

    def _err(self, key: str, msg: str) -> InvalidArgument:
        return InvalidArgument(f"{self.cfg}: {key}: {msg}")

    def _check(self) -> None:
        c = self.config
        ny, nx = self.scan_shape
        if c.scan_crop is not None:
            y0, y1, x0, x1 = c.scan_crop
            if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
                raise self._err("scan_crop", f"{list(c.scan_crop)} lies outside the scan of {ny} x {nx} positions "
                                f"(need 0 <= y0 < y1 <= {ny} and 0 <= x0 < x1 <= {nx})")
            self.out_scan = (y1 - y0, x1 - x0)
        else:
            self.out_scan = (ny, nx)
        if c.half is not None:
            h, w = self.out_scan
            if w < 2:
                msg = f"the scan{' (after scan_crop)' if c.scan_crop else ''} has {w} column; two halves need 2 or more"
                raise InvalidArgument(f"--half {c.half}: {msg}") if self.half_option else self._err("half", msg)
            self.out_scan = (h, len(range(c.half - 1, w, 2)))
        det = self.input_detector
        pixel = self.input_pixel_mrad
        conv = self.meta.convergence_mrad

        def need_square(key):
            if det[0] != det[1]:
                raise self._err(key, f"needs a square detector, this one is {det[0]} x {det[1]} "
                                "(add detector_crop to make it square)")

        if c.detector_crop is not None:
            n = c.detector_crop
            if n > min(det):
                raise self._err("detector_crop", f"{n} px is larger than the detector ({det[0]} x {det[1]})")
            if conv > n / 2 * pixel:
                raise self._err("detector_crop", f"{n} px spans only +-{n / 2 * pixel:.4g} mrad, inside the "
                                f"bright-field disk (convergence_mrad {conv:g}) of {self.source}")
            det = (n, n)
        if c.detector_bin is not None:
            k = c.detector_bin
            need_square("detector_bin")
            if det[0] % k:
                after = " (after detector_crop)" if c.detector_crop else ""
                raise self._err("detector_bin", f"{k} does not divide the detector size {det[0]}{after}")
            det = (det[0] // k, det[1] // k)
            pixel *= k
        if c.detector_resample is not None:
            need_square("detector_resample")
            pixel *= det[0] / c.detector_resample
            det = (c.detector_resample,) * 2
        if c.detector_pad is not None:
            need_square("detector_pad")
            if c.detector_pad < det[0]:
                raise self._err("detector_pad", f"{c.detector_pad} is smaller than the detector ({det[0]} px at "
                                "that step); use detector_crop to make it smaller")
            det = (c.detector_pad,) * 2
        if det[0] != det[1]:
            raise InvalidData(f"{self.source}: the detector is {det[0]} x {det[1]}; a reconstruction needs a square "
                              f"one (set detector_crop in {self.cfg})")
        if conv > det[0] / 2 * pixel:
            raise InvalidData(f"{self.source}: convergence_mrad {conv:g} lies outside the prepared detector "
                              f"(+-{det[0] / 2 * pixel:.4g} mrad)")
        self.out_detector = det
        self.out_pixel_mrad = pixel
        self.pixel_size_A = self.wavelength_A / (det[0] * pixel * 1e-3)
        self.crop_start: tuple[int, int] | None = None
        self.centre_px: tuple[float, float] | None = None

    # -------------------------------------------------------- per-block application
    def pointwise(self, block: np.ndarray) -> np.ndarray:
        c = self.config
        if self.good is not None:
            block = np.where(self.good, block, np.float32(0))  # bad pixels add nothing
        if c.background is not None:
            block = block - np.float32(c.background)
        if c.threshold is not None:
            block = np.where(block < c.threshold, np.float32(0), block)
        if c.clip_negative:
            block = np.maximum(block, np.float32(0))
        return block

    def geometry(self, block: np.ndarray) -> np.ndarray:
        from ptycore.data.mask import fill_bad

        c = self.config
        good = self.good
        if c.detector_crop is not None:
            block = crop_detector(block, self.crop_start, c.detector_crop)
            good = None if good is None else crop_detector(good, self.crop_start, c.detector_crop)
        if c.detector_bin is not None:
            block = bin_detector(block, c.detector_bin)
            if good is not None:
                good = bin_mask_of(good, c.detector_bin)
                block = np.where(good, block, 0)  # an incomplete block is no measurement
        if c.detector_resample is not None:
            if good is not None:
                block = fill_bad(block, good)  # so the interpolation does not spread the zeros
            block = resample_detector(block, c.detector_resample)
            if good is not None:
                from ptycore.data.mask import resample_mask

                good = resample_mask(good, c.detector_resample)
                block = np.where(good, block, 0.0)
        if c.detector_pad is not None:
            block = pad_detector(block, c.detector_pad)
        return block

    def mask(self) -> np.ndarray:
        """The prepared detector mask (True = good; padded pixels were not measured: False)."""
        from ptycore.data.mask import pad_mask, resample_mask

        c = self.config
        good = np.ones(self.input_detector, bool) if self.good is None else self.good
        if c.detector_crop is not None:
            good = crop_detector(good, self.crop_start, c.detector_crop)
        if c.detector_bin is not None:
            good = bin_mask_of(good, c.detector_bin)
        if c.detector_resample is not None:
            good = resample_mask(good, c.detector_resample)
        if c.detector_pad is not None:
            good = pad_mask(good, c.detector_pad)
        return good

    def place_crop(self, mean_pattern: np.ndarray) -> None:
        """Find the disk centre and the crop window (raises if the window leaves the detector)."""
        c = self.config
        cy, cx = bright_field_centre(mean_pattern)
        self.centre_px = (cy, cx)
        n, k = c.detector_crop, c.detector_bin or 1
        m = n // k
        start = []
        for centre, size in zip((cy, cx), self.input_detector, strict=True):
            s = int(round(centre)) - k * (m // 2) - k // 2
            if s < 0 or s + n > size:
                raise self._err("detector_crop", f"{n} px centred on the bright-field disk at "
                                f"({cy:.1f}, {cx:.1f}) px extends outside the {self.input_detector[0]} x "
                                f"{self.input_detector[1]} detector of {self.source}")
            start.append(s)
        self.crop_start = tuple(start)


def bin_mask_of(good: np.ndarray, k: int) -> np.ndarray:
    from ptycore.data.mask import bin_mask

    return bin_mask(good, k)


def _row_blocks(n_rows: int, rows_per_block: int):
    for r in range(0, n_rows, rows_per_block):
        yield r, min(n_rows, r + rows_per_block)


def preprocess(data: str | Path, config_path: str | Path | None, out: str | Path, *, overwrite: bool = False,
               progress: bool = False, half: int | None = None) -> dict:
    """Write ``out`` (prepared.zarr) from ``data`` (data.zarr); see the module docstring.

    ``half`` (1 or 2) sets the config's ``half`` (``--half`` of the verb)."""
    from ptycore.data.ingest import progress_bar
    from ptycore.store import (
        atomic_output,
        checksum,
        create_store,
        open_input,
        provenance,
        refuse_existing,
        write_array,
    )

    config = load_config(config_path, PreprocessConfig)
    cfg_source = str(config_path) if config_path is not None else "preprocess config"
    if half is not None:
        if half not in (1, 2):
            raise InvalidArgument(f"--half: must be 1 (even scan columns) or 2 (odd scan columns), got {half!r}")
        config = config.model_copy(update={"half": half})
    out = Path(out)
    refuse_existing(out, overwrite)
    group = open_input(data, ("patterns", "positions_A"), "ingest")
    attrs = dict(group.attrs)
    patterns = group["patterns"]
    positions = np.asarray(group["positions_A"][...], np.float64)
    plan = Plan(config, attrs, patterns.shape, str(data), cfg_source, half_option=half is not None)
    if "detector_mask" in group:
        good = np.asarray(group["detector_mask"][...], bool)
        if good.shape != plan.input_detector:
            raise InvalidData(f"{data}: detector_mask {good.shape} does not match the patterns' detector "
                              f"{plan.input_detector}")
        plan.good = None if good.all() else good
    if positions.shape != (patterns.shape[0], 2):
        raise InvalidData(f"{data}: positions_A {positions.shape} does not match {patterns.shape[0]} patterns")

    ny, nx = plan.scan_shape
    y0, y1, x0, x1 = config.scan_crop or (0, ny, 0, nx)
    h, w = y1 - y0, x1 - x0
    ky, kx = plan.input_detector
    # blocks of whole scan rows; with `half` the same blocks as without (the same noise draws)
    rows_per_block = max(1, min(h, READ_BLOCK_BYTES // (nx * ky * kx * 4), max(1, 256 // w)))
    columns = np.arange(w) if config.half is None else np.arange(config.half - 1, w, 2)
    w_out = len(columns)

    def kept(block: np.ndarray) -> np.ndarray:
        """The kept scan columns of a block of whole rows (position order iy * w + ix)."""
        if config.half is None:
            return block
        rows = block.shape[0] // w
        return block[(np.arange(rows)[:, None] * w + columns[None, :]).ravel()]

    def read_rows(r0: int, r1: int) -> np.ndarray:
        """Cropped scan rows r0..r1-1 as (n, ky, kx) float32, position order iy * w + ix."""
        start, stop = (y0 + r0) * nx + x0, (y0 + r1 - 1) * nx + x1
        block = np.asarray(patterns[start:stop], np.float32)
        index = (np.arange(r1 - r0)[:, None] * nx + np.arange(w)[None, :]).ravel()
        return block[index]

    n_blocks = math.ceil(h / rows_per_block)
    # pass 1: the mean pattern after the pointwise steps (disk centre, mean counts for dose/normalize)
    total = np.zeros((ky, kx), np.float64)
    with progress_bar(n_blocks, "preprocess: mean pattern", progress) as advance:
        for r0, r1 in _row_blocks(h, rows_per_block):
            block = read_rows(r0, r1)
            if not np.all(np.isfinite(block)):
                raise InvalidData(f"{data}: patterns contain NaN or Inf (scan rows {y0 + r0}-{y0 + r1 - 1})")
            total += plan.pointwise(block).sum(axis=0, dtype=np.float64)
            advance(1)
    mean_pattern = total / (h * w)
    if config.detector_crop is not None:
        plan.place_crop(mean_pattern)
    mean_counts = float(plan.geometry(mean_pattern[None])[0].sum())

    steps: list[dict[str, Any]] = []
    meta = plan.meta.model_dump(mode="json", exclude_none=True)
    scan_origin = np.asarray(attrs.get("scan_origin_A", [0.0, 0.0]), np.float64)
    new_positions = positions.reshape(ny, nx, 2)[y0:y1, x0:x1].reshape(-1, 2)
    origin_shift = new_positions[0].copy()
    new_positions = new_positions - origin_shift
    if config.scan_crop is not None:
        scan_origin = scan_origin + origin_shift
        steps.append({"step": "scan_crop", "scan_crop": list(config.scan_crop), "scan_shape": [h, w],
                      "scan_origin_A": scan_origin.tolist()})
    scan_box = None
    if config.half is not None:
        scan_box = [new_positions.min(axis=0).tolist(), new_positions.max(axis=0).tolist()]
        new_positions = new_positions.reshape(h, w, 2)[:, columns].reshape(-1, 2)
    if config.background is not None:
        steps.append({"step": "background", "background": config.background})
    if config.threshold is not None:
        steps.append({"step": "threshold", "threshold": config.threshold})
    if config.clip_negative:
        steps.append({"step": "clip_negative"})
    pixel = plan.input_pixel_mrad
    if config.detector_crop is not None:
        n = config.detector_crop
        s = plan.crop_start
        steps.append({"step": "detector_crop", "size": n, "bright_field_centre_px": list(plan.centre_px),
                      "window": [s[0], s[0] + n, s[1], s[1] + n], "aligned_for_bin": config.detector_bin or 1})
    if config.detector_bin is not None:
        pixel *= config.detector_bin
        steps.append({"step": "detector_bin", "factor": config.detector_bin, "detector_pixel_mrad": pixel})
    if config.detector_resample is not None:
        size_before = _size_before_resample(plan)
        pixel *= size_before / config.detector_resample
        steps.append({"step": "detector_resample", "size": config.detector_resample, "from_size": size_before,
                      "detector_pixel_mrad": pixel})
    if config.detector_pad is not None:
        steps.append({"step": "detector_pad", "size": config.detector_pad})
    scale = 1.0
    expected_counts = mean_counts
    if config.dose_e_per_A2 is not None:
        if not mean_counts > 0:
            raise InvalidData(f"{data}: the patterns have no counts to scale to a dose")
        dy, dx = plan.meta.scan_step_A
        target = config.dose_e_per_A2 * dy * dx
        scale = target / mean_counts
        expected_counts = target
        steps.append({"step": "dose", "dose_e_per_A2": config.dose_e_per_A2, "counts_per_pattern": target,
                      "scale": scale, "noise": "poisson", "seed": config.seed})
        meta["dose_e_per_A2"] = config.dose_e_per_A2
    if config.read_noise is not None:
        steps.append({"step": "read_noise", "sigma": config.read_noise, "seed": config.seed})
    norm = 1.0
    if config.normalize_mean_counts is not None:
        if not expected_counts > 0:
            raise InvalidData(f"{data}: the patterns have no counts to normalise")
        norm = config.normalize_mean_counts / expected_counts
        steps.append({"step": "normalize", "mean_counts": config.normalize_mean_counts, "scale": norm})

    if config.half is not None:
        steps.append({"step": "half", "half": config.half, "columns": "even" if config.half == 1 else "odd",
                      "of_scan_shape": [h, w], "scan_shape": [h, w_out], "scan_box_A": scan_box})
        dy, dx = plan.meta.scan_step_A
        meta["scan_step_A"] = [dy, 2 * dx]
        if meta.get("dose_e_per_A2") is not None:
            meta["dose_e_per_A2"] = meta["dose_e_per_A2"] / 2
    meta["scan_shape"] = [h, w_out]
    if meta.get("detector_pixel_invA") is not None:
        meta["detector_pixel_invA"] = meta["detector_pixel_invA"] * pixel / plan.input_pixel_mrad
    else:
        meta["detector_pixel_mrad"] = pixel
    n_det = plan.out_detector[0]
    inputs = {str(data): checksum(data)}
    if config_path is not None:
        inputs[str(config_path)] = checksum(config_path)

    rng = np.random.default_rng(config.seed)
    noisy = config.dose_e_per_A2 is not None or config.read_noise is not None
    out_mean = np.zeros((n_det, n_det), np.float64)
    with atomic_output(out, overwrite=overwrite) as tmp, \
            progress_bar(n_blocks, f"preprocess {Path(data).name}", progress) as advance:
        store = create_store(tmp)
        target_arr = store.create_array("patterns", shape=(h * w_out, n_det, n_det), dtype=np.float32,
                                        chunks=(rows_per_block * w_out, n_det, n_det))
        target_arr.attrs.update({"units": "counts", "axes": "n_pos, ky, kx (zero frequency at the centre)"})
        for r0, r1 in _row_blocks(h, rows_per_block):
            block = plan.geometry(plan.pointwise(read_rows(r0, r1)))
            if config.dose_e_per_A2 is not None:
                block = rng.poisson(np.maximum(block * scale, 0.0)).astype(np.float64)
            if config.read_noise is not None:
                block = block + rng.normal(0.0, config.read_noise, size=block.shape)
            block = kept(block * norm if norm != 1.0 else block).astype(np.float32)
            out_mean += block.sum(axis=0, dtype=np.float64)
            target_arr[r0 * w_out : r1 * w_out] = block
            advance(1)
        out_mean /= h * w_out
        whole = " of the whole scan (before `half`)" if config.half is not None else ""
        prepared_mask = plan.mask()
        write_array(store, "detector_mask", prepared_mask, attrs={
            "axes": "ky, kx (as the prepared patterns)", "meaning": "True = good pixel (measured and trusted)"})
        write_array(store, "positions_A", new_positions.astype(np.float32), attrs={
            "units": "Å", "axes": "n_pos (index iy * nx + ix), (y, x)",
            "frame": f"nominal scan: scan index (0, 0){whole} at (0, 0) Å; scan_origin_A gives it in the "
                     "ingested frame"})
        centre = bright_field_centre(out_mean) if out_mean.max() > 0 else None
        record = {
            "metadata": meta,
            "scan_shape": [h, w_out],
            "wavelength_A": plan.wavelength_A,
            "detector_pixel_mrad": pixel,
            "detector_shape": [n_det, n_det],
            "pixel_size_A": plan.pixel_size_A,
            "scan_origin_A": scan_origin.tolist(),
            "bright_field_centre_px": list(centre) if centre else None,
            "detector_mask_bad_pixels": int(prepared_mask.size - np.count_nonzero(prepared_mask)),
            "stats": {"mean_counts": float(out_mean.sum()), "expected_mean_counts": expected_counts * norm},
            "preprocess": steps,
        }
        if scan_box is not None:
            record["scan_box_A"] = scan_box
        for key in ("orientation_applied",):
            if key in attrs:
                record[key] = attrs[key]
        record["provenance"] = provenance(
            verb="preprocess", inputs=inputs, config=config.model_dump(mode="json"), preprocess=steps,
            seeds={"noise": config.seed} if noisy else {}, upstream=attrs.get("provenance"))
        store.attrs.update(record)
    return {"out": out, "n_pos": h * w_out, "detector_shape": (n_det, n_det), "pixel_size_A": plan.pixel_size_A,
            "detector_pixel_mrad": pixel, "steps": [s["step"] for s in steps], "mean_counts": float(out_mean.sum())}


def _size_before_resample(plan: Plan) -> int:
    c = plan.config
    size = c.detector_crop or plan.input_detector[0]
    if c.detector_bin is not None:
        size //= c.detector_bin
    return size
