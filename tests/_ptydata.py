"""Small simulated 4D-STEM datasets in the raw ingest format, made with ptycore.physics (fast).

Used by the ingest / preprocess / init tests: patterns (scan_y, scan_x, ky, kx) with the zero
frequency at index N//2 and an acquisition-metadata record that describes them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from ptycore.physics import Grid, Optics, diffraction_patterns, make_probe, object_shape_for, wavelength_A

ENERGY_KV = 300.0
CONVERGENCE_MRAD = 20.0


def simulate(scan=(6, 6), n_det=32, det_mrad=2.5, step_A=(0.6, 0.6), defocus_A=40.0, counts=1e4,
             phase_rad=0.3, thickness_A=20.0):
    """(patterns (sy, sx, N, N) float32 expected counts, metadata dict, pixel size in Å)."""
    lam = wavelength_A(ENERGY_KV)
    pixel = lam / (n_det * det_mrad * 1e-3)
    grid = Grid((n_det, n_det), pixel)
    probe = make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, defocus_A)[None] * np.sqrt(counts)
    iy, ix = np.meshgrid(np.arange(scan[0]), np.arange(scan[1]), indexing="ij")
    pos = np.stack([iy.ravel() * step_A[0], ix.ravel() * step_A[1]], -1) + (n_det // 2 + 2) * pixel
    shape = object_shape_for(pos, pixel, (n_det, n_det), 2)
    yy, xx = np.meshgrid(np.arange(shape[0]) * pixel, np.arange(shape[1]) * pixel, indexing="ij")
    phase = phase_rad * (0.5 * (np.cos(2 * np.pi * yy / 3.9) * np.cos(2 * np.pi * xx / 3.9) + 1)) ** 2
    out = diffraction_patterns(Optics(grid, ENERGY_KV), jnp.ones((1, 1) + shape), jnp.asarray(phase)[None, None],
                               probe, jnp.asarray(pos, jnp.float32), jnp.zeros(2), 1.0)
    patterns = np.asarray(out, np.float32).reshape(scan[0], scan[1], n_det, n_det)
    meta = {"energy_kv": ENERGY_KV, "convergence_mrad": CONVERGENCE_MRAD, "scan_shape": list(scan),
            "scan_step_A": list(step_A), "detector_pixel_mrad": det_mrad, "defocus_A": defocus_A,
            "thickness_A": thickness_A}
    return patterns, meta, pixel


def write_meta(path: Path, meta: dict) -> Path:
    path.write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def write_h5(path: Path, patterns: np.ndarray, name: str = "patterns", **kwargs) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=patterns, **kwargs)
    return path


def sha256(path: Path) -> str:
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def write_raw_dataset(directory: Path, **kwargs) -> tuple[Path, Path, np.ndarray, dict]:
    """patterns.h5 (dataset 'patterns') and meta.yaml in ``directory``; returns paths, patterns, meta."""
    directory.mkdir(parents=True, exist_ok=True)
    patterns, meta, _ = simulate(**kwargs)
    return write_h5(directory / "patterns.h5", patterns), write_meta(directory / "meta.yaml", meta), patterns, meta


def assert_refused(capsys, argv: list[str], out: Path, inputs: list[Path], expect: list[str]) -> str:
    """Run the CLI on bad input: non-zero exit, one 'ptycore VERB: error:' line on stderr containing
    every string of ``expect``, no output store (nor its .partial), inputs byte-for-byte unchanged."""
    from ptycore.cli import main
    from ptycore.store import partial_path

    before = {p: sha256(p) for p in inputs}
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ptycore {argv[0]}: error: "), lines[0]
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert not out.exists() and not partial_path(out).exists()
    assert {p: sha256(p) for p in inputs} == before
    return lines[0]
