"""ptycore's physics against an independent simulator, abTEM.

abTEM indexes arrays [x, y]; every abTEM array is transposed once to (y, x) here. abTEM's probe at
position (x, y) is centred at that point of its potential, whose sample i sits at i * sampling;
ptycore's probe is centred at window pixel (ny // 2, nx // 2) and object pixel (0, 0) sits at 0 Å.
"""

from __future__ import annotations

import numpy as np
import pytest

abtem = pytest.importorskip("abtem")
ase = pytest.importorskip("ase")

import jax.numpy as jnp  # noqa: E402

from ptycore.physics import Grid, Optics, diffraction_patterns, make_probe, sigma_per_V_A  # noqa: E402

pytestmark = pytest.mark.sim

ENERGY_KV = 300.0
CONVERGENCE_MRAD = 21.4
LATTICE_A = 3.905


@pytest.fixture(scope="module", autouse=True)
def abtem_cpu_float32():
    with abtem.config.set({"device": "cpu", "precision": "float32", "fft": "numpy",
                           "diagnostics.progress_bar": False}):
        yield


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ---------------------------------------------------------------------------------------------
# (a) probe


def abtem_probe_intensity(grid: Grid, defocus_A: float, aberrations: dict) -> np.ndarray:
    """abTEM's probe intensity on ``grid``, built at the window centre, as (y, x)."""
    ny, nx = grid.shape
    px = grid.pixel_size_A
    probe = abtem.Probe(semiangle_cutoff=CONVERGENCE_MRAD, energy=ENERGY_KV * 1e3, gpts=(nx, ny),
                        sampling=(px, px), defocus=defocus_A, **aberrations)
    wave = np.asarray(probe.build(scan=np.array([[(nx // 2) * px, (ny // 2) * px]]), lazy=False).array)
    wave = wave.reshape(nx, ny).T  # [x, y] -> (y, x)
    return np.abs(wave) ** 2


@pytest.mark.parametrize(
    "defocus_A, aberrations",
    [
        (150.0, {}),
        (150.0, {"C30": 1e4}),
        (50.0, {"C12": 30.0, "phi12": 0.5}),
        (-80.0, {"C12": 20.0, "phi12": -1.1, "C30": -2e4}),
    ],
)
def test_probe_matches_abtem(defocus_A, aberrations):
    # a non-square window: a transposition slip cannot go unnoticed
    grid = Grid((96, 128), 0.1)
    reference = abtem_probe_intensity(grid, defocus_A, aberrations)
    ours = np.abs(np.asarray(make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A, aberrations))) ** 2
    assert ours.shape == reference.shape
    assert _corr(ours, reference) >= 0.999
    # both peak at the window centre (same position convention)
    if not aberrations:
        assert np.unravel_index(np.argmax(reference), reference.shape) == (48, 64)
        assert np.unravel_index(np.argmax(ours), ours.shape) == (48, 64)
    if aberrations:
        # the opposite sign of defocus must fit worse when C30 or astigmatism breaks the symmetry
        flipped = np.abs(np.asarray(make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, -defocus_A, aberrations))) ** 2
        assert _corr(flipped, reference) < _corr(ours, reference) - 1e-3
    if "phi12" in aberrations:
        # the mirrored astigmatism angle (a y-flip of the azimuth convention) must fit worse
        mirrored = dict(aberrations, phi12=-aberrations["phi12"])
        wrong = np.abs(np.asarray(make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A, mirrored))) ** 2
        assert _corr(wrong, reference) < 0.99


# ---------------------------------------------------------------------------------------------
# (b) multislice


GPTS = 128
REPEATS = 3  # unit cells across the periodic cell
SLICE_A = LATTICE_A / 2
DEFOCUS_A = 50.0
#: probe positions (x, y) in abTEM's frame, Å: on the Sr column at the origin, off-column, and on
#: the Sr vacancy at (x, y) = (a, 2a) (whose mirror image (2a, a) holds an Sr column)
POSITIONS_XY = np.array([[0.0, 0.0], [1.3, 2.1], [LATTICE_A, 2 * LATTICE_A], [10.5, 3.5]])
#: Tolerance inside the band limit. The two codes differ only where ptycore's model is not
#: abTEM's algorithm: abTEM band-limits each slice's transmission function (2/3 cut-off with a
#: 0.01/sampling cosine taper) and then the wave in the propagator, while ptycore band-limits
#: only the wave (hard 2/3 disk) and does not propagate after the last slice (a phase, invisible
#: in the intensity). Measured: relative L2 0.02-0.16 % (largest with the probe on the Sr column,
#: which scatters most beyond the band limit), correlation > 0.99999. 0.5 % leaves room for
#: float32 round-off across platforms while a wrong propagation sign, a transposed potential or
#: swapped positions each give >= 1 %.
REL_L2_TOL = 0.005
CORR_TOL = 0.9999


@pytest.fixture(scope="module")
def crystal():
    """abTEM's potential slices of a 3x3x2-cell SrTiO3 block with one Sr vacancy (no x<->y symmetry)."""
    cell = ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                (0, 0.5, 0.5)], cell=[LATTICE_A] * 3, pbc=True)
    atoms = cell * (REPEATS, REPEATS, 2)
    atoms.positions[:, 2] += LATTICE_A / 4  # atomic layers inside slices, not on their boundaries
    vacancy = int(np.argmin(np.linalg.norm(atoms.positions - [LATTICE_A, 2 * LATTICE_A, LATTICE_A / 4], axis=1)))
    assert atoms[vacancy].symbol == "Sr"
    del atoms[vacancy]
    potential = abtem.Potential(atoms, gpts=(GPTS, GPTS), slice_thickness=(SLICE_A,) * 4, projection="infinite")
    projected = np.asarray(potential.build(lazy=False).array)  # (slices, x, y), V Å
    return potential, projected


def abtem_patterns(potential, tilt_xy=(0.0, 0.0)) -> np.ndarray:
    probe = abtem.Probe(semiangle_cutoff=CONVERGENCE_MRAD, energy=ENERGY_KV * 1e3, defocus=DEFOCUS_A, tilt=tilt_xy)
    exit_waves = probe.multislice(potential, scan=POSITIONS_XY, lazy=False)
    patterns = exit_waves.diffraction_patterns(max_angle="full", fftshift=True)
    return np.asarray(patterns.array).transpose(0, 2, 1)  # (pos, kx, ky) -> (pos, ky, kx)


def ptycore_patterns(projected, pixel_A, *, tilt_yx=(0.0, 0.0), slice_A=SLICE_A, transpose=True,
                     positions_yx=None) -> np.ndarray:
    grid = Grid((GPTS, GPTS), pixel_A)
    optics = Optics(grid, ENERGY_KV)  # default band limit: 2/3 of Nyquist, as abTEM
    phase = sigma_per_V_A(ENERGY_KV) * (projected.transpose(0, 2, 1) if transpose else projected)
    # the potential is periodic: tile it so that every window lies inside, and shift the positions
    # by one period (the diffraction intensity of a periodic wave does not see the shift)
    obj = np.tile(phase, (1, 3, 3))[None].astype(np.float32)
    extent = GPTS * pixel_A
    positions = (POSITIONS_XY[:, ::-1] if positions_yx is None else positions_yx) + extent
    probe = make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, DEFOCUS_A)[None]
    out = diffraction_patterns(optics, jnp.ones_like(obj), jnp.asarray(obj), probe, jnp.asarray(positions, jnp.float32),
                               jnp.asarray(tilt_yx, jnp.float32), slice_A)
    return np.asarray(out)


def _errors(reference, ours, pixel_A):
    grid = Grid((GPTS, GPTS), pixel_A)
    k = np.fft.fftshift(np.hypot(*grid.frequencies_invA()))
    inside = k < (2 / 3) * grid.nyquist_invA()
    rel = [np.linalg.norm(r[inside] - o[inside]) / np.linalg.norm(r[inside]) for r, o in zip(reference, ours,
                                                                                             strict=True)]
    corr = [_corr(r[inside], o[inside]) for r, o in zip(reference, ours, strict=True)]
    return np.array(rel), np.array(corr)


def test_multislice_matches_abtem(crystal):
    potential, projected = crystal
    pixel_A = potential.sampling[0]
    assert potential.sampling[0] == pytest.approx(potential.sampling[1])
    reference = abtem_patterns(potential)
    ours = ptycore_patterns(projected, pixel_A)
    # both conserve the incident intensity (1) up to what is scattered beyond the band limit
    np.testing.assert_allclose(ours.sum(axis=(1, 2)), reference.sum(axis=(1, 2)), rtol=3e-3)
    rel, corr = _errors(reference, ours, pixel_A)
    print("relative L2 per position:", rel, "correlation:", corr)
    assert rel.max() < REL_L2_TOL
    assert corr.min() > CORR_TOL

    # the comparison is sharp enough to see each convention
    wrong_sign, _ = _errors(reference, ptycore_patterns(projected, pixel_A, slice_A=-SLICE_A), pixel_A)
    assert wrong_sign.min() > 2 * REL_L2_TOL
    transposed, _ = _errors(reference, ptycore_patterns(projected, pixel_A, transpose=False), pixel_A)
    assert transposed.max() > 2 * REL_L2_TOL
    swapped, _ = _errors(reference, ptycore_patterns(projected, pixel_A, positions_yx=POSITIONS_XY), pixel_A)
    assert swapped.max() > 2 * REL_L2_TOL


def test_tilt_is_opposite_to_abtem_beam_tilt(crystal):
    """ptycore's tilt (ty, tx) is a crystal tilt: it equals abTEM's beam tilt (x, y) = (-tx, -ty)."""
    potential, projected = crystal
    pixel_A = potential.sampling[0]
    tilt_yx = (-10.0, 20.0)
    reference = abtem_patterns(potential, tilt_xy=(-tilt_yx[1], -tilt_yx[0]))
    rel, corr = _errors(reference, ptycore_patterns(projected, pixel_A, tilt_yx=tilt_yx), pixel_A)
    print("tilted: relative L2 per position:", rel)
    assert rel.max() < REL_L2_TOL
    assert corr.min() > CORR_TOL
    same_sign, _ = _errors(reference, ptycore_patterns(projected, pixel_A, tilt_yx=(tilt_yx[0] * -1, tilt_yx[1] * -1)),
                           pixel_A)
    assert same_sign.min() > 2 * REL_L2_TOL
    untilted, _ = _errors(reference, ptycore_patterns(projected, pixel_A), pixel_A)
    assert untilted.min() > 2 * REL_L2_TOL
