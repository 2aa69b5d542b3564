"""``make demo``: the whole pipeline on the embedded default, on this machine.

Runs ``snakemake --profile profiles/local all figures`` in the project root on
``config/config.yaml`` (two small simulated SrTiO3 datasets, the shipped default plan):
simulate → ingest → preprocess → init → reconstruct (one job per plan stage) → evaluate →
aggregate, then prints where the results, figures and reports are. Extra arguments go to
snakemake, e.g. ``python -m ptycore.demo --cores 1`` or ``python -m ptycore.demo -n``.

This module only drives the workflow; it is not imported by the library.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _snakemake_command(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(ROOT), "--profile", str(ROOT / "profiles" / "local"), *extra, "all", "figures"]


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summary(root: Path = ROOT) -> list[str]:
    """Lines naming the results, figures and reports that exist under root/results."""
    results = root / "results"
    lines = []
    evals = sorted(p for p in results.glob("*/*/eval") if p.is_dir())
    if evals:
        lines.append("Per dataset × plan (stage stores, metrics, figures, report):")
        for ev in evals:
            dataset, plan = ev.parent.parent.name, ev.parent.name
            report = ev / "report.html"
            lines.append(f"  {dataset} / {plan}: {_show(ev.parent / 'stages')}/  "
                         f"{_show(report if report.exists() else ev)}")
    outs = [(results / "aggregate", "Across datasets"), (results / "figures" / "overview", "Figures and tables")]
    outs += [(d, f"Study {d.name}") for d in sorted((results / "figures").glob("*"))
             if d.is_dir() and d.name != "overview"]
    for out, what in outs:
        if out.is_dir():
            report = out / "report.html"
            lines.append(f"{what}: {_show(report if report.exists() else out)}")
    table = results / "aggregate" / "metrics.csv"
    if table.exists():
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("status") != "ok":
                    lines.append(f"FAILED {row.get('dataset')} / {row.get('plan')} at {row.get('step')}: "
                                 f"{row.get('error')}")
    lines.append(f"Logs: {_show(results / 'logs')}/   timings: {_show(results / 'benchmarks')}/")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    # jobs call `ptycore`: this interpreter's environment first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MPLBACKEND", "Agg")
    cmd = _snakemake_command(argv)
    print("ptycore demo: simulate two small SrTiO3 datasets and run the whole pipeline on them "
          "(config/config.yaml, profiles/local)", flush=True)
    print("  $ " + " ".join(["snakemake", *cmd[3:]]), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    minutes = (time.perf_counter() - t0) / 60
    print()
    if "-n" in argv or "--dry-run" in argv or "--dryrun" in argv:
        return rc
    print(f"ptycore demo: {'done' if rc == 0 else 'finished with errors'} in {minutes:.1f} min")
    for line in summary():
        print("  " + line)
    return rc


if __name__ == "__main__":
    sys.exit(main())
