"""The learned prior in reconstruction: the denoiser on the prior's grid and the RED term.

A **prior** is a denoiser ``D(x, sigma) -> x_hat`` of ONE per-slice phase patch ``x`` (H, W) in
radians with Gaussian noise of std ``sigma`` (rad), trained at a pixel size and slice thickness
of its own (``ptycore.prior.model``: ``Denoiser``, ``PriorInfo``, ``load_prior``). A plan names it
by ``prior: {path: shipped | PATH}`` (see :mod:`ptycore.plan`); :func:`load_denoiser` is the one
place that loads it.

**The prior's grid** (:class:`PriorMap`, built once per stage from the stage's object grid):
the object phase ``(obj_modes, slices, Hy, Wx)`` at pixel ``p`` and slice thickness ``dz`` is
mapped to ``(obj_modes, n_p, H', W')`` at the prior's pixel ``p_prior`` and thickness ``dz_prior``:

- along z, phase is additive: ``n_p = max(1, round(slices·dz / dz_prior))`` slabs over the same
  total thickness, each the sum of the object's slices it overlaps (overlap-weighted, the
  total phase at every pixel conserved: ``physics.slicing.slice_weights``); back from the
  prior's grid a slab is divided among the slices it covers (the same weights the other way);
- laterally, a **Fourier resample** (spectrum cropped or zero-padded; the values, i.e. phase per
  pixel, kept) to ``H' = round(Hy·p / p_prior)``, so the prior's pixel is ``Hy·p / H'``
  (within half a pixel of ``p_prior`` over the field of view). It is linear, hence exactly
  differentiable; it treats the object as periodic (a jump between opposite edges rings near
  those edges, in the margin outside the scan).

Where the grids match (pixel within 1e-6 relative and the same slice count) the map is the
identity. Each slab (per object mode) is denoised as one patch: the denoiser is fully
convolutional, so the slab is edge-padded on the far side to a multiple of ``2**levels``
and cropped back.

**RED** (regularisation by denoising, Romano et al. 2017): the ``prior`` loss term is
``1/2 ||x - sg(D_sigma(x))||^2`` summed over every pixel of every slab (``x = P(phase)``,
``sg``: stop-gradient), so its gradient w.r.t. ``x`` is ``x - D_sigma(x)`` and w.r.t. the object
phase ``P^T (x - D_sigma(x))``; a stage multiplies it by its weight ``W``. The engines
denoise once per iteration (the gradient engine; with the loss's ``denoise_every: K`` once per K
iterations, the target computed by a separate compiled call and held in between) or per accepted
step (LM): the target ``sg(D_sigma(P(phase)))`` of the object as the iteration began is held over
its batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptycore.errors import InvalidPlan, MissingDependency, PtycoreError
from ptycore.physics.slicing import slice_weights


@dataclass(frozen=True)
class Prior:
    """A loaded prior: the denoiser (``denoise(x (H, W), sigma) -> x_hat``, pure and jit-able)
    and the grid it was trained on."""

    denoise: Callable[[Any, Any], Any]
    pixel_size_A: float
    slice_thickness_A: float
    #: the patch sides must be multiples of this (2**levels of a U-Net; 1 for any size)
    multiple: int = 1
    #: the phase scale of the training data (rad): the DPS guidance measures noise in it
    phase_scale_rad: float = 1.0
    sigma_min_rad: float | None = None
    sigma_max_rad: float | None = None
    source: str = ""
    info: dict = field(default_factory=dict)


#: priors registered in this process by name (tests, notebooks): a plan's ``prior.path`` may name one
_REGISTERED: dict[str, Prior] = {}
#: loaded priors by path (loaded once per process)
_LOADED: dict[str, Prior] = {}


def register_denoiser(name: str, prior: Prior) -> None:
    """Make ``prior`` loadable as ``prior: {path: NAME}`` in this process (an in-memory denoiser:
    an analytic one in a test, or one trained in a notebook)."""
    _REGISTERED[name] = prior


def unregister_denoiser(name: str) -> None:
    _REGISTERED.pop(name, None)


def load_denoiser(path: str | None) -> Prior:
    """The prior a plan names: a registered name, ``shipped`` (the weights in the package) or a
    path of saved weights (``ptycore.prior.model.save_prior``). The one place that calls
    ``load_prior``; bad or missing files are one line naming the path."""
    key = "shipped" if path in (None, "shipped") else str(path)
    if key in _REGISTERED:
        return _REGISTERED[key]
    if key in _LOADED:
        return _LOADED[key]
    try:
        from ptycore.prior.model import load_prior
    except ImportError:
        raise MissingDependency(f"prior {key!r}: the trained-prior model (ptycore.prior.model) is not part of this "
                                "ptycore; name a registered denoiser or update ptycore") from None
    try:
        denoiser, info = load_prior(None if key == "shipped" else key)
    except PtycoreError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise InvalidPlan(f"prior {key!r}: cannot load it ({err.__class__.__name__}: {err})") from None
    prior = Prior(denoise=denoiser, pixel_size_A=float(info.pixel_size_A),
                  slice_thickness_A=float(info.slice_thickness_A), multiple=2 ** int(info.levels),
                  phase_scale_rad=float(info.phase_scale_rad), sigma_min_rad=float(info.sigma_min_rad),
                  sigma_max_rad=float(info.sigma_max_rad), source=key,
                  info={"pixel_size_A": float(info.pixel_size_A), "slice_thickness_A": float(info.slice_thickness_A),
                        "levels": int(info.levels), "phase_scale_rad": float(info.phase_scale_rad)})
    _LOADED[key] = prior
    return prior


def _fourier_resample(x, shape):
    """Real field (..., Hy, Wx) to ``shape`` over the same field of view (values kept); linear."""
    from ptycore.recon.state import fourier_resample

    return fourier_resample(x, shape)


class PriorMap:
    """The object's phase on the prior's grid and back, and the denoiser applied there (see the
    module docstring). Built once per stage; every array it holds is a constant of the compiled
    iteration."""

    def __init__(self, prior: Prior, object_shape: tuple[int, int], slices: int, pixel_size_A: float,
                 slice_thickness_A: float):
        self.prior = prior
        self.object_shape = tuple(int(s) for s in object_shape)
        self.slices = int(slices)
        total_A = self.slices * float(slice_thickness_A)
        self.prior_slices = max(1, round(total_A / prior.slice_thickness_A))
        self.lateral_shape = tuple(max(1, round(n * pixel_size_A / prior.pixel_size_A)) for n in self.object_shape)
        self.lateral_identity = math.isclose(pixel_size_A, prior.pixel_size_A, rel_tol=1e-6)
        if self.lateral_identity:
            self.lateral_shape = self.object_shape
        self.depth_identity = self.prior_slices == self.slices
        self.merge = jnp.asarray(slice_weights(self.slices, self.prior_slices), jnp.float32)  # (n_p, n)
        self.split = jnp.asarray(slice_weights(self.prior_slices, self.slices), jnp.float32)  # (n, n_p)
        m = max(1, int(prior.multiple))
        self.padded_shape = tuple(-(-n // m) * m for n in self.lateral_shape)
        self.prior_pixel_A = (self.object_shape[0] * pixel_size_A / self.lateral_shape[0],
                              self.object_shape[1] * pixel_size_A / self.lateral_shape[1])

    @property
    def identity(self) -> bool:
        return self.lateral_identity and self.depth_identity

    def describe(self) -> dict:
        return {"source": self.prior.source, "prior_slices": self.prior_slices, "object_slices": self.slices,
                "prior_shape": list(self.lateral_shape), "object_shape": list(self.object_shape),
                "prior_pixel_A": [float(p) for p in self.prior_pixel_A],
                "lateral_resample": "none" if self.lateral_identity else "fourier"}

    # ------------------------------------------------------------ the grids
    def to_prior(self, phase):
        """(modes, slices, Hy, Wx) -> (modes, n_p, H', W'): slabs summed, Fourier-resampled."""
        x = phase if self.depth_identity else jnp.einsum("ij,ojyx->oiyx", self.merge.astype(phase.dtype), phase)
        return x if self.lateral_identity else _fourier_resample(x, self.lateral_shape)

    def from_prior(self, x):
        """(modes, n_p, H', W') -> (modes, slices, Hy, Wx): slabs divided among their slices."""
        x = x if self.lateral_identity else _fourier_resample(x, self.object_shape)
        return x if self.depth_identity else jnp.einsum("ij,ojyx->oiyx", self.split.astype(x.dtype), x)

    # ------------------------------------------------------------ the denoiser
    def denoise(self, x, sigma):
        """``D_sigma`` of every slab of ``x`` (modes, n_p, H', W') on the prior's grid."""
        shape = x.shape
        flat = x.reshape((-1,) + shape[-2:])
        pad = [(0, 0)] + [(0, p - n) for p, n in zip(self.padded_shape, shape[-2:], strict=True)]
        if any(p[1] for p in pad):
            flat = jnp.pad(flat, pad, mode="edge")
        sigma = jnp.asarray(sigma, flat.dtype)
        out = jax.vmap(lambda patch: self.prior.denoise(patch, sigma))(flat)
        out = out[:, : shape[-2], : shape[-1]].astype(x.dtype)
        return out.reshape(shape)

    def red_target(self, phase, sigma):
        """``sg(D_sigma(P(phase)))``: the denoised object on the prior's grid (no gradient)."""
        return jax.lax.stop_gradient(self.denoise(self.to_prior(jax.lax.stop_gradient(phase)), sigma))

    def red_loss(self, phase, target):
        """``1/2 ||P(phase) - target||^2`` summed over every pixel (rad^2)."""
        return 0.5 * jnp.sum((self.to_prior(phase) - target) ** 2)

    def red_gradient(self, phase, target):
        """``P^T (P(phase) - target)``: the RED term's gradient w.r.t. the object phase."""
        return jax.grad(self.red_loss)(phase, target)

    def normal_product(self, v):
        """``P^T P v`` for an object-phase direction ``v`` (the RED term's exact Gauss-Newton block)."""
        _, transpose = jax.vjp(self.to_prior, v)
        return transpose(self.to_prior(v))[0]

    def normal_diagonal(self) -> float:
        """An estimate of ``diag(P^T P)`` (a constant): a lateral Fourier resample by an area
        ratio ``r`` has ``P^T P = r · (projection on the kept band)``, diagonal ``r · min(r, 1)``;
        the slab sums contribute the mean over slices of ``sum_i w_ij^2``."""
        r = (self.lateral_shape[0] * self.lateral_shape[1]) / (self.object_shape[0] * self.object_shape[1])
        depth = float(np.mean(np.sum(np.asarray(self.merge) ** 2, axis=0)))
        return (1.0 if self.lateral_identity else r * min(r, 1.0)) * depth


def stage_noise_levels(stage) -> list[tuple[str, float]]:
    """``(field, sigma_rad)`` of every noise level a stage gives its denoiser (the ``prior`` loss's
    schedule values, the dps schedule's ends)."""
    out = []
    loss = stage.losses.get("prior")
    if loss is not None and loss.sigma_rad is not None:
        out += [("losses.prior.sigma_rad", v) for v in loss.sigma_rad.values()]
    if stage.engine == "dps":
        out += [("dps.sigma_start_rad", stage.options.sigma_start_rad),
                ("dps.sigma_end_rad", stage.options.sigma_end_rad)]
    return out


def load_stage_prior(stage) -> Prior:
    """The prior of a stage that uses one, checked against the stage: a noise level outside the
    range the denoiser was trained on (``sigma_min_rad`` .. ``sigma_max_rad``) is refused, one line
    naming the stage, the field and the range."""
    prior = load_denoiser(stage.prior.path if stage.prior is not None else "shipped")
    lo, hi = prior.sigma_min_rad, prior.sigma_max_rad
    for name, sigma in stage_noise_levels(stage):
        if (lo is not None and sigma < lo * (1 - 1e-6)) or (hi is not None and sigma > hi * (1 + 1e-6)):
            span = " to ".join("?" if v is None else f"{v:g}" for v in (lo, hi))
            raise InvalidPlan(f"stage {stage.name!r}: {name} {sigma:g} rad is outside the range the prior "
                              f"{prior.source or stage.prior.path!r} was trained on ({span} rad)")
    return prior


def stage_prior_map(stage, state, pixel_size_A: float) -> PriorMap | None:
    """The prior map of a stage that uses the prior (a ``prior`` loss or the ``dps`` engine), else None."""
    if "prior" not in stage.losses and stage.engine != "dps":
        return None
    prior = load_stage_prior(stage)
    return PriorMap(prior, state.object_phase.shape[-2:], state.object_phase.shape[1], pixel_size_A,
                    float(state.slice_thickness_A))
