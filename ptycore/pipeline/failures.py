"""Runs that failed, and the aggregates built despite them.

With ``--keep-going`` a failed dataset stops only its own branch, so the aggregate's inputs are
incomplete and Snakemake never runs its rule. The workflow's ``onerror`` hook then calls
:func:`aggregate_despite_failures`: for each aggregate the run asked for, it lists the failed
runs (:func:`failed_runs`: the first job whose output is missing, its log and that log's error
line) in ``results/logs/<name>-failures.json``, builds the aggregate from the evaluations that
exist, naming the failures, and swaps it in atomically (:func:`replace_dir`: the old one stays
in place until the new one is complete). It then rewrites the aggregate's rebuild stamp, an
input of the aggregate's rule that is now newer than the aggregate, so that the next run
rebuilds it as an ordinary job once every branch succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ptycore.errors import PtycoreError, first_error_line
from ptycore.pipeline import layout

NOT_RUN = "not run (stopped before this step)"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def failed_runs(pipeline, pairs: Iterable[tuple[str, str]]) -> list[dict]:
    """Each (dataset, plan) of ``pairs`` without an evaluation: the first job (in pipeline order)
    whose output is missing (Snakemake removes the outputs of a failed job), its log and the log's
    error line (:func:`ptycore.errors.first_error_line`)."""
    failed = []
    for dataset, plan in pairs:
        missing = next((job for job in pipeline.jobs(dataset, plan) if not Path(job.output).exists()), None)
        if missing is None:
            continue
        error = first_error_line(missing.log) if Path(missing.log).exists() else None
        failed.append({"dataset": dataset, "plan": plan, "step": missing.label, "log": missing.log,
                       "error": error or NOT_RUN})
    return failed


def replace_dir(new: str | Path, out: str | Path) -> None:
    """Put the complete directory ``new`` at ``out``: the old ``out`` is renamed aside, ``new``
    renamed into place, and only then the old one deleted (if the second rename fails, the old
    one is put back). Both must be on one filesystem (siblings)."""
    new, out = Path(new), Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def build_aggregate(evals: list[str], out: str | Path, *, failures: str | Path | None, title: str,
                    study_spec: str | Path | None = None) -> list[dict]:
    """``ptycore aggregate`` into a temporary sibling of ``out``, then swapped in by :func:`replace_dir`;
    on any error ``out`` is left as it was. Returns the rows."""
    from ptycore.aggregate import aggregate

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        # the report's links are relative to the output's directory: a sibling has the same
        rows = aggregate(evals, work / "out", failures=failures, study=study_spec, title=title)
        replace_dir(work / "out", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


STAMP_TEXT = ("# An input of {out}. Rewritten after {out} was built from only the evaluations that completed\n"
              "# (the failed runs: {failures}), so that the next run rebuilds it as an ordinary job.\n")


def write_rebuild_stamp(name: str) -> Path:
    """(Re)write the rebuild stamp of aggregate ``name`` (``aggregate``, ``figures``, ``studies/NAME``)."""
    out = {"aggregate": layout.AGGREGATE, "figures": layout.OVERVIEW}.get(name) or \
        f"{layout.FIGURES}/{name.removeprefix('studies/')}"
    stamp = Path(layout.rebuild_stamp_path(name))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(STAMP_TEXT.format(out=out, failures=layout.failures_path(name)))
    return stamp


def rebuild_stamp_input(name: str) -> list[str]:
    """The aggregate rule's stamp input: the stamp once the failure hook has written one, else none
    (a stamp that appears changes the rule's input set and is newer than the aggregate; once there,
    it stays, so an aggregate rebuilt by its rule is up to date with it)."""
    stamp = layout.rebuild_stamp_path(name)
    return [stamp] if Path(stamp).exists() else []


def wanted_aggregates(pipeline, target_rules: set[str]) -> list[str]:
    """The aggregates a run with these target rules asked for (by name, see ``Pipeline.aggregates``)."""
    names = pipeline.aggregates()
    wanted = []
    if target_rules & {"all", "aggregate"}:
        wanted.append("aggregate")
    if target_rules & {"figures", "figures_aggregate"} and "figures" in names:
        wanted.append("figures")
    if target_rules & {"figures", "study_aggregate"}:
        wanted += [n for n in names if n.startswith("studies/")]
    return wanted


def aggregate_despite_failures(pipeline, target_rules: set[str], say: Callable[[str], None] = _say) -> list[str]:
    """The workflow's onerror hook (see the module's docstring). Returns the aggregates it built."""
    built = []
    for name in wanted_aggregates(pipeline, target_rules):
        spec = pipeline.aggregates()[name]
        failures = failed_runs(pipeline, spec["pairs"])
        failures_file = Path(layout.failures_path(name))
        failures_file.parent.mkdir(parents=True, exist_ok=True)
        failures_file.write_text(json.dumps(failures, indent=1, ensure_ascii=False) + "\n")
        for f in failures:
            say(f"FAILED {f['dataset']} / {f['plan']} at {f['step']}: {f['error']}  (log: {f['log']})")
        evals = [layout.path("evaluate", d, p) for d, p in spec["pairs"]]
        evals = [e for e in evals if Path(e).exists()]
        study = spec["study"]
        study_spec = None
        if study is not None:
            study_spec = Path(study.spec)
            if not study_spec.is_file():  # its rule did not run: the spec is known anyway
                from ptycore.studies import write_if_changed

                write_if_changed(study_spec, study.spec_text)
        log = Path(f"{layout.LOGS}/{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            build_aggregate(evals, spec["out"], failures=failures_file, title=spec["title"], study_spec=study_spec)
        except (PtycoreError, OSError) as err:
            log.write_text(f"ptycore aggregate: error: {err}\n")
            say(f"the aggregate of the runs that completed failed too: {err} (see {log})")
            continue
        log.write_text(f"built by the workflow's error hook from {len(evals)} evaluations, {len(failures)} failed "
                       f"(listed in {failures_file})\n")
        write_rebuild_stamp(name)
        built.append(name)
        say(f"aggregate of the {len(evals)} evaluations that completed (and {len(failures)} failed): {spec['out']}")
    return built


def clear_stale_failures(pipeline) -> list[str]:
    """The onsuccess hook: a failures list older than its (now rebuilt) aggregate is out of date."""
    removed = []
    for name, spec in pipeline.aggregates().items():
        failures, out = Path(layout.failures_path(name)), Path(spec["out"])
        if failures.exists() and out.exists() and _mtime(out) > failures.stat().st_mtime:
            failures.unlink()
            removed.append(str(failures))
    return removed


def _mtime(path: Path) -> float:
    """A directory output's time as Snakemake keeps it (its .snakemake_timestamp, else the directory's)."""
    stamp = path / ".snakemake_timestamp"
    return stamp.stat().st_mtime if stamp.exists() else path.stat().st_mtime
