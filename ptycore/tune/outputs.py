"""What a study leaves in its folder besides the trials: the study table (``study.csv``,
``study.zarr``), the best plan (``best/plan.yaml``, ``best/init.yaml`` when init parameters are
tuned), figures (``figures/*.png``) and ``report.html``. Each is rewritten whole (atomically)
at the end of every run of ``ptycore tune``, so a resumed study's outputs cover all its trials.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from html import escape
from pathlib import Path

import numpy as np

from ptycore.report import _page, embed_png, fmt
from ptycore.store import create_store, now_iso, write_array
from ptycore.tune.trial import INIT_FILE, PLAN_FILE, trial_dir

COLUMNS = ["trial", "state", "objective", "last_reported", "seconds", "worker", "host", "slurm_job_id",
           "cuda_visible_devices", "sampler_seed", "plan_seed", "attempt", "retry_of", "error"]
USER_ATTR_COLUMNS = COLUMNS[COLUMNS.index("worker"):]  # what the trial records itself (trial.py)


def trial_rows(study) -> list[dict]:
    rows = []
    names = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    for t in study.get_trials(deepcopy=False):
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        steps = sorted(t.intermediate_values)
        row = {"trial": t.number, "state": t.state.name.lower(),
               "objective": t.value if t.state.name == "COMPLETE" else None,
               "last_reported": t.intermediate_values[steps[-1]] if steps else None, "seconds": seconds,
               **{k: t.user_attrs.get(k) for k in USER_ATTR_COLUMNS}}
        row["last_step"] = steps[-1] + 1 if steps else None
        for name in names:
            row[name] = t.params.get(name)
        rows.append(row)
    return rows


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_table(rows: list[dict], out: Path) -> list[str]:
    columns = list(dict.fromkeys(COLUMNS + ["last_step"] + [k for r in rows for k in r]))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c])
                         for c in columns])
    _write_text(out / "study.csv", buf.getvalue())
    tmp = out / "study.zarr.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    group = create_store(tmp)
    n = len(rows)
    for c in columns:
        values = [r.get(c) for r in rows]
        numeric = all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values)
        if numeric and any(v is not None for v in values):
            write_array(group, c, np.array([np.nan if v is None else float(v) for v in values]),
                        attrs={"_ARRAY_DIMENSIONS": ["trial"]})
        else:
            arr = group.create_array(c, shape=(n,), dtype=str, overwrite=True)
            if n:
                arr[...] = np.array(["" if v is None else str(v) for v in values], dtype=str)
            arr.attrs["_ARRAY_DIMENSIONS"] = ["trial"]
    group.attrs.update({"created": now_iso(), "trials": n, "description": "one value per trial; see study.csv"})
    final = out / "study.zarr"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return columns


def write_best(best, out: Path) -> Path | None:
    """best/plan.yaml (and best/init.yaml): the best trial's files, with a header naming it."""
    if best is None:
        return None
    src = trial_dir(out, best.number)
    header = (f"# best trial {best.number} of study {out.name}: objective {best.value:.6g}; written by ptycore tune\n")
    for name in (PLAN_FILE, INIT_FILE):
        target = out / "best" / name
        if (src / name).is_file():
            _write_text(target, header + (src / name).read_text())
        elif target.exists():
            target.unlink()
    return out / "best" / PLAN_FILE


def write_figures(study, out: Path) -> list[tuple[str, Path]]:
    """Optimisation history, parameter importances, parallel coordinates, intermediate values
    (Optuna's matplotlib plots); each only when the study has what it needs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState

    vis = optuna.visualization.matplotlib
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [k for k in {k for t in complete for k in t.params}
              if len({repr(t.params.get(k)) for t in complete}) > 1]
    plots = [("optimisation history", "history.png", lambda: vis.plot_optimization_history(study))]
    plots.append(("objective at each report (pruned trials stop early)", "intermediate.png",
                  lambda: vis.plot_intermediate_values(study)))
    if len(complete) >= 2 and varied:
        plots.append(("parallel coordinates", "parallel_coordinate.png", lambda: vis.plot_parallel_coordinate(study)))
    if len(complete) >= 3 and varied:
        plots.append(("parameter importances (PED-ANOVA)", "importances.png",
                      lambda: vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())))
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for caption, name, make in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = make()
            except (ValueError, RuntimeError) as err:  # e.g. importances of parameters that did not vary
                print(f"ptycore tune: skipped figure {name}: {err}")
                continue
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        made.append((caption, folder / name))
    return made


def write_report(study, rows: list[dict], figures, best, setup, out: Path) -> Path:
    space = setup.space
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "fail", "running")}
    params = sorted({k for r in rows for k in r} - set(COLUMNS) - {"last_step"})
    head = (f"<h1>ptycore tune: {escape(space.title or space.name)}</h1><p class='sub'>{len(rows)} trials: "
            f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed; objective "
            f"{escape(space.objective)} (minimised); base plan {escape(space.plan)}; {now_iso()}</p>")
    if best is not None:
        best_params = "".join(f"<tr><th>{escape(k)}</th><td>{escape(fmt(v))}</td></tr>" for k, v in best.params.items())
        head += (f"<h2>Best trial: {best.number}, objective {fmt(best.value, 6)}</h2><table>{best_params}</table>"
                 "<p>Ready plan: <code>best/plan.yaml</code>" + (" and init config <code>best/init.yaml</code>"
                                                                 if (out / "best" / INIT_FILE).exists() else "")
                 + "</p>")
    figs = "".join(f"<figure>{embed_png(p)}<figcaption>{escape(c)}</figcaption></figure>" for c, p in figures)
    cols = ["trial", "state", "objective", "seconds", "worker", *params, "error"]
    table = "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr>"
    for r in rows:
        cls = " class='failed'" if r["state"] == "fail" else ""
        cells = "".join(f"<td class='num'>{escape(fmt(r.get(c)))}</td>" if isinstance(r.get(c), int | float)
                        else f"<td>{escape(fmt(r.get(c)))}</td>" for c in cols)
        table += f"<tr{cls}>{cells}</tr>"
    body = head + "<h2>Figures</h2>" + figs + "<h2>Trials</h2><table>" + table + "</table>"
    path = out / "report.html"
    _write_text(path, _page(f"ptycore tune {space.name}", body))
    return path


def write_outputs(study, setup) -> dict:
    from optuna.trial import TrialState

    out = setup.out
    rows = trial_rows(study)
    write_table(rows, out)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = min(complete, key=lambda t: t.value) if complete else None
    best_plan = write_best(best, out)
    figures = write_figures(study, out)
    report = write_report(study, rows, figures, best, setup, out)
    return {"trials": len(rows), "complete": len(complete),
            "pruned": sum(1 for r in rows if r["state"] == "pruned"),
            "failed": sum(1 for r in rows if r["state"] == "fail"),
            "best_trial": None if best is None else best.number,
            "best_value": None if best is None else best.value,
            "best_plan": best_plan, "report": report,
            "finite": all(math.isfinite(t.value) for t in complete)}
