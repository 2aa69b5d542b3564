"""LSQML engine: least-squares maximum-likelihood ptychography (Odstrčil et al. 2018, Opt. Express 26, 3108).

Per batch (all positions at once, Gaussian noise model on amplitudes):

1. exit-wave update ``chi`` from the amplitude (likelihood) projection, as in ePIE;
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
wave is the probe and the paper's system applies unchanged. Only the Gaussian noise model is
implemented (no Poisson variant). Amplitude/phase conversion, supported parameters and terms
as in :mod:`ptycore.recon.engines.epie`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ptycore.physics.shifts import crop_patches
from ptycore.recon.engines.epie import ProjectionEngine, _sum_modes

_EPS = 1e-12
#: regularisation of the direction's denominator, relative to its maximum
DELTA = 1e-2


def _steps(u, v, chi, use_u, use_v):
    """Least-squares steps (a_u, a_v) minimising ||chi - a_u u - a_v v||^2 (sums over everything)."""
    a11 = jnp.sum(jnp.abs(u) ** 2)
    a22 = jnp.sum(jnp.abs(v) ** 2)
    a12 = jnp.real(jnp.sum(jnp.conj(u) * v))
    b1 = jnp.real(jnp.sum(jnp.conj(u) * chi))
    b2 = jnp.real(jnp.sum(jnp.conj(v) * chi))
    a12 = a12 * use_u * use_v
    a11 = jnp.where(use_u, a11, 1.0)
    a22 = jnp.where(use_v, a22, 1.0)
    b1, b2 = b1 * use_u, b2 * use_v
    ridge = 1e-6 * (a11 + a22) + _EPS
    a11, a22 = a11 + ridge, a22 + ridge
    det = a11 * a22 - a12 * a12
    return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


class LSQMLEngine(ProjectionEngine):
    """Batched LSQML, Gaussian noise model (see the module docstring)."""

    def _update(self, state, fwd, chi, mask, lr):
        t = fwd["transmission"]
        top_left, patches = fwd["top_left"], fwd["patches"]
        weight = mask[:, None, None]
        use_object = (lr["object_phase"] > 0) | (lr["object_amplitude"] > 0)
        dt = []
        for s in reversed(range(t.shape[0])):
            psi = fwd["incident"][s]
            obj = patches[:, s]
            num = self._scatter(_sum_modes(jnp.conj(psi) * chi), top_left, t.shape[-2:])
            illum = self._scatter(_sum_modes(jnp.abs(psi) ** 2) * weight, top_left, t.shape[-2:])
            d_obj = num / (illum + DELTA * jnp.max(illum) + _EPS)
            u = crop_patches(d_obj, top_left, obj.shape[-2:])[:, None] * psi
            obj2 = jnp.abs(obj) ** 2
            if s > 0:
                d_psi = jnp.conj(obj)[:, None] * chi / (obj2 + DELTA * jnp.max(obj2, axis=(-2, -1), keepdims=True)
                                                        + _EPS)[:, None]
                v = obj[:, None] * d_psi
                a_obj, a_psi = _steps(u, v, chi, use_object, True)
                chi = self._back_propagate(a_psi * d_psi, fwd["kernel"])
            else:
                num_p = jnp.sum(self._unshift(jnp.conj(obj)[:, None] * chi, fwd["ramp"]), axis=0)
                den_p = jnp.sum(obj2 * weight, axis=0)
                d_probe = num_p / (den_p + DELTA * jnp.max(den_p) + _EPS)
                v = obj[:, None] * jnp.fft.ifft2(jnp.fft.fft2(d_probe)[None] * fwd["ramp"][:, None])
                a_obj, a_probe = _steps(u, v, chi, use_object, lr["probe"] > 0)
                probe = state.probe + (lr["probe"] * a_probe * d_probe).astype(state.probe.dtype)
            dt.append(a_obj * d_obj)
        dt = jnp.stack(dt[::-1])
        state = self._apply_object(state, dt, lr["object_phase"], lr["object_amplitude"])
        return state._replace(probe=probe)
