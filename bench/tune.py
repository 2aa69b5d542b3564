#!/usr/bin/env python
"""Benchmark ``ptycore tune``; prints numbers, asserts nothing.

A study of simulated data (ptycore's own forward model: a SrTiO3-like lattice phase with a
defect, 300 kV, 21.4 mrad, 100 Å defocus, Poisson noise) whose base plan is deliberately poor:
the object learning rate 30x too small, and the metadata's defocus 20 % off and convergence
angle 16 % off. The study tunes the learning rate, ``init.defocus_A`` and
``init.convergence_mrad`` on the held-out validation loss (median pruner, TPE with
constant_liar; trial 0 is the base plan's own point). It runs once per worker count on a dask
LocalCluster and reports:

* trials per hour (finished trials / wall time of the whole study, cluster start included) and
  the median seconds of a complete trial;
* the objective against trial count: the best validation loss among the trials so far;
* the phase SSIM against the truth (scanned area, each image cropped by its own positions) of
  the base plan and of each study's best plan, rerun from their init configs.

    python bench/tune.py                          # 16 trials, 1 then 2 workers
    python bench/tune.py --trials 24 --workers 1 2 4 --iterations 40

Timings on a shared machine vary: the load average at the start and end is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

LR = "stages[main].optimize.object_phase.lr"
DEFOCUS = "init.defocus_A"
CONVERGENCE = "init.convergence_mrad"
ENERGY_KV, CONVERGENCE_MRAD, DEFOCUS_A, LATTICE_A = 300.0, 21.4, 100.0, 3.905
GOOD_LR = 0.02


def lattice_phase(shape, pixel_A: float) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(shape[0]) * pixel_A, np.arange(shape[1]) * pixel_A, indexing="ij")
    columns = (0.5 * (np.cos(2 * np.pi * yy / LATTICE_A) * np.cos(2 * np.pi * xx / LATTICE_A) + 1)) ** 3
    vacancy = np.exp(-((yy - 0.4 * yy.max()) ** 2 + (xx - 0.6 * xx.max()) ** 2) / 0.6)
    return (0.6 * columns + 0.3 * vacancy).astype(np.float32)


def simulate(folder: Path, scan: int, n_det: int, step_A: float, pixel_A: float, counts: float) -> dict:
    """A prepared store (as ``ptycore preprocess`` writes it) whose metadata is off: defocus
    80 Å (truth 100), convergence 18 mrad (truth 21.4). Returns the truth."""
    import jax.numpy as jnp

    from ptycore.physics import Grid, Optics, intensities, make_probe, object_shape_for, wavelength_A
    from ptycore.store import create_store, write_array

    grid = Grid((n_det, n_det), pixel_A)
    probe = (make_probe(grid, ENERGY_KV, CONVERGENCE_MRAD, DEFOCUS_A) * np.sqrt(counts))[None]
    margin = 6
    pos = np.stack(np.meshgrid(np.arange(scan) * step_A, np.arange(scan) * step_A, indexing="ij"), -1).reshape(-1, 2)
    pos = pos + (n_det // 2 + margin) * pixel_A
    shape = object_shape_for(pos, pixel_A, (n_det, n_det), margin)
    truth = lattice_phase(shape, pixel_A)
    model = intensities(Optics(grid, ENERGY_KV), jnp.ones((1, 1) + shape), jnp.asarray(truth)[None, None], probe,
                        jnp.asarray(pos, jnp.float32), jnp.zeros(2), 10.0)
    noisy = np.random.default_rng(0).poisson(np.asarray(model)).astype(np.float32)
    group = create_store(folder / "prepared.zarr")
    write_array(group, "patterns", np.fft.fftshift(noisy, axes=(-2, -1)))
    write_array(group, "positions_A", pos.astype(np.float32))
    group.attrs.update({"pixel_size_A": pixel_A, "scan_shape": [scan, scan], "metadata": {
        "energy_kv": ENERGY_KV, "convergence_mrad": 18.0, "scan_shape": [scan, scan], "scan_step_A": [step_A, step_A],
        "defocus_A": 0.8 * DEFOCUS_A, "thickness_A": 10.0,
        "detector_pixel_mrad": wavelength_A(ENERGY_KV) / (n_det * pixel_A) * 1e3}})
    return {"phase": truth, "positions_A": pos, "pixel_A": pixel_A}


def phase_ssim(result: Path, truth: dict) -> float:
    from skimage.metrics import structural_similarity

    from ptycore.store import open_store

    group = open_store(result)
    phase = np.asarray(group["object_phase"][...]).sum(axis=(0, 1))
    pos = np.asarray(group["positions_A"][...])

    def crop(image, positions):
        lo = np.ceil(positions.min(0) / truth["pixel_A"]).astype(int)
        hi = np.floor(positions.max(0) / truth["pixel_A"]).astype(int)
        return image[lo[0]:hi[0], lo[1]:hi[1]]

    a, b = crop(phase, pos), crop(truth["phase"], truth["positions_A"])
    n = tuple(min(x, y) for x, y in zip(a.shape, b.shape, strict=True))
    a, b = a[: n[0], : n[1]], b[: n[0], : n[1]]
    a = a - a.mean() + b.mean()
    return float(structural_similarity(a, b, data_range=float(b.max() - b.min())))


def rerun(plan: Path, init: Path, prepared: Path, out: Path) -> Path:
    from ptycore.data.initialize import initialize
    from ptycore.recon.reconstruct import reconstruct

    initialize(prepared, init, out.with_name(out.stem + "-init.zarr"))
    reconstruct(plan_path=plan, data_path=prepared, init_path=out.with_name(out.stem + "-init.zarr"), out_path=out,
                progress=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iterations", type=int, default=30, help="per trial")
    ap.add_argument("--scan", type=int, default=8)
    ap.add_argument("--detector-px", type=int, default=32)
    ap.add_argument("--keep", help="folder to keep the studies in (default: a temporary one)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from optuna.trial import TrialState

    from ptycore.tune.execute import prepare, run_study

    folder = Path(args.keep or tempfile.mkdtemp(prefix="ptycore-bench-tune-"))
    folder.mkdir(parents=True, exist_ok=True)
    truth = simulate(folder, args.scan, args.detector_px, 0.6, 0.3, 1e5)
    plan = {"name": "poor", "seed": 0, "stages": [{
        "name": "main", "engine": "gradient", "iterations": args.iterations, "resample": {"slices": 1},
        "batch_size": 8, "validation_fraction": 0.15,
        "optimize": {"object_phase": {"optimizer": "adam", "lr": GOOD_LR / 30}}, "losses": {"single": 1.0}}]}
    (folder / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (folder / "init.yaml").write_text("probe: aperture\nmargin_px: 4\n")
    space = {"plan": str(folder / "plan.yaml"), "init": str(folder / "init.yaml"),
             "data": [{"prepared": str(folder / "prepared.zarr")}], "trials": args.trials,
             "report_every": 5, "seed": 0, "objective": "validation",
             "pruner": {"kind": "median", "n_startup_trials": 4, "n_warmup_steps": 10},
             "sampler": {"kind": "tpe", "n_startup_trials": 6, "constant_liar": True},
             "parameters": {LR: {"low": 1e-3, "high": 0.2, "log": True}, DEFOCUS: {"low": 50.0, "high": 150.0},
                            CONVERGENCE: {"low": 16.0, "high": 26.0}},
             "enqueue": [{LR: GOOD_LR / 30, DEFOCUS: 0.8 * DEFOCUS_A, CONVERGENCE: 18.0}]}
    load = os.getloadavg()
    print(f"# {args.trials} trials of {args.iterations} iterations, {args.scan}x{args.scan} scan, "
          f"{args.detector_px} px detector; {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start")
    base = rerun(folder / "plan.yaml", folder / "init.yaml", folder / "prepared.zarr", folder / "base.zarr")
    ssim_base = phase_ssim(base, truth)
    rows = {}
    for workers in args.workers:
        space_path = folder / f"poor-{workers}w.yaml"
        space_path.write_text(yaml.safe_dump({**space, "cluster": {"kind": "local", "workers": workers}}))
        out = folder / f"study-{workers}w"
        t0 = time.perf_counter()
        summary = run_study(prepare(space_path, out), progress=False)
        wall = time.perf_counter() - t0
        import optuna

        from ptycore.tune.trial import make_storage

        study = optuna.load_study(study_name=f"poor-{workers}w", storage=make_storage(str(out / "study.journal")))
        trials = sorted(study.get_trials(), key=lambda t: t.number)
        best_so_far, best = [], float("inf")
        for t in trials:
            if t.state == TrialState.COMPLETE:
                best = min(best, t.value)
            best_so_far.append(best)
        seconds = [t.user_attrs["seconds"] for t in trials if t.state == TrialState.COMPLETE]
        tuned = rerun(out / "best" / "plan.yaml", out / "best" / "init.yaml", folder / "prepared.zarr",
                      folder / f"best-{workers}w.zarr")
        rows[workers] = {"wall": wall, "summary": summary, "best_so_far": best_so_far, "params": study.best_params,
                         "median_trial_s": statistics.median(seconds) if seconds else float("nan"),
                         "ssim": phase_ssim(tuned, truth), "base_value": trials[0].value}
    print(f"# load average {os.getloadavg()[0]:.1f} at the end; studies in {folder}")
    print("\nworkers | wall s | trials/hour | median complete trial s | complete / pruned / failed | best objective")
    for w, r in rows.items():
        s = r["summary"]
        print(f"{w:7d} | {r['wall']:6.0f} | {s['trials'] / r['wall'] * 3600:11.0f} | {r['median_trial_s']:23.1f} | "
              f"{s['complete']:3d} / {s['pruned']:3d} / {s['failed']:3d}      | {s['best_value']:.5g}")
    print("\nbest validation loss after n trials (trial 0 = the base plan's point)")
    print("n       | " + " | ".join(f"{w} worker{'s' * (w > 1)}" for w in rows))
    for n in range(args.trials):
        print(f"{n + 1:7d} | " + " | ".join(f"{r['best_so_far'][n]:9.5g}" for r in rows.values()))
    print(f"\nphase SSIM against the truth: base plan {ssim_base:.3f}")
    for w, r in rows.items():
        p = r["params"]
        print(f"  tuned ({w} worker{'s' * (w > 1)}): {r['ssim']:.3f}  (lr {p[LR]:.3g}, defocus {p[DEFOCUS]:.1f} A "
              f"[truth {DEFOCUS_A:g}], convergence {p[CONVERGENCE]:.1f} mrad [truth {CONVERGENCE_MRAD:g}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
