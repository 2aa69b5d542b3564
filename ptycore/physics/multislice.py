"""Mixed-state multislice forward model.

For each position: crop the object's transmission at the integer offset, shift every
probe mode by the sub-pixel remainder, then per slice multiply by the transmission and
Fresnel-propagate to the next slice (band-limited, tilted); the far field is the FFT
(``norm="ortho"``) and intensities sum incoherently over probe modes x object modes.
Batch and modes are broadcast; slices run under ``lax.scan``.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from ptycore.physics.electron import wavelength_A as _wavelength_A
from ptycore.physics.grid import Grid
from ptycore.physics.propagation import DEFAULT_BANDLIMIT, fresnel_kernel
from ptycore.physics.shifts import crop_patches, shift_ramp, split_positions


@dataclass(frozen=True)
class Optics:
    """Static (hashable) description of the forward model: probe window grid and beam energy."""

    grid: Grid
    energy_kv: float
    bandlimit: float | None = DEFAULT_BANDLIMIT

    @property
    def wavelength_A(self) -> float:
        return _wavelength_A(self.energy_kv)


def transmission(object_amplitude, object_phase):
    """Complex transmission ``amplitude * exp(i phase)``, same shape (obj_modes, slices, Hy, Wx).

    complex64 for float32 inputs (the default); complex128 for float64 inputs (jax x64).
    """
    dtype = jnp.result_type(object_amplitude, object_phase, jnp.complex64)
    return (object_amplitude * jnp.exp(1j * object_phase)).astype(dtype)


def exit_waves(optics: Optics, object_amplitude, object_phase, probe, positions_A, tilts_mrad, slice_thickness_A):
    """Exit waves ``(batch, obj_modes, probe_modes, ny, nx)`` below the last slice.

    ``object_*``: (obj_modes, slices, Hy, Wx); ``probe``: (probe_modes, ny, nx);
    ``positions_A``: (batch, 2) probe centres (y, x) in Å in the object frame;
    ``tilts_mrad``: (2,) global or (batch, 2) per position; ``slice_thickness_A``: scalar.
    """
    window = optics.grid.shape
    top_left, frac = split_positions(positions_A, optics.grid.pixel_size_A, window)
    t = transmission(object_amplitude, object_phase)
    # first slice and the rest cropped separately (slices-first for the scan, no copy of a slice range)
    first = crop_patches(t[:, 0], top_left, window)[:, :, None]  # (batch, obj_modes, 1, ny, nx)
    rest = crop_patches(jnp.moveaxis(t[:, 1:], 1, 0), top_left, window)  # (batch, slices-1, obj_modes, ny, nx)
    rest = jnp.moveaxis(rest, 0, 1)[:, :, :, None]  # (slices-1, batch, obj_modes, 1, ny, nx)
    # probe spectrum once per call, one inverse FFT per position and mode for the sub-pixel shift
    shifted = jnp.fft.ifft2(jnp.fft.fft2(probe)[None] * shift_ramp(window, frac)[:, None])  # (batch, modes, ny, nx)
    wave = shifted[:, None]  # (batch, 1, probe_modes, ny, nx)
    tilts = jnp.asarray(tilts_mrad)
    tilts = tilts.astype(jnp.result_type(tilts, jnp.float32))  # float32 by default, float64 kept under x64
    kernel = fresnel_kernel(optics.grid, optics.wavelength_A, slice_thickness_A, tilts, optics.bandlimit)
    if kernel.ndim == 3:  # one tilt per position
        kernel = kernel[:, None, None]
    return sweep(wave, first, rest, kernel)


def sweep(wave, first, rest, kernel, *, keep_incident: bool = False, unroll: bool = False):
    """The multislice sweep, the one copy every engine uses: ``wave`` (incident on the first
    slice) times the first slice's transmission ``first``, then for each slice of ``rest``
    ``(slices - 1, ...)``: Fresnel-propagate by ``kernel`` (FFT order) and multiply by it.

    Transmissions are the object already cropped at each position and broadcast against the
    wave (e.g. wave ``(batch, 1, probe_modes, ny, nx)``, ``first`` ``(batch, obj_modes, 1, ny, nx)``);
    propagation is between slices, none after the last. Returns the exit wave, and with
    ``keep_incident`` also the waves incident on slices 1 … slices-1 stacked ``(slices - 1, ...)``
    (the wave incident on slice 0 is ``wave``), which projection engines back-propagate through.
    ``unroll`` unrolls the scan over slices (the projection engines' choice: their per-slice
    updates then fuse with the forward)."""

    def through_slice(wave, slice_transmission):
        incident = jnp.fft.ifft2(jnp.fft.fft2(wave) * kernel)
        return incident * slice_transmission, (incident if keep_incident else None)

    if rest.shape[0] == 0:  # one slice
        exit_wave, incident = wave * first, jnp.zeros((0,) + jnp.broadcast_shapes(wave.shape, first.shape), wave.dtype)
    else:
        exit_wave, incident = lax.scan(through_slice, wave * first, rest, unroll=unroll)
    return (exit_wave, incident) if keep_incident else exit_wave


def intensities(optics: Optics, object_amplitude, object_phase, probe, positions_A, tilts_mrad, slice_thickness_A):
    """Far-field intensities ``(batch, ky, kx)`` in FFT order (zero frequency at [0, 0]).

    Summed over object and probe modes; for a unit-amplitude object each pattern's total
    equals the probe's total intensity (orthonormal FFT).
    """
    wave = exit_waves(optics, object_amplitude, object_phase, probe, positions_A, tilts_mrad, slice_thickness_A)
    return far_field_intensities(wave)


def far_field_intensities(wave):
    """Detector intensities (batch, ky, kx) of exit waves (batch, obj_modes, probe_modes, ny, nx):
    the orthonormal FFT, summed incoherently over the modes."""
    far_field = jnp.fft.fft2(wave, norm="ortho")
    # re^2 + im^2 rather than abs()^2: same value, a much cheaper gradient
    return jnp.sum(far_field.real**2 + far_field.imag**2, axis=(1, 2))


def diffraction_patterns(optics: Optics, object_amplitude, object_phase, probe, positions_A, tilts_mrad,
                         slice_thickness_A):
    """Like :func:`intensities` but with zero frequency at the centre, as a detector records it."""
    out = intensities(optics, object_amplitude, object_phase, probe, positions_A, tilts_mrad, slice_thickness_A)
    return jnp.fft.fftshift(out, axes=(-2, -1))
