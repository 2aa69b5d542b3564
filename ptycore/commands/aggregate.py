"""``ptycore aggregate``: many evaluations → one table (CSV + zarr), figures and an index report.

See :mod:`ptycore.aggregate` for the inputs (evaluation directories, failures, study) and outputs.
"""

from __future__ import annotations

HELP = "collect evaluations into metrics.csv, metrics.zarr, figures and an index report.html"


def add_arguments(p):
    p.add_argument("--evals", nargs="+", default=[], metavar="DIR",
                   help="evaluation directories from 'ptycore evaluate' (shell globs like 'results/*/*/eval' "
                        "are expanded; a missing directory counts as a failed run)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--failures", metavar="FILE.json",
                   help="failed runs: a JSON list of {dataset, plan, step, log, error} (the workflow writes it)")
    p.add_argument("--failed-logs", nargs="+", default=[], metavar="LOG",
                   help="logs of failed steps (logs/<dataset>[/<plan>]/<step>.log); each becomes a failed run "
                        "with the log's error line ('ptycore VERB: error: ...', else the last line of a traceback)")
    p.add_argument("--study", metavar="STUDY.yaml",
                   help="plot metrics against a study factor (format in 'ptycore.aggregate')")
    p.add_argument("--title", default="ptycore results", help="title of the index report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    from ptycore.aggregate import aggregate

    rows = aggregate(args.evals, args.out, failures=args.failures, failed_logs=args.failed_logs,
                     study=args.study, title=args.title, overwrite=args.overwrite)
    failed = [r for r in rows if r.get("status") != "ok"]
    print(f"aggregate: {len(rows) - len(failed)} evaluated, {len(failed)} failed")
    for r in failed:
        print(f"aggregate: failed {r.get('dataset')} / {r.get('plan') or '-'}: {r.get('error')}")
    print(f"wrote {args.out}")
    return 0
