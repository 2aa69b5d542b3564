"""What an engine needs to know about the experiment besides the state (static per stage)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import jax.numpy as jnp
import numpy as np

from ptycore.errors import InvalidData
from ptycore.physics.fourier import fft_order_band
from ptycore.physics.grid import Grid
from ptycore.physics.multislice import Optics
from ptycore.store import open_store


@dataclass
class StoredPatterns:
    """The patterns of a prepared store, read by position when asked for (a run on several
    processes: each reads only the positions of its own devices, see
    ``ptycore.recon.placement.Placement.patterns``). :meth:`read` returns them as the
    reconstruction takes them, like :func:`load_measurement`: clipped at 0, in FFT order and,
    after :meth:`cropped`, only the kept band of detector pixels. Only the chunks of the stored
    array that hold the asked-for positions are read and decoded (zarr's orthogonal selection
    along the chunk grid); ``positions_read`` and ``chunks_read`` count what this process read."""

    source: str
    array: object  # the zarr array (n_pos, ky, kx), zero frequency at the centre
    keep: np.ndarray | None = None  # the kept detector band, indices in FFT order (None: all)
    positions_read: int = field(default=0, compare=False)
    chunks_read: int = field(default=0, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        n, ky, kx = (int(s) for s in self.array.shape)
        return (n,) + ((ky, kx) if self.keep is None else (len(self.keep), len(self.keep)))

    def cropped(self, keep: np.ndarray) -> StoredPatterns:
        """The same store read through a detector band (indices in FFT order of the full detector)."""
        return StoredPatterns(self.source, self.array, np.asarray(keep))

    def read(self, positions) -> np.ndarray:
        """The patterns ``(k, ky, kx)`` float32 of the sorted position indices ``positions``, as
        stored: a NaN or Inf stays (the placement checks the gathered totals of every pattern, so
        every process reports the same bad position)."""
        positions = np.asarray(positions, np.int64)
        if len(positions) == 0:
            return np.zeros((0,) + self.shape[1:], np.float32)
        rows = np.asarray(self.array.oindex[positions], np.float32)
        rows = np.fft.ifftshift(np.clip(rows, 0, None), axes=(-2, -1))
        if self.keep is not None:
            rows = rows[:, self.keep][:, :, self.keep]
        chunk = int(self.array.chunks[0])
        self.positions_read += len(positions)
        self.chunks_read += len(np.unique(positions // chunk))
        return np.ascontiguousarray(rows)


@dataclass
class Measurement:
    """Prepared diffraction data: intensities in FFT order (zero frequency at [0, 0]).

    Either in memory (``intensities``) or, in a run of several processes, ``stored`` (a
    :class:`StoredPatterns`: ``intensities`` is None and every process reads only its own
    positions when the stage places them on its devices; ``row_counts`` then holds each
    pattern's total counts, gathered from the processes that read it)."""

    intensities: jnp.ndarray | None  # (n_pos, ky, kx) float32
    pixel_size_A: float
    energy_kv: float
    convergence_mrad: float
    scan_shape: tuple[int, int]
    source: str = ""
    #: (ky, kx) float32 in FFT order, 1 for a good detector pixel, 0 for a bad one or a chip gap
    #: (excluded from every loss); None: every pixel is good
    detector_mask: jnp.ndarray | None = None
    #: the devices the reconstruction runs on (``ptycore.recon.placement.Placement``); None: one device
    placement: object | None = None
    #: the patterns left in the store, read per position (``intensities`` is then None)
    stored: StoredPatterns | None = None
    #: with ``stored``, once placed: the patterns on this process's devices
    #: (``ptycore.recon.placement.Placed``: owners, sharded patterns, every pattern's total counts)
    placed: object | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in (self.intensities if self.stored is None else self.stored).shape)

    @property
    def n_positions(self) -> int:
        return self.shape[0]

    @property
    def detector_shape(self) -> tuple[int, int]:
        return self.shape[1:]

    def read_rows(self, positions) -> np.ndarray:
        """The patterns of the sorted position indices ``positions`` as a host array (from the
        store, for a stored measurement)."""
        if self.stored is not None:
            return self.stored.read(positions)
        return np.asarray(self.intensities[np.asarray(positions)])

    def counts(self, positions=None) -> float:
        """Total counts of the patterns at ``positions`` (all of them for None)."""
        if self.intensities is not None:
            data = self.intensities if positions is None else self.intensities[np.asarray(positions)]
            return float(jnp.sum(data))
        rows = self._row_counts()
        return float(np.sum(rows if positions is None else rows[np.asarray(positions)], dtype=np.float64))

    def _row_counts(self) -> np.ndarray:
        if self.placed is None:
            raise RuntimeError("a stored measurement's counts are known once its patterns are placed")
        return self.placed.row_counts

    @property
    def mean_counts(self) -> float:
        if self.intensities is not None:
            return float(jnp.mean(jnp.sum(self.intensities, axis=(1, 2))))
        return float(np.mean(self._row_counts(), dtype=np.float64))

    def cropped(self, detector_px: int) -> Measurement:
        """The central ``detector_px`` × ``detector_px`` pixels of every pattern (a smaller
        angular range at the same angular pixel), as the measurement of a coarser object grid.

        The object pixel size is λ / (N Δα): keeping Δα and taking N' = ``detector_px`` pixels
        gives ``pixel_size_A × N / N'``, and the probe window N' × that pixel is the same field of
        view. Each kept pixel keeps its counts (no rescaling): counts scattered outside the kept
        band are simply not fitted, so ``mean_counts`` of the crop is below the full data's.
        The crop is done by index in FFT order (kept frequencies -N'/2 … N'/2 - 1, zero at
        [0, 0]), the same band ``ptycore.recon.state.resample_probe_window`` keeps of the probe.
        The detector must be square and at least ``detector_px`` wide: the stage runner checks
        that, with the stage's name, in ``ptycore.recon.runner.check_stage_detector``.
        """
        ny, nx = self.detector_shape
        if detector_px == ny == nx:
            return self
        keep = fft_order_band(ny, detector_px)
        mask = None if self.detector_mask is None else self.detector_mask[keep][:, keep]
        if self.stored is not None:  # read through the band when placed
            return replace(self, stored=self.stored.cropped(keep), placed=None,
                           pixel_size_A=self.pixel_size_A * ny / detector_px, detector_mask=mask)
        cropped = self.intensities[:, keep][:, :, keep]
        return replace(self, intensities=cropped, pixel_size_A=self.pixel_size_A * ny / detector_px,
                       detector_mask=mask)


def load_measurement(path, init_path=None, *, per_process: bool = False) -> Measurement:
    """Read a prepared store (see DESIGN): patterns are shifted to FFT order once, here.

    With ``init_path`` (the init or previous result store the run starts from), its
    ``convergence_mrad`` attr (the init config's ``convergence_mrad``) replaces the metadata's
    convergence semi-angle, see :func:`init_convergence_mrad`. ``per_process`` (a run on several
    processes): the patterns stay in the store (:class:`StoredPatterns`); each process reads its
    own positions when a stage places them on its devices, and they are checked then."""
    convergence_mrad = None if init_path is None else init_convergence_mrad(dict(open_store(init_path).attrs),
                                                                           init_path)
    group = open_store(path)
    if "patterns" not in group:
        raise InvalidData(f"{path}: no 'patterns' array (is this a prepared store?)")
    attrs = dict(group.attrs)
    for key in ("pixel_size_A", "metadata"):
        if key not in attrs:
            raise InvalidData(f"{path}: attribute {key!r} is missing (run 'ptycore preprocess' first)")
    meta = attrs["metadata"]
    shape = tuple(int(n) for n in group["patterns"].shape)
    if len(shape) != 3:
        raise InvalidData(f"{path}: patterns must be (n_pos, ky, kx), got {shape}")
    stored = intensities = None
    if per_process:
        stored = StoredPatterns(str(path), group["patterns"])
    else:
        patterns = np.asarray(group["patterns"][...], np.float32)
        if not np.all(np.isfinite(patterns)):
            raise InvalidData(f"{path}: patterns contain NaN or Inf")
        intensities = jnp.asarray(np.fft.ifftshift(np.clip(patterns, 0, None), axes=(-2, -1)))
    mask = None
    if "detector_mask" in group:
        good = np.asarray(group["detector_mask"][...], bool)
        if good.shape != shape[1:]:
            raise InvalidData(f"{path}: detector_mask {good.shape} does not match the detector {shape[1:]}")
        if not good.all():
            mask = jnp.asarray(np.fft.ifftshift(good, axes=(-2, -1)), jnp.float32)
    return Measurement(
        detector_mask=mask,
        intensities=intensities,
        stored=stored,
        pixel_size_A=float(attrs["pixel_size_A"]),
        energy_kv=float(meta["energy_kv"]),
        convergence_mrad=float(meta["convergence_mrad"] if convergence_mrad is None else convergence_mrad),
        scan_shape=tuple(attrs.get("scan_shape", meta.get("scan_shape"))),
        source=str(path),
    )


def init_convergence_mrad(init_attrs: dict, where) -> float | None:
    """The convergence semi-angle an init (or result) store overrides the data's with, or None."""
    value = init_attrs.get("convergence_mrad")
    if value is None:
        return None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 200):
        raise InvalidData(f"{where}: attribute convergence_mrad must be a number in (0, 200] mrad, got {value!r}")
    return float(value)


@dataclass
class Context:
    """Static per-stage context shared by engines and constraints."""

    optics: Optics
    pixel_size_A: float
    convergence_mrad: float
    mean_counts: float
    scan_shape: tuple[int, int]
    initial_positions_A: jnp.ndarray
    scan_weight: jnp.ndarray  # (Hy, Wx) 1 where probe centres have been, 0 elsewhere

    @classmethod
    def build(cls, measurement: Measurement, positions_A, object_shape, bandlimit: float | None = None):
        grid = Grid(measurement.detector_shape, measurement.pixel_size_A)
        pos_px = np.asarray(positions_A) / measurement.pixel_size_A
        hy, wx = object_shape
        y, x = np.arange(hy)[:, None], np.arange(wx)[None, :]
        lo, hi = pos_px.min(axis=0), pos_px.max(axis=0)
        weight = ((y >= lo[0]) & (y <= hi[0]) & (x >= lo[1]) & (x <= hi[1])).astype(np.float32)
        return cls(
            optics=Optics(grid, measurement.energy_kv, bandlimit),
            pixel_size_A=measurement.pixel_size_A,
            convergence_mrad=measurement.convergence_mrad,
            mean_counts=measurement.mean_counts,
            scan_shape=measurement.scan_shape,
            initial_positions_A=jnp.asarray(positions_A, jnp.float32),
            scan_weight=jnp.asarray(weight),
        )
