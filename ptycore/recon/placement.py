"""Where one reconstruction runs: one device, or data parallelism over probe positions on a mesh.

A :class:`Placement` holds the devices of a run. On one device it is a no-op: the engine's
iteration is jitted as it always was and nothing below is traced. On N devices (local, or over
several processes after :func:`ptycore.distributed.initialize`) the compiled iteration runs
under ``jax.shard_map`` over a one-axis mesh ``positions``:

- every position is **owned** by one device, once per stage (:meth:`Placement.assign`): each
  batch of the stage's first iteration is split into N balanced parts, contiguous in position
  index, part ``d`` to device ``d``; a device holds only the measured patterns of its own positions
  (:class:`Patterns`), so no batch gathers patterns across devices;
- each iteration's batches (the same grouping as on one device) are split by owner into
  per-device sub-batches of ``ceil(B / N)`` positions, padded with mask 0
  (:meth:`Placement.split`). For ``compact`` and ``sparse`` grouping the sub-batches of a
  batch are exactly the batch's positions, so a run on N devices computes what one device
  computes, summed in another order (float32 rounding). ``random`` grouping draws a fresh
  permutation per device of its own positions (a stratified random batch: B/N positions from
  each device's share), so its batches differ from one device's. One device's random batches
  split by owner would hold a hypergeometric share per device, and the compiled sub-batch
  would have to be the largest share any batch of the stage holds: 1.2-2× ``ceil(B/N)``
  (measured on the host: batch 32 on 4 devices 2.0×, 256 on 4 1.47×, 1024 on 4 1.18×, 256 on 8
  1.75×), i.e. that much more work per device, so that is not done (``reconstruct`` warns);
- a process reads only the patterns of its own devices' positions (:meth:`Placement.place`):
  the owners are decided from metadata alone (the positions, the stage's grouping and seed),
  identically in every process, before any pattern is read; the patterns then come from the
  prepared store position by position (``ptycore.recon.context.StoredPatterns``), and what a
  stage needs of all of them (every pattern's total counts, whether they are finite) is
  gathered from the processes that read them;
- object, probe, positions, optimiser state and the carry are replicated; every sum over a
  batch's positions that feeds an update goes through :func:`positions_sum` (``psum`` over the
  mesh axis; the identity on one device, where nothing is device-varying). Gradients and
  transposes with respect to replicated parameters are summed by JAX itself (``shard_map``
  tracks which values vary over the axis, and its output check refuses a carry that was not
  reduced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: the mesh axis the probe positions are sharded over
AXIS = "positions"


# ------------------------------------------------------------------ reductions inside the iteration
def _varying(x) -> bool:
    """Whether ``x`` (a traced value) differs between the devices of the ``positions`` axis."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    varying = getattr(manual, "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", ())
    return AXIS in varying


def positions_sum(tree):
    """Sum over the devices of the ``positions`` axis of every leaf that varies over it (a
    device's partial sum over its positions); a leaf that does not vary is already the total
    (computed from replicated values, or reduced by JAX). The identity on one device."""
    return jax.tree_util.tree_map(lambda x: lax.psum(x, AXIS) if _varying(x) else x, tree)


def varying_like(x, ref):
    """Every leaf of ``x`` marked as varying over the ``positions`` axis where ``ref`` is (both
    branches of a ``lax.cond``, a primal and its tangent must agree); ``x`` itself on one device."""
    if not _varying(ref):
        return x
    return jax.tree_util.tree_map(lambda a: a if _varying(a) else lax.pcast(a, AXIS, to="varying"), x)


def positions_scatter_add(x, idx, values):
    """``x.at[idx].add(values)`` for a replicated ``x`` (e.g. positions) and per-device ``idx``,
    ``values``: every device's additions, summed. On one device exactly ``x.at[idx].add(values)``."""
    if not _varying(values) and not _varying(idx):
        return x.at[idx].add(values)
    return x + lax.psum(jnp.zeros_like(x).at[idx].add(values), AXIS)


# ------------------------------------------------------------------ sharded measured patterns
@jax.tree_util.register_pytree_node_class
@dataclass
class Patterns:
    """Measured patterns of one device's positions: ``rows`` (n_local, ky, kx) and ``row_of``
    (n_positions,) the local row of each (global) position index (0 for positions the device
    does not own: only padding entries, mask 0, index them). ``patterns[idx]`` with global
    indices works as on the full array. Outside ``shard_map`` both are global arrays sharded
    over the ``positions`` axis (N × n_local rows, N × n_positions row numbers)."""

    rows: jax.Array
    row_of: jax.Array

    def __getitem__(self, idx):
        return self.rows[self.row_of[idx]]

    @property
    def dtype(self):
        return self.rows.dtype

    def tree_flatten(self):
        return (self.rows, self.row_of), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)


@dataclass
class Placed:
    """A stage's measured patterns on the devices (:meth:`Placement.place`)."""

    owner: np.ndarray  # (n_positions,) the device of every position
    patterns: Patterns
    row_counts: np.ndarray  # (n_positions,) float64: every pattern's total counts (gathered)
    positions_per_device: list[int]
    #: per process: positions and store chunks it read for this stage, bytes of patterns it holds per device
    read_per_process: list[dict]


def allgather_host(values) -> np.ndarray:
    """``values`` (a small host array, the same shape in every process) from every process,
    stacked ``(processes, ...)``; every process gets the same array."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


# ------------------------------------------------------------------ the placement
class Placement:
    """The devices one reconstruction runs on (see the module docstring)."""

    def __init__(self, devices=None):
        self.devices = list(devices) if devices is not None else [jax.devices()[0]]
        if not self.devices:
            raise ValueError("a placement needs at least one device")
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,)) if len(self.devices) > 1 else None

    @classmethod
    def from_count(cls, n_devices: int | None = None) -> Placement:
        """The first ``n_devices`` devices of the run (all of them for None; over every process
        after ``jax.distributed.initialize``)."""
        devices = jax.devices()
        n = len(devices) if n_devices is None else int(n_devices)
        if n < 1 or n > len(devices):
            raise ValueError(f"{n} devices asked for, the run has {len(devices)} "
                             f"({jax.process_count()} process(es), {jax.local_device_count()} local device(s))")
        return cls(devices[:n])

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def single(self) -> bool:
        return self.mesh is None

    @property
    def local_devices(self) -> list:
        """The run's devices that belong to this process."""
        return [d for d in self.devices if d.process_index == jax.process_index()]

    def peak_memory(self) -> list[int | None]:
        """Every device's peak bytes in use so far (``memory_stats()``, gathered from the processes
        that own them), in device order; None where JAX does not say (the CPU)."""
        from ptycore.recon.memory import peak_bytes

        mine = np.full(self.n_devices, -1, np.int64)
        for i, d in enumerate(self.devices):
            if d.process_index == jax.process_index():
                value = peak_bytes(d)
                mine[i] = -1 if value is None else value
        gathered = allgather_host(mine).max(axis=0)
        return [None if v < 0 else int(v) for v in gathered]

    def describe(self) -> dict:
        """For provenance: device count, process count, mesh."""
        d = self.devices[0]
        return {"devices": self.n_devices, "processes": jax.process_count(),
                "mesh": {AXIS: self.n_devices}, "platform": d.platform,
                "device_kind": getattr(d, "device_kind", d.platform)}

    # -------------------------------------------------------------- ownership and batches
    def assign(self, n_positions: int, *batch_sets) -> tuple[np.ndarray, list[int]]:
        """Owner (device number) of every position from batches ``(idx, mask)`` covering them:
        each batch's real entries, in index order, split into N contiguous balanced parts (so a
        device's positions lie in few chunks of the stored patterns, which are scan rows). Returns
        ``(owner, sub_batch_sizes)`` (one size per batch set: ``ceil(largest batch / N)``)."""
        owner = np.zeros(n_positions, np.int32)
        sizes = []
        for idx, mask in batch_sets:
            largest = 1
            for row, m in zip(np.asarray(idx), np.asarray(mask), strict=True):
                members = np.sort(row[m > 0])  # contiguous in index order: few store chunks per device
                largest = max(largest, len(members))
                for d, part in enumerate(np.array_split(members, self.n_devices)):
                    owner[part] = d
            sizes.append(math.ceil(largest / self.n_devices))
        return owner, sizes

    def split(self, idx, mask, owner: np.ndarray, size: int):
        """Per-device sub-batches of global batches ``(idx, mask)`` (n_batches, B): arrays
        (n_batches, N × size), device ``d``'s sub-batch in columns ``d·size … (d+1)·size - 1``
        (its own positions, padded with index 0 and mask 0). ``size`` grows (a recompile) only
        if a batch holds more than ``size`` positions of one device."""
        idx, mask = np.asarray(idx), np.asarray(mask)
        n = self.n_devices
        parts = []
        for row, m in zip(idx, mask, strict=True):
            members = row[m > 0]
            parts.append([members[owner[members] == d] for d in range(n)])
        size = max([size] + [len(p) for ps in parts for p in ps])
        out_idx = np.zeros((len(parts), n * size), np.int32)
        out_mask = np.zeros((len(parts), n * size), np.float32)
        for b, ps in enumerate(parts):
            for d, p in enumerate(ps):
                out_idx[b, d * size: d * size + len(p)] = p
                out_mask[b, d * size: d * size + len(p)] = 1.0
        return self.put_batches(out_idx, out_mask)

    def stratified(self, owner: np.ndarray, candidates: np.ndarray, n_batches: int, size: int,
                   rng: np.random.Generator):
        """``random`` grouping on N devices: every device's own ``candidates`` in a fresh random
        order, dealt into ``n_batches`` sub-batches of ``size``."""
        n = self.n_devices
        out_idx = np.zeros((n_batches, n * size), np.int32)
        out_mask = np.zeros((n_batches, n * size), np.float32)
        for d in range(n):
            own = rng.permutation(candidates[owner[candidates] == d])
            for b, p in enumerate(np.array_split(own, n_batches)):
                out_idx[b, d * size: d * size + len(p)] = p
                out_mask[b, d * size: d * size + len(p)] = 1.0
        return self.put_batches(out_idx, out_mask)

    def replicate(self, tree):
        """Every leaf replicated on the mesh (the carry and the per-iteration data), so the compiled
        call sees the same input shardings every iteration (no recompiles)."""
        sharding = NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)

    def put_batches(self, idx, mask):
        sharding = NamedSharding(self.mesh, P(None, AXIS))
        return self._put(idx, sharding), self._put(mask, sharding)

    def _put(self, array: np.ndarray, sharding):
        """A global array from a host array every process holds (each process puts only the
        pieces of its own devices)."""
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def patterns(self, owner: np.ndarray, read_rows, pattern_shape, dtype=np.float32) -> Patterns:
        """The measured patterns sharded by owner. ``read_rows(positions)`` returns the
        patterns (k, *pattern_shape) of the given sorted position indices; it is called only for
        the devices of this process, so a process reads only its own positions."""
        n = self.n_devices
        own, n_local, row_of = self._rows(owner)
        shape = tuple(int(s) for s in pattern_shape)
        rows_sharding = NamedSharding(self.mesh, P(AXIS))

        def rows_for(index):
            d = (index[0].start or 0) // n_local
            block = np.zeros((n_local,) + shape, dtype)
            if len(own[d]):
                block[: len(own[d])] = read_rows(own[d])
            return block

        rows = jax.make_array_from_callback((n * n_local,) + shape, rows_sharding, rows_for)
        row_of = self._put(row_of.reshape(-1), rows_sharding)
        return Patterns(rows, row_of)

    def _rows(self, owner: np.ndarray):
        """(each device's positions, rows per device, the local row of every position per device)."""
        n = self.n_devices
        own = [np.flatnonzero(owner == d) for d in range(n)]
        n_local = max(1, max(len(o) for o in own))
        row_of = np.zeros((n, len(owner)), np.int32)
        for d, o in enumerate(own):
            row_of[d, o] = np.arange(len(o), dtype=np.int32)
        return own, n_local, row_of

    def place(self, measurement, owner: np.ndarray) -> Placed:
        """The measurement's patterns on the devices by ``owner``: this process reads only its
        devices' positions (from the store for a stored measurement), then every process gets
        every pattern's total counts (an all-gather of one number per pattern). Raises
        ``InvalidData`` in every process, naming the position, when a pattern is not finite."""
        from ptycore.errors import InvalidData

        stored = getattr(measurement, "stored", None)
        before = (stored.positions_read, stored.chunks_read) if stored is not None else (0, 0)
        patterns = self.patterns(owner, measurement.read_rows, measurement.detector_shape)
        own, n_local, row_of = self._rows(owner)
        replicated = NamedSharding(self.mesh, P())
        sums = jax.jit(lambda rows: jnp.sum(rows, axis=(1, 2)), out_shardings=replicated)(patterns.rows)
        sums = np.asarray(sums.addressable_data(0), np.float64)
        positions = np.arange(len(owner))
        row_counts = sums[owner * n_local + row_of[owner, positions]]
        local = [d for d, dev in enumerate(self.devices) if dev.process_index == jax.process_index()]
        read = np.asarray([0, 0] if stored is None else
                          [stored.positions_read - before[0], stored.chunks_read - before[1]], np.int64)
        held = n_local * int(np.prod(measurement.detector_shape)) * np.dtype(patterns.dtype).itemsize
        gathered = allgather_host(np.concatenate([read, [len(local)]]))
        read_per_process = [{"positions_read": int(r[0]), "chunks_read": int(r[1]), "devices": int(r[2]),
                             "patterns_bytes_per_device": held} for r in gathered]
        bad = ~np.isfinite(row_counts)
        if bad.any():
            where = getattr(measurement, "source", "") or "the data"
            raise InvalidData(f"{where}: patterns contain NaN or Inf (position {int(np.flatnonzero(bad)[0])})")
        return Placed(owner, patterns, row_counts, [len(o) for o in own], read_per_process)

    # -------------------------------------------------------------- the compiled iteration
    def map_iteration(self, fn):
        """``fn(carry, measured, batches, masks, val_batches, val_masks, hyper)`` under
        ``shard_map``: the patterns and (sub-)batches sharded over ``positions``, everything
        else replicated; the returned carry and terms must be replicated (reduced)."""
        sharded = P(None, AXIS)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS), sharded, sharded, sharded, sharded, P()),
                             out_specs=P())
