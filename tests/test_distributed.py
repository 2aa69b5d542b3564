"""One reconstruction on several devices (ptycore/recon/placement.py): every engine on 4 virtual
CPU devices gives the result of one device up to float32 rounding (the sums over positions
are taken in another order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
N_DEVICES = 4
#: largest difference of a state array, relative to its largest value, N devices vs one: float32
#: rounding of sums taken in another order, grown over a few iterations (Adam's normalised steps
#: amplify it most; measured 3e-5 on 2 devices for the gradient case)
STATE_RTOL = 2e-4
#: largest relative difference of a reported loss per iteration
HISTORY_RTOL = 2e-4


def _compare(tmp_path, n_devices: int, *cases: str) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(HERE / "_distributed_cases.py"), str(n_devices), str(out), *cases],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case on N_DEVICES (about 5 min on 2 CPU cores: the slow tests)."""
    return _compare(tmp_path_factory.mktemp("dist"), N_DEVICES)


def test_epie_on_two_devices_matches_one(tmp_path):
    """The quick check (CI without the slow tests): ePIE, compact batches, 2 devices."""
    r = _compare(tmp_path, 2, "epie")
    assert r["devices"] == 2
    assert max(r["epie"]["state"].values()) < STATE_RTOL, r["epie"]["state"]
    assert max(r["epie"]["history"].values()) < HISTORY_RTOL, r["epie"]["history"]


@pytest.mark.slow
def test_runs_on_the_virtual_devices(results):
    assert results["devices"] == N_DEVICES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gradient", "gradient_poisson", "epie", "lsqml", "lsqml_poisson", "lm"])
def test_engine_on_n_devices_matches_one(results, name):
    r = results[name]
    for array, diff in r["state"].items():
        assert diff < STATE_RTOL, f"{name}: {array} differs by {diff:.3g} (relative) on {N_DEVICES} devices"
    for term, diff in r["history"].items():
        assert diff < HISTORY_RTOL, f"{name}: history {term} differs by {diff:.3g} on {N_DEVICES} devices"
    assert r["compilations"] == [1, 1]  # one compiled iteration on N devices too


@pytest.mark.slow
def test_random_grouping_on_n_devices_still_fits(results):
    """Random batches are drawn per device (stratified) on N devices: not the same batches as on
    one device, but the same fit."""
    r = results["gradient_random"]
    first, (one, many) = r["first_fit"], r["final_fit"]
    assert many < first  # it fits
    assert abs(many - one) < 0.05 * one
