"""Small files in two formats no library here writes, built from their published layouts:

* Gatan DigitalMicrograph ``.dm3`` / ``.dm4``: a big-endian header (version, size, byte order of
  the data) and one tree of tag groups and data tags. A data tag is ``%%%%``, an "info array" of
  type codes (big-endian, 4-byte in DM3 and 8-byte in DM4) and its value in the data byte order;
  DM4 adds an 8-byte size before every tag's content. Images are the groups of ``ImageList``
  (``ImageData``: ``Data`` as a typed array, ``DataType``, ``Dimensions`` fastest first, and
  ``Calibrations.Dimension`` with Origin / Scale / Units per dimension); ``Thumbnails`` names the
  preview image. Strings are arrays of uint16 characters, as GMS writes them.
* Thermo Fisher Velox ``.emd``: HDF5 with ``/Version`` (a JSON string) and, per image or frame
  stack, ``/Data/Image/<uuid>/Data`` of shape ``(rows, columns, frames)`` beside
  ``/Data/Image/<uuid>/Metadata``, the acquisition record as JSON bytes (one column per frame).
"""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import h5py
import numpy as np

# ---------------------------------------------------------------- Gatan DM3 / DM4
#: DM type codes of simple values, and their struct formats
DM_SIMPLE = {np.dtype("int16"): (2, "h"), np.dtype("int32"): (3, "i"), np.dtype("uint16"): (4, "H"),
             np.dtype("uint32"): (5, "I"), np.dtype("float32"): (6, "f"), np.dtype("float64"): (7, "d"),
             np.dtype("bool"): (8, "?"), np.dtype("int8"): (9, "b"), np.dtype("uint8"): (10, "B"),
             np.dtype("int64"): (11, "q"), np.dtype("uint64"): (12, "Q")}
#: ImageData.DataType codes of pixel types
DM_IMAGE_TYPE = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
                 np.dtype("int8"): 9, np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}


class _DMWriter:
    def __init__(self, version: int):
        assert version in (3, 4)
        self.version = version
        self.q = ">q" if version == 4 else ">i"  # the size of counts, lengths and type codes

    def ints(self, *values) -> bytes:
        return b"".join(struct.pack(self.q, v) for v in values)

    def tag(self, name: str, value) -> bytes:
        label = name.encode("latin-1")
        if isinstance(value, dict | list):
            body = self.group(value)
            kind = 20
        else:
            body = b"%%%%" + self.value(value)
            kind = 21
        size = struct.pack(">q", len(body)) if self.version == 4 else b""
        return struct.pack(">bh", kind, len(label)) + label + size + body

    def group(self, content) -> bytes:
        """A tag group: sorted and open flags, the count, the tags (a list: unnamed tags)."""
        items = list(content.items()) if isinstance(content, dict) else [("", v) for v in content]
        return b"\x00\x00" + self.ints(len(items)) + b"".join(self.tag(k, v) for k, v in items)

    def value(self, value) -> bytes:
        """The info array and the value of a data tag (values little-endian)."""
        if isinstance(value, str):  # an array of uint16 characters
            chars = np.frombuffer(value.encode("utf-16-le"), "<u2")
            return self.ints(3, 20, 4, len(chars)) + chars.tobytes()
        if isinstance(value, np.ndarray):  # an array of one simple type (the image data among them)
            code, _ = DM_SIMPLE[value.dtype]
            return self.ints(3, 20, code, value.size) + value.astype(value.dtype.newbyteorder("<")).tobytes()
        if isinstance(value, tuple):  # a struct of simple fields (float64 here)
            fields = self.ints(*[x for _ in value for x in (0, 7)])
            return self.ints(3 + 2 * len(value), 15, 0, len(value)) + fields + struct.pack(f"<{len(value)}d", *value)
        dtype = np.dtype(bool if isinstance(value, bool) else "int32" if isinstance(value, int) else "float64")
        code, fmt = DM_SIMPLE[dtype]
        return self.ints(1, code) + struct.pack("<" + fmt, value)

    def file(self, root: dict) -> bytes:
        tree = self.group(root) + b"\x00" * 8  # the root group (no size of its own) and the end mark
        size = struct.pack(">q" if self.version == 4 else ">i", len(tree))
        return struct.pack(">i", self.version) + size + struct.pack(">i", 1) + tree  # 1: data little-endian


def dm_image(data: np.ndarray, calibrations: list[tuple[float, float, str]], tags: dict | None = None,
             name: str = "4D-STEM") -> dict:
    """An ImageList entry: ``data`` in C order with ``calibrations`` (origin, scale, units) per
    array axis; DM lists dimensions fastest first, so both are written reversed."""
    assert len(calibrations) == data.ndim
    return {
        "ImageData": {
            "Calibrations": {
                "Brightness": {"Origin": 0.0, "Scale": 1.0, "Units": "Counts"},
                "Dimension": [{"Origin": o, "Scale": s, "Units": u} for o, s, u in reversed(calibrations)],
                "DisplayCalibratedUnits": True,
            },
            "Data": np.ascontiguousarray(data).ravel(),
            "DataType": DM_IMAGE_TYPE[data.dtype],
            "Dimensions": [int(n) for n in reversed(data.shape)],
            "PixelDepth": int(data.dtype.itemsize),
        },
        "ImageTags": tags or {},
        "Name": name,
        "UniqueID": {"0": 17, "1": 23, "2": 5, "3": 11},
    }


def write_dm(path: Path, images: list[dict], version: int = 4) -> Path:
    """A DM3 / DM4 file of ``images`` (see :func:`dm_image`) after a 2-D thumbnail, as GMS saves."""
    thumbnail = dm_image(np.zeros((4, 4), np.uint8), [(0.0, 1.0, ""), (0.0, 1.0, "")], name="thumbnail")
    root = {
        "ApplicationBounds": (0.0, 0.0, 1024.0, 1280.0),
        "DocumentObjectList": [{"ImageDisplayType": 1}],
        "ImageList": [thumbnail, *images],
        "Image Behavior": {"ViewDisplayID": 8},
        "Thumbnails": [{"ImageIndex": 0, "SourceSize_Pixels": (4.0, 4.0)}],
    }
    path.write_bytes(_DMWriter(version).file(root))
    return path


# ---------------------------------------------------------------- Thermo Fisher Velox EMD
def velox_metadata(*, scan_shape=None, fov_m=None, scan_area=None, pixel_size=None, pixel_unit="m",
                   voltage_v=300e3, convergence_rad=None, camera_length_m=None, exposure_s=None,
                   dwell_s=None, detector="BM-Ceta") -> dict:
    """The acquisition record Velox keeps beside each image (strings, SI units, angles in rad)."""
    optics: dict = {"AccelerationVoltage": repr(float(voltage_v)), "OpticalMode": "STEM"}
    if convergence_rad is not None:
        optics["BeamConvergence"] = repr(convergence_rad)
    if camera_length_m is not None:
        optics["CameraLength"] = repr(camera_length_m)
    if fov_m is not None:
        optics["FullScanFieldOfView"] = {"x": repr(fov_m[1]), "y": repr(fov_m[0])}
    scan: dict = {"ScanRotation": "0", "FrameTime": "0.5"}
    if scan_shape is not None:
        scan["ScanSize"] = {"width": str(scan_shape[1]), "height": str(scan_shape[0])}
    if scan_area is not None:
        scan["ScanArea"] = {k: repr(v) for k, v in zip(("top", "left", "bottom", "right"), scan_area, strict=True)}
    if dwell_s is not None:
        scan["DwellTime"] = repr(dwell_s)
    det: dict = {"DetectorName": detector, "DetectorType": "ImagingDetector", "Inserted": "true"}
    if exposure_s is not None:
        det["ExposureTime"] = repr(exposure_s)
    px = pixel_size or (1.0, 1.0)
    return {
        "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1717171717"}, "SourceType": "XFEG"},
        "BinaryResult": {"AcquisitionUnit": "", "CompositionType": "Collection", "DetectorIndex": "0",
                         "Detector": detector, "PixelSize": {"width": repr(px[1]), "height": repr(px[0])},
                         "PixelUnitX": pixel_unit, "PixelUnitY": pixel_unit, "Offset": {"x": "0", "y": "0"}},
        "Detectors": {"Detector-0": det},
        "Instrument": {"InstrumentClass": "Titan", "InstrumentModel": "Spectra 300", "Manufacturer": "FEI Company"},
        "Optics": optics,
        "Scan": scan,
        "Stage": {"AlphaTilt": "0", "BetaTilt": "0", "Position": {"x": "0", "y": "0", "z": "0"}},
    }


def _metadata_columns(record: dict, n_frames: int) -> np.ndarray:
    text = np.frombuffer(json.dumps(record).encode(), np.uint8)
    columns = np.zeros((text.size + 64, n_frames), np.uint8)  # zero-padded, as Velox leaves them
    columns[: text.size] = text[:, None]
    return columns


def write_velox(path: Path, images: list[tuple[np.ndarray, dict]]) -> Path:
    """A Velox EMD of ``images``: each (frames, rows, columns) stack with its metadata record;
    stored as Velox does, (rows, columns, frames) with one frame per chunk."""
    with h5py.File(path, "w") as f:
        f["Version"] = np.array([json.dumps({"format": "Velox", "version": "11"}).encode()])
        group = f.create_group("Data/Image")
        for k, (stack, record) in enumerate(images):
            sub = group.create_group(uuid.UUID(int=k + 1).hex)
            stored = np.moveaxis(np.asarray(stack), 0, -1)
            sub.create_dataset("Data", data=stored, chunks=stored.shape[:2] + (1,))
            sub["Metadata"] = _metadata_columns(record, stored.shape[-1])
    return path
