"""Gradients of the multislice forward model against central finite differences, in float64.

The loss is ``sum (I - I_ref)^2`` with ``I_ref`` from a perturbed state; ``jax.grad`` w.r.t.
every differentiable input (positions, global and per-position tilts, slice thickness, object
phase and amplitude, probe) must give the same directional derivative as a central finite
difference along a random direction.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptycore.physics import Grid, Optics, intensities, make_probe, object_shape_for

PIXEL_A = 0.25
WINDOW = (32, 32)
ENERGY_KV = 300.0
N_SLICES = 3
RTOL = 1e-5

#: finite-difference step per parameter, in its own units (Å, mrad, rad, probe amplitude)
STEPS = {"positions_A": 1e-4, "tilts_mrad": 1e-3, "slice_thickness_A": 1e-3,
         "object_phase": 1e-5, "object_amplitude": 1e-5, "probe": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def x64():
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _state(rng, per_position_tilts: bool, perturbed: bool):
    grid = Grid(WINDOW, PIXEL_A)
    pos = np.array([[17.3, 18.6], [19.45, 16.7], [18.2, 20.35]]) * PIXEL_A
    shape = (1, N_SLICES) + object_shape_for(pos, PIXEL_A, WINDOW, 2)
    yy, xx = np.meshgrid(np.arange(shape[-2]), np.arange(shape[-1]), indexing="ij")
    phase = np.stack([0.4 * np.cos(2 * np.pi * (yy / 7.3 + s * 0.2)) * np.sin(2 * np.pi * xx / 5.1)
                      for s in range(N_SLICES)])[None]
    amplitude = 1.0 - 0.1 * np.stack([np.cos(2 * np.pi * (xx / 6.1 + yy / 9.7 + s * 0.3))
                                       for s in range(N_SLICES)])[None]
    probe = np.stack([np.asarray(make_probe(grid, ENERGY_KV, 20.0, 40.0), np.complex128),
                      0.5 * np.asarray(make_probe(grid, ENERGY_KV, 20.0, 90.0), np.complex128)])
    tilts = np.array([[2.0, -3.0], [1.0, 4.0], [-2.5, 0.5]]) if per_position_tilts else np.array([2.0, -3.0])
    thickness = 10.0
    if perturbed:
        pos = pos + rng.normal(0, 0.1, pos.shape)
        phase = phase * 1.2 + rng.normal(0, 0.05, phase.shape)
        amplitude = amplitude * (1 + rng.normal(0, 0.02, amplitude.shape))
        probe = probe * np.exp(1j * rng.normal(0, 0.1, probe.shape))
        tilts = tilts + rng.normal(0, 2.0, tilts.shape)
        thickness = 12.0
    params = {"positions_A": pos, "tilts_mrad": tilts, "slice_thickness_A": np.float64(thickness),
              "object_phase": phase, "object_amplitude": amplitude,
              "probe": np.stack([probe.real, probe.imag])}  # real parameters, as the engine uses
    return Optics(grid, ENERGY_KV), {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}


def _model(optics, p):
    probe = p["probe"][0] + 1j * p["probe"][1]
    return intensities(optics, p["object_amplitude"], p["object_phase"], probe, p["positions_A"],
                       p["tilts_mrad"], p["slice_thickness_A"])


_CACHE: dict = {}


def _setup(per_position_tilts: bool):
    if per_position_tilts not in _CACHE:
        rng = np.random.default_rng(0)
        optics, params = _state(rng, per_position_tilts, perturbed=False)
        _, reference_params = _state(rng, per_position_tilts, perturbed=True)
        reference = _model(optics, reference_params)

        @jax.jit
        def loss(p):
            return jnp.sum((_model(optics, p) - reference) ** 2)

        grads = jax.jit(jax.grad(loss))(params)
        _CACHE[per_position_tilts] = (optics, params, loss, grads)
    return _CACHE[per_position_tilts]


def test_forward_model_runs_in_float64():
    optics, params, loss, grads = _setup(False)
    assert _model(optics, params).dtype == jnp.float64
    assert all(g.dtype == jnp.float64 for g in grads.values())


@pytest.mark.parametrize(("per_position_tilts", "name"), [
    (False, "positions_A"),
    (False, "tilts_mrad"),
    (False, "slice_thickness_A"),
    (False, "object_phase"),
    (False, "object_amplitude"),
    (False, "probe"),
    (True, "tilts_mrad"),
    (True, "positions_A"),
])
def test_gradient_matches_central_differences(per_position_tilts, name):
    optics, params, loss, grads = _setup(per_position_tilts)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    direction = jnp.asarray(rng.normal(size=np.shape(params[name])), jnp.float64)
    h = STEPS[name]

    def along(t):
        return float(loss({**params, name: params[name] + t * direction}))

    numeric = (along(h) - along(-h)) / (2 * h)
    analytic = float(jnp.sum(grads[name] * direction))
    # not trivially zero: over one step the loss changes far beyond float64 round-off
    assert abs(numeric) * h > 1e-9 * float(loss(params))
    assert analytic == pytest.approx(numeric, rel=RTOL)
