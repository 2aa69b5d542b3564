#!/usr/bin/env python
"""The dose series of issue 18: the deep generative prior (``dgp-lowdose``) against pixel plans
on simulated SrTiO3 [001], at equal iterations and at equal wall time.

For each dataset (unit cells × dose, abTEM through ``ptycore simulate``; 300 kV, 21.4 mrad,
150 Å defocus, the simulator's defaults) this runs simulate → ingest → preprocess → init once,
then each method from the same init, in process (``ptycore.recon.runner.run_stage`` with its
``observe`` hook, as ``bench/lm_ladder.py``), recording every ``--every`` iterations the
depth-summed phase SSIM to the truth and the information limit of the depth-summed phase in the
scanned area (both as ``ptycore evaluate`` computes them) against the wall seconds spent (the
observer's own time excluded; compilation, resampling and pre-training included).

Methods:

- ``dgp-lowdose``: the shipped plan (pixel warm start, DGP with identical slices, DGP free slices);
- ``pixel-lowdose``: the same stages, iterations, losses and position refinement with pixels in
  place of the networks (object phase by Adam at the warm start's rate, the probe at lr 0.005
  from the probe network's onset);
- ``pixel-fixed-probe``: the same with the probe kept as it comes in (as the warm start keeps it);
- ``default``: the shipped adaptive default plan (resolved from the data as ``reconstruct`` does).

The pixel methods' last stage runs ``--pixel-extend`` × longer, so that their curves reach the
DGP plan's wall time: "equal iterations" reads a pixel curve at the DGP plan's iteration count
(for ``default``: its own iterations), "equal time" at the DGP plan's wall seconds. The s/iter
of every stage (median of ``history/s_per_iter``, first iteration excluded) gives the network's
overhead. Writes ``dgp_dose.md`` (tables), ``dgp_dose.png`` and ``dgp_dose.json`` to --out; every
run is cached there (``<dataset>/<method>-<plan hash>-....json``: a changed plan runs again).

    python bench/dgp_dose.py                                   # 2 u.c., 1e5 1e4 1e3 1e2, 16x16, 48 px
    python bench/dgp_dose.py --cells 2 8 --dose 1e3 --scan 16 --detector-px 48
    python bench/dgp_dose.py --demo                            # also the `make demo` low-dose set
    python bench/dgp_dose.py --demo-only                       # only that set
    python bench/dgp_dose.py --network 2 8 --dose 1e4 1e3 1e2 --scan 20 --scan-step-A 1.0   # an 18 Å field
    python bench/dgp_dose.py --from-json results/bench/dgp-dose/dgp_dose.json   # tables + figure only

The information limit's rings are 1 / (evaluated field) apart: the field is the scanned area
less the 0.5 Å margin on each side, (scan - 1) × step - 1 Å, so 5 Å on a 16×16 scan at 0.4 Å
(0.2 Å⁻¹ rings, 20 % steps near 1 Å; 12-15 pixels, which also makes SSIM a handful of 7-pixel
windows) and 18 Å on 20×20 at 1 Å (0.056 Å⁻¹, 5.6 %). A scan step of 1 Å keeps a linear overlap
of 1 - step / probe diameter ≈ 0.87 at 150 Å defocus; at a fixed dose per area it puts 6× the
counts of a 0.4 Å step in each pattern. ``*-spectra.png`` shows each method's SSIM and limit
against seconds and the ring power of its phase over the noise floor.

Timings vary ±35 % between runs on a shared machine: compare methods within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plans import CONVERGENCE_MRAD, prepare  # noqa: E402  (bench/plans.py: simulate → ingest → preprocess → init)

ROOT = Path(__file__).resolve().parent.parent
#: the `make demo` low-dose dataset (config/config.yaml's srtio3-2cells-lowdose)
DEMO = {"cells": 2, "dose": 1e4, "scan": 20, "detector_px": 48, "seed": 2}


def dataset(out: Path, cells: int, dose: float, scan: int, detector_px: int, seed: int, kv: float = 300,
            defocus_A: float = 150, step_A: float = 0.4) -> Path:
    """The simulated set (cached in ``out``); kV other than 300 with the convergence of bench/plans.py."""
    other = (("" if kv == 300 else f"-{kv:g}kv") + ("" if defocus_A == 150 else f"-df{defocus_A:g}")
             + ("" if step_A == 0.4 else f"-step{step_A:g}"))
    d = out / f"sto-{cells}uc-{dose:.0e}-scan{scan}-px{detector_px}-seed{seed}{other}"
    return prepare(d, ["--cells-z", str(cells), "--dose", str(dose), "--scan-shape", str(scan), str(scan),
                       "--scan-step-A", str(step_A),
                       "--detector-px", str(detector_px), "--seed", str(seed), "--energy-kv", str(kv),
                       "--convergence-mrad", str(CONVERGENCE_MRAD.get(int(kv), 21.4)), "--defocus-A", str(defocus_A)])


def pixel_twin(record: dict, *, probe: bool = True) -> dict:
    """``dgp-lowdose``'s stages with pixels for the networks: the object phase by Adam at the warm
    start's rate; the probe (``probe``) by Adam at lr 0.005 from the network's onset, or (not
    ``probe``) kept as it comes in, as the warm start keeps it; everything else unchanged."""
    twin = copy.deepcopy(record)
    twin["name"] = "pixel-lowdose" if probe else "pixel-fixed-probe"
    warm = next(s for s in twin["stages"] if "object" not in s and "probe" not in s)["optimize"]
    for stage in twin["stages"]:
        obj, net = stage.pop("object", None), stage.pop("probe", None)
        opt = stage.setdefault("optimize", {})
        if obj is not None:
            opt["object_phase"] = dict(warm["object_phase"])
        if net is not None and probe:
            opt["probe"] = {**warm.get("probe", {"optimizer": "adam", "lr": 0.005}), "start": net.get("start", 0)}
    return twin


def plans(pixel_extend: float, dgp_plan: Path, network: tuple[int, int] | None = None):
    """The methods: name -> (plan, extension of its last stage). ``network`` (levels, filters)
    replaces the DGP plan's network size (the pixel twin does not change)."""
    from ptycore.plan import load_plan, parse_plan

    dgp_record = yaml.safe_load(dgp_plan.read_text())
    twin, fixed = pixel_twin(dgp_record), pixel_twin(dgp_record, probe=False)
    if network is not None:
        for stage in dgp_record["stages"]:
            for field in ("object", "probe"):
                if field in stage:
                    stage[field].update(levels=network[0], filters=network[1])
    return {"dgp-lowdose": (parse_plan(dgp_record, dgp_plan.stem), 1.0),
            "pixel-lowdose": (parse_plan(twin, "pixel-lowdose"), pixel_extend),
            "pixel-fixed-probe": (parse_plan(fixed, "pixel-fixed-probe"), pixel_extend),
            "default": (load_plan(ROOT / "config/plans/default.yaml"), pixel_extend)}


def curve(plan, extend: float, d: Path, every: int, seconds: float | None = None) -> dict:
    """Run ``plan`` (its last stage ``extend`` × longer) from ``d``'s init: points (seconds,
    iteration, SSIM, information limit Å), the nominal iterations, the s/iter per stage and the
    images (depth-summed phase over the scanned area) at the nominal iterations, at the last
    reading at or before ``seconds`` (the DGP plan's time) and at the end."""
    from ptycore.errors import InvalidData
    from ptycore.evaluate import DEFAULT_MARGIN_A, Reconstruction, compare_with_truth, crop_scanned, load_reconstruction
    from ptycore.metrics import information_limit
    from ptycore.recon.context import load_measurement
    from ptycore.recon.reconstruct import resolve_plan
    from ptycore.recon.runner import run_stage
    from ptycore.recon.state import load_state

    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    measurement = load_measurement(d / "prepared.zarr", d / "init.zarr")
    state, _ = load_state(d / "init.zarr")
    plan, _, _, _ = resolve_plan(plan, d / "prepared.zarr", d / "init.zarr", state)
    nominal = sum(s.iterations for s in plan.stages)
    last = plan.stages[-1]
    stages = list(plan.stages[:-1]) + [last.model_copy(update={"iterations": int(round(last.iterations * extend))})]
    points, s_per_iter, pretrain, images = [], {}, {}, {}
    clock = {"start": time.perf_counter(), "observer": 0.0, "done": 0}

    def measure(st, pixel_A):
        rec = Reconstruction(Path("bench"), np.asarray(st.object_phase, np.float64), np.asarray(st.object_amplitude),
                             None, np.asarray(st.positions_A, np.float64), pixel_A, float(st.slice_thickness_A))
        try:
            ssim = compare_with_truth(rec, truth, DEFAULT_MARGIN_A).metrics["ssim_phase_sum"]
        except InvalidData:  # gone far off: registers outside the truth's field
            ssim = float("nan")
        scanned, _, _ = crop_scanned(rec, rec.phase_sum, DEFAULT_MARGIN_A)
        info = information_limit(scanned, pixel_A).limit_A if np.ptp(scanned) > 0 else float("nan")
        return ssim, info, scanned

    for index, stage in enumerate(stages):
        pixel = measurement.pixel_size_A * measurement.detector_shape[0] / (stage.resample.detector_px
                                                                             or measurement.detector_shape[0])

        def observe(it, scalars, st, seconds, stage=stage, pixel=pixel):
            t0 = time.perf_counter()
            n = clock["done"] + it + 1
            if (it + 1) % every == 0 or it + 1 == stage.iterations or n == nominal:
                wall = t0 - clock["start"] - clock["observer"]
                ssim, info, scanned = measure(st, pixel)
                points.append((wall, n, ssim, info))
                images["last"], images["pixel_A"] = scanned, pixel
                if n == nominal:
                    images["nominal"] = scanned
                if seconds is not None and wall <= seconds:
                    images["equal_time"] = scanned
                print(f"  {d.name} {plan.name} {stage.name} it {n}: {wall:.0f} s, SSIM {points[-1][2]:.3f}",
                      file=sys.stderr, flush=True)
            clock["observer"] += time.perf_counter() - t0

        state, record = run_stage(stage, index, state, measurement, seed=plan.seed, plan_hash="bench", workdir=None,
                                  progress=False, observe=observe)
        clock["done"] += stage.iterations
        s = record.history.get("s_per_iter", [])
        s_per_iter[stage.name] = float(np.median(s[1:] if len(s) > 1 else s))
        pretrain.update({f"{stage.name}/{k}": [v[0], v[-1]] for k, v in (record.pretrain or {}).items() if v})
    return {"points": points, "nominal_iterations": nominal, "s_per_iter": s_per_iter, "pretrain": pretrain,
            "images": images}


def at(points, *, iteration=None, seconds=None):
    """The last point at or before ``iteration`` / ``seconds``, with a flag: True if the curve
    ended before it (the value is then the curve's last)."""
    key, limit = (1, iteration) if iteration is not None else (0, seconds)
    before = [p for p in points if p[key] <= limit + 1e-9]
    point = before[-1] if before else points[0]
    return point, points[-1][key] < limit - 1e-9 and point is points[-1]


#: the pixel methods the DGP plan is compared with
PIXEL_METHODS = ("pixel-lowdose", "pixel-fixed-probe", "default")


def info_readings(points, iterations: int) -> dict:
    """Median, min and max of the information-limit readings in the second half of ``iterations``
    (one reading flips between neighbouring reflection shells when a shell's power is near the
    threshold; the median of ~8 readings does not)."""
    v = np.asarray([p[3] for p in points if iterations / 2 < p[1] <= iterations and np.isfinite(p[3])], float)
    if not len(v):
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def truth_information_limit(d: Path) -> float:
    """The information limit of the noise-free truth's depth-summed phase over the scanned area:
    the finest a reconstruction can read on this field (its floor band holds the crystal's own
    outer reflections, not noise)."""
    from ptycore.evaluate import DEFAULT_MARGIN_A, crop_scanned, load_reconstruction
    from ptycore.metrics import information_limit

    truth = load_reconstruction(d / "sim/truth.zarr", role="truth")
    scanned, _, _ = crop_scanned(truth, truth.phase_sum, DEFAULT_MARGIN_A)
    return float(information_limit(scanned, truth.pixel_size_A).limit_A)


def summarise(name: str, runs: dict) -> dict:
    dgp = runs["dgp-lowdose"]
    d_point = at(dgp["points"], iteration=dgp["nominal_iterations"])[0]
    row = {"data": name, "dgp": {"ssim": d_point[2], "info_A": d_point[3], "seconds": d_point[0],
                                 "iterations": d_point[1], "s_per_iter": dgp["s_per_iter"],
                                 "pretrain": dgp["pretrain"],
                                 "info_readings": info_readings(dgp["points"], dgp["nominal_iterations"])}}
    for method in PIXEL_METHODS:
        if method not in runs:
            continue
        r = runs[method]
        iters = r["nominal_iterations"] if method == "default" else dgp["nominal_iterations"]
        p_it, _ = at(r["points"], iteration=iters)
        p_t, short = at(r["points"], seconds=d_point[0])
        row[method] = {"equal_iterations": {"ssim": p_it[2], "info_A": p_it[3], "seconds": p_it[0],
                                            "iterations": p_it[1]},
                       "equal_time": {"ssim": p_t[2], "info_A": p_t[3], "seconds": p_t[0], "iterations": p_t[1],
                                      "curve_ended_early": short},
                       "best": {"ssim": float(np.nanmax([p[2] for p in r["points"]]))},
                       "info_readings": info_readings(r["points"], iters),
                       "s_per_iter": r["s_per_iter"]}
    return row


def tables(rows) -> str:
    head = ("| data | DGP SSIM | pixel twin SSIM (equal it) | pixel twin SSIM (equal time) | default SSIM (own it) "
            "| default SSIM (equal time) | DGP info limit Å | pixel twin info limit Å (equal it / time) | "
            "default info limit Å (own it / equal time) | fixed-probe twin SSIM (equal it / time) | "
            "fixed-probe twin info limit Å (equal it / time) | DGP s | goal met |")
    lines = [head, "|" + "---|" * 13]

    def f(v, fmt=".3f"):
        return "—" if v is None or not np.isfinite(v) else format(v, fmt)

    def cell(m, k):  # '*': the curve ended before the DGP plan's time (its last value)
        return "—" if m is None else f(m[k]["ssim"]) + ("*" if m[k].get("curve_ended_early") else "")

    for row in rows:
        g, px, de, fx = row["dgp"], row.get("pixel-lowdose"), row.get("default"), row.get("pixel-fixed-probe")
        pixel = [m[k] for m in (px, de, fx) if m for k in ("equal_time", "equal_iterations")]
        goal = bool(pixel) and (g["ssim"] >= max(p["ssim"] for p in pixel) + 0.1
                                and g["info_A"] <= 0.8 * min(p["info_A"] for p in pixel))
        lines.append(
            f"| {row['data']} | {f(g['ssim'])} ({g['iterations']} it) | {cell(px, 'equal_iterations')} | "
            f"{cell(px, 'equal_time')} | {cell(de, 'equal_iterations')} ({de and de['equal_iterations']['iterations']}"
            f" it) | {cell(de, 'equal_time')} | {f(g['info_A'], '.2f')} | "
            f"{px and f(px['equal_iterations']['info_A'], '.2f')} / {px and f(px['equal_time']['info_A'], '.2f')} | "
            f"{de and f(de['equal_iterations']['info_A'], '.2f')} / {de and f(de['equal_time']['info_A'], '.2f')} | "
            f"{cell(fx, 'equal_iterations')} / {cell(fx, 'equal_time')} | "
            f"{fx and f(fx['equal_iterations']['info_A'], '.2f')} / {fx and f(fx['equal_time']['info_A'], '.2f')} | "
            f"{g['seconds']:.0f} | {'yes' if goal else 'no'} |")
    lines += ["", "| data | information limit Å, median [min–max] of the readings in the 2nd half of the iterations: "
              "DGP | pixel twin | fixed-probe twin | default | truth |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for m in (row["dgp"], row.get("pixel-lowdose"), row.get("pixel-fixed-probe"), row.get("default")):
            r = m and m.get("info_readings")
            cells.append("—" if not r or not r["n"] else f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]")
        lines.append(f"| {row['data']} | " + " | ".join(cells) + f" | {f(row.get('truth_info_A', np.nan), '.2f')} |")
    lines += ["", "| data | stage | DGP s/iter | pixel twin s/iter | overhead |", "|---|---|---|---|---|"]
    for row in rows:
        px = row.get("pixel-lowdose")
        for stage, s in row["dgp"]["s_per_iter"].items():
            p = px["s_per_iter"].get(stage) if px else None
            lines.append(f"| {row['data']} | {stage} | {s:.3f} | {f(p)} | "
                         f"{'—' if not p else format(s / p, '.1f') + '×'} |")
    return "\n".join(lines)


def figure(rows, curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = {}
    for row, runs in zip(rows, curves, strict=True):
        groups.setdefault(row["data"].split(",")[0], []).append((row, runs))
    for label, items in groups.items():
        items = [it for it in items if not it[0].get("demo")]
        if not items:
            continue
        dose = [it[0]["dose"] for it in items]
        for key, style, getter in (
                ("DGP", "o-", lambda r: r["dgp"]),
                ("pixel twin, equal it", "s--", lambda r: r["pixel-lowdose"]["equal_iterations"]),
                ("pixel twin, equal time", "s:", lambda r: r["pixel-lowdose"]["equal_time"]),
                ("default, equal time", "^:", lambda r: r["default"]["equal_time"])):
            try:
                values = [getter(it[0]) for it in items]
            except KeyError:
                continue
            axes[0].plot(dose, [v["ssim"] for v in values], style, label=f"{label}: {key}")
            axes[1].plot(dose, [v["info_A"] for v in values], style, label=f"{label}: {key}")
    for ax, ylabel in ((axes[0], "depth-summed phase SSIM"), (axes[1], "information limit (Å), lower = finer")):
        ax.set_xscale("log")
        ax.set_xlabel("dose (e/Å²)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    axes[0].set_ylim(-0.2, 1)
    low = [(row, runs) for row, runs in zip(rows, curves, strict=True) if row["dose"] <= 1e3 and not row.get("demo")]
    if low:
        row, runs = min(low, key=lambda it: it[0]["dose"])
        for method, r in runs.items():
            p = np.asarray(r["points"], float)
            axes[2].plot(p[:, 0], p[:, 2], label=method)
        axes[2].axvline(row["dgp"]["seconds"], color="0.6", lw=0.8)
        axes[2].set_title(row["data"])
        axes[2].set_xlabel("wall seconds")
        axes[2].set_ylabel("depth-summed phase SSIM")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", file=sys.stderr)


def spectra_figure(rows, curves, images, path: Path) -> None:
    """Per dataset: SSIM and information limit against wall seconds, and the radial power spectra
    (÷ each image's noise floor) of the DGP plan's phase and the pixel twin's at equal iterations
    and equal time, with the limit's threshold (1 + snr = 2) and the floor band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptycore.metrics import FLOOR_BAND, information_limit

    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 4.0 * len(rows)), squeeze=False)
    for (a_ssim, a_info, a_spec), row, runs, imgs in zip(axes, rows, curves, images, strict=True):
        for method, r in runs.items():
            p = np.asarray(r["points"], float)
            a_ssim.plot(p[:, 0], p[:, 2], label=method)
            a_info.plot(p[:, 0], p[:, 3], label=method)
        for ax, ylabel in ((a_ssim, "depth-summed phase SSIM"), (a_info, "information limit (Å), lower = finer")):
            ax.axvline(row["dgp"]["seconds"], color="0.6", lw=0.8)
            ax.set_xlabel("wall seconds")
            ax.set_ylabel(ylabel)
            ax.set_title(row["data"], fontsize=8)
            ax.legend(fontsize=7)
        a_info.set_ylim(top=min(a_info.get_ylim()[1], 2.0))  # a flat phase reads the first ring (~the field)
        for label, (method, key) in {"DGP": ("dgp-lowdose", "nominal"),
                                     "pixel twin, equal it": ("pixel-lowdose", "nominal"),
                                     "pixel twin, equal time": ("pixel-lowdose", "equal_time"),
                                     "fixed-probe twin, equal it": ("pixel-fixed-probe", "nominal")}.items():
            img = imgs.get(method, {})
            if key not in img:
                continue
            info = information_limit(img[key], float(img["pixel_A"]))
            spec = info.spectrum
            a_spec.semilogy(spec.k_invA[1:], spec.power[1:] / info.floor, label=f"{label}: {info.limit_A:.2f} Å")
            a_spec.axvline(1 / info.limit_A, color=a_spec.lines[-1].get_color(), lw=0.8, ls=":")
        if a_spec.lines:
            kn = 0.5 / float(next(iter(imgs.values()))["pixel_A"])
            a_spec.axhline(2.0, color="k", lw=0.8)
            a_spec.axvspan(FLOOR_BAND[0] * kn, kn, color="0.9")
            a_spec.set_xlabel("k (Å⁻¹)")
            a_spec.set_ylabel("ring power / noise floor")
            a_spec.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[2])
    ap.add_argument("--dose", type=float, nargs="+", default=[1e5, 1e4, 1e3, 1e2])
    ap.add_argument("--scan", type=int, default=16, help="scan positions per side (default 16)")
    ap.add_argument("--scan-step-A", type=float, default=0.4,
                    help="scan step (Å); the information limit's rings are 1 / ((scan - 1) × step - 1 Å) apart")
    ap.add_argument("--detector-px", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulated Poisson noise")
    ap.add_argument("--kv", type=float, default=300, help="beam energy (200: 24 mrad convergence, as bench/plans.py)")
    ap.add_argument("--defocus-A", type=float, default=150)
    ap.add_argument("--demo", action="store_true", help="also the `make demo` low-dose dataset (2 u.c., 1e4, 20x20)")
    ap.add_argument("--demo-only", action="store_true", help="only the `make demo` low-dose dataset")
    ap.add_argument("--methods", nargs="+", default=["dgp-lowdose", "pixel-lowdose", "pixel-fixed-probe", "default"])
    ap.add_argument("--dgp-plan", type=Path, default=ROOT / "config/plans/dgp-lowdose.yaml",
                    help="the DGP plan (its pixel twin is derived from it)")
    ap.add_argument("--network", type=int, nargs=2, metavar=("LEVELS", "FILTERS"),
                    help="the DGP plan's networks at this size instead (e.g. 2 8, the paper's smallest)")
    ap.add_argument("--pixel-extend", type=float, default=3.0,
                    help="the pixel methods' last stage runs this many times longer (for the equal-time reading)")
    ap.add_argument("--every", type=int, default=10, help="SSIM every N iterations")
    ap.add_argument("--out", type=Path, default=ROOT / "results/bench/dgp-dose")
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="only tabulate and plot earlier runs' dgp_dose.json (several: one table and figure, in --out)")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = [json.loads(p.read_text()) for p in args.from_json]
        rows = [r for s in saved for r in s["rows"]]
        curves = [c for s in saved for c in s["curves"]]
        images = [{m: dict(np.load(p)) for m, p in r.get("images", {}).items() if Path(p).exists()} for r in rows]
        stem = args.from_json[0].with_suffix("") if len(saved) == 1 else args.out / "dgp_dose-combined"
        print(tables(rows))
        figure(rows, curves, stem.with_suffix(".png"))
        if any(images):
            spectra_figure(rows, curves, images, Path(f"{stem}-spectra.png"))
        return 0
    if "dgp-lowdose" not in args.methods:
        raise SystemExit("--methods must include dgp-lowdose (the others are read at its iterations and time)")
    args.out.mkdir(parents=True, exist_ok=True)
    methods = plans(args.pixel_extend, args.dgp_plan, args.network)
    sets = [] if args.demo_only else [(c, dose, args.scan, args.detector_px, args.seed)
                                      for c in args.cells for dose in args.dose]
    if args.demo or args.demo_only:
        sets.append((DEMO["cells"], DEMO["dose"], DEMO["scan"], DEMO["detector_px"], DEMO["seed"]))
    tag = args.dgp_plan.stem + ("" if args.network is None else "-L{}F{}".format(*args.network))
    rows, curves, images = [], [], []
    for cells, dose, scan, px, seed in sets:
        demo = (cells, dose, scan, px, seed) == tuple(DEMO.values())
        geometry = (300, 150, 0.4) if demo else (args.kv, args.defocus_A, args.scan_step_A)
        d = dataset(args.out, cells, dose, scan, px, seed, *geometry)
        runs, saved = {}, {}
        for method in args.methods:
            label = {"dgp-lowdose": tag}.get(method, method)  # the plan's hash: a changed plan runs again
            cache = d / f"{label}-{methods[method][0].hash()[7:15]}-x{methods[method][1]:g}-every{args.every}.json"
            saved[method] = cache.with_suffix(".npz")
            if cache.exists():
                runs[method] = json.loads(cache.read_text())
            else:
                t0 = time.perf_counter()
                dgp = runs.get("dgp-lowdose")
                seconds = at(dgp["points"], iteration=dgp["nominal_iterations"])[0][0] if dgp else None
                runs[method] = curve(*methods[method], d, args.every, seconds)
                # the depth-summed phase over the scanned area at the nominal iterations and at the end
                np.savez(cache.with_suffix(".npz"), **runs[method].pop("images"))
                cache.write_text(json.dumps(runs[method]))
                print(f"{d.name} {method}: SSIM {runs[method]['points'][-1][2]:.3f} "
                      f"({time.perf_counter() - t0:.0f} s with evaluation)", file=sys.stderr, flush=True)
        name = f"{cells} u.c., {dose:.0e} e/Å², {scan}×{scan}, {px} px" + (", seed 2 (demo)" if demo else "")
        if not demo and args.scan_step_A != 0.4:
            name += f", step {args.scan_step_A:g} Å"
        if not demo and (args.kv != 300 or args.defocus_A != 150 or args.seed != 0):
            name += f", {args.kv:g} kV, {args.defocus_A:g} Å defocus, seed {seed}"
        if args.network is not None:
            name += ", DGP {} levels/{} filters".format(*args.network)
        images.append({m: dict(np.load(p)) for m, p in saved.items() if p.exists()})
        row = summarise(name, runs)
        row["truth_info_A"] = truth_information_limit(d)
        row["images"] = {m: str(p) for m, p in saved.items() if p.exists()}
        row["dose"], row["cells"], row["demo"] = dose, cells, demo
        rows.append(row)
        curves.append(runs)
    text = tables(rows)
    print(text)
    stem = "dgp_dose" if tag == "dgp-lowdose" else f"dgp_dose-{tag}"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    figure(rows, curves, args.out / f"{stem}.png")
    if any(images):
        spectra_figure(rows, curves, images, args.out / f"{stem}-spectra.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
