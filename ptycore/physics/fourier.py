"""Fourier cropping and padding of spectra: one routine for detector patterns (numpy, in the data
chain) and for object, probe and detector resampling between stages (JAX)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def fft_order_band(n: int, n_kept: int) -> np.ndarray:
    """Indices, into an ``n``-point axis in FFT order, of the central ``n_kept`` frequencies in
    ``n_kept``-point FFT order (integer frequencies -n_kept//2 … (n_kept-1)//2)."""
    k = np.rint(np.fft.fftfreq(n_kept, 1.0 / n_kept)).astype(np.int64)
    return k % n


def resize_spectrum_axis(spec, n_new: int, axis: int, *, real: bool):
    """Crop or zero-pad one axis of a spectrum in FFT order to ``n_new`` points, keeping the
    central frequencies; ``spec`` is a numpy or a JAX array (the result is of the same kind).

    ``real``: the spectrum is of a real field; the Nyquist bin of the smaller size (even sizes)
    then stands for both ±m/2 (summed on a crop, split in halves on a pad), so the result stays
    real, a pad is an exact interpolation and pad-then-crop is exact. Otherwise (a complex wave)
    the bins -m/2 … m/2-1 are kept as they are, as a detector crop does."""
    xp = np if isinstance(spec, np.ndarray) else jnp
    axis = axis % spec.ndim
    n_old = spec.shape[axis]
    if n_new == n_old:
        return spec
    m = min(n_old, n_new)
    nyquist = real and m % 2 == 0
    along = [1] * spec.ndim
    along[axis] = -1  # a 1-D factor broadcast along ``axis``
    if n_new < n_old:
        out = xp.take(spec, xp.asarray(fft_order_band(n_old, m)), axis=axis)
        if nyquist:  # the coarse Nyquist bin (-m/2) also receives +m/2
            plus = xp.take(spec, xp.asarray([m // 2]), axis=axis)
            fold = np.zeros(m, np.float32)
            fold[m // 2] = 1.0
            out = out + plus * xp.asarray(fold).reshape(along)
        return out
    # pad: gather from the old bins plus one zero bin (index n_old) for the new frequencies
    source = np.full(n_new, n_old, np.int64)
    source[fft_order_band(n_new, m)] = np.arange(m)  # old bin p (m-point FFT order) → its new bin
    weight = np.ones(n_new, np.float32)
    if nyquist:  # split the old Nyquist bin between -m/2 and +m/2
        source[m // 2] = source[n_new - m // 2]
        weight[[m // 2, n_new - m // 2]] = 0.5
    zero_shape = list(spec.shape)
    zero_shape[axis] = 1
    padded = xp.concatenate([spec, xp.zeros(zero_shape, spec.dtype)], axis=axis)
    out = xp.take(padded, xp.asarray(source), axis=axis)
    return out * xp.asarray(weight).reshape(along) if nyquist else out
