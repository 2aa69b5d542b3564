"""Small synthetic datasets made with ptycore's own forward model (fast, for engine tests).

Reconstruction quality against an independent simulator (abTEM) is tested separately on
`ptycore simulate` output; these datasets test the machinery: recovery of a known object,
positions, resume, recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ptycore.physics import Grid, Optics, intensities, make_probe, object_shape_for
from ptycore.recon.context import Measurement
from ptycore.recon.state import State, write_state
from ptycore.store import create_store, write_array

ENERGY_KV = 300.0
CONVERGENCE_MRAD = 21.4
LATTICE_A = 3.905


@dataclass
class Synthetic:
    measurement: Measurement
    truth_phase: np.ndarray  # (Hy, Wx)
    positions_A: np.ndarray  # true positions
    probe: jnp.ndarray  # (1, N, N)
    pixel_size_A: float
    slice_thickness_A: float

    def flat_state(self, positions_A=None) -> State:
        shape = (1, 1) + self.truth_phase.shape
        pos = self.positions_A if positions_A is None else positions_A
        return State(jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32), self.probe,
                     jnp.asarray(pos, jnp.float32), jnp.zeros(2, jnp.float32), jnp.float32(self.slice_thickness_A))

    def phase_ssim(self, phase) -> float:
        """Phase SSIM against the truth over the scanned area (the constant phase offset, which
        the data cannot fix, removed)."""
        from skimage.metrics import structural_similarity

        a, b = self.scanned(np.asarray(phase)), self.scanned(self.truth_phase)
        a = a - a.mean() + b.mean()
        return structural_similarity(a, b, data_range=float(b.max() - b.min()))

    def scanned(self, image: np.ndarray) -> np.ndarray:
        lo = np.ceil(self.positions_A.min(0) / self.pixel_size_A).astype(int)
        hi = np.floor(self.positions_A.max(0) / self.pixel_size_A).astype(int)
        return image[lo[0] : hi[0], lo[1] : hi[1]]


def lattice_phase(shape, pixel_size_A: float, peak_rad: float = 0.6) -> np.ndarray:
    """A SrTiO3-like projected phase: sharp columns on a 3.905 Å square lattice plus a defect."""
    yy, xx = np.meshgrid(np.arange(shape[0]) * pixel_size_A, np.arange(shape[1]) * pixel_size_A, indexing="ij")
    cols = (0.5 * (np.cos(2 * np.pi * yy / LATTICE_A) * np.cos(2 * np.pi * xx / LATTICE_A) + 1)) ** 3
    defect = np.exp(-((yy - 0.45 * yy.max()) ** 2 + (xx - 0.55 * xx.max()) ** 2) / 0.5)
    return (peak_rad * cols + 0.3 * defect).astype(np.float32)


def make_synthetic(n_det: int = 48, scan: int = 12, step_A: float = 0.5, pixel_A: float = 0.25,
                   defocus_A: float = 100.0, counts: float = 1e5, seed: int = 0) -> Synthetic:
    grid = Grid((n_det, n_det), pixel_A)
    optics = Optics(grid, ENERGY_KV)
    probe = (make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A) * np.sqrt(counts))[None]
    margin = 6
    pos = np.stack(np.meshgrid(np.arange(scan) * step_A, np.arange(scan) * step_A, indexing="ij"), -1).reshape(-1, 2)
    pos = pos + (n_det // 2 + margin) * pixel_A
    shape = object_shape_for(pos, pixel_A, (n_det, n_det), margin)
    truth = lattice_phase(shape, pixel_A)
    model = intensities(optics, jnp.ones((1, 1) + shape), jnp.asarray(truth)[None, None], probe,
                        jnp.asarray(pos, jnp.float32), jnp.zeros(2), 10.0)
    noisy = np.random.default_rng(seed).poisson(np.asarray(model)).astype(np.float32)
    measurement = Measurement(jnp.asarray(noisy), pixel_A, ENERGY_KV, CONVERGENCE_MRAD, (scan, scan))
    return Synthetic(measurement, truth, pos.astype(np.float32), probe, pixel_A, 10.0)


def write_stores(syn: Synthetic, prepared_path, init_path, positions_A=None) -> None:
    """Write a prepared store and an init store by the DESIGN contract (as preprocess/init would)."""
    group = create_store(prepared_path)
    patterns = np.fft.fftshift(np.asarray(syn.measurement.intensities), axes=(-2, -1))
    write_array(group, "patterns", patterns)
    write_array(group, "positions_A", syn.positions_A)
    group.attrs.update({
        "pixel_size_A": syn.pixel_size_A,
        "scan_shape": list(syn.measurement.scan_shape),
        "metadata": {"energy_kv": ENERGY_KV, "convergence_mrad": CONVERGENCE_MRAD,
                     "scan_shape": list(syn.measurement.scan_shape)},
    })
    init = create_store(init_path)
    write_state(init, syn.flat_state(positions_A))
    init.attrs.update({"pixel_size_A": syn.pixel_size_A})
