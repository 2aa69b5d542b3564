"""Reconstruction state (a pytree), its store I/O, and resampling between stages."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ptycore.errors import InvalidData
from ptycore.physics.fourier import resize_spectrum_axis
from ptycore.physics.probe import make_mixed_probe, orthogonalize_modes
from ptycore.physics.shifts import object_shape_for
from ptycore.physics.slicing import slice_weights
from ptycore.store import open_store, write_array

STATE_ARRAYS = ("object_amplitude", "object_phase", "probe", "positions_A", "tilts_mrad", "slice_thickness_A")


class State(NamedTuple):
    """Everything a reconstruction refines. Engines are pure functions State → State.

    object_amplitude, object_phase: (obj_modes, slices, Hy, Wx) float32
    probe: (probe_modes, ny, nx) complex64, sum |probe|^2 = mean counts per pattern; (ny, nx) is
        the detector pixels fitted (all, or a stage's central crop: then the power in that band)
    positions_A: (n_pos, 2) float32, (y, x) probe centres in the object frame
    tilts_mrad: (2,) global or (n_pos, 2) per position, float32
    slice_thickness_A: () float32
    """

    object_amplitude: jnp.ndarray
    object_phase: jnp.ndarray
    probe: jnp.ndarray
    positions_A: jnp.ndarray
    tilts_mrad: jnp.ndarray
    slice_thickness_A: jnp.ndarray

    @property
    def n_slices(self) -> int:
        return int(self.object_phase.shape[1])

    @property
    def n_probe_modes(self) -> int:
        return int(self.probe.shape[0])


def load_state(path) -> tuple[State, float]:
    """Read a state from an init store or a result store; returns (state, pixel_size_A)."""
    group = open_store(path)
    missing = [name for name in STATE_ARRAYS if name not in group]
    if missing:
        raise InvalidData(f"{path}: not an init/result store, missing arrays: {', '.join(missing)}")
    if "pixel_size_A" not in group.attrs:
        raise InvalidData(f"{path}: attribute pixel_size_A is missing")
    arrays = {name: np.asarray(group[name][...]) for name in STATE_ARRAYS}
    state = State(
        object_amplitude=jnp.asarray(arrays["object_amplitude"], jnp.float32),
        object_phase=jnp.asarray(arrays["object_phase"], jnp.float32),
        probe=jnp.asarray(arrays["probe"], jnp.complex64),
        positions_A=jnp.asarray(arrays["positions_A"], jnp.float32),
        tilts_mrad=jnp.asarray(arrays["tilts_mrad"], jnp.float32),
        slice_thickness_A=jnp.asarray(arrays["slice_thickness_A"], jnp.float32).reshape(()),
    )
    if state.object_phase.ndim != 4 or state.object_phase.shape != state.object_amplitude.shape:
        raise InvalidData(f"{path}: object arrays must both be (obj_modes, slices, Hy, Wx)")
    if state.probe.ndim != 3:
        raise InvalidData(f"{path}: probe must be (probe_modes, ny, nx), got {state.probe.shape}")
    return state, float(group.attrs["pixel_size_A"])


def write_state(group, state: State) -> None:
    """Write the state arrays of the result-store contract into an open zarr group."""
    obj_chunks = (1, 1) + tuple(min(s, 512) for s in state.object_phase.shape[2:])
    write_array(group, "object_amplitude", np.asarray(state.object_amplitude, np.float32), chunks=obj_chunks)
    write_array(group, "object_phase", np.asarray(state.object_phase, np.float32), chunks=obj_chunks)
    write_array(group, "probe", np.asarray(state.probe, np.complex64))
    write_array(group, "positions_A", np.asarray(state.positions_A, np.float32))
    write_array(group, "tilts_mrad", np.asarray(state.tilts_mrad, np.float32))
    write_array(group, "slice_thickness_A", np.asarray(state.slice_thickness_A, np.float32).reshape(()))


# ---------------------------------------------------------------- resampling on stage entry
def resample_probe_modes(probe, n_modes: int, decay: float = 0.3):
    """Change the number of probe modes, keeping the total intensity.

    Fewer: orthogonalise and keep the strongest (their power rescaled to the total).
    More: keep the existing modes and add orthogonal ones carrying ``decay``-decaying shares.
    """
    current = probe.shape[0]
    if n_modes == current:
        return probe
    total = jnp.sum(jnp.abs(probe) ** 2)
    modes, _ = orthogonalize_modes(probe)
    if n_modes < current:
        kept = modes[:n_modes]
        return (kept * jnp.sqrt(total / jnp.sum(jnp.abs(kept) ** 2))).astype(jnp.complex64)
    extra = make_mixed_probe(modes[0], n_modes, decay)[current:]  # orthogonal to mode 0 only
    flat = np.asarray(jnp.concatenate([modes, extra]).reshape(n_modes, -1), np.complex128)
    for i in range(current, n_modes):  # Gram-Schmidt the new modes against all earlier ones
        v = flat[i].copy()
        for j in range(i):
            v -= np.vdot(flat[j], v) / np.vdot(flat[j], flat[j]) * flat[j]
        flat[i] = v / np.linalg.norm(v) * np.linalg.norm(flat[i])
    out = jnp.asarray(flat.reshape((n_modes,) + probe.shape[1:]))
    return (out * jnp.sqrt(total / jnp.sum(jnp.abs(out) ** 2))).astype(jnp.complex64)


def resample_slices(object_amplitude, object_phase, slice_thickness_A, n_slices: int):
    """Change the number of slices over the same total thickness, conserving the total phase
    (and the product of amplitudes) at every lateral pixel. Returns (amplitude, phase, thickness)."""
    current = object_phase.shape[1]
    if n_slices == current:
        return object_amplitude, object_phase, slice_thickness_A
    total = current * slice_thickness_A
    weights = slice_weights(current, n_slices)  # overlap of old and new slabs (conservative)
    w = jnp.asarray(weights, jnp.float32)
    phase = jnp.einsum("ij,ojyx->oiyx", w, object_phase)
    log_amp = jnp.einsum("ij,ojyx->oiyx", w, jnp.log(jnp.clip(object_amplitude, 1e-6, None)))
    return jnp.exp(log_amp), phase, jnp.asarray(total / n_slices, jnp.float32)


def pad_object(state: State, pad_px: int, pixel_size_A: float) -> State:
    """Pad the object by ``pad_px`` on every side (amplitude 1, phase 0), shifting positions."""
    if pad_px == 0:
        return state
    widths = ((0, 0), (0, 0), (pad_px, pad_px), (pad_px, pad_px))
    return state._replace(
        object_amplitude=jnp.pad(state.object_amplitude, widths, constant_values=1.0),
        object_phase=jnp.pad(state.object_phase, widths),
        positions_A=state.positions_A + pad_px * pixel_size_A,
    )


# ---------------------------------------------------------------- object pixel size (Fourier resampling)
def fourier_resample(field, shape: tuple[int, int]):
    """Resample a real field ``(..., Hy, Wx)`` to ``shape`` over the same (periodic) field of view
    by cropping or zero-padding its spectrum: the values are kept (a band-limited field is
    interpolated exactly), so the mean, i.e. the integral over the field of view, is conserved."""
    return _fourier_resample(jnp.asarray(field), tuple(int(n) for n in shape))


@partial(jax.jit, static_argnums=1)
def _fourier_resample(field, shape):
    spec = jnp.fft.fft2(field, norm="forward")  # bin [0, 0] is the mean
    for axis, n in zip((-2, -1), shape, strict=True):
        spec = resize_spectrum_axis(spec, int(n), axis, real=True)
    return jnp.real(jnp.fft.ifft2(spec, norm="forward")).astype(field.dtype)


def resample_probe_window(probe, shape: tuple[int, int]):
    """The probe ``(modes, ny, nx)`` on a window of ``shape`` pixels over the same field of view
    (pixel ``ny·dx / shape[0]``): its far field (the detector plane, ``norm="ortho"``) is cropped
    to the central band or zero-padded, value for value. The far-field amplitude per detector
    pixel is physical (it is what the unscattered beam puts in that pixel), so it is not
    rescaled: a crop keeps exactly the probe power that falls inside the kept band, i.e. the
    counts the cropped patterns hold for a unit object, and drops the rest (nothing when the
    aperture lies inside the band); a pad conserves the power. A probe centred at pixel n//2
    stays centred at pixel shape//2."""
    return _resample_probe_window(jnp.asarray(probe), tuple(int(n) for n in shape))


@partial(jax.jit, static_argnums=1)
def _resample_probe_window(probe, shape):
    spec = jnp.fft.fft2(jnp.fft.ifftshift(probe, axes=(-2, -1)), norm="ortho")
    for axis, n in zip((-2, -1), shape, strict=True):
        spec = resize_spectrum_axis(spec, int(n), axis, real=False)
    return jnp.fft.fftshift(jnp.fft.ifft2(spec, norm="ortho"), axes=(-2, -1)).astype(jnp.complex64)


def resample_object_grid(object_amplitude, object_phase, old_window, new_window):
    """Object ``(modes, slices, Hy, Wx)`` from pixel ``dx`` to ``dx · old_window / new_window``
    (per axis) over the same field of view; returns (amplitude, phase).

    Phase and log-amplitude are resampled as real fields (``fourier_resample``), not the complex
    transmission: a phase beyond π (thick or strong samples) survives, and the mean phase (the
    total phase × area) is conserved. The object is first edge-padded on the far side (no
    position moves) to a size whose new size ``H · new/old`` is a whole number, so the new
    pixel is exactly the stage's; Fourier resampling treats the object as periodic, so a jump
    between opposite edges rings near those edges (outside the scan when the object has a
    margin)."""
    hy, wx = object_phase.shape[-2:]
    padded, new_shape = [], []
    for h, n_old, n_new in zip((hy, wx), old_window, new_window, strict=True):
        q = n_old // math.gcd(n_old, n_new)
        h_pad = -(-h // q) * q
        padded.append(h_pad - h)
        new_shape.append(h_pad * n_new // n_old)
    widths = ((0, 0), (0, 0), (0, padded[0]), (0, padded[1]))
    log_amp = jnp.log(jnp.clip(jnp.pad(object_amplitude, widths, mode="edge"), 1e-6, None))
    phase = jnp.pad(object_phase, widths, mode="edge")
    return jnp.exp(fourier_resample(log_amp, new_shape)), fourier_resample(phase, new_shape)


def resample_pixels(state: State, window_shape: tuple[int, int], pixel_size_A: float) -> State:
    """Move the state to the probe window ``window_shape`` and object pixel ``pixel_size_A``
    (the stage's), over the same field of view: the probe window ``n·dx`` is conserved, so the
    incoming pixel is ``pixel_size_A · window_shape / n``. Object (``resample_object_grid``)
    and probe (``resample_probe_window``) are Fourier-resampled; positions (Å), tilts and slice
    thickness are unchanged. The object grows (edge values, far side) if a probe window would
    no longer fit in it."""
    old = tuple(int(s) for s in state.probe.shape[-2:])
    new = tuple(int(s) for s in window_shape)
    if old == new:
        return state
    if old[0] * new[1] != old[1] * new[0]:
        raise InvalidData(f"probe window {old[0]}×{old[1]} cannot be resampled to {new[0]}×{new[1]} "
                          "with square pixels")
    amplitude, phase = resample_object_grid(state.object_amplitude, state.object_phase, old, new)
    try:
        need = object_shape_for(np.asarray(state.positions_A), pixel_size_A, new)
    except ValueError as err:
        raise InvalidData(f"after resampling to {pixel_size_A:.4g} Å pixels: {err}") from None
    grow = [max(0, n - s) for n, s in zip(need, phase.shape[-2:], strict=True)]
    if any(grow):
        widths = ((0, 0), (0, 0), (0, grow[0]), (0, grow[1]))
        amplitude, phase = jnp.pad(amplitude, widths, mode="edge"), jnp.pad(phase, widths, mode="edge")
    return state._replace(object_amplitude=amplitude.astype(jnp.float32), object_phase=phase.astype(jnp.float32),
                          probe=resample_probe_window(state.probe, new))


def resample_state(state: State, resample, pixel_size_A: float, window_shape: tuple[int, int] | None = None) -> State:
    """Apply a stage's ``resample`` settings (see ptycore.plan.Resample).

    ``pixel_size_A`` is the stage's object pixel; ``window_shape`` its probe window (the
    detector pixels it fits). A state on another window is Fourier-resampled to it first
    (``resample_pixels``); everything after (padding included) is in the stage's pixels."""
    if window_shape is not None:
        state = resample_pixels(state, window_shape, pixel_size_A)
    if resample.probe_modes is not None:
        state = state._replace(probe=resample_probe_modes(state.probe, resample.probe_modes))
    n_slices = resample.slices
    if resample.slice_thickness_A is not None:
        total = float(state.slice_thickness_A) * state.n_slices
        n_slices = max(1, round(total / resample.slice_thickness_A))
    if n_slices is not None:
        amp, phase, dz = resample_slices(state.object_amplitude, state.object_phase, state.slice_thickness_A,
                                         n_slices)
        state = state._replace(object_amplitude=amp, object_phase=phase, slice_thickness_A=dz)
    if resample.tilts == "per_position" and state.tilts_mrad.ndim == 1:
        state = state._replace(tilts_mrad=jnp.broadcast_to(state.tilts_mrad, state.positions_A.shape) + 0.0)
    elif resample.tilts == "global" and state.tilts_mrad.ndim == 2:
        state = state._replace(tilts_mrad=jnp.mean(state.tilts_mrad, axis=0))
    return pad_object(state, resample.object_pad_px, pixel_size_A)
