"""Facility detector formats, read through rosettasciio where it covers them, with their headers.

===============================  ==============================================================
Quantum Detectors Merlin         ``.mib`` (single chip or quad, 1/6/12/24-bit) with its ``.hdr``
                                 beside it. rosettasciio parses the header and memory-maps the
                                 frames; rows are flipped as rosettasciio (and HyperSpy) show
                                 them. The scan shape comes from the ``.hdr`` (frames per trigger
                                 = scan columns); the exposure from the frame header. A quad
                                 (2x2) or Nx1 detector has its chip-boundary pixels flagged in
                                 the detector mask (``chip_edge_px`` each side, default 1).
Gatan DigitalMicrograph          ``.dm3 .dm4`` through rosettasciio (lazy): energy, camera
                                 length, exposure or dwell, scan step and detector pixel from the
                                 tags and calibrations where the microscope wrote them. A 4-D
                                 image is read in either GMS layout (:func:`dm_layout`: STEMx
                                 scan-first, or the older detector-first diffraction SI); with
                                 neither the layout tag nor calibrations the metadata's
                                 ``scan_shape`` / ``pattern_axes`` decide which axes are the scan.
EMPAD                            ``.xml`` (or the ``.raw`` that an ``.xml`` beside it names):
                                 scan shape and step, high voltage, camera length and exposure
                                 from the xml; frames memory-mapped (128 x 128 of each 128 x 130
                                 frame). A ``.raw`` without its xml needs ``scan_shape`` in the
                                 metadata (see :mod:`ptycore.data.readers`).
Dectris Arina                    ``*_master.h5`` whose ``/entry/data/data_NNNNNN`` link to the
                                 data files (bitshuffle-LZ4 through hdf5plugin): all data files
                                 as one lazy stack, the exposure (``count_time``) and the
                                 detector's ``pixel_mask`` from the master. Arina files do not
                                 record the scan shape: ``scan_shape`` must be in the metadata.
Velox / Berkeley EMD, py4DSTEM   ``.emd`` (Velox or NCEM) and py4DSTEM / emdfile ``.h5`` through
                                 rosettasciio (lazy), with their calibrations and microscope
                                 metadata. A Velox camera stack (``/Data/Image/<uuid>``, frames
                                 in scan order) also takes the scan shape and step, convergence
                                 and exposure from its record (:func:`velox_header`).
                                 ``FILE:/dataset/path`` reads one HDF5 dataset as is.
MRC                              ``.mrc`` frame stacks (n_pos, ky, kx) through rosettasciio (lazy;
                                 Direct Electron movies with their metadata file).
===============================  ==============================================================

Native fast paths (measured in ``bench/readers.py``): rosettasciio's lazy readers return dask
arrays; where a format is a fixed-size frame layout (Merlin, EMPAD) the frames are read from a
plain numpy memmap instead (rosettasciio still parses the header): reading 4096 frames in chunks
of 256, 2.9x faster for Merlin and 6.4x for EMPAD than indexing rosettasciio's dask array.
rosettasciio's Arina reader loads the whole scan into memory (no lazy mode) and turns uint32 into
uint16, so Arina is read natively through h5py.

Every reader returns a :class:`~ptycore.data.readers.PatternSource` whose ``header`` holds the
acquisition values found (keys of :class:`~ptycore.data.metadata.AcquisitionMetadata`, in its
units) and whose ``mask`` holds the detector's own bad-pixel / chip-gap mask (True = good).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ptycore.errors import InvalidData

#: length units → Å
LENGTH_A = {"m": 1e10, "mm": 1e7, "um": 1e4, "µm": 1e4, "μm": 1e4, "nm": 10.0, "Å": 1.0, "A": 1.0,
            "angstrom": 1.0, "pm": 1e-2}
#: reciprocal-length units → 1/Å
RECIPROCAL_INV_A = {"1/nm": 0.1, "nm^-1": 0.1, "1 / nm": 0.1, "nm⁻¹": 0.1, "1/Å": 1.0, "1/A": 1.0, "Å^-1": 1.0,
                    "A^-1": 1.0, "1 / Å": 1.0, "Å⁻¹": 1.0, "1/m": 1e-10}
#: angle units → mrad
ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "µrad": 1e-3, "urad": 1e-3}
MERLIN_CHIP_PX = 256
DEFAULT_CHIP_EDGE_PX = 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0]}" if text else err.__class__.__name__


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _slug(name: str) -> str:
    """A tag name as HyperSpy turns it into an attribute ("exposure (s)" → "exposure_s"):
    rosettasciio's mappings name some tags that way and others as written."""
    name = re.sub(r"[^\w\s-]", "", str(name)).strip()
    return re.sub(r"[-\s]+", "_", name)


def _walk(tree: Any, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        if part in tree:
            tree = tree[part]
            continue
        matches = [key for key in tree if _slug(key) == _slug(part)]
        if len(matches) != 1:
            return None
        tree = tree[matches[0]]
    return tree


def _unit_factor(unit: str, table: dict, target: str) -> float | None:
    """The factor from ``unit`` to ``target``: the table first (it knows "A" as Å and the
    spellings microscopes write), then pint for any other spelling ("1 / µm", "nm**-1")."""
    unit = str(unit or "").strip()
    if unit in table:
        return table[unit]
    if not unit:
        return None
    try:
        from pint import UnitRegistry

        global _UREG
        if _UREG is None:
            _UREG = UnitRegistry()
        return float(_UREG.Quantity(1.0, unit.replace("Å", "angstrom")).to(target).magnitude)
    except Exception:  # not a unit pint knows, or of another dimension
        return None


_UREG = None


def _put(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            return
    tree[last] = value


def apply_mapping(signal: dict) -> dict:
    """The signal's ``metadata`` with rosettasciio's ``mapping`` (original → metadata key, as
    HyperSpy applies it on load) applied to its ``original_metadata``."""
    import copy

    metadata = copy.deepcopy(dict(signal.get("metadata") or {}))
    original = signal.get("original_metadata") or {}
    for source, (target, convert) in (signal.get("mapping") or {}).items():
        value = _walk(original, source)
        if value is None:
            continue
        try:
            _put(metadata, target, convert(value) if convert else value)
        except Exception:  # a header value a mapping function cannot convert is left out
            continue
    return metadata


def header_from_signal(signal: dict) -> dict:
    """Acquisition values (metadata keys and units) from a rosettasciio signal dictionary."""
    md = apply_mapping(signal)
    tem = _walk(md, "Acquisition_instrument.TEM") or {}
    header: dict[str, Any] = {}
    if (v := _positive(tem.get("beam_energy"))) is not None:
        header["energy_kv"] = v  # keV of the electrons = kV of the acceleration
    if (v := _positive(tem.get("convergence_angle"))) is not None:
        header["convergence_mrad"] = v
    if (v := _positive(tem.get("camera_length"))) is not None:
        header["camera_length_mm"] = v
    for path in ("Acquisition_instrument.TEM.Detector.Camera.exposure", "Acquisition_instrument.TEM.Camera.exposure",
                 "Acquisition_instrument.TEM.dwell_time", "Acquisition_instrument.dwell_time",
                 "Acquisition_instrument.Detector.exposure_per_frame"):
        if (v := _positive(_walk(md, path))) is not None:
            header["exposure_s"] = v
            break
    header.update(header_from_axes(signal.get("axes") or [], np.ndim(signal["data"])))
    return header


def header_from_axes(axes: list[dict], ndim: int) -> dict:
    """Scan shape and step, detector pixel from HyperSpy-style axes (in array order)."""
    header: dict[str, Any] = {}
    if len(axes) != ndim:
        return header
    scan, detector = axes[:-2], axes[-2:]
    if len(scan) == 2:
        header["scan_shape"] = [int(a["size"]) for a in scan]
        steps = [_positive(a.get("scale")) for a in scan]
        factors = [_unit_factor(a.get("units"), LENGTH_A, "angstrom") for a in scan]
        if all(steps) and all(factors):
            header["scan_step_A"] = [s * f for s, f in zip(steps, factors, strict=True)]
    scales = [_positive(a.get("scale")) for a in detector]
    units = {str(a.get("units") or "").strip() for a in detector}
    if all(scales) and len(units) == 1 and math.isclose(scales[0], scales[1], rel_tol=1e-6):
        (unit,) = units
        if (f := _unit_factor(unit, ANGLE_MRAD, "mrad")) is not None:
            header["detector_pixel_mrad"] = scales[0] * f
        elif (f := _unit_factor(unit, RECIPROCAL_INV_A, "1/angstrom")) is not None:
            header["detector_pixel_invA"] = scales[0] * f
    return header


def axis_kind(axis: dict) -> str | None:
    """'scan' for an axis calibrated in a length, 'detector' for one in an angle or a reciprocal
    length, None when its units tell neither."""
    unit = axis.get("units")
    if _unit_factor(unit, LENGTH_A, "angstrom") is not None:
        return "scan"
    if _unit_factor(unit, ANGLE_MRAD, "mrad") is not None or \
            _unit_factor(unit, RECIPROCAL_INV_A, "1/angstrom") is not None:
        return "detector"
    return None


def read_rsciio(module: str, path: Path, what: str, **kwargs) -> dict:
    """The one 3-D or 4-D signal a rosettasciio reader finds in ``path`` (read lazily)."""
    reader = importlib.import_module(f"rsciio.{module}").file_reader
    try:
        signals = reader(str(path), lazy=True, **kwargs)
    except Exception as err:  # rosettasciio raises many types on a damaged or foreign file
        raise InvalidData(f"{path}: not a readable {what} file ({_first_line(err)})") from None
    stacks = [s for s in signals if np.ndim(s["data"]) in (3, 4)]
    if len(stacks) == 1:
        return stacks[0]
    shapes = ", ".join(str(tuple(np.shape(s["data"]))) for s in signals) or "none"
    if not stacks:
        raise InvalidData(f"{path}: no 3-D or 4-D pattern stack in this {what} file (arrays: {shapes}); "
                          "name an HDF5 dataset as FILE:/path if it is one")
    raise InvalidData(f"{path}: several pattern stacks in this {what} file ({shapes}); name one as FILE:/path")


def _source(path, dataset, fmt, frames, header, *, mask=None, mask_source=None, inputs=(), close=None):
    from ptycore.data.readers import PatternSource

    src = PatternSource(path, dataset, fmt, frames, header=header, header_source=f"header of {path}",
                        mask=mask, mask_source=mask_source, inputs=list(inputs))
    if close is not None:
        src._close = close
    src.fixed_axes = True
    return src


def _check_readable(frames, label: str) -> None:
    frames.read(0, 1)
    frames.read(frames.shape[0] - 1, frames.shape[0])


# ---------------------------------------------------------------- Merlin
def chip_gap_mask(shape: tuple[int, int], geometry: str, edge_px: int) -> np.ndarray:
    """Good pixels (True) of an assembled multi-chip Merlin frame: ``edge_px`` rows / columns each
    side of every boundary between 256-pixel chips are flagged (their pixels are larger and count
    more, or border the gap between chips). ``geometry`` is '2x2' (quad) or 'Nx1' (a row)."""
    good = np.ones(shape, bool)
    if edge_px <= 0:
        return good
    for axis, size in enumerate(shape):
        if axis == 0 and geometry != "2x2":
            continue  # an Nx1 row of chips has boundaries between columns only
        for b in range(MERLIN_CHIP_PX, size, MERLIN_CHIP_PX):
            index = [slice(None), slice(None)]
            index[axis] = slice(max(0, b - edge_px), b + edge_px)
            good[tuple(index)] = False
    return good


def open_merlin(path: Path, dataset: str | None, scan_shape, chip_edge_px: int | None):
    from rsciio.quantumdetector import load_mib_data

    from ptycore.data.readers import Frames

    if dataset is not None:
        raise InvalidData(f"{path}: a Merlin .mib file holds one scan; drop ':{dataset}'")
    head = path.read_bytes()[:384].split(b",")
    if len(head) < 8 or head[0][:2] != b"MQ":
        raise InvalidData(f"{path}: not a Merlin .mib file (no MQ1 frame header at the start)")
    if head[6] == b"R64":
        raise InvalidData(f"{path}: raw (R64) Merlin frames are not supported; save them as processed frames")
    nav = None if scan_shape is None else (int(scan_shape[1]), int(scan_shape[0]))
    signal = read_rsciio("quantumdetector", path, "Merlin .mib", navigation_shape=nav)
    props = (signal.get("original_metadata") or {}).get("mib_properties") or {}
    header = header_from_signal(signal)
    hdr_path = path.with_suffix(".hdr")
    hdr = (signal.get("original_metadata") or {}).get("hdr_file") or {}
    # the scan shape from the .hdr (frames per trigger = one scan row); a guess from time stamps is not kept
    header.pop("scan_shape", None)
    header.pop("scan_step_A", None)
    try:
        per_line = int(hdr.get("Frames per Trigger (Number)", 0))
        total = int(hdr.get("Frames in Acquisition (Number)", 0))
    except ValueError:
        per_line, total = 0, 0
    if per_line > 1 and total >= per_line:
        header["scan_shape"] = [total // per_line, per_line]
    shape = tuple(int(s) for s in np.shape(signal["data"]))
    n_frames = int(np.prod(shape[:-2]))
    try:  # the frames as one memmap of the file's frame records (header + data): see the module docstring
        data = load_mib_data(str(path), lazy=True, mmap_mode="r", navigation_shape=(n_frames,), return_mmap=True)
    except Exception as err:
        raise InvalidData(f"{path}: cannot map the Merlin frames ({_first_line(err)})") from None
    data = data.reshape(shape)[..., ::-1, :]  # rows flipped as rosettasciio's file_reader shows them
    frames = Frames(data, str(path))
    _check_readable(frames, str(path))
    mask, mask_source = None, None
    if props.get("assembly_size") == "quad" or props.get("detector_geometry") in ("2x2", "Nx1"):
        geometry = props.get("detector_geometry") or "2x2"
        edge = DEFAULT_CHIP_EDGE_PX if chip_edge_px is None else chip_edge_px
        if all(s % MERLIN_CHIP_PX == 0 for s in shape[-2:]):
            mask = chip_gap_mask(shape[-2:], geometry, edge)[::-1, :].copy()
            mask_source = f"Merlin {geometry} chip boundaries ({edge} px each side) of {path}"
    inputs = [hdr_path] if hdr_path.is_file() else []
    return _source(path, None, "merlin-mib", frames, header, mask=mask, mask_source=mask_source, inputs=inputs)


# ---------------------------------------------------------------- EMPAD
def empad_xml_for(raw: Path) -> Path | None:
    """The EMPAD .xml beside ``raw`` that names it (``<raw_file filename=...>``), if any."""
    import xml.etree.ElementTree as ET

    for xml in sorted(raw.parent.glob("*.xml")):
        try:
            node = ET.parse(xml).getroot().find("raw_file")
        except (ET.ParseError, OSError):
            continue
        if node is not None and node.get("filename") == raw.name:
            return xml
    return None


def open_empad_xml(xml: Path, dataset: str | None):
    from ptycore.data.readers import EMPAD_DETECTOR, EMPAD_FRAME, Frames

    if dataset is not None:
        raise InvalidData(f"{xml}: an EMPAD scan is one array; drop ':{dataset}'")
    signal = read_rsciio("empad", xml, "EMPAD .xml")
    shape = tuple(int(s) for s in np.shape(signal["data"]))
    om = (signal.get("original_metadata") or {}).get("root") or {}
    raw_name = _walk(om, "raw_file.filename")
    raw = xml.parent / str(raw_name)
    if not raw.is_file():
        raise InvalidData(f"{xml}: its raw file {raw} is missing")
    n_frames = int(np.prod(shape[:-2]))
    frame_bytes = EMPAD_FRAME[0] * EMPAD_FRAME[1] * 4
    size = raw.stat().st_size
    if size < n_frames * frame_bytes:
        raise InvalidData(f"{raw}: {size} bytes hold {size // frame_bytes} EMPAD frames but {xml} describes "
                          f"a scan of {list(shape[:-2])} = {n_frames} frames (truncated?)")
    memmap = np.memmap(raw, dtype="<f4", mode="r", shape=shape[:-2] + EMPAD_FRAME)
    frames = Frames(memmap[..., : EMPAD_DETECTOR[0], :], str(raw))
    header = header_from_signal(signal)
    iom = om.get("iom_measurements") or {}
    if (v := _positive(iom.get("high_voltage"))) is not None:
        header["energy_kv"] = v / 1e3  # volts
    if (v := _positive(iom.get("nominal_camera_length"))) is not None:
        header["camera_length_mm"] = v * 1e3  # metres
    if (v := _positive(om.get("exposure_time"))) is not None:
        header["exposure_s"] = v / 1e3  # milliseconds
    return _source(raw, None, "empad", frames, header, inputs=[xml])


# ---------------------------------------------------------------- Dectris Arina
def is_arina_master(path: Path) -> bool:
    import h5py

    if path.name.endswith("_master.h5"):
        return True
    try:
        with h5py.File(path, "r") as f:
            group = f.get("entry/data")
            return isinstance(group, h5py.Group) and any(k.startswith("data_0") for k in group)
    except OSError:
        return False


def open_arina(path: Path, dataset: str | None):
    import dask.array as da
    import h5py
    import hdf5plugin  # noqa: F401  (bitshuffle-LZ4 of the data files)

    from ptycore.data.readers import Frames

    if dataset is not None:
        raise InvalidData(f"{path}: an Arina master names its data files itself; drop ':{dataset}' "
                          "(or open one data file as DATA.h5:/entry/data/data)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InvalidData(f"{path}: not a readable HDF5 file ({_first_line(err)})") from None
    try:
        group = f.get("entry/data")
        names = sorted(k for k in group if k.startswith("data_")) if isinstance(group, h5py.Group) else []
        if not names:
            raise InvalidData(f"{path}: no /entry/data/data_NNNNNN links in this Arina master file")
        parts, inputs = [], []
        for name in names:
            link = group.get(name, getlink=True)
            try:
                dset = group[name]
            except KeyError:
                target = getattr(link, "filename", "?")
                raise InvalidData(f"{path}: /entry/data/{name} links to {target}, which is missing") from None
            if dset.ndim != 3:
                raise InvalidData(f"{path}: /entry/data/{name} has shape {dset.shape}, not (frames, ky, kx)")
            if isinstance(link, h5py.ExternalLink):
                inputs.append(path.parent / link.filename)
            parts.append(da.from_array(dset, chunks=(min(64, dset.shape[0]),) + dset.shape[1:], lock=True))
        detector_shapes = {p.shape[1:] for p in parts}
        if len(detector_shapes) != 1:
            raise InvalidData(f"{path}: the data files have different frame shapes {sorted(detector_shapes)}")
        stack = da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        frames = Frames(stack, str(path))
        _check_readable(frames, str(path))
        header: dict[str, Any] = {}
        detector = f.get("entry/instrument/detector")
        if isinstance(detector, h5py.Group):
            if "count_time" in detector and (v := _positive(np.asarray(detector["count_time"]).ravel()[0])):
                header["exposure_s"] = v
            pixel_mask = detector.get("detectorSpecific/pixel_mask")
        else:
            pixel_mask = None
        mask, mask_source = None, None
        if isinstance(pixel_mask, h5py.Dataset) and tuple(pixel_mask.shape) == tuple(frames.shape[1:]):
            mask = np.asarray(pixel_mask[...]) == 0  # Dectris: non-zero = dead, hot or gap pixel
            mask_source = f"{path}:/entry/instrument/detector/detectorSpecific/pixel_mask"
    except BaseException:
        f.close()
        raise
    return _source(path, None, "arina", frames, header, mask=mask, mask_source=mask_source, inputs=inputs,
                   close=f.close)


# ---------------------------------------------------------------- rosettasciio's lazy readers
def is_emd(path: Path) -> bool:
    """An EMD file (NCEM/Berkeley, py4DSTEM/emdfile or Velox) that rosettasciio reads."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "version_major" in f.attrs or "emd_group_type" in f.attrs:
                return True
            return any(isinstance(g, h5py.Group) and "emd_group_type" in g.attrs for g in f.values()) or \
                isinstance(f.get("Data"), h5py.Group) and "Version" in f
    except OSError:
        return False


def open_rsciio_stack(path: Path, dataset: str | None, module: str, fmt: str, what: str):
    """A 3-D or 4-D stack through rosettasciio; DM and EMD files through their own openers below
    (DM's two 4-D layouts, Velox's scan record)."""
    from ptycore.data.readers import Frames

    if module == "digitalmicrograph":
        return open_dm(path, dataset)
    if module == "emd":
        return open_emd(path, dataset)
    if dataset is not None:
        raise InvalidData(f"{path}: {what} files are read whole; drop ':{dataset}'")
    signal = read_rsciio(module, path, what)
    frames = Frames(signal["data"], str(path))
    _check_readable(frames, str(path))
    return _source(path, None, fmt, frames, header_from_signal(signal))


# ---------------------------------------------------------------- Gatan DigitalMicrograph
#: the array axes of a 4-D DM image as rosettasciio returns it (DM's dimensions reversed)
DM_SCAN_FIRST = ("scan_y", "scan_x", "ky", "kx")
DM_DETECTOR_FIRST = ("ky", "kx", "scan_y", "scan_x")


def dm_layout(signal: dict) -> tuple[str, ...] | None:
    """The axis order of a 4-D DM image. GMS writes two layouts: with the tag ``Meta Data.Data
    Order Swapped`` = 1 (STEMx) the diffraction pattern is the fastest
    dimension, i.e. (scan_y, scan_x, ky, kx) here; older files (e.g. a DigiScan diffraction SI) list the
    scan first, i.e. (ky, kx, scan_y, scan_x) here, where rosettasciio shows the scan as the
    signal. The tag decides where present, else the calibrated units of either pair of axes
    (lengths = scan; angles or reciprocal lengths = detector); None when neither tells."""
    tags = _walk(signal.get("original_metadata") or {}, "ImageList.TagGroup0.ImageTags") or {}
    swapped = _walk(tags, "Meta Data.Data Order Swapped")
    if swapped is not None:
        try:
            return DM_SCAN_FIRST if int(swapped) else DM_DETECTOR_FIRST
        except (TypeError, ValueError):
            pass
    kinds = [axis_kind(a) for a in signal.get("axes") or []]
    if len(kinds) != 4:
        return None
    first, last = set(kinds[:2]), set(kinds[2:])
    scan_first = first == {"scan"} or last == {"detector"}
    detector_first = first == {"detector"} or last == {"scan"}
    if scan_first != detector_first:  # one pair calibrated is enough; a contradiction tells nothing
        return DM_SCAN_FIRST if scan_first else DM_DETECTOR_FIRST
    return None


def open_dm(path: Path, dataset: str | None):
    from ptycore.data.readers import Frames

    what = "Gatan DigitalMicrograph"
    if dataset is not None:
        raise InvalidData(f"{path}: {what} files are read whole; drop ':{dataset}'")
    signal = read_rsciio("digitalmicrograph", path, what)
    data = signal["data"]
    axes = list(signal.get("axes") or [])
    header = header_from_signal(signal)
    layout = dm_layout(signal) if np.ndim(data) == 4 else None
    if layout == DM_DETECTOR_FIRST:  # the header's scan and detector calibrations from the right axes
        for key in ("scan_shape", "scan_step_A", "detector_pixel_mrad", "detector_pixel_invA"):
            header.pop(key, None)
        header.update(header_from_axes(axes[2:] + axes[:2], 4))
    elif np.ndim(data) == 4 and layout is None:  # which axes are the scan is not known: the metadata decides
        for key in ("scan_shape", "scan_step_A", "detector_pixel_mrad", "detector_pixel_invA"):
            header.pop(key, None)
    frames = Frames(data, str(path), axes=layout)
    _check_readable(frames, str(path))
    source = _source(path, None, "digitalmicrograph", frames, header)
    source.fixed_axes = layout is not None or np.ndim(data) == 3
    return source


# ---------------------------------------------------------------- Thermo Fisher Velox EMD
def velox_header(signal: dict, n_frames: int) -> dict:
    """What Velox's metadata record holds beyond rosettasciio's mapping: the scan (``Scan.ScanSize``,
    the step from ``Optics.FullScanFieldOfView`` over the ``Scan.ScanArea`` fraction), the
    convergence semi-angle (``Optics.BeamConvergence``, rad) and the exposure per frame (the
    detector's ``ExposureTime``, else ``Scan.DwellTime``). Velox stores the frames of a 4D-STEM scan
    as one stack in scan order."""
    om = signal.get("original_metadata") or {}
    header: dict[str, Any] = {}
    size = _walk(om, "Scan.ScanSize") or {}
    try:
        ny, nx = int(size.get("height")), int(size.get("width"))
    except (TypeError, ValueError):
        ny = nx = 0
    if ny > 0 and nx > 0 and ny * nx == n_frames:
        header["scan_shape"] = [ny, nx]
        fov = _walk(om, "Optics.FullScanFieldOfView") or {}
        area = _walk(om, "Scan.ScanArea") or {}

        def fraction(low, high):
            try:
                value = float(area[high]) - float(area[low])
            except (KeyError, TypeError, ValueError):
                return 1.0
            return value if 0 < value <= 1 else 1.0

        fov_y, fov_x = _positive(fov.get("y")), _positive(fov.get("x"))
        if fov_y and fov_x:  # metres
            header["scan_step_A"] = [fov_y * 1e10 * fraction("top", "bottom") / ny,
                                     fov_x * 1e10 * fraction("left", "right") / nx]
    if (v := _positive(_walk(om, "Optics.BeamConvergence"))) is not None:
        header["convergence_mrad"] = v * 1e3
    index = _walk(om, "BinaryResult.DetectorIndex")
    exposure = _positive(_walk(om, f"Detectors.Detector-{index}.ExposureTime")) if index is not None else None
    if exposure is None:
        exposure = _positive(_walk(om, "Scan.DwellTime"))
    if exposure is not None:
        header["exposure_s"] = exposure
    return header


def is_velox(signal: dict) -> bool:
    om = signal.get("original_metadata") or {}
    return isinstance(om.get("BinaryResult"), dict) and isinstance(om.get("Optics"), dict)


def open_emd(path: Path, dataset: str | None):
    from ptycore.data.readers import Frames

    if dataset is not None:
        raise InvalidData(f"{path}: EMD files are read whole; drop ':{dataset}'")
    signal = read_rsciio("emd", path, "EMD")
    frames = Frames(signal["data"], str(path))
    _check_readable(frames, str(path))
    header = header_from_signal(signal)
    fmt = "emd"
    if is_velox(signal):
        fmt = "velox-emd"
        header.update(velox_header(signal, frames.shape[0]))
    return _source(path, None, fmt, frames, header)
