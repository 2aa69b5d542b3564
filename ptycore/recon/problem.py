"""The problem every engine solves: the multislice model of a batch of positions against the
measured patterns.

For a state (the rendered object, probe, positions, tilts, slice thickness) and a batch of
position indices the problem gives

- the model **intensities** (batch, ky, kx) and, for projection engines, the **waves** of the one
  slice sweep in :mod:`ptycore.physics.multislice` (incident on every slice, exit);
- the **residual vector** of a noise model with its per-pixel loss **curvature**: the data fit is
  a sum over detector pixels of ``l(a)`` of the model amplitude ``a = sqrt(I)``, and
  ``residuals`` returns ``r, h`` with ``l'(a) = h r`` and ``h`` the Gauss-Newton curvature
  ``l''(a)`` (``amplitude``: ``r = a - sqrt(d)``, ``h = 2``; ``poisson``: ``l = a^2 - 2 d log a``,
  ``h = 2 + 2 d / a^2``), the pieces a second-order engine needs (``G = J^T diag(h) J``);
- the scalar **loss terms** of a stage (data terms from the same amplitudes and residuals, object
  terms on the phase) and their weighted total.

The measured patterns are an argument, never closed over, so the same compiled problem runs on
data sharded over devices. Padding entries of a batch carry ``mask`` 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ptycore.physics.multislice import exit_waves, far_field_intensities, sweep
from ptycore.physics.propagation import fresnel_kernel
from ptycore.physics.shifts import crop_patches, split_positions
from ptycore.recon.losses import DATA_LOSSES, OBJECT_LOSSES

_EPS = 1e-12
#: floor on the model amplitude in the Poisson curvature (counts^0.5), relative to the
#: pattern's RMS measured amplitude per pixel: where the model is dark the curvature d/a^2
#: would be unbounded
POISSON_AMPLITUDE_FLOOR = 1e-2


def amplitude_residuals(amplitude, measured):
    """Gaussian noise on amplitudes: ``l = (a - sqrt(d))^2``; returns (r, h, l) per pixel."""
    r = amplitude - jnp.sqrt(measured)
    return r, jnp.full_like(r, 2.0), r * r


def poisson_residuals(amplitude, measured):
    """Poisson noise on counts, ``l = a^2 - 2 d log a`` (the negative log-likelihood of ``I = a^2``
    up to a constant, 0 at ``a = sqrt(d)``); returns (r, h, l) per pixel with ``l' = h r``."""
    floor = POISSON_AMPLITUDE_FLOOR * jnp.sqrt(jnp.mean(measured, axis=(-2, -1), keepdims=True)) + 1e-6
    a = jnp.maximum(amplitude, floor)
    grad = 2.0 * a - 2.0 * measured / a
    h = 2.0 + 2.0 * measured / (a * a)
    loss = a * a - measured - measured * (2.0 * jnp.log(a) - jnp.log(measured + 1e-12))
    return grad / h, h, loss


NOISE_MODELS = {"amplitude": amplitude_residuals, "poisson": poisson_residuals}


class Problem:
    """The model and data fit of one stage (see the module docstring)."""

    def __init__(self, optics, *, losses=None, per_position_tilts: bool = False, noise_model: str = "amplitude",
                 detector_mask=None, prior_map=None):
        self.optics = optics
        #: the learned prior on the stage's grid (ptycore.prior.guidance.PriorMap) for the ``prior`` term
        self.prior_map = prior_map
        #: (ky, kx) 1 = good pixel, 0 = excluded from every loss (None: all good)
        self.detector_mask = detector_mask
        self.per_position_tilts = per_position_tilts
        self.loss_names = list(losses or {})
        self.noise_model = noise_model

    # ------------------------------------------------------------ model
    def _tilts(self, state, idx):
        return state.tilts_mrad[idx] if self.per_position_tilts else state.tilts_mrad

    def intensities(self, state, idx):
        """Model intensities ``(batch, ky, kx)`` (FFT order) of positions ``idx``."""
        wave = exit_waves(self.optics, state.object_amplitude, state.object_phase, state.probe,
                          state.positions_A[idx], self._tilts(state, idx), state.slice_thickness_A)
        return far_field_intensities(wave)

    def amplitudes(self, state, idx):
        return jnp.sqrt(self.intensities(state, idx) + _EPS)

    # ------------------------------------------------------------ waves (projection engines)
    def sweep_constants(self, state):
        """What a projection engine keeps fixed over one iteration (computed once, before the loop
        over batches): the Fresnel kernel (one per position with per-position tilts), each
        position's crop corner and its sub-pixel shift ramp as two 1-D factors. Computing these
        outside the loop keeps XLA from re-evaluating their sines inside every product that
        broadcasts them over batch and modes (measured: those products then cost as much as the
        FFTs)."""
        optics = self.optics
        window = optics.grid.shape
        top_left, frac = split_positions(state.positions_A, optics.grid.pixel_size_A, window)
        ky = jnp.asarray(np.fft.fftfreq(window[0]), jnp.float32)
        kx = jnp.asarray(np.fft.fftfreq(window[1]), jnp.float32)
        tilts = jnp.asarray(state.tilts_mrad, jnp.float32)
        return {
            "top_left": top_left,
            "ramp_y": jnp.exp(-2j * np.pi * frac[:, 0, None] * ky),  # (n_pos, ny)
            "ramp_x": jnp.exp(-2j * np.pi * frac[:, 1, None] * kx),  # (n_pos, nx)
            "kernel": fresnel_kernel(optics.grid, optics.wavelength_A, state.slice_thickness_A, tilts,
                                     optics.bandlimit),
        }

    def waves(self, probe, transmission, constants, idx):
        """The slice sweep of positions ``idx`` keeping what a projection update needs: the waves
        incident on every slice (a list, slice 0 first; slice 0's is the shifted probe), the exit
        wave, the object patches, crop corners, shift ramps and the kernel. ``transmission`` is the
        complex object of one object mode (slices, Hy, Wx)."""
        window = self.optics.grid.shape
        top_left = constants["top_left"][idx]
        patches = crop_patches(transmission, top_left, window)  # (batch, slices, ny, nx)
        ramp = constants["ramp_y"][idx][:, :, None] * constants["ramp_x"][idx][:, None, :]  # (batch, ny, nx)
        shifted = jnp.fft.ifft2(jnp.fft.fft2(probe)[None] * ramp[:, None])  # (batch, modes, ny, nx)
        kernel = constants["kernel"]
        if kernel.ndim == 3:  # one tilt per position
            kernel = kernel[idx][:, None]
        rest = jnp.moveaxis(patches[:, 1:], 1, 0)[:, :, None]  # (slices-1, batch, 1, ny, nx)
        exit_wave, inside = sweep(shifted, patches[:, 0, None], rest, kernel, keep_incident=True, unroll=True)
        incident = [shifted] + [inside[s] for s in range(inside.shape[0])]
        return {"top_left": top_left, "ramp": ramp, "patches": patches, "incident": incident, "exit": exit_wave,
                "kernel": kernel, "transmission": transmission}

    # ------------------------------------------------------------ residuals and losses
    def residuals(self, amplitude, measured, mask):
        """Residual vector ``r``, curvature ``h`` and per-pixel loss ``l`` of the noise model for
        model amplitudes (batch, ky, kx); padding (``mask`` 0) contributes nothing."""
        r, h, loss = NOISE_MODELS[self.noise_model](amplitude, measured)
        w = mask[:, None, None] if self.detector_mask is None else mask[:, None, None] * self.detector_mask
        return r * w, h * w, loss * w

    def data_terms(self, model, measured, mask, names=None):
        """The stage's data loss terms from model intensities (``DATA_LOSSES``). Bad detector
        pixels count in none: model and data are both zeroed there, which removes them exactly
        from every data loss (each compares a pixel's model with its data)."""
        model, measured = self.masked(model), self.masked(measured)
        return {n: DATA_LOSSES[n](model, measured, mask) for n in (names or self.loss_names) if n in DATA_LOSSES}

    def masked(self, patterns):
        """Patterns (batch, ky, kx) with the bad detector pixels set to 0."""
        return patterns if self.detector_mask is None else patterns * self.detector_mask

    def loss_terms(self, state, measured, idx, mask, prior_target=None):
        """Every loss term of the stage on a batch: data terms on the model of ``idx``, object
        terms on the phase; ``prior`` (RED) against ``prior_target`` (:meth:`prior_target`)."""
        model = self.intensities(state, idx)
        terms = self.data_terms(model, measured[idx], mask)
        for name in self.loss_names:
            if name in OBJECT_LOSSES:
                terms[name] = OBJECT_LOSSES[name](state.object_phase)
        if "prior" in self.loss_names:
            terms["prior"] = self.prior_map.red_loss(state.object_phase, prior_target)
        return terms

    def prior_target(self, state, sigma_rad):
        """The RED target ``sg(D_sigma(P(phase)))`` of the state's object (None without a ``prior`` term)."""
        if "prior" not in self.loss_names:
            return None
        return self.prior_map.red_target(state.object_phase, sigma_rad)

    def total(self, terms, weights):
        return sum(weights[name] * terms[name] for name in self.loss_names)
