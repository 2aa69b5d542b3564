"""Evaluate one reconstruction: metrics against the truth (if any) and without it, figures, report.

``evaluate()`` reads a result store (any store with ``object_phase`` and ``pixel_size_A``) and
writes an evaluation directory atomically::

    eval_dir/
      metrics.json      every number below (schema: METRICS_SCHEMA)
      report.html       self-contained (figures embedded as base64 PNG), provenance summary
      *.png             the figures (FIGURES lists them)

Alignment with the truth (``truth.zarr`` from ``ptycore simulate``, or any store with
``object_phase`` (1, slices, Hy, Wx), ``pixel_size_A`` and either ``positions_A`` or ``origin_A``)
-----------------------------------------------------------------------------------------------
1. Frames. Result pixel (j, i) sits at (j, i) * p_r Å in the result's object frame; truth pixel
   (j, i) at (j, i) * p_t Å in the truth's own frame. The nominal map is a translation,
   ``x_truth = x_result - d``, with ``d = mean_k(positions_A_result[k] - positions_A_truth[k])``
   when both stores list the same scan positions (least squares over every position, so it
   follows refined positions); else ``d = origin_A_truth - origin_A_result`` when the result's
   frame is known (its own ``origin_A`` attr, or its ``--init`` store's moved by the mean position
   shift from the init to the result: right for a part of the scan too, e.g. a half from
   ``ptycore preprocess --half 2``); else ``d = positions_A_result[0] + origin_A`` (assumes the
   result's scan position 0 is scan index (0, 0), at (0, 0) in the truth's scan frame, whose
   pixel [0, 0] is at ``origin_A``).
2. Common grid. The comparison grid has the coarser of the two pixel sizes ``p_c`` and covers
   the scanned area (bounding box of the result's ``positions_A``) shrunk by ``margin_A`` on each
   side; when ``p_c = p_r`` its points are the result's own pixel centres. An image finer than
   ``p_c`` is first low-pass filtered to the common band (cosine-tapered Fourier filter, cutoff
   ``1/(2 p_c)``); both are sampled with cubic splines. Pixel sizes more than 8x apart are refused.
   A scan too small for that (under 8 pixels once the margin is taken) is compared without the
   margin, then over 8 pixels about its centre, with a warning.
3. Registration. The residual shift left after the nominal map (position drift, frame
   conventions) is found by cross-correlating the Hann-windowed images (scikit-image
   ``phase_cross_correlation``, 1/50-pixel precision), re-sampling the truth at the shifted points
   and repeating until the correction is below 1/100 pixel (at most 8 times; the windowed
   correlation underestimates a shift, so one pass is not enough). The truth is interpolated once
   per pass from its own grid, never twice. A step that would take the compared area off the
   truth's field is not taken (a poor reconstruction of a crystal correlates at many lattice
   shifts): the metrics are those at the last shift inside it, with a warning.
   ``registration_shift_A`` is that shift: result feature at ``x`` ↔ truth at ``x - d - shift``.
4. Offset. The constant phase offset is removed (``phase_offset_rad`` = mean result - mean truth).
5. Slices. Per-slice metrics use the same map. If the slice counts differ, the result's slices
   are remapped to the truth's count over the same depth, conserving the total phase at every
   pixel (``slices_compared = "resampled"``; ``"matched"`` otherwise).

Metrics without truth: see ``ptycore.metrics`` for the information limit and FRC definitions.
FRC of two halves (``--half1``/``--half2``): both are cropped at one pixel box of their shared
object frame, the intersection of their scanned areas, and only the residual shift is registered
(see ``halves_frc``).
Object modes: the first object mode is evaluated.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ptycore.errors import InvalidArgument, InvalidData
from ptycore.store import atomic_output, now_iso, open_store, refuse_existing

if TYPE_CHECKING:
    from ptycore.metrics import FRC

SCHEMA_VERSION = 1
#: largest ratio of pixel sizes that evaluate resamples (beyond it: almost surely a unit error)
MAX_PIXEL_RATIO = 8.0
MIN_COMPARED_PX = 8
DEFAULT_MARGIN_A = 0.5
#: data-fit loss names, in the order the engines pick them
DATA_FIT_TERMS = ("single", "poisson", "anscombe")

#: metrics.json keys: name -> (type, meaning). ``null`` where a metric does not apply.
METRICS_SCHEMA: dict[str, tuple[str, str]] = {
    "schema_version": ("int", "version of this schema (1)"),
    "status": ("str", "'ok' (aggregate adds 'failed' rows for runs without an evaluation)"),
    "dataset": ("str", "dataset name: --dataset, else provenance 'dataset', else the data store's directory"),
    "plan": ("str|null", "plan name: --plan, else the resolved plan's name in the provenance"),
    "stages": ("list[str]", "stages run to make the result"),
    "result": ("str", "path of the evaluated store"),
    "truth": ("str|null", "path of the truth store"),
    "init": ("str|null", "init store whose positions the corrections are measured from"),
    "half1": ("str|null", "first half reconstruction for the FRC"),
    "half2": ("str|null", "second half reconstruction for the FRC"),
    "pixel_size_A": ("float", "result pixel size (Å)"),
    "object_shape": ("list[int]", "(obj_modes, slices, Hy, Wx)"),
    "n_slices": ("int", "slices in the result"),
    "slice_thickness_A": ("float|null", "result slice thickness (Å)"),
    "probe_modes": ("int|null", "probe modes in the result"),
    "probe_mode_powers": ("list[float]|null", "final power fraction of each probe mode"),
    "iterations": ("int|null", "iterations run over all stages (history length)"),
    "s_per_iter_median": ("float|null", "median seconds per iteration, first iteration of each stage excluded"),
    "s_per_iter_median_by_stage": ("dict[str,float]", "the same per stage (stage name -> seconds)"),
    "wall_seconds": ("float|null", "reconstruction wall time from the provenance"),
    "data_fit_term": ("str|null", "the data-fit loss of the last iteration (single/poisson/anscombe)"),
    "final_loss": ("float|null", "last value of the data-fit term (training positions)"),
    "final_terms": ("dict[str,float]", "last finite value of every loss term in the history"),
    "iterations_to_90pct_loss_drop": ("int|null", "iterations until the data-fit loss made 90 % of its decrease "
                                      "over the run (ptycore.studies.convergence_time)"),
    "seconds_to_90pct_loss_drop": ("float|null", "seconds of those iterations (s_per_iter summed)"),
    "validation_loss": ("float|null", "last held-out validation loss (history/validation)"),
    "validation_loss_min": ("float|null", "lowest held-out validation loss"),
    "information_limit_A": ("float|null", "information limit of the depth-summed phase in the scanned area (Å); "
                            "null for a flat phase"),
    "information_limit_at_floor_band": ("bool|null", "true: no fall-off to the floor found below 0.9 Nyquist"),
    "nyquist_A": ("float", "2 × pixel size (Å)"),
    "frc_resolution_A": ("float|null", "FRC 1/7 resolution between --half1 and --half2 (Å)"),
    "frc_reached_nyquist": ("bool|null", "FRC never fell below 1/7"),
    "position_correction_rms_A": ("float|null", "RMS of final minus --init positions (Å)"),
    "position_correction_max_A": ("float|null", "largest position correction (Å)"),
    "ssim_phase_sum": ("float|null", "SSIM of the depth-summed phase against the truth"),
    "psnr_phase_sum": ("float|null", "PSNR (dB) of the depth-summed phase, data range = truth's"),
    "rmse_phase_sum_rad": ("float|null", "RMS phase error after the offset (rad)"),
    "correlation_phase_sum": ("float|null", "Pearson correlation of the depth-summed phase with the truth"),
    "ssim_per_slice": ("list[float]|null", "SSIM of each truth slice"),
    "psnr_per_slice": ("list[float]|null", "PSNR (dB) of each truth slice"),
    "slices_compared": ("str|null", "'matched' or 'resampled' (result slices remapped to the truth's count)"),
    "n_slices_truth": ("int|null", "slices in the truth"),
    "registration_shift_A": ("list[float]|null", "(y, x) residual shift found by registration (Å)"),
    "phase_offset_rad": ("float|null", "removed constant offset, mean(result) - mean(truth)"),
    "compared_pixel_size_A": ("float|null", "pixel size of the comparison grid (Å)"),
    "compared_shape": ("list[int]|null", "(h, w) of the comparison grid"),
    "margin_A": ("float", "margin removed inside the scanned area (Å)"),
    "prior_check": ("dict|null", "with --data-only: how far the prior moved this result from the data-only one "
                    "(rms_phase_difference_rad, ssim_phase_sum, ssim_3d) and both held-out losses "
                    "(ptycore.prior.check)"),
    "figures": ("list[str]", "PNG files written"),
    "warnings": ("list[str]", "things the reader should know (fallbacks, odd inputs)"),
    "created": ("str", "ISO time of the evaluation"),
    "evaluate_seconds": ("float", "time the evaluation took (s)"),
    "ptycore_version": ("str", "ptycore version that evaluated"),
}

# the schema, listed in this module's docstring too (``help(ptycore.evaluate)``)
__doc__ += (f"\nmetrics.json (schema version {SCHEMA_VERSION}; ``null`` where a metric does not apply)\n"
            + "-" * 66 + "\n"
            + "".join(f"``{k}`` ({t})\n    {meaning}\n" for k, (t, meaning) in METRICS_SCHEMA.items()))

FIGURES = {
    "phase_sum.png": "depth-summed phase, scale bar, evaluated area",
    "comparison.png": "reconstruction vs registered truth and difference (with truth)",
    "slices.png": "per-slice phase montage (more than one slice)",
    "amplitude.png": "transmitted amplitude (product over slices)",
    "probe.png": "probe modes, amplitude and phase, power fractions",
    "spectrum.png": "log power spectrum with the information-limit ring, radial average",
    "loss.png": "loss terms per iteration (log y)",
    "positions.png": "position corrections (with --init)",
    "frc.png": "Fourier ring correlation (with --half1/--half2)",
}


# ---------------------------------------------------------------- reading stores
@dataclass
class Reconstruction:
    path: Path
    phase: np.ndarray  # (obj_modes, slices, Hy, Wx)
    amplitude: np.ndarray | None
    probe: np.ndarray | None
    positions_A: np.ndarray | None
    pixel_size_A: float
    slice_thickness_A: float | None
    history: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        p = self.attrs.get("provenance")
        return p if isinstance(p, dict) else {}

    @property
    def phase_sum(self) -> np.ndarray:
        return self.phase[0].sum(axis=0)


def _as4d(array: np.ndarray, path, name) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2 or array.ndim > 4:
        raise InvalidData(f"{path}: {name} must be (obj_modes, slices, Hy, Wx), got shape {array.shape}")
    return array.reshape((1,) * (4 - array.ndim) + array.shape)


def _pixel_size(group, path) -> float:
    value = group.attrs.get("pixel_size_A")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidData(f"{path}: attribute pixel_size_A is missing or not a number ({value!r})") from None
    if not (math.isfinite(value) and value > 0):
        raise InvalidData(f"{path}: pixel_size_A must be > 0, got {value}")
    return value


def read_history(group) -> dict[str, np.ndarray]:
    if "history" not in group:
        return {}
    hist = group["history"]
    return {name: np.asarray(arr[...]) for name, arr in hist.arrays()}


def load_reconstruction(path, *, role: str = "result") -> Reconstruction:
    """Read what evaluate needs from a result (or truth, init) store; InvalidData naming the file."""
    path = Path(path)
    group = open_store(path)
    if "object_phase" not in group:
        raise InvalidData(f"{path}: no object_phase array (not a result or truth store; {role})")
    phase = _as4d(group["object_phase"][...], path, "object_phase").astype(np.float64)
    if min(phase.shape[-2:]) < MIN_COMPARED_PX:
        raise InvalidData(f"{path}: object_phase is only {phase.shape[-2:]} pixels")
    if not np.all(np.isfinite(phase)):
        raise InvalidData(f"{path}: object_phase holds non-finite values")
    amplitude = None
    if "object_amplitude" in group:
        amplitude = _as4d(group["object_amplitude"][...], path, "object_amplitude")
        if amplitude.shape != phase.shape:
            raise InvalidData(f"{path}: object_amplitude {amplitude.shape} and object_phase {phase.shape} differ")
    probe = np.asarray(group["probe"][...]) if "probe" in group else None
    if probe is not None and probe.ndim == 2:
        probe = probe[None]
    positions = None
    if "positions_A" in group:
        positions = np.asarray(group["positions_A"][...], np.float64).reshape(-1, 2)
    thickness = None
    if "slice_thickness_A" in group:
        thickness = float(np.asarray(group["slice_thickness_A"][...]).reshape(-1)[0])
    elif "slice_thickness_A" in group.attrs:
        thickness = float(group.attrs["slice_thickness_A"])
    return Reconstruction(path, phase, amplitude, probe, positions, _pixel_size(group, path), thickness,
                          read_history(group), dict(group.attrs))


# ---------------------------------------------------------------- resampling and registration
def lowpass(image: np.ndarray, pixel_size_A: float, cutoff_invA: float) -> np.ndarray:
    """Cosine-tapered Fourier low-pass (full to 0.85 cutoff, zero beyond it), reflect-padded."""
    pad = 16
    padded = np.pad(image, pad, mode="reflect")
    ky = np.fft.fftfreq(padded.shape[0], d=pixel_size_A)
    kx = np.fft.fftfreq(padded.shape[1], d=pixel_size_A)
    k = np.hypot(ky[:, None], kx[None, :]) / cutoff_invA
    filt = np.where(k <= 0.85, 1.0, np.where(k >= 1.0, 0.0, 0.5 * (1 + np.cos(np.pi * (k - 0.85) / 0.15))))
    out = np.fft.ifft2(np.fft.fft2(padded) * filt).real
    return out[pad:-pad, pad:-pad]


def sample(image: np.ndarray, pixel_size_A: float, y_A: np.ndarray, x_A: np.ndarray) -> np.ndarray:
    """Cubic-spline samples of ``image`` at the points (y_A[:, None], x_A[None, :]) of its frame."""
    from scipy.ndimage import map_coordinates

    yy, xx = np.meshgrid(y_A / pixel_size_A, x_A / pixel_size_A, indexing="ij")
    return map_coordinates(image, [yy, xx], order=3, mode="nearest")


def covers(shape, pixel_size_A: float, y_A: np.ndarray, x_A: np.ndarray, tol_px: float = 0.5) -> bool:
    y, x = y_A / pixel_size_A, x_A / pixel_size_A
    return bool(y.min() >= -tol_px and x.min() >= -tol_px and y.max() <= shape[0] - 1 + tol_px
                and x.max() <= shape[1] - 1 + tol_px)


def register(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Sub-pixel shift (pixels) that moves ``moving`` onto ``reference`` (windowed cross-correlation)."""
    from skimage.registration import phase_cross_correlation

    from ptycore.metrics import hann2d

    w = hann2d(reference.shape)
    ref = (reference - reference.mean()) * w
    mov = (moving - moving.mean()) * w
    if not (np.any(ref) and np.any(mov)):
        return np.zeros(2)
    shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=50, normalization=None)
    return np.asarray(shift, np.float64)


def scanned_box(positions_A: np.ndarray | None, shape, pixel_size_A: float, margin_A: float,
                min_size_A: float = 0.0, path=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(lo, hi, notes): corners (Å, object frame) of the scanned area shrunk by ``margin_A``.

    A scan too small for that (e.g. a few positions in a test) is evaluated over at least
    ``min_size_A`` per side: first without the margin, then grown about its centre, never beyond
    the object; ``notes`` says so. Raises InvalidData only if the object itself is too small.
    """
    full = (np.asarray(shape, np.float64) - 1) * pixel_size_A
    if np.any(full < min_size_A - 1e-9):
        raise InvalidData(f"{path}: object of {tuple(shape)} pixels is smaller than the {min_size_A:.3g} Å "
                          "needed to evaluate it")
    if positions_A is None or len(positions_A) == 0:
        lo, hi = np.zeros(2), full.copy()
    else:  # never outside the object itself
        lo = np.clip(positions_A.min(0), 0.0, full)
        hi = np.clip(positions_A.max(0), lo, full)
    notes = []
    margin = margin_A
    if margin > 0 and np.any(hi - lo - 2 * margin < min_size_A):
        margin = 0.0
        notes.append(f"scanned area too small for a {margin_A:g} Å margin: evaluated without one")
    lo, hi = lo + margin, hi - margin
    grown = False
    for a in range(2):
        if hi[a] - lo[a] < min_size_A:
            centre = 0.5 * (lo[a] + hi[a])
            lo[a] = min(max(0.0, centre - 0.5 * min_size_A), full[a] - min_size_A)
            hi[a] = lo[a] + min_size_A
            grown = True
    if grown:
        notes.append(f"scanned area smaller than {MIN_COMPARED_PX} pixels: evaluated over "
                     f"{hi[0] - lo[0]:.3g} x {hi[1] - lo[1]:.3g} Å about its centre")
    return lo, hi, notes


def _grid(lo, hi, step: float, snap: float | None):
    axes = []
    for a in range(2):
        start = math.ceil(lo[a] / snap - 1e-6) * snap if snap else lo[a]
        n = int(math.floor((hi[a] - start) / step + 1e-6)) + 1
        axes.append(start + np.arange(max(n, 0)) * step)
    return axes


def crop_scanned(rec: Reconstruction, image: np.ndarray, margin_A: float):
    """Integer-pixel crop of ``image`` (result grid) to the scanned area: (crop, (y0, x0, h, w), notes)."""
    px = rec.pixel_size_A
    lo, hi, notes = scanned_box(rec.positions_A, image.shape, px, margin_A, MIN_COMPARED_PX * px, rec.path)
    y0, x0 = (max(int(math.ceil(v / px - 1e-6)), 0) for v in lo)
    y1, x1 = (int(math.floor(v / px + 1e-6)) + 1 for v in hi)
    y1, x1 = min(y1, image.shape[0]), min(x1, image.shape[1])
    return image[y0:y1, x0:x1], (y0, x0, y1 - y0, x1 - x0), notes


@dataclass
class TruthComparison:
    metrics: dict
    result: np.ndarray  # depth-summed phase on the comparison grid
    truth: np.ndarray  # registered truth on the same grid
    pixel_size_A: float
    warnings: list[str]


def result_origin(rec: Reconstruction, init: Reconstruction | None = None) -> np.ndarray | None:
    """Scan-frame (y, x) in Å of ``rec``'s object pixel [0, 0]: its own ``origin_A`` attr, else its
    init store's moved by the mean shift of the positions from the init to ``rec`` (padding and
    refinement move the object frame with them); None when neither is known."""
    if rec.attrs.get("origin_A") is not None:
        return np.asarray(rec.attrs["origin_A"], np.float64).reshape(2)
    if (init is not None and init.attrs.get("origin_A") is not None and rec.positions_A is not None
            and init.positions_A is not None and rec.positions_A.shape == init.positions_A.shape):
        moved = np.mean(rec.positions_A - init.positions_A, axis=0)
        return np.asarray(init.attrs["origin_A"], np.float64).reshape(2) - moved
    return None


def compare_with_truth(rec: Reconstruction, truth: Reconstruction, margin_A: float,
                       origin_A: np.ndarray | None = None) -> TruthComparison:
    """Align ``truth`` to ``rec`` (see the module docstring) and compute SSIM/PSNR, summed and per slice.

    ``origin_A``: scan-frame (y, x) of ``rec``'s pixel [0, 0] (``result_origin``), used when the two
    stores do not list the same scan positions."""
    from ptycore.metrics import compare_phase, remap_slices

    warnings: list[str] = []
    pr, pt = rec.pixel_size_A, truth.pixel_size_A
    ratio = max(pr, pt) / min(pr, pt)
    if ratio > MAX_PIXEL_RATIO:
        raise InvalidData(f"{truth.path}: pixel_size_A {pt:.4g} Å and the reconstruction's {pr:.4g} Å differ "
                          f"{ratio:.3g}-fold (more than {MAX_PIXEL_RATIO:g}x): cannot be resampled meaningfully "
                          "(a unit error?)")
    pc = max(pr, pt)
    # nominal translation: x_truth = x_result - d
    if (rec.positions_A is not None and truth.positions_A is not None
            and len(rec.positions_A) == len(truth.positions_A)):
        d = np.mean(rec.positions_A - truth.positions_A, axis=0)
    elif origin_A is not None and "origin_A" in truth.attrs:
        d = np.asarray(truth.attrs["origin_A"], np.float64) - np.asarray(origin_A, np.float64)
        warnings.append("truth positions unavailable or of a different count: frames mapped by the origin_A of "
                        "both")
    elif rec.positions_A is not None and "origin_A" in truth.attrs:
        d = rec.positions_A[0] + np.asarray(truth.attrs["origin_A"], np.float64)
        warnings.append("truth positions unavailable or of a different count: frames mapped by origin_A and "
                        "the result's first position")
    else:
        d = np.zeros(2)
        warnings.append("no positions/origin to map the truth frame: assuming the same frame, registration only")
    # snapping the grid's start to a result pixel may cost one point: ask for one more
    lo, hi, notes = scanned_box(rec.positions_A, rec.phase.shape[-2:], pr, margin_A,
                                (MIN_COMPARED_PX - 1) * pc + (pr if pc == pr else 0.0), rec.path)
    gy, gx = _grid(lo, hi, pc, pr if pc == pr else None)

    def prepared(image, pixel):
        return lowpass(image, pixel, 0.5 / pc) if pixel < pc * (1 - 1e-6) else image

    result_slices = [prepared(s, pr) for s in rec.phase[0]]
    truth_slices = [prepared(s, pt) for s in truth.phase[0]]
    result_sum = sample(np.sum(result_slices, axis=0), pr, gy, gx)
    truth_sum_full = np.sum(truth_slices, axis=0)

    shift = np.zeros(2)
    # the windowed correlation is biased towards 0: iterate to the fixed point (every step taken
    # keeps the compared area on the truth's field, so only the nominal map needs checking first)
    for _ in range(8 if covers(truth_sum_full.shape, pt, gy - d[0], gx - d[1]) else 0):
        ty, tx = gy - d[0] - shift[0], gx - d[1] - shift[1]
        step = register(result_sum, sample(truth_sum_full, pt, ty, tx)) * pc
        if not covers(truth_sum_full.shape, pt, ty - step[0], tx - step[1]):
            # a poor reconstruction of a crystal correlates with the truth at many lattice shifts:
            # a step off the truth's field is not a better match to measure, so stop where it was
            warnings.append(f"registration stopped at the truth's edge (it asked for a further "
                            f"{step.round(3).tolist()} Å): the result may not be the truth's structure")
            break
        shift = shift + step
        if np.hypot(*step) < 0.01 * pc:
            break
    warnings += notes
    ty, tx = gy - d[0] - shift[0], gx - d[1] - shift[1]
    if not covers(truth_sum_full.shape, pt, ty, tx):
        raise InvalidData(f"{truth.path}: does not cover the scanned area of {rec.path} (truth field "
                          f"{truth_sum_full.shape[0] * pt:.3g} x {truth_sum_full.shape[1] * pt:.3g} Å, needed "
                          f"y {ty.min():.3g}..{ty.max():.3g} Å, x {tx.min():.3g}..{tx.max():.3g} Å in its frame)")
    if np.hypot(*shift) > 0.25 * min(len(gy), len(gx)) * pc:
        warnings.append(f"large registration shift {shift.round(3).tolist()} Å: check the frames")
    truth_sum = sample(truth_sum_full, pt, ty, tx)
    summed = compare_phase(result_sum, truth_sum)

    n_r, n_t = len(result_slices), len(truth_slices)
    if n_r == n_t:
        compared_slices, how = result_slices, "matched"
    else:
        compared_slices, how = list(remap_slices(np.asarray(result_slices), n_t)), "resampled"
        warnings.append(f"result has {n_r} slices, truth {n_t}: result slices remapped to {n_t} conserving "
                        "the total phase for the per-slice metrics")
    per_slice = [compare_phase(sample(r, pr, gy, gx), sample(t, pt, ty, tx))
                 for r, t in zip(compared_slices, truth_slices, strict=True)]
    metrics = {
        "ssim_phase_sum": summed["ssim"],
        "psnr_phase_sum": summed["psnr_db"],
        "rmse_phase_sum_rad": summed["rmse_rad"],
        "correlation_phase_sum": summed["pearson"],
        "ssim_per_slice": [m["ssim"] for m in per_slice],
        "psnr_per_slice": [m["psnr_db"] for m in per_slice],
        "slices_compared": how,
        "n_slices_truth": n_t,
        "registration_shift_A": [float(v) for v in shift],
        "phase_offset_rad": summed["offset_rad"],
        "compared_pixel_size_A": pc,
        "compared_shape": [len(gy), len(gx)],
    }
    return TruthComparison(metrics, result_sum, truth_sum, pc, warnings)


# ---------------------------------------------------------------- history and provenance
def _last_finite(values) -> float | None:
    values = np.asarray(values, np.float64).reshape(-1)
    ok = np.nonzero(np.isfinite(values))[0]
    return float(values[ok[-1]]) if len(ok) else None


def history_metrics(history: dict[str, np.ndarray], stage_names=()) -> dict:
    from ptycore.metrics import NON_LOSS_TERMS

    out = {"iterations": None, "s_per_iter_median": None, "s_per_iter_median_by_stage": {}, "data_fit_term": None,
           "final_loss": None, "final_terms": {}, "validation_loss": None, "validation_loss_min": None,
           "iterations_to_90pct_loss_drop": None, "seconds_to_90pct_loss_drop": None}
    if not history:
        return out
    s = history.get("s_per_iter")
    if s is not None and len(s):
        s = np.asarray(s, np.float64)
        out["iterations"] = int(len(s))
        stage = np.asarray(history.get("stage", np.zeros(len(s))))
        first = np.ones(len(s), bool) if len(stage) != len(s) else np.r_[True, np.diff(stage) != 0]
        steady = s[~first] if (~first).any() else s
        out["s_per_iter_median"] = float(np.median(steady))
        if len(stage) == len(s):
            for index in np.unique(stage).astype(int):
                this = (stage == index) & ~first
                this = this if this.any() else stage == index
                name = stage_names[index] if index < len(stage_names) else f"stage {index}"
                out["s_per_iter_median_by_stage"][name] = float(np.median(s[this]))
    for term, values in sorted(history.items()):
        if term in NON_LOSS_TERMS or term == "validation" or np.ndim(values) != 1:
            continue
        last = _last_finite(values)
        if last is not None:
            out["final_terms"][term] = last
    for term in DATA_FIT_TERMS:  # the data-fit term active at the last iteration
        values = history.get(term)
        if values is not None and len(values) and np.isfinite(values[-1]):
            out["data_fit_term"], out["final_loss"] = term, float(values[-1])
            from ptycore.studies import convergence_time

            its, secs = convergence_time(values, history.get("s_per_iter"), 0.9)
            out["iterations_to_90pct_loss_drop"], out["seconds_to_90pct_loss_drop"] = its, secs
            break
    val = history.get("validation")
    if val is not None and np.isfinite(np.asarray(val, np.float64)).any():
        out["validation_loss"] = _last_finite(val)
        out["validation_loss_min"] = float(np.nanmin(np.asarray(val, np.float64)))
    if out["iterations"] is None:
        lengths = [len(v) for v in history.values() if np.ndim(v) >= 1]
        out["iterations"] = max(lengths) if lengths else None
    return out


def _find_key(record, key, depth=0):
    """``key`` in a provenance record or its ``upstream`` chain (nearest first)."""
    if not isinstance(record, dict) or depth > 10:
        return None
    if isinstance(record.get(key), str) and record[key]:
        return record[key]
    return _find_key(record.get("upstream"), key, depth + 1)


def dataset_name(rec: Reconstruction) -> str:
    prov = rec.provenance
    name = _find_key(prov, "dataset")
    if name:
        return name
    for key in (prov.get("inputs") or {}):  # results/<dataset>/prepared.zarr
        p = Path(key)
        if p.suffix == ".zarr" and p.parent.name not in ("", "."):
            return p.parent.name
    return rec.path.stem


def plan_name(rec: Reconstruction) -> str | None:
    plan = rec.provenance.get("plan")
    if isinstance(plan, dict) and plan.get("name"):
        return str(plan["name"])
    return plan if isinstance(plan, str) else None


def provenance_summary(rec: Reconstruction) -> dict:
    """The parts of the provenance a reader of a report wants, flattened."""
    prov = rec.provenance
    plan = prov.get("plan") if isinstance(prov.get("plan"), dict) else {}
    return {
        "verb": prov.get("verb") or prov.get("command"),
        "plan": plan.get("name") if plan else prov.get("plan"),
        "plan_hash": prov.get("plan_hash"),
        "stages": rec.attrs.get("stages") or prov.get("stages_run"),
        "stage_timings": prov.get("stage_timings"),
        "wall_seconds": prov.get("wall_seconds"),
        "started": prov.get("started"),
        "finished": prov.get("finished") or prov.get("created"),
        "seed": prov.get("seed"),
        "device_kind": prov.get("device_kind"),
        "platform": prov.get("platform"),
        "hostname": prov.get("hostname"),
        "slurm_job_id": prov.get("slurm_job_id"),
        "ptycore_version": prov.get("ptycore_version"),
        "git_commit": prov.get("git_commit"),
        "python": prov.get("python"),
        "versions": prov.get("versions"),
        "inputs": prov.get("inputs"),
        "compilations": prov.get("compilations"),
        "upstream": upstream_chain(prov),
    }


def upstream_chain(prov: dict) -> list[str]:
    """The verbs that made this store's inputs, nearest first (from the nested ``upstream`` records)."""
    chain, up = [], prov.get("upstream") if isinstance(prov, dict) else None
    while isinstance(up, dict) and len(chain) < 20:
        chain.append(str(up.get("verb") or up.get("command") or "?"))
        up = up.get("upstream")
    return chain


# ---------------------------------------------------------------- FRC of two halves
@dataclass
class HalvesFRC:
    frc: FRC
    shift_px: np.ndarray  # (y, x) residual (sub-pixel) shift applied to half 2's crop, moving it onto half 1's
    offset_px: tuple[int, int]  # half 2's crop = half 1's crop moved by this many pixels (of half 2's frame)
    box: tuple[int, int, int, int]  # (y0, x0, h, w) of the crop in half 1's pixels
    frames: str  # "shared", "origin_A" or "registered": how the two object frames were related
    warnings: list[str]


def _half2_offset(half1: Reconstruction, half2: Reconstruction, boxes) -> tuple[np.ndarray, str]:
    """First estimate of ``o`` (pixels): half 1's pixel ``p`` shows what half 2's pixel ``p + o`` shows."""
    px = half1.pixel_size_A
    o1, o2 = half1.attrs.get("origin_A"), half2.attrs.get("origin_A")
    if o1 is not None and o2 is not None:
        offset = (np.asarray(o1, np.float64) - np.asarray(o2, np.float64)) / px
        return offset, "shared" if np.allclose(offset, 0.0, atol=1e-6) else "origin_A"
    if half1.phase.shape[-2:] == half2.phase.shape[-2:]:
        return np.zeros(2), "shared"
    # separately made stores: assume their scanned areas start at the same place (registration corrects it)
    (lo1, _), (lo2, _) = boxes
    return lo2 - lo1, "registered"


def _common_box(boxes, n: np.ndarray, shape1, shape2, paths) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) in half 1's pixels: both scanned areas (half 2's moved into half 1's frame by
    the whole pixels ``n``), inside both images once half 2's crop is moved by ``n``."""
    (lo1, hi1), (lo2, hi2) = boxes
    lo, hi = np.maximum(lo1, lo2 - n), np.minimum(hi1, hi2 - n)
    box = []
    for a in range(2):
        valid_lo, valid_hi = max(0, -int(n[a])), min(shape1[a], shape2[a] - int(n[a]))  # [lo, hi) in both images
        if valid_hi - valid_lo < MIN_COMPARED_PX:
            raise InvalidData(f"{paths[1]}: overlaps {paths[0]} over only {max(valid_hi - valid_lo, 0)} pixels "
                              f"along {'yx'[a]} (at least {MIN_COMPARED_PX} needed for an FRC)")
        # 1e-3 px: float32 positions (and the origins' difference) are not exact
        start = max(int(math.ceil(lo[a] - 1e-3)), valid_lo)
        stop = min(int(math.floor(hi[a] + 1e-3)) + 1, valid_hi)
        if stop - start < MIN_COMPARED_PX:  # a tiny (or disjoint) common area: the smallest window about its centre
            centre = 0.5 * (lo[a] + hi[a])
            start = min(max(valid_lo, int(round(centre - 0.5 * MIN_COMPARED_PX))), valid_hi - MIN_COMPARED_PX)
            stop = start + MIN_COMPARED_PX
        box.append((start, stop - start))
    return box[0][0], box[1][0], box[0][1], box[1][1]


def halves_frc(half1: Reconstruction, half2: Reconstruction, margin_A: float) -> HalvesFRC:
    """FRC of the depth-summed phases of two half-data reconstructions over their common scanned area.

    Both halves are cropped at the same pixel box of one object frame: the intersection of their
    scanned areas (each the bounding box of its own ``positions_A``, shrunk by ``margin_A``).
    Frames: two stores with ``origin_A`` attrs are related by them; otherwise two of the same
    object shape are taken to share one (``ptycore init`` gives both halves the whole scan's frame);
    otherwise (separately made stores) their scanned areas are first assumed to start at the same
    place. The registered shift (windowed cross-correlation, iterated to its fixed point) then moves
    half 2's crop by whole pixels, re-cropping it from its own image, until less than about half a
    pixel is left; only that residual is applied by a (periodic) Fourier shift, so no strip of
    columns is wrapped around the edge.
    """
    from scipy.ndimage import fourier_shift

    from ptycore.metrics import fourier_ring_correlation

    px = half1.pixel_size_A
    if abs(half1.pixel_size_A - half2.pixel_size_A) > 1e-6 * px:
        raise InvalidData(f"{half2.path}: pixel_size_A {half2.pixel_size_A:.6g} differs from {half1.path}'s "
                          f"{px:.6g}")
    images = (half1.phase_sum, half2.phase_sum)
    warnings: list[str] = []
    boxes = []
    for half, image in zip((half1, half2), images, strict=True):
        lo, hi, notes = scanned_box(half.positions_A, image.shape, px, margin_A, 0.0, half.path)
        boxes.append((lo / px, hi / px))
        warnings += [f"{half.path}: {note}" for note in notes]
    expected, frames = _half2_offset(half1, half2, boxes)
    offset = expected
    paths = (half1.path, half2.path)
    for _ in range(8):  # whole pixels: move half 2's crop until less than about half a pixel is left
        n = np.rint(offset).astype(int)
        y0, x0, h, w = _common_box(boxes, n, images[0].shape, images[1].shape, paths)
        a = images[0][y0 : y0 + h, x0 : x0 + w]
        b0 = images[1][y0 + n[0] : y0 + n[0] + h, x0 + n[1] : x0 + n[1] + w]
        fb0 = np.fft.fft2(b0)
        b, shift = b0, np.zeros(2)
        for _ in range(8):  # the windowed correlation is biased towards 0: iterate to the fixed point
            step = register(a, b)
            shift = shift + step
            b = np.fft.ifft2(fourier_shift(fb0, shift)).real
            if np.hypot(*step) < 0.01 or np.abs(shift).max() > 1.0:
                break
        found = n - shift  # the offset measured now
        if np.all(np.abs(found - n) <= 0.6):
            break
        offset = found
    else:
        warnings.append(f"the halves' registration did not settle (residual shift {shift.round(2).tolist()} px)")
    total = n - shift
    if frames != "registered" and np.hypot(*(total - expected)) > 1.0:
        warnings.append(f"the halves are {np.round(total * px, 3).tolist()} Å apart once registered, although "
                        f"their frames ({frames}) say {np.round(expected * px, 3).tolist()} Å: made in different "
                        "object frames?")
    elif frames == "registered":
        warnings.append("the halves have different object shapes and no origin_A: their frames were related by "
                        "registration only")
    frc = fourier_ring_correlation(a, b, px)
    return HalvesFRC(frc, shift, (int(n[0]), int(n[1])), (y0, x0, h, w), frames, warnings)


# ---------------------------------------------------------------- the verb
def _check_output(out: Path, overwrite: bool) -> None:
    refuse_existing(out, overwrite)


def evaluate(result, out, *, truth=None, init=None, half1=None, half2=None, dataset=None, plan=None,
             margin_A: float = DEFAULT_MARGIN_A, figures: bool = True, overwrite: bool = False,
             progress=None, data_only=None) -> dict:
    """Evaluate ``result`` into the directory ``out`` (atomically); returns the metrics dict."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    _check_output(out, overwrite)
    if not (math.isfinite(margin_A) and margin_A >= 0):
        raise InvalidArgument(f"--margin-A must be >= 0, got {margin_A}")
    if (half1 is None) != (half2 is None):
        raise InvalidArgument("--half1 and --half2 go together")
    # validate every input before computing anything
    rec = load_reconstruction(result, role="result")
    tru = load_reconstruction(truth, role="truth") if truth is not None else None
    ini = load_reconstruction(init, role="init") if init is not None else None
    halves = (load_reconstruction(half1, role="half1"), load_reconstruction(half2, role="half2")) \
        if half1 is not None else None
    plain = load_reconstruction(data_only, role="data-only") if data_only is not None else None
    if ini is not None:
        if ini.positions_A is None or rec.positions_A is None or ini.positions_A.shape != rec.positions_A.shape:
            raise InvalidData(f"{ini.path}: its positions_A do not match {rec.path}'s "
                              f"({None if ini.positions_A is None else ini.positions_A.shape} vs "
                              f"{None if rec.positions_A is None else rec.positions_A.shape})")

    from ptycore import __version__
    from ptycore.metrics import information_limit

    warnings: list[str] = []
    if rec.phase.shape[0] > 1:
        warnings.append(f"{rec.phase.shape[0]} object modes: the first is evaluated")
    autoplan = rec.provenance.get("autoplan") or {}  # the data notes and physics warnings of reconstruct
    warnings += [str(w) for w in (autoplan.get("data_notes") or []) + (autoplan.get("warnings") or [])]
    metrics: dict = {k: None for k in METRICS_SCHEMA}
    metrics.update({
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "dataset": dataset or dataset_name(rec),
        "plan": plan or plan_name(rec),
        "stages": list(provenance_summary(rec)["stages"] or []),
        "result": str(rec.path),
        "truth": str(tru.path) if tru else None,
        "init": str(ini.path) if ini else None,
        "half1": str(halves[0].path) if halves else None,
        "half2": str(halves[1].path) if halves else None,
        "pixel_size_A": rec.pixel_size_A,
        "object_shape": list(rec.phase.shape),
        "n_slices": int(rec.phase.shape[1]),
        "slice_thickness_A": rec.slice_thickness_A,
        "probe_modes": int(rec.probe.shape[0]) if rec.probe is not None else None,
        "wall_seconds": rec.provenance.get("wall_seconds"),
        "nyquist_A": 2 * rec.pixel_size_A,
        "margin_A": margin_A,
        "ptycore_version": __version__,
    })
    if rec.probe is not None:
        power = np.sum(np.abs(rec.probe) ** 2, axis=(-2, -1))
        metrics["probe_mode_powers"] = [float(v) for v in power / max(power.sum(), 1e-30)]
    metrics.update(history_metrics(rec.history, metrics["stages"]))

    say("information limit")
    phase_sum = rec.phase_sum
    scanned, box, notes = crop_scanned(rec, phase_sum, margin_A)
    warnings += notes
    info = None
    if np.ptp(scanned) > 0:
        info = information_limit(scanned, rec.pixel_size_A)
        metrics["information_limit_A"] = info.limit_A
        metrics["information_limit_at_floor_band"] = bool(info.at_floor_band)
    else:
        warnings.append("the phase is flat over the scanned area (an initial object?): no information limit")

    comparison = None
    if tru is not None:
        say("comparison with the truth")
        comparison = compare_with_truth(rec, tru, margin_A, result_origin(rec, ini))
        metrics.update(comparison.metrics)
        warnings += comparison.warnings
    frc = None
    if halves is not None:
        say("Fourier ring correlation")
        halves_result = halves_frc(*halves, margin_A)
        frc = halves_result.frc
        warnings += halves_result.warnings
        metrics["frc_resolution_A"] = frc.resolution_A
        metrics["frc_reached_nyquist"] = bool(frc.reached_nyquist)
    if ini is not None:
        mag = np.hypot(*(rec.positions_A - ini.positions_A).T)
        metrics["position_correction_rms_A"] = float(np.sqrt(np.mean(mag**2)))
        metrics["position_correction_max_A"] = float(mag.max())
    if plain is not None:
        say("prior check against the data-only result")
        from ptycore.prior.check import hallucination_check

        metrics["prior_check"] = hallucination_check(plain, rec, margin_A)
    metrics["warnings"] = list(dict.fromkeys(warnings))
    metrics["created"] = now_iso()

    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        written: list[str] = []
        if figures:
            say("figures")
            from ptycore import figures as fig

            px = rec.pixel_size_A
            written.append(fig.phase_figure(tmp / "phase_sum.png", phase_sum, px, box=box,
                                            title=f"Depth-summed phase ({rec.phase.shape[1]} slices)").name)
            if comparison is not None:
                written.append(fig.comparison_figure(
                    tmp / "comparison.png", comparison.result, comparison.truth, comparison.pixel_size_A,
                    ssim=metrics["ssim_phase_sum"], psnr=metrics["psnr_phase_sum"],
                    title="Depth-summed phase, scanned area").name)
            n_s = rec.phase.shape[1]
            if n_s > 1:
                picks = np.unique(np.linspace(0, n_s - 1, min(n_s, 16)).round().astype(int))
                dz = rec.slice_thickness_A
                labels = [f"slice {i}" + (f" (z={i * dz:.3g} Å)" if dz else "") for i in picks]
                written.append(fig.montage_figure(tmp / "slices.png", [rec.phase[0, i] for i in picks], px,
                                                  title=f"Phase per slice ({n_s} slices"
                                                  + (f" of {dz:.3g} Å)" if dz else ")"), labels=labels).name)
            if rec.amplitude is not None:
                transmitted = np.exp(np.sum(np.log(np.clip(rec.amplitude[0], 1e-6, None)), axis=0))
                written.append(fig.phase_figure(tmp / "amplitude.png", transmitted, px,
                                                title="Amplitude (product over slices)", box=box,
                                                label="transmitted amplitude").name)
            if rec.probe is not None:
                written.append(fig.probe_figure(tmp / "probe.png", rec.probe, px,
                                                metrics["probe_mode_powers"]).name)
            if info is not None:
                written.append(fig.spectrum_figure(tmp / "spectrum.png", scanned, px, info).name)
            if rec.history:
                written.append(fig.loss_figure(tmp / "loss.png", rec.history, metrics["stages"]).name)
            if ini is not None:
                written.append(fig.positions_figure(tmp / "positions.png", ini.positions_A, rec.positions_A).name)
            if frc is not None:
                written.append(fig.frc_figure(tmp / "frc.png", frc).name)
        metrics["figures"] = written
        metrics["evaluate_seconds"] = time.perf_counter() - t0
        (tmp / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1, allow_nan=True) + "\n")
        from ptycore.report import evaluation_report

        (tmp / "report.html").write_text(evaluation_report(metrics, provenance_summary(rec), tmp), encoding="utf-8")
    return metrics


def _jsonable(value):
    """numpy scalars → Python; non-finite floats → None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
