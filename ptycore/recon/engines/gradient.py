"""Gradient engine: automatic differentiation of the multislice model with optax optimisers.

One ``jax.jit``-compiled function runs a whole iteration: all batches under ``lax.scan``
(fixed batch shape, padded + masked), per-parameter optimiser updates, then the
constraints that are due. Learning rates, onsets (a parameter starts/stops learning),
loss weights and constraint switches are passed as data, so nothing recompiles between
iterations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ptycore.physics.multislice import intensities
from ptycore.recon.constraints import apply_constraints
from ptycore.recon.engines.base import Engine
from ptycore.recon.losses import DATA_LOSSES, OBJECT_LOSSES
from ptycore.recon.state import State

#: plan parameter name -> State field
FIELDS = {
    "object_phase": "object_phase",
    "object_amplitude": "object_amplitude",
    "probe": "probe",
    "positions": "positions_A",
    "tilts": "tilts_mrad",
    "slice_thickness": "slice_thickness_A",
}


def _transform(cfg) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8)
    if cfg.optimizer == "lbfgs":
        return optax.scale_by_lbfgs(memory_size=cfg.memory)
    if cfg.optimizer == "momentum":
        return optax.trace(decay=cfg.momentum)
    return optax.identity()


def data_fit_name(losses) -> str:
    for name in ("single", "poisson", "anscombe"):
        if name in losses:
            return name
    raise ValueError("no data-fit loss")


class GradientEngine(Engine):
    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        self.names = [n for n in stage.optimize if n in FIELDS]
        self.transforms = {n: _transform(stage.optimize[n]) for n in self.names}
        self.loss_names = list(stage.losses)
        self.fit_name = data_fit_name(stage.losses)
        # the probe learns in units of its initial peak amplitude, so its lr is dose-independent
        self.probe_scale = float(jnp.max(jnp.abs(state.probe))) or 1.0
        super().__init__(stage, context, measurement, state, seed=seed, stage_index=stage_index)

    # ------------------------------------------------------------ parameter views
    def _params(self, state: State) -> dict:
        out = {}
        for n in self.names:
            value = getattr(state, FIELDS[n])
            if n == "probe":
                value = jnp.stack([value.real, value.imag]) / self.probe_scale
            out[n] = value
        return out

    def _assemble(self, state: State, params: dict) -> State:
        updates = {}
        for n, value in params.items():
            if n == "probe":
                value = ((value[0] + 1j * value[1]) * self.probe_scale).astype(jnp.complex64)
            updates[FIELDS[n]] = value
        return state._replace(**updates)

    def _apply(self, state: State, increments: dict) -> State:
        """Add parameter-space increments to the state (exactly unchanged where an increment is 0)."""
        updates = {}
        for n, delta in increments.items():
            if n == "probe":
                delta = ((delta[0] + 1j * delta[1]) * self.probe_scale).astype(jnp.complex64)
            updates[FIELDS[n]] = getattr(state, FIELDS[n]) + delta
        return state._replace(**updates)

    def init_carry(self, state: State):
        params = self._params(state)
        opt = {n: self.transforms[n].init(params[n]) for n in self.names}
        # the carry is donated to the compiled iteration: copy every leaf, so the caller's arrays
        # survive and no two leaves share a buffer (optax may initialise states from one array)
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (state, opt))

    def to_state(self, carry) -> State:
        return carry[0]

    # ------------------------------------------------------------ the compiled iteration
    def _model(self, state: State, idx):
        tilts = state.tilts_mrad[idx] if self.per_position_tilts else state.tilts_mrad
        return intensities(self.ctx.optics, state.object_amplitude, state.object_phase, state.probe,
                           state.positions_A[idx], tilts, state.slice_thickness_A)

    def _loss(self, params, state, measured, idx, mask, weights):
        s = self._assemble(state, params)
        model = self._model(s, idx)
        meas = measured[idx]
        terms = {}
        for name in self.loss_names:
            if name in DATA_LOSSES:
                terms[name] = DATA_LOSSES[name](model, meas, mask)
            else:
                terms[name] = OBJECT_LOSSES[name](s.object_phase)
        total = sum(weights[name] * terms[name] for name in self.loss_names)
        return total, terms

    def _iteration_impl(self, carry, measured, batches, masks, val_batches, val_masks, hyper):
        def step(carry, batch):
            state, opt = carry
            idx, mask = batch
            params = self._params(state)
            (_, terms), grads = jax.value_and_grad(self._loss, has_aux=True)(
                params, state, measured, idx, mask, hyper["weights"])
            increments, new_opt = {}, {}
            for n in self.names:
                direction, os = self.transforms[n].update(grads[n], opt[n], params[n])
                increments[n] = -hyper["lr"][n] * direction
                active = hyper["active"][n]
                new_opt[n] = jax.tree_util.tree_map(lambda a, b, active=active: jnp.where(active, a, b), os, opt[n])
            return (self._apply(state, increments), new_opt), terms

        (state, opt), terms = lax.scan(step, carry, (batches, masks))
        state = apply_constraints(state, self.ctx, self.constraints, hyper["constraints"])
        out = self.summarise(state, measured, terms, val_batches, val_masks, DATA_LOSSES[self.fit_name])
        return (state, opt), out

    # ------------------------------------------------------------ per-iteration host side
    def hyper(self, it: int) -> dict:
        cfg = self.stage.optimize
        return {
            "lr": {n: jnp.float32(cfg[n].lr_at(it)) for n in self.names},
            "active": {n: jnp.bool_(cfg[n].active_at(it)) for n in self.names},
            "weights": {n: jnp.float32(loss.weight.at(it)) for n, loss in self.stage.losses.items()},
            "constraints": self.constraint_flags(it),
        }
