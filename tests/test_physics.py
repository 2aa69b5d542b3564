"""Physics of the forward model against analytic results.

Electron wavelength and interaction constant against textbook values; Parseval (energy) in the
far field; Fresnel propagator composition, identity, band limit and the analytic propagation of a
Gaussian; the Fourier shift theorem; the probe-centre convention of positions; the probe's
normalisation, aperture and defocus sign; mixed-state probe modes.

Small grids (32x32, 64x64) in float32, the default precision: tolerances are float32 rounding.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ptycore.physics import (
    DEFAULT_BANDLIMIT,
    Grid,
    Optics,
    bandlimit_mask,
    crop_patches,
    exit_waves,
    fourier_shift,
    fresnel_kernel,
    intensities,
    make_mixed_probe,
    make_probe,
    mode_powers,
    object_shape_for,
    orthogonalize_modes,
    propagate,
    sigma_per_V_A,
    split_positions,
    wavelength_A,
)

ENERGY_KV = 300.0
LAMBDA_A = wavelength_A(ENERGY_KV)
PIXEL_A = 0.25  # exactly representable: integer-pixel positions have a zero sub-pixel remainder
WINDOW = (32, 32)
GRID = Grid(WINDOW, PIXEL_A)


def band_limited(wave, grid: Grid, fraction=DEFAULT_BANDLIMIT):
    """``wave`` with every frequency outside the band limit removed."""
    return np.fft.ifft2(np.fft.fft2(wave) * bandlimit_mask(grid, fraction))


def random_wave(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def scan_positions(n=3, step_px=(2.37, 3.61), start_px=(17.2, 16.55)):
    """A small scan with sub-pixel positions (Å), all windows inside the object."""
    iy, ix = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pos = np.stack([start_px[0] + iy * step_px[0], start_px[1] + ix * step_px[1]], -1).reshape(-1, 2)
    return (pos * PIXEL_A).astype(np.float32)


def total_per_pattern(patterns):
    return np.asarray(jnp.sum(patterns, axis=(-2, -1)), dtype=np.float64)


# ------------------------------------------------------------------ electron constants
@pytest.mark.parametrize(("kv", "textbook_A"), [(100.0, 0.03701), (200.0, 0.02508), (300.0, 0.01969)])
def test_relativistic_wavelength_matches_textbook(kv, textbook_A):
    # textbook values are given to 4 significant digits: agree to half a unit in the last one
    assert wavelength_A(kv) == pytest.approx(textbook_A, abs=6e-6)
    # and the relativistic correction matters: the non-relativistic value is off by far more
    nonrel = 12.2643 / np.sqrt(kv * 1e3)
    assert abs(nonrel - textbook_A) > 1e-4


def test_interaction_parameter_at_300kv():
    assert sigma_per_V_A(300.0) == pytest.approx(6.526e-4, rel=2e-4)
    # sigma decreases with energy (faster electrons are scattered less)
    assert sigma_per_V_A(100.0) > sigma_per_V_A(200.0) > sigma_per_V_A(300.0)


# ------------------------------------------------------------------ energy (Parseval)
def _mixed_probe(total=1e4, convergence_mrad=20.0, defocus_A=30.0, modes=2, grid=GRID):
    probe = make_probe(grid, ENERGY_KV, convergence_mrad, defocus_A) * np.sqrt(total)
    return make_mixed_probe(probe, modes)


@pytest.mark.parametrize("phase_kind", ["zero", "random"])
def test_single_slice_unit_amplitude_conserves_probe_intensity(phase_kind):
    probe = _mixed_probe()
    pos = scan_positions()
    shape = (1, 1) + object_shape_for(pos, PIXEL_A, WINDOW, 2)
    phase = np.zeros(shape, np.float32)
    if phase_kind == "random":  # not band limited at all: one slice has no propagation, so no loss
        phase = np.random.default_rng(1).uniform(-np.pi, np.pi, shape).astype(np.float32)
    out = intensities(Optics(GRID, ENERGY_KV), jnp.ones(shape), jnp.asarray(phase), probe, jnp.asarray(pos),
                      jnp.zeros(2), 10.0)
    probe_total = float(jnp.sum(jnp.abs(probe) ** 2))
    np.testing.assert_allclose(total_per_pattern(out), probe_total, rtol=1e-5)
    # an amplitude a transmits a^2 of the intensity
    half = intensities(Optics(GRID, ENERGY_KV), 0.5 * jnp.ones(shape), jnp.asarray(phase), probe, jnp.asarray(pos),
                       jnp.zeros(2), 10.0)
    np.testing.assert_allclose(total_per_pattern(half), 0.25 * probe_total, rtol=1e-5)


def test_multislice_without_band_limit_conserves_intensity_for_any_phase():
    probe = _mixed_probe()
    pos = scan_positions()
    shape = (1, 3) + object_shape_for(pos, PIXEL_A, WINDOW, 2)
    phase = np.random.default_rng(2).uniform(-np.pi, np.pi, shape).astype(np.float32)
    out = intensities(Optics(GRID, ENERGY_KV, bandlimit=None), jnp.ones(shape), jnp.asarray(phase), probe,
                      jnp.asarray(pos), jnp.asarray([3.0, -5.0]), 8.0)
    np.testing.assert_allclose(total_per_pattern(out), float(jnp.sum(jnp.abs(probe) ** 2)), rtol=1e-5)


def test_multislice_conserves_intensity_of_a_band_limited_phase_object():
    # a 10 mrad probe reaches 0.51/Å; the band limit is 2/3 * 2/Å = 1.33/Å. A weak phase periodic
    # over the window (0.125/Å) scatters into harmonics that stay inside the band limit.
    # two modes inside the aperture (make_mixed_probe's polynomial modes leak ~1% outside it)
    probe = jnp.stack([make_probe(GRID, ENERGY_KV, 10.0, 20.0), 0.6 * make_probe(GRID, ENERGY_KV, 10.0, 70.0)])
    probe, _ = orthogonalize_modes(probe * np.sqrt(1e4))
    pos = scan_positions()
    shape = (1, 3) + object_shape_for(pos, PIXEL_A, WINDOW, 2)
    yy, xx = np.meshgrid(np.arange(shape[-2]), np.arange(shape[-1]), indexing="ij")
    smooth = 0.15 * (np.cos(2 * np.pi * yy / WINDOW[0]) + np.sin(2 * np.pi * xx / WINDOW[1] + 0.4))
    phase = np.broadcast_to(smooth, shape).astype(np.float32)
    out = intensities(Optics(GRID, ENERGY_KV), jnp.ones(shape), jnp.asarray(phase), probe, jnp.asarray(pos),
                      jnp.asarray([2.0, 4.0]), 10.0)
    np.testing.assert_allclose(total_per_pattern(out), float(jnp.sum(jnp.abs(probe) ** 2)), rtol=1e-5)


def test_band_limit_removes_exactly_the_energy_scattered_outside_it():
    """Two slices of random phase: the pattern keeps exactly the in-band energy of the first slice's
    exit wave (the second transmission is unit-modulus and the far-field FFT is unitary)."""
    probe = _mixed_probe()
    pos = (np.array([[18, 19], [21, 17]]) * PIXEL_A).astype(np.float32)  # whole pixels: no sub-pixel shift
    shape = (1, 2) + object_shape_for(pos, PIXEL_A, WINDOW, 2)
    phase = np.random.default_rng(3).uniform(-np.pi, np.pi, shape).astype(np.float32)
    out = intensities(Optics(GRID, ENERGY_KV), jnp.ones(shape), jnp.asarray(phase), probe, jnp.asarray(pos),
                      jnp.zeros(2), 10.0)
    mask = bandlimit_mask(GRID) > 0
    top_left = np.round(pos / PIXEL_A).astype(int) - np.array(WINDOW) // 2
    expected = []
    for ty, tx in top_left:
        t1 = np.exp(1j * phase[0, 0, ty : ty + WINDOW[0], tx : tx + WINDOW[1]].astype(np.float64))
        spectrum = np.fft.fft2(np.asarray(probe, np.complex128) * t1, norm="ortho")
        expected.append(np.sum(np.abs(spectrum[:, mask]) ** 2))
    expected = np.array(expected)
    probe_total = float(jnp.sum(jnp.abs(probe) ** 2))
    assert np.all(expected < 0.9 * probe_total)  # the band limit does remove something here
    np.testing.assert_allclose(total_per_pattern(out), expected, rtol=1e-5)


# ------------------------------------------------------------------ Fresnel propagator
@pytest.mark.parametrize("tilt_mrad", [None, (4.0, -7.0)])
def test_propagation_composes(tilt_mrad):
    wave = band_limited(random_wave(WINDOW, seed=4), GRID)
    a, b = 13.0, 29.5
    two_steps = propagate(propagate(wave, fresnel_kernel(GRID, LAMBDA_A, a, tilt_mrad)),
                          fresnel_kernel(GRID, LAMBDA_A, b, tilt_mrad))
    one_step = propagate(wave, fresnel_kernel(GRID, LAMBDA_A, a + b, tilt_mrad))
    assert rel_err(two_steps, one_step) < 1e-5
    # and propagation does something: the wave after a+b is not the wave we started with
    assert rel_err(one_step, wave) > 0.1


def test_zero_distance_is_identity():
    wave = band_limited(random_wave(WINDOW, seed=5), GRID)
    assert rel_err(propagate(wave, fresnel_kernel(GRID, LAMBDA_A, 0.0, (3.0, 1.0))), wave) < 1e-5
    # without a band limit, zero distance is the identity for any wave
    raw = random_wave(WINDOW, seed=6)
    assert rel_err(propagate(raw, fresnel_kernel(GRID, LAMBDA_A, 0.0, bandlimit=None)), raw) < 1e-5
    # with it, a wave that is not band limited loses its high frequencies
    assert rel_err(propagate(raw, fresnel_kernel(GRID, LAMBDA_A, 0.0)), raw) > 0.1


@pytest.mark.parametrize("fraction", [DEFAULT_BANDLIMIT, 0.5])
def test_kernel_modulus_is_the_band_limit(fraction):
    grid = Grid((32, 48), PIXEL_A)
    kernel = np.asarray(fresnel_kernel(grid, LAMBDA_A, 20.0, (5.0, -2.0), fraction))
    ky = np.fft.fftfreq(32, PIXEL_A)[:, None]
    kx = np.fft.fftfreq(48, PIXEL_A)[None, :]
    radius = np.hypot(ky, kx) / (1 / (2 * PIXEL_A))  # in units of Nyquist
    inside, outside = radius < fraction - 1e-6, radius > fraction + 1e-6
    np.testing.assert_allclose(np.abs(kernel[inside]), 1.0, atol=1e-6)
    assert np.all(np.abs(kernel[outside]) == 0)
    assert inside.sum() > 0.1 * radius.size and outside.sum() > 0.1 * radius.size


def _gaussian(grid: Grid, sigma2, centre_A):
    y = np.arange(grid.shape[0]) * grid.pixel_size_A - centre_A[0]
    x = np.arange(grid.shape[1]) * grid.pixel_size_A - centre_A[1]
    r2 = y[:, None] ** 2 + x[None, :] ** 2
    return np.exp(-r2 / (2 * sigma2))


@pytest.mark.parametrize("tilt_mrad", [(0.0, 0.0), (10.0, -15.0)])
def test_gaussian_beam_spreads_as_fresnel_theory_says(tilt_mrad):
    """A Gaussian exp(-r^2/2s^2) propagated by z is (s^2/q) exp(-r^2/2q), q = s^2 + i lambda z / 2 pi,
    and a (crystal) tilt theta moves it by -z tan(theta)."""
    grid = Grid((64, 64), PIXEL_A)  # 16 Å: the beam stays well inside the periodic window
    sigma, z = 1.0, 100.0
    centre = np.array(grid.extent_A) / 2
    wave = _gaussian(grid, sigma**2, centre).astype(np.complex64)
    out = np.asarray(propagate(wave, fresnel_kernel(grid, LAMBDA_A, z, tilt_mrad)))
    q = sigma**2 + 1j * LAMBDA_A * z / (2 * np.pi)
    walk = -z * np.tan(np.asarray(tilt_mrad) * 1e-3)
    expected = sigma**2 / q * _gaussian(grid, q, centre + walk)
    assert rel_err(out, expected) < 2e-5
    # the beam really spread and moved: the untilted, unpropagated Gaussian does not match
    assert rel_err(wave, expected) > 0.05


# ------------------------------------------------------------------ Fourier shift theorem
def _sinusoids(shape, shift=(0.0, 0.0)):
    ny, nx = shape
    y = np.arange(ny)[:, None] - shift[0]
    x = np.arange(nx)[None, :] - shift[1]
    out = np.zeros(shape)
    for (m, n, amp, phi) in [(1, 2, 1.0, 0.3), (3, -1, 0.5, 1.1), (0, 5, 0.7, -0.4), (7, 4, 0.3, 2.0)]:
        out = out + amp * np.cos(2 * np.pi * (m * y / ny + n * x / nx) + phi)
    return out


def test_subpixel_shift_of_sinusoids_is_exact():
    shape = (32, 24)
    shift = (0.37, -1.81)
    out = np.asarray(fourier_shift(jnp.asarray(_sinusoids(shape), jnp.complex64), jnp.asarray(shift)))
    expected = _sinusoids(shape, shift)
    assert rel_err(out, expected) < 1e-5
    assert rel_err(_sinusoids(shape), expected) > 0.1


def test_subpixel_shift_of_gaussian_is_exact():
    grid = Grid((32, 32), 1.0)
    centre = np.array([15.6, 16.2])
    shift = np.array([0.43, -0.77])
    gauss = _gaussian(grid, 2.0**2, centre).astype(np.complex64)
    out = np.asarray(fourier_shift(jnp.asarray(gauss), jnp.asarray(shift)))
    assert rel_err(out, _gaussian(grid, 2.0**2, centre + shift)) < 1e-5


def test_integer_shift_is_roll_and_shift_back_is_identity():
    wave = random_wave((32, 24), seed=7)  # not band limited
    out = np.asarray(fourier_shift(jnp.asarray(wave), jnp.asarray([3.0, -5.0])))
    assert rel_err(out, np.roll(wave, (3, -5), axis=(0, 1))) < 1e-5
    there = fourier_shift(jnp.asarray(wave), jnp.asarray([0.3, 2.6]))
    back = np.asarray(fourier_shift(there, jnp.asarray([-0.3, -2.6])))
    assert rel_err(back, wave) < 1e-5


def test_batched_shifts_match_single_shifts():
    waves = np.stack([random_wave((16, 16), seed=s) for s in range(3)])
    shifts = np.array([[0.2, 0.7], [-1.5, 0.0], [3.0, -0.25]], np.float32)
    batched = np.asarray(fourier_shift(jnp.asarray(waves), jnp.asarray(shifts)))
    for w, s, b in zip(waves, shifts, batched, strict=True):
        assert rel_err(b, fourier_shift(jnp.asarray(w), jnp.asarray(s))) < 1e-6


# ------------------------------------------------------------------ positions and patches
def test_window_centre_pixel_is_the_object_pixel_at_the_position():
    window = (31, 34)  # odd and even, not square: catches swapped axes and off-by-one centres
    hy, wx = 60, 70
    obj = (np.arange(2)[:, None, None] * 10000 + np.arange(hy)[None, :, None] * 100
           + np.arange(wx)[None, None, :]).astype(np.float32)
    pixels = np.array([[20, 25], [33, 19], [27, 36]])
    frac = np.array([[0.0, 0.5], [0.25, 0.75], [0.625, 0.125]])
    pos = ((pixels + frac) * PIXEL_A).astype(np.float32)
    top_left, remainder = split_positions(jnp.asarray(pos), PIXEL_A, window)
    np.testing.assert_allclose(np.asarray(remainder), frac, atol=1e-5)
    patches = np.asarray(crop_patches(jnp.asarray(obj), top_left, window))
    assert patches.shape == (3, 2) + window
    centre = (window[0] // 2, window[1] // 2)
    for n, (py, px) in enumerate(pixels):
        np.testing.assert_array_equal(patches[n, :, centre[0], centre[1]], obj[:, py, px])
        np.testing.assert_array_equal(patches[n], obj[:, py - centre[0] : py - centre[0] + window[0],
                                                      px - centre[1] : px - centre[1] + window[1]])


def test_probe_centre_lands_on_the_position():
    """Scan a centred probe over a small transmitting pinhole at a sub-pixel location c (Å):
    the transmitted intensity is largest at c and symmetric about it in y and x."""
    probe = make_probe(GRID, ENERGY_KV, 20.0, 0.0)[None]  # in focus: symmetric about window (16, 16)
    c = np.array([20.37, 22.71]) * PIXEL_A
    shape = (1, 1, 48, 48)
    yy, xx = np.meshgrid(np.arange(48) * PIXEL_A, np.arange(48) * PIXEL_A, indexing="ij")
    pinhole = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * 0.8**2))
    delta = 0.3
    offsets = np.array([[0, 0], [delta, 0], [-delta, 0], [0, delta], [0, -delta]])
    pos = jnp.asarray(c + offsets, jnp.float32)
    amp = jnp.asarray(np.broadcast_to(pinhole, shape), jnp.float32)
    waves = exit_waves(Optics(GRID, ENERGY_KV), amp, jnp.zeros(shape), probe, pos, jnp.zeros(2), 1.0)
    total = np.asarray(jnp.sum(jnp.abs(waves) ** 2, axis=(1, 2, 3, 4)), np.float64)
    drop = total[0] - total[1:]
    assert np.all(drop > 0.01 * total[0])
    assert abs(total[1] - total[2]) < 1e-3 * drop[0]
    assert abs(total[3] - total[4]) < 1e-3 * drop[2]


# ------------------------------------------------------------------ probe
PROBE_CASES = [
    dict(defocus_A=0.0),
    dict(defocus_A=60.0),
    dict(aberrations={"C10": 40.0, "C12": 20.0, "phi12": 0.7, "C30": 2e4}),
]


@pytest.mark.parametrize("kwargs", PROBE_CASES)
def test_probe_is_normalised_and_confined_to_the_aperture(kwargs):
    convergence = 20.0
    probe = make_probe(GRID, ENERGY_KV, convergence, **kwargs)
    assert probe.dtype == jnp.complex64
    assert float(jnp.sum(jnp.abs(probe) ** 2)) == pytest.approx(1.0, rel=1e-5)
    spectrum = np.abs(np.fft.fft2(np.asarray(probe, np.complex128), norm="ortho")) ** 2
    ky, kx = GRID.frequencies_invA()
    alpha_mrad = LAMBDA_A * np.hypot(ky, kx) * 1e3
    pixel_mrad = GRID.detector_pixel_mrad(LAMBDA_A)[0]
    outside = alpha_mrad > convergence + pixel_mrad
    inside = alpha_mrad < convergence - pixel_mrad
    assert np.sum(spectrum[outside]) < 1e-10
    # aberrations are a pure phase: the aperture is uniformly bright inside
    np.testing.assert_allclose(spectrum[inside], spectrum[inside].mean(), rtol=1e-4)
    assert inside.sum() > 100


def test_defocus_is_minus_c10():
    a = make_probe(GRID, ENERGY_KV, 20.0, defocus_A=75.0)
    b = make_probe(GRID, ENERGY_KV, 20.0, aberrations={"C10": -75.0})
    assert rel_err(a, b) < 1e-6
    assert rel_err(a, make_probe(GRID, ENERGY_KV, 20.0, aberrations={"C10": 75.0})) > 0.1


def test_positive_defocus_focuses_below_the_entrance_surface():
    """``defocus_A = d > 0`` (abTEM's sign, underfocus): the probe reaches its crossover after
    propagating +d Å, i.e. it is the in-focus probe propagated by -d; the in-focus probe
    propagated by +d is the overfocused probe ``defocus_A = -d``."""
    d = 80.0
    in_focus = make_probe(GRID, ENERGY_KV, 20.0, 0.0)
    under = make_probe(GRID, ENERGY_KV, 20.0, d)
    over = make_probe(GRID, ENERGY_KV, 20.0, -d)

    def free(wave, dz):
        return np.asarray(propagate(wave, fresnel_kernel(GRID, LAMBDA_A, dz, bandlimit=None)))

    assert rel_err(free(under, d), in_focus) < 1e-5
    assert rel_err(free(in_focus, d), over) < 1e-5
    assert rel_err(free(in_focus, d), under) > 0.5
    # the crossover (brightest peak) of the d-defocused probe lies at depth d
    depths = np.linspace(0, 2 * d, 17)
    peaks = [np.max(np.abs(free(under, z)) ** 2) for z in depths]
    assert depths[int(np.argmax(peaks))] == pytest.approx(d)


def test_mixed_probe_modes_are_orthogonal_keep_intensity_and_decay():
    probe = make_probe(GRID, ENERGY_KV, 20.0, 50.0) * np.sqrt(1e3)
    n = 4
    modes = np.asarray(make_mixed_probe(probe, n), np.complex128).reshape(n, -1)
    gram = modes.conj() @ modes.T
    norms = np.sqrt(np.real(np.diag(gram)))
    off = np.abs(gram - np.diag(np.diag(gram))) / np.outer(norms, norms)
    assert off.max() < 1e-5
    powers = norms**2
    assert powers.sum() == pytest.approx(1e3, rel=1e-5)
    assert np.all(np.diff(powers) < 0)
    np.testing.assert_allclose(powers / powers.sum(), mode_powers(n), rtol=1e-5)
    # mode 0 is the probe itself (up to its power)
    p = np.asarray(probe, np.complex128).ravel()
    overlap = np.abs(np.vdot(p, modes[0])) ** 2 / (np.vdot(p, p).real * powers[0])
    assert overlap == pytest.approx(1.0, abs=1e-6)
    single = make_mixed_probe(probe, 1)
    assert single.shape == (1,) + WINDOW and rel_err(single[0], probe) == 0


def test_orthogonalize_modes_keeps_the_density_matrix():
    rng = np.random.default_rng(8)
    base = random_wave((16, 16), seed=9)
    raw = np.stack([0.3 * base + 0.2 * random_wave((16, 16), seed=10),  # weak, correlated with the others
                    base,
                    0.8 * base + 0.5 * random_wave((16, 16), seed=11)]).astype(np.complex64)
    raw = raw * np.exp(1j * rng.uniform(0, 2 * np.pi, (3, 1, 1))).astype(np.complex64)
    modes, powers = orthogonalize_modes(jnp.asarray(raw))
    m = np.asarray(modes, np.complex128).reshape(3, -1)
    r = raw.astype(np.complex128).reshape(3, -1)
    assert abs(np.vdot(r[0], r[1])) > 0.1 * np.linalg.norm(r[0]) * np.linalg.norm(r[1])  # really not orthogonal
    gram = m.conj() @ m.T
    norms = np.sqrt(np.real(np.diag(gram)))
    assert (np.abs(gram - np.diag(np.diag(gram))) / np.outer(norms, norms)).max() < 1e-5
    rho_in = r.T @ r.conj()
    rho_out = m.T @ m.conj()
    assert np.linalg.norm(rho_out - rho_in) < 1e-5 * np.linalg.norm(rho_in)
    assert np.trace(rho_out).real == pytest.approx(np.trace(rho_in).real, rel=1e-5)
    powers = np.asarray(powers)
    assert np.all(np.diff(powers) <= 0) and powers.sum() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(powers, norms**2 / np.sum(norms**2), rtol=1e-5)


@pytest.mark.parametrize(("n_old", "n_new"), [(16, 40), (16, 9), (15, 32), (17, 12)])
def test_spectrum_resize_interpolates_band_limited_fields_exactly(n_old, n_new):
    """Padding the spectrum of a band-limited real field samples the same field on a finer grid,
    cropping on a coarser one (a frequency below both Nyquist limits), numpy and JAX alike."""
    from ptycore.physics.fourier import resize_spectrum_axis

    def field(n):
        x = np.arange(n) / n
        return 0.3 + np.cos(2 * np.pi * 3 * x + 0.4) - 0.5 * np.sin(2 * np.pi * 4 * x)

    spec = np.fft.fft(field(n_old), norm="forward")
    numpy_out = resize_spectrum_axis(spec, n_new, 0, real=True)
    jax_out = np.asarray(resize_spectrum_axis(jnp.asarray(spec, jnp.complex64), n_new, 0, real=True))
    np.testing.assert_allclose(np.fft.ifft(numpy_out, norm="forward").real, field(n_new), atol=1e-12)
    np.testing.assert_allclose(jax_out, numpy_out, atol=1e-6)
