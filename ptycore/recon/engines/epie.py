"""ePIE engine: extended ptychographic iterative engine for mixed-state multislice (3PIE scheme).

Per batch (all positions of the batch at once): exit waves through the slices (the same
physics as :mod:`ptycore.physics.multislice`, keeping each slice's incident wave), then the
far-field amplitude is replaced by the measured one, ``F' = sqrt(I_meas) F / sqrt(sum_modes |F|^2)``,
and the exit-wave difference ``chi`` is back-propagated through the slices:

- slice ``s`` (last to first): the transmission gets ``alpha * sum_b conj(psi_b) chi_b / max(sum_b |psi_b|^2)``
  (summed over probe modes, positions scatter-added into the object frame with ``.at[].add``);
- the wave incident on slice ``s`` gets ``conj(O_b) chi_b / max|O_b|^2`` per position, which is
  propagated back (adjoint Fresnel kernel) to give the ``chi`` of slice ``s - 1``;
- at the first slice that wave is the (shifted) probe: the probe gets
  ``beta * sum_b unshift(conj(O_b) chi_b) / max(sum_b |O_b|^2)``.

With one position per batch this is classic ePIE (normalised by the maxima of |probe|^2 and
|object|^2); with larger batches the normalisation by the accumulated illumination keeps the
summed overlapping updates stable. All updates in a batch use the object and probe from the
start of the batch.

Step sizes come from the stage's ``optimize`` entries: ``object_phase`` / ``object_amplitude``
``lr`` is the object step ``alpha`` (applied to the phase and the amplitude separately),
``probe`` ``lr`` is ``beta``; start/stop iterations and schedules are passed as data (no
recompiles). The state keeps amplitude and phase separately: the complex update
``T' = T + alpha dT`` is converted back as ``amplitude = |T'|`` and ``phase += angle(T' / T)``
(the phase *increment* of one batch is wrapped into (-pi, pi], the accumulated phase is not,
so phases beyond pi survive as long as one batch's change is < pi; an object amplitude near
0 makes the increment ill-defined). Tilts and slice thickness are not refined by this engine
(the plan rejects them); object modes must be 1. Loss terms in ``terms`` are the stage's data
losses computed on the batch's model before its update (``single`` always), so histories
compare with the gradient engine's.

Position correction (``optimize: positions``, shared with LSQML): per position, the shift
``delta`` (y, x) that best explains the first slice's exit-wave correction ``chi`` to first
order, ``chi ~ delta . (P grad O)`` summed over probe modes (a 2x2 least-squares solve per
position; ``grad O`` by central differences of the first slice's transmission, i.e. the
probe window moving over the object). Positions move by ``lr * delta`` (``lr`` 1.0 = the full
least-squares step), at most half a pixel per update; padding entries of a batch do not move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ptycore.physics.multislice import transmission
from ptycore.physics.shifts import crop_patches
from ptycore.recon.constraints import apply_constraints
from ptycore.recon.engines.base import Engine
from ptycore.recon.engines.registry import REGISTRY
from ptycore.recon.losses import DATA_LOSSES, single
from ptycore.recon.placement import positions_scatter_add, positions_sum, varying_like
from ptycore.recon.state import State

PROJECTION_PARAMETERS = REGISTRY["epie"].parameters

_EPS = 1e-12
#: largest position change of one update, in pixels
MAX_POSITION_STEP_PX = 0.5


def _sum_modes(x):
    """Sum over the mode axis (1). A few modes are added as slices, which XLA fuses into the
    elementwise work that produces them (a reduction op would materialise the per-mode array)."""
    if x.shape[1] <= 8:
        out = x[:, 0]
        for m in range(1, x.shape[1]):
            out = out + x[:, m]
        return out
    return jnp.sum(x, axis=1)


def _abs2(x):
    """|x|^2 without the square root of ``abs``."""
    return x.real**2 + x.imag**2


def _re_dot(a, b, axis=None):
    """Re sum(conj(a) b) in real arithmetic (XLA's complex reductions are slower)."""
    return jnp.sum(a.real * b.real + a.imag * b.imag, axis=axis)


def _solve2(a11, a12, a22, b1, b2, ridge=1e-6):
    """Solve the symmetric 2x2 systems [[a11, a12], [a12, a22]] x = [b1, b2] (elementwise over
    leading axes) with a small relative ridge; returns (x1, x2)."""
    r = ridge * (a11 + a22) + _EPS
    a11, a22 = a11 + r, a22 + r
    det = a11 * a22 - a12 * a12
    return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


class ProjectionEngine(Engine):
    """Shared machinery of ePIE and LSQML: forward with stored waves, Fourier projection,
    per-iteration compiled loop over batches, constraints, terms. Subclasses implement
    :meth:`_update` (the back-propagation of ``chi`` into object and probe updates)."""

    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        self.data_losses = [n for n in stage.losses if n in DATA_LOSSES and n != "single"]
        super().__init__(stage, context, measurement, state, seed=seed, stage_index=stage_index)

    # ------------------------------------------------------------ carry
    def init_carry(self, state: State):
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)

    def to_state(self, carry) -> State:
        return carry

    # ------------------------------------------------------------ the slice sweep (the problem's)
    def _forward(self, state: State, t, constants, idx):
        return self.problem.waves(state.probe, t, constants, idx)

    @staticmethod
    def _transmission(state: State):
        return transmission(state.object_amplitude, state.object_phase)[0]

    def _project(self, fwd, measured, mask):
        """Exit-wave correction ``chi`` (batch, modes, ny, nx) and the model intensities: the far
        field of every mode is scaled by :meth:`_far_field_factor` and transformed back."""
        far = jnp.fft.fft2(fwd["exit"], norm="ortho")
        model = _sum_modes(far.real**2 + far.imag**2)
        factor = self._far_field_factor(model, measured)
        if self.problem.detector_mask is not None:  # a bad pixel keeps the model's far field
            factor = jnp.where(self.problem.detector_mask > 0, factor, 1.0)
        chi = jnp.fft.ifft2(far * (factor[:, None] - 1.0), norm="ortho") * mask[:, None, None, None]
        return chi, model

    def _far_field_factor(self, model, measured):
        """Modulus projection (Gaussian noise on amplitudes): replace the amplitude by the measured one."""
        return jnp.sqrt(measured) / jnp.sqrt(model + _EPS)

    # ------------------------------------------------------------ helpers for the updates
    def _scatter(self, values, top_left, shape):
        """Sum patches ``values`` (batch, ny, nx) into an object-frame array ``shape`` at ``top_left``
        (the transpose of the crop: one scatter-add, overlapping patches accumulate)."""
        crop = lambda a: crop_patches(a, top_left, values.shape[-2:])  # noqa: E731
        return positions_sum(jax.linear_transpose(crop, jnp.zeros(shape, values.dtype))(values)[0])

    @staticmethod
    def _unshift_sum(values, ramp):
        """Adjoint of the probe's sub-pixel shift, summed over the batch: (batch, modes, ny, nx) →
        (modes, ny, nx) in the probe frame (the sum taken in Fourier space: one inverse FFT per mode)."""
        return jnp.fft.ifft2(positions_sum(jnp.sum(jnp.fft.fft2(values) * jnp.conj(ramp)[:, None], axis=0)))

    def _position_step(self, fwd, chi, mask, lr):
        """Least-squares position change (batch, 2) in Å from the first slice's exit-wave
        correction ``chi`` (see the module docstring); zero where ``lr`` is 0 or for padding."""
        t0 = fwd["transmission"][0]
        window = chi.shape[-2:]
        grad_y = 0.5 * (jnp.roll(t0, -1, axis=0) - jnp.roll(t0, 1, axis=0))
        grad_x = 0.5 * (jnp.roll(t0, -1, axis=1) - jnp.roll(t0, 1, axis=1))
        probe = fwd["incident"][0]
        dy = probe * crop_patches(grad_y, fwd["top_left"], window)[:, None]
        dx = probe * crop_patches(grad_x, fwd["top_left"], window)[:, None]
        axes = (1, 2, 3)
        a11 = jnp.sum(_abs2(dy), axis=axes)
        a22 = jnp.sum(_abs2(dx), axis=axes)
        a12 = _re_dot(dy, dx, axes)
        b1 = _re_dot(dy, chi, axes)
        b2 = _re_dot(dx, chi, axes)
        step = jnp.stack(_solve2(a11, a12, a22, b1, b2, ridge=1e-3), axis=-1) * lr  # pixels
        norm = jnp.sqrt(jnp.sum(step**2, axis=-1, keepdims=True))
        step = step * jnp.minimum(1.0, MAX_POSITION_STEP_PX / (norm + _EPS))
        return step * mask[:, None] * self.ctx.pixel_size_A

    def _move_positions(self, state: State, fwd, chi, mask, idx, lr):
        """Apply :meth:`_position_step` (only computed while positions are being refined)."""
        step = lax.cond(lr > 0, lambda: self._position_step(fwd, chi, mask, lr),
                        lambda: varying_like(jnp.zeros(state.positions_A[idx].shape, state.positions_A.dtype), idx))
        return state._replace(positions_A=positions_scatter_add(state.positions_A, idx,
                                                                step.astype(state.positions_A.dtype)))

    @staticmethod
    def _back_propagate(values, kernel):
        return jnp.fft.ifft2(jnp.fft.fft2(values) * jnp.conj(kernel))

    @staticmethod
    def _apply_object(state: State, t, dt, lr_phase, lr_amplitude):
        """Add the complex update ``dt`` (slices, Hy, Wx) to the transmission ``t`` (of ``state``)
        with separate steps for phase and amplitude."""
        t_phase = t + lr_phase * dt
        increment = jnp.angle(t_phase * jnp.conj(t))
        phase = jnp.where(lr_phase > 0, state.object_phase + increment[None], state.object_phase)
        amplitude = jnp.where(lr_amplitude > 0, jnp.abs(t + lr_amplitude * dt)[None], state.object_amplitude)
        return state._replace(object_phase=phase.astype(state.object_phase.dtype),
                              object_amplitude=amplitude.astype(state.object_amplitude.dtype))

    # ------------------------------------------------------------ ePIE update
    def _update(self, state: State, fwd, chi, mask, idx, lr):
        t = fwd["transmission"]
        top_left, patches = fwd["top_left"], fwd["patches"]
        weight = mask[:, None, None]
        dt = []
        for s in reversed(range(t.shape[0])):
            psi = fwd["incident"][s]
            obj = patches[:, s]
            num = self._scatter(_sum_modes(jnp.conj(psi) * chi), top_left, t.shape[-2:])
            illum = self._scatter(_sum_modes(_abs2(psi)) * weight, top_left, t.shape[-2:])
            dt.append(num / (jnp.max(illum) + _EPS))
            obj2 = _abs2(obj)
            if s > 0:
                dpsi = jnp.conj(obj)[:, None] * chi / (jnp.max(obj2, axis=(-2, -1))[:, None, None, None] + _EPS)
                chi = self._back_propagate(dpsi, fwd["kernel"])
            else:
                state = self._move_positions(state, fwd, chi, mask, idx, lr["positions"])
                dprobe = self._unshift_sum(jnp.conj(obj)[:, None] * chi, fwd["ramp"])
                norm = jnp.max(positions_sum(jnp.sum(obj2 * weight, axis=0))) + _EPS
                probe = state.probe + (lr["probe"] * dprobe / norm).astype(state.probe.dtype)
        dt = jnp.stack(dt[::-1])
        state = self._apply_object(state, t, dt, lr["object_phase"], lr["object_amplitude"])
        return state._replace(probe=probe)

    # ------------------------------------------------------------ the compiled iteration
    def _iteration_impl(self, state, measured, batches, masks, val_batches, val_masks, hyper):
        fixed = self.problem.sweep_constants(state)

        def step(carry, batch):
            state, t = carry  # the transmission is carried: computed once per batch, on the object
            idx, mask = batch
            fwd = self._forward(state, t, fixed, idx)
            meas = measured[idx]
            chi, model = self._project(fwd, meas, mask)
            terms = self.problem.data_terms(model, meas, mask, ["single"] + self.data_losses)
            state = self._update(state, fwd, chi, mask, idx, hyper["lr"])
            return (state, self._transmission(state)), terms

        (state, _), terms = lax.scan(step, (state, self._transmission(state)), (batches, masks))
        state = apply_constraints(state, self.ctx, self.constraints, hyper["constraints"])
        out = self.summarise(state, measured, terms, val_batches, val_masks, single)
        return state, out

    # ------------------------------------------------------------ per-iteration host side
    def hyper(self, it: int) -> dict:
        cfg = self.stage.optimize
        return {
            "lr": {n: jnp.float32(cfg[n].lr_at(it) if n in cfg else 0.0) for n in PROJECTION_PARAMETERS},
            "constraints": self.constraint_flags(it),
        }


class EPIEEngine(ProjectionEngine):
    """Batched mixed-state multislice ePIE (see the module docstring)."""
