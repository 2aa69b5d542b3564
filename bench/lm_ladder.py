"""SSIM to the truth against wall time and gradient-equivalents: Levenberg-Marquardt against the
gradient engine and LSQML, on a ladder of simulated SrTiO3 thicknesses.

For each thickness (unit cells along [001]) this simulates with abTEM (300 kV, 21.4 mrad, dose
1e6 e/Å², defocus and scan below; ``--energy-kv``/``--convergence-mrad`` for another set), runs
ingest → preprocess → init through the CLI, then each method from the same init on the same
data, recording every few iterations the depth-summed phase SSIM against the truth
(``ptycore.evaluate.compare_with_truth``, as ``ptycore evaluate`` computes it), the compute
seconds and the gradient-equivalents spent (a value-and-gradient pass over the data = 1; for LM,
a Gauss-Newton product = 2, a forward-only loss = 0.5, as the engine
reports them; ePIE/LSQML iterations are counted as 1).

Methods (the shipped plans; the warm start of ``lm-multislice`` is counted in its curve):

- ``gradient``: ``multislice-study`` (Adam, 4 Å slices, 200 iterations);
- ``lsqml``: LSQML on the same 4 Å slices (``lsqml-multislice`` below, 60 iterations);
- ``lm``: ``lm-multislice`` (the default plan's ePIE single-slice start, then 8 LM steps);
- ``lm-then-gradient``: the same ePIE start, 2 LM steps, then an 80-iteration gradient polish with
  ``multislice-study``'s regularisers at 0.3x its Adam steps;
- ``default``: the shipped adaptive plan, resolved against each set's metadata as
  ``ptycore reconstruct`` resolves it (ePIE single-slice start, then gradient multislice);
- any other name: a plan YAML path (``path/to/x.yaml``, shown as ``x``), e.g. an LM recipe under test.

A method whose plan has an ``lm`` stage counts as second-order; the others are first-order, and
the table's target is the best first-order method's final SSIM in the same run.

    python bench/lm_ladder.py                       # 4 6 8 12 unit cells, 16x16 scan, every method
    python bench/lm_ladder.py --cells 4 6 --scan 16 --out results/bench/lm-ladder
    python bench/lm_ladder.py --cells 4 --methods my-lm.yaml --append   # add a curve to ladder.json

Prints a table (final SSIM, seconds, gradient-equivalents, and the seconds each method needs to
reach the best first-order method's final SSIM) and writes ``ladder.png`` and ``ladder.json``.
Timings vary +-35 % between runs on a shared machine: compare the methods within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

LSQML_PLAN = {
    "name": "lsqml-multislice", "seed": 0, "stages": [{
        "name": "main", "engine": "lsqml", "iterations": 60, "batch_size": 32, "grouping": "sparse",
        "resample": {"probe_modes": 2, "slice_thickness_A": 4.0},
        "optimize": {"object_phase": {"lr": 1.0}, "object_amplitude": {"lr": 1.0}, "probe": {"lr": 1.0, "start": 5}},
        "constraints": {"probe_orthogonalize": {"every": 1}, "object_amplitude_bounds": {"min": 0.0, "max": 1.0}},
    }]}


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def prepare(out: Path, cells: int, scan: int, defocus_A: float, seed: int, energy_kv: float = 300.0,
            convergence_mrad: float = 21.4) -> Path:
    """Simulate (abTEM) and ingest/preprocess/init one thickness; cached in ``out/sto-<cells>``."""
    d = out / f"sto-{cells}"
    if not (d / "init.zarr").exists():
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "sim").exists():
            run(["ptycore", "simulate", "--out", str(d / "sim"), "--cells-z", str(cells), "--energy-kv",
                 str(energy_kv), "--convergence-mrad", str(convergence_mrad), "--defocus-A", str(defocus_A),
                 "--dose", "1e6", "--scan-shape", str(scan), str(scan), "--seed", str(seed), "--quiet"])
        run(["ptycore", "ingest", "--patterns", f"{d}/sim/patterns.h5:patterns", "--meta", str(d / "sim/meta.yaml"),
             "--out", str(d / "data.zarr"), "--overwrite"])
        run(["ptycore", "preprocess", "--data", str(d / "data.zarr"), "--config",
             str(ROOT / "config/preprocess/default.yaml"), "--out", str(d / "prepared.zarr"), "--overwrite"])
        run(["ptycore", "init", "--data", str(d / "prepared.zarr"), "--out", str(d / "init.zarr"), "--overwrite"])
    return d


def curve(plan, d: Path, every: int):
    """Run every stage of ``plan`` from ``d``'s init; returns points (seconds, grad_eq, ssim, iteration)."""
    from ptycore.errors import InvalidData
    from ptycore.evaluate import DEFAULT_MARGIN_A, Reconstruction, compare_with_truth, load_reconstruction
    from ptycore.recon.context import load_measurement
    from ptycore.recon.runner import run_stage
    from ptycore.recon.state import load_state

    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    measurement = load_measurement(d / "prepared.zarr")
    state, _ = load_state(d / "init.zarr")
    if plan.adaptive:  # ``auto`` fields and expressions, resolved as ``ptycore reconstruct`` does
        from ptycore.recon.reconstruct import resolve_plan

        plan = resolve_plan(plan, d / "prepared.zarr", d / "init.zarr", state)[0]
    points, spent = [], {"seconds": 0.0, "grad_eq": 0.0, "iterations": 0}

    def ssim_of(state, pixel_A):
        rec = Reconstruction(Path("bench"), np.asarray(state.object_phase, np.float64),
                             np.asarray(state.object_amplitude), None, np.asarray(state.positions_A, np.float64),
                             pixel_A, float(state.slice_thickness_A))
        try:
            return compare_with_truth(rec, truth, DEFAULT_MARGIN_A).metrics["ssim_phase_sum"]
        except InvalidData:  # a reconstruction gone far off registers outside the truth's field
            return float("nan")

    for index, stage in enumerate(plan.stages):
        base = dict(spent)
        eq = {"total": 0.0}
        pixel = measurement.pixel_size_A * measurement.detector_shape[0] / (stage.resample.detector_px
                                                                             or measurement.detector_shape[0])

        def observe(it, scalars, st, seconds, stage=stage, base=base, eq=eq, pixel=pixel):
            eq["total"] += scalars.get("gradient_equivalents", 1.0)
            spent.update(seconds=base["seconds"] + seconds, grad_eq=base["grad_eq"] + eq["total"],
                         iterations=base["iterations"] + it + 1)
            if (it + 1) % every == 0 or it + 1 == stage.iterations or (stage.engine == "lm"):
                points.append((spent["seconds"], spent["grad_eq"], ssim_of(st, pixel), spent["iterations"]))

        state, _ = run_stage(stage, index, state, measurement, seed=plan.seed, plan_hash="bench", workdir=None,
                             progress=False, observe=observe)
    return points


def plot(results, path):
    """SSIM against seconds (top) and gradient-equivalents (bottom), one column per thickness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 6.5), squeeze=False)
    methods = list(dict.fromkeys(m for by_method in results.values() for m in by_method))
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour a method in every column
    for col, (cells, by_method) in enumerate(results.items()):
        values = [p[2] for points in by_method.values() for p in points]
        # this thickness's range from a 0.05 step (a thin set's curves are not squashed by a thick one's)
        lowest = max(0.0, np.floor(20 * (np.nanmin(values) - 0.02)) / 20)
        for method, points in by_method.items():
            p = np.asarray(points)
            axes[0, col].plot(p[:, 0], p[:, 2], label=method, color=colour[method])
            axes[1, col].plot(p[:, 1], p[:, 2], label=method, color=colour[method])
        axes[0, col].set_title(f"SrTiO3 {cells} u.c.")
        axes[0, col].set_xlabel("seconds")
        axes[1, col].set_xlabel("gradient-equivalents")
        for row in (0, 1):
            axes[row, col].set_ylabel("phase SSIM (depth sum)")
            axes[row, col].set_ylim(lowest, 1)
            axes[row, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def is_second_order(method: str) -> bool:
    return method == "lm" or method.startswith("lm-") or method.startswith("lm_")


def table(results):
    """Final and best SSIM, seconds, gradient-equivalents, the seconds to the best first-order
    method's final SSIM, and those as a fraction of that method's own wall time (issue 16's goal:
    at most 1/3 for LM)."""
    print(f"{'u.c.':>5} {'method':>14} {'final SSIM':>10} {'best SSIM':>9} {'seconds':>8} {'grad-eq':>8} "
          f"{'s to first-order best':>22} {'fraction':>8}")
    for cells, by_method in results.items():
        first_order = [m for m in by_method if not is_second_order(m)]
        best = max(first_order, key=lambda m: by_method[m][-1][2]) if first_order else None
        target = by_method[best][-1][2] if best else None
        for method, points in by_method.items():
            s, g, ssim, _ = points[-1]
            reach = time_to(points, target) if target is not None else None
            reach_txt = "-" if reach is None else f"{reach:.1f}"
            frac_txt = "-" if reach is None else f"{reach / by_method[best][-1][0]:.2f}"
            print(f"{cells:>5} {method:>14} {ssim:>10.3f} {np.nanmax([p[2] for p in points]):>9.3f} {s:>8.1f} "
                  f"{g:>8.0f} {reach_txt:>22} {frac_txt:>8}")


def time_to(points, target):
    for seconds, _, ssim, _ in points:
        if ssim >= target:
            return seconds
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[4, 6, 8, 12])
    ap.add_argument("--scan", type=int, default=16)
    ap.add_argument("--defocus-A", type=float, default=150.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--energy-kv", type=float, default=300.0)
    ap.add_argument("--convergence-mrad", type=float, default=21.4)
    ap.add_argument("--every", type=int, default=10, help="SSIM every N iterations (every LM step)")
    ap.add_argument("--methods", nargs="+", default=["gradient", "lsqml", "lm", "lm-then-gradient", "default"],
                    help="gradient, lsqml, lm, lm-then-gradient, default, or plan YAML paths "
                         "(an lm recipe's file name starts lm-)")
    ap.add_argument("--append", action="store_true", help="add to (replace methods in) --out's ladder.json")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/lm-ladder")
    ap.add_argument("--from-json", type=Path, help="only tabulate and plot an earlier run's ladder.json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = {int(k): v for k, v in json.loads(args.from_json.read_text()).items()}
        table(results)
        plot(results, args.from_json.with_suffix(".png"))
        return

    from ptycore.plan import load_plan, parse_plan

    plans = {"gradient": load_plan(ROOT / "config/plans/multislice-study.yaml"),
             "lsqml": parse_plan(LSQML_PLAN, "lsqml-multislice"),
             "lm": load_plan(ROOT / "config/plans/lm-multislice.yaml"),
             "lm-then-gradient": load_plan(ROOT / "config/plans/lm-then-gradient.yaml"),
             "default": load_plan(ROOT / "config/plans/default.yaml")}
    for method in args.methods:
        if method not in plans:
            plans[Path(method).stem] = load_plan(Path(method))
    names = [Path(m).stem if m.endswith(".yaml") else m for m in args.methods]
    store = args.out / "ladder.json"
    results = {}
    if args.append and store.exists():
        results = {int(k): v for k, v in json.loads(store.read_text()).items()}
    for cells in args.cells:
        d = prepare(args.out, cells, args.scan, args.defocus_A, args.seed, args.energy_kv, args.convergence_mrad)
        results.setdefault(cells, {})
        for method in names:
            t0 = time.perf_counter()
            results[cells][method] = curve(plans[method], d, args.every)
            print(f"{cells} u.c. {method}: final SSIM {results[cells][method][-1][2]:.3f} "
                  f"({time.perf_counter() - t0:.0f} s with evaluation)", file=sys.stderr, flush=True)
            store.write_text(json.dumps({str(k): v for k, v in sorted(results.items())}, indent=1))

    table(results)
    plot(results, args.out / "ladder.png")


if __name__ == "__main__":
    main()
