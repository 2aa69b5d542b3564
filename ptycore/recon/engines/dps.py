"""Diffusion posterior sampling (DPS) with the learned prior, warm-started from a reconstruction.

The sampler works on the object phase on the prior's grid (``ptycore.prior.guidance.PriorMap``:
``x = P(phase)``, slabs of the prior's thickness at its pixel), in the variance-exploding form
of the denoiser ``D(x, sigma)`` (Karras et al. 2022, "EDM"):

1. **Warm start** (a partial noising, not a sample from scratch): ``z_0 = P(phase_warm) +
   sigma_0 eps``, ``sigma_0 = sigma_start_rad``.
2. **Schedule**: ``sigma_0 > ... > sigma_{N-1} = sigma_end_rad`` over the stage's ``iterations``
   (N steps), EDM's ``(sigma_start^(1/rho) + i/(N-1) (sigma_end^(1/rho) - sigma_start^(1/rho)))^rho``
   or geometric, then ``sigma_N = 0``: the last step ends on the clean estimate.
3. **One step** (one compiled call): ``x0 = D(z_i, sigma_i)``; the physics guidance is the
   gradient ``g`` of the stage's data-fit loss (the problem's data term, summed over the
   iteration's position batches under ``lax.scan``, one batch in memory) at ``x0`` w.r.t. ``x0``
   (with ``through_denoiser``: w.r.t. ``z_i`` through the denoiser, as in Chung et al.'s DPS and
   MEP-Diffusion's formula, one more backward pass of the denoiser). It is normalised, by Adam's
   moments over the steps (``adam``, the default: ``optax.scale_by_adam``) or by its RMS, and
   applied with MEP-Diffusion's shifted-sigmoid weight (Belardi, Lee et al., "Improving
   Multislice Electron Ptychography with a Generative Prior": ``g(lambda)`` proportional to
   ``sigmoid(4 - lambda)^(1/2)``, strong while the noise is high, annealed towards the end so
   the prior resolves the atomic detail):
   ``x0' = x0 - w_i u``, ``w_i = guidance_rad · sigmoid(shift - lambda_i)^(1/2)``,
   ``lambda_i = -2 ln(sigma_i / sigma_data)`` (the log SNR of noise ``sigma_i`` on data of scale
   ``sigma_data``, default the prior's ``phase_scale_rad``). Then the DDIM update
   ``z_{i+1} = x0' + c (z_i - x0') + s eps`` with ``s = eta sigma_{i+1} sqrt(1 - sigma_{i+1}^2/sigma_i^2)``,
   ``c = sqrt(sigma_{i+1}^2 - s^2) / sigma_i`` (``eta`` 0: deterministic, the Euler step of the
   probability-flow ODE; 1: ancestral).

The object phase of the state after step ``i`` is the warm start plus the change on the prior's
grid brought back to the object's (``phase_warm + P^-(x0' - P(phase_warm))``, with ``P^-`` the
map back: exact where the grids match, and it keeps what the prior's grid cannot represent).
Only the object phase is refined: amplitude, probe, positions and tilts stay as they came in.
History per step: the data-fit term at ``x0``, ``sigma_rad``, ``guidance_weight_rad`` and
``prior_shift_rms_rad`` (RMS of ``x0' - P(phase_warm)``: how far the sampler has moved the warm
start), plus the held-out loss where positions are held out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ptycore.recon.engines.base import Engine, data_fit_name
from ptycore.recon.losses import DATA_LOSSES
from ptycore.recon.state import State


def noise_levels(sigma_start: float, sigma_end: float, steps: int, schedule: str = "karras",
                 rho: float = 7.0) -> np.ndarray:
    """``steps + 1`` noise levels (rad): ``steps`` decreasing from ``sigma_start`` to ``sigma_end``, then 0."""
    if steps == 1:
        sig = np.asarray([sigma_start])
    elif schedule == "geometric":
        sig = np.geomspace(sigma_start, sigma_end, steps)
    else:
        t = np.linspace(0.0, 1.0, steps)
        sig = (sigma_start ** (1 / rho) + t * (sigma_end ** (1 / rho) - sigma_start ** (1 / rho))) ** rho
    return np.append(sig, 0.0)


def guidance_weight(sigma: float, sigma_data: float, guidance: float, shift: float = 4.0) -> float:
    """MEP-Diffusion's shifted sigmoid: ``guidance · sigmoid(shift - lambda)^(1/2)``, with the log SNR
    ``lambda = -2 ln(sigma / sigma_data)``."""
    log_snr = -2.0 * math.log(sigma / sigma_data)
    return guidance * math.sqrt(1.0 / (1.0 + math.exp(-(shift - log_snr))))


class DPSEngine(Engine):
    """Diffusion posterior sampling (see the module docstring)."""

    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        super().__init__(stage, context, measurement, state, seed=seed, stage_index=stage_index)
        self.options = stage.options
        self.map = self.problem.prior_map
        self.sigmas = noise_levels(self.options.sigma_start_rad, self.options.sigma_end_rad, stage.iterations,
                                   self.options.schedule, self.options.rho)
        self.sigma_data = self.options.sigma_data_rad or self.map.prior.phase_scale_rad
        self.fit_name = data_fit_name(stage.losses)
        self.fit = DATA_LOSSES[self.fit_name]
        self.adam = optax.scale_by_adam(b1=self.options.adam_b1, b2=self.options.adam_b2) if self.options.adam \
            else None

    def _key(self, it: int):
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), self.stage_index * 1_000_003 + it + 1)

    # ------------------------------------------------------------ carry
    def init_carry(self, state: State):
        warm = self.map.to_prior(state.object_phase)
        noise = jax.random.normal(self._key(-1), warm.shape, warm.dtype)
        dps = {"z": warm + jnp.asarray(self.sigmas[0], warm.dtype) * noise, "warm": warm,
               "warm_phase": state.object_phase,
               "adam": self.adam.init(warm) if self.adam is not None else {}}
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (state, dps))

    def to_state(self, carry) -> State:
        return carry[0]

    def _render(self, state, dps, x):
        """The state with the object phase of the prior-grid estimate ``x`` (the warm start plus the change)."""
        return state._replace(object_phase=dps["warm_phase"] + self.map.from_prior(x - dps["warm"]))

    # ------------------------------------------------------------ the compiled sampler step
    def data_loss_and_gradient(self, x, state, dps, measured, batches, masks):
        """The data-fit loss at ``x`` (mean over the batches) and its gradient w.r.t. ``x``."""

        def batch_loss(xx, idx, mask):
            s = self._render(state, dps, xx)
            model = self.problem.masked(self.problem.intensities(s, idx))
            return self.fit(model, self.problem.masked(measured[idx]), mask)

        def body(acc, batch):
            idx, mask = batch
            value, grad = jax.value_and_grad(batch_loss)(x, idx, mask)
            return (acc[0] + value, acc[1] + grad), None

        n = batches.shape[0]
        (total, grad), _ = lax.scan(body, (jnp.zeros((), x.dtype), jnp.zeros_like(x)), (batches, masks))
        return total / n, grad / n

    def _iteration_impl(self, carry, measured, batches, masks, val_batches, val_masks, hyper):
        state, dps = carry
        sigma, sigma_next, weight = hyper["sigma"], hyper["sigma_next"], hyper["guidance"]
        z = dps["z"]
        if self.options.through_denoiser:  # d loss(D(z)) / dz: the data gradient pulled back through D
            x0, pullback = jax.vjp(lambda zz: self.map.denoise(zz, sigma), z)
            loss, grad_x0 = self.data_loss_and_gradient(x0, state, dps, measured, batches, masks)
            (grad,) = pullback(grad_x0)
        else:
            x0 = self.map.denoise(z, sigma)
            loss, grad = self.data_loss_and_gradient(x0, state, dps, measured, batches, masks)
        if self.adam is not None:
            direction, adam_state = self.adam.update(grad, dps["adam"])
        else:
            direction, adam_state = grad / (jnp.sqrt(jnp.mean(grad**2)) + 1e-30), dps["adam"]
        x0 = x0 - weight * direction
        # DDIM to sigma_next: the part of z's noise kept, and fresh noise of std s (eta > 0)
        ratio = jnp.where(sigma > 0, sigma_next / sigma, 0.0)
        s = self.options.eta * sigma_next * jnp.sqrt(jnp.clip(1.0 - ratio**2, 0.0, 1.0))
        keep = jnp.sqrt(jnp.clip(sigma_next**2 - s**2, 0.0, None)) / sigma
        fresh = jax.random.normal(hyper["key"], z.shape, z.dtype)
        z_next = x0 + keep * (z - x0) + s * fresh
        new_state = self._render(state, dps, x0)
        new_dps = {**dps, "z": z_next.astype(z.dtype), "adam": adam_state}
        terms = {self.fit_name: loss, "sigma_rad": sigma, "guidance_weight_rad": weight,
                 "prior_shift_rms_rad": jnp.sqrt(jnp.mean((x0 - dps["warm"]) ** 2))}
        out = self.summarise(new_state, measured, terms, val_batches, val_masks)
        return (new_state, new_dps), out

    # ------------------------------------------------------------ per-step host side
    def hyper(self, it: int) -> dict:
        sigma = float(self.sigmas[it])
        w = guidance_weight(sigma, self.sigma_data, self.options.guidance_rad, self.options.guidance_shift)
        return {"sigma": jnp.float32(sigma), "sigma_next": jnp.float32(self.sigmas[it + 1]),
                "guidance": jnp.float32(w), "key": self._key(it)}
