"""LSQML engine: least-squares maximum-likelihood ptychography (Odstrčil et al. 2018, Opt. Express 26, 3108).

Per batch (all positions at once):

1. exit-wave update ``chi`` from the likelihood of the stage's ``noise_model``: ``gaussian``
   (default; noise on amplitudes) replaces each far-field amplitude by the measured one, as in
   ePIE; ``poisson`` scales the far field of pattern ``b`` by ``1 + a_b (d/I - 1)`` (``d``
   measured, ``I`` model counts; every probe mode alike), the direction of steepest descent of
   the Poisson likelihood ``sum I - d log I``, with ``a_b`` in [0, 1] the minimiser of that
   likelihood along it (a few Newton steps; the likelihood is convex in ``a``), so a pattern
   with few counts is not forced onto its noise;
2. update directions summed over the batch's positions and probe modes,
   ``dO = sum_b conj(psi_b) chi_b / (sum_b |psi_b|^2 + delta)`` (object frame, scatter-added) and
   ``dP = sum_b unshift(conj(O_b) chi_b) / (sum_b |O_b|^2 + delta)`` (probe frame);
3. optimal step lengths ``(a_O, a_P)`` for the batch from the 2x2 least-squares system of the
   paper, minimising ``sum_b ||chi_b - a_O dO_b psi_b - a_P O_b dP_b||^2``.

Object and probe then move by ``lr * a * d``, with ``lr`` the stage's ``optimize`` learning
rate (1.0 = the optimal step; start/stop and schedules are data, no recompiles). A parameter
that is not active drops out of the system (1x1 solve for the other).

Multislice: the system above is solved for the last slice with the wave incident on it in
the role of the probe (a per-position update ``conj(O_b) chi_b / (|O_b|^2 + delta)``); the
incident-wave correction, scaled by its optimal step, is back-propagated (adjoint Fresnel
kernel) to give the ``chi`` of the slice above, down to the first slice, where the incident
wave is the probe and the paper's system applies unchanged. Amplitude/phase conversion,
position correction, supported parameters and terms as in :mod:`ptycore.recon.engines.epie`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ptycore.physics.shifts import crop_patches
from ptycore.recon.engines.epie import ProjectionEngine, _abs2, _re_dot, _solve2, _sum_modes
from ptycore.recon.placement import positions_sum

_EPS = 1e-12
#: regularisation of the direction's denominator, relative to its maximum
DELTA = 1e-2
#: Newton steps for the Poisson step along the likelihood gradient
POISSON_NEWTON_STEPS = 4
#: floor added to the model counts in d/I, relative to the pattern's mean measured counts per
#: pixel: where the model has (almost) no intensity but the data has counts, d/I is unbounded and
#: would drive the pattern's step to 0 (seen as a stall from a flat start at high dose)
POISSON_MODEL_FLOOR = 1e-2


def _steps(u, v, chi, use_u, use_v):
    """Least-squares steps (a_u, a_v) minimising ||chi - a_u u - a_v v||^2 (sums over everything)."""
    a11, a22, a12, b1, b2 = positions_sum((jnp.sum(_abs2(u)), jnp.sum(_abs2(v)), _re_dot(u, v), _re_dot(u, chi),
                                           _re_dot(v, chi)))
    a12, b1, b2 = a12 * use_u * use_v, b1 * use_u, b2 * use_v
    return _solve2(jnp.where(use_u, a11, 1.0), a12, jnp.where(use_v, a22, 1.0), b1, b2)


def _steps_inner(d_obj_patch, g, psi2, w, chi2, use_object):
    """:func:`_steps` for a slice below the first, from per-position (batch, ny, nx) sums over
    modes only: there ``u = d_obj psi`` and ``v = O d_psi = w chi`` with the real weight
    ``w = |O|^2 / (|O|^2 + delta)``, so with ``g = sum_modes conj(psi) chi`` every entry of the
    2x2 system is a real sum (the same numbers, a fraction of the passes over the waves)."""
    r = d_obj_patch.real * g.real + d_obj_patch.imag * g.imag  # Re conj(u) chi, summed over modes
    a11, a12, a22, b1, b2 = positions_sum((jnp.sum(_abs2(d_obj_patch) * psi2), jnp.sum(w * r),
                                           jnp.sum(w * w * chi2), jnp.sum(r), jnp.sum(w * chi2)))
    a12, b1 = a12 * use_object, b1 * use_object
    return _solve2(jnp.where(use_object, a11, 1.0), a12, a22, b1, b2)


def poisson_far_field_factor(model, measured):
    """Per-pixel far-field scale ``1 + a g`` with ``g = (d - I) / (I + floor)`` (``d/I - 1``, see
    :data:`POISSON_MODEL_FLOOR`) and ``a`` (one per pattern, in [0, 1]) minimising the Poisson
    likelihood ``sum I (1 + a g)^2 - d log(I (1 + a g)^2)`` along it."""
    axes = (-2, -1)
    floor = POISSON_MODEL_FLOOR * jnp.mean(measured, axis=axes, keepdims=True) + _EPS
    g = (measured - model) / (model + floor)

    def newton(a):
        q = jnp.maximum(1.0 + a[:, None, None] * g, 1e-3)
        d1 = jnp.sum(2.0 * model * g * q - 2.0 * measured * g / q, axis=axes)
        d2 = jnp.sum(2.0 * model * g**2 + 2.0 * measured * g**2 / q**2, axis=axes)
        return jnp.clip(a - d1 / (d2 + _EPS), 0.0, 1.0)

    a = jnp.zeros(model.shape[0], model.dtype)
    for _ in range(POISSON_NEWTON_STEPS):
        a = newton(a)
    return 1.0 + a[:, None, None] * g


class LSQMLEngine(ProjectionEngine):
    """Batched LSQML with a Gaussian or Poisson noise model (see the module docstring)."""

    def _far_field_factor(self, model, measured):
        if self.stage.options.noise_model == "poisson":
            return poisson_far_field_factor(model, measured)
        return super()._far_field_factor(model, measured)

    def _update(self, state, fwd, chi, mask, idx, lr):
        t = fwd["transmission"]
        top_left, patches = fwd["top_left"], fwd["patches"]
        weight = mask[:, None, None]
        use_object = (lr["object_phase"] > 0) | (lr["object_amplitude"] > 0)
        dt = []
        for s in reversed(range(t.shape[0])):
            psi = fwd["incident"][s]
            obj = patches[:, s]
            g = _sum_modes(jnp.conj(psi) * chi)  # (batch, ny, nx)
            psi2 = _sum_modes(_abs2(psi))
            num = self._scatter(g, top_left, t.shape[-2:])
            illum = self._scatter(psi2 * weight, top_left, t.shape[-2:])
            d_obj = num / (illum + DELTA * jnp.max(illum) + _EPS)
            d_obj_patch = crop_patches(d_obj, top_left, obj.shape[-2:])
            obj2 = _abs2(obj)
            if s > 0:
                den = obj2 + DELTA * jnp.max(obj2, axis=(-2, -1), keepdims=True) + _EPS
                d_psi = jnp.conj(obj)[:, None] * chi / den[:, None]
                a_obj, a_psi = _steps_inner(d_obj_patch, g, psi2, obj2 / den, _sum_modes(_abs2(chi)), use_object)
                chi = self._back_propagate(a_psi * d_psi, fwd["kernel"])
            else:
                state = self._move_positions(state, fwd, chi, mask, idx, lr["positions"])
                num_p = self._unshift_sum(jnp.conj(obj)[:, None] * chi, fwd["ramp"])
                den_p = positions_sum(jnp.sum(obj2 * weight, axis=0))
                d_probe = num_p / (den_p + DELTA * jnp.max(den_p) + _EPS)
                u = d_obj_patch[:, None] * psi
                v = obj[:, None] * jnp.fft.ifft2(jnp.fft.fft2(d_probe)[None] * fwd["ramp"][:, None])
                a_obj, a_probe = _steps(u, v, chi, use_object, lr["probe"] > 0)
                probe = state.probe + (lr["probe"] * a_probe * d_probe).astype(state.probe.dtype)
            dt.append(a_obj * d_obj)
        dt = jnp.stack(dt[::-1])
        state = self._apply_object(state, t, dt, lr["object_phase"], lr["object_amplitude"])
        return state._replace(probe=probe)
