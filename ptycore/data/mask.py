"""Detector mask: which detector pixels are good, ``(ky, kx)`` bool, True = good (measured and trusted).

Sources, combined (a pixel is good only if every source calls it good):

* ``detector_mask: FILE`` in the metadata (``.npy``, or ``FILE.h5:/dataset``), relative to the
  metadata file; True / non-zero = good pixel;
* ``bad_pixels: [[y, x], ...]`` in the metadata;
* the detector's own: a Dectris ``pixel_mask``, the chip boundaries of a multi-chip Merlin
  (:mod:`ptycore.data.formats`).

Coordinates are those of the patterns as the reader returns them (after ``pattern_axes``,
before ``detector_flip``); ingest orients the mask with the patterns and stores it in
``data.zarr`` as ``detector_mask``. ``preprocess`` transforms it with the patterns:

* ``detector_crop`` crops it;
* ``detector_bin``: a binned pixel is good only if all k x k of its pixels are (no
  renormalisation: the sum over a block with a bad pixel is not a measurement of that block);
* ``detector_resample``: bad pixels are first filled from their good neighbours (so the Fourier
  interpolation does not spread their values), and a resampled pixel is good only if every input
  pixel it overlaps is;
* ``detector_pad``: the padded pixels were not measured and are False.

Bad pixels are set to 0 in the prepared patterns (they add nothing to the counts, the mean
pattern or the bright-field centre).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptycore.errors import InvalidData


def load_mask_file(spec: str, shape: tuple[int, int], where: str, base: Path | None = None) -> tuple[np.ndarray, Path]:
    """The good-pixel mask of a ``detector_mask`` file (relative to ``base``), checked against ``shape``."""
    from ptycore.data.readers import parse_spec

    path, dataset = parse_spec(spec if base is None or Path(spec).is_absolute() else str(base / spec))
    if not path.is_file():
        raise InvalidData(f"{where}: detector_mask: file {path} not found")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if dataset is None:
                    names = [n for n, d in f.items() if isinstance(d, h5py.Dataset) and d.ndim == 2]
                    if len(names) != 1:
                        raise InvalidData(f"{where}: detector_mask: name the 2-D dataset as {path}:NAME "
                                          f"(2-D datasets at the top: {names or 'none'})")
                    dataset = names[0]
                if dataset not in f:
                    raise InvalidData(f"{where}: detector_mask: no dataset {dataset!r} in {path}")
                array = f[dataset][...]
    except InvalidData:
        raise
    except Exception as err:  # numpy / h5py raise several types on a foreign file
        raise InvalidData(f"{where}: detector_mask: {path} is not a readable .npy or HDF5 file "
                          f"({err.__class__.__name__})") from None
    array = np.asarray(array)
    if array.shape != tuple(shape):
        raise InvalidData(f"{where}: detector_mask: {path} has shape {array.shape}, the patterns' detector is "
                          f"{tuple(shape)} (ky, kx)")
    if array.dtype.kind not in "biuf":
        raise InvalidData(f"{where}: detector_mask: {path} has dtype {array.dtype}; use bool (True = good pixel)")
    return array != 0, path


def bad_pixels_mask(pixels, shape: tuple[int, int], where: str) -> np.ndarray:
    good = np.ones(shape, bool)
    for y, x in pixels:
        if not (0 <= y < shape[0] and 0 <= x < shape[1]):
            raise InvalidData(f"{where}: bad_pixels: [{y}, {x}] lies outside the {shape[0]} x {shape[1]} detector")
        good[y, x] = False
    return good


# ---------------------------------------------------------------- transforms (preprocess)
def bin_mask(good: np.ndarray, k: int) -> np.ndarray:
    """A binned pixel is good only if all k x k of its pixels are."""
    if k == 1:
        return good
    ny, nx = good.shape
    return good.reshape(ny // k, k, nx // k, k).all(axis=(1, 3))


def pad_mask(good: np.ndarray, size: int) -> np.ndarray:
    """Pad with False (not measured), the old pixel (M//2, M//2) landing on (size//2, size//2)."""
    pads = [(size // 2 - m // 2, size - m - (size // 2 - m // 2)) for m in good.shape]
    return np.pad(good, pads, constant_values=False)


def _overlap(m: int, n: int) -> np.ndarray:
    """(n, m) True where output pixel j of n overlaps input pixel i of m, same angular range,
    zero frequency m//2 → n//2."""
    scale = m / n
    centre = m // 2 + (np.arange(n) - n // 2) * scale
    i = np.arange(m)
    return np.abs(i[None, :] - centre[:, None]) < (scale + 1) / 2 - 1e-9


def resample_mask(good: np.ndarray, size: int) -> np.ndarray:
    """A resampled pixel is good only if every input pixel it overlaps is good."""
    bad = (~good).astype(np.int64)
    ay, ax = _overlap(good.shape[0], size), _overlap(good.shape[1], size)
    return (ay.astype(np.int64) @ bad @ ax.T.astype(np.int64)) == 0


def fill_bad(patterns: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``(..., ky, kx)`` patterns with each bad pixel replaced by the mean of its good 3 x 3
    neighbours, repeated into wider gaps until every pixel has a value."""
    from scipy import ndimage

    if good.all() or not good.any():
        return patterns
    out = np.where(good, patterns, 0).astype(np.float64)
    known = np.broadcast_to(good, patterns.shape).astype(np.float64)
    kernel = np.ones((1,) * (patterns.ndim - 2) + (3, 3))
    while not known.all():
        total = ndimage.convolve(out * known, kernel, mode="constant")
        count = ndimage.convolve(known, kernel, mode="constant")
        new = (known == 0) & (count > 0)
        out[new] = total[new] / count[new]
        known = np.where(new, 1.0, known)
    return out
