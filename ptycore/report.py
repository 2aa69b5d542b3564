"""Self-contained HTML reports: one per evaluation, and an index across evaluations.

Figures are embedded as base64 PNG, so a report can be mailed or moved on its own; the index
links each dataset's report by a path relative to the index.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em 2em; color: #222;
       max-width: 1300px; }
h1 { font-size: 1.45em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde2e2; }
.status-ok { color: #17702c; font-weight: bold; }
.status-failed { color: #b3261e; font-weight: bold; }
.warn { background: #fff4cc; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
figure { display: inline-block; margin: 0.6em 1em 0.6em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
code, pre { font-size: 0.85em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
"""


def fmt(value, digits: int = 4) -> str:
    """A number for a table: significant digits, '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value) if value else "—"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items()) if value else "—"
    return str(value)


def embed_png(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{escape(header[0])}</th><th>{escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


#: (label, metrics key, unit) shown at the top of an evaluation report
KEY_METRICS = [
    ("SSIM, depth-summed phase", "ssim_phase_sum", ""),
    ("PSNR, depth-summed phase", "psnr_phase_sum", "dB"),
    ("RMS phase error", "rmse_phase_sum_rad", "rad"),
    ("correlation with the truth (Pearson)", "correlation_phase_sum", ""),
    ("SSIM per slice", "ssim_per_slice", ""),
    ("PSNR per slice", "psnr_per_slice", "dB"),
    ("slices compared", "slices_compared", ""),
    ("registration shift (y, x)", "registration_shift_A", "Å"),
    ("phase offset removed", "phase_offset_rad", "rad"),
    ("comparison grid", "compared_shape", "px"),
    ("comparison pixel", "compared_pixel_size_A", "Å"),
    ("information limit", "information_limit_A", "Å"),
    ("Nyquist (2 × pixel)", "nyquist_A", "Å"),
    ("FRC resolution (1/7)", "frc_resolution_A", "Å"),
    ("data-fit term", "data_fit_term", ""),
    ("final data-fit loss", "final_loss", ""),
    ("held-out validation loss (last / min)", ("validation_loss", "validation_loss_min"), ""),
    ("position corrections (RMS / max)", ("position_correction_rms_A", "position_correction_max_A"), "Å"),
    ("iterations", "iterations", ""),
    ("median time per iteration", "s_per_iter_median", "s"),
    ("median time per iteration, by stage", "s_per_iter_median_by_stage", "s"),
    ("reconstruction wall time", "wall_seconds", "s"),
    ("object (modes, slices, Hy, Wx)", "object_shape", ""),
    ("pixel size", "pixel_size_A", "Å"),
    ("slice thickness", "slice_thickness_A", "Å"),
    ("probe mode powers", "probe_mode_powers", ""),
]


def evaluation_report(metrics: Mapping, provenance: Mapping, directory: Path) -> str:
    """HTML for one evaluation: key numbers, warnings, provenance, embedded figures, raw metrics."""
    from ptycore.evaluate import FIGURES

    title = f"{metrics.get('dataset')} / {metrics.get('plan') or '—'}"
    parts = [f"<h1>ptycore evaluation: {escape(title)}</h1>",
             f"<p class='sub'>result <code>{escape(str(metrics.get('result')))}</code>"
             + (f", truth <code>{escape(str(metrics['truth']))}</code>" if metrics.get("truth") else ", no truth")
             + f"; evaluated {escape(str(metrics.get('created')))} by ptycore "
             f"{escape(str(metrics.get('ptycore_version')))}</p>"]
    rows = []
    for label, key, unit in KEY_METRICS:
        if isinstance(key, tuple):
            values = [metrics.get(k) for k in key]
            if all(v is None for v in values):
                continue
            text = " / ".join(fmt(v) for v in values)
        else:
            if metrics.get(key) is None or metrics.get(key) == {}:
                continue
            text = fmt(metrics[key])
        rows.append((label, escape(text + (f" {unit}" if unit else ""))))
    parts.append("<h2>Metrics</h2>" + _table(rows))
    if metrics.get("final_terms"):
        parts.append("<p>Last value of each loss term: " + ", ".join(
            f"{escape(k)} = {fmt(v)}" for k, v in metrics["final_terms"].items()) + "</p>")
    for w in metrics.get("warnings") or []:
        parts.append(f"<p class='warn'>{escape(w)}</p>")

    parts.append("<h2>Provenance</h2>" + provenance_html(provenance))

    parts.append("<h2>Figures</h2>")
    for name in metrics.get("figures") or []:
        path = Path(directory) / name
        if path.exists():
            caption = FIGURES.get(name, name)
            parts.append(f"<figure>{embed_png(path)}<figcaption>{escape(name)}: {escape(caption)}"
                         "</figcaption></figure>")
    parts.append("<h2>metrics.json</h2><details><summary>show</summary><pre>"
                 + escape(json.dumps(metrics, indent=1, default=str)) + "</pre></details>")
    return _page(f"ptycore evaluation {title}", "\n".join(parts))


def provenance_html(prov: Mapping) -> str:
    if not any(v for v in prov.values()):
        return "<p>No provenance recorded in the store.</p>"
    rows = []
    for label, key in [("command", "verb"), ("plan", "plan"), ("plan hash", "plan_hash"), ("stages", "stages"),
                       ("seed", "seed"), ("started", "started"), ("finished", "finished"),
                       ("wall time (s)", "wall_seconds"), ("compilations", "compilations"),
                       ("device", "device_kind"), ("platform", "platform"), ("host", "hostname"),
                       ("Slurm job", "slurm_job_id"), ("ptycore", "ptycore_version"), ("git commit", "git_commit"),
                       ("python", "python"), ("made from", "upstream")]:
        if key == "upstream" and prov.get(key):
            rows.append((label, escape(" ← ".join(prov[key]))))
        elif prov.get(key) is not None:
            rows.append((label, escape(fmt(prov[key]))))
    versions = prov.get("versions") or {}
    if versions:
        rows.append(("versions", escape(", ".join(f"{k} {v}" for k, v in versions.items() if v))))
    html = _table(rows)
    timings = prov.get("stage_timings") or {}
    if timings:
        head = ("<tr><th>stage</th><th>iterations</th><th>seconds</th><th>first iteration (s)</th>"
                "<th>compilations</th><th>resumed from</th></tr>")
        body = "".join(
            f"<tr><td>{escape(name)}</td><td class='num'>{fmt(t.get('iterations'))}</td>"
            f"<td class='num'>{fmt(t.get('seconds'))}</td><td class='num'>{fmt(t.get('first_iteration_seconds'))}"
            f"</td><td class='num'>{fmt(t.get('compilations'))}</td><td>{fmt(t.get('resumed_from'))}</td></tr>"
            for name, t in timings.items() if isinstance(t, Mapping))
        html += "<h3>Stage timings</h3><table>" + head + body + "</table>"
    networks = prov.get("networks") or {}
    rows = [(stage, name, net) for stage, nets in networks.items() if isinstance(nets, Mapping)
            for name, net in nets.items() if isinstance(net, Mapping)]
    if rows:  # deep generative prior: the networks that made the object / probe
        head = ("<tr><th>stage</th><th>network</th><th>architecture</th><th>parameters</th>"
                "<th>pre-training iterations</th><th>pre-training loss (first → last)</th></tr>")
        body = "".join(
            f"<tr><td>{escape(stage)}</td><td>{escape(name)}</td><td>{escape(str(net.get('architecture')))} "
            f"{fmt(net.get('levels'))} levels, {fmt(net.get('filters'))} filters</td>"
            f"<td class='num'>{fmt(net.get('parameters'))}</td><td class='num'>{fmt(net.get('pretrain_iterations'))}"
            f"</td><td class='num'>{fmt(net.get('pretrain_loss_first'))} → {fmt(net.get('pretrain_loss_last'))}</td>"
            "</tr>" for stage, name, net in rows)
        html += "<h3>Networks</h3><table>" + head + body + "</table>"
    inputs = prov.get("inputs") or {}
    if inputs:
        html += "<h3>Inputs</h3>" + _table([(str(k), f"<code>{escape(str(v))}</code>") for k, v in inputs.items()])
    return html


#: columns of the index table (metrics key, header, digits)
INDEX_COLUMNS = [
    ("ssim_phase_sum", "SSIM", 4),
    ("psnr_phase_sum", "PSNR (dB)", 3),
    ("information_limit_A", "info limit (Å)", 3),
    ("frc_resolution_A", "FRC (Å)", 3),
    ("final_loss", "final loss", 4),
    ("validation_loss", "validation", 4),
    ("iterations", "iterations", 6),
    ("s_per_iter_median", "s / iter", 3),
]


def index_report(rows: Sequence[Mapping], out_dir: Path, figures: Sequence[tuple[str, str]], *,
                 title: str = "ptycore results") -> str:
    """The aggregate's index: one row per dataset × plan (failed ones flagged), then the figures.

    ``rows`` are metrics dicts plus ``eval_dir`` (for the link) and, for failures, ``error``,
    ``step`` and ``log``.
    """
    n_failed = sum(1 for r in rows if r.get("status") != "ok")
    parts = [f"<h1>{escape(title)}</h1>",
             f"<p class='sub'>{len(rows)} run(s): {len(rows) - n_failed} evaluated, "
             f"<span class='{'status-failed' if n_failed else 'status-ok'}'>{n_failed} failed</span></p>"]
    head = "<tr><th>dataset</th><th>plan</th><th>status</th>" + "".join(
        f"<th>{escape(h)}</th>" for _, h, _ in INDEX_COLUMNS) + "<th>report / error</th></tr>"
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        cells = [escape(str(r.get("dataset"))), escape(str(r.get("plan") or "—")),
                 f"<span class='status-{'ok' if ok else 'failed'}'>{escape(str(r.get('status')))}</span>"]
        if ok:
            cells += [f"<td class='num'>{fmt(r.get(k), d)}</td>" for k, _, d in INDEX_COLUMNS]
            report = Path(r["eval_dir"]) / "report.html" if r.get("eval_dir") else None
            if report is not None and report.exists():
                href = _relative(report, out_dir)
                cells.append(f"<a href='{escape(href)}'>report</a>")
            else:
                cells.append("—")
        else:
            cells += ["<td></td>"] * len(INDEX_COLUMNS)
            where = f" at {escape(str(r['step']))}" if r.get("step") else ""
            log = f"<br><small>log: <code>{escape(str(r['log']))}</code></small>" if r.get("log") else ""
            cells.append(f"failed{where}: <code>{escape(str(r.get('error') or 'unknown error'))}</code>{log}")
        tds = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
        body.append(f"<tr class='{'ok' if ok else 'failed'}'>{tds}</tr>")
    parts.append("<h2>Runs</h2><table>" + head + "".join(body) + "</table>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for path, caption in figures:
            parts.append(f"<figure>{embed_png(Path(path))}<figcaption>{escape(caption)}</figcaption></figure>")
    parts.append("<p class='sub'>Tables: <a href='metrics.csv'>metrics.csv</a>, "
                 "<code>metrics.zarr</code> (one array per numeric metric, indexed by run).</p>")
    return _page(title, "\n".join(parts))


def _relative(path: Path, start: Path) -> str:
    import os

    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_uri()
