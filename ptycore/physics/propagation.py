"""Fresnel propagation between slices, with band limit and object tilt."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ptycore.physics.grid import Grid

#: Default band limit as a fraction of the Nyquist frequency (anti-aliasing of |psi|^2 products).
DEFAULT_BANDLIMIT = 2.0 / 3.0


def bandlimit_mask(grid: Grid, fraction: float | None = DEFAULT_BANDLIMIT) -> np.ndarray:
    """Hard disk ``|k| < fraction * k_Nyquist`` in FFT order (all ones if ``fraction`` is None)."""
    ky, kx = grid.frequencies_invA()
    if fraction is None:
        return np.ones(grid.shape, dtype=np.float32)
    if not 0 < fraction <= 1:
        raise ValueError(f"band limit must be a fraction in (0, 1] of Nyquist, got {fraction}")
    return (np.sqrt(ky**2 + kx**2) < fraction * grid.nyquist_invA()).astype(np.float32)


def fresnel_kernel(grid: Grid, wavelength_A: float, dz_A, tilt_mrad=None, bandlimit: float | None = DEFAULT_BANDLIMIT):
    """Fresnel propagator over ``dz_A`` in Fourier space (FFT order).

    ``exp(-i pi lambda |k|^2 dz + 2 pi i dz (ky tan(tilt_y) + kx tan(tilt_x)))`` times the band
    limit. ``tilt_mrad`` is ``(2,)`` (tilt_y, tilt_x) or ``(..., 2)`` for one tilt per
    position; the result then has shape ``(..., ny, nx)``. Differentiable in ``dz_A`` and tilt.
    complex64 unless ``dz_A`` or the tilt is float64 (jax x64), then complex128.
    """
    if tilt_mrad is not None:
        tilt_mrad = jnp.asarray(tilt_mrad)
    real = jnp.result_type(jnp.float32, dz_A, *(() if tilt_mrad is None else (tilt_mrad,)))
    ky, kx = grid.frequencies_invA()
    ky = jnp.asarray(ky, dtype=real)
    kx = jnp.asarray(kx, dtype=real)
    phase = -np.pi * wavelength_A * (ky**2 + kx**2) * dz_A
    if tilt_mrad is not None:
        tan = jnp.tan(tilt_mrad.astype(real) * 1e-3)
        tan_y = tan[..., 0, None, None]
        tan_x = tan[..., 1, None, None]
        phase = phase + 2 * np.pi * dz_A * (ky * tan_y + kx * tan_x)
    mask = jnp.asarray(bandlimit_mask(grid, bandlimit))
    return (mask * jnp.exp(1j * phase)).astype(jnp.result_type(real, jnp.complex64))


def propagate(wave, kernel):
    """Apply a Fourier-space ``kernel`` to ``wave`` over its last two axes."""
    return jnp.fft.ifft2(jnp.fft.fft2(wave) * kernel)
