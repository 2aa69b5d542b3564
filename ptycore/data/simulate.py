"""Simulated 4D-STEM datasets with an independent simulator (abTEM), plus the ground truth.

What is simulated
-----------------
A perfect crystal (default SrTiO3 viewed along [001]) ``cells_z`` unit cells thick, scanned
by a probe on a regular grid, recorded on an ``N x N`` pixelated detector.

Geometry. abTEM's waves are periodic over the potential's cell, so the angular size of one
detector pixel is ``lambda / L`` for a cell of lateral extent ``L``. The lateral tiling
``k = round(lambda / (a * detector_pixel_rad))`` unit cells makes ``L = k a`` approximate the
requested detector pixel; the achieved pixel ``lambda / (k a)`` is what the metadata records.
Because the crystal is periodic, a probe at any scan position sees exactly what it would see
in an infinite crystal (positions beyond the cell wrap around onto identical surroundings).
abTEM runs on a finer grid of ``G >= 2.19 N`` points (so that the central ``N x N`` crop of
each pattern lies inside abTEM's tapered 2/3 anti-aliasing aperture, corners included, and
the real-space sampling is at most 0.1 Å); each pattern is then cropped to its central
``N x N`` pixels with zero frequency at index ``N // 2``. The reconstruction's real-space
pixel is ``lambda / (N detector_pixel_rad) = k a / N``.

Frames. Everything here is (y, x); abTEM's arrays are [x, y] and are transposed once, where
they come out of abTEM. The *scan frame* has the centre of the probe at scan position index
(0, 0) at (0, 0) Å and the probe at index (iy, ix) at ``(iy * dy, ix * dx)`` Å. In the
crystal, scan position (0, 0) is the corner of the unit cell (an Sr column for SrTiO3).

Slicing. The atoms are shifted by ``z_offset_frac * a`` along the beam so that atomic layers
lie inside slices, not on slice boundaries, for the default slice thicknesses (the projection
is 'infinite', so this shift changes nothing else).

Truth. ``object_phase[0, s] = sigma(kV) * V_s`` where ``V_s`` is abTEM's projected potential
(V Å) of truth slice ``s``, computed on the fine grid and band-limited to the reconstruction
grid by Fourier cropping (exact for the periodic cell), then tiled periodically over a field
of view that covers every probe window of the scan (the scanned area plus half a window and
one pixel on each side). Truth pixel ``(j, i)`` is the sample at
``origin_A + (j, i) * pixel_size_A`` in the scan frame, with ``origin_A = -(N//2 + 1) *
pixel_size_A`` in both directions; so probe position ``(iy, ix)`` is at
``(iy * dy, ix * dx) - origin_A`` in the truth object's own frame (object pixel (0, 0) at
0 Å, as ``ptycore.physics`` expects), which is what ``positions_A`` in ``truth.zarr`` holds.

Tilt. ``tilt_mrad = (ty, tx)`` is a crystal mistilt in ptycore's convention (the ``tilts_mrad``
of :func:`ptycore.physics.exit_waves`, Fresnel kernel ``exp(+2 pi i dz k.tan(theta))``). abTEM's
``Probe(tilt=...)`` is a *beam* tilt (x, y) with the opposite sign, so abTEM gets
``tilt=(-tx, -ty)`` (pinned by ``tests/test_vs_abtem.py``).

Counts. Each pattern is normalised to ``dose * dy * dx`` electrons (the electrons that land
on the detector for that position), then Poisson noise is drawn with a seeded
``numpy.random.Generator`` unless ``noise`` is off. The fraction of the incident intensity
that fell on the detector before this normalisation is recorded in the provenance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ptycore.errors import InvalidArgument, MissingDependency
from ptycore.physics.electron import sigma_per_V_A, wavelength_A

#: abTEM's anti-aliasing aperture: cutoff 2/3 of Nyquist with a cosine taper 0.01/sampling wide,
#: i.e. fully open out to ``G * (1/3 - 0.01)`` pixels of a ``G``-point grid.
_ABTEM_OPEN_RADIUS_PER_GPT = 0.6666666 / 2 - 0.01
#: finest real-space sampling (Å) the abTEM grid is allowed to be coarser than
_MAX_SIM_SAMPLING_A = 0.1


@dataclass(frozen=True)
class Crystal:
    """A crystal with a square (a = b) cell in the xy plane whose zone axis is along z."""

    name: str
    lattice_A: tuple[float, float, float]  # cell (a, b, c) along (x, y, z)
    zone_axis: tuple[int, int, int]
    z_offset_frac: float  # shift of the atoms along z, in units of c, to keep layers off slice boundaries
    build: Callable[[], object]  # returns an ase.Atoms unit cell
    notes: str = ""


def _srtio3():
    import ase

    a = 3.905
    return ase.Atoms(
        "SrTiO3",
        scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
        cell=[a, a, a],
        pbc=True,
    )


def _si():
    from ase.build import bulk

    return bulk("Si", "diamond", a=5.431, cubic=True)


#: known crystals: name -> Crystal (layers at z = 0, c/2 for SrTiO3; every c/4 for Si)
CRYSTALS: dict[str, Crystal] = {
    "SrTiO3": Crystal("SrTiO3", (3.905, 3.905, 3.905), (0, 0, 1), 0.25, _srtio3,
                      "perovskite: Sr at the cell corner, Ti at the body centre, O at the face centres"),
    "Si": Crystal("Si", (5.431, 5.431, 5.431), (0, 0, 1), 0.125, _si, "diamond cubic, conventional cell"),
}


@dataclass
class SimulationParams:
    """Everything that defines a simulated dataset (units in the names; (y, x) order)."""

    crystal: str = "SrTiO3"
    cells_z: int = 1
    energy_kv: float = 300.0
    convergence_mrad: float = 21.4
    defocus_A: float = 150.0  # abTEM's sign: -C10, positive = underfocus
    C30_A: float = 0.0
    scan_shape: tuple[int, int] = (16, 16)
    scan_step_A: tuple[float, float] = (0.4, 0.4)
    detector_px: int = 64
    detector_pixel_mrad: float = 1.25  # requested; the achieved value is Geometry.detector_pixel_mrad
    dose_e_per_A2: float = 1e6
    noise: bool = True
    truth_slice_A: float | None = None  # default: one slice per unit cell (c)
    sim_slice_A: float | None = None  # default: c / 2
    seed: int = 0
    tilt_mrad: tuple[float, float] = (0.0, 0.0)  # crystal mistilt (ty, tx), ptycore's convention

    def to_record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Geometry:
    """Derived sampling: computed from the parameters by arithmetic only (no simulation)."""

    wavelength_A: float
    tiles: int  # unit cells across the periodic window, in x and y
    detector_px: int
    window_A: float  # k * a: the lateral extent of abTEM's cell = the probe window
    detector_pixel_mrad: float  # achieved
    pixel_size_A: float  # reconstruction grid: window_A / N
    sim_gpts: int  # abTEM grid points across the window
    thickness_A: float
    sim_slices: int
    truth_slices: int
    truth_shape: tuple[int, int]  # (Hy, Wx)
    origin_A: tuple[float, float]  # scan-frame (y, x) of truth pixel [0, 0]
    notes: tuple[str, ...] = field(default=())

    @property
    def sim_slice_A(self) -> float:
        return self.thickness_A / self.sim_slices

    @property
    def truth_slice_A(self) -> float:
        return self.thickness_A / self.truth_slices

    @property
    def max_detector_mrad(self) -> float:
        """Largest angle along the detector's axes, from the centre to the edge."""
        return self.detector_pixel_mrad * (self.detector_px // 2)


def _smooth_size(n: int) -> int:
    """Smallest even number >= n whose only prime factors are 2, 3, 5, 7 (fast FFTs)."""
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def _positive(name: str, value) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be > 0 and finite, got {value}")


def plan_geometry(p: SimulationParams) -> Geometry:
    """Validate ``p`` and derive the sampling. Raises :class:`InvalidArgument` naming the option."""
    if p.crystal not in CRYSTALS:
        raise InvalidArgument(f"--crystal {p.crystal!r} is not known (known crystals: {', '.join(CRYSTALS)})")
    crystal = CRYSTALS[p.crystal]
    _positive("--energy-kv", p.energy_kv)
    _positive("--convergence-mrad", p.convergence_mrad)
    _positive("--detector-pixel-mrad", p.detector_pixel_mrad)
    if not math.isfinite(p.defocus_A):
        raise InvalidArgument(f"--defocus-A must be finite, got {p.defocus_A}")
    if not math.isfinite(p.C30_A):
        raise InvalidArgument(f"--C30-A must be finite, got {p.C30_A}")
    if not math.isfinite(p.dose_e_per_A2) or p.dose_e_per_A2 <= 0:
        raise InvalidArgument(f"--dose must be a finite number of e/Å² > 0, got {p.dose_e_per_A2} "
                              "(use --no-noise for noise-free patterns)")
    if len(p.scan_shape) != 2 or min(p.scan_shape) < 1:
        raise InvalidArgument(f"--scan-shape must be two integers >= 1, got {list(p.scan_shape)}")
    if len(p.scan_step_A) != 2 or not all(math.isfinite(s) and s > 0 for s in p.scan_step_A):
        raise InvalidArgument(f"--scan-step-A must be > 0 Å, got {list(p.scan_step_A)}")
    if p.detector_px < 8:
        raise InvalidArgument(f"--detector-px must be >= 8, got {p.detector_px}")
    if p.cells_z < 1:
        raise InvalidArgument(f"--cells-z must be >= 1, got {p.cells_z}")
    if len(p.tilt_mrad) != 2 or not all(math.isfinite(t) and abs(t) < 200 for t in p.tilt_mrad):
        raise InvalidArgument(f"--tilt-mrad must be two small angles (|tilt| < 200 mrad), got {list(p.tilt_mrad)}")
    if p.energy_kv > 2000:
        raise InvalidArgument(f"--energy-kv must be <= 2000, got {p.energy_kv}")

    a, _, c = crystal.lattice_A
    thickness = p.cells_z * c
    notes: list[str] = []

    def n_slices(option: str, requested: float | None, default: float) -> int:
        value = default if requested is None else requested
        _positive(option, value)
        if value > thickness * (1 + 1e-9):
            raise InvalidArgument(f"{option} {value} Å is thicker than the crystal ({thickness:.4g} Å)")
        n = max(1, round(thickness / value))
        if requested is not None and abs(thickness / n - value) > 1e-6 * value:
            notes.append(f"{option} {value} Å does not divide the {thickness:.4g} Å crystal: "
                         f"using {n} slices of {thickness / n:.6g} Å")
        return n

    sim_slices = n_slices("--sim-slice-A", p.sim_slice_A, c / 2)
    truth_slices = n_slices("--truth-slice-A", p.truth_slice_A, c)

    lam = wavelength_A(p.energy_kv)
    det_rad = p.detector_pixel_mrad * 1e-3
    tiles = max(1, round(lam / (a * det_rad)))
    window = tiles * a
    achieved = lam / window * 1e3
    if abs(achieved - p.detector_pixel_mrad) > 0.01 * p.detector_pixel_mrad:
        notes.append(f"detector pixel is {achieved:.4g} mrad, not the requested {p.detector_pixel_mrad:g} mrad: "
                     f"the periodic window must hold a whole number of unit cells ({tiles} x {a} Å)")
    n = p.detector_px
    max_mrad = (n // 2) * achieved
    if p.convergence_mrad >= max_mrad:
        raise InvalidArgument(f"--convergence-mrad {p.convergence_mrad} is beyond the detector's maximum angle "
                              f"{max_mrad:.4g} mrad (--detector-px {n} x {achieved:.4g} mrad / 2)")
    corner_radius_px = math.sqrt(2) * (n // 2 + 1)
    sim_gpts = _smooth_size(max(math.ceil(corner_radius_px / _ABTEM_OPEN_RADIUS_PER_GPT),
                                math.ceil(window / _MAX_SIM_SAMPLING_A)))
    pixel = window / n
    probe_radius_A = abs(p.defocus_A) * p.convergence_mrad * 1e-3
    if 2 * probe_radius_A > 0.8 * window:
        notes.append(f"the defocused probe (diameter ~{2 * probe_radius_A:.3g} Å) nearly fills the "
                     f"{window:.3g} Å window: expect aliasing; use a finer --detector-pixel-mrad")

    margin = n // 2 + 1
    span = [(s - 1) * d for s, d in zip(p.scan_shape, p.scan_step_A, strict=True)]
    truth_shape = tuple(int(math.ceil(sp / pixel - 1e-9)) + n + 2 for sp in span)
    origin = (-margin * pixel, -margin * pixel)
    return Geometry(lam, tiles, n, window, achieved, pixel, sim_gpts, thickness, sim_slices, truth_slices,
                    truth_shape, origin, tuple(notes))


def _import_abtem():
    try:
        import abtem  # noqa: F401
        import ase  # noqa: F401
    except ImportError as err:
        raise MissingDependency(
            f"simulate needs abTEM and ASE ({err.name} is not installed): pip install 'ptycore[sim]'"
        ) from None
    import abtem

    return abtem


def _abtem_config(abtem):
    return abtem.config.set({"device": "cpu", "precision": "float32", "fft": "numpy",
                             "diagnostics.progress_bar": False})


def crystal_atoms(p: SimulationParams, g: Geometry):
    """ase.Atoms of the ``tiles x tiles x cells_z`` block, atoms shifted along z off slice boundaries."""
    crystal = CRYSTALS[p.crystal]
    atoms = crystal.build() * (g.tiles, g.tiles, p.cells_z)
    atoms.positions[:, 2] += crystal.z_offset_frac * crystal.lattice_A[2]
    return atoms


def _fourier_crop(array: np.ndarray, n: int) -> np.ndarray:
    """Band-limit periodic real ``array`` (..., G, G) to (..., n, n) samples of the same cell."""
    g = array.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fft2(array.astype(np.float64)), axes=(-2, -1))
    start = g // 2 - n // 2
    cropped = spectrum[..., start : start + n, start : start + n]
    # for even n the first row/column holds -n/2 only; taking the real part shares it with +n/2
    return np.fft.ifft2(np.fft.ifftshift(cropped, axes=(-2, -1))).real * (n * n) / (g * g)


def truth_cell_phase(p: SimulationParams, g: Geometry, abtem=None) -> np.ndarray:
    """sigma * projected potential of each truth slice over one periodic cell: (slices, N, N), (y, x)."""
    abtem = abtem or _import_abtem()
    with _abtem_config(abtem):
        potential = abtem.Potential(crystal_atoms(p, g), gpts=(g.sim_gpts, g.sim_gpts),
                                    slice_thickness=(g.truth_slice_A,) * g.truth_slices, projection="infinite")
        projected = np.asarray(potential.build(lazy=False).array, dtype=np.float64)  # (slices, x, y) in V Å
    projected = projected.transpose(0, 2, 1)
    return (sigma_per_V_A(p.energy_kv) * _fourier_crop(projected, p.detector_px)).astype(np.float32)


def tile_truth(cell: np.ndarray, g: Geometry) -> np.ndarray:
    """Tile a periodic cell (..., N, N) over the truth field of view starting at ``origin_A``."""
    n = cell.shape[-1]
    j0 = round(g.origin_A[0] / g.pixel_size_A)
    i0 = round(g.origin_A[1] / g.pixel_size_A)
    rows = (j0 + np.arange(g.truth_shape[0])) % n
    cols = (i0 + np.arange(g.truth_shape[1])) % n
    return cell[..., rows[:, None], cols[None, :]]


@dataclass
class SimulatedDataset:
    patterns: np.ndarray  # (ny, nx, N, N) float32, zero frequency at N // 2
    object_phase: np.ndarray  # (1, slices, Hy, Wx) float32
    probe: np.ndarray  # (1, N, N) complex64 on the reconstruction grid, |.|^2 sums to dose*dy*dx
    positions_A: np.ndarray  # (n_pos, 2) probe centres in the truth object's frame
    geometry: Geometry
    params: SimulationParams
    detector_fraction: tuple[float, float, float]  # min, mean, max incident fraction on the detector
    seconds: float


def scan_positions_A(p: SimulationParams) -> np.ndarray:
    """Probe centres (ny, nx, 2) as (y, x) in the scan frame: (iy * dy, ix * dx)."""
    iy, ix = np.meshgrid(np.arange(p.scan_shape[0]), np.arange(p.scan_shape[1]), indexing="ij")
    return np.stack([iy * p.scan_step_A[0], ix * p.scan_step_A[1]], axis=-1).astype(np.float64)


def simulate(p: SimulationParams, g: Geometry | None = None, *, progress: Callable[[str], None] | None = None
             ) -> SimulatedDataset:
    """Run abTEM for ``p``: noisy (or expected) patterns, the truth object and the probe."""
    g = g or plan_geometry(p)
    abtem = _import_abtem()
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    n = p.detector_px
    ny, nx = p.scan_shape
    dy, dx = p.scan_step_A
    ty, tx = p.tilt_mrad
    with _abtem_config(abtem):
        potential = abtem.Potential(crystal_atoms(p, g), gpts=(g.sim_gpts, g.sim_gpts),
                                    slice_thickness=(g.sim_slice_A,) * g.sim_slices, projection="infinite")
        aberrations = {"C30": p.C30_A} if p.C30_A else {}
        probe = abtem.Probe(semiangle_cutoff=p.convergence_mrad, energy=p.energy_kv * 1e3, defocus=p.defocus_A,
                            tilt=(-tx, -ty), **aberrations)
        # GridScan works in abTEM's (x, y): positions start + (ix * dx, iy * dy)
        scan = abtem.GridScan(start=(0.0, 0.0), end=(nx * dx, ny * dy), gpts=(nx, ny), endpoint=False)
        exit_waves = probe.multislice(potential, scan=scan, lazy=True)
        patterns_full = exit_waves.diffraction_patterns(max_angle="full", fftshift=True)
        g_sim = g.sim_gpts
        start = g_sim // 2 - n // 2
        total = patterns_full.array.sum(axis=(-2, -1))
        crop = patterns_full.array[..., start : start + n, start : start + n]
        say(f"multislice: {nx * ny} positions, {g_sim}x{g_sim} grid, {g.sim_slices} slices")
        import dask

        crop, total = dask.compute(crop, total)
        probe_window = abtem.Probe(semiangle_cutoff=p.convergence_mrad, energy=p.energy_kv * 1e3,
                                   defocus=p.defocus_A, gpts=(n, n), extent=(g.window_A, g.window_A), **aberrations)
        centre = (n // 2) * g.pixel_size_A
        probe_wave = np.asarray(probe_window.build(scan=np.array([[centre, centre]]), lazy=False).array)
    crop = np.asarray(crop, dtype=np.float64).reshape(nx, ny, n, n).transpose(1, 0, 3, 2)  # -> (ny, nx, ky, kx)
    total = np.asarray(total, dtype=np.float64).reshape(nx, ny).T
    kept = crop.sum(axis=(-2, -1))
    fraction = kept / total
    electrons = p.dose_e_per_A2 * dy * dx
    expected = crop * (electrons / kept)[..., None, None]
    if p.noise:
        rng = np.random.default_rng(p.seed)
        patterns = rng.poisson(expected).astype(np.float32)
    else:
        patterns = expected.astype(np.float32)

    say(f"truth: {g.truth_slices} slice(s) of {g.truth_slice_A:.4g} Å on a {g.truth_shape} field of view")
    cell = truth_cell_phase(p, g, abtem)
    object_phase = tile_truth(cell, g)[None].astype(np.float32)

    probe_yx = probe_wave.reshape(n, n).T.astype(np.complex128)
    probe_yx *= np.sqrt(electrons / np.sum(np.abs(probe_yx) ** 2))
    positions = (scan_positions_A(p) - np.asarray(g.origin_A)).reshape(-1, 2)
    return SimulatedDataset(
        patterns=patterns,
        object_phase=object_phase,
        probe=probe_yx[None].astype(np.complex64),
        positions_A=positions.astype(np.float32),
        geometry=g,
        params=p,
        detector_fraction=(float(fraction.min()), float(fraction.mean()), float(fraction.max())),
        seconds=time.perf_counter() - t0,
    )


def acquisition_metadata(ds: SimulatedDataset):
    from ptycore.data.metadata import AcquisitionMetadata

    p, g = ds.params, ds.geometry
    crystal = CRYSTALS[p.crystal]
    return AcquisitionMetadata(
        energy_kv=p.energy_kv,
        convergence_mrad=p.convergence_mrad,
        scan_shape=tuple(p.scan_shape),
        scan_step_A=tuple(p.scan_step_A),
        detector_pixel_mrad=g.detector_pixel_mrad,
        defocus_A=p.defocus_A,
        aberrations={"C30": p.C30_A} if p.C30_A else {},
        dose_e_per_A2=p.dose_e_per_A2,
        thickness_A=g.thickness_A,
        sample={
            "crystal": p.crystal,
            "zone_axis": list(crystal.zone_axis),
            "lattice_A": list(crystal.lattice_A),
            "cells": [g.tiles, g.tiles, p.cells_z],
            "mistilt_mrad": list(p.tilt_mrad),
            "description": crystal.notes,
            "noise": "poisson" if p.noise else "none (expected counts)",
            "seed": p.seed,
        },
        instrument={"simulated_by": "ptycore simulate (abTEM multislice, projection 'infinite')",
                    "detector_px": p.detector_px},
    )


def write_dataset(ds: SimulatedDataset, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``patterns.h5``, ``meta.yaml`` and ``truth.zarr`` into ``out`` atomically."""
    import h5py

    from ptycore.data.metadata import dump_metadata
    from ptycore.store import atomic_output, create_store, provenance, write_array

    p, g = ds.params, ds.geometry
    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        with h5py.File(tmp / "patterns.h5", "w") as f:
            n = p.detector_px
            dset = f.create_dataset("patterns", data=ds.patterns, chunks=(1, p.scan_shape[1], n, n),
                                    compression="gzip", compression_opts=4, shuffle=True)
            dset.attrs["units"] = "electrons"
            dset.attrs["axes"] = "scan_y, scan_x, ky, kx (zero frequency at index N//2)"
        dump_metadata(acquisition_metadata(ds), tmp / "meta.yaml")
        store = create_store(tmp / "truth.zarr")
        phase = ds.object_phase
        write_array(store, "object_phase", phase, attrs={"units": "rad", "axes": "obj_modes, slices, y, x"})
        write_array(store, "object_phase_sum", phase[0].sum(axis=0),
                    attrs={"units": "rad", "axes": "y, x", "description": "object_phase summed over slices"})
        write_array(store, "probe", ds.probe,
                    attrs={"axes": "probe_modes, y, x", "description": "abTEM probe on the reconstruction grid, "
                           "centred at window pixel N//2, |probe|^2 summed = dose * dy * dx"})
        write_array(store, "positions_A", ds.positions_A,
                    attrs={"axes": "n_pos (scan_y-major), (y, x)", "frame": "truth object (pixel [0, 0] at 0 Å)"})
        store.attrs.update({
            "pixel_size_A": g.pixel_size_A,
            "slice_thickness_A": g.truth_slice_A,
            "origin_A": list(g.origin_A),
            "origin_frame": "scan frame (y, x) in Å of truth pixel [0, 0]; the probe of scan position index "
                            "(0, 0) is centred at (0, 0) and position (iy, ix) at (iy*dy, ix*dx)",
            "provenance": provenance(
                command="simulate",
                simulator="abTEM",
                parameters=p.to_record(),
                geometry=asdict(g),
                detector_fraction={"min": ds.detector_fraction[0], "mean": ds.detector_fraction[1],
                                   "max": ds.detector_fraction[2]},
                seeds={"poisson": p.seed if p.noise else None},
                seconds=ds.seconds,
            ),
        })
    return out
