"""Per-parameter optimisers from optax's own combinators.

Each optimised parameter (a label of :class:`ptycore.recon.parameters.Parameters`) gets its
plan's direction (``adam``, ``lbfgs``, ``momentum``, ``sgd``; ``adamw`` for a network's weights:
Adam with decoupled weight decay) and learning rate through
``optax.inject_hyperparams``; ``optax.partition`` routes every label to its transformation. The
learning rate and whether a parameter is active (its ``start``/``stop``) are *data* passed to
``update`` each step (``hyper={"lr": {label: ...}, "active": {label: ...}}``), so schedules and
onsets never recompile: an inactive parameter gets a zero update and keeps its optimiser state
exactly (Adam's moments do not decay while it waits).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def direction(cfg) -> optax.GradientTransformation:
    """The plan's update direction for one parameter (before the learning rate)."""
    if cfg.optimizer == "adam":
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8)
    if cfg.optimizer == "adamw":  # as optax.adamw: the decay is added before the learning rate
        return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8),
                           optax.add_decayed_weights(cfg.weight_decay))
    if cfg.optimizer == "lbfgs":
        return optax.scale_by_lbfgs(memory_size=cfg.memory)
    if cfg.optimizer == "momentum":
        return optax.trace(decay=cfg.momentum)
    return optax.identity()


class GatedState(NamedTuple):
    inner: optax.OptState


def gated(label: str, cfg) -> optax.GradientTransformationExtraArgs:
    """Direction and learning rate of one label, its rate and activity read from ``hyper``."""

    def factory(learning_rate):
        return optax.chain(direction(cfg), optax.scale_by_learning_rate(learning_rate))

    inner = optax.inject_hyperparams(factory)(learning_rate=0.0)

    def init(params):
        return GatedState(inner.init(params))

    def update(updates, state, params=None, *, hyper, **_):
        s = state.inner
        s = s._replace(hyperparams={**s.hyperparams, "learning_rate": jnp.asarray(hyper["lr"][label],
                                                                                   jnp.float32)})
        out, new = inner.update(updates, s, params)
        active = hyper["active"][label]
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state.inner)
        out = jax.tree_util.tree_map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), out)
        return out, GatedState(new)

    return optax.GradientTransformationExtraArgs(init, update)


def stage_optimizer(optimize: dict, names) -> optax.GradientTransformationExtraArgs:
    """One transformation for the parameter dict ``{label: ...}`` of ``names``."""
    return optax.partition({n: gated(n, optimize[n]) for n in names}, {n: n for n in names})


def stage_hyper(optimize: dict, names, it: int) -> dict:
    """The per-iteration data of :func:`stage_optimizer`: learning rates and activity."""
    return {"lr": {n: jnp.float32(optimize[n].lr_at(it)) for n in names},
            "active": {n: jnp.bool_(optimize[n].active_at(it)) for n in names}}
