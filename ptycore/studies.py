"""Controlled studies: one base plan, one or two factors with levels, seeds, datasets.

A study (``config/studies/NAME.yaml``) expands into runs, one per factor level (× second
factor level) × seed; each run is a derived plan, the base plan with the level's overrides
and ``seed`` set, and is reconstructed and evaluated on every dataset of the study. The
derived plan is the only thing that differs between the runs of a study::

    name: batch-geometry              # optional (default: the file's stem)
    title: Batch size × grouping      # optional, for the figures and report
    plan: multislice-study            # base plan: a name in config/plans/ or a path to a plan YAML
    datasets: [srtio3-2cells]         # dataset names from the workflow config
    seeds: [0]                        # each sets the derived plan's `seed` (default: [0])
    metrics: [ssim_phase_sum, seconds_to_90pct_loss_drop]   # plotted (default: ssim_phase_sum, final_loss)
    log_x: false                      # logarithmic factor axis
    factors:                          # one factor, or two crossed (the second: one line per level)
      - name: batch_size
        field: "stages[*].batch_size" # shorthand: one field, one value per level
        values: [16, 32, 64]
      - name: grouping
        levels:                       # general form: each level sets any number of plan fields
          - {value: random, set: {"stages[0].grouping": random}}
          - {value: compact, set: {"stages[0].grouping": compact}}

Override paths: dotted keys and ``[i]`` list indices (``[*]``: every element), e.g.
``stages[0].optimize.positions.start``; ``stages[main]`` picks the stage named ``main``.
The last key may be new (a loss term that the base plan lacks); a value ``null`` removes the
key. Stage names cannot be overridden (the workflow runs one job per stage).

Run ids are ``<level label>[-<level label>]-s<seed>`` (labels: ``label``, else the value,
slugified), unique within the study; the workflow names the derived plan
``study-<study name>-<run id>``.

Convergence time (``convergence_time``): reaching a given SSIM needs the SSIM at every
iteration, which the pipeline does not record. Instead a study reports the time until the
data-fit loss has made a given fraction (90 %) of its total decrease over the run:
the first iteration ``k`` with ``loss[0] - loss[k] >= f (loss[0] - loss[-1])``, and the
seconds summed over iterations ``0..k``. Evaluate writes these as
``iterations_to_90pct_loss_drop`` and ``seconds_to_90pct_loss_drop``.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptycore.errors import InvalidArgument, InvalidPlan
from ptycore.plan import format_validation_error, parse_plan

NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_STEP_RE = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Level(_Strict):
    value: Any = Field(description="the level as plotted on the factor axis (number or text)")
    label: str | None = Field(default=None, description="short name in run ids (default: the value)")
    set: dict[str, Any] = Field(default_factory=dict, description="plan field path -> value")


class Factor(_Strict):
    name: str = Field(min_length=1)
    field: str | None = Field(default=None, description="shorthand: the one plan field every level sets")
    values: list[Any] | None = Field(default=None, description="shorthand: one value per level")
    levels: list[Level] | None = None

    @model_validator(mode="after")
    def _one_form(self):
        if self.levels is None:
            if self.field is None or not self.values:
                raise ValueError("give 'levels', or 'field' with a non-empty 'values' list")
            self.levels = [Level(value=v, set={self.field: v}) for v in self.values]
        elif self.field is not None or self.values is not None:
            raise ValueError("give 'levels', or 'field' with 'values', not both")
        if not self.levels:
            raise ValueError("needs at least one level")
        labels = [level_label(lv) for lv in self.levels]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"level labels must be unique, repeated: {dup}")
        return self


class Study(_Strict):
    name: str | None = Field(default=None, pattern=f"^{NAME_RE}$")
    title: str | None = None
    description: str | None = None
    plan: str = Field(description="base plan: a name in config/plans/ or a path to a plan YAML")
    datasets: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    factors: list[Factor] = Field(min_length=1, max_length=2)
    metrics: list[str] | None = None
    log_x: bool = False

    @model_validator(mode="after")
    def _unique(self):
        for what, items in (("datasets", self.datasets), ("seeds", self.seeds),
                            ("factor names", [f.name for f in self.factors])):
            if len(set(items)) != len(items):
                raise ValueError(f"{what} must be unique: {items}")
        return self


def level_label(level: Level) -> str:
    text = level.label if level.label is not None else str(level.value)
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")
    return slug or "level"


@dataclass(frozen=True)
class Run:
    """One study run: a derived plan, reconstructed on every dataset of the study."""

    run_id: str
    plan: dict
    levels: dict[str, Any]  # factor name -> level value
    seed: int
    datasets: tuple[str, ...] = field(default=())

    def plan_name(self, study_name: str) -> str:
        return f"study-{study_name}-{self.run_id}"


# ---------------------------------------------------------------- loading
def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: study file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise InvalidArgument(f"{path}: a study is a mapping with 'plan', 'datasets' and 'factors'")
    try:
        study = Study.model_validate(record)
    except ValidationError as err:
        raise InvalidArgument(format_validation_error(err, str(path))) from None
    if study.name is None:
        study = study.model_copy(update={"name": path.stem})
    if not re.fullmatch(NAME_RE, study.name):
        raise InvalidArgument(f"{path}: name: {study.name!r} must match {NAME_RE}")
    return study


def default_plan_path(plan: str, root: str | Path = ".") -> Path:
    """A plan name (config/plans/NAME.yaml under root) or a path (relative to root)."""
    if plan.endswith((".yaml", ".yml")) or "/" in plan:
        return Path(root) / plan
    return Path(root) / "config" / "plans" / f"{plan}.yaml"


# ---------------------------------------------------------------- overrides
def _steps(path: str) -> list[str | tuple]:
    steps: list[str | tuple] = []
    pos = 0
    for m in _STEP_RE.finditer(path):
        if m.start() != pos and path[pos:m.start()] != ".":
            raise ValueError(f"cannot read field path {path!r}")
        pos = m.end()
        steps.append(m.group(1) if m.group(1) is not None else ("index", m.group(2).strip()))
    if not steps or pos != len(path) or path.endswith("."):
        raise ValueError(f"cannot read field path {path!r}")
    return steps


def _select(node, step, path):
    """The children a step picks: [(container, key), ...]."""
    if isinstance(step, str):
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {step!r} is a key, but the plan has a {type(node).__name__} here")
        return [(node, step)]
    key = step[1]
    if not isinstance(node, list):
        raise ValueError(f"{path}: [{key}] is an index, but the plan has a {type(node).__name__} here")
    if key == "*":
        return [(node, i) for i in range(len(node))]
    if re.fullmatch(r"-?\d+", key):
        i = int(key)
        if not -len(node) <= i < len(node):
            raise ValueError(f"{path}: index [{i}] out of range (the plan has {len(node)})")
        return [(node, i)]
    named = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key]
    if not named:
        raise ValueError(f"{path}: no element named {key!r}")
    return [(node, named[0])]


def set_field(plan: dict, path: str, value: Any) -> None:
    """Set ``path`` (e.g. ``stages[0].optimize.positions.start``) in ``plan`` in place; ``None`` removes."""
    steps = _steps(path)
    if isinstance(steps[-1], str) and steps[-1] == "name" and len(steps) == 3 and steps[0] == "stages":
        raise ValueError(f"{path}: stage names cannot be overridden")
    if steps[0] == "seed":
        raise ValueError(f"{path}: the seed comes from the study's 'seeds'")
    parents = [plan]
    for step in steps[:-1]:
        nxt = []
        for node in parents:
            for container, key in _select(node, step, path):
                if isinstance(container, dict) and key not in container:
                    raise ValueError(f"{path}: the base plan has no {key!r} here")
                nxt.append(container[key])
        parents = nxt
    for node in parents:
        for container, key in _select(node, steps[-1], path):
            if value is None and isinstance(container, dict):
                container.pop(key, None)
            else:
                container[key] = copy.deepcopy(value)


# ---------------------------------------------------------------- expansion
def expand(study: Study, base_plan: dict, source: str = "study") -> list[Run]:
    """Every run of the study, in a fixed order (first factor slowest, seeds fastest), each plan
    validated. ``base_plan`` is the base plan's YAML as a mapping."""
    runs = []
    combos = itertools.product(*(f.levels for f in study.factors))
    for levels in combos:
        for seed in study.seeds:
            plan = copy.deepcopy(base_plan)
            where = ", ".join(f"{f.name}={lv.value!r}" for f, lv in zip(study.factors, levels, strict=True))
            for lv in levels:
                for path, value in lv.set.items():
                    try:
                        set_field(plan, path, value)
                    except ValueError as err:
                        raise InvalidPlan(f"{source}: level {where}: {err}") from None
            plan["seed"] = int(seed)
            run_id = "-".join([*(level_label(lv) for lv in levels), f"s{seed}"])
            plan["name"] = f"study-{study.name}-{run_id}"
            parse_plan(plan, f"{source}: level {where}, derived plan")  # raises InvalidPlan naming the field
            runs.append(Run(run_id=run_id, plan=plan, seed=int(seed), datasets=tuple(study.datasets),
                            levels={f.name: lv.value for f, lv in zip(study.factors, levels, strict=True)}))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise InvalidPlan(f"{source}: run ids collide: {ids}")
    return runs


def _write_if_changed(path: Path, text: str) -> bool:
    """Write atomically unless the file already holds exactly ``text`` (no new mtime, no rerun)."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return True


def aggregate_spec(study: Study, runs: list[Run]) -> dict:
    """The study in the format of ``ptycore aggregate --study`` (one entry per dataset × run)."""
    first, second = study.factors[0], (study.factors[1] if len(study.factors) > 1 else None)
    entries = []
    for run in runs:
        for dataset in run.datasets:
            entry = {"dataset": dataset, "plan": run.plan_name(study.name), "value": run.levels[first.name],
                     "columns": {"run": run.run_id, **run.levels, "seed": run.seed}}
            if second is not None:
                entry["series"] = f"{second.name}={run.levels[second.name]}"
            entries.append(entry)
    spec = {"name": study.title or study.name, "factor": first.name, "log_x": study.log_x, "runs": entries}
    if study.metrics:
        spec["metrics"] = list(study.metrics)
    return spec


def derive(study_path: str | Path, plan_path: str | Path | None = None) -> tuple[Study, list[Run], dict[str, str]]:
    """Load the study and expand it, writing nothing: the study, its runs and the text of each file
    it derives, by name: ``plans/<plan name>.yaml`` for each run and ``aggregate.yaml`` (for
    ``ptycore aggregate --study``). ``plan_path``: the base plan file (default: resolved from the
    study's ``plan`` relative to the working directory)."""
    study = load_study(study_path)
    base = Path(plan_path) if plan_path is not None else default_plan_path(study.plan)
    if not base.is_file():
        raise InvalidArgument(f"{study_path}: plan: {study.plan!r}: plan file {base} not found")
    base_plan = yaml.safe_load(base.read_text())
    if not isinstance(base_plan, dict):
        raise InvalidPlan(f"{base}: a plan is a mapping with 'stages'")
    runs = expand(study, base_plan, source=str(study_path))
    header = f"# derived from {study_path} (study {study.name}); written by ptycore.studies, do not edit\n"
    files = {f"plans/{run.plan_name(study.name)}.yaml": header + yaml.safe_dump(run.plan, sort_keys=False)
             for run in runs}
    files["aggregate.yaml"] = header + yaml.safe_dump(aggregate_spec(study, runs), sort_keys=False)
    return study, runs, files


def write_if_changed(path: str | Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless it already holds exactly ``text`` (then no new
    mtime, so nothing that depends on it reruns). Returns whether it wrote."""
    return _write_if_changed(Path(path), text)


def materialise(study_path: str | Path, out_dir: str | Path, plan_path: str | Path | None = None) -> tuple[Study,
                                                                                                         list[Run]]:
    """:func:`derive`, then write each derived file under ``out_dir`` only when its content
    changed, and remove derived plans no run has any more."""
    study, runs, files = derive(study_path, plan_path)
    out_dir = Path(out_dir)
    for name, text in files.items():
        _write_if_changed(out_dir / name, text)
    if (out_dir / "plans").is_dir():
        for stale in (out_dir / "plans").glob("*.yaml"):
            if f"plans/{stale.name}" not in files:
                stale.unlink()
    return study, runs


# ---------------------------------------------------------------- convergence time
def convergence_time(loss, s_per_iter=None, fraction: float = 0.9) -> tuple[int | None, float | None]:
    """(iterations, seconds) until the loss has made ``fraction`` of its total decrease.

    The first iteration ``k`` with ``loss[0] - loss[k] >= fraction * (loss[0] - loss[-1])``
    (non-finite values skipped); iterations = ``k + 1``, seconds = sum of ``s_per_iter[0..k]``.
    ``(None, None)`` if the loss did not decrease or has fewer than two finite values.
    """
    loss = np.asarray(loss, np.float64).reshape(-1)
    ok = np.nonzero(np.isfinite(loss))[0]
    if len(ok) < 2:
        return None, None
    first, last = loss[ok[0]], loss[ok[-1]]
    drop = first - last
    if not drop > 0:
        return None, None
    reached = ok[(first - loss[ok]) >= fraction * drop]
    k = int(reached[0])
    seconds = None
    if s_per_iter is not None:
        s = np.asarray(s_per_iter, np.float64).reshape(-1)
        if len(s) > k and np.isfinite(s[: k + 1]).all():
            seconds = float(s[: k + 1].sum())
    return k + 1, seconds
