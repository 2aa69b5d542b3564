"""Loss terms. Each is a small pure function returning a scalar; a stage combines them with
weights that may follow a schedule.

Data terms take model intensities ``model`` and measured intensities ``measured``
(batch, ky, kx) and a per-pattern ``mask`` (batch,) that is 0 for padding; they are
normalised by the measured counts so their size does not depend on dose or batch size.
Object terms take the object phase (obj_modes, slices, Hy, Wx).
"""

from __future__ import annotations

import jax.numpy as jnp

from ptycore.recon.placement import positions_sum

_EPS = 1e-12


def _masked_sum(x, mask):
    """Sum over the batch's positions (over every device's share on N devices)."""
    return positions_sum(jnp.sum(jnp.sum(x, axis=(-2, -1)) * mask))


def single(model, measured, mask):
    """Gaussian noise on amplitudes: RMS amplitude error relative to the RMS measured amplitude."""
    err = _masked_sum((jnp.sqrt(model + _EPS) - jnp.sqrt(measured)) ** 2, mask)
    return jnp.sqrt(err / (_masked_sum(measured, mask) + _EPS) + _EPS)


def poisson(model, measured, mask):
    """Poisson negative log-likelihood minus its minimum (the deviance / 2), per measured count."""
    nll = model - measured * jnp.log(model + 1e-6)
    best = measured - measured * jnp.log(measured + 1e-6)
    return _masked_sum(nll - best, mask) / (_masked_sum(measured, mask) + _EPS)


def anscombe(model, measured, mask):
    """Variance-stabilised (Anscombe) amplitude error, relative like :func:`single`."""
    err = _masked_sum((jnp.sqrt(model + 0.375) - jnp.sqrt(measured + 0.375)) ** 2, mask)
    return jnp.sqrt(err / (_masked_sum(measured, mask) + _EPS) + _EPS)


def pacbed(model, measured, mask):
    """Match of the batch-mean (position-averaged, PACBED) pattern, relative amplitude error."""
    w = mask / (positions_sum(jnp.sum(mask)) + _EPS)
    mean_model = positions_sum(jnp.einsum("b,byx->yx", w, model))
    mean_measured = positions_sum(jnp.einsum("b,byx->yx", w, measured))
    err = jnp.sum((jnp.sqrt(mean_model + _EPS) - jnp.sqrt(mean_measured)) ** 2)
    return jnp.sqrt(err / (jnp.sum(mean_measured) + _EPS) + _EPS)


def _smooth_abs(x, eps=1e-6):
    return jnp.sqrt(x * x + eps)


def sparse(object_phase):
    """Sparsity of the phase: mean |phase| (rad)."""
    return jnp.mean(_smooth_abs(object_phase))


def tv_xy(object_phase):
    """Lateral total variation of the phase (rad per pixel)."""
    dy = jnp.diff(object_phase, axis=-2)
    dx = jnp.diff(object_phase, axis=-1)
    return jnp.mean(_smooth_abs(dy)) + jnp.mean(_smooth_abs(dx))


def tv_z(object_phase):
    """Total variation of the phase across slices (0 for one slice)."""
    if object_phase.shape[1] < 2:
        return jnp.zeros((), object_phase.dtype)
    return jnp.mean(_smooth_abs(jnp.diff(object_phase, axis=1)))


def surface_zero(object_phase):
    """Phase of the first and last slices pushed to zero (vacuum above and below the sample)."""
    return 0.5 * (jnp.mean(_smooth_abs(object_phase[:, 0])) + jnp.mean(_smooth_abs(object_phase[:, -1])))


def l2(object_phase):
    """Mean squared phase (rad^2)."""
    return jnp.mean(object_phase**2)


DATA_LOSSES = {"single": single, "poisson": poisson, "anscombe": anscombe, "pacbed": pacbed}
OBJECT_LOSSES = {"sparse": sparse, "tv_xy": tv_xy, "tv_z": tv_z, "surface_zero": surface_zero, "l2": l2}
