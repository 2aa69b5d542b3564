"""Physics of electron ptychography: wavelength, probe, propagation, shifts, multislice."""

from ptycore.physics.electron import sigma_per_V_A, wavelength_A
from ptycore.physics.grid import Grid, pixel_size_from_detector_A
from ptycore.physics.multislice import Optics, diffraction_patterns, exit_waves, intensities, sweep, transmission
from ptycore.physics.probe import (
    ABERRATION_ORDERS,
    aberration_phase,
    make_mixed_probe,
    make_probe,
    mode_powers,
    orthogonalize_modes,
)
from ptycore.physics.propagation import DEFAULT_BANDLIMIT, bandlimit_mask, fresnel_kernel, propagate
from ptycore.physics.shifts import crop_patches, fourier_shift, object_shape_for, split_positions

__all__ = [
    "ABERRATION_ORDERS", "DEFAULT_BANDLIMIT", "Grid", "Optics", "aberration_phase", "bandlimit_mask",
    "crop_patches", "diffraction_patterns", "exit_waves", "fourier_shift", "fresnel_kernel", "intensities",
    "make_mixed_probe", "make_probe", "mode_powers", "object_shape_for", "orthogonalize_modes",
    "pixel_size_from_detector_A", "propagate", "sigma_per_V_A", "split_positions", "sweep", "transmission",
    "wavelength_A",
]
