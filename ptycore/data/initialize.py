"""Initial reconstruction state: ``prepared.zarr`` (+ optional init config) → ``init.zarr``.

``init.zarr`` has the result-store layout of DESIGN, so a reconstruction starts from it or from
a previous stage's result alike:

* ``probe`` ``(probe_modes, N, N)`` complex64, ``sum |probe|^2`` = the mean total counts per
  pattern of the prepared data. ``probe: aperture`` (default) builds it from the metadata
  (convergence angle, ``defocus_A``, ``aberrations``; the config's ``convergence_mrad``,
  ``defocus_A`` and ``aberrations`` override them) with :func:`ptycore.physics.make_probe` on
  the grid ``(N, pixel_size_A)``; ``probe: vacuum`` takes the Fourier amplitude from the data,
  ``sqrt(mean pattern)``, with the aberration phase. ``probe_modes > 1``:
  :func:`ptycore.physics.make_mixed_probe` (powers decaying by ``probe_mode_decay``).
* ``object_amplitude``, ``object_phase`` ``(obj_modes, slices, Hy, Wx)`` float32: uniform
  (amplitude 1, phase 0). With ``obj_modes > 1`` the modes share the intensity (amplitudes
  ``sqrt(p_m)``, powers decaying by 0.3 and summing to one, so a uniform object still passes all
  the probe's intensity) and the modes after the first carry a small seeded random phase (0.01 rad
  rms) so that they can become different. ``from_result: PATH`` instead resamples a previous
  result (or init) store: slices remapped by depth overlap (the total phase through the sample is
  conserved at every pixel, amplitudes multiply likewise), then interpolated (bilinear) to the new
  pixel size, aligned on the scan (the centroid of the probe positions, or ``origin_A`` of both
  stores when the scans differ); outside the old field of view amplitude 1, phase 0.
* ``positions_A`` ``(n_pos, 2)`` float32 in the object frame: the prepared nominal positions,
  optionally corrected by ``affine`` (a 2 x 2 matrix on (y, x)), shifted by a whole number of
  pixels so that every probe window starts at least ``margin_px`` pixels inside the object
  (window top-left ``floor(pos / pixel - (N//2, N//2)) >= margin_px``) and the object ends
  ``margin_px`` pixels after the last window. A prepared half scan (``ptycore preprocess --half``)
  carries ``scan_box_A``, the whole scan's bounding box: the object frame (shift and shape) is
  then built around that box too, so both halves get the object frame of the whole scan.
* ``tilts_mrad`` ``(2,)`` (``tilts_mrad`` of the config, default zeros; ``(n_pos, 2)`` with
  ``per_position_tilts``), ``slice_thickness_A`` scalar: ``slice_thickness_A`` of the config, or
  ``thickness_A`` (config, else metadata, else the ``from_result`` store's) divided by ``slices``.
* attrs ``pixel_size_A``, ``origin_A`` (scan-frame (y, x) in Å of object pixel [0, 0], in the
  frame of ``data.zarr``: scan index (0, 0) of the ingested scan at (0, 0); like ``truth.zarr``'s),
  ``mean_counts``, ``metadata``, ``init`` (the resolved config), ``provenance``; and
  ``convergence_mrad`` when the config overrides the metadata's: the reconstruction then uses it
  (probe support and aperture constraints) instead of the prepared data's, and its result stores
  carry it on to the next stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ptycore.data.preprocess import load_config
from ptycore.errors import InvalidArgument, InvalidData
from ptycore.physics.slicing import slice_weights

OBJECT_MODE_DECAY = 0.3
OBJECT_MODE_PHASE_RMS = 0.01


class InitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    probe: Literal["aperture", "vacuum"] = "aperture"
    probe_modes: int = Field(default=1, ge=1, le=36)
    probe_mode_decay: float = Field(default=0.3, gt=0, le=1)
    defocus_A: float | None = Field(default=None, description="overrides the metadata's defocus_A")
    convergence_mrad: float | None = Field(
        default=None, gt=0, le=200, description="overrides the metadata's convergence semi-angle: the probe's "
        "aperture here, and the reconstruction's (probe support, aperture constraints), which reads it from the "
        "init store")
    aberrations: dict[str, float] | None = Field(default=None, description="replace the metadata's aberrations")
    obj_modes: int = Field(default=1, ge=1)
    slices: int = Field(default=1, ge=1)
    slice_thickness_A: float | None = Field(default=None, gt=0)
    thickness_A: float | None = Field(default=None, gt=0, description="overrides the metadata's thickness_A")
    from_result: str | None = Field(default=None, description="result or init store to resample the object from")
    margin_px: int = Field(default=8, ge=0)
    affine: tuple[tuple[float, float], tuple[float, float]] | None = None
    tilts_mrad: tuple[float, float] = (0.0, 0.0)
    per_position_tilts: bool = False
    seed: int = Field(default=0, ge=0)

    @field_validator("aberrations")
    @classmethod
    def _known(cls, v):
        if v is None:
            return v
        from ptycore.physics.probe import validate_aberrations

        if "C10" in v:
            raise ValueError("give defocus as defocus_A (= -C10), not aberrations.C10")
        return validate_aberrations(v)

    @field_validator("affine")
    @classmethod
    def _invertible(cls, v):
        if v is not None and abs(np.linalg.det(np.asarray(v, float))) < 1e-6:
            raise ValueError("the affine matrix must be invertible")
        return v


# ---------------------------------------------------------------- pieces
def mean_pattern(patterns) -> np.ndarray:
    """Mean of ``patterns`` (n_pos, ky, kx) read chunk by chunk (float64)."""
    n = patterns.shape[0]
    step = max(1, int(patterns.chunks[0])) if hasattr(patterns, "chunks") else 256
    total = np.zeros(patterns.shape[1:], np.float64)
    for start in range(0, n, step):
        total += np.asarray(patterns[start : start + step], np.float64).sum(axis=0)
    return total / n


def aperture_probe(n: int, pixel_size_A: float, energy_kv: float, convergence_mrad: float, defocus_A: float,
                   aberrations: dict, mean_counts: float) -> np.ndarray:
    """Probe ``(N, N)`` complex64 from the condenser aperture and aberrations, scaled to mean counts."""
    from ptycore.physics import Grid, make_probe

    try:
        probe = make_probe(Grid((n, n), pixel_size_A), energy_kv, convergence_mrad, defocus_A, aberrations)
    except ValueError as err:
        raise InvalidData(f"probe: {err}") from None
    return np.asarray(probe, np.complex64) * np.float32(math.sqrt(mean_counts))


def vacuum_probe(mean: np.ndarray, pixel_size_A: float, energy_kv: float, defocus_A: float,
                 aberrations: dict) -> np.ndarray:
    """Probe with Fourier amplitude ``sqrt(mean pattern)`` and the aberration phase; centred in its
    window like :func:`ptycore.physics.make_probe`, ``sum |probe|^2 = sum(mean)``."""
    import jax.numpy as jnp

    from ptycore.physics import Grid, aberration_phase, wavelength_A
    from ptycore.physics.probe import angular_coordinates

    n = mean.shape[0]
    lam = wavelength_A(energy_kv)
    alpha, phi = angular_coordinates(Grid((n, n), pixel_size_A), lam)
    chi = np.asarray(aberration_phase(alpha, phi, lam, {**aberrations, "C10": -defocus_A}), np.float64)
    amplitude = np.sqrt(np.clip(np.fft.ifftshift(mean), 0.0, None))  # FFT order, like the model
    probe_k = amplitude * np.exp(-1j * chi)
    probe = np.fft.fftshift(np.fft.ifft2(probe_k, norm="ortho"))
    return np.asarray(jnp.asarray(probe, jnp.complex64))


def object_frame_positions(positions_A: np.ndarray, pixel_size_A: float, window: int, margin_px: int):
    """Shift positions by whole pixels so every window starts >= margin_px inside the object.

    Returns (positions in the object frame as float32, the shift in pixels (y, x)). The check
    uses float32 like :func:`ptycore.physics.split_positions`.
    """
    pos = np.asarray(positions_A, np.float64)
    centre = window // 2
    shift = np.ceil(margin_px + centre - pos.min(axis=0) / pixel_size_A).astype(np.int64)
    for _ in range(3):
        out = (pos + shift * pixel_size_A).astype(np.float32)
        top_left = np.floor(out / np.float32(pixel_size_A) - np.float32(centre))
        low = top_left.min(axis=0) < margin_px
        if not low.any():
            return out, shift
        shift = shift + low
    raise AssertionError("could not place the positions inside the object")  # pragma: no cover


def remap_slices(array: np.ndarray, n_slices: int, log: bool = False) -> np.ndarray:
    """Redistribute ``(modes, S, H, W)`` over ``n_slices`` equal slabs of the same depth by overlap:
    sums over depth are conserved (of log(array) when ``log``, i.e. products for amplitudes)."""
    current = array.shape[1]
    if current == n_slices:
        return array
    weights = slice_weights(current, n_slices)
    values = np.log(np.clip(array, 1e-6, None)) if log else array
    out = np.einsum("ij,mjyx->miyx", weights, values)
    return np.exp(out) if log else out


def resample_lateral(array: np.ndarray, old_pixel: float, new_pixel: float, new_shape, shift_A, fill: float):
    """Sample ``(modes, S, H, W)`` at new pixel centres: new pixel (j, i) sits at old-frame
    ``(j, i) * new_pixel + shift_A`` (Å); bilinear, ``fill`` outside."""
    from scipy import ndimage

    jj, ii = np.meshgrid(np.arange(new_shape[0]), np.arange(new_shape[1]), indexing="ij")
    coords = np.stack([(jj * new_pixel + shift_A[0]) / old_pixel, (ii * new_pixel + shift_A[1]) / old_pixel])
    out = np.empty(array.shape[:2] + tuple(new_shape), np.float64)
    for m in range(array.shape[0]):
        for s in range(array.shape[1]):
            out[m, s] = ndimage.map_coordinates(array[m, s].astype(np.float64), coords, order=1, mode="constant",
                                                cval=fill)
    return out


# ---------------------------------------------------------------- the verb
def initialize(data: str | Path, config_path: str | Path | None, out: str | Path, *,
               overwrite: bool = False) -> dict:
    """Write ``out`` (init.zarr) from a prepared store; see the module docstring."""
    from ptycore.data.metadata import parse_metadata
    from ptycore.physics import make_mixed_probe, object_shape_for
    from ptycore.store import (
        atomic_output,
        checksum,
        create_store,
        open_input,
        open_store,
        provenance,
        refuse_existing,
        write_array,
    )

    config = load_config(config_path, InitConfig)
    cfg = str(config_path) if config_path is not None else "init config"
    out = Path(out)
    refuse_existing(out, overwrite)
    group = open_input(data, ("patterns", "positions_A"), "preprocess")
    attrs = dict(group.attrs)
    for key in ("metadata", "pixel_size_A"):
        if key not in attrs:
            raise InvalidData(f"{data}: attribute {key!r} is missing (run 'ptycore preprocess' first)")
    meta = parse_metadata(dict(attrs["metadata"]), f"{data} attrs.metadata")
    pixel = float(attrs["pixel_size_A"])
    patterns = group["patterns"]
    n_pos, ky, kx = patterns.shape
    if ky != kx:
        raise InvalidData(f"{data}: the detector is {ky} x {kx}; init needs a square one (preprocess detector_crop)")
    positions = np.asarray(group["positions_A"][...], np.float64)
    if positions.shape != (n_pos, 2):
        raise InvalidData(f"{data}: positions_A {positions.shape} does not match {n_pos} patterns")

    source = None
    if config.from_result is not None:
        src_path = Path(config.from_result)
        if not src_path.exists():
            raise InvalidArgument(f"{cfg}: from_result: {src_path} not found")
        source = open_store(src_path)
        missing = [k for k in ("object_phase", "object_amplitude", "positions_A", "slice_thickness_A")
                   if k not in source]
        if missing or "pixel_size_A" not in source.attrs:
            what = ", ".join(missing + ([] if "pixel_size_A" in source.attrs else ["attr pixel_size_A"]))
            raise InvalidData(f"{cfg}: from_result: {src_path} is not a result store (missing {what})")
        if "obj_modes" in config.model_fields_set and config.obj_modes != source["object_phase"].shape[0]:
            raise InvalidArgument(f"{cfg}: obj_modes: {config.obj_modes} differs from the "
                                  f"{source['object_phase'].shape[0]} object modes of {src_path}")

    # slice thickness: config, else thickness (config, metadata, previous result) / slices
    notes: list[str] = []
    if config.slice_thickness_A is not None:
        slice_thickness = config.slice_thickness_A
        thickness = slice_thickness * config.slices
    else:
        thickness = config.thickness_A or meta.thickness_A
        if thickness is None and source is not None:
            thickness = float(np.asarray(source["slice_thickness_A"][...])) * source["object_phase"].shape[1]
        if (thickness is None or not thickness > 0) and config.slices > 1:
            raise InvalidData(f"{data}: the sample thickness is unknown: give thickness_A in the acquisition "
                              f"metadata, or thickness_A or slice_thickness_A in {cfg}")
        if thickness is None or not thickness > 0:  # one slice: its thickness does not enter the model
            from ptycore.recon.autoplan import depth_of_field_A

            thickness = None
            slice_thickness = depth_of_field_A(meta.energy_kv, meta.convergence_mrad)
            notes.append(f"the sample thickness is unknown (no thickness_A in the metadata or {cfg}): a single-slice "
                         f"start, its nominal thickness the depth of field λ/α² = {slice_thickness:.3g} Å")
        else:
            slice_thickness = thickness / config.slices

    # positions in the object frame
    nominal = positions @ np.asarray(config.affine, np.float64).T if config.affine is not None else positions
    frame_points = nominal  # what the object frame is built around: the positions (+ the whole scan's box)
    if attrs.get("scan_box_A") is not None:
        (y0, x0), (y1, x1) = np.asarray(attrs["scan_box_A"], np.float64)
        corners = np.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]])
        corners = corners @ np.asarray(config.affine, np.float64).T if config.affine is not None else corners
        frame_points = np.concatenate([nominal, corners])
    frame_points, shift_px = object_frame_positions(frame_points, pixel, ky, config.margin_px)
    pos_obj = frame_points[:n_pos]
    shape = object_shape_for(frame_points, pixel, (ky, kx), config.margin_px)
    scan_origin = np.asarray(attrs.get("scan_origin_A", [0.0, 0.0]), np.float64)
    origin = scan_origin - shift_px * pixel

    # probe
    mean = mean_pattern(patterns)
    mean_counts = float(mean.sum())
    if not (np.isfinite(mean_counts) and mean_counts > 0):
        raise InvalidData(f"{data}: the patterns have no counts (mean total {mean_counts:g})")
    defocus = meta.defocus_A if config.defocus_A is None else config.defocus_A
    convergence = meta.convergence_mrad if config.convergence_mrad is None else config.convergence_mrad
    if config.convergence_mrad is not None:
        from ptycore.physics import wavelength_A

        edge_mrad = wavelength_A(meta.energy_kv) / (2 * pixel) * 1e3  # half the detector's angular width
        if convergence > edge_mrad:
            raise InvalidArgument(f"{cfg}: convergence_mrad: {convergence:g} mrad lies outside the detector of "
                                  f"{data} (its edge is {edge_mrad:.4g} mrad from the centre)")
    aberrations = dict(meta.aberrations if config.aberrations is None else config.aberrations)
    if config.probe == "aperture":
        probe = aperture_probe(ky, pixel, meta.energy_kv, convergence, defocus, aberrations, mean_counts)
    else:
        probe = vacuum_probe(mean, pixel, meta.energy_kv, defocus, aberrations)
    probe = np.asarray(make_mixed_probe(probe, config.probe_modes, config.probe_mode_decay), np.complex64)

    # object
    if source is None:
        n_modes = config.obj_modes
        powers = OBJECT_MODE_DECAY ** np.arange(n_modes)
        powers = powers / powers.sum()
        amplitude = np.broadcast_to(np.sqrt(powers)[:, None, None, None], (n_modes, config.slices) + shape)
        phase = np.zeros((n_modes, config.slices) + shape)
        if n_modes > 1:
            rng = np.random.default_rng(config.seed)
            phase[1:] = rng.normal(0.0, OBJECT_MODE_PHASE_RMS, size=phase[1:].shape)
        object_note = {"object": "uniform", "obj_modes": n_modes, "mode_powers": powers.tolist()}
    else:
        old_pixel = float(source.attrs["pixel_size_A"])
        old_phase = np.asarray(source["object_phase"][...], np.float64)
        old_amp = np.asarray(source["object_amplitude"][...], np.float64)
        old_pos = np.asarray(source["positions_A"][...], np.float64)
        if old_pos.shape[0] == n_pos:
            shift_A = old_pos.mean(axis=0) - pos_obj.astype(np.float64).mean(axis=0)
            aligned = "centroid of the probe positions"
        elif "origin_A" in source.attrs:
            shift_A = origin - np.asarray(source.attrs["origin_A"], np.float64)
            aligned = "origin_A of both stores"
        else:
            raise InvalidData(f"{cfg}: from_result: {config.from_result} has {old_pos.shape[0]} positions, "
                              f"{data} has {n_pos}, and no origin_A to align the two scans")
        phase = remap_slices(old_phase, config.slices)
        amp = remap_slices(old_amp, config.slices, log=True)
        phase = resample_lateral(phase, old_pixel, pixel, shape, shift_A, 0.0)
        amplitude = resample_lateral(amp, old_pixel, pixel, shape, shift_A, 1.0)
        object_note = {"object": "from_result", "from_result": str(config.from_result),
                       "from_slices": int(old_phase.shape[1]), "from_pixel_size_A": old_pixel,
                       "aligned_by": aligned, "shift_A": shift_A.tolist()}

    tilts = np.asarray(config.tilts_mrad, np.float32)
    if config.per_position_tilts:
        tilts = np.broadcast_to(tilts, (n_pos, 2)).copy()

    inputs = {str(data): checksum(data)}
    if config_path is not None:
        inputs[str(config_path)] = checksum(config_path)
    if config.from_result is not None:
        inputs[str(config.from_result)] = checksum(config.from_result)
    resolved = {**config.model_dump(mode="json"), "slice_thickness_A": slice_thickness, "defocus_A": defocus,
                "aberrations": aberrations}
    notes += init_warnings(meta, pixel, ky, defocus, config.slices, slice_thickness, thickness, convergence)
    with atomic_output(out, overwrite=overwrite) as tmp:
        store = create_store(tmp)
        obj_chunks = (1, 1) + tuple(min(s, 512) for s in shape)
        write_array(store, "object_amplitude", np.asarray(amplitude, np.float32), chunks=obj_chunks)
        write_array(store, "object_phase", np.asarray(phase, np.float32), chunks=obj_chunks)
        write_array(store, "probe", probe)
        write_array(store, "positions_A", pos_obj, attrs={
            "units": "Å", "axes": "n_pos, (y, x)", "frame": "object (pixel [0, 0] at 0 Å)"})
        write_array(store, "tilts_mrad", tilts)
        write_array(store, "slice_thickness_A", np.asarray(slice_thickness, np.float32).reshape(()))
        store.attrs.update({
            "pixel_size_A": pixel,
            "origin_A": origin.tolist(),
            "origin_frame": "scan frame (y, x) in Å of object pixel [0, 0]; scan index (0, 0) of the ingested "
                            "scan at (0, 0) Å",
            "scan_shape": list(attrs.get("scan_shape", meta.scan_shape)),
            "wavelength_A": attrs.get("wavelength_A"),
            "detector_shape": [ky, kx],
            "mean_counts": mean_counts,
            "thickness_A": None if thickness is None else float(thickness),
            "metadata": dict(attrs["metadata"]),
            "init": {**resolved, **object_note},
            "provenance": provenance(verb="init", inputs=inputs, config=resolved, object=object_note,
                                     seeds={"object_modes": config.seed}, upstream=attrs.get("provenance")),
        })
        if config.convergence_mrad is not None:  # read by reconstruct (recon.context.init_convergence_mrad)
            store.attrs["convergence_mrad"] = convergence
    return {"out": out, "object_shape": (phase.shape[0], phase.shape[1]) + tuple(shape),
            "probe_shape": tuple(probe.shape), "pixel_size_A": pixel, "slice_thickness_A": slice_thickness,
            "mean_counts": mean_counts, "warnings": notes}


def init_warnings(meta, pixel_size_A: float, detector_px: int, defocus_A: float, slices: int,
                  slice_thickness_A: float, thickness_A: float | None,
                  convergence_mrad: float | None = None) -> list[str]:
    """The physics checks of ptycore.recon.autoplan for this init: slices too thick for the
    stated thickness, a probe that does not fit its window at this defocus, a low scan overlap.
    ``convergence_mrad``: the init's (its config's override), else the metadata's."""
    from ptycore.recon.autoplan import DataFacts, physics_warnings

    convergence = meta.convergence_mrad if convergence_mrad is None else convergence_mrad
    facts = DataFacts(energy_kv=meta.energy_kv, convergence_mrad=convergence, defocus_A=defocus_A,
                      thickness_A=thickness_A, dose_e_per_A2=meta.dose_e_per_A2 or 1.0,
                      scan_step_A=max(meta.scan_step_A), pixel_size_A=pixel_size_A, detector_px=detector_px,
                      n_positions=1)
    return physics_warnings(facts, slices=slices if thickness_A else None, slice_thickness_A=slice_thickness_A)
