"""Remapping an object between slice counts over the same total thickness."""

from __future__ import annotations

import numpy as np


def slice_weights(n_from: int, n_to: int) -> np.ndarray:
    """(n_to, n_from) overlap weights that remap slices over the same total thickness.

    ``new[i] = sum_j w[i, j] old[j]``; every column sums to 1, so the depth sum (total phase,
    or log-amplitude) is conserved at every pixel.
    """
    old = np.linspace(0.0, 1.0, n_from + 1)
    new = np.linspace(0.0, 1.0, n_to + 1)
    w = np.zeros((n_to, n_from))
    for i in range(n_to):
        for j in range(n_from):
            overlap = min(new[i + 1], old[j + 1]) - max(new[i], old[j])
            if overlap > 0:
                w[i, j] = overlap / (old[j + 1] - old[j])
    return w
