"""The depth-summed SSIM to the truth along a plan's iterations (where a reconstruction chooses its
basin): ``ptycore reconstruct`` with an observer on every stage (``run_stage``'s ``observe``).

    python bench/prior_track.py --plan config/plans/thick-prior.yaml --data /tmp/ladder/sto-16 \
        --out /tmp/track/thick-prior.zarr --every 10

``--data`` is one thickness of ``bench/prior_ladder.py``'s ladder (``prepared.zarr``, ``init.zarr``,
``sim/truth.zarr``). Writes the result ``--out`` (a normal ``ptycore reconstruct`` result) and
``<out>.track.jsonl``: per observed iteration the stage, iteration, the stage's compute seconds, the
SSIM and correlation of the depth-summed phase (NaN where the result does not register on the
truth's field yet) and the iteration's loss terms; the last line the wall seconds. The observer's
own time is not counted in the stage's seconds.

    python bench/prior_track.py --plot docs/data/prior-track-16.json --figure docs/figures/prior-track-16.png

plots SSIM against the iteration (over the stages) of the runs in a JSON ``{"runs": {name: rows}}``
(rows as in the .jsonl files).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def plot(runs: dict, path: Path, title: str = "") -> None:
    """SSIM of the depth-summed phase and its correlation against the iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, rows in runs.items():
        offset, last, pts = 0, {}, []
        for r in rows:
            if "stage" not in r:
                continue
            if r["stage"] not in last:  # a new stage: its iterations continue the previous ones'
                offset += max(last.values(), default=0)
                last = {r["stage"]: 0}
            last[r["stage"]] = r["iteration"]
            if r.get("ssim_phase_sum") is not None:
                pts.append((offset + r["iteration"], r["ssim_phase_sum"], r["correlation_phase_sum"]))
        pts = np.asarray(pts)
        for ax, col in zip(axes, (1, 2), strict=True):
            ax.plot(pts[:, 0], pts[:, col], "o-", ms=3, label=name)
    for ax, label in zip(axes, ("SSIM of the depth sum", "correlation of the depth sum"), strict=True):
        ax.set_xlabel("iteration (all stages)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan")
    ap.add_argument("--data", type=Path, help="one thickness of the ladder (sto-<cells>)")
    ap.add_argument("--init", type=Path, help="default: DATA/init.zarr")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--every", type=int, default=10, help="observe every this many iterations (and each stage's last)")
    ap.add_argument("--plot", type=Path, help="only plot the runs of this JSON to --figure")
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args(argv)
    if args.plot:
        record = json.loads(args.plot.read_text())
        cells = record.get("cells")
        plot(record["runs"], args.figure or args.plot.with_suffix(".png"),
             f"SrTiO3 {cells} u.c.: depth-summed phase against the truth along the plan" if cells else "")
        return
    if not (args.plan and args.data and args.out):
        ap.error("--plan, --data and --out are needed (or --plot)")

    import ptycore.recon.reconstruct as recon
    from ptycore.errors import InvalidData
    from ptycore.evaluate import DEFAULT_MARGIN_A, Reconstruction, compare_with_truth, load_reconstruction

    truth = load_reconstruction(args.data / "sim/truth.zarr", role="truth")
    log = open(f"{args.out}.track.jsonl", "w")
    run_stage = recon.run_stage

    def observed(stage, index, state, measurement, **kw):
        n = stage.resample.detector_px or measurement.detector_shape[0]
        pixel_A = measurement.pixel_size_A * measurement.detector_shape[0] / n  # the stage's object pixel

        def observe(it, scalars, st, seconds):
            if (it + 1) % args.every and it + 1 != stage.iterations and stage.engine != "lm":
                return
            rec = Reconstruction(Path("track"), np.asarray(st.object_phase, np.float64),
                                 np.asarray(st.object_amplitude), None, np.asarray(st.positions_A, np.float64),
                                 pixel_A, float(st.slice_thickness_A))
            try:
                m = compare_with_truth(rec, truth, DEFAULT_MARGIN_A).metrics
                ssim, corr = m["ssim_phase_sum"], m["correlation_phase_sum"]
            except InvalidData:  # far off: registers outside the truth's field
                ssim = corr = float("nan")
            row = {"stage": stage.name, "iteration": it + 1, "seconds": round(seconds, 1), "ssim_phase_sum": ssim,
                   "correlation_phase_sum": corr,
                   **{k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}}
            print(json.dumps(row), file=log, flush=True)

        return run_stage(stage, index, state, measurement, **kw, observe=observe)

    recon.run_stage = observed
    t0 = time.perf_counter()
    recon.reconstruct(plan_path=args.plan, data_path=str(args.data / "prepared.zarr"),
                      init_path=str(args.init or args.data / "init.zarr"), out_path=args.out, overwrite=True,
                      progress=False)
    print(json.dumps({"wall_s": time.perf_counter() - t0}), file=log, flush=True)


if __name__ == "__main__":
    main()
