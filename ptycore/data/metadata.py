"""Acquisition metadata: the YAML record that travels beside raw patterns (validated with pydantic).

Units are in the key names: kV, mrad, Å, degrees, e/Å², mm, s. Unknown keys are an error with a
suggestion, so a misspelt key never silently falls back to a default.

Where the pattern file's header carries acquisition values (energy, convergence, scan shape and
step, detector pixel, camera length, exposure: see :mod:`ptycore.data.formats`), they fill the
keys the YAML leaves out; a key in the YAML overrides the header. :func:`merge_header` returns
the merged record and, per key, where its value came from (recorded in the data store's
provenance).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ptycore.errors import InvalidData
from ptycore.physics.probe import ABERRATION_ANGLES, ABERRATION_ORDERS

#: names of the axes of a pattern array (``pattern_axes``): the scan as rows and columns, or as
#: one flat position index, and the two detector axes
AXIS_NAMES = ("scan_y", "scan_x", "n_pos", "ky", "kx")


def check_pattern_axes(axes) -> tuple[str, ...]:
    """``pattern_axes`` must name ky and kx once and either n_pos or both scan_y and scan_x."""
    axes = tuple(axes)
    unknown = [a for a in axes if a not in AXIS_NAMES]
    if unknown:
        raise ValueError(f"unknown axis {unknown[0]!r} (axes are {', '.join(AXIS_NAMES)})")
    if len(set(axes)) != len(axes):
        raise ValueError(f"an axis is named twice in {list(axes)}")
    if sorted(axes) not in (sorted(("n_pos", "ky", "kx")), sorted(("scan_y", "scan_x", "ky", "kx"))):
        raise ValueError(f"{list(axes)} must be an order of [n_pos, ky, kx] or of [scan_y, scan_x, ky, kx]")
    return axes


class DetectorFlip(BaseModel):
    """Detector orientation fix applied once at ingest: transpose first, then flips."""

    model_config = ConfigDict(extra="forbid")
    transpose: bool = False
    flip_y: bool = False
    flip_x: bool = False


class AcquisitionMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    energy_kv: float = Field(gt=0, le=2000, description="acceleration voltage in kV")
    convergence_mrad: float = Field(gt=0, le=200, description="probe convergence semi-angle in mrad")
    scan_shape: tuple[int, int] = Field(description="[ny, nx] probe positions")
    scan_step_A: tuple[float, float] = Field(description="[dy, dx] scan step in Å")
    detector_pixel_mrad: float | None = Field(default=None, gt=0, description="angular size of one detector pixel")
    detector_pixel_invA: float | None = Field(default=None, gt=0, description="reciprocal size of one detector pixel")
    defocus_A: float = Field(default=0.0, description="defocus in Å, = -C10 (abTEM's sign: positive = underfocus)")
    aberrations: dict[str, float] = Field(default_factory=dict, description="C12, phi12, C21, ... in Å and rad")
    scan_rotation_deg: float = 0.0
    detector_flip: DetectorFlip = Field(default_factory=DetectorFlip)
    pattern_axes: tuple[str, ...] | None = Field(
        default=None, description="axis order of the pattern array, e.g. [ky, kx, scan_y, scan_x]; "
        "default (scan_y, scan_x, ky, kx) / (n_pos, ky, kx), or inferred from the shape")
    detector_mask: str | None = Field(
        default=None, description="file of a (ky, kx) mask, True/non-zero = good pixel (relative to the YAML)")
    bad_pixels: list[tuple[int, int]] = Field(default_factory=list, description="[[y, x], ...] bad detector pixels")
    chip_edge_px: int | None = Field(
        default=None, ge=0, description="pixels flagged each side of a chip boundary of a multi-chip Merlin "
        "(default 1; 0 flags none)")
    camera_length_mm: float | None = Field(default=None, gt=0, description="camera length in mm (recorded)")
    exposure_s: float | None = Field(default=None, gt=0, description="exposure (dwell) per pattern in s")
    dose_e_per_A2: float | None = Field(default=None, gt=0)
    thickness_A: float | None = Field(default=None, gt=0)
    sample: Any = None
    instrument: Any = None

    @field_validator("scan_shape")
    @classmethod
    def _positive_shape(cls, v):
        if min(v) < 1:
            raise ValueError("both entries must be >= 1")
        return v

    @field_validator("pattern_axes")
    @classmethod
    def _pattern_axes(cls, v):
        return None if v is None else check_pattern_axes(v)

    @field_validator("bad_pixels")
    @classmethod
    def _pixels_non_negative(cls, v):
        for yx in v:
            if min(yx) < 0:
                raise ValueError(f"pixel {list(yx)}: indices must be >= 0")
        return v

    @field_validator("scan_step_A")
    @classmethod
    def _positive_step(cls, v):
        if min(v) <= 0:
            raise ValueError("both entries must be > 0 Å")
        return v

    @field_validator("aberrations")
    @classmethod
    def _known_aberrations(cls, v):
        for key in v:
            if key not in ABERRATION_ORDERS and key not in ABERRATION_ANGLES:
                hint = difflib.get_close_matches(key, list(ABERRATION_ORDERS) + sorted(ABERRATION_ANGLES), n=1)
                raise ValueError(f"unknown aberration {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if "C10" in v:
            raise ValueError("give defocus as defocus_A (= -C10), not aberrations.C10")
        return v

    @model_validator(mode="after")
    def _one_detector_sampling(self):
        if (self.detector_pixel_mrad is None) == (self.detector_pixel_invA is None):
            raise ValueError("give exactly one of detector_pixel_mrad or detector_pixel_invA")
        return self

    def detector_pixel_mrad_at(self, wavelength_A: float) -> float:
        """Detector pixel in mrad, converting from 1/Å if that is what was given."""
        if self.detector_pixel_mrad is not None:
            return self.detector_pixel_mrad
        return self.detector_pixel_invA * wavelength_A * 1e3


def _format_error(err: ValidationError, source: str, sources: dict[str, str] | None = None,
                  missing_hint: str = "") -> str:
    errors = err.errors()
    # a misspelt key shows up as an unknown key and a missing one: name the misspelling
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if sources and first["loc"] and str(first["loc"][0]) in sources:
        source = sources[str(first["loc"][0])]  # a value from the file header is named as such
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        known = list(AcquisitionMetadata.model_fields)
        hint = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})")
    elif first["type"] == "missing":
        msg = "required key is missing" + missing_hint
    elif isinstance(first.get("input"), float) and math.isnan(first["input"]):
        msg = "is not a number (NaN)"
    else:
        msg = f"{msg} (got {first.get('input')!r})"
    return f"{source}: {where}: {msg}"


def parse_metadata(record: dict, source: str = "metadata", *, sources: dict[str, str] | None = None,
                   missing_hint: str = "") -> AcquisitionMetadata:
    """Validate a metadata mapping; raise :class:`InvalidData` with one line naming the key.

    ``sources`` (key → where its value came from) makes an invalid value from a file header name
    that header instead of ``source``; ``missing_hint`` is added to a missing key's message."""
    if not isinstance(record, dict):
        raise InvalidData(f"{source}: expected a mapping of keys, got {type(record).__name__}")
    try:
        return AcquisitionMetadata.model_validate(record)
    except ValidationError as err:
        raise InvalidData(_format_error(err, source, sources, missing_hint)) from None


def read_metadata_record(path: str | Path) -> dict:
    """The YAML mapping of a metadata file, not yet validated (so a file header can fill it)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"{path}: metadata file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidData(f"{path}: not valid YAML ({err.__class__.__name__}: {str(err).splitlines()[0]})") from None
    record = {} if record is None else record
    if not isinstance(record, dict):
        raise InvalidData(f"{path}: expected a mapping of keys, got {type(record).__name__}")
    return record


def load_metadata(path: str | Path) -> AcquisitionMetadata:
    return parse_metadata(read_metadata_record(path), str(path))


def merge_header(record: dict, header: dict, record_source: str, header_source: str) -> tuple[dict, dict[str, str]]:
    """The YAML ``record`` over the file ``header``: (merged mapping, key → source of its value).

    A key in the YAML wins; a header value fills a key the YAML leaves out. The detector pixel is
    one quantity given in either unit: a YAML ``detector_pixel_mrad`` or ``detector_pixel_invA``
    overrides both header forms."""
    merged = dict(record)
    sources = {key: record_source for key in record}
    pixel_keys = ("detector_pixel_mrad", "detector_pixel_invA")
    yaml_has_pixel = any(k in record for k in pixel_keys)
    for key, value in header.items():
        if key in record or value is None or (key in pixel_keys and yaml_has_pixel):
            continue
        merged[key] = value
        sources[key] = header_source
    return merged, sources


def dump_metadata(meta: AcquisitionMetadata, path: str | Path) -> None:
    record = meta.model_dump(mode="json", exclude_none=True)
    Path(path).write_text(yaml.safe_dump(record, sort_keys=False))
