"""Facility detector formats: small files written here (byte-level where rosettasciio has no writer:
Merlin, EMPAD, MRC here, Gatan DM3/DM4 and Velox EMD in ``_formats_files``), read back through
``ptycore ingest`` with the values their headers carry.
"""

from __future__ import annotations

import struct

import h5py
import hdf5plugin
import numpy as np
import pytest
import zarr
from _formats_files import dm_image, velox_metadata, write_dm, write_velox
from _ptydata import assert_refused, write_meta

from ptycore.cli import main
from ptycore.data.readers import open_patterns


def counts(shape, seed=0, high=1000):
    """Patterns whose every value differs (a misplaced frame or axis shows)."""
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(np.uint16)


def ingest(tmp_path, patterns, meta=None, name="data.zarr"):
    out = tmp_path / name
    argv = ["ingest", "--patterns", str(patterns), "--out", str(out), "--quiet"]
    if meta is not None:
        argv += ["--meta", str(meta)]
    assert main(argv) == 0
    return zarr.open_group(str(out), mode="r")


def meta_yaml(tmp_path, **keys):
    return write_meta(tmp_path / "meta.yaml", keys)


# ---------------------------------------------------------------- Merlin .mib + .hdr
def mib_header(i, ny, nx, quad=False):
    size = 768 if quad else 384
    fields = ["MQ1", f"{i + 1:06d}", f"{size:05d}", "04" if quad else "01", f"{nx:04d}", f"{ny:04d}", "U16",
              "   2x2" if quad else "   1x1", "0F" if quad else "01", "2024-05-18 11:43:50.123456", "0.001000",
              "0", "0", "0", "1.200000E+2", "5.110000E+2", *["0.000000E+0"] * 6, "3RX",
              *["100"] * 25, "MQ1A", f"2024-05-18T11:43:50.{i * 1000:06d}Z", "1000000ns", "12", ""]
    text = ",".join(fields).encode()
    assert len(text) <= size
    return text.ljust(size, b" ")


def write_mib(path, frames, scan_shape, quad=False, hdr=True):
    ny, nx = frames.shape[-2:]
    with open(path, "wb") as f:
        for i, frame in enumerate(frames.reshape(-1, ny, nx)):
            f.write(mib_header(i, ny, nx, quad))
            f.write(frame.astype(">u2").tobytes())
    if hdr:
        path.with_suffix(".hdr").write_text(
            "HDR,\t\nTime and Date Stamp (day, mnth, yr, hr, min, s):\t18/05/2024 11:43:50\n"
            f"Chip ID:\tW530_E5,-,-,-\nAssembly Size (NX1, 2X2):\t{'2x2' if quad else '1x1'}\n"
            f"Frames in Acquisition (Number):\t{scan_shape[0] * scan_shape[1]}\n"
            f"Frames per Trigger (Number):\t{scan_shape[1]}\nEnd\t\n")
    return path


def test_merlin_single_chip_scan_shape_and_exposure_from_the_headers(tmp_path):
    from rsciio.quantumdetector import file_reader

    frames = counts((3, 4, 16, 12))
    mib = write_mib(tmp_path / "scan.mib", frames, (3, 4))
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=5, scan_step_A=[0.5, 0.5], detector_pixel_mrad=1.0)
    group = ingest(tmp_path, mib, meta)
    stored = group["patterns"][...]
    # rows flipped as rosettasciio (and HyperSpy) show Merlin frames
    np.testing.assert_array_equal(stored, frames[..., ::-1, :].reshape(12, 16, 12))
    library = np.asarray(file_reader(str(mib), lazy=False)[0]["data"]).reshape(12, 16, 12)
    np.testing.assert_array_equal(stored, library)
    attrs = dict(group.attrs)
    assert attrs["scan_shape"] == [3, 4]
    assert attrs["metadata"]["exposure_s"] == pytest.approx(1e-3)
    sources = attrs["provenance"]["metadata_sources"]
    assert sources["scan_shape"] == sources["exposure_s"] == f"header of {mib}"
    assert sources["energy_kv"] == str(meta)
    assert str(mib.with_suffix(".hdr")) in attrs["provenance"]["inputs"]
    assert group["detector_mask"][...].all()  # a single chip: no gaps


def test_merlin_quad_flags_the_chip_boundaries(tmp_path):
    frames = counts((2, 2, 512, 512), high=50)
    mib = write_mib(tmp_path / "quad.mib", frames, (2, 2), quad=True)
    meta = meta_yaml(tmp_path, energy_kv=200, convergence_mrad=20, scan_step_A=[1, 1], detector_pixel_mrad=0.2)
    group = ingest(tmp_path, mib, meta)
    good = group["detector_mask"][...]
    assert good.shape == (512, 512) and good.dtype == bool
    bad_rows, bad_cols = np.nonzero(~good.any(axis=1))[0], np.nonzero(~good.any(axis=0))[0]  # whole lines
    assert list(bad_rows) == [255, 256] and list(bad_cols) == [255, 256]
    assert (~good).sum() == 4 * 512 - 4 == group.attrs["detector_mask_bad_pixels"]
    np.testing.assert_array_equal(group["patterns"][3], frames[1, 1, ::-1, :])
    # a wider boundary on request, none with 0
    meta = meta_yaml(tmp_path, energy_kv=200, convergence_mrad=20, scan_step_A=[1, 1], detector_pixel_mrad=0.2,
                     chip_edge_px=3)
    wide = ~ingest(tmp_path, mib, meta, "wide.zarr")["detector_mask"][...]
    assert wide.sum() == 2 * 6 * 512 - 6 * 6  # 6 whole rows and 6 whole columns
    meta = meta_yaml(tmp_path, energy_kv=200, convergence_mrad=20, scan_step_A=[1, 1], detector_pixel_mrad=0.2,
                     chip_edge_px=0)
    assert ingest(tmp_path, mib, meta, "none.zarr")["detector_mask"][...].all()


def test_merlin_without_hdr_needs_the_scan_shape(tmp_path, capsys):
    frames = counts((2, 3, 8, 8))
    mib = write_mib(tmp_path / "scan.mib", frames, (2, 3), hdr=False)
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=3, scan_step_A=[1, 1], detector_pixel_mrad=1.0)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(mib), "--meta", str(meta), "--out", str(out)], out, [mib],
                   [str(meta), "scan_shape: required key is missing", f"not in the header of {mib}"])
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=3, scan_step_A=[1, 1], detector_pixel_mrad=1.0,
                     scan_shape=[2, 3])
    np.testing.assert_array_equal(ingest(tmp_path, mib, meta)["patterns"][4], frames[1, 1, ::-1])


def test_truncated_mib_is_one_line(tmp_path, capsys):
    mib = write_mib(tmp_path / "scan.mib", counts((2, 3, 8, 8)), (2, 3))
    mib.write_bytes(mib.read_bytes()[:-100])  # the last frame cut short: 5 whole frames
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=5, scan_step_A=[1, 1], detector_pixel_mrad=1.0)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(mib), "--meta", str(meta), "--out", str(out)], out, [mib],
                   [str(mib)])


# ---------------------------------------------------------------- EMPAD .raw + .xml
EMPAD_XML = """<root name="test"><timestamp isoformat="2024-03-25T16:47:52.586728"/>
<raw_file filename="{raw}"/><exposure_time>2</exposure_time>
<scan_parameters mode="acquire"><scan_size>0.6</scan_size><scan_resolution_y>{ny}</scan_resolution_y>
<scan_resolution_x>{nx}</scan_resolution_x></scan_parameters>
<iom_measurements><scan_rotation>0.0</scan_rotation><full_scan_field_of_view><scale_factor>0.72</scale_factor>
<x>{fov}</x><y>{fov}</y></full_scan_field_of_view><nominal_camera_length>0.369</nominal_camera_length>
<high_voltage>300000.0</high_voltage></iom_measurements></root>"""


def write_empad(tmp_path, ny=3, nx=4):
    frames = np.random.default_rng(2).random((ny * nx, 130, 128)).astype("<f4") * 100
    frames[:, 128:] = 7e8  # the two metadata rows
    raw = tmp_path / f"scan_x{nx}_y{ny}.raw"
    frames.tofile(raw)
    step_m = 2e-10
    xml = tmp_path / "acquisition.xml"
    xml.write_text(EMPAD_XML.format(raw=raw.name, ny=ny, nx=nx, fov=step_m * max(ny, nx) * 0.72))
    return raw, xml, frames[:, :128]


@pytest.mark.parametrize("which", ["xml", "raw"])
def test_empad_scan_and_acquisition_from_the_xml(tmp_path, which):
    raw, xml, frames = write_empad(tmp_path)
    meta = meta_yaml(tmp_path, convergence_mrad=20, detector_pixel_mrad=0.5)  # the xml has the rest
    group = ingest(tmp_path, xml if which == "xml" else raw, meta)
    np.testing.assert_array_equal(group["patterns"][...], frames)
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [3, 4] and md["energy_kv"] == pytest.approx(300)
    assert md["scan_step_A"] == pytest.approx([2.0, 2.0])
    assert md["camera_length_mm"] == pytest.approx(369) and md["exposure_s"] == pytest.approx(2e-3)
    prov = group.attrs["provenance"]
    assert prov["metadata_sources"]["energy_kv"] == f"header of {raw}"
    assert prov["metadata_sources"]["convergence_mrad"] == str(meta)
    assert str(xml) in prov["inputs"] and str(raw) in prov["inputs"]


def test_metadata_yaml_overrides_the_header(tmp_path):
    raw, xml, _ = write_empad(tmp_path)
    meta = meta_yaml(tmp_path, convergence_mrad=20, detector_pixel_mrad=0.5, energy_kv=200, scan_step_A=[1.5, 1.5])
    group = ingest(tmp_path, xml, meta)
    assert group.attrs["metadata"]["energy_kv"] == 200 and group.attrs["metadata"]["scan_step_A"] == [1.5, 1.5]
    prov = group.attrs["provenance"]
    assert prov["metadata_sources"]["energy_kv"] == str(meta)
    assert prov["header"]["energy_kv"] == pytest.approx(300)  # what the header said is kept


def test_empad_raw_missing_frames(tmp_path, capsys):
    raw, xml, _ = write_empad(tmp_path)
    raw.write_bytes(raw.read_bytes()[: 5 * 130 * 128 * 4])
    meta = meta_yaml(tmp_path, convergence_mrad=20, detector_pixel_mrad=0.5)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(xml), "--meta", str(meta), "--out", str(out)], out,
                   [raw, xml], [str(raw), "5 EMPAD frames", "12 frames"])


# ---------------------------------------------------------------- Dectris Arina
def write_arina(tmp_path, n_per_file=(5, 4), shape=(12, 10), bad=(3, 7)):
    stack = counts((sum(n_per_file),) + shape, seed=3)
    master = tmp_path / "scan_master.h5"
    with h5py.File(master, "w") as f:
        start = 0
        for i, n in enumerate(n_per_file, start=1):
            data_file = tmp_path / f"scan_data_{i:06d}.h5"
            with h5py.File(data_file, "w") as d:
                d.create_dataset("entry/data/data", data=stack[start : start + n], chunks=(1,) + shape,
                                 **hdf5plugin.Bitshuffle(cname="lz4"))
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(data_file.name, "entry/data/data")
            start += n
        det = f.create_group("entry/instrument/detector")
        det["count_time"] = 5e-4
        mask = np.zeros(shape, np.uint32)
        mask[bad] = 1  # Dectris: non-zero = dead / hot pixel
        det["detectorSpecific/pixel_mask"] = mask
    return master, stack


def test_arina_master_and_bitshuffle_data_files(tmp_path):
    master, stack = write_arina(tmp_path)
    with h5py.File(tmp_path / "scan_data_000001.h5") as f:
        plist = f["entry/data/data"].id.get_create_plist()
        assert hdf5plugin.BSHUF_ID in {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    meta = meta_yaml(tmp_path, energy_kv=120, convergence_mrad=10, scan_shape=[3, 3], scan_step_A=[1, 1],
                     detector_pixel_mrad=2.0)
    group = ingest(tmp_path, master, meta)
    np.testing.assert_array_equal(group["patterns"][...], stack)  # frames of both data files, in order
    good = group["detector_mask"][...]
    assert not good[3, 7] and good.sum() == good.size - 1
    assert group.attrs["metadata"]["exposure_s"] == pytest.approx(5e-4)
    assert str(tmp_path / "scan_data_000002.h5") in group.attrs["provenance"]["inputs"]


def test_arina_missing_data_file(tmp_path, capsys):
    master, _ = write_arina(tmp_path)
    (tmp_path / "scan_data_000002.h5").unlink()
    meta = meta_yaml(tmp_path, energy_kv=120, convergence_mrad=10, scan_shape=[3, 3], scan_step_A=[1, 1],
                     detector_pixel_mrad=2.0)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(master), "--meta", str(meta), "--out", str(out)], out,
                   [master], [str(master), "data_000002", "missing"])


# ---------------------------------------------------------------- MRC
def write_mrc(path, stack):
    """An MRC2014 file: the 1024-byte header (NX, NY, NZ, MODE 2, ..., 'MAP ', stamp) and float32 frames."""
    nz, ny, nx = stack.shape
    header = bytearray(1024)
    struct.pack_into("<4i", header, 0, nx, ny, nz, 2)
    struct.pack_into("<3i", header, 28, nx, ny, nz)  # MX, MY, MZ
    struct.pack_into("<3f", header, 40, nx, ny, nz)  # cell in Å
    struct.pack_into("<3i", header, 64, 1, 2, 3)  # MAPC, MAPR, MAPS
    struct.pack_into("<i", header, 92, 0)  # NEXT: no extended header
    header[208:212] = b"MAP "
    header[212:214] = b"\x44\x44"
    path.write_bytes(bytes(header) + stack.astype("<f4").tobytes())
    return path


def test_mrc_frame_stack(tmp_path):
    stack = counts((6, 10, 10), seed=4).astype(np.float32)
    mrc = write_mrc(tmp_path / "scan.mrc", stack)
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=10, scan_shape=[2, 3], scan_step_A=[1, 1],
                     detector_pixel_mrad=3.0)
    group = ingest(tmp_path, mrc, meta)
    np.testing.assert_array_equal(group["patterns"][...], stack)
    assert group.attrs["provenance"]["patterns"]["format"] == "mrc"


# ---------------------------------------------------------------- EMD (Berkeley / NCEM) and py4DSTEM
def test_berkeley_emd_written_by_rosettasciio(tmp_path):
    from rsciio.emd import file_writer

    data = counts((2, 3, 8, 8), seed=5)
    axes = [{"name": n, "scale": s, "offset": 0.0, "units": u, "size": k, "navigate": nav}
            for n, s, u, k, nav in [("y", 0.05, "nm", 2, True), ("x", 0.05, "nm", 3, True),
                                    ("ky", 1.5, "mrad", 8, False), ("kx", 1.5, "mrad", 8, False)]]
    emd = tmp_path / "scan.emd"
    file_writer(str(emd), {"data": data, "axes": axes, "metadata": {"General": {"title": "scan"}, "Signal": {}},
                           "original_metadata": {}})
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=5)
    group = ingest(tmp_path, emd, meta)
    np.testing.assert_array_equal(group["patterns"][...], data.reshape(6, 8, 8))
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [2, 3] and md["scan_step_A"] == pytest.approx([0.5, 0.5])
    assert md["detector_pixel_mrad"] == pytest.approx(1.5)


def write_py4dstem(path, data, r_step_A, q_pixel_invA):
    """The emdfile layout py4DSTEM (>= 0.14) writes: a root group, a datacube array with dim0..dim3."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"emd_group_type": "file", "version_major": 1, "version_minor": 0})
        root = f.create_group("experiment")
        root.attrs["emd_group_type"] = "root"
        cube = root.create_group("datacube")
        cube.attrs.update({"emd_group_type": 1, "python_class": "DataCube"})
        cube["data"] = data
        for i, (step, units, name) in enumerate([(r_step_A, "A", "Rx"), (r_step_A, "A", "Ry"),
                                                 (q_pixel_invA, "A^-1", "Qx"), (q_pixel_invA, "A^-1", "Qy")]):
            dim = cube.create_dataset(f"dim{i}", data=np.arange(data.shape[i]) * step)
            dim.attrs.update({"name": name, "units": units})


def test_py4dstem_h5_with_its_calibration(tmp_path):
    data = counts((3, 2, 8, 8), seed=6)
    h5 = tmp_path / "scan.h5"
    write_py4dstem(h5, data, 0.4, 0.02)
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=1)
    group = ingest(tmp_path, h5, meta)
    np.testing.assert_array_equal(group["patterns"][...], data.reshape(6, 8, 8))
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [3, 2] and md["scan_step_A"] == pytest.approx([0.4, 0.4])
    assert md["detector_pixel_invA"] == pytest.approx(0.02)
    # the same file read as a plain HDF5 dataset: no header
    group = ingest(tmp_path, f"{h5}:/experiment/datacube/data", meta_yaml(
        tmp_path, energy_kv=300, convergence_mrad=1, scan_shape=[3, 2], scan_step_A=[1, 1], detector_pixel_mrad=1),
        name="plain.zarr")
    np.testing.assert_array_equal(group["patterns"][...], data.reshape(6, 8, 8))


# ---------------------------------------------------------------- Gatan DM3 / DM4
DM_TAGS = {"Microscope Info": {"Voltage": 300000.0, "STEM Camera Length": 115.0, "Illumination Mode": "STEM",
                               "Imaging Mode": "DIFFRACTION", "Name": "ARM200F"},
           "Session Info": {"Operator": "night shift", "Specimen": "SrTiO3"}}


@pytest.mark.parametrize("version", [3, 4])
def test_dm_stemx_scan_first_with_its_tags(tmp_path, version):
    """A GMS STEMx file (``Data Order Swapped`` = 1): the diffraction pattern is the fastest
    dimension; energy, camera length, dwell, scan and detector calibrations from the tags."""
    data = counts((4, 3, 8, 6), seed=7)  # scan 4 x 3, detector 8 rows x 6 columns: a swap shows
    tags = dict(DM_TAGS, **{"Meta Data": {"Format": "Diffraction image", "Data Order Swapped": 1},
                            "DigiScan": {"Sample Time": 1000.0}})  # µs
    dm = write_dm(tmp_path / f"scan.dm{version}", [dm_image(
        data, [(0.0, 0.05, "nm"), (0.0, 0.05, "nm"), (0.0, 0.2, "1/nm"), (0.0, 0.2, "1/nm")], tags)], version)
    meta = meta_yaml(tmp_path, convergence_mrad=1)  # the one value DM does not record
    group = ingest(tmp_path, dm, meta)
    np.testing.assert_array_equal(group["patterns"][...], data.reshape(12, 8, 6))
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [4, 3] and md["scan_step_A"] == pytest.approx([0.5, 0.5])
    assert md["detector_pixel_invA"] == pytest.approx(0.02)
    assert md["energy_kv"] == pytest.approx(300) and md["camera_length_mm"] == pytest.approx(115)
    assert md["exposure_s"] == pytest.approx(1e-3)
    sources = group.attrs["provenance"]["metadata_sources"]
    assert sources["energy_kv"] == sources["scan_step_A"] == sources["exposure_s"] == f"header of {dm}"
    assert sources["convergence_mrad"] == str(meta)


@pytest.mark.parametrize("told_by", ["units", "scan units", "tag"])
def test_dm_diffraction_si_detector_first(tmp_path, told_by):
    """The older layout (DigiScan diffraction SI): DM lists the scan first, so the array is
    (ky, kx, scan_y, scan_x); rosettasciio alone shows the scan as the signal. Told apart by the
    calibrations (of both pairs of axes, or of one), or by ``Data Order Swapped`` = 0 where they
    are missing."""
    scan = counts((4, 3, 8, 6), seed=8)
    stored = np.ascontiguousarray(scan.transpose(2, 3, 0, 1))
    if told_by == "units":
        calibrations = [(0.0, 0.5, "mrad"), (0.0, 0.5, "mrad"), (0.0, 0.04, "nm"), (0.0, 0.06, "nm")]
        tags = dict(DM_TAGS, Acquisition={"Parameters": {"Detector": {"exposure (s)": 0.002}}})
        meta = meta_yaml(tmp_path, convergence_mrad=1)
    elif told_by == "scan units":
        calibrations = [(0.0, 1.0, ""), (0.0, 1.0, ""), (0.0, 40.0, "pm"), (0.0, 60.0, "pm")]
        tags = DM_TAGS
        meta = meta_yaml(tmp_path, convergence_mrad=1, detector_pixel_mrad=0.5)
    else:
        calibrations = [(0.0, 1.0, "")] * 4
        tags = dict(DM_TAGS, **{"Meta Data": {"Data Order Swapped": 0}})
        meta = meta_yaml(tmp_path, convergence_mrad=1, scan_step_A=[0.4, 0.6], detector_pixel_mrad=0.5)
    dm = write_dm(tmp_path / "si.dm4", [dm_image(stored, calibrations, tags)])
    group = ingest(tmp_path, dm, meta)
    np.testing.assert_array_equal(group["patterns"][...], scan.reshape(12, 8, 6))
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [4, 3] and md["scan_step_A"] == pytest.approx([0.4, 0.6])
    assert md["detector_pixel_mrad"] == pytest.approx(0.5)
    if told_by != "tag":
        assert group.attrs["provenance"]["metadata_sources"]["scan_step_A"] == f"header of {dm}"
    if told_by == "units":
        assert md["exposure_s"] == pytest.approx(2e-3)  # tag "exposure (s)", mapped by rosettasciio as exposure_s
        assert group.attrs["provenance"]["metadata_sources"]["scan_shape"] == f"header of {dm}"


def test_dm_uncalibrated_4d_takes_the_axes_from_the_metadata(tmp_path, capsys):
    """No calibrations and no layout tag: which axes are the scan is not guessed from the file;
    the metadata's scan_shape picks the one layout that fits, and without it ingest says so."""
    scan = counts((4, 3, 8, 6), seed=9)
    dm = write_dm(tmp_path / "bare.dm4", [dm_image(np.ascontiguousarray(scan.transpose(2, 3, 0, 1)),
                                                   [(0.0, 1.0, "")] * 4, DM_TAGS)])
    meta = meta_yaml(tmp_path, convergence_mrad=2, scan_shape=[4, 3], scan_step_A=[1, 1], detector_pixel_mrad=1)
    np.testing.assert_array_equal(ingest(tmp_path, dm, meta)["patterns"][...], scan.reshape(12, 8, 6))
    meta = meta_yaml(tmp_path, convergence_mrad=2, scan_step_A=[1, 1], detector_pixel_mrad=1)
    out = tmp_path / "none.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(dm), "--meta", str(meta), "--out", str(out)], out, [dm],
                   ["scan_shape: required key is missing", f"not in the header of {dm}"])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_dm4_is_one_line(tmp_path, capsys, damage):
    dm4 = tmp_path / "scan.dm4"
    if damage == "garbage":
        dm4.write_bytes(b"\x00\x00\x00\x04" + b"not a tag tree" * 10)
    else:  # cut inside the image data
        data = counts((2, 2, 8, 6))
        whole = write_dm(dm4, [dm_image(data, [(0.0, 1.0, "")] * 4)]).read_bytes()
        start = whole.find(data.astype("<u2").tobytes())
        assert start > 0
        dm4.write_bytes(whole[: start + data.nbytes // 2])
    meta = meta_yaml(tmp_path, energy_kv=300, convergence_mrad=5, scan_shape=[2, 2], scan_step_A=[1, 1],
                     detector_pixel_mrad=1)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(dm4), "--meta", str(meta), "--out", str(out)], out, [dm4],
                   [str(dm4), "not a readable Gatan DigitalMicrograph file"])


def test_header_alone_without_meta(tmp_path, capsys):
    """No --meta: what the header lacks is named in one line."""
    raw, xml, _ = write_empad(tmp_path)
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(xml), "--out", str(out)], out, [raw, xml],
                   ["convergence_mrad: required key is missing", "--meta"])


def test_readers_are_lazy(tmp_path):
    """Every new reader hands back a view that reads frames on demand, not an array in memory."""
    master, _ = write_arina(tmp_path)
    mib = write_mib(tmp_path / "scan.mib", counts((2, 3, 8, 8)), (2, 3))
    raw, xml, _ = write_empad(tmp_path)
    dm = write_dm(tmp_path / "scan.dm4", [dm_image(counts((2, 3, 8, 6)), [(0.0, 1.0, "nm")] * 2 +
                                                   [(0.0, 1.0, "mrad")] * 2)])
    emd, _ = write_velox_scan(tmp_path)
    for spec, kw in [(master, {}), (mib, {}), (xml, {}), (dm, {}), (emd, {})]:
        with open_patterns(spec, **kw) as src:
            array = src.frames._array
            assert isinstance(array, np.memmap) or hasattr(array, "dask"), (spec, type(array))


# ---------------------------------------------------------------- Thermo Fisher Velox EMD
def write_velox_scan(tmp_path, scan_shape=(4, 3)):
    """A Velox 4D-STEM file: the HAADF image and the camera's frame stack, each with its record."""
    frames = counts((scan_shape[0] * scan_shape[1], 8, 6), seed=10)
    common = dict(scan_shape=(4, 3), fov_m=(8e-9, 6e-9), scan_area=(0.0, 0.25, 1.0, 0.75), voltage_v=200e3,
                  convergence_rad=0.021, camera_length_m=0.115, dwell_s=2e-3)
    camera = velox_metadata(**dict(common, pixel_size=(4e9, 4e9), pixel_unit="1/m", exposure_s=1e-3))
    haadf = velox_metadata(**dict(common, pixel_size=(2e-9, 1e-9), detector="HAADF"))
    emd = write_velox(tmp_path / "scan.emd", [(counts((1, 4, 3), seed=11), haadf), (frames, camera)])
    return emd, frames


def test_velox_4dstem_needs_no_metadata_file(tmp_path):
    """Everything ingest needs is in Velox's record: ``ptycore ingest`` without --meta."""
    emd, frames = write_velox_scan(tmp_path)
    group = ingest(tmp_path, emd)
    np.testing.assert_array_equal(group["patterns"][...], frames)  # the camera stack, not the HAADF image
    md = group.attrs["metadata"]
    assert md["scan_shape"] == [4, 3]
    assert md["scan_step_A"] == pytest.approx([20.0, 10.0])  # 8 nm / 4 rows; 6 nm x 0.5 of the area / 3 columns
    assert md["energy_kv"] == pytest.approx(200) and md["convergence_mrad"] == pytest.approx(21)
    assert md["camera_length_mm"] == pytest.approx(115) and md["exposure_s"] == pytest.approx(1e-3)
    assert md["detector_pixel_invA"] == pytest.approx(0.4)  # 4e9 1/m
    prov = group.attrs["provenance"]
    assert prov["patterns"]["format"] == "velox-emd"
    assert set(prov["metadata_sources"].values()) == {f"header of {emd}"}


def test_velox_scan_size_that_does_not_fit_the_frames(tmp_path, capsys):
    """A ScanSize that is not the number of frames is not taken: the scan shape must come from the YAML."""
    emd, frames = write_velox_scan(tmp_path, scan_shape=(2, 3))
    out = tmp_path / "data.zarr"
    assert_refused(capsys, ["ingest", "--patterns", str(emd), "--out", str(out)], out, [emd],
                   ["scan_shape: required key is missing", f"not in the header of {emd}"])
    group = ingest(tmp_path, emd, meta_yaml(tmp_path, scan_shape=[2, 3], scan_step_A=[1, 1]), name="ok.zarr")
    np.testing.assert_array_equal(group["patterns"][...], frames)


@pytest.mark.parametrize(("units", "pixel_invA"), [("1 / µm", 2e-4), ("nm^-1", 0.2), ("1/Å", 2.0), ("nm**-1", 0.2)])
def test_calibration_units_as_readers_spell_them(units, pixel_invA):
    """rosettasciio spells a reciprocal length as pint compacts it (Velox: "1 / µm" for a small
    pixel); every spelling is converted, and a unit of another kind is not taken as one."""
    from ptycore.data.formats import header_from_axes

    axes = [{"size": 4, "scale": 50.0, "units": "pm"}, {"size": 3, "scale": 0.05, "units": "nm"},
            {"size": 8, "scale": 2.0, "units": units}, {"size": 6, "scale": 2.0, "units": units}]
    header = header_from_axes(axes, 4)
    assert header["scan_shape"] == [4, 3] and header["scan_step_A"] == pytest.approx([0.5, 0.5])
    assert header["detector_pixel_invA"] == pytest.approx(pixel_invA)
    seconds = header_from_axes(axes[:2] + [dict(a, units="s") for a in axes[2:]], 4)
    assert "detector_pixel_invA" not in seconds and "detector_pixel_mrad" not in seconds
