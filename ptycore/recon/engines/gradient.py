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
import numpy as np
import optax
from jax import lax

from ptycore.physics.multislice import intensities
from ptycore.recon.constraints import apply_constraints
from ptycore.recon.grouping import make_batches, split_validation
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


class GradientEngine:
    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        self.stage = stage
        self.ctx = context
        self.seed = seed
        self.stage_index = stage_index
        self.names = [n for n in stage.optimize if n in FIELDS]
        self.transforms = {n: _transform(stage.optimize[n]) for n in self.names}
        self.per_position_tilts = state.tilts_mrad.ndim == 2
        self.loss_names = list(stage.losses)
        self.constraints = stage.constraints.active()
        self.fit_name = data_fit_name(stage.losses)
        # the probe learns in units of its initial peak amplitude, so its lr is dose-independent
        self.probe_scale = float(jnp.max(jnp.abs(state.probe))) or 1.0
        self.measured = measurement.intensities
        self.positions0 = np.asarray(state.positions_A)
        n = measurement.n_positions
        self.train_idx, self.val_idx = split_validation(n, stage.validation_fraction, seed)
        self.batch_size = min(stage.batch_size, len(self.train_idx))
        self._iteration = jax.jit(self._iteration_impl, donate_argnums=(0,))

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

    def compilations(self) -> int:
        return int(self._iteration._cache_size())

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
        out = {k: jnp.mean(v) for k, v in terms.items()}
        if val_batches is not None:
            def val_step(_, batch):
                idx, mask = batch
                return None, DATA_LOSSES[self.fit_name](self._model(state, idx), measured[idx], mask)

            _, val = lax.scan(val_step, None, (val_batches, val_masks))
            out["validation"] = jnp.mean(val)
        power = jnp.sum(jnp.abs(state.probe) ** 2, axis=(-2, -1))
        out["probe_mode_powers"] = power / jnp.sum(power)
        return (state, opt), out

    # ------------------------------------------------------------ per-iteration host side
    def hyper(self, it: int) -> dict:
        cfg = self.stage.optimize
        flags = [c.due(it) for c in self.constraints.values()]
        return {
            "lr": {n: jnp.float32(cfg[n].lr_at(it)) for n in self.names},
            "active": {n: jnp.bool_(cfg[n].active_at(it)) for n in self.names},
            "weights": {n: jnp.float32(loss.weight.at(it)) for n, loss in self.stage.losses.items()},
            "constraints": jnp.asarray(flags if flags else [False], dtype=bool),
        }

    def batches(self, it: int):
        rng = np.random.default_rng([self.seed, self.stage_index, it])
        return make_batches(self.stage.grouping, self.positions0, self.train_idx, self.batch_size, rng)

    def validation_batches(self):
        if len(self.val_idx) == 0:
            return None, None
        rng = np.random.default_rng([self.seed, self.stage_index, 0])
        idx, mask = make_batches("random", self.positions0, self.val_idx, min(self.batch_size, len(self.val_idx)), rng)
        return jnp.asarray(idx), jnp.asarray(mask)

    def iteration(self, carry, it: int):
        idx, mask = self.batches(it)
        val_idx, val_mask = self.validation_batches()
        carry, terms = self._iteration(carry, self.measured, jnp.asarray(idx), jnp.asarray(mask),
                                       val_idx, val_mask, self.hyper(it))
        return carry, terms
