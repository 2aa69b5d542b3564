"""What every engine shares: seeds, batching, held-out positions, the compiled iteration call.

A subclass sets up its own fields after ``super().__init__`` and implements
``_iteration_impl(carry, measured, batches, masks, val_batches, val_masks, hyper)`` (jitted
here with the carry donated), ``hyper(it)`` (per-iteration data: rates, switches),
``init_carry`` and ``to_state``.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from ptycore.prior.guidance import stage_prior_map
from ptycore.recon.grouping import make_batches, n_batches, split_validation
from ptycore.recon.losses import DATA_LOSSES
from ptycore.recon.placement import Placement
from ptycore.recon.problem import Problem
from ptycore.recon.state import State


def data_fit_name(losses) -> str:
    """The stage's data-fit loss (the held-out positions are scored with it)."""
    for name in ("single", "poisson", "anscombe"):
        if name in losses:
            return name
    raise ValueError("no data-fit loss")


def _validation_batches(n_positions: int, stage, seed: int, stage_index: int, positions):
    """The held-out positions' batches (the same every iteration), or None."""
    train_idx, val_idx = split_validation(n_positions, stage.validation_fraction, seed)
    if len(val_idx) == 0:
        return None
    batch_size = min(stage.batch_size, len(train_idx))
    rng = np.random.default_rng([seed, stage_index, 0])
    return make_batches("random", positions, val_idx, min(batch_size, len(val_idx)), rng)


def ownership(stage, placement: Placement, positions_A, n_positions: int, seed: int, stage_index: int):
    """The device that owns every position in a stage on N devices and the sub-batch sizes
    ``[training, held-out]`` (``Placement.assign`` of the stage's first batches and its held-out
    batches). Decided from metadata only (positions, plan, seed), so every process computes the
    same before any pattern is read."""
    positions_A = np.asarray(positions_A)
    train_idx, _ = split_validation(n_positions, stage.validation_fraction, seed)
    batch_size = min(stage.batch_size, len(train_idx))
    rng = np.random.default_rng([seed, stage_index, 0])
    first = make_batches(stage.grouping, positions_A, train_idx, batch_size, rng)
    val = _validation_batches(n_positions, stage, seed, stage_index, positions_A)
    owner, sizes = placement.assign(n_positions, first, *([val] if val is not None else []))
    return owner, sizes


class Engine:
    #: True for an engine whose batches are the same every iteration (LM): on N devices they are
    #: split once; otherwise ``random`` grouping draws per-device batches (see recon/placement.py)
    fixed_batches = False

    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        self.stage = stage
        self.ctx = context
        self.seed = seed
        self.stage_index = stage_index
        self.per_position_tilts = state.tilts_mrad.ndim == 2
        self.constraints = stage.constraints.active()
        self.measured = measurement.intensities  # N devices: the placed patterns (_place)
        self._measurement = measurement
        self.positions0 = np.asarray(state.positions_A)
        self.train_idx, self.val_idx = split_validation(measurement.n_positions, stage.validation_fraction, seed)
        self.batch_size = min(stage.batch_size, len(self.train_idx))
        noise_model = getattr(stage.options, "noise_model", "amplitude")
        self.problem = Problem(context.optics, losses=stage.losses, per_position_tilts=self.per_position_tilts,
                               noise_model="poisson" if noise_model == "poisson" else "amplitude",
                               detector_mask=measurement.detector_mask,
                               prior_map=stage_prior_map(stage, state, context.optics.grid.pixel_size_A))
        #: where the iteration runs (the measurement's placement: one device unless the runner gave N)
        self.placement = getattr(measurement, "placement", None) or Placement()
        if self.placement.single:
            self._iteration = jax.jit(self._iteration_impl, donate_argnums=(0,))
        else:
            self._place(measurement)
            self._iteration = jax.jit(self.placement.map_iteration(self._iteration_impl), donate_argnums=(0,))

    def _place(self, measurement):
        """N devices: owners of the positions (from the first iteration's batches), the patterns
        sharded by owner (each process reads its own rows; the stage runner has placed them
        already, see ``ptycore.recon.runner.run_stage``), the held-out batches split once."""
        owner, sizes = ownership(self.stage, self.placement, self.positions0, measurement.n_positions, self.seed,
                                 self.stage_index)
        placed = measurement.placed
        if placed is None or not np.array_equal(placed.owner, owner):
            placed = self.placement.place(measurement, owner)
        self._owner, self._sub_batch = owner, sizes[0]
        self._measurement = replace(measurement, placed=placed)
        self.measured = placed.patterns
        val = self._validation_batches_host()
        self._val_split = None if val is None else self.placement.split(*val, owner, sizes[1])
        self._split_cache = None

    def counts(self, positions) -> float:
        """Total counts of the measured patterns at ``positions`` (on N devices from the placed
        patterns' gathered totals when the patterns stayed in the store)."""
        return self._measurement.counts(positions)

    def summarise(self, state, measured, terms, val_batches, val_masks, fit=None):
        """Inside the compiled iteration: batch-mean terms, the held-out loss (``fit``, by default
        the stage's data-fit loss, on the validation batches, if any) and the probe's relative
        mode powers."""
        fit = fit or DATA_LOSSES[data_fit_name(self.stage.losses)]
        out = {k: jnp.mean(v) for k, v in terms.items()}
        if val_batches is not None:
            def val_step(_, batch):
                idx, mask = batch
                return None, fit(self.problem.masked(self.problem.intensities(state, idx)),
                                self.problem.masked(measured[idx]), mask)

            _, val = jax.lax.scan(val_step, None, (val_batches, val_masks))
            out["validation"] = jnp.mean(val)
        power = jnp.sum(jnp.abs(state.probe) ** 2, axis=(-2, -1))
        out["probe_mode_powers"] = power / jnp.sum(power)
        return out

    def local(self, tree):
        """``tree`` readable on this process's host: with several processes the replicated
        results span every process's devices, so each takes its own copy (one device's)."""
        if self.placement.single or jax.process_count() == 1:
            return tree
        return jax.tree_util.tree_map(
            lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x, tree)

    def prior_sigma(self, it: int):
        """The ``prior`` loss's noise level at iteration ``it`` (rad; data of the compiled call)."""
        loss = self.stage.losses.get("prior")
        return jnp.float32(loss.sigma_rad.at(it) if loss is not None else 0.0)

    def compilations(self) -> int:
        return int(self._iteration._cache_size())

    def constraint_flags(self, it: int):
        flags = [c.due(it) for c in self.constraints.values()]
        return jnp.asarray(flags if flags else [False], dtype=bool)

    def batches(self, it: int):
        rng = np.random.default_rng([self.seed, self.stage_index, it])
        return make_batches(self.stage.grouping, self.positions0, self.train_idx, self.batch_size, rng)

    def _validation_batches_host(self):
        return _validation_batches(len(self.train_idx) + len(self.val_idx), self.stage, self.seed, self.stage_index,
                                   self.positions0)

    def validation_batches(self):
        if not self.placement.single:
            return self._val_split or (None, None)
        val = self._validation_batches_host()
        if val is None:
            return None, None
        return jnp.asarray(val[0]), jnp.asarray(val[1])

    def device_batches(self, it: int):
        """This iteration's batches as the compiled call takes them: (n_batches, B) on one device,
        per-device sub-batches (n_batches, N × B/N) on N (see recon/placement.py)."""
        if self.placement.single:
            idx, mask = self.batches(it)
            return jnp.asarray(idx), jnp.asarray(mask)
        if self.fixed_batches:
            if self._split_cache is None:
                self._split_cache = self.placement.split(*self.batches(it), self._owner, self._sub_batch)
            return self._split_cache
        if self.stage.grouping == "random":
            rng = np.random.default_rng([self.seed, self.stage_index, it])
            nb = n_batches(len(self.train_idx), self.batch_size)
            return self.placement.stratified(self._owner, self.train_idx, nb, self._sub_batch, rng)
        return self.placement.split(*self.batches(it), self._owner, self._sub_batch)

    def iteration(self, carry, it: int):
        idx, mask = self.device_batches(it)
        val_idx, val_mask = self.validation_batches()
        hyper = self.hyper(it)
        if not self.placement.single:
            carry, hyper = self.placement.replicate((carry, hyper))
        return self._iteration(carry, self.measured, idx, mask, val_idx, val_mask, hyper)
