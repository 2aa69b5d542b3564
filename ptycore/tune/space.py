"""The search space of a study (``config/tune/NAME.yaml``), validated before any compute.

Only pydantic and YAML here (no Optuna, no JAX): the Snakefile reads spaces at parse time.
See ``ptycore.tune`` for the format.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptycore.data.initialize import InitConfig
from ptycore.errors import InvalidArgument, InvalidPlan
from ptycore.plan import Plan, format_validation_error, parse_plan
from ptycore.studies import NAME_RE, default_plan_path, set_field

#: init parameters that are not InitConfig fields: name -> what it sets
DERIVED_INIT = {"scan_rotation_deg": "affine: a rotation of the nominal positions (degrees, about the scan origin)"}
DATA_LOSSES = ("single", "poisson", "anscombe")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameter(_Strict):
    """A float or integer range (``low``, ``high``, optional ``log`` or ``step``), or ``choices``."""

    low: float | None = Field(default=None, allow_inf_nan=False)
    high: float | None = Field(default=None, allow_inf_nan=False)
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    type: Literal["float", "int"] | None = Field(default=None, description="default: int if low and high are")
    choices: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _remember_ints(cls, data):
        if isinstance(data, dict) and data.get("type") is None and "choices" not in data:
            lo, hi = data.get("low"), data.get("high")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
                data = {**data, "type": "int"}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.choices is not None:
            if any(v is not None for v in (self.low, self.high, self.step)) or self.log:
                raise ValueError("give choices, or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.high > self.low:
            raise ValueError(f"high ({self.high:g}) must be > low ({self.low:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        if self.type is None:
            self.type = "float"
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high) or (self.step or 1) != int(self.step or 1):
                raise ValueError("an int range needs whole numbers for low, high and step")
        return self

    def bounds(self) -> list[Any]:
        """The values to check against the plan: each choice, or both ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def suggest(self, trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


class Sampler(_Strict):
    kind: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(default=8, ge=0, description="random trials before TPE models the objective")
    constant_liar: bool = Field(default=True, description="parallel trials: running trials count as bad ones")
    multivariate: bool = False


class Pruner(_Strict):
    kind: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(default=4, ge=0, description="median: trials that are never pruned")
    n_warmup_steps: int = Field(default=0, ge=0, description="median: iterations before pruning starts")
    reduction_factor: int = Field(default=3, ge=2, description="hyperband")
    min_resource: int = Field(default=1, ge=1, description="hyperband: iterations of the smallest bracket")


class Slurm(_Strict):
    """A dask-jobqueue SLURMCluster: one job = one worker = one GPU."""

    partition: str | None = None
    account: str | None = None
    walltime: str = Field(default="02:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
    cores: int = Field(default=4, ge=1)
    memory: str = "16GB"
    gpus: int = Field(default=1, ge=0, description="per job (--gres=gpu:N); 0: none")
    minimum_jobs: int = Field(default=0, ge=0)
    maximum_jobs: int = Field(default=4, ge=1)
    lifetime_margin_minutes: float = Field(
        default=10, ge=0, description="workers retire this long before the walltime (plus a stagger of a third)")
    job_extra_directives: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. --qos=...")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines before the worker starts")
    python: str | None = Field(default=None, description="worker Python (default: this one)")

    @model_validator(mode="after")
    def _jobs(self):
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError("minimum_jobs must be <= maximum_jobs")
        return self

    def walltime_minutes(self) -> float:
        days, _, rest = self.walltime.rpartition("-")
        parts = [int(p) for p in rest.split(":")] + [0]
        return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + parts[2] / 60


class Cluster(_Strict):
    kind: Literal["local", "slurm"] = "local"
    workers: int = Field(default=2, ge=1, description="local: worker processes (trials at once)")
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str = Field(default="auto", description="local: per worker ('auto', '4GB', ...)")
    slurm: Slurm = Field(default_factory=Slurm)


class DataEntry(_Strict):
    prepared: str = Field(description="prepared.zarr from 'ptycore preprocess'")
    init: str | None = Field(default=None, description="init config YAML for this dataset (default: the space's)")


class Space(_Strict):
    name: str | None = Field(default=None, pattern=f"^{NAME_RE}$")
    title: str | None = None
    plan: str = Field(description="base plan: a name in config/plans/ or a path to a plan YAML")
    data: list[DataEntry] = Field(default_factory=list, description="prepared stores (CLI; --data replaces them)")
    datasets: list[str] = Field(default_factory=list, description="workflow dataset names (results/NAME/...)")
    init: str | None = Field(default=None, description="base init config YAML (default: the verb's defaults)")
    trials: int = Field(default=20, ge=1, description="trials that finish (complete, pruned or failed)")
    objective: Literal["validation", "data_fit"] = "validation"
    report_every: int = Field(default=5, ge=1, description="iterations between reports to the pruner")
    seed: int = Field(default=0, ge=0, description="sampler seed (trial k's sampler: seed + k)")
    retries: int = Field(default=1, ge=0, description="reruns of a trial whose worker was lost")
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    cluster: Cluster = Field(default_factory=Cluster)
    storage: str | None = Field(default=None, description="RDB URL (postgresql://..., sqlite:///...); "
                                "default: the journal file <out>/study.journal")
    heartbeat_seconds: int = Field(default=60, ge=1, description="RDB storage: trial heartbeat")
    fixed: dict[str, Any] = Field(default_factory=dict, description="plan overrides for every trial")
    parameters: dict[str, Parameter] = Field(min_length=1)
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="points to try first (e.g. the base "
                                          "plan's values as trial 0): parameter -> value, may lie outside the range")

    @model_validator(mode="after")
    def _check(self):
        for i, point in enumerate(self.enqueue):
            unknown = [k for k in point if k not in self.parameters]
            if unknown:
                raise ValueError(f"enqueue[{i}]: {unknown[0]!r} is not one of the parameters")
        for key in self.parameters:
            if key in self.fixed:
                raise ValueError(f"parameters: {key!r} is also in fixed")
            if key.startswith("init."):
                field = key.removeprefix("init.")
                if field not in InitConfig.model_fields and field not in DERIVED_INIT:
                    known = ", ".join([*InitConfig.model_fields, *DERIVED_INIT])
                    raise ValueError(f"parameters: {key!r}: no init field {field!r} (known: {known})")
        if self.datasets and self.data:
            raise ValueError("give data (prepared stores) or datasets (workflow names), not both")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets must be unique: {self.datasets}")
        return self

    def plan_parameters(self) -> dict[str, Parameter]:
        return {k: v for k, v in self.parameters.items() if not k.startswith("init.")}

    def init_parameters(self) -> dict[str, Parameter]:
        return {k.removeprefix("init."): v for k, v in self.parameters.items() if k.startswith("init.")}

    def search_key(self) -> dict:
        """What must not change for a study to be resumed: the space without trials/cluster/data."""
        return self.model_dump(mode="json", exclude={"trials", "cluster", "data", "datasets", "title", "retries"})


def load_space(path: str | Path) -> Space:
    """Read and validate a space YAML (the fields only; :func:`check_space` checks it against the plan)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: search space file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise InvalidArgument(f"{path}: a search space is a mapping with 'plan' and 'parameters'")
    try:
        space = Space.model_validate(record)
    except ValidationError as err:  # a model-level check has no field: no empty 'path: : ' then
        raise InvalidArgument(format_validation_error(err, str(path)).replace(f"{path}: : ", f"{path}: ")) from None
    if space.name is None:
        if not re.fullmatch(NAME_RE, path.stem):
            raise InvalidArgument(f"{path}: name: the file name {path.stem!r} must match {NAME_RE} (or give name)")
        space = space.model_copy(update={"name": path.stem})
    return space


def read_yaml_mapping(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InvalidArgument(f"{what}: {path} not found")
    try:
        record = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise InvalidArgument(f"{path}: {what} must be a mapping")
    return record


def rotation_affine(degrees: float, base=None) -> list[list[float]]:
    """The 2 × 2 (y, x) matrix that rotates positions by ``degrees``, after ``base`` (an affine)."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    if base is not None:
        rot = rot @ np.asarray(base, np.float64)
    return rot.tolist()


def trial_plan(space: Space, base_plan: dict, values: dict[str, Any], name: str) -> dict:
    """The base plan with ``fixed`` and the plan parameters' ``values`` applied (not yet validated)."""
    plan = copy.deepcopy(base_plan)
    for path, value in {**space.fixed, **values}.items():
        set_field(plan, path, value)
    plan["name"] = name
    return plan


def trial_init(base_init: dict, values: dict[str, Any]) -> dict:
    """The base init config with the init parameters' ``values`` (names without 'init.')."""
    config = copy.deepcopy(base_init)
    for key, value in values.items():
        if key == "scan_rotation_deg":
            config["affine"] = rotation_affine(float(value), base_init.get("affine"))
        else:
            config[key] = value
    return config


def objective_term(plan: Plan, objective: str) -> str:
    """The term of the last stage's history that is the objective: 'validation' or its data loss."""
    last = plan.stages[-1]
    if objective == "validation":
        return "validation"
    return next(k for k in DATA_LOSSES if k in last.losses)


def check_space(space: Space, source: str, base_plan: dict, base_init: dict) -> None:
    """Every parameter's ends (or choices) applied to the base plan / init config give a valid
    plan / init config, and the objective is reported by every trial. Raises one line naming the
    parameter."""
    for key, param in space.plan_parameters().items():
        for value in param.bounds():
            where = f"{source}: parameters: {key!r} = {value!r}"
            try:
                plan = trial_plan(space, base_plan, {key: value}, "check")
            except ValueError as err:
                raise InvalidPlan(f"{where}: {err}") from None
            parse_plan(plan, where)
    try:
        plan = parse_plan(trial_plan(space, base_plan, {}, "check"), f"{source}: base plan with fixed")
    except ValueError as err:
        raise InvalidPlan(f"{source}: fixed: {err}") from None
    if space.objective == "validation" and plan.stages[-1].validation_fraction <= 0:
        raise InvalidPlan(f"{source}: objective 'validation' needs held-out positions: set validation_fraction > 0 "
                          f"in the last stage ({plan.stages[-1].name!r}), e.g. fixed: "
                          f"{{\"stages[{plan.stages[-1].name}].validation_fraction\": 0.1}}")
    for key, param in space.plan_parameters().items():
        if re.search(r"validation_fraction$", key) and space.objective == "validation" and min(
                float(v) for v in param.bounds()) <= 0:
            raise InvalidPlan(f"{source}: parameters: {key!r}: the validation objective needs it > 0")
    for i, point in enumerate(space.enqueue):
        where = f"{source}: enqueue[{i}]"
        plan_values = {k: v for k, v in point.items() if not k.startswith("init.")}
        try:
            parse_plan(trial_plan(space, base_plan, plan_values, "check"), where)
            InitConfig.model_validate(trial_init(base_init, {k.removeprefix("init."): v for k, v in point.items()
                                                             if k.startswith("init.")}))
        except ValueError as err:  # set_field's, and pydantic's (a ValueError too)
            msg = format_validation_error(err, where) if isinstance(err, ValidationError) else f"{where}: {err}"
            raise InvalidPlan(msg) from None
    for key, param in space.init_parameters().items():
        for value in param.bounds():
            try:
                InitConfig.model_validate(trial_init(base_init, {key: value}))
            except ValidationError as err:
                raise InvalidArgument(format_validation_error(err, f"{source}: parameters: 'init.{key}' = "
                                                                   f"{value!r}: init config")) from None


def base_plan_path(space: Space, root: str | Path = ".") -> Path:
    return default_plan_path(space.plan, root)
