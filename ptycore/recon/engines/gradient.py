"""Gradient engine: automatic differentiation of the problem's loss with optax optimisers.

One ``jax.jit``-compiled function runs a whole iteration: all batches under ``lax.scan``
(fixed batch shape, padded + masked), the per-parameter optimiser update
(:mod:`ptycore.recon.optim`), then the constraints that are due. Learning rates, onsets (a
parameter starts/stops learning), loss weights and constraint switches are passed as data, so
nothing recompiles between iterations. The parameters (:mod:`ptycore.recon.parameters`) are
what is differentiated; the loss sees the state rendered from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ptycore.recon.constraints import apply_constraints
from ptycore.recon.engines.base import Engine
from ptycore.recon.optim import stage_hyper, stage_optimizer
from ptycore.recon.parameters import Parameters
from ptycore.recon.state import State


class GradientEngine(Engine):
    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        super().__init__(stage, context, measurement, state, seed=seed, stage_index=stage_index)
        self.names = list(stage.optimize)
        self.parameters = Parameters(self.names, state)
        self.optimizer = stage_optimizer(stage.optimize, self.names)

    def init_carry(self, state: State):
        carried = self.parameters.carried(state)
        opt = self.optimizer.init(self.parameters.view(state, carried))
        # the carry is donated to the compiled iteration: copy every leaf, so the caller's arrays
        # survive and no two leaves share a buffer (optax may initialise states from one array)
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (state, carried, opt))

    def to_state(self, carry) -> State:
        return carry[0]

    # ------------------------------------------------------------ the compiled iteration
    def _loss(self, params, state, measured, idx, mask, weights):
        terms = self.problem.loss_terms(self.parameters.render(params, state), measured, idx, mask)
        return self.problem.total(terms, weights), terms

    def _iteration_impl(self, carry, measured, batches, masks, val_batches, val_masks, hyper):
        def step(carry, batch):
            state, carried, opt = carry
            idx, mask = batch
            params = self.parameters.view(state, carried)
            (_, terms), grads = jax.value_and_grad(self._loss, has_aux=True)(
                params, state, measured, idx, mask, hyper["weights"])
            updates, opt = self.optimizer.update(grads, opt, params, hyper=hyper)
            state, carried = self.parameters.apply(state, carried, params, updates)
            return (state, carried, opt), terms

        (state, carried, opt), terms = lax.scan(step, carry, (batches, masks))
        state = apply_constraints(state, self.ctx, self.constraints, hyper["constraints"])
        out = self.summarise(state, measured, terms, val_batches, val_masks)
        return (state, carried, opt), out

    # ------------------------------------------------------------ per-iteration host side
    def hyper(self, it: int) -> dict:
        return {
            **stage_hyper(self.stage.optimize, self.names, it),
            "weights": {n: jnp.float32(loss.weight.at(it)) for n, loss in self.stage.losses.items()},
            "constraints": self.constraint_flags(it),
        }
