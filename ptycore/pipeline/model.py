"""One workflow config, read: its datasets, plans (with their stage names) and studies, and what
each rule of the DAG needs from them (inputs, options, targets).

``Pipeline(config, basedir)`` reads the plan YAMLs and expands the studies in memory;
it writes nothing (the derived study plans are written by the ``study_plan`` rule).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptycore.errors import PtycoreError
from ptycore.pipeline import layout
from ptycore.pipeline.config import ConfigError, cli_options, resolve, split_patterns
from ptycore.pipeline.datasets import collect_datasets
from ptycore.pipeline.layout import NAME_RE, halves, split_half


def plan_name(plan: str) -> str:
    """A plan's name: the stem of a path to a plan YAML, else the name itself."""
    return Path(plan).stem if plan.endswith((".yaml", ".yml")) or "/" in plan else plan


def read_stages(path: str | Path) -> list[str]:
    """Stage names of a plan, in order (the plan itself is validated by 'ptycore reconstruct')."""
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan {path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"plan {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not stages or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ConfigError(f"plan {path}: needs 'stages: [{{name: ..., ...}}, ...]'")
    names = [str(s["name"]) for s in stages]
    bad = [n for n in names if not re.fullmatch(NAME_RE, n)]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"plan {path}: stage names must be unique and match {NAME_RE}: {names}")
    return names


def plan_devices(record, where: str) -> int:
    """A plan's top-level ``devices:`` (default 1): how many devices one run of it asks for."""
    n = record.get("devices", 1) if isinstance(record, dict) else 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"plan {where}: devices: must be an integer >= 1, got {n!r}")
    return n


def read_devices(path: str | Path) -> int:
    return plan_devices(yaml.safe_load(Path(path).read_text()), str(path))


@dataclass
class Plan:
    name: str
    path: str
    stages: list[str]
    study: str | None = None  # the study a derived plan belongs to
    text: str | None = None  # a derived plan's YAML (the study_plan rule writes it to path)
    devices: int = 1  # the plan's devices: (GPUs / processes of one reconstruct job)


@dataclass
class Study:
    name: str
    path: str
    pairs: list[tuple[str, str]]  # (dataset, plan) of every run
    spec_text: str  # the study's aggregate.yaml
    runs: list = field(default_factory=list)

    @property
    def spec(self) -> str:
        return layout.study_spec_path(self.name)

    @property
    def evals(self) -> list[str]:
        return [layout.path("evaluate", d, p) for d, p in self.pairs]


class Pipeline:
    def __init__(self, config: dict, basedir: str | Path | None = None, datasets: dict | None = None):
        """``config``: the validated workflow config (schema defaults filled in); ``basedir``: the
        workflow's directory (shipped plans and step configs are found there)."""
        self.config = config
        self.basedir = basedir
        self.datasets = collect_datasets(config) if datasets is None else datasets
        self.top_plans = [plan_name(p) for p in config.get("plans") or ["default"]]
        named = list(config.get("plans") or ["default"])
        named += [p for d in self.datasets.values() for p in d.get("plans") or []]
        self.plans: dict[str, Plan] = {}
        for p in dict.fromkeys(named):
            self._add_plan(p)
        self.studies: dict[str, Study] = {}
        for p in config.get("studies") or []:
            self._add_study(p)
        self._check_frc()

    # ------------------------------------------------------------ plans and studies
    def resolve(self, path) -> str:
        return resolve(path, self.basedir)

    def plan_path(self, plan: str) -> str:
        """A plan name (config/plans/NAME.yaml) or a path to a plan YAML."""
        if plan.endswith((".yaml", ".yml")) or "/" in plan:
            return self.resolve(plan)
        return self.resolve(f"config/plans/{plan}.yaml")

    def _add_plan(self, p: str) -> None:
        name = plan_name(p)
        if not re.fullmatch(NAME_RE, name):
            raise ConfigError(f"plans: {p!r}: the plan name must match {NAME_RE}")
        path = self.plan_path(p)
        if name in self.plans:
            if self.plans[name].path != path:
                raise ConfigError(f"plans: two plans named {name!r}")
            return
        self.plans[name] = Plan(name, path, read_stages(path), devices=read_devices(path))

    def _add_study(self, p: str) -> None:
        from ptycore.studies import derive, load_study

        path = self.resolve(p)
        try:
            loaded = load_study(path)
            name = loaded.name
            if name in self.studies:
                raise ConfigError(f"studies: two studies named {name!r}")
            if name == Path(layout.OVERVIEW).name:
                raise ConfigError(f"studies: {p}: the name {name!r} is taken by the figures overview")
            study, runs, files = derive(path, self.plan_path(loaded.plan))
        except ConfigError:
            raise
        except PtycoreError as err:
            raise ConfigError(str(err)) from None
        unknown = [d for d in study.datasets if d not in self.datasets]
        if unknown:
            raise ConfigError(f"study {p}: datasets: unknown {unknown} (known: {', '.join(self.datasets) or 'none'})")
        pairs = []
        for run in runs:
            plan = run.plan_name(name)
            stages = [str(s["name"]) for s in run.plan["stages"]]
            self.plans[plan] = Plan(plan, layout.study_plan_path(name, plan), stages, study=name,
                                    text=files[f"plans/{plan}.yaml"], devices=plan_devices(run.plan, plan))
            pairs += [(d, plan) for d in run.datasets]
        self.studies[name] = Study(name, path, pairs, files["aggregate.yaml"], runs)

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise ConfigError(f"unknown plan {name!r} (known: {', '.join(self.plans)})") from None

    def study(self, name: str) -> Study:
        try:
            return self.studies[name]
        except KeyError:
            raise ConfigError(f"unknown study {name!r} (known: {', '.join(self.studies) or 'none'})") from None

    # ------------------------------------------------------------ datasets
    def dataset(self, name: str) -> dict:
        """The config entry of a dataset (of its whole dataset for a half, NAME~halfK)."""
        try:
            return self.datasets[split_half(name)[0]]
        except KeyError:
            raise ConfigError(f"unknown dataset {name!r} (known: {', '.join(self.datasets) or 'none'})") from None

    def is_simulated(self, name: str) -> bool:
        return "simulate" in self.dataset(name)

    def dataset_plans(self, name: str) -> list[str]:
        """The plans a dataset runs: its own ``plans:`` list, else the config's top-level ``plans``."""
        wanted = self.dataset(name).get("plans")
        return [plan_name(p) for p in wanted] if wanted else list(self.top_plans)

    def devices(self, dataset: str, plan: str) -> int:
        """Devices one reconstruct job of dataset × plan runs on: the dataset's ``devices:``, else
        the plan's, else 1 (a half dataset, NAME~halfK, as its whole dataset)."""
        own = self.dataset(dataset).get("devices")
        return int(own) if own else self.plan(plan).devices

    def frc_wanted(self, dataset: str, plan: str) -> bool:
        """Whether dataset × plan also reconstructs the two half datasets and evaluates their FRC:
        the dataset's own frc: true/false, else frc.enabled; for the plans in frc.plans (default:
        the dataset's plans, not the studies')."""
        frc = self.config.get("frc") or {}
        if not self.dataset(dataset).get("frc", frc.get("enabled", False)):
            return False
        wanted = frc.get("plans")
        return plan in ([plan_name(p) for p in wanted] if wanted is not None else self.dataset_plans(dataset))

    def _check_frc(self) -> None:
        unknown = [p for p in (self.config.get("frc") or {}).get("plans") or [] if plan_name(p) not in self.plans]
        if unknown:
            raise ConfigError(f"frc.plans: unknown plans {unknown} (known: {', '.join(self.plans)})")

    # ------------------------------------------------------------ jobs and targets
    def jobs(self, dataset: str, plan: str) -> list[layout.Job]:
        """Every job of one dataset × plan, in pipeline order (from the one step table)."""
        return layout.jobs(dataset, plan, self.plan(plan).stages, simulated=self.is_simulated(dataset),
                           frc=self.frc_wanted(dataset, plan))

    def pairs(self, plans: list[str] | None = None) -> list[tuple[str, str]]:
        """Every dataset × plan the config runs (not the studies'), optionally only for ``plans``."""
        wanted = None if plans is None else {plan_name(p) for p in plans}
        return [(d, p) for d in self.datasets for p in self.dataset_plans(d) if wanted is None or p in wanted]

    def dataset_stores(self, dataset: str) -> list[str]:
        """Every store one dataset makes, through each of its plans. Targets list them all, so that
        deleting any one store reruns that step and everything after it (snakemake does not redo a
        missing intermediate output unless a target asks for it)."""
        return list(dict.fromkeys(job.output for plan in self.dataset_plans(dataset)
                                  for job in self.jobs(dataset, plan)))

    def all_stores(self) -> list[str]:
        return list(dict.fromkeys(s for d in self.datasets for s in self.dataset_stores(d)))

    def evals(self, plans: list[str] | None = None) -> list[str]:
        return [layout.path("evaluate", d, p) for d, p in self.pairs(plans)]

    def figures_plans(self) -> list[str] | None:
        return (self.config.get("figures") or {}).get("plans")

    def figure_targets(self) -> list[str]:
        """What `figures` builds: the overview (unless figures.plans is []) and one directory per study."""
        targets = [] if self.figures_plans() == [] else [layout.OVERVIEW]
        return targets + [f"{layout.FIGURES}/{name}" for name in self.studies]

    def aggregates(self) -> dict[str, dict]:
        """Each aggregate the workflow builds, by name (``aggregate``, ``figures``, ``studies/NAME``):
        its output, the (dataset, plan) pairs it gathers, its title and study spec."""
        out = {"aggregate": {"out": layout.AGGREGATE, "pairs": self.pairs(), "title": "ptycore results",
                             "study": None}}
        if layout.OVERVIEW in self.figure_targets():
            out["figures"] = {"out": layout.OVERVIEW, "pairs": self.pairs(self.figures_plans()),
                              "title": "ptycore figures", "study": None}
        for name, study in self.studies.items():
            out[f"studies/{name}"] = {"out": f"{layout.FIGURES}/{name}", "pairs": study.pairs,
                                      "title": f"study {name}", "study": study}
        return out

    # ------------------------------------------------------------ hyperparameter searches
    def tunes(self) -> dict[str, dict]:
        """``{name: {space, plan, data, init}}`` for each search space of config ``tune``: the
        inputs of its ``ptycore tune`` job (the prepared stores of its workflow datasets)."""
        from ptycore.tune.space import load_space

        tunes = {}
        for p in self.config.get("tune") or []:
            try:
                space = load_space(self.resolve(p))
            except PtycoreError as err:
                raise ConfigError(f"tune: {err}") from None
            unknown = [d for d in space.datasets if d not in self.datasets]
            if space.name in tunes:
                raise ConfigError(f"tune: {p}: two spaces named {space.name!r}")
            if not space.datasets or unknown:
                why = (f"datasets: unknown {unknown} (known: {', '.join(self.datasets)})" if unknown
                       else "needs 'datasets' (workflow names)")
                raise ConfigError(f"tune: {p}: {why}")
            init = self.resolve(space.init) if space.init else self.step_config("init", space.datasets[0]).get("config")
            tunes[space.name] = {
                "space": self.resolve(p),
                "plan": self.plan_path(space.plan),
                "data": [layout.path("preprocess", d) for d in space.datasets],
                "init": {"init": init} if init else {},
            }
        return tunes

    # ------------------------------------------------------------ rule inputs and options
    def step_config(self, step: str, dataset: str) -> dict:
        """The dataset's config YAML for a step ('preprocess', 'init'), as {'config': path}, or {}."""
        path = self.dataset(dataset).get(step) or self.config.get(step)
        return {"config": self.resolve(path)} if path else {}

    def simulate_options(self, dataset: str) -> str:
        return cli_options(self.dataset(dataset)["simulate"], f"datasets: {dataset}: simulate")

    def ingest_inputs(self, dataset: str) -> dict:
        """Ingest's input files: the simulated directory, or the raw patterns and metadata files.
        A raw file that does not exist is left out, so that the ingest job still runs (and fails
        with one line naming the file) instead of stopping the whole DAG before it starts."""
        if self.is_simulated(dataset):
            return {"simulated": layout.path("simulate", dataset)}
        files = self._raw_files(dataset)
        return {k: v for k, v in files.items() if Path(v).exists()}

    def _raw_files(self, dataset: str) -> dict:
        ds = self.dataset(dataset)
        return {"patterns": self.resolve(split_patterns(ds["patterns"])[0]), "metadata": self.resolve(ds["metadata"])}

    def ingest_patterns(self, dataset: str) -> str:
        """--patterns of ingest: FILE or FILE:inner/path."""
        if self.is_simulated(dataset):
            return f"{layout.path('simulate', dataset)}/patterns.h5:patterns"
        _, inner = split_patterns(self.dataset(dataset)["patterns"])
        return self._raw_files(dataset)["patterns"] + (f":{inner}" if inner else "")

    def ingest_metadata(self, dataset: str) -> str:
        if self.is_simulated(dataset):
            return f"{layout.path('simulate', dataset)}/meta.yaml"
        return self._raw_files(dataset)["metadata"]

    def preprocess_data(self, dataset: str) -> str:
        """data.zarr of the dataset (a half dataset is cut from its whole dataset's)."""
        return layout.path("ingest", split_half(dataset)[0])

    def reconstruct_inputs(self, dataset: str, plan: str, stage: str) -> dict:
        """Stage K starts from stage K-1's store (the first from init.zarr)."""
        stages = self.plan(plan).stages
        if stage not in stages:
            raise ConfigError(f"plan {plan!r} has no stage {stage!r} (stages: {', '.join(stages)})")
        k = stages.index(stage)
        previous = layout.path("init", dataset) if k == 0 else layout.path("reconstruct", dataset, plan, stages[k - 1])
        return {"plan": self.plan(plan).path, "data": layout.path("preprocess", dataset), "init": previous}

    def evaluate_inputs(self, dataset: str, plan: str) -> dict:
        final = self.plan(plan).stages[-1]
        inputs = {"result": layout.path("reconstruct", dataset, plan, final), "init": layout.path("init", dataset)}
        if self.is_simulated(dataset):
            inputs["simulated"] = layout.path("simulate", dataset)
        if self.frc_wanted(dataset, plan):
            inputs["half1"], inputs["half2"] = (layout.path("reconstruct", h, plan, final) for h in halves(dataset))
        return inputs


def half_option(dataset: str) -> str:
    _, k = split_half(dataset)
    return f"--half {k}" if k else ""


def config_option(inputs: dict) -> str:
    return f"--config {shlex.quote(inputs['config'])}" if "config" in inputs else ""
