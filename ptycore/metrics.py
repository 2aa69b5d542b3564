"""Image-quality metrics of reconstructed phases (numpy, scipy, scikit-image; no JAX).

Everything here works on plain 2-D arrays with a pixel size in Å; ``ptycore.evaluate`` reads
the stores, aligns reconstruction and truth, and calls these.

Definitions
-----------
Radial spectra. An image is mean-subtracted and multiplied by a separable Hann window (so the
non-periodic edges do not leak power to high frequencies), Fourier transformed, and its
power ``|F|^2`` averaged over rings of width ``dk = max(1/(H p), 1/(W p))`` (Å⁻¹) centred on
``k = i dk``. Only rings inside the Nyquist circle ``k <= 1/(2p)`` are kept.

Information limit (:func:`information_limit`). The *noise floor* ``F`` is the median of the
ring-averaged power over the outer band ``0.9 k_N <= k <= k_N`` (``k_N = 1/(2p)``), where a
reconstruction holds no more signal than noise. The information limit is the highest spatial
frequency ``k_lim < 0.9 k_N`` at which the ring-averaged power still exceeds ``(1 + snr) F``
(default ``snr = 1``: ring signal power equal to the noise power), log-linearly interpolated
between rings; it is reported as a distance ``1 / k_lim`` in Å. For a crystal this is the
highest-order ring of reflections that rises above the floor. When every ring up to the floor
band exceeds the threshold the limit is the band's edge ``1 / (0.9 k_N)`` and ``at_floor_band``
is set: the image holds information up to (at least) there, and the floor is signal, not noise.
The window widens a sharp spectral edge by up to two rings, so the limit is known to about
``2 dk`` (a flat, white image has no fall-off at all and gets the first ring, i.e. no information
above its floor).

Fourier ring correlation (:func:`fourier_ring_correlation`). For two independent
reconstructions ``a`` and ``b`` of the same area (mean-subtracted, Hann-windowed),
``FRC(k) = Re sum_ring A B* / sqrt(sum_ring |A|^2 sum_ring |B|^2)``. The resolution is
``1 / k`` at the first ring (from low to high ``k``, ring 0 excluded) where FRC falls below
the half-set threshold 1/7 (Rosenthal & Henderson 2003), interpolated linearly between rings;
if it never does, the resolution is the Nyquist distance ``2 p`` and ``reached_nyquist`` is set.

SSIM and PSNR (:func:`compare_phase`). The constant phase offset is removed (both images
mean-subtracted), then scikit-image's ``structural_similarity`` (7-pixel uniform window) and
``peak_signal_noise_ratio`` are computed with ``data_range`` = the truth's peak-to-peak value.
SSIM is local: over a flat truth background its structure term is ~0 wherever the
reconstruction is noisy, so a noisy but correct reconstruction can score near 0 while its
Pearson correlation with the truth (also reported) is high.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptycore.physics.slicing import slice_weights

#: half-set FRC threshold (Rosenthal & Henderson 2003)
FRC_THRESHOLD = 1.0 / 7.0
#: the outer band of the spectrum (fractions of Nyquist) that defines the noise floor
FLOOR_BAND = (0.9, 1.0)
#: history arrays of a result store that are not loss terms
NON_LOSS_TERMS = ("stage", "s_per_iter", "probe_mode_powers")


# ---------------------------------------------------------------- windows and spectra
def hann2d(shape: tuple[int, int]) -> np.ndarray:
    """Separable 2-D Hann window (periodic-free: zero at both ends of each axis)."""
    wy = np.hanning(shape[0]) if shape[0] > 1 else np.ones(1)
    wx = np.hanning(shape[1]) if shape[1] > 1 else np.ones(1)
    return np.outer(wy, wx)


def _prepared_fft(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"need a 2-D image of at least 8x8 pixels, got shape {image.shape}")
    return np.fft.fft2((image - image.mean()) * hann2d(image.shape))


def _rings(shape: tuple[int, int], pixel_size_A: float) -> tuple[np.ndarray, float, int]:
    """Ring index of every Fourier pixel (-1 outside the Nyquist circle), ring width, ring count."""
    ky = np.fft.fftfreq(shape[0], d=pixel_size_A)
    kx = np.fft.fftfreq(shape[1], d=pixel_size_A)
    k = np.hypot(ky[:, None], kx[None, :])
    dk = max(1.0 / (shape[0] * pixel_size_A), 1.0 / (shape[1] * pixel_size_A))
    nyquist = 0.5 / pixel_size_A
    n_rings = int(np.floor(nyquist / dk + 1e-9)) + 1
    index = np.rint(k / dk).astype(int)
    index[index >= n_rings] = -1
    return index, dk, n_rings


def _ring_sum(values: np.ndarray, index: np.ndarray, n_rings: int) -> np.ndarray:
    inside = index >= 0
    return np.bincount(index[inside], weights=values[inside], minlength=n_rings)[:n_rings]


@dataclass
class RadialSpectrum:
    k_invA: np.ndarray  # ring centres (Å⁻¹)
    power: np.ndarray  # ring-averaged |F|^2 of the windowed, mean-subtracted image
    pixel_size_A: float

    @property
    def nyquist_invA(self) -> float:
        return 0.5 / self.pixel_size_A


def radial_power_spectrum(image: np.ndarray, pixel_size_A: float) -> RadialSpectrum:
    """Ring-averaged power spectrum of ``image`` (see the module docstring)."""
    spectrum = _prepared_fft(image)
    index, dk, n_rings = _rings(spectrum.shape, pixel_size_A)
    counts = np.bincount(index[index >= 0], minlength=n_rings)[:n_rings]
    power = _ring_sum(np.abs(spectrum) ** 2, index, n_rings) / np.maximum(counts, 1)
    return RadialSpectrum(np.arange(n_rings) * dk, power, pixel_size_A)


def power_spectrum_2d(image: np.ndarray) -> np.ndarray:
    """|F|^2 of the windowed, mean-subtracted image, zero frequency at the centre (for figures)."""
    return np.fft.fftshift(np.abs(_prepared_fft(image)) ** 2)


# ---------------------------------------------------------------- information limit
@dataclass
class InformationLimit:
    limit_A: float  # 1 / k_limit
    k_limit_invA: float
    floor: float  # noise floor (ring-averaged power)
    threshold: float  # (1 + snr) * floor
    at_floor_band: bool  # no fall-off to the floor below the floor band
    spectrum: RadialSpectrum


def information_limit(image: np.ndarray, pixel_size_A: float, *, snr: float = 1.0,
                      floor_band: tuple[float, float] = FLOOR_BAND) -> InformationLimit:
    """Highest spatial frequency whose ring-averaged power exceeds ``(1 + snr)`` × the noise floor."""
    spec = radial_power_spectrum(image, pixel_size_A)
    k, power = spec.k_invA, spec.power
    kn = spec.nyquist_invA
    in_band = (k >= floor_band[0] * kn - 1e-12) & (k <= floor_band[1] * kn + 1e-12)
    if in_band.sum() < 1:
        raise ValueError("image too small: no ring in the noise-floor band")
    floor = float(np.median(power[in_band]))
    threshold = (1.0 + snr) * floor
    band_start = int(np.argmax(in_band))  # first ring of the floor band
    above = np.nonzero(power[1:band_start] > threshold)[0] + 1
    if len(above) == 0:  # nothing but the floor: the limit is the first ring
        k_lim = float(k[1])
        return InformationLimit(1.0 / k_lim, k_lim, floor, threshold, False, spec)
    last = int(above[-1])
    if last + 1 >= band_start:  # above threshold all the way to the floor band
        k_lim = float(floor_band[0] * kn)
        return InformationLimit(1.0 / k_lim, k_lim, floor, threshold, True, spec)
    # log-linear interpolation between ring `last` (above) and `last + 1` (below)
    la, lb, lt = np.log(power[last]), np.log(max(power[last + 1], 1e-300)), np.log(threshold)
    frac = (la - lt) / (la - lb) if la != lb else 0.0
    k_lim = float(k[last] + np.clip(frac, 0.0, 1.0) * (k[last + 1] - k[last]))
    return InformationLimit(1.0 / k_lim, k_lim, floor, threshold, False, spec)


# ---------------------------------------------------------------- FRC
@dataclass
class FRC:
    k_invA: np.ndarray
    frc: np.ndarray
    resolution_A: float
    k_resolution_invA: float
    reached_nyquist: bool
    threshold: float = FRC_THRESHOLD


def fourier_ring_correlation(a: np.ndarray, b: np.ndarray, pixel_size_A: float,
                             threshold: float = FRC_THRESHOLD) -> FRC:
    """FRC of two same-shape images and the resolution where it first falls below ``threshold``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"FRC needs two images of the same shape, got {a.shape} and {b.shape}")
    fa, fb = _prepared_fft(a), _prepared_fft(b)
    index, dk, n_rings = _rings(fa.shape, pixel_size_A)
    cross = _ring_sum(np.real(fa * np.conj(fb)), index, n_rings)
    pa = _ring_sum(np.abs(fa) ** 2, index, n_rings)
    pb = _ring_sum(np.abs(fb) ** 2, index, n_rings)
    frc = cross / np.sqrt(np.maximum(pa * pb, 1e-300))
    k = np.arange(n_rings) * dk
    below = np.nonzero(frc[1:] < threshold)[0] + 1
    if len(below) == 0:
        kn = 0.5 / pixel_size_A
        return FRC(k, frc, 1.0 / kn, kn, True, threshold)
    i = int(below[0])
    if i == 1:
        k_res = float(k[1])
    else:  # linear interpolation between ring i-1 (above) and i (below)
        fa_, fb_ = frc[i - 1], frc[i]
        frac = (fa_ - threshold) / (fa_ - fb_) if fa_ != fb_ else 0.0
        k_res = float(k[i - 1] + np.clip(frac, 0.0, 1.0) * dk)
    return FRC(k, frc, 1.0 / k_res, k_res, False, threshold)


# ---------------------------------------------------------------- SSIM / PSNR
def compare_phase(result: np.ndarray, truth: np.ndarray) -> dict:
    """SSIM and PSNR of ``result`` against ``truth`` after removing the constant offset.

    Both images must already be aligned and on the same grid. Returns ``ssim``, ``psnr_db``,
    ``offset_rad`` (mean(result) - mean(truth)), ``rmse_rad`` (after the offset) and ``pearson``
    (the correlation coefficient: unlike SSIM, not dominated by noise over a flat background).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    result = np.asarray(result, np.float64)
    truth = np.asarray(truth, np.float64)
    if result.shape != truth.shape:
        raise ValueError(f"shapes differ: {result.shape} vs {truth.shape}")
    offset = float(result.mean() - truth.mean())
    r = result - result.mean()
    t = truth - truth.mean()
    data_range = float(np.ptp(t)) or 1.0
    win = min(7, *(s - (1 - s % 2) for s in t.shape))  # odd, at most the image size
    ssim = float(structural_similarity(t, r, data_range=data_range, win_size=win))
    rmse = float(np.sqrt(np.mean((r - t) ** 2)))
    psnr = float(peak_signal_noise_ratio(t, r, data_range=data_range)) if rmse > 0 else float("inf")
    norm = float(np.sqrt(np.sum(r * r) * np.sum(t * t)))
    pearson = float(np.sum(r * t) / norm) if norm > 0 else float("nan")
    return {"ssim": ssim, "psnr_db": psnr, "offset_rad": offset, "rmse_rad": rmse, "pearson": pearson}


# ---------------------------------------------------------------- slices
def remap_slices(phase: np.ndarray, n_slices: int) -> np.ndarray:
    """(slices, H, W) → (n_slices, H, W) conserving the total phase at every pixel."""
    phase = np.asarray(phase)
    if phase.shape[0] == n_slices:
        return phase
    return np.einsum("ij,jyx->iyx", slice_weights(phase.shape[0], n_slices), phase)
