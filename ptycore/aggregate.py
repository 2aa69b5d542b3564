"""Collect many evaluations into one table, a zarr store, figures and an index report.

Inputs
------
* evaluation directories (``ptycore evaluate --out``), each with ``metrics.json`` and
  ``report.html``; a shell-style glob is expanded too (``'results/*/*/eval'``);
* failures, two ways, both optional:
  ``--failures FILE.json``: a list of ``{"dataset", "plan", "step", "log", "error"}`` records
  (what the Snakemake workflow writes for runs that stopped early);
  ``--failed-logs LOG ...``: log files of failed steps; the dataset (and plan) come from the
  path below a ``logs`` directory (``logs/<dataset>[/<plan>]/<step>.log``), else the file's stem,
  and the error from the log by :func:`ptycore.errors.first_error_line` (the verb's
  ``ptycore VERB: error: ...`` line, else a traceback's last line, else the first line
  mentioning an error, else the last non-empty line);
* an evaluation directory that is missing, has no ``metrics.json`` or an unreadable one is a
  failed run as well (named from its path ``.../<dataset>/<plan>/eval``), with the error of a
  matching failure record or log if there is one;
* ``--study STUDY.yaml`` (optional) for plots of metrics against a study's factor::

      name: batch size           # title (optional)
      factor: batch_size         # x-axis label
      metrics: [ssim_phase_sum]  # optional (default: ssim_phase_sum and final_loss, where present)
      log_x: false               # optional: logarithmic factor axis (dose, say)
      runs:                      # each matches evaluated runs by dataset and/or plan
        - {plan: bs16, value: 16}
        - {plan: bs64, value: 64}

  One line per group of matched runs: per dataset when the runs are picked by plan, per plan
  when picked by dataset. Optional per run: ``series`` (a label: one line per series, e.g. the
  level of a second, crossed factor) and ``columns`` (a mapping of study columns, e.g. the
  factor levels and seed, written into ``table.csv``). ``ptycore.studies`` writes this format
  from a study definition (``config/studies/*.yaml``).

Outputs (``--out DIR``, written atomically)
-------------------------------------------
* ``metrics.csv``: one row per dataset × plan: ``dataset, plan, status, step, error, eval_dir,
  report`` then every metric (lists as JSON, ``final_terms`` flattened to ``final_<term>``);
* ``metrics.zarr``: one array per numeric metric over the runs (float64, NaN where missing;
  per-slice lists as (run, slice) arrays), string arrays ``dataset``, ``plan``, ``status``,
  ``error``, and ``_ARRAY_DIMENSIONS`` attributes so ``xarray.open_zarr`` reads it as a dataset;
* ``report.html``: the index, linking each run's report (relative path), failed runs in red
  with their error line, figures embedded;
* ``table.csv`` (with ``--study``): one row per study run × dataset: ``dataset, plan``, the run's
  ``columns``, ``value`` (the factor level), ``status``, then the study's metrics and
  ``STUDY_TABLE_METRICS`` (floats written exactly, as ``repr``);
* figures: ``ssim.png`` (SSIM of the depth-summed phase per run, when any run has a truth),
  ``information_limit.png``, ``final_loss.png``, and ``study_<metric>.png`` with ``--study``.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from pathlib import Path

import numpy as np

from ptycore.errors import InvalidArgument, InvalidData, first_error_line
from ptycore.store import atomic_output, create_store, now_iso, refuse_existing, write_array

ID_COLUMNS = ["dataset", "plan", "status", "step", "error", "eval_dir", "report"]
#: per-run bar charts: (metric, y label, title, file)
BAR_FIGURES = [
    ("ssim_phase_sum", "SSIM (depth-summed phase)", "SSIM against the truth per run", "ssim.png"),
    ("information_limit_A", "information limit (Å)", "Information limit of the phase per run",
     "information_limit.png"),
    ("final_loss", "final data-fit loss", "Final data-fit loss per run", "final_loss.png"),
]
#: metrics in a study's table.csv besides the study's own
STUDY_TABLE_METRICS = ["ssim_phase_sum", "final_loss", "validation_loss", "iterations", "s_per_iter_median",
                       "iterations_to_90pct_loss_drop", "seconds_to_90pct_loss_drop"]


# ---------------------------------------------------------------- inputs
def expand(paths) -> list[Path]:
    """Paths as given, with shell-style globs expanded (a pattern matching nothing is kept as is)."""
    out: list[Path] = []
    for p in paths:
        p = str(p)
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else []
        out += [Path(m) for m in matches] if matches else [Path(p)]
    return list(dict.fromkeys(out))


def names_from_eval_path(path: Path) -> tuple[str, str | None]:
    """``results/<dataset>/<plan>/eval`` → (dataset, plan); otherwise (directory name, None)."""
    path = Path(path)
    if path.name == "eval" and len(path.parts) >= 3:
        return path.parent.parent.name, path.parent.name
    return path.name, None


def failure_from_log(log: Path) -> dict:
    log = Path(log)
    parts = log.parts
    dataset, plan = log.stem, None
    if "logs" in parts:
        rest = parts[len(parts) - 1 - parts[::-1].index("logs") + 1 :]
        if len(rest) >= 2:
            dataset = rest[0]
            plan = rest[1] if len(rest) >= 3 else None
    error = first_error_line(log) if log.exists() else None
    return {"dataset": dataset, "plan": plan, "step": log.stem, "log": str(log),
            "error": error or ("log not found" if not log.exists() else "empty log")}


def read_failures(path: Path) -> list[dict]:
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidData(f"{path}: failures file not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidData(f"{path}: not a JSON list of failures ({err.__class__.__name__})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and r.get("dataset") for r in records):
        raise InvalidData(f"{path}: expected a JSON list of {{dataset, plan, step, log, error}} records")
    return [{"dataset": str(r["dataset"]), "plan": r.get("plan"), "step": r.get("step"), "log": r.get("log"),
             "error": r.get("error") or "unknown error"} for r in records]


def read_metrics(eval_dir: Path) -> dict:
    path = Path(eval_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidData(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(metrics, dict) or "dataset" not in metrics:
        raise InvalidData(f"{path}: not an evaluation's metrics.json (no 'dataset')")
    return metrics


def collect(evals, failures=(), failed_logs=()) -> list[dict]:
    """One row per dataset × plan: evaluations, then failed runs (missing evaluations, failure records)."""
    records = [dict(r, status="failed") for r in failures] + [dict(failure_from_log(p), status="failed")
                                                              for p in failed_logs]
    rows, missing = [], []
    for d in evals:
        d = Path(d)
        if (d / "metrics.json").is_file():
            try:
                m = read_metrics(d)
            except InvalidData as err:  # one unreadable evaluation must not stop the aggregate
                dataset, plan = names_from_eval_path(d)
                rows.append({"dataset": dataset, "plan": plan, "status": "failed", "step": "evaluate", "log": None,
                             "error": str(err), "eval_dir": str(d)})
                continue
            m = dict(m, eval_dir=str(d), report=str(d / "report.html") if (d / "report.html").exists() else None)
            m.setdefault("status", "ok")
            rows.append(m)
        else:
            dataset, plan = names_from_eval_path(d)
            why = "evaluation directory missing" if not d.exists() else "no metrics.json in the evaluation directory"
            missing.append({"dataset": dataset, "plan": plan, "status": "failed", "step": "evaluate", "log": None,
                            "error": f"{why}: {d}", "eval_dir": str(d)})
    done = {(r.get("dataset"), r.get("plan")) for r in rows}
    done_datasets = {r.get("dataset") for r in rows}

    def match(dataset, plan):
        for r in records:  # exact dataset × plan first, then a dataset-level failure
            if r["dataset"] == dataset and r.get("plan") == plan:
                return r
        for r in records:
            if r["dataset"] == dataset and r.get("plan") is None:
                return r
        return None

    used = set()
    for m in missing:
        r = match(m["dataset"], m["plan"])
        if r is not None:
            used.add(id(r))
            m.update({k: r[k] for k in ("step", "log", "error") if r.get(k)})
        rows.append(m)
    failed_keys = {(m["dataset"], m["plan"]) for m in missing}
    for r in records:
        key = (r["dataset"], r.get("plan"))
        if id(r) in used or key in failed_keys:
            continue
        if key in done or (r.get("plan") is None and r["dataset"] in done_datasets):
            continue  # evaluated after all (a stale log): the evaluation wins
        rows.append(dict(r, eval_dir=None))
        failed_keys.add(key)
    rows.sort(key=lambda r: (str(r.get("dataset")), str(r.get("plan") or ""), r.get("status") != "ok"))
    return rows


def read_study(path: Path) -> dict:
    import yaml

    path = Path(path)
    try:
        study = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidData(f"{path}: study file not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise InvalidData(f"{path}: not a readable YAML file ({err.__class__.__name__})") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list) or not study["runs"]:
        raise InvalidData(f"{path}: a study needs 'factor' and a non-empty 'runs' list")
    if not isinstance(study.get("factor"), str):
        raise InvalidData(f"{path}: 'factor' must name the factor (a string)")
    for i, run in enumerate(study["runs"]):
        if not isinstance(run, dict) or "value" not in run or not (run.get("dataset") or run.get("plan")):
            raise InvalidData(f"{path}: runs[{i}] needs 'value' and 'dataset' and/or 'plan'")
        if "columns" in run and not isinstance(run["columns"], dict):
            raise InvalidData(f"{path}: runs[{i}].columns must be a mapping")
    metrics = study.get("metrics")
    if metrics is not None and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        raise InvalidData(f"{path}: 'metrics' must be a list of metric names")
    return study


# ---------------------------------------------------------------- tables
def _flatten(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if key == "final_terms" and isinstance(value, dict):
            for term, v in value.items():
                flat[f"final_{term}"] = v
        else:
            flat[key] = value
    return flat


def table_columns(rows: list[dict]) -> list[str]:
    from ptycore.evaluate import METRICS_SCHEMA

    keys: list[str] = []
    for row in rows:
        for k in _flatten(row):
            if k not in keys:
                keys.append(k)
    order = {k: i for i, k in enumerate(METRICS_SCHEMA)}
    rest = [k for k in keys if k not in ID_COLUMNS and k != "log"]
    rest.sort(key=lambda k: (order.get(k, len(order)), k))
    return ID_COLUMNS + ["log"] + rest


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return value


def write_csv(rows: list[dict], path: Path) -> list[str]:
    columns = table_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            flat = _flatten(row)
            writer.writerow([_csv_value(flat.get(c)) for c in columns])
    return columns


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def write_zarr(rows: list[dict], path: Path, columns: list[str]) -> list[str]:
    """One array per numeric metric (run,) or (run, slice); string coordinates. Returns the array names."""
    group = create_store(path)
    n = len(rows)
    flats = [_flatten(r) for r in rows]
    names = []
    for key in ("dataset", "plan", "status", "error"):
        values = np.array([str(f.get(key) or "") for f in flats], dtype=str) if n else np.array([], dtype=str)
        arr = group.create_array(key, shape=(n,), dtype=str, overwrite=True)
        if n:
            arr[...] = values
        arr.attrs["_ARRAY_DIMENSIONS"] = ["run"]
        names.append(key)
    for key in columns:
        if key in ID_COLUMNS or key == "log":
            continue
        values = [f.get(key) for f in flats]
        present = [v for v in values if v is not None]
        if not present:
            continue
        if all(_is_number(v) or isinstance(v, bool) for v in present):
            data = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            write_array(group, key, data, attrs={"_ARRAY_DIMENSIONS": ["run"]})
            names.append(key)
        elif all(isinstance(v, list) and all(_is_number(x) or x is None for x in v) for v in present):
            width = max(len(v) for v in present)
            if width == 0:
                continue
            data = np.full((n, width), np.nan)
            for i, v in enumerate(values):
                for j, x in enumerate(v or []):
                    data[i, j] = np.nan if x is None else float(x)
            inner = "slice" if key.endswith("per_slice") else f"{key}_index"
            write_array(group, key, data, attrs={"_ARRAY_DIMENSIONS": ["run", inner]})
            names.append(key)
    group.attrs.update({"created": now_iso(), "runs": n,
                        "failed": sum(1 for r in rows if r.get("status") != "ok"),
                        "description": "one value per run (dataset x plan); see metrics.csv for every column"})
    return names


# ---------------------------------------------------------------- figures
def run_labels(rows: list[dict]) -> list[str]:
    """'dataset' (one plan) or 'dataset / plan'; the evaluation directory added where still ambiguous."""
    plans = {r.get("plan") for r in rows}
    labels = [str(r.get("dataset")) if len(plans) <= 1 else f"{r.get('dataset')} / {r.get('plan') or '—'}"
              for r in rows]
    ambiguous = [labels.count(label) > 1 for label in labels]
    return [f"{label} ({r['eval_dir']})" if amb and r.get("eval_dir") else label
            for label, amb, r in zip(labels, ambiguous, rows, strict=True)]


def make_figures(rows: list[dict], out: Path, study: dict | None = None) -> list[tuple[str, str]]:
    from ptycore import figures as fig

    made = []
    labels = run_labels(rows)
    failed = [r.get("status") != "ok" for r in rows]
    for key, ylabel, title, name in BAR_FIGURES:
        values = [r.get(key) if _is_number(r.get(key)) else None for r in rows]
        if not any(v is not None for v in values):
            continue
        fig.bar_figure(out / name, labels, values, ylabel=ylabel, title=title, failed=failed)
        made.append((str(out / name), title))
    if study is not None:
        made += study_figures(rows, out, study)
    return made


def study_figures(rows: list[dict], out: Path, study: dict) -> list[tuple[str, str]]:
    from ptycore import figures as fig

    metrics = study.get("metrics") or [m for m in ("ssim_phase_sum", "final_loss")
                                       if any(_is_number(r.get(m)) for r in rows)]
    made = []
    for metric in metrics:
        series: dict[str, tuple[list, list]] = {}
        for spec in study["runs"]:
            for r in rows:
                if r.get("status") != "ok" or not _is_number(r.get(metric)):
                    continue
                if spec.get("dataset") and r.get("dataset") != spec["dataset"]:
                    continue
                if spec.get("plan") and r.get("plan") != spec["plan"]:
                    continue
                parts = [str(r.get(k)) for k in ("dataset", "plan") if not spec.get(k)] or [str(r.get("dataset"))]
                if spec.get("series") is not None:
                    parts = [str(spec["series"])] + (parts if len({s.get("dataset") for s in study["runs"]}) > 1
                                                     else [])
                group = " / ".join(parts) or "runs"
                xs, ys = series.setdefault(group, ([], []))
                xs.append(spec["value"])
                ys.append(float(r[metric]))
        if not series:
            continue
        name = f"study_{metric}.png"
        title = f"{study.get('name') or 'study'}: {metric} against {study['factor']}"
        fig.study_figure(out / name, study["factor"], series, metric=metric, title=title,
                         log_x=bool(study.get("log_x")))
        made.append((str(out / name), title))
    return made


def _matches(spec: dict, row: dict) -> bool:
    return all(not spec.get(k) or row.get(k) == spec[k] for k in ("dataset", "plan"))


def write_study_table(rows: list[dict], study: dict, path: Path) -> None:
    """One row per study run entry (× matching evaluation): its columns, value, status and metrics."""
    metrics = list(dict.fromkeys([*(study.get("metrics") or []), *STUDY_TABLE_METRICS]))
    extra = list(dict.fromkeys(k for spec in study["runs"] for k in (spec.get("columns") or {})))
    header = ["dataset", "plan", *extra, "value", "status", "error", *metrics]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for spec in study["runs"]:
            matched = [r for r in rows if _matches(spec, r)] or [
                {"dataset": spec.get("dataset"), "plan": spec.get("plan"), "status": "missing"}]
            for r in matched:
                flat = _flatten(r)
                cols = spec.get("columns") or {}
                values = [r.get("dataset"), r.get("plan"), *(cols.get(k) for k in extra), spec["value"],
                          r.get("status"), r.get("error"), *(flat.get(m) for m in metrics)]
                writer.writerow([_csv_value(v) for v in values])


# ---------------------------------------------------------------- the verb
def aggregate(evals, out, *, failures=None, failed_logs=(), study=None, title="ptycore results",
              overwrite=False) -> list[dict]:
    """Aggregate evaluations into ``out`` (atomically); returns the rows."""
    out = Path(out)
    refuse_existing(out, overwrite)
    eval_dirs = expand(evals or [])
    logs = expand(failed_logs or [])
    records = read_failures(failures) if failures else []
    study_cfg = read_study(study) if study else None
    if not eval_dirs and not records and not logs:
        raise InvalidArgument("nothing to aggregate: give --evals DIR ... (and/or --failures / --failed-logs)")
    rows = collect(eval_dirs, records, logs)

    from ptycore.report import index_report

    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        columns = write_csv(rows, tmp / "metrics.csv")
        write_zarr(rows, tmp / "metrics.zarr", columns)
        figures = make_figures(rows, tmp, study_cfg)
        if study_cfg is not None:
            write_study_table(rows, study_cfg, tmp / "table.csv")
        # links are relative to the final directory (a sibling of tmp, so the same relative paths)
        html = index_report(rows, out, [(p, caption) for p, caption in figures], title=title)
        (tmp / "report.html").write_text(html, encoding="utf-8")
    return rows
