"""Training data of the learned crystal prior: per-slice phase patches of many simulated crystals.

What a training example is
--------------------------
One ``patch_px x patch_px`` patch of ONE slice of a crystal's phase, ``sigma(E) * V_s(y, x)`` in
radians, where ``V_s`` is the projected potential (V Å) of the atoms whose centres lie in slice
``s`` (abTEM, ``projection="infinite"``, Lobato parametrisation) and ``sigma`` the interaction
parameter at the beam energy. That is exactly what a multislice reconstruction's
``object_phase[mode, s]`` holds, so the prior sees the objects it will be used on.

Physics choices (the defaults of :class:`PriorDataConfig`, recorded in every store)
-------------------------------------------------------------------------------------
* **Pixel 0.2 Å**: the object pixel of a reconstruction with a detector reaching ~2x the
  convergence angle of 20-30 mrad at 200-300 kV (``lambda / (N * detector pixel)``: 0.197 Å at
  300 kV for 64 px of 1.0 mrad). The pixel is exact: the periodic cell is tiled laterally to at
  least ``min_extent_A`` and then strained by less than half a pixel over its width (< 0.5 %,
  well inside the lattice jitter) so that it holds a whole number of 0.2 Å pixels.
* **Slices of 2 Å**: about one atomic layer of a low-index zone axis (the reconstruction's
  finest useful slicing; one slice per unit cell of SrTiO3 is 3.9 Å). The crystal block is cut
  into whole 2 Å slices from a random depth (the atoms are shifted along the beam by a random
  amount and wrapped), so slices hold whole layers, parts of layers, or two layers, as a
  reconstruction's slices do; the last partial slice is dropped.
* **300 kV** for ``sigma`` (6.5e-4 rad / (V Å)); the phase scales linearly with ``sigma``, which
  the store records (``sigma_rad_per_V_A``), so a prior can be rescaled to other energies.
* **Crystals**: bulk prototypes (:data:`PROTOTYPES`: fcc, bcc, hcp, diamond, rocksalt, zincblende,
  wurtzite, fluorite, CsCl, rutile, spinel, L1_2) over many elements and compounds
  (:data:`COMPOUNDS`), the lattice parameters jittered uniformly by ``±lattice_jitter``, up to
  three zone axes per crystal system (cubic [001], [011], [111]; tetragonal [001], [100], [110];
  hexagonal [0001], [2-1-10], [01-10]), each in an orthogonal periodic cell; ~1 % vacancies
  (each atom removed with probability ``vacancy_fraction``); a random lateral offset.
* **No perovskites.** Perovskites (SrTiO3 among them) are kept out of training for evaluation.
  :func:`refuse_perovskite` checks every generated structure (before vacancies) and raises
  :class:`~ptycore.errors.InvalidArgument` for a perovskite; it is part of the generator, not a
  promise of the compound table (see :func:`is_perovskite_composition` for the rule).

The store (``ptycore prior data --out DIR``, zarr v3)
-----------------------------------------------------
``patches`` (N, H, W) float32 radians, chunked by ``chunk_patches``; ``structure`` (N,) int32 (the
index of the structure in the manifest), ``slice`` (N,) int32, ``heldout`` (N,) bool; attributes
``manifest`` (one record per structure: id, prototype, formula, lattice_A, cell_A, zone_axis,
vacancy_fraction, atoms, seed, split, first/count of its patches), ``config`` (the validated
config), ``config_hash``, ``sigma_rad_per_V_A``, ``pixel_size_A``, ``slice_thickness_A``,
``phase_rms_rad`` (RMS of the training patches: the prior's phase scale) and ``provenance``.
The held-out split is by compound: every structure of a held-out compound (all its zone axes and
jittered variants) is held out, so held-out losses are on materials the prior never saw.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ptycore.errors import InvalidArgument

# ---------------------------------------------------------------- the config


class PriorDataConfig(BaseModel):
    """``config/prior/default.yaml``: everything that defines a training data set."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="master seed: every structure's seed derives from it")
    energy_kv: float = Field(default=300.0, gt=0, le=2000, description="beam energy for sigma (kV)")
    pixel_size_A: float = Field(default=0.2, gt=0.02, le=2.0, description="object pixel (Å), exact")
    slice_thickness_A: float = Field(default=2.0, gt=0.2, le=50.0, description="slice thickness (Å)")
    patch_px: int = Field(default=64, ge=8, le=1024, description="patch side in pixels, a multiple of 8")
    prototypes: list[str] | None = Field(default=None, description="prototypes to use (default: all)")
    compounds_per_prototype: int | None = Field(default=None, ge=1, description="first N compounds of each")
    zone_axes: int = Field(default=3, ge=1, le=3, description="zone axes per crystal (first N of its system)")
    variants: int = Field(default=2, ge=1, description="jittered copies of each compound x zone axis")
    slices_per_structure: int = Field(default=4, ge=1, description="slices kept per structure")
    patches_per_slice: int = Field(default=2, ge=1, description="random patches cut from each kept slice")
    lattice_jitter: float = Field(default=0.03, ge=0, lt=0.2, description="uniform ± relative jitter")
    vacancy_fraction: float = Field(default=0.01, ge=0, lt=0.5, description="probability an atom is removed")
    min_extent_A: float = Field(default=20.0, gt=0, le=200.0, description="lateral cell at least this (Å)")
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1, description="fraction of compounds held out")
    chunk_patches: int = Field(default=256, ge=1, description="patches per zarr chunk")

    @field_validator("patch_px")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (the U-Net halves it three times)")
        return value

    @field_validator("prototypes")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must name at least one prototype")
        unknown = [name for name in value if name not in PROTOTYPES]
        if unknown and "perovskite" in unknown[0].lower():
            raise ValueError(f"{unknown[0]!r}: perovskites are excluded from the prior's training data (they are "
                             "held out for evaluation)")
        if unknown:
            raise ValueError(f"unknown prototype {unknown[0]!r} (known: {', '.join(PROTOTYPES)})")
        return value

    def hash(self) -> str:
        return "sha256:" + hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


def load_data_config(path: str | Path | None) -> PriorDataConfig:
    """The validated config (defaults for None); a bad file or value -> one line naming file and key."""
    from ptycore.data.preprocess import load_config

    return load_config(path, PriorDataConfig)


# ---------------------------------------------------------------- perovskites: the excluded family
#: anions of perovskite-type ABX3 compounds (oxides, halides, nitrides, chalcogenides, hydrides)
PEROVSKITE_ANIONS = frozenset({"O", "F", "Cl", "Br", "I", "N", "S", "Se", "H"})


def is_perovskite_composition(symbols) -> bool:
    """True for the compositions of the perovskite family, whatever the cell, orientation, tilts
    or distortions (cubic SrTiO3, tetragonal PbTiO3, orthorhombic CaTiO3, rhombohedral LaAlO3):

    * ABX3: three elements in the ratio 1:1:3, the majority one an anion (O, F, Cl, Br, I, N,
      S, Se, H), or
    * A2BB'X6 (double perovskites): four elements in the ratio 2:1:1:6 with an anion majority.

    The fractions are compared with a tolerance of 0.03, so vacancies or a small substitution do
    not hide a perovskite. The rule is on the composition, not the structure: it also refuses
    non-perovskite ABX3 compounds (e.g. ilmenite FeTiO3), which is the safe side for keeping
    the evaluation materials unseen."""
    symbols = list(symbols)
    if not symbols:
        return False
    elements, counts = np.unique(np.asarray(symbols), return_counts=True)
    order = np.argsort(counts)
    fractions = counts[order] / counts.sum()
    majority = str(elements[order[-1]])
    if majority not in PEROVSKITE_ANIONS:
        return False
    for pattern in ((1, 1, 3), (1, 1, 2, 6)):
        if len(fractions) == len(pattern):
            target = np.asarray(pattern, float) / sum(pattern)
            if np.all(np.abs(fractions - target) < 0.03):
                return True
    return False


def refuse_perovskite(atoms, where: str) -> None:
    """Raise :class:`InvalidArgument` if ``atoms`` (ase.Atoms) is a perovskite: perovskites are
    evaluation materials and must never enter the prior's training data."""
    if is_perovskite_composition(atoms.get_chemical_symbols()):
        raise InvalidArgument(f"{where}: {atoms.get_chemical_formula(empirical=True)} is a perovskite; perovskites "
                              "are held out of the prior's training data for evaluation")


# ---------------------------------------------------------------- prototypes and compounds
def _bulk(kind: str, formula: str = "{}") -> Callable:
    """An ``ase.build.bulk`` prototype; ``formula`` makes the name from the species (e.g. "{}{}2")."""
    def build(species: tuple[str, ...], lattice: dict):
        from ase.build import bulk

        return bulk(formula.format(*species), kind, cubic=kind not in ("hcp", "wurtzite"), **lattice)
    return build


def _rutile(species, lattice):
    from ase.spacegroup import crystal

    a, c, u = lattice["a"], lattice["c"], lattice.get("u", 0.305)
    return crystal(list(species), basis=[(0, 0, 0), (u, u, 0)], spacegroup=136, cellpar=[a, a, c, 90, 90, 90])


def _spinel(species, lattice):
    from ase.spacegroup import crystal

    a, u = lattice["a"], lattice.get("u", 0.2625)
    return crystal(list(species), basis=[(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (u, u, u)], spacegroup=227,
                   setting=2, cellpar=[a, a, a, 90, 90, 90])


def _l12(species, lattice):
    import ase

    a = lattice["a"]
    return ase.Atoms([species[0]] + [species[1]] * 3,
                     scaled_positions=[(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                     cell=[a, a, a], pbc=True)


@dataclass(frozen=True)
class Prototype:
    system: Literal["cubic", "tetragonal", "hexagonal"]
    build: Callable  # (species, lattice dict) -> ase.Atoms conventional cell
    description: str


PROTOTYPES: dict[str, Prototype] = {
    "fcc": Prototype("cubic", _bulk("fcc"), "face-centred cubic metal"),
    "bcc": Prototype("cubic", _bulk("bcc"), "body-centred cubic metal"),
    "hcp": Prototype("hexagonal", _bulk("hcp"), "hexagonal close-packed metal"),
    "diamond": Prototype("cubic", _bulk("diamond"), "diamond cubic"),
    "rocksalt": Prototype("cubic", _bulk("rocksalt", "{}{}"), "NaCl type"),
    "zincblende": Prototype("cubic", _bulk("zincblende", "{}{}"), "sphalerite, ZnS type"),
    "wurtzite": Prototype("hexagonal", _bulk("wurtzite", "{}{}"), "hexagonal ZnS type"),
    "fluorite": Prototype("cubic", _bulk("fluorite", "{}{}2"), "CaF2 type"),
    "cesium_chloride": Prototype("cubic", _bulk("cesiumchloride", "{}{}"), "CsCl (B2) type"),
    "rutile": Prototype("tetragonal", _rutile, "TiO2 rutile type"),
    "spinel": Prototype("cubic", _spinel, "MgAl2O4 normal spinel"),
    "l12": Prototype("cubic", _l12, "Cu3Au (L1_2) ordered alloy"),
}

#: prototype -> [(species, lattice parameters in Å (and internal u))], room-temperature literature values
COMPOUNDS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "fcc": [(("Cu",), {"a": 3.615}), (("Ag",), {"a": 4.086}), (("Au",), {"a": 4.078}), (("Al",), {"a": 4.050}),
            (("Ni",), {"a": 3.524}), (("Pd",), {"a": 3.891}), (("Pt",), {"a": 3.924}), (("Pb",), {"a": 4.950}),
            (("Ir",), {"a": 3.839}), (("Rh",), {"a": 3.803}), (("Ca",), {"a": 5.588}), (("Sr",), {"a": 6.084})],
    "bcc": [(("Fe",), {"a": 2.866}), (("W",), {"a": 3.165}), (("Mo",), {"a": 3.147}), (("Cr",), {"a": 2.910}),
            (("V",), {"a": 3.030}), (("Nb",), {"a": 3.300}), (("Ta",), {"a": 3.303}), (("Ba",), {"a": 5.028}),
            (("Na",), {"a": 4.291}), (("Eu",), {"a": 4.581})],
    "hcp": [(("Mg",), {"a": 3.209, "c": 5.211}), (("Ti",), {"a": 2.951, "c": 4.686}),
            (("Zn",), {"a": 2.665, "c": 4.947}), (("Zr",), {"a": 3.232, "c": 5.147}),
            (("Co",), {"a": 2.507, "c": 4.070}), (("Cd",), {"a": 2.979, "c": 5.619}),
            (("Hf",), {"a": 3.195, "c": 5.051}), (("Ru",), {"a": 2.706, "c": 4.282}),
            (("Re",), {"a": 2.761, "c": 4.456}), (("Os",), {"a": 2.734, "c": 4.317})],
    "diamond": [(("C",), {"a": 3.567}), (("Si",), {"a": 5.431}), (("Ge",), {"a": 5.658}), (("Sn",), {"a": 6.489})],
    "rocksalt": [(("Na", "Cl"), {"a": 5.640}), (("Mg", "O"), {"a": 4.212}), (("Ni", "O"), {"a": 4.177}),
                 (("Pb", "S"), {"a": 5.936}), (("K", "Cl"), {"a": 6.293}), (("Li", "F"), {"a": 4.027}),
                 (("Ca", "O"), {"a": 4.811}), (("Ti", "N"), {"a": 4.242}), (("Zr", "C"), {"a": 4.698}),
                 (("Ba", "O"), {"a": 5.523}), (("Ag", "Br"), {"a": 5.774}), (("Pb", "Te"), {"a": 6.462})],
    "zincblende": [(("Ga", "As"), {"a": 5.653}), (("Zn", "S"), {"a": 5.409}), (("In", "P"), {"a": 5.869}),
                   (("Cd", "Te"), {"a": 6.482}), (("Ga", "P"), {"a": 5.451}), (("Al", "As"), {"a": 5.661}),
                   (("In", "As"), {"a": 6.058}), (("Si", "C"), {"a": 4.360}), (("Zn", "Se"), {"a": 5.668}),
                   (("Cu", "Cl"), {"a": 5.420}), (("In", "Sb"), {"a": 6.479})],
    "wurtzite": [(("Zn", "O"), {"a": 3.250, "c": 5.207, "u": 0.382}),
                 (("Ga", "N"), {"a": 3.189, "c": 5.185, "u": 0.377}),
                 (("Al", "N"), {"a": 3.112, "c": 4.982, "u": 0.382}),
                 (("Zn", "S"), {"a": 3.821, "c": 6.257, "u": 0.375}),
                 (("Cd", "S"), {"a": 4.136, "c": 6.714, "u": 0.377}),
                 (("In", "N"), {"a": 3.545, "c": 5.703, "u": 0.379}),
                 (("Cd", "Se"), {"a": 4.300, "c": 7.011, "u": 0.376})],
    "fluorite": [(("Ca", "F"), {"a": 5.463}), (("Ce", "O"), {"a": 5.411}), (("Zr", "O"), {"a": 5.070}),
                 (("U", "O"), {"a": 5.470}), (("Th", "O"), {"a": 5.597}), (("Ba", "F"), {"a": 6.200}),
                 (("Sr", "F"), {"a": 5.800}), (("Hf", "O"), {"a": 5.115})],
    "cesium_chloride": [(("Cs", "Cl"), {"a": 4.123}), (("Cs", "Br"), {"a": 4.286}), (("Ni", "Al"), {"a": 2.887}),
                        (("Cu", "Zn"), {"a": 2.950}), (("Fe", "Al"), {"a": 2.909}), (("Cs", "I"), {"a": 4.567}),
                        (("Ti", "Ni"), {"a": 3.015})],
    "rutile": [(("Ti", "O"), {"a": 4.594, "c": 2.959, "u": 0.305}),
               (("Sn", "O"), {"a": 4.737, "c": 3.186, "u": 0.307}),
               (("Mn", "O"), {"a": 4.398, "c": 2.873, "u": 0.305}),
               (("Ru", "O"), {"a": 4.492, "c": 3.106, "u": 0.306}),
               (("Ir", "O"), {"a": 4.498, "c": 3.154, "u": 0.308}),
               (("Ge", "O"), {"a": 4.395, "c": 2.859, "u": 0.306}),
               (("Pb", "O"), {"a": 4.955, "c": 3.383, "u": 0.307}),
               (("Mg", "F"), {"a": 4.623, "c": 3.052, "u": 0.303})],
    "spinel": [(("Mg", "Al", "O"), {"a": 8.083, "u": 0.2624}), (("Zn", "Fe", "O"), {"a": 8.441, "u": 0.2610}),
               (("Co", "Al", "O"), {"a": 8.105, "u": 0.2640}), (("Ni", "Fe", "O"), {"a": 8.339, "u": 0.2570}),
               (("Mg", "Cr", "O"), {"a": 8.333, "u": 0.2610}), (("Zn", "Al", "O"), {"a": 8.086, "u": 0.2636})],
    "l12": [(("Au", "Cu"), {"a": 3.748}), (("Al", "Ni"), {"a": 3.567}), (("Pt", "Cu"), {"a": 3.700}),
            (("Sn", "Pd"), {"a": 3.980}), (("Ga", "Pt"), {"a": 3.890})],
}

#: crystal system -> [(zone axis label, rows of the integer matrix P: new lattice vectors in
#: terms of the conventional ones; the third row is the beam direction)]
ZONE_AXES: dict[str, list[tuple[str, tuple]]] = {
    "cubic": [("[001]", ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
              ("[011]", ((1, 0, 0), (0, 1, -1), (0, 1, 1))),
              ("[111]", ((1, -1, 0), (1, 1, -2), (1, 1, 1)))],
    "tetragonal": [("[001]", ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
                   ("[100]", ((0, 1, 0), (0, 0, 1), (1, 0, 0))),
                   ("[110]", ((0, 0, 1), (1, -1, 0), (1, 1, 0)))],
    "hexagonal": [("[0001]", ((1, 0, 0), (1, 2, 0), (0, 0, 1))),
                  ("[2-1-10]", ((1, 2, 0), (0, 0, 1), (1, 0, 0))),
                  ("[01-10]", ((0, 0, 1), (1, 0, 0), (1, 2, 0)))],
}


# ---------------------------------------------------------------- one structure
@dataclass(frozen=True)
class StructureSpec:
    """One structure of the data set: what the manifest records (and all that is needed to rebuild it)."""

    index: int
    prototype: str
    species: tuple[str, ...]
    lattice: dict  # jittered conventional lattice parameters (Å; u internal)
    zone_axis: str
    seed: int
    heldout: bool


def _orthogonal_supercell(atoms, rows) -> object:
    """The supercell whose lattice vectors are ``rows @ cell``, rotated so they lie along x, y, z."""
    from ase.build import make_supercell

    P = np.asarray(rows, dtype=int)
    if np.linalg.det(P) < 0:
        P = P.copy()
        P[0] *= -1
    vectors = P @ np.asarray(atoms.cell)
    lengths = np.linalg.norm(vectors, axis=1)
    gram = (vectors @ vectors.T) / np.outer(lengths, lengths)
    if not np.allclose(gram, np.eye(3), atol=1e-6):
        raise InvalidArgument(f"zone axis matrix {P.tolist()} does not give an orthogonal cell for this crystal")
    sc = make_supercell(atoms, P, wrap=True)
    rotation = vectors / lengths[:, None]  # rows: unit vectors of the new axes
    sc.positions = sc.positions @ rotation.T
    sc.set_cell(np.diag(lengths), scale_atoms=False)
    sc.wrap()
    return sc


def build_structure(spec: StructureSpec, cfg: PriorDataConfig, *, prototype: Prototype | None = None,
                    check: bool = True):
    """The oriented, tiled, offset crystal block of ``spec`` (ase.Atoms), its vacancies made.

    ``check`` (the training generator always) refuses a perovskite; evaluation renders pass False
    and their own ``prototype``. Returns (atoms, record) with what the manifest keeps about it."""
    rng = np.random.default_rng(spec.seed)
    proto = prototype or PROTOTYPES[spec.prototype]
    cell = proto.build(spec.species, spec.lattice)
    where = f"structure {spec.index} ({spec.prototype} {'-'.join(spec.species)})"
    if check:
        refuse_perovskite(cell, where)
    rows = dict(ZONE_AXES[proto.system])[spec.zone_axis]
    block = _orthogonal_supercell(cell, rows)
    lx, ly, lz = np.diag(np.asarray(block.cell))
    needed_z = (cfg.slices_per_structure + 1) * cfg.slice_thickness_A  # +1: room for the random depth offset
    reps = (max(1, math.ceil(cfg.min_extent_A / lx)), max(1, math.ceil(cfg.min_extent_A / ly)),
            max(1, math.ceil(needed_z / lz)))
    block = block * reps
    # exact pixel size: strain x and y by < half a pixel over the width
    extent = np.diag(np.asarray(block.cell)).copy()
    pixels = np.maximum(1, np.round(extent[:2] / cfg.pixel_size_A)).astype(int)
    target = extent.copy()
    target[:2] = pixels * cfg.pixel_size_A
    block.set_cell(np.diag(target), scale_atoms=True)
    strain = target[:2] / extent[:2] - 1
    # random lateral offset and depth offset (wrapped: the block is periodic)
    shift = rng.uniform(0, 1, 3) * target
    block.positions = block.positions + shift
    block.wrap()
    if check:
        refuse_perovskite(block, where)
    keep = rng.random(len(block)) >= cfg.vacancy_fraction
    if keep.sum() == 0:
        keep[0] = True
    vacancies = int((~keep).sum())
    block = block[keep]
    record = {"formula": cell.get_chemical_formula(empirical=True),
              "cell_A": [round(float(v), 5) for v in target], "repetitions": list(reps),
              "strain_xy": [round(float(s), 6) for s in strain], "atoms": len(block), "vacancies": vacancies,
              "vacancy_fraction": round(vacancies / (len(block) + vacancies), 6)}
    return block, record


def render_slices(atoms, cfg: PriorDataConfig) -> np.ndarray:
    """sigma * projected potential of every whole slice of ``atoms``: (slices, Ny, Nx) float32 rad, (y, x).

    The cell is periodic with a whole number of ``pixel_size_A`` pixels; the last partial slice
    along the beam is dropped."""
    from ptycore.data.simulate import _abtem_config, _import_abtem
    from ptycore.physics.electron import sigma_per_V_A

    abtem = _import_abtem()
    lx, ly, lz = np.diag(np.asarray(atoms.cell))
    gpts = (round(lx / cfg.pixel_size_A), round(ly / cfg.pixel_size_A))
    n_whole = int(math.floor(lz / cfg.slice_thickness_A + 1e-9))
    if n_whole < 1:
        raise InvalidArgument(f"the block ({lz:.3g} Å) is thinner than one {cfg.slice_thickness_A} Å slice")
    thicknesses = [cfg.slice_thickness_A] * n_whole
    rest = lz - n_whole * cfg.slice_thickness_A
    if rest > 1e-6:
        thicknesses.append(rest)
    with _abtem_config(abtem):
        potential = abtem.Potential(atoms, gpts=gpts, slice_thickness=tuple(thicknesses), projection="infinite",
                                    parametrization="lobato")
        projected = np.asarray(potential.build(lazy=False).array, dtype=np.float64)[:n_whole]  # (s, x, y) V Å
    return (sigma_per_V_A(cfg.energy_kv) * projected.transpose(0, 2, 1)).astype(np.float32)


def periodic_patches(image: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random ``size x size`` windows of a periodic image (wrapping around its edges)."""
    h, w = image.shape
    out = np.empty((count, size, size), np.float32)
    for k in range(count):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        rows = (y0 + np.arange(size)) % h
        cols = (x0 + np.arange(size)) % w
        out[k] = image[rows[:, None], cols[None, :]]
    return out


def structure_patches(spec: StructureSpec, cfg: PriorDataConfig, *, prototype: Prototype | None = None,
                      check: bool = True):
    """(patches (n, H, W), slice index of each, manifest record) of one structure."""
    atoms, record = build_structure(spec, cfg, prototype=prototype, check=check)
    phase = render_slices(atoms, cfg)
    rng = np.random.default_rng([spec.seed, 1])
    chosen = np.sort(rng.choice(len(phase), size=min(cfg.slices_per_structure, len(phase)), replace=False))
    patches = [periodic_patches(phase[s], cfg.patch_px, cfg.patches_per_slice, rng) for s in chosen]
    slices = np.repeat(chosen, cfg.patches_per_slice).astype(np.int32)
    return np.concatenate(patches), slices, record


# ---------------------------------------------------------------- the data set
def structure_specs(cfg: PriorDataConfig) -> list[StructureSpec]:
    """Every structure of the data set, in a fixed order, with its seed and split."""
    names = cfg.prototypes or list(PROTOTYPES)
    compounds = [(p, s, lat) for p in names for s, lat in COMPOUNDS[p][: cfg.compounds_per_prototype]]
    split_rng = np.random.default_rng([cfg.seed, 0])
    n_held = int(round(cfg.heldout_fraction * len(compounds)))
    if cfg.heldout_fraction > 0 and len(compounds) >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, len(compounds) - 1)
    held = set(split_rng.choice(len(compounds), size=n_held, replace=False).tolist()) if n_held > 0 else set()
    specs = []
    for c, (proto, species, lattice) in enumerate(compounds):
        system = PROTOTYPES[proto].system
        for axis, _ in ZONE_AXES[system][: cfg.zone_axes]:
            for _ in range(cfg.variants):
                index = len(specs)
                seed = int(np.random.SeedSequence([cfg.seed, 1, index]).generate_state(1)[0])
                rng = np.random.default_rng(seed)
                jittered = {k: (v * (1 + rng.uniform(-cfg.lattice_jitter, cfg.lattice_jitter)) if k != "u" else v)
                            for k, v in lattice.items()}
                jittered = {k: round(float(v), 5) for k, v in jittered.items()}
                specs.append(StructureSpec(index, proto, species, jittered, axis, seed, c in held))
    return specs


def generate(cfg: PriorDataConfig, *, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Yield (patches, slice indices, manifest record) for every structure of ``cfg``."""
    from ptycore.data.ingest import progress_bar

    specs = structure_specs(cfg)
    with progress_bar(len(specs), "prior data: structures", progress) as advance:
        for spec in specs:
            patches, slices, block = structure_patches(spec, cfg, check=True)
            record = {"id": spec.index, "prototype": spec.prototype, "species": list(spec.species),
                      "lattice_A": spec.lattice, "zone_axis": spec.zone_axis, "seed": spec.seed,
                      "split": "heldout" if spec.heldout else "train", **block}
            advance(1)
            yield patches, slices, record


def write_dataset(cfg: PriorDataConfig, out: str | Path, *, overwrite: bool = False, progress: bool = False,
                  config_source: str | None = None) -> dict:
    """Generate the data set of ``cfg`` and write the store ``out`` atomically; return a summary."""
    import time

    from ptycore.physics.electron import sigma_per_V_A
    from ptycore.store import atomic_output, create_store, provenance, refuse_existing, write_array

    refuse_existing(out, overwrite)
    t0 = time.perf_counter()
    all_patches, all_structure, all_slice, manifest = [], [], [], []
    first = 0
    for patches, slices, record in generate(cfg, progress=progress):
        record["first_patch"], record["patches"] = first, len(patches)
        first += len(patches)
        all_patches.append(patches)
        all_structure.append(np.full(len(patches), record["id"], np.int32))
        all_slice.append(slices)
        manifest.append(record)
    patches = np.concatenate(all_patches)
    structure = np.concatenate(all_structure)
    heldout = np.asarray([manifest[i]["split"] == "heldout" for i in structure], bool)
    train = patches[~heldout] if (~heldout).any() else patches
    phase_rms = float(np.sqrt(np.mean(train.astype(np.float64) ** 2)))
    manifest_hash = "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    with atomic_output(out, overwrite=overwrite) as tmp:
        store = create_store(tmp)
        chunks = (min(cfg.chunk_patches, len(patches)), cfg.patch_px, cfg.patch_px)
        write_array(store, "patches", patches, chunks=chunks,
                    attrs={"units": "rad", "axes": "patch, y, x",
                           "description": "sigma * projected potential of one slice"})
        write_array(store, "structure", structure, attrs={"description": "index into attrs['manifest']"})
        write_array(store, "slice", np.concatenate(all_slice), attrs={"description": "slice index in its block"})
        write_array(store, "heldout", heldout, attrs={"description": "True: patch of a held-out compound"})
        store.attrs.update({
            "kind": "ptycore prior data",
            "config": cfg.model_dump(),
            "config_hash": cfg.hash(),
            "manifest": manifest,
            "manifest_hash": manifest_hash,
            "pixel_size_A": cfg.pixel_size_A,
            "slice_thickness_A": cfg.slice_thickness_A,
            "energy_kv": cfg.energy_kv,
            "sigma_rad_per_V_A": sigma_per_V_A(cfg.energy_kv),
            "phase_rms_rad": phase_rms,
            "provenance": provenance(command="prior data", config_source=config_source,
                                     seconds=round(time.perf_counter() - t0, 2), seeds={"master": cfg.seed}),
        })
    return {"structures": len(manifest), "patches": int(len(patches)), "heldout_patches": int(heldout.sum()),
            "heldout_compounds": sorted({r["formula"] for r in manifest if r["split"] == "heldout"}),
            "phase_rms_rad": phase_rms, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- reading it back
@dataclass
class PriorData:
    patches: np.ndarray  # (N, H, W) float32
    heldout: np.ndarray  # (N,) bool
    structure: np.ndarray
    attrs: dict
    path: Path

    @property
    def manifest(self) -> list[dict]:
        return self.attrs["manifest"]


def read_dataset(path: str | Path) -> PriorData:
    """Open a store from :func:`write_dataset`; bad or missing -> one line naming the path."""
    from ptycore.errors import InvalidData
    from ptycore.store import open_input

    group = open_input(path, ("patches", "heldout", "structure"), "prior data")
    attrs = dict(group.attrs)
    if attrs.get("kind") != "ptycore prior data":
        raise InvalidData(f"{path}: not a prior training data store (is this from 'ptycore prior data'?)")
    return PriorData(np.asarray(group["patches"][...], np.float32), np.asarray(group["heldout"][...], bool),
                     np.asarray(group["structure"][...]), attrs, Path(path))


def evaluation_patches(name: str, cfg: PriorDataConfig, *, seed: int = 0) -> np.ndarray:
    """Patches of an evaluation crystal rendered exactly as the training data (the perovskite
    check off): ``"SrTiO3"`` (cubic perovskite, a = 3.905 Å) along [001], [011] and [111]."""
    if name != "SrTiO3":
        raise InvalidArgument(f"unknown evaluation crystal {name!r} (known: SrTiO3)")

    def srtio3(species, lattice):
        import ase

        a = lattice["a"]
        return ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5),
                                                     (0, 0.5, 0.5)], cell=[a, a, a], pbc=True)

    perovskite = Prototype("cubic", srtio3, "cubic perovskite (evaluation only)")
    out = []
    for k, (axis, _) in enumerate(ZONE_AXES["cubic"][: cfg.zone_axes]):
        spec = StructureSpec(k, "perovskite", ("Sr", "Ti", "O"), {"a": 3.905}, axis,
                             int(np.random.SeedSequence([seed, 2, k]).generate_state(1)[0]), True)
        patches, _, _ = structure_patches(spec, cfg, prototype=perovskite, check=False)
        out.append(patches)
    return np.concatenate(out)
