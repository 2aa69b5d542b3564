"""`reconstruct` estimates its peak memory before compiling and refuses a run that cannot fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import yaml
import zarr
from _synthetic import make_synthetic, write_stores

from ptycore.cli import main
from ptycore.plan import parse_plan
from ptycore.recon import memory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("memory")
    write_stores(make_synthetic(), d / "prepared.zarr", d / "init.zarr")
    (d / "plan.yaml").write_text(yaml.safe_dump({"stages": [{
        "name": "main", "iterations": 2, "batch_size": 16, "optimize": {"object_phase": {"lr": 0.02}}}]}))
    return d


def _run(d, out, *extra):
    return main(["reconstruct", "--plan", str(d / "plan.yaml"), "--data", str(d / "prepared.zarr"),
                 "--init", str(d / "init.zarr"), "--out", str(out), "--quiet", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_refused_with_max_memory_gb(stores, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    capsys.readouterr()
    assert _run(stores, out, "--max-memory-gb", "0.05") == 2
    line = _one_line(capsys)
    assert re.search(r"estimated peak memory [\d.]+ GB \(stage 'main': .*\) exceeds --max-memory-gb 0\.05", line), line
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_refused_when_the_host_has_too_little_free(stores, tmp_path, capsys, monkeypatch):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("on an accelerator the device's free memory is checked")
    monkeypatch.setattr(memory, "available_host_bytes", lambda: (200_000_000, "test: a small job"))
    out = tmp_path / "r.zarr"
    capsys.readouterr()
    assert _run(stores, out) == 2
    line = _one_line(capsys)
    assert "exceeds the 0.2 GB free (test: a small job)" in line and "--max-memory-gb" in line, line
    assert not out.exists()


def test_bad_max_memory_gb(stores, tmp_path, capsys):
    assert _run(stores, tmp_path / "r.zarr", "--max-memory-gb", "-1") == 2
    assert "--max-memory-gb must be > 0" in _one_line(capsys)


def test_provenance_records_the_estimate(stores, tmp_path):
    out = tmp_path / "r.zarr"
    assert _run(stores, out) == 0
    est = zarr.open_group(str(out)).attrs["provenance"]["memory_estimate"]
    n_pos, n_det = 144, 48  # make_synthetic: 12×12 scan, 48×48 detector
    assert est["data_GB"] == round(n_pos * n_det * n_det * 4 / 1e9, 3)
    assert est["peak_GB"] >= memory.RUNTIME_BYTES / 1e9 and est["peak_stage"] == "main"
    assert est["host_free_GB"] > 0


def _shape(**overrides):
    base = {"name": "s", "engine": "gradient", "n_positions": 1000, "detector_px": (64, 64), "probe_modes": 2,
            "object_modes": 1, "slices": 4, "object_px": (300, 300), "batch_size": 32,
            "optimizers": {"object_phase": ("adam", 10)}}
    base.update(overrides)
    return memory.StageShape(**base)


def test_estimate_counts_what_it_says():
    parts = memory.stage_bytes(_shape())
    assert parts["data"] == 1000 * 64 * 64 * 4
    assert parts["state"] == 2 * (2 * 300 * 300 * 4 * 4 + 2 * 64 * 64 * 8 + 1000 * 8)
    assert parts["optimiser"] == 3 * 4 * 300 * 300 * 4  # gradient + Adam's two moments of the phase
    assert memory.stage_bytes(_shape(optimizers={"object_phase": ("sgd", 10)}))["optimiser"] == 4 * 300 * 300 * 4
    wave = 32 * 2 * 64 * 64 * 8
    assert parts["working set"] == wave * (4 + 1 + memory.WORK_FACTOR) + 32 * 4 * 64 * 64 * 8
    doubled = memory.stage_bytes(_shape(batch_size=64))["working set"]
    assert doubled == 2 * parts["working set"]


def test_stage_shapes_follow_the_plan():
    plan = parse_plan({"stages": [
        {"name": "coarse", "iterations": 1, "resample": {"detector_px": 32, "probe_modes": 1},
         "optimize": {"object_phase": {"lr": 0.1}}},
        {"name": "fine", "iterations": 1, "batch_size": 64, "resample": {"probe_modes": 4, "slice_thickness_A": 5.0},
         "optimize": {"object_phase": {"lr": 0.1}, "probe": {"lr": 0.1}}}]})
    coarse, fine = memory.stage_shapes(plan.stages, n_positions=500, detector_px=(64, 64),
                                       state_shapes={"object": (1, 2, 200, 240), "probe": (2, 64, 64),
                                                     "slice_thickness_A": 10.0})
    assert (coarse.detector_px, coarse.object_px, coarse.probe_modes, coarse.slices) == ((32, 32), (100, 120), 1, 2)
    assert (fine.detector_px, fine.object_px, fine.probe_modes, fine.slices) == ((64, 64), (200, 240), 4, 4)
    est = memory.estimate([coarse, fine], stored_detector_px=(64, 64))
    assert est.stage == "fine"  # more modes, slices and a bigger batch on the full detector


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="peak RSS holds the device's memory only on a CPU")
def test_estimate_is_close_above_the_measured_peak():
    """bench/reconstruct.py on the standard case: its peak RSS against the estimate (the
    module docstring's table; 0.89 when it was written)."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "reconstruct.py"), "--iterations", "2", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = result["peak_rss_MB"] / result["estimate_MB"]
    assert 0.6 < ratio < 1.05, result


def test_on_an_accelerator_the_device_memory_is_checked():
    est = memory.estimate([_shape(batch_size=512)], stored_detector_px=(64, 64))
    roomy_host = memory.Available(host=int(100e9), device=int(0.2e9), source="test: GPU memory free")
    with pytest.raises(memory.InsufficientMemory, match=r"estimated peak device memory [\d.]+ GB .* exceeds the "
                                                        r"0.2 GB free \(test: GPU memory free\)"):
        memory.check_fits(est, roomy_host)
    memory.check_fits(est, memory.Available(host=int(100e9), device=int(100e9), source="big GPU"))  # fits


class _FakeGPU:
    device_kind = "fake GPU"

    def memory_stats(self):
        return {"bytes_limit": 8_000_000_000, "bytes_in_use": 3_000_000_000}


def test_free_device_memory_comes_from_memory_stats():
    available = memory.available_memory(_FakeGPU())
    assert available.device == 5_000_000_000 and "fake GPU memory free" in available.source
    assert memory.available_memory(jax.devices("cpu")[0]).device is None  # a CPU reports none: the host counts


def test_provenance_and_inspect_show_the_memory_per_device_and_stage(stores, tmp_path, capsys):
    """The result records, per stage, the estimate per device and each device's measured peak;
    on the CPU JAX reports no peak ("n/a"). ``inspect`` prints both."""
    out = tmp_path / "r.zarr"
    assert _run(stores, out) == 0
    prov = zarr.open_group(str(out)).attrs["provenance"]
    per_stage = prov["stage_memory"]["main"]
    est = prov["memory_estimate"]
    assert per_stage["estimate_GB_per_device"] == pytest.approx(est["device_GB"], abs=1e-3)
    assert len(per_stage["devices"]) == 1 and len(per_stage["peak_GB"]) == 1
    if jax.devices()[0].platform == "cpu":
        assert per_stage["peak_GB"] == ["n/a"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory per device" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("main:") and "device(s)" in x)
    assert "on each of 1 device(s)" in line and ("n/a" in line or "GB" in line.split("measured")[1]), line


def test_estimate_counts_the_networks():
    """A stage whose object a U-Net makes (object: {model: dgp}) adds the network: weights,
    gradient and AdamW's two moments, and the activations of one forward/backward per batch."""
    from ptycore.recon.networks import unet_parameter_count

    record = {"stages": [{"name": "s", "engine": "gradient", "iterations": 1, "batch_size": 32,
                          "optimize": {"probe": {"lr": 0.1}}}]}
    dgp = {"stages": [{**record["stages"][0], "object": {"model": "dgp", "levels": 3, "filters": 16}}]}
    shapes = {"object": (1, 4, 300, 300), "probe": (2, 64, 64), "slice_thickness_A": 2.0}
    plain, net = (memory.stage_shapes(parse_plan(r).stages, n_positions=1000, detector_px=(64, 64),
                                      state_shapes=shapes)[0] for r in (record, dgp))
    assert net.networks == (("object", 8, 3, 16, "group", (300, 300)),)  # amplitude and phase of 4 slices
    parts = memory.stage_bytes(net)
    assert "networks" not in memory.stage_bytes(plain)
    weights = unet_parameter_count(8, 3, 16) * 4
    assert parts["networks"] > 4 * weights  # weights, gradient, two moments, and the activations
    padded = 304 * 304  # to a multiple of 2^3
    assert parts["networks"] > memory.UNET_ACTIVATION_FACTOR * 16 * padded * 4
    wider = memory.network_bytes(8, 3, 32, "group", (300, 300))
    assert wider > 1.9 * memory.network_bytes(8, 3, 16, "group", (300, 300))  # activations scale with filters
    est = memory.estimate([net], stored_detector_px=(64, 64))
    assert est.parts["networks"] == parts["networks"]
    assert est.device == memory.estimate([plain], stored_detector_px=(64, 64)).device + parts["networks"]


def test_refusal_on_n_devices_is_per_device():
    """On 4 devices the estimate is one device's share, checked against the least free device;
    the line says so."""
    one = memory.estimate([_shape(batch_size=512)], stored_detector_px=(64, 64))
    four = memory.estimate([_shape(batch_size=512)], stored_detector_px=(64, 64), devices=4)
    assert four.device < one.device and four.devices == 4
    free = int(four.device * 0.9)
    with pytest.raises(memory.InsufficientMemory, match=r"estimated peak device memory [\d.]+ GB per device "
                                                        r"\(4 devices\) .* exceeds the .* GB free"):
        memory.check_fits(four, memory.Available(host=int(100e9), device=free, source="test"))
    memory.check_fits(four, memory.Available(host=int(100e9), device=int(four.device * 1.1), source="test"))


class _FullGPU(_FakeGPU):
    def memory_stats(self):
        return {"bytes_limit": 8_000_000_000, "bytes_in_use": 7_000_000_000, "peak_bytes_in_use": 7_500_000_000}


def test_free_memory_of_several_devices_is_the_least_and_peaks_come_from_memory_stats():
    available = memory.available_memory([_FakeGPU(), _FullGPU()])
    assert available.device == 1_000_000_000 and "least free of 2" in available.source
    assert memory.peak_bytes(_FullGPU()) == 7_500_000_000
    assert memory.peak_bytes(jax.devices("cpu")[0]) is None  # the CPU does not say: "n/a"
