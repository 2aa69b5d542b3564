#!/usr/bin/env python
"""Speed of ptycore's gradient engine against PtyRAD on the same data, in the same run.

Timings on shared machines move by tens of percent from run to run, so a claim is a ratio of
two runs made one right after the other on the same data. This script simulates the standard
case (bench/reconstruct.py: 24×24 scan, 0.4 Å step, 64×64 detector, 0.1424 Å pixels, 300 kV,
21.4 mrad, 2 probe modes, 6 slices over 46.86 Å, batch 32), then for each pair runs ptycore
(Adam on object and probe) and PtyRAD (its Adam on object and probe, no position refinement),
and prints one JSON line per pair and a summary: median s/iter of each (iterations after the
first) and their ratio.

PtyRAD is optional: it is not a dependency of ptycore (it needs PyTorch). Give the Python of an
environment that has it (see bench/peers.md), or the script says it is absent and exits 0:

    python bench/compare_ptyrad.py --ptyrad-python /tmp/peers-venv/bin/python --pairs 3
    PTYRAD_PYTHON=/tmp/peers-venv/bin/python python bench/compare_ptyrad.py --iterations 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PTYRAD_CHECK = "import ptyrad.solver"
# where PtyRAD 1.0 keeps what a quality comparison needs in its model_iter*.hdf5
MODEL_KEYS = {"objp": "optimizable_tensors/objp", "obja": "optimizable_tensors/obja",
              "crop_pos": "model_attributes/crop_pos", "pos_shifts": "optimizable_tensors/probe_pos_shifts"}


def _imports_ptyrad(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", PTYRAD_CHECK], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def ptyrad_python(requested: str | None) -> str | None:
    """The interpreter to run PtyRAD with: ``requested`` or $PTYRAD_PYTHON (an error if it cannot
    import PtyRAD), else this one if it can, else None (the comparison is skipped)."""
    explicit = requested or os.environ.get("PTYRAD_PYTHON")
    if explicit:
        if not _imports_ptyrad(explicit):
            raise SystemExit(f"compare_ptyrad: error: {explicit} cannot '{PTYRAD_CHECK}' (see bench/peers.md)")
        return explicit
    return sys.executable if _imports_ptyrad(sys.executable) else None


# ---------------------------------------------------------------- the case (ptycore side)
def simulate(args, out: Path) -> dict:
    """Counts (n_pos, N, N), zero frequency at the centre, saved as ``out/dp.npy``; the case."""
    import jax.numpy as jnp
    import numpy as np

    from ptycore.physics import Grid, Optics, diffraction_patterns, make_mixed_probe, make_probe, object_shape_for

    n, pixel = args.detector_px, args.pixel_A
    grid = Grid((n, n), pixel)
    probe = make_mixed_probe(make_probe(grid, args.kv, args.conv_mrad, args.defocus_A) * np.sqrt(args.counts),
                             args.modes)
    iy, ix = np.meshgrid(np.arange(args.scan), np.arange(args.scan), indexing="ij")  # row-major, y slow
    pos = (np.stack([iy.ravel(), ix.ravel()], -1) * args.step_A + (n // 2 + 4) * pixel).astype(np.float32)
    shape = object_shape_for(pos, pixel, (n, n), 4)
    yy, xx = np.meshgrid(np.arange(shape[0]) * pixel, np.arange(shape[1]) * pixel, indexing="ij")
    lattice = (0.5 * (np.cos(2 * np.pi * yy / 3.905) * np.cos(2 * np.pi * xx / 3.905) + 1)) ** 3
    phase = np.broadcast_to(0.1 * lattice, (1, args.slices) + shape).astype(np.float32)
    dz = args.thickness_A / args.slices
    patterns = diffraction_patterns(Optics(grid, args.kv), jnp.ones_like(phase), jnp.asarray(phase), probe,
                                    jnp.asarray(pos), jnp.zeros(2), dz)
    counts = np.random.default_rng(0).poisson(np.asarray(patterns)).astype(np.float32)
    np.save(out / "dp.npy", counts.reshape(len(pos), n, n))
    return {"positions_A": pos, "object_shape": shape, "probe": probe}


def time_ptycore(args, case: dict, dp) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from ptycore.physics import Grid, make_mixed_probe, make_probe
    from ptycore.plan import parse_plan
    from ptycore.recon.context import Measurement
    from ptycore.recon.runner import run_stage
    from ptycore.recon.state import State

    n = args.detector_px
    probe = make_mixed_probe(make_probe(Grid((n, n), args.pixel_A), args.kv, args.conv_mrad, args.defocus_A)
                             * np.sqrt(args.counts), args.modes)  # the known probe as the start, like PtyRAD's
    shape = (1, args.slices) + tuple(case["object_shape"])
    state = State(jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32), probe, jnp.asarray(case["positions_A"]),
                  jnp.zeros(2, jnp.float32), jnp.float32(args.thickness_A / args.slices))
    measurement = Measurement(jnp.asarray(np.fft.ifftshift(dp, axes=(-2, -1))), args.pixel_A, args.kv,
                              args.conv_mrad, (args.scan, args.scan))
    plan = parse_plan({"stages": [{
        "name": "peer", "iterations": args.iterations, "batch_size": args.batch, "grouping": "random",
        "optimize": {"object_phase": {"lr": 1e-3}, "object_amplitude": {"lr": 1e-4}, "probe": {"lr": 1e-3}},
        "losses": {"single": 1.0}, "constraints": {"probe_orthogonalize": {}}}]})
    _, record = run_stage(plan.stages[0], 0, state, measurement, seed=0, plan_hash="peer", workdir=None,
                          progress=False)
    times = record.history["s_per_iter"]
    return {"s_per_iter": statistics.median(times[1:]), "first_iter_s": times[0]}


# ---------------------------------------------------------------- PtyRAD side (runs in PtyRAD's interpreter)
def _scan(spec: dict) -> tuple[int, int]:
    """(scan_y, scan_x) from ``spec["scan"]``: one side of a square scan or [scan_y, scan_x]."""
    scan = spec["scan"]
    return (scan, scan) if isinstance(scan, int) else (int(scan[0]), int(scan[1]))


def ptyrad_params(spec: dict, work: Path) -> dict:
    """PtyRAD 1.0 parameters for the case: its Adam on object amplitude and phase and the probe
    from the first iteration, positions fixed, amplitude loss, mode orthogonalisation."""
    n, (scan_y, scan_x) = spec["detector_px"], _scan(spec)
    n_pos = scan_y * scan_x

    def update(lr):
        return {"start_iter": 1 if lr else None, "lr": lr, "end_iter": None}

    every = {"start_iter": 1, "step": 1, "end_iter": None}
    constraints = {"ortho_pmode": every}
    if spec.get("object_constraints"):  # PtyRAD's usual multislice regularisation, for a quality comparison
        constraints.update(
            fix_probe_int=every,
            obj_zblur={**every, "obj_type": "both", "kernel_size": 5, "std": 1},
            obja_thresh={**every, "relax": 0, "thresh": [0.96, 1.04]})
    return {
        "init_params": {
            "probe_kv": spec["kv"], "probe_conv_angle": spec["conv_mrad"],
            "probe_aberrations": {"C10": -spec["defocus_A"]},  # ptycore's defocus_A is -C10
            "probe_pmode_max": spec["modes"], "meas_Npix": n, "pos_N_scans": n_pos,
            "pos_N_scan_slow": scan_y, "pos_N_scan_fast": scan_x, "pos_scan_step_size": spec["step_A"],
            "pos_scan_affine": None, "pos_scan_rand_std": 0,
            "meas_calibration": {"mode": "dx", "value": spec["pixel_A"]},
            "obj_Nlayer": spec["slices"], "obj_slice_thickness": spec["thickness_A"] / spec["slices"],
            "meas_source": "hdf5", "meas_params": {"path": str(work / "dp.h5"), "key": "dp"},
            "meas_permute": None, "meas_reshape": [n_pos, n, n], "meas_flipT": [0, 0, 0], "meas_crop": None,
            "meas_pad": None, "meas_resample": None},
        "model_params": {
            "detector_blur_std": None, "optimizer_params": {"name": "Adam", "configs": {}, "load_state": None},
            "update_params": {"obja": update(spec["lr_object"]), "objp": update(spec["lr_object"]),
                              "probe": update(spec["lr_probe"]), "probe_pos_shifts": update(0)}},
        "loss_params": {"loss_single": {"state": True, "weight": 1.0, "dp_pow": 0.5}},
        "constraint_params": constraints,
        "recon_params": {
            "NITER": spec["iterations"], "BATCH_SIZE": {"size": spec["batch"], "grad_accumulation": 1},
            "SAVE_ITERS": spec["iterations"], "output_dir": str(work) + "/", "recon_dir_affixes": ["default"],
            "prefix": "peer", "postfix": "", "save_result": ["model"],
            "result_modes": {"obj_dim": [4], "FOV": ["full"], "bit": ["raw"]}, "selected_figs": [],
            "compiler_configs": {"enable": False}},
    }


def run_ptyrad(spec_path: str) -> None:
    """In PtyRAD's interpreter: solve, print {"s_per_iter", "first_iter_s"} as JSON. PtyRAD's
    command line refuses a machine without a GPU, so its solver is called in-process."""
    import glob

    import h5py
    import numpy as np
    import torch
    import yaml
    from ptyrad.params import load_params
    from ptyrad.runtime.device import set_gpu_device
    from ptyrad.solver import PtyRADSolver

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    torch.set_num_threads(spec["threads"])
    with h5py.File(work / "dp.h5", "w") as f:
        f["dp"] = np.load(work / "dp.npy")
    (work / "params.yaml").write_text(yaml.safe_dump(ptyrad_params(spec, work), sort_keys=False))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    PtyRADSolver(load_params(str(work / "params.yaml"), validate=True), device=set_gpu_device(device), seed=0,
                 acc=None).run()
    model = sorted(glob.glob(str(work / "**" / "model_iter*.hdf5"), recursive=True))[-1]
    with h5py.File(model, "r") as f:
        times = np.asarray(f["iter_times"][()], float)
        if spec.get("save_object"):
            save_object(f, spec, work)
    print(json.dumps({"s_per_iter": float(np.median(times[1:])), "first_iter_s": float(times[0])}))


def save_object(f, spec: dict, work: Path) -> None:
    """``work/object.npz``: PtyRAD's object phase and amplitude (object modes, slices, y, x) and the
    probe centres (n_pos, 2) in pixels of its object grid, y first (probe window corners plus half
    the window plus the refined sub-pixel shifts)."""
    import numpy as np

    n = spec["detector_px"]
    corners = np.asarray(f[MODEL_KEYS["crop_pos"]][()], float)
    shifts = np.asarray(f[MODEL_KEYS["pos_shifts"]][()], float) if MODEL_KEYS["pos_shifts"] in f else 0.0
    np.savez(work / "object.npz", objp=np.asarray(f[MODEL_KEYS["objp"]][()]),
             obja=np.asarray(f[MODEL_KEYS["obja"]][()]), probe_centres_px=corners + shifts + n // 2)


def solve_ptyrad(python: str, spec: dict, work: Path) -> dict:
    """Run PtyRAD on ``work/dp.npy`` in its interpreter (``run_ptyrad``); its {"s_per_iter", "first_iter_s"}."""
    spec = {**spec, "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([python, __file__, "--ptyrad-driver", str(work / "spec.json")], capture_output=True,
                         text=True, timeout=6 * 3600)
    (work / "ptyrad.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        raise SystemExit(f"PtyRAD failed (exit {run.returncode}, log {work / 'ptyrad.log'}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def time_ptyrad(python: str, args, work: Path) -> dict:
    spec = {k: getattr(args, k) for k in ("scan", "step_A", "detector_px", "pixel_A", "kv", "conv_mrad", "defocus_A",
                                          "modes", "slices", "thickness_A", "batch", "iterations", "threads")}
    spec.update(lr_object=5e-4, lr_probe=1e-4)
    return solve_ptyrad(python, spec, work)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptyrad-python", help="Python of an environment with PtyRAD (default: $PTYRAD_PYTHON, this one)")
    ap.add_argument("--pairs", type=int, default=3, help="ptycore/PtyRAD pairs, run alternately")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--scan", type=int, default=24)
    ap.add_argument("--step-A", type=float, default=0.4)
    ap.add_argument("--detector-px", type=int, default=64)
    ap.add_argument("--pixel-A", type=float, default=0.1424)
    ap.add_argument("--kv", type=float, default=300.0)
    ap.add_argument("--conv-mrad", type=float, default=21.4)
    ap.add_argument("--defocus-A", type=float, default=100.0, help="-C10 (abTEM's sign)")
    ap.add_argument("--counts", type=float, default=1e5, help="mean counts per pattern")
    ap.add_argument("--modes", type=int, default=2)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--thickness-A", type=float, default=46.86)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads for PtyRAD")
    ap.add_argument("--ptyrad-driver", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ptyrad_driver:
        run_ptyrad(args.ptyrad_driver)
        return 0
    python = ptyrad_python(args.ptyrad_python)
    if python is None:
        print("PtyRAD is not installed here: comparison skipped (install it into its own environment, "
              "see bench/peers.md, and pass --ptyrad-python)")
        return 0
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="ptycore-peer-") as tmp:
        work = Path(tmp)
        case = simulate(args, work)
        dp = np.load(work / "dp.npy")  # zero frequency at the centre, as PtyRAD reads it
        ratios = []
        for pair in range(args.pairs):
            t0 = time.time()
            ours = time_ptycore(args, case, dp)
            peer = time_ptyrad(python, args, work)
            ratios.append(ours["s_per_iter"] / peer["s_per_iter"])
            print(json.dumps({"pair": pair, "ptycore": ours, "ptyrad": peer, "ratio": ratios[-1],
                              "wall_s": time.time() - t0}), flush=True)
    print(f"ptycore / PtyRAD s/iter over {len(ratios)} same-run pairs: median {statistics.median(ratios):.3g} "
          f"(range {min(ratios):.3g}-{max(ratios):.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
