"""Sub-pixel shifts by Fourier phase ramps and integer crops of object patches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def fourier_shift(array, shift_px):
    """Shift ``array`` (..., ny, nx) by ``shift_px`` (..., 2) pixels (y, x): out(r) = in(r - s).

    Exact for band-limited periodic functions; differentiable in ``shift_px``.
    """
    return jnp.fft.ifft2(jnp.fft.fft2(array) * shift_ramp(array.shape[-2:], shift_px))


def shift_ramp(shape: tuple[int, int], shift_px):
    """Fourier phase ramp ``exp(-2 pi i k.s)`` (FFT order) for shifts ``shift_px`` (..., 2) → (..., ny, nx).

    Multiplying a spectrum by it and inverse-transforming shifts by ``s``; computing the
    spectrum once and applying many ramps saves one FFT per shift.
    """
    ny, nx = shape
    shift_px = jnp.asarray(shift_px)
    real = jnp.result_type(shift_px, jnp.float32)  # float32 by default, float64 kept under x64
    shift_px = shift_px.astype(real)
    ky = jnp.asarray(np.fft.fftfreq(ny), dtype=real)[:, None]
    kx = jnp.asarray(np.fft.fftfreq(nx), dtype=real)[None, :]
    return jnp.exp(-2j * np.pi * (ky * shift_px[..., 0, None, None] + kx * shift_px[..., 1, None, None]))


def split_positions(positions_A, pixel_size_A: float, window_shape: tuple[int, int]):
    """Probe-centre positions (n, 2) in Å → integer top-left pixel of each window and the
    sub-pixel remainder in [0, 1) by which the probe must be shifted inside it.

    Object pixel (0, 0) sits at 0 Å; the probe centre is window pixel (ny // 2, nx // 2).
    """
    centre = jnp.asarray([window_shape[0] // 2, window_shape[1] // 2], dtype=jnp.float32)
    top_left = positions_A / pixel_size_A - centre
    top_left_int = jnp.floor(top_left)
    return lax.stop_gradient(top_left_int).astype(jnp.int32), top_left - top_left_int


def crop_patches(array, top_left, window_shape: tuple[int, int]):
    """Crop windows ``(..., ny, nx)`` of ``array`` (..., Hy, Wx) at integer ``top_left`` (n, 2).

    Returns ``(n, ..., ny, nx)``. Windows must lie inside the array (the object must be
    padded for the scan); out-of-range starts are clamped by XLA.
    """
    lead = array.ndim - 2

    def one(corner):
        starts = (jnp.zeros((), corner.dtype),) * lead + (corner[0], corner[1])  # one index dtype, also under x64
        return lax.dynamic_slice(array, starts, array.shape[:lead] + tuple(window_shape))

    return jax.vmap(one)(top_left)


def object_shape_for(positions_A, pixel_size_A: float, window_shape: tuple[int, int], margin_px: int = 0):
    """Smallest object (Hy, Wx) that holds every probe window, plus ``margin_px`` on the far side.

    Raises ``ValueError`` if a window would start before object pixel 0.
    """
    centre = np.array([window_shape[0] // 2, window_shape[1] // 2])
    top_left = np.floor(np.asarray(positions_A, dtype=np.float64).reshape(-1, 2) / pixel_size_A - centre)
    if top_left.min() < 0:
        raise ValueError("a probe window starts before object pixel 0: positions must be >= window/2 in Å")
    return tuple(int(t + w + 1 + margin_px) for t, w in zip(top_left.max(axis=0), window_shape, strict=True))
