"""Grouping of scan positions into fixed-size batches (mini-batches) for one iteration.

Every grouping returns ``indices`` (n_batches, batch_size) int32 and ``mask``
(n_batches, batch_size) float32: the last batch is padded with index 0 and mask 0, so every
batch has the same shape and the compiled iteration never changes.

- ``random``: a fresh seeded permutation every iteration.
- ``compact``: spatially clustered groups (recursive bisection of the positions along their
  longer extent: balanced, deterministic); the order of groups is shuffled per iteration.
- ``sparse``: spread-out groups: positions in raster order dealt round-robin into the groups,
  so each group samples the whole field of view; the dealing offset changes per iteration.
"""

from __future__ import annotations

import numpy as np

GROUPINGS = ("random", "compact", "sparse")


def n_batches(n_positions: int, batch_size: int) -> int:
    return -(-n_positions // batch_size)


def _pack(groups: list[np.ndarray], batch_size: int):
    idx = np.zeros((len(groups), batch_size), np.int32)
    mask = np.zeros((len(groups), batch_size), np.float32)
    for i, g in enumerate(groups):
        idx[i, : len(g)] = g
        mask[i, : len(g)] = 1.0
    return idx, mask


def compact_groups(positions: np.ndarray, candidates: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``candidates`` (indices into positions) into spatially compact groups of <= batch_size."""
    if len(candidates) <= batch_size:
        return [candidates]
    pts = positions[candidates]
    axis = int(np.argmax(np.ptp(pts, axis=0)))
    order = candidates[np.argsort(pts[:, axis], kind="stable")]
    n_groups = n_batches(len(candidates), batch_size)
    left_groups = n_groups // 2
    # balance: split so both halves fill their groups about equally
    cut = int(round(len(order) * left_groups / n_groups))
    return compact_groups(positions, order[:cut], batch_size) + compact_groups(positions, order[cut:], batch_size)


def make_batches(kind: str, positions: np.ndarray, candidates: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Batches of ``candidates`` (position indices) for one iteration."""
    batch_size = min(batch_size, len(candidates))
    nb = n_batches(len(candidates), batch_size)
    if kind == "random":
        perm = rng.permutation(candidates)
        groups = [perm[i * batch_size : (i + 1) * batch_size] for i in range(nb)]
    elif kind == "compact":
        groups = compact_groups(np.asarray(positions), np.asarray(candidates), batch_size)
        groups = [groups[i] for i in rng.permutation(len(groups))]
    elif kind == "sparse":
        offset = int(rng.integers(nb))
        order = np.roll(np.asarray(candidates), -offset)
        groups = [order[i::nb] for i in range(nb)]
        groups = [groups[i] for i in rng.permutation(nb)]
    else:
        raise ValueError(f"unknown grouping {kind!r} (known: {', '.join(GROUPINGS)})")
    return _pack(groups, batch_size)


def split_validation(n_positions: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): a seeded random ``fraction`` of positions held out of updates."""
    rng = np.random.default_rng([seed, 7919])
    n_held = int(round(fraction * n_positions))
    perm = rng.permutation(n_positions)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])
