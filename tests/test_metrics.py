"""Image metrics on synthetic images with known answers: information limit, FRC, SSIM/PSNR, slices."""

from __future__ import annotations

import numpy as np
import pytest

from ptycore.metrics import (
    compare_phase,
    fourier_ring_correlation,
    information_limit,
    remap_slices,
    slice_weights,
)

PIXEL_A = 0.2  # Nyquist 2.5 / Å


def band_limited(n: int, pixel_A: float, cutoff_invA: float, seed: int) -> np.ndarray:
    """A random image whose spectrum is flat (in expectation) up to ``cutoff_invA`` and zero beyond."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.fft2(rng.normal(size=(n, n)))
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n, pixel_A), np.fft.fftfreq(n, pixel_A), indexing="ij"))
    image = np.fft.ifft2(np.where(k <= cutoff_invA, spectrum, 0)).real
    return image / image.std()


@pytest.mark.parametrize("cutoff_invA", [0.8, 1.25, 1.8])
def test_information_limit_finds_a_known_cutoff(cutoff_invA):
    signal = band_limited(160, PIXEL_A, cutoff_invA, seed=1)
    noise = 0.03 * np.random.default_rng(2).normal(size=signal.shape)  # white: the floor
    info = information_limit(signal + noise, PIXEL_A)
    assert not info.at_floor_band
    # the Hann window widens a sharp edge by up to two rings of 1 / (160 * 0.2 Å) = 0.031 / Å
    ring = 1 / (160 * PIXEL_A)
    assert cutoff_invA - 0.5 * ring <= info.k_limit_invA <= cutoff_invA + 2.5 * ring
    assert info.limit_A == pytest.approx(1 / info.k_limit_invA)
    assert info.threshold == pytest.approx(2 * info.floor)


def test_information_limit_flags_signal_up_to_the_floor_band():
    """Signal up to 0.92 Nyquist: no fall-off below the floor band, the limit is the band's edge."""
    image = band_limited(128, PIXEL_A, 2.3, seed=3) + 0.03 * np.random.default_rng(4).normal(size=(128, 128))
    info = information_limit(image, PIXEL_A)
    assert info.at_floor_band
    assert info.limit_A == pytest.approx(1 / (0.9 * 2.5))
    # and a flat white image has no spectral fall-off at all: nothing rises above its own floor
    white = information_limit(np.random.default_rng(5).normal(size=(128, 128)), PIXEL_A)
    assert not white.at_floor_band and white.limit_A > 10


def test_information_limit_depends_on_the_signal_not_its_offset_or_scale():
    image = band_limited(128, PIXEL_A, 1.0, seed=5) + 0.02 * np.random.default_rng(6).normal(size=(128, 128))
    a = information_limit(image, PIXEL_A)
    b = information_limit(3.0 * image + 7.0, PIXEL_A)
    assert a.limit_A == pytest.approx(b.limit_A)


def test_frc_resolution_of_two_noisy_halves():
    """Common signal up to 1.25/Å, independent noise in each half: FRC falls at the cutoff."""
    signal = band_limited(160, PIXEL_A, 1.25, seed=7)
    rng = np.random.default_rng(8)
    a = signal + 0.05 * rng.normal(size=signal.shape)
    b = signal + 0.05 * rng.normal(size=signal.shape)
    frc = fourier_ring_correlation(a, b, PIXEL_A)
    assert not frc.reached_nyquist
    assert frc.resolution_A == pytest.approx(1 / 1.25, rel=0.06)
    inside = (frc.k_invA > 0.1) & (frc.k_invA < 1.1)
    outside = frc.k_invA > 1.5
    assert frc.frc[inside].min() > 0.9  # the signal correlates
    assert np.abs(frc.frc[outside]).mean() < 0.15  # the noise does not


def test_frc_limits():
    image = band_limited(96, PIXEL_A, 2.0, seed=9)
    same = fourier_ring_correlation(image, image, PIXEL_A)
    assert same.reached_nyquist and same.resolution_A == pytest.approx(2 * PIXEL_A)
    other = band_limited(96, PIXEL_A, 2.0, seed=10)
    unrelated = fourier_ring_correlation(image, other, PIXEL_A)
    assert unrelated.resolution_A > 5.0  # falls below 1/7 in the first rings
    with pytest.raises(ValueError, match="same shape"):
        fourier_ring_correlation(image, image[:-1], PIXEL_A)


def test_compare_phase_removes_the_offset_and_scores_a_wrong_image_low():
    truth = band_limited(64, PIXEL_A, 1.0, seed=11)
    same = compare_phase(truth + 2.5, truth)
    assert same["ssim"] == pytest.approx(1.0) and same["offset_rad"] == pytest.approx(2.5)
    assert same["rmse_rad"] == pytest.approx(0.0, abs=1e-12)
    noisy = compare_phase(truth + 0.05 * np.random.default_rng(12).normal(size=truth.shape), truth)
    assert 0.9 < noisy["ssim"] < 0.999
    assert noisy["psnr_db"] == pytest.approx(20 * np.log10(np.ptp(truth) / noisy["rmse_rad"]))
    assert same["pearson"] == pytest.approx(1.0) and compare_phase(-truth, truth)["pearson"] == pytest.approx(-1.0)
    wrong = compare_phase(band_limited(64, PIXEL_A, 1.0, seed=13), truth)
    assert wrong["ssim"] < 0.2 and abs(wrong["pearson"]) < 0.2


def test_slice_remap_conserves_the_total_phase():
    rng = np.random.default_rng(14)
    phase = rng.normal(size=(3, 5, 6))
    for n in (1, 2, 4, 7):
        remapped = remap_slices(phase, n)
        assert remapped.shape == (n, 5, 6)
        np.testing.assert_allclose(remapped.sum(0), phase.sum(0), atol=1e-12)
    np.testing.assert_allclose(slice_weights(4, 2), [[1, 1, 0, 0], [0, 0, 1, 1]])
    # halving and re-merging is the identity
    np.testing.assert_allclose(remap_slices(remap_slices(phase, 6), 3), phase, atol=1e-12)
