"""Acquisition metadata: the YAML record that travels beside raw patterns (validated with pydantic).

Units are in the key names: kV, mrad, Å, degrees, e/Å². Unknown keys are an error with a
suggestion, so a misspelt key never silently falls back to a default.
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


def _format_error(err: ValidationError, source: str) -> str:
    errors = err.errors()
    # a misspelt key shows up as an unknown key and a missing one: name the misspelling
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        known = list(AcquisitionMetadata.model_fields)
        hint = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})")
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif isinstance(first.get("input"), float) and math.isnan(first["input"]):
        msg = "is not a number (NaN)"
    return f"{source}: {where}: {msg}"


def parse_metadata(record: dict, source: str = "metadata") -> AcquisitionMetadata:
    """Validate a metadata mapping; raise :class:`InvalidData` with one line naming the key."""
    if not isinstance(record, dict):
        raise InvalidData(f"{source}: expected a mapping of keys, got {type(record).__name__}")
    try:
        return AcquisitionMetadata.model_validate(record)
    except ValidationError as err:
        raise InvalidData(_format_error(err, source)) from None


def load_metadata(path: str | Path) -> AcquisitionMetadata:
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"{path}: metadata file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidData(f"{path}: not valid YAML ({err.__class__.__name__}: {str(err).splitlines()[0]})") from None
    return parse_metadata(record, str(path))


def dump_metadata(meta: AcquisitionMetadata, path: str | Path) -> None:
    record = meta.model_dump(mode="json", exclude_none=True)
    Path(path).write_text(yaml.safe_dump(record, sort_keys=False))
