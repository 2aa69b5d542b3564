"""Constraints and loss terms do what their names promise."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptycore.physics import Grid, Optics, make_mixed_probe, make_probe
from ptycore.physics.probe import angular_coordinates
from ptycore.plan import (
    AmplitudeBounds,
    KzFilter,
    LateralBlur,
    PhaseRampRemoval,
    PositionRecenter,
    ProbeAperture,
    ProbeIntensity,
    TiltSmooth,
    ZBlur,
)
from ptycore.recon import constraints as C
from ptycore.recon import losses as L
from ptycore.recon.state import State, resample_probe_modes, resample_slices

RNG = np.random.default_rng(0)


@dataclass
class Ctx:
    optics: Optics
    pixel_size_A: float
    convergence_mrad: float
    mean_counts: float
    scan_shape: tuple
    initial_positions_A: jnp.ndarray
    scan_weight: jnp.ndarray


def _state(slices=4, modes=3, hw=40, per_position_tilts=False):
    grid = Grid((32, 32), 0.3)
    probe = make_mixed_probe(make_probe(grid, 200.0, 20.0, 50.0) * 100.0, modes)
    # make the modes deliberately non-orthogonal
    probe = probe.at[1].add(0.5 * probe[0])
    phase = jnp.asarray(RNG.normal(size=(1, slices, hw, hw)), jnp.float32)
    pos = jnp.asarray(RNG.uniform(5, 7, size=(16, 2)), jnp.float32)
    tilts = jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32) if per_position_tilts else jnp.zeros(2, jnp.float32)
    state = State(jnp.asarray(RNG.uniform(0.5, 1.5, (1, slices, hw, hw)), jnp.float32), phase, probe, pos, tilts,
                  jnp.float32(5.0))
    weight = jnp.zeros((hw, hw)).at[5:35, 5:35].set(1.0)
    ctx = Ctx(Optics(grid, 200.0), 0.3, 20.0, 1234.0, (4, 4), pos - 0.1, weight)
    return state, ctx


def test_probe_orthogonalize_keeps_density_matrix():
    state, ctx = _state()
    out = C.probe_orthogonalize(state, ctx, None).probe
    flat = out.reshape(out.shape[0], -1)
    gram = np.asarray(flat.conj() @ flat.T)
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-3 * np.abs(gram).max())
    powers = np.real(np.diag(gram))
    assert np.all(np.diff(powers) <= 0)
    modes_in = np.asarray(state.probe.reshape(3, -1))
    rho_in = np.einsum("mi,mj->ij", modes_in, modes_in.conj())
    rho_out = np.einsum("mi,mj->ij", np.asarray(flat), np.asarray(flat).conj())
    assert np.allclose(rho_in, rho_out, atol=1e-3 * np.abs(rho_in).max())


def test_probe_aperture_and_intensity():
    state, ctx = _state()
    out = C.probe_aperture(state, ctx, ProbeAperture(scale=1.0)).probe
    spectrum = np.fft.fft2(np.fft.ifftshift(np.asarray(out), axes=(-2, -1)))
    alpha, _ = angular_coordinates(ctx.optics.grid, ctx.optics.wavelength_A)
    assert np.abs(spectrum[:, alpha > 20e-3]).max() < 1e-4 * np.abs(spectrum).max()
    fixed = C.probe_intensity(state, ctx, ProbeIntensity()).probe
    assert float(jnp.sum(jnp.abs(fixed) ** 2)) == pytest.approx(1234.0, rel=1e-5)


def test_object_bounds_and_positivity():
    state, ctx = _state()
    out = C.object_amplitude_bounds(state, ctx, AmplitudeBounds(min=0.8, max=1.0))
    assert float(out.object_amplitude.min()) >= 0.8 and float(out.object_amplitude.max()) <= 1.0
    assert float(C.phase_positive(state, ctx, None).object_phase.min()) >= 0.0


def test_kz_filter_keeps_depth_sum_and_smooths_across_slices():
    state, ctx = _state(slices=8)
    out = C.kz_filter(state, ctx, KzFilter(beta=1.0))
    # the kz = 0 plane (depth sum) passes unchanged; variation along z is damped
    np.testing.assert_allclose(np.asarray(out.object_phase.sum(1)), np.asarray(state.object_phase.sum(1)), atol=1e-4)
    before = float(jnp.std(jnp.diff(state.object_phase, axis=1)))
    assert float(jnp.std(jnp.diff(out.object_phase, axis=1))) < 0.8 * before


def test_blurs_keep_mean_and_reduce_variation():
    state, ctx = _state()
    lat = C.lateral_blur(state, ctx, LateralBlur(sigma_px=1.0)).object_phase
    assert float(lat.mean()) == pytest.approx(float(state.object_phase.mean()), abs=1e-5)
    assert float(jnp.std(lat)) < 0.6 * float(jnp.std(state.object_phase))
    zb = C.z_blur(state, ctx, ZBlur(sigma_slices=1.0)).object_phase
    assert float(jnp.std(jnp.diff(zb, axis=1))) < float(jnp.std(jnp.diff(state.object_phase, axis=1)))


def test_phase_ramp_removal_removes_a_plane():
    state, ctx = _state(slices=2)
    y, x = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    plane = 0.05 * y - 0.03 * x
    flat = state._replace(object_phase=jnp.asarray(np.broadcast_to(plane / 2, (1, 2, 40, 40)) + 0.2, jnp.float32))
    out = C.phase_ramp_removal(flat, ctx, PhaseRampRemoval()).object_phase.sum(1)[0]
    inside = np.asarray(out)[5:35, 5:35]
    assert np.ptp(inside) < 1e-3 and abs(inside.mean() - (plane[5:35, 5:35].mean() + 0.4)) < 1e-3


def test_position_recenter_and_tilt_smooth():
    state, ctx = _state(per_position_tilts=True)
    out = C.position_recenter(state, ctx, PositionRecenter())
    assert np.allclose(np.asarray(jnp.mean(out.positions_A - ctx.initial_positions_A, axis=0)), 0, atol=1e-5)
    smooth = C.tilt_smooth(state, ctx, TiltSmooth(sigma_px=1.0)).tilts_mrad
    assert np.allclose(np.asarray(smooth.mean(0)), np.asarray(state.tilts_mrad.mean(0)), atol=1e-5)
    assert float(jnp.std(smooth)) < float(jnp.std(state.tilts_mrad))


def test_constraints_preserve_dtypes_for_compiled_switching():
    state, ctx = _state(slices=3, per_position_tilts=True)
    cfgs = {"probe_orthogonalize": None, "probe_aperture": ProbeAperture(), "kz_filter": KzFilter(),
            "lateral_blur": LateralBlur(), "z_blur": ZBlur(), "phase_ramp_removal": PhaseRampRemoval(),
            "tilt_smooth": TiltSmooth()}
    out = jax.jit(lambda s, f: C.apply_constraints(s, ctx, cfgs, f))(state, jnp.ones(len(cfgs), bool))
    for a, b in zip(out, state, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_data_losses_minimal_at_truth():
    measured = jnp.asarray(RNG.poisson(50.0, (4, 16, 16)), jnp.float32) + 1.0
    mask = jnp.ones(4)
    for name, fn in L.DATA_LOSSES.items():
        at_truth = float(fn(measured, measured, mask))
        off = float(fn(measured * 1.3, measured, mask))
        assert at_truth < 1e-3 < off, name
    # padding (mask 0) does not count
    junk = measured.at[3].set(1e6)
    assert float(L.single(junk, measured, jnp.asarray([1.0, 1.0, 1.0, 0.0]))) < 1e-3


def test_object_losses():
    phase = jnp.asarray(RNG.normal(size=(1, 3, 20, 20)), jnp.float32)
    assert float(L.sparse(phase)) == pytest.approx(float(jnp.mean(jnp.abs(phase))), rel=1e-3)
    assert float(L.tv_xy(jnp.ones_like(phase))) < 1e-2 < float(L.tv_xy(phase))
    assert float(L.tv_z(phase[:, :1])) == 0.0
    assert float(L.l2(phase)) == pytest.approx(float(jnp.mean(phase**2)))
    assert float(L.surface_zero(phase.at[:, 0].set(0).at[:, -1].set(0))) < 1e-2


def test_resampling_conserves_phase_and_probe_power():
    state, _ = _state(slices=4)
    for n in (1, 2, 3, 8):
        amp, phase, dz = resample_slices(state.object_amplitude, state.object_phase, state.slice_thickness_A, n)
        assert phase.shape[1] == n and float(dz) * n == pytest.approx(20.0)
        np.testing.assert_allclose(np.asarray(phase.sum(1)), np.asarray(state.object_phase.sum(1)), atol=1e-4)
        np.testing.assert_allclose(np.asarray(jnp.log(amp).sum(1)), np.asarray(jnp.log(state.object_amplitude).sum(1)),
                                   atol=1e-4)
    total = float(jnp.sum(jnp.abs(state.probe) ** 2))
    for m in (1, 2, 5):
        probe = resample_probe_modes(state.probe, m)
        assert probe.shape[0] == m and float(jnp.sum(jnp.abs(probe) ** 2)) == pytest.approx(total, rel=1e-4)
        flat = probe.reshape(m, -1)
        gram = np.asarray(flat.conj() @ flat.T)
        assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-3 * np.abs(gram).max())
