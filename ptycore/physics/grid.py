"""Sampling grids in real and reciprocal space (numpy, computed once, static under jit)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A probe window of ``shape`` = (ny, nx) pixels of ``pixel_size_A`` (Å).

    Reciprocal coordinates are in FFT order (zero frequency at index 0); the
    detector convention (zero at the centre) is applied only at the boundary.
    """

    shape: tuple[int, int]
    pixel_size_A: float

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) < 2:
            raise ValueError(f"grid shape must be two sizes >= 2, got {self.shape}")
        if not self.pixel_size_A > 0:
            raise ValueError(f"pixel_size_A must be > 0, got {self.pixel_size_A}")

    @property
    def extent_A(self) -> tuple[float, float]:
        return (self.shape[0] * self.pixel_size_A, self.shape[1] * self.pixel_size_A)

    def frequencies_invA(self) -> tuple[np.ndarray, np.ndarray]:
        """(ky, kx) as 2-D arrays of spatial frequency in 1/Å, FFT order."""
        ky = np.fft.fftfreq(self.shape[0], d=self.pixel_size_A)
        kx = np.fft.fftfreq(self.shape[1], d=self.pixel_size_A)
        return np.meshgrid(ky, kx, indexing="ij")

    def nyquist_invA(self) -> float:
        return 1.0 / (2.0 * self.pixel_size_A)

    def detector_pixel_mrad(self, wavelength_A: float) -> tuple[float, float]:
        """Angular size of one detector pixel (y, x) for this window, in mrad."""
        return tuple(wavelength_A / e * 1e3 for e in self.extent_A)


def pixel_size_from_detector_A(wavelength_A: float, detector_px: int, detector_pixel_mrad: float) -> float:
    """Real-space pixel size implied by a detector of ``detector_px`` pixels of ``detector_pixel_mrad``."""
    return wavelength_A / (detector_px * detector_pixel_mrad * 1e-3)
