"""The hallucination check: how far a prior moved a reconstruction away from the data-only one.

Given a data-only result and a result of the same data with the prior (a ``prior`` loss or a
``dps`` stage), both on the same object grid, :func:`prior_shift` reports over the scanned area

- ``rms_phase_difference_rad``: RMS of the difference of the phases (per slice; the constant
  phase offset, which the data cannot fix, removed);
- ``ssim_phase_sum``: SSIM of the two depth-summed phases, and ``ssim_3d`` the mean SSIM over
  slices (data range: the data-only result's);

and :func:`hallucination_check` adds the held-out validation loss of each (``history/validation``,
written when a stage holds positions out: ``validation_fraction``) and their ratio: a prior that
only fills in what the data leave open keeps the held-out loss; one that invents structure the
data contradict raises it. Where the slice counts differ the phases are compared on the fewer
slices (total phase conserved). ``ptycore evaluate --data-only STORE`` writes it as ``prior_check``.
"""

from __future__ import annotations

import math

import numpy as np

from ptycore.errors import InvalidData
from ptycore.physics.slicing import slice_weights


def _as4d(phase) -> np.ndarray:
    a = np.asarray(phase, np.float64)
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def prior_shift(data_only_phase, prior_phase, box=None) -> dict:
    """RMS difference and SSIM of two phases ``(obj_modes, slices, Hy, Wx)`` (first object mode)
    on the same grid; ``box`` ``(y0, x0, h, w)`` restricts both to it (the scanned area)."""
    from skimage.metrics import structural_similarity

    a, b = _as4d(data_only_phase)[0], _as4d(prior_phase)[0]
    if a.shape[-2:] != b.shape[-2:]:
        raise InvalidData(f"the two reconstructions are on different grids ({a.shape[-2:]} and {b.shape[-2:]} "
                          "pixels): compare results of the same data and object grid")
    n = min(a.shape[0], b.shape[0])
    a = np.einsum("ij,jyx->iyx", slice_weights(a.shape[0], n), a)
    b = np.einsum("ij,jyx->iyx", slice_weights(b.shape[0], n), b)
    if box is not None:
        y0, x0, h, w = box
        a, b = a[:, y0:y0 + h, x0:x0 + w], b[:, y0:y0 + h, x0:x0 + w]
    b = b - (b.mean() - a.mean())
    diff = b - a
    rms = float(np.sqrt(np.mean(diff**2)))

    def ssim(x, y):
        rng = float(np.ptp(x))
        return float(structural_similarity(x, y, data_range=rng)) if rng > 0 else (1.0 if np.allclose(x, y) else 0.0)

    return {"rms_phase_difference_rad": rms, "ssim_phase_sum": ssim(a.sum(0), b.sum(0)),
            "ssim_3d": float(np.mean([ssim(a[i], b[i]) for i in range(n)])), "slices_compared": int(n)}


def _last_validation(history: dict):
    values = np.asarray(history.get("validation", []), np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    return float(values[-1]) if values.size else None


def hallucination_check(data_only, with_prior, margin_A: float = 0.5) -> dict:
    """:func:`prior_shift` of two ``ptycore.evaluate.Reconstruction`` (the data-only result and the
    prior result) over the prior result's scanned area, with both held-out validation losses."""
    from ptycore.evaluate import crop_scanned

    if not math.isclose(data_only.pixel_size_A, with_prior.pixel_size_A, rel_tol=1e-6):
        raise InvalidData(f"{data_only.path}: pixel {data_only.pixel_size_A:.4g} Å, {with_prior.path}: "
                          f"{with_prior.pixel_size_A:.4g} Å: compare results on the same object grid")
    _, box, _ = crop_scanned(with_prior, with_prior.phase_sum, margin_A)
    out = prior_shift(data_only.phase, with_prior.phase, box)
    v_data, v_prior = _last_validation(data_only.history), _last_validation(with_prior.history)
    out.update({"data_only": str(data_only.path), "validation_loss_data_only": v_data,
                "validation_loss_prior": v_prior,
                "validation_ratio": v_prior / v_data if v_data and v_prior is not None else None})
    return out
