"""Relativistic electron wavelength and the interaction parameter sigma."""

from __future__ import annotations

import math

PLANCK_Js = 6.62607015e-34
ELECTRON_MASS_kg = 9.1093837015e-31
ELEMENTARY_CHARGE_C = 1.602176634e-19
SPEED_OF_LIGHT_m_per_s = 299792458.0


def wavelength_A(energy_kv: float) -> float:
    """Relativistic de Broglie wavelength in Å for an acceleration voltage in kV."""
    if energy_kv <= 0:
        raise ValueError(f"energy_kv must be > 0, got {energy_kv}")
    energy_J = energy_kv * 1e3 * ELEMENTARY_CHARGE_C
    rest_J = ELECTRON_MASS_kg * SPEED_OF_LIGHT_m_per_s**2
    momentum = math.sqrt(2 * ELECTRON_MASS_kg * energy_J * (1 + energy_J / (2 * rest_J)))
    return PLANCK_Js / momentum * 1e10


def sigma_per_V_A(energy_kv: float) -> float:
    """Interaction parameter sigma in rad / (V Å): phase = sigma * projected potential (V Å)."""
    energy_J = energy_kv * 1e3 * ELEMENTARY_CHARGE_C
    rest_J = ELECTRON_MASS_kg * SPEED_OF_LIGHT_m_per_s**2
    gamma = 1 + energy_J / rest_J
    lam_m = wavelength_A(energy_kv) * 1e-10
    sigma_per_V_m = 2 * math.pi * gamma * ELECTRON_MASS_kg * ELEMENTARY_CHARGE_C * lam_m / PLANCK_Js**2
    return sigma_per_V_m * 1e-10
