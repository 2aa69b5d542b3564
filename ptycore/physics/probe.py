"""Electron probe: soft-edged condenser aperture, Krivanek aberrations, mixed-state modes.

Conventions (abTEM-compatible): aberration coefficients ``C_nm`` in Å with angles
``phi_nm`` in rad, the wave-front aberration

    chi(alpha, phi) = 2 pi / lambda * sum_nm C_nm alpha^(n+1) / (n+1) cos(m (phi - phi_nm))

and the Fourier-space probe ``A(alpha) exp(-i chi)``. ``defocus_A = -C10``: a positive
defocus places the crossover below the entrance surface (underfocus).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from ptycore.physics.electron import wavelength_A as _wavelength_A
from ptycore.physics.grid import Grid

#: Aberration coefficients understood here, as name -> (n, m), Krivanek notation.
ABERRATION_ORDERS: dict[str, tuple[int, int]] = {
    "C10": (1, 0), "C12": (1, 2),
    "C21": (2, 1), "C23": (2, 3),
    "C30": (3, 0), "C32": (3, 2), "C34": (3, 4),
    "C41": (4, 1), "C43": (4, 3), "C45": (4, 5),
    "C50": (5, 0), "C52": (5, 2), "C54": (5, 4), "C56": (5, 6),
}
ABERRATION_ANGLES = {f"phi{name[1:]}" for name, (n, m) in ABERRATION_ORDERS.items() if m > 0}


def validate_aberrations(aberrations: Mapping[str, float] | None) -> dict[str, float]:
    """Return a clean dict of aberrations, raising ``ValueError`` naming an unknown key."""
    out: dict[str, float] = {}
    for key, value in (aberrations or {}).items():
        if key not in ABERRATION_ORDERS and key not in ABERRATION_ANGLES:
            known = ", ".join(sorted(ABERRATION_ORDERS) + sorted(ABERRATION_ANGLES))
            raise ValueError(f"unknown aberration {key!r} (known: {known})")
        out[key] = float(value)
    return out


def angular_coordinates(grid: Grid, wavelength_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Scattering angle alpha (rad) and azimuth phi (rad, atan2(ky, kx)) in FFT order."""
    ky, kx = grid.frequencies_invA()
    alpha = wavelength_A * np.sqrt(ky**2 + kx**2)
    phi = np.arctan2(ky, kx)
    return alpha, phi


def aberration_phase(alpha, phi, wavelength_A: float, aberrations: Mapping[str, float]):
    """chi(alpha, phi) in rad. ``aberrations`` values may be jax scalars (differentiable)."""
    chi = jnp.zeros(np.shape(alpha), dtype=jnp.float32)
    for name, (n, m) in ABERRATION_ORDERS.items():
        coeff = aberrations.get(name, 0.0)
        if isinstance(coeff, (int, float)) and coeff == 0.0:
            continue
        angle = aberrations.get(f"phi{name[1:]}", 0.0) if m > 0 else 0.0
        chi = chi + coeff * alpha ** (n + 1) / (n + 1) * jnp.cos(m * (phi - angle))
    return (2 * np.pi / wavelength_A) * chi


def soft_aperture(alpha, phi, convergence_mrad: float, angular_pixel_mrad: tuple[float, float]):
    """Disk of ones with a linear edge one angular pixel wide (no aliasing of a hard edge)."""
    cutoff = convergence_mrad * 1e-3
    width = np.sqrt((np.sin(phi) * angular_pixel_mrad[0]) ** 2 + (np.cos(phi) * angular_pixel_mrad[1]) ** 2) * 1e-3
    width = np.where(width > 0, width, 1.0)
    return jnp.clip((cutoff - alpha) / width + 0.5, 0.0, 1.0)


def make_probe(
    grid: Grid,
    energy_kv: float,
    convergence_mrad: float,
    defocus_A: float = 0.0,
    aberrations: Mapping[str, float] | None = None,
    *,
    soft: bool = True,
):
    """Probe wave function ``(ny, nx)`` complex64 centred in the window, total intensity 1.

    ``defocus_A`` is ``-C10``; give either it or ``aberrations['C10']``, not both.
    """
    aberrations = dict(validate_aberrations(aberrations))
    if "C10" in aberrations and defocus_A:
        raise ValueError("give defocus_A or aberrations['C10'], not both (defocus_A = -C10)")
    if "C10" not in aberrations:
        aberrations["C10"] = -defocus_A
    if convergence_mrad <= 0:
        raise ValueError(f"convergence_mrad must be > 0, got {convergence_mrad}")
    wavelength = _wavelength_A(energy_kv)
    alpha, phi = angular_coordinates(grid, wavelength)
    if soft:
        aperture = soft_aperture(alpha, phi, convergence_mrad, grid.detector_pixel_mrad(wavelength))
    else:
        aperture = jnp.asarray(alpha <= convergence_mrad * 1e-3, dtype=jnp.float32)
    if float(jnp.sum(aperture)) < 1:
        raise ValueError(
            f"convergence {convergence_mrad} mrad is smaller than one detector pixel "
            f"({grid.detector_pixel_mrad(wavelength)[0]:.3g} mrad)"
        )
    chi = aberration_phase(alpha, phi, wavelength, aberrations)
    probe_k = aperture * jnp.exp(-1j * chi)
    probe = jnp.fft.fftshift(jnp.fft.ifft2(probe_k, norm="ortho"))
    probe = probe / jnp.sqrt(jnp.sum(jnp.abs(probe) ** 2))
    return probe.astype(jnp.complex64)


def mode_powers(n_modes: int, decay: float = 0.3) -> np.ndarray:
    """Decaying relative powers ``decay**k`` of ``n_modes`` probe modes, summing to one."""
    if n_modes < 1:
        raise ValueError(f"number of probe modes must be >= 1, got {n_modes}")
    if not 0 < decay <= 1:
        raise ValueError(f"mode power decay must be in (0, 1], got {decay}")
    p = decay ** np.arange(n_modes, dtype=np.float64)
    return (p / p.sum()).astype(np.float32)


def orthogonalize_modes(probe_modes):
    """Orthogonalise probe modes by diagonalising their density matrix.

    Returns ``(modes, powers)``: modes sorted by descending power, mutually orthogonal,
    with the same total intensity; ``powers`` are the fractions of the total intensity.
    """
    n_modes, ny, nx = probe_modes.shape
    flat = probe_modes.reshape(n_modes, ny * nx)
    # SVD of the (modes x pixels) matrix: rows of vh are orthonormal, s^2 the mode intensities.
    u, s, vh = jnp.linalg.svd(flat, full_matrices=False)
    modes = (s[:, None] * vh).reshape(n_modes, ny, nx)
    powers = s**2 / jnp.sum(s**2)
    return modes.astype(probe_modes.dtype), powers


def make_mixed_probe(probe, n_modes: int, decay: float = 0.3):
    """Mixed-state probe ``(n_modes, ny, nx)`` from one mode.

    Mode 0 is the given probe; higher modes are the probe multiplied by low-order
    polynomials in (y, x) about its centroid (Hermite-like), made mutually orthogonal,
    with powers ``mode_powers(n_modes, decay)`` of the input's total intensity.
    """
    probe = jnp.asarray(probe)
    total = jnp.sum(jnp.abs(probe) ** 2)
    if n_modes == 1:
        return probe[None]
    ny, nx = probe.shape
    intensity = np.asarray(jnp.abs(probe) ** 2)
    y, x = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    cy, cx = (intensity * y).sum() / intensity.sum(), (intensity * x).sum() / intensity.sum()
    radius = np.sqrt((intensity * ((y - cy) ** 2 + (x - cx) ** 2)).sum() / intensity.sum()) + 1e-6
    yy, xx = (y - cy) / radius, (x - cx) / radius
    orders = [(a, t - a) for t in range(1, 8) for a in range(t + 1)]
    basis = [np.asarray(probe, dtype=np.complex128)]
    for (py, px) in orders[: n_modes - 1]:
        basis.append(basis[0] * yy**py * xx**px)
    ortho: list[np.ndarray] = []
    for b in basis:  # Gram-Schmidt in order: mode 0 keeps the probe's shape and phase
        v = b.ravel()
        for q in ortho:
            v = v - np.vdot(q, v) * q
        ortho.append(v / np.linalg.norm(v))
    q = np.stack(ortho, axis=1)
    powers = mode_powers(n_modes, decay)
    modes = (q.T * np.sqrt(powers[:, None] * float(total))).reshape(n_modes, ny, nx)
    return jnp.asarray(modes, dtype=jnp.complex64)
