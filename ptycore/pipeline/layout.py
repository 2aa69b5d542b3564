"""Where the pipeline writes, and its steps in order: one table (:data:`STEPS`).

Every rule takes its output, log and benchmark paths from this table (as Snakemake wildcard
patterns, :func:`output_pattern`), and the list of jobs one dataset × plan makes
(:func:`jobs`, for the targets and for naming the step at which a run failed) is read from the
same table, so the topology is written down once.

Layout (all under ``results/``)::

    <dataset>/simulated/                      simulate    (simulated datasets only)
    <dataset>/data.zarr                       ingest
    <dataset>/prepared.zarr                   preprocess
    <dataset>/init.zarr                       init
    <dataset>/<plan>/stages/<stage>.zarr      reconstruct (one job per plan stage)
    <dataset>/<plan>/eval/                    evaluate
    logs/<dataset>/<step>.log, logs/<dataset>/<plan>/<step>[-<stage>].log     the jobs' logs
    benchmarks/... .tsv                       the same names, Snakemake's timings

With the FRC (config ``frc``) each dataset × plan is also reconstructed from each half of its scan,
as the half datasets ``<dataset>~half1`` and ``<dataset>~half2``: the steps marked ``halves`` run
for them too (their preprocess cuts the half from the whole dataset's ``data.zarr``), and evaluate,
the join, reads the final stores of all three.
"""

from __future__ import annotations

from dataclasses import dataclass

RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
FIGURES = f"{RESULTS}/figures"
OVERVIEW = f"{FIGURES}/overview"
AGGREGATE = f"{RESULTS}/aggregate"

NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# The two half datasets of a dataset for the FRC (config frc): NAME~half1 and NAME~half2 ('~' is
# never in a dataset's own name); their stores sit beside the dataset's as results/NAME~halfK/.
HALF_SEP = "~half"
DATASET_RE = rf"{NAME_RE}(?:{HALF_SEP}[12])?"


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: a rule, and the store (or directory) each of its jobs writes.

    ``scope``: ``"dataset"`` (one job per dataset), ``"stage"`` (per dataset × plan × stage) or
    ``"plan"`` (per dataset × plan, after the half datasets: the join). ``simulated``: only for
    simulated datasets (True), only for measured ones (False), both (None). ``halves``: also run
    for the half datasets of the FRC."""

    name: str
    output: str  # under results/, with {dataset}, {plan}, {stage}
    scope: str
    simulated: bool | None = None
    halves: bool = True

    def _stem(self) -> str:
        return {"dataset": "{dataset}/" + self.name, "plan": "{dataset}/{plan}/" + self.name,
                "stage": "{dataset}/{plan}/" + self.name + "-{stage}"}[self.scope]

    @property
    def log(self) -> str:
        return f"{LOGS}/{self._stem()}.log"

    @property
    def benchmark(self) -> str:
        return f"{BENCH}/{self._stem()}.tsv"

    def applies_to(self, dataset: str, simulated: bool) -> bool:
        half = split_half(dataset)[1] is not None
        return (self.simulated is None or self.simulated == simulated) and (self.halves or not half)


#: The pipeline, in order. Ingest reads the simulated patterns for a simulated dataset, the raw
#: files for a measured one.
STEPS = (
    Step("simulate", "{dataset}/simulated", "dataset", simulated=True, halves=False),
    Step("ingest", "{dataset}/data.zarr", "dataset", halves=False),
    Step("preprocess", "{dataset}/prepared.zarr", "dataset"),
    Step("init", "{dataset}/init.zarr", "dataset"),
    Step("reconstruct", "{dataset}/{plan}/stages/{stage}.zarr", "stage"),
    Step("evaluate", "{dataset}/{plan}/eval", "plan", halves=False),
)
STEP = {s.name: s for s in STEPS}


def output_pattern(step: str) -> str:
    """A step's output as a Snakemake pattern, e.g. ``results/{dataset}/data.zarr``."""
    return f"{RESULTS}/{STEP[step].output}"


def dataset_constraint(step: str) -> str:
    """The {dataset} wildcard of a step's rule: any dataset, or (steps not run for the FRC halves)
    a whole dataset only."""
    return DATASET_RE if STEP[step].halves else NAME_RE


def log_pattern(step: str) -> str:
    return STEP[step].log


def benchmark_pattern(step: str) -> str:
    return STEP[step].benchmark


def path(step: str, dataset: str, plan: str | None = None, stage: str | None = None, kind: str = "output") -> str:
    """One job's output (or ``kind="log"``) path."""
    pattern = {"output": output_pattern, "log": log_pattern, "benchmark": benchmark_pattern}[kind](step)
    return pattern.format(dataset=dataset, plan=plan, stage=stage)


# ---------------------------------------------------------------- FRC half datasets
def split_half(dataset: str) -> tuple[str, int | None]:
    """'tiny~half2' -> ('tiny', 2); 'tiny' -> ('tiny', None)."""
    base, sep, k = dataset.rpartition(HALF_SEP)
    return (base, int(k)) if sep and k in ("1", "2") else (dataset, None)


def halves(dataset: str) -> list[str]:
    return [f"{dataset}{HALF_SEP}1", f"{dataset}{HALF_SEP}2"]


# ---------------------------------------------------------------- the jobs of one dataset × plan
@dataclass(frozen=True)
class Job:
    """One job of a dataset × plan: its label in failure reports (``preprocess``,
    ``reconstruct-fine``, ``half1 init``, ...), its output and its log."""

    label: str
    output: str
    log: str


def jobs(dataset: str, plan: str, stages: list[str], *, simulated: bool, frc: bool) -> list[Job]:
    """Every job one dataset × plan needs, in pipeline order: the dataset's own steps, then (with
    ``frc``) each half dataset's, then the join (evaluate)."""
    units = [dataset, *halves(dataset)] if frc else [dataset]
    out = []
    for unit in units:
        prefix = "" if unit == dataset else f"half{split_half(unit)[1]} "
        for step in STEPS:
            if step.scope == "plan" or not step.applies_to(unit, simulated):
                continue
            for stage in stages if step.scope == "stage" else [None]:
                label = prefix + (f"{step.name}-{stage}" if stage else step.name)
                out.append(Job(label, path(step.name, unit, plan, stage), path(step.name, unit, plan, stage, "log")))
    for step in STEPS:
        if step.scope == "plan" and step.applies_to(dataset, simulated):
            out.append(Job(step.name, path(step.name, dataset, plan), path(step.name, dataset, plan, kind="log")))
    return out


# ---------------------------------------------------------------- aggregates and studies
def study_dir(name: str) -> str:
    return f"{RESULTS}/studies/{name}"


def study_plan_path(study: str, plan: str) -> str:
    return f"{study_dir(study)}/plans/{plan}.yaml"


def study_spec_path(study: str) -> str:
    return f"{study_dir(study)}/aggregate.yaml"


def failures_path(name: str) -> str:
    """The failures list of an aggregate built despite failures (``aggregate``, ``figures``,
    ``studies/NAME``)."""
    return f"{LOGS}/{name}-failures.json"


def rebuild_stamp_path(name: str) -> str:
    """An input of the aggregate ``name``: rewritten after the aggregate was built from only the
    evaluations that completed, so that the next run rebuilds it as a job."""
    return f"{LOGS}/{name}-rebuild.stamp"
