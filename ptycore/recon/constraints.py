"""Constraints applied to the state after an iteration's updates, at configured intervals.

Each constraint is ``f(state, ctx, cfg) -> state`` on a :class:`ptycore.recon.state.State`
(jittable); the engine gates each by a per-iteration flag passed as data, so switching a
constraint on or off never recompiles. ``ctx`` is the engine's static context.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ptycore.physics.probe import angular_coordinates, orthogonalize_modes


def probe_orthogonalize(state, ctx, cfg):
    modes, _ = orthogonalize_modes(state.probe)
    return state._replace(probe=modes)


def probe_aperture(state, ctx, cfg):
    alpha, _ = angular_coordinates(ctx.optics.grid, ctx.optics.wavelength_A)
    mask = jnp.asarray(alpha <= cfg.scale * ctx.convergence_mrad * 1e-3, jnp.float32)
    probe_k = jnp.fft.fft2(jnp.fft.ifftshift(state.probe, axes=(-2, -1))) * mask
    return state._replace(probe=jnp.fft.fftshift(jnp.fft.ifft2(probe_k), axes=(-2, -1)).astype(jnp.complex64))


def probe_intensity(state, ctx, cfg):
    scale = jnp.sqrt(ctx.mean_counts / jnp.sum(jnp.abs(state.probe) ** 2))
    return state._replace(probe=state.probe * scale)


def object_amplitude_bounds(state, ctx, cfg):
    return state._replace(object_amplitude=jnp.clip(state.object_amplitude, cfg.min, cfg.max))


def phase_positive(state, ctx, cfg):
    return state._replace(object_phase=jnp.maximum(state.object_phase, 0.0))


def kz_filter(state, ctx, cfg):
    """Missing-wedge filter: damp components with large k_z relative to k_r (3-D FFT of the phase)."""
    n_slices = state.object_phase.shape[1]
    if n_slices < 2:
        return state
    hy, wx = state.object_phase.shape[-2:]
    dz = state.slice_thickness_A
    kz = jnp.fft.fftfreq(n_slices)[:, None, None] / dz
    ky = np.fft.fftfreq(hy, d=ctx.pixel_size_A)[None, :, None]
    kx = np.fft.fftfreq(wx, d=ctx.pixel_size_A)[None, None, :]
    kr2 = jnp.asarray(ky**2 + kx**2, jnp.float32)
    alpha = (cfg.alpha_mrad or ctx.convergence_mrad) * 1e-3
    weight = 1 - (2 / np.pi) * jnp.arctan((cfg.beta * kz) ** 2 / (alpha**2 * kr2 + 1e-9))
    filtered = jnp.real(jnp.fft.ifftn(jnp.fft.fftn(state.object_phase, axes=(1, 2, 3)) * weight, axes=(1, 2, 3)))
    return state._replace(object_phase=filtered.astype(jnp.float32))


def _gaussian_fourier(shape, sigma_px):
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.fftfreq(shape[1])[None, :]
    return jnp.asarray(np.exp(-2 * (np.pi * sigma_px) ** 2 * (ky**2 + kx**2)), jnp.float32)


def lateral_blur(state, ctx, cfg):
    g = _gaussian_fourier(state.object_phase.shape[-2:], cfg.sigma_px)
    blur = lambda a: jnp.real(jnp.fft.ifft2(jnp.fft.fft2(a) * g)).astype(jnp.float32)  # noqa: E731
    return state._replace(object_phase=blur(state.object_phase))


def z_blur(state, ctx, cfg):
    n = state.object_phase.shape[1]
    if n < 2:
        return state
    offsets = np.arange(n)
    kernel = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / cfg.sigma_slices) ** 2)
    kernel = jnp.asarray(kernel / kernel.sum(axis=1, keepdims=True), jnp.float32)
    return state._replace(object_phase=jnp.einsum("ij,ojyx->oiyx", kernel, state.object_phase))


def phase_ramp_removal(state, ctx, cfg):
    """Remove a best-fit plane from the depth-summed phase over the scanned area (spread over slices)."""
    total = jnp.sum(state.object_phase, axis=1)  # (obj_modes, Hy, Wx)
    w = ctx.scan_weight  # (Hy, Wx) 1 inside the scanned area
    hy, wx = total.shape[-2:]
    y, x = np.meshgrid(np.arange(hy, dtype=np.float32), np.arange(wx, dtype=np.float32), indexing="ij")
    basis = jnp.asarray(np.stack([np.ones_like(y), y / hy, x / wx]), jnp.float32)  # (3, Hy, Wx)
    gram = jnp.einsum("ayx,byx,yx->ab", basis, basis, w)
    rhs = jnp.einsum("ayx,oyx,yx->oa", basis, total, w)
    coeff = jnp.linalg.solve(gram[None], rhs[..., None])[..., 0]  # (obj_modes, 3)
    plane = jnp.einsum("oa,ayx->oyx", coeff, basis)
    plane = plane - jnp.sum(plane * w, axis=(-2, -1), keepdims=True) / jnp.sum(w)  # keep the mean phase
    return state._replace(object_phase=state.object_phase - plane[:, None] / state.object_phase.shape[1])


def position_recenter(state, ctx, cfg):
    drift = jnp.mean(state.positions_A - ctx.initial_positions_A, axis=0)
    return state._replace(positions_A=state.positions_A - drift)


def tilt_smooth(state, ctx, cfg):
    if state.tilts_mrad.ndim == 1:
        return state
    ny, nx = ctx.scan_shape
    if ny * nx != state.tilts_mrad.shape[0]:
        return state
    grid = state.tilts_mrad.reshape(ny, nx, 2)
    g = _gaussian_fourier((ny, nx), cfg.sigma_px)[..., None]
    mean = jnp.mean(grid, axis=(0, 1))
    smooth = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(grid - mean, axes=(0, 1)) * g, axes=(0, 1))) + mean
    return state._replace(tilts_mrad=smooth.reshape(-1, 2).astype(jnp.float32))


CONSTRAINTS = {
    "probe_orthogonalize": probe_orthogonalize,
    "probe_aperture": probe_aperture,
    "probe_intensity": probe_intensity,
    "object_amplitude_bounds": object_amplitude_bounds,
    "phase_positive": phase_positive,
    "kz_filter": kz_filter,
    "lateral_blur": lateral_blur,
    "z_blur": z_blur,
    "phase_ramp_removal": phase_ramp_removal,
    "position_recenter": position_recenter,
    "tilt_smooth": tilt_smooth,
}


def apply_constraints(state, ctx, configured: dict, flags):
    """Apply each configured constraint whose flag (a traced bool) is set, in a fixed order."""
    for i, (name, cfg) in enumerate(configured.items()):
        fn = CONSTRAINTS[name]
        state = lax.cond(flags[i], lambda s, fn=fn, cfg=cfg: fn(s, ctx, cfg), lambda s: s, state)
    return state
