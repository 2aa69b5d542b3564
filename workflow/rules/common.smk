# Shared helpers: datasets (config + inbox), plans and their stages, resources, paths.
# No rules here; the Snakefile includes this first.

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"

NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# The two half datasets of a dataset for the FRC (config frc): NAME~half1 and NAME~half2 ('~' is
# never in a dataset's own name); their stores sit beside the dataset's as results/NAME~halfK/.
HALF_SEP = "~half"
DATASET_RE = rf"{NAME_RE}(?:{HALF_SEP}[12])?"
PATTERN_SUFFIXES = (".h5", ".hdf5", ".npy", ".mat", ".raw", ".zarr")
METADATA_SUFFIXES = (".yaml", ".yml")


def resolve(path):
    """A path from the config: absolute, else relative to the working directory if it exists
    there, else relative to the workflow's own directory (so the shipped plans and step configs
    are found when running with --directory elsewhere)."""
    p = Path(os.path.expanduser(os.path.expandvars(str(path))))
    if p.is_absolute() or p.exists():
        return str(p)
    shipped = Path(workflow.basedir) / p
    return str(shipped) if shipped.exists() else str(p)


def split_patterns(spec):
    """'scan.h5:entry/data' -> ('scan.h5', 'entry/data'); 'scan.npy' -> ('scan.npy', None)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and Path(head).suffix.lower() in PATTERN_SUFFIXES:
        return head, tail
    return str(spec), None


# ---------------------------------------------------------------- config
def readable_config_error(err):
    """One line naming the config key and what is wrong with it (jsonschema's own is pages long)."""
    import jsonschema

    top = err
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    path = list(top.absolute_path)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"
    if top.validator == "oneOf" and len(path) == 2 and path[0] == "datasets":
        return f"{where}: a dataset needs either 'simulate:' or both 'patterns:' and 'metadata:'"
    inner = list(err.absolute_path)
    if inner != path:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner).lstrip(".") or where
    message = err.message if len(err.message) < 300 else f"{err.message[:300]} ..."
    return f"{where}: {message}"


# ---------------------------------------------------------------- datasets
def newest_change(*paths):
    """Latest modification time of the paths and, for directories (.zarr), everything inside."""
    times = []
    for p in paths:
        times.append(p.stat().st_mtime)
        if p.is_dir():
            times += [q.stat().st_mtime for q in p.rglob("*")]
    return max(times)


def inbox_datasets(pattern, hdf5_dataset=None, settle_minutes=0):
    """Datasets found by the inbox glob: a directory with one patterns file and one metadata YAML,
    or a patterns file with <stem>.yaml / <stem>.yml beside it. Anything else is skipped, with a
    note, and so is a dataset whose files changed in the last settle_minutes (still arriving)."""
    found = {}
    now = time.time()
    for match in sorted(glob.glob(os.path.expanduser(pattern))):
        m = Path(match)
        if m.is_dir() and m.suffix.lower() != ".zarr":
            entries = sorted(m.iterdir())
            patterns = [e for e in entries if e.suffix.lower() in PATTERN_SUFFIXES]
            metas = [e for e in entries if e.suffix.lower() in METADATA_SUFFIXES]
            if len(patterns) != 1 or len(metas) != 1:
                print(
                    f"inbox: skipping {m}: want one patterns file ({', '.join(PATTERN_SUFFIXES)}) and one "
                    f"metadata YAML, found {len(patterns)} and {len(metas)}",
                    file=sys.stderr,
                )
                continue
            name, patterns, meta = m.name, patterns[0], metas[0]
        elif m.suffix.lower() in PATTERN_SUFFIXES:
            metas = [m.with_suffix(s) for s in METADATA_SUFFIXES if m.with_suffix(s).is_file()]
            if not metas:
                print(f"inbox: skipping {m}: no {m.stem}.yaml beside it", file=sys.stderr)
                continue
            name, patterns, meta = m.stem, m, metas[0]
        else:
            continue
        age_minutes = (now - newest_change(patterns, meta)) / 60
        if age_minutes < settle_minutes:
            print(
                f"inbox: leaving {m} for the next run: changed {age_minutes:.0f} min ago "
                f"(inbox_settle_minutes: {settle_minutes})",
                file=sys.stderr,
            )
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-") or "dataset"
        if name in found:
            print(
                f"inbox: skipping {m}: dataset name {name!r} already taken by {found[name]['patterns']}",
                file=sys.stderr,
            )
            continue
        spec = f"{patterns.resolve()}:{hdf5_dataset}" if hdf5_dataset else str(patterns.resolve())
        found[name] = {"name": name, "patterns": spec, "metadata": str(meta.resolve()), "source": "inbox"}
    return found


def collect_datasets(cfg):
    datasets = {}
    for ds in cfg["datasets"]:
        if ds["name"] in datasets:
            raise ValueError(f"config: datasets: name {ds['name']!r} appears twice")
        datasets[ds["name"]] = dict(ds, source="config")
    if cfg.get("inbox"):
        inbox = inbox_datasets(cfg["inbox"], cfg.get("inbox_hdf5_dataset"), cfg["inbox_settle_minutes"])
        for name, ds in inbox.items():
            if name in datasets:
                print(f"inbox: skipping {ds['patterns']}: dataset {name!r} is also in config", file=sys.stderr)
                continue
            datasets[name] = ds
    return datasets


# ---------------------------------------------------------------- plans
def plan_path(plan):
    """A plan name (config/plans/NAME.yaml) or a path to a plan YAML."""
    if plan.endswith((".yaml", ".yml")) or "/" in plan:
        return resolve(plan)
    return resolve(f"config/plans/{plan}.yaml")


def plan_name(plan):
    return Path(plan).stem if plan.endswith((".yaml", ".yml")) or "/" in plan else plan


def read_stages(path):
    """Stage names of a plan, in order (the plan itself is validated by 'ptycore reconstruct')."""
    try:
        plan = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"plan {path}: file not found") from None
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not stages or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ValueError(f"plan {path}: needs 'stages: [{{name: ..., ...}}, ...]'")
    names = [str(s["name"]) for s in stages]
    bad = [n for n in names if not re.fullmatch(NAME_RE, n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"plan {path}: stage names must be unique and match {NAME_RE}: {names}")
    return names


def collect_plans(names):
    plans = {}
    for p in names:
        name = plan_name(p)
        if not re.fullmatch(NAME_RE, name):
            raise ValueError(f"config: plans: {p!r}: the plan name must match {NAME_RE}")
        if name in plans and plans[name]["path"] != plan_path(p):
            raise ValueError(f"config: plans: two plans named {name!r}")
        path = plan_path(p)
        plans[name] = {"path": path, "stages": read_stages(path)}
    return plans


# ---------------------------------------------------------------- studies
FIGURES = f"{RESULTS}/figures"
OVERVIEW = f"{FIGURES}/overview"


def study_dir(name):
    return f"{RESULTS}/studies/{name}"


def collect_studies(paths, plans, datasets):
    """Load each study (ptycore.studies), write its derived plans under results/studies/NAME/plans/
    (only when changed, so unchanged plans rerun nothing) and register them in `plans`, marked as
    study plans (never run by `all`). Returns {name: {path, runs, evals, spec}}."""
    from ptycore.errors import PtycoreError
    from ptycore.studies import load_study, materialise

    studies = {}
    for p in paths:
        path = resolve(p)
        try:
            study = load_study(path)
            name = study.name
            if name in studies:
                raise ValueError(f"studies: two studies named {name!r}")
            if name == Path(OVERVIEW).name:
                raise ValueError(f"studies: {p}: the name {name!r} is taken by the figures overview")
            study, runs = materialise(path, study_dir(name), plan_path(study.plan))
        except PtycoreError as err:
            raise ValueError(str(err)) from None
        unknown = [d for d in study.datasets if d not in datasets]
        if unknown:
            raise ValueError(f"study {p}: datasets: unknown {unknown} (known: {', '.join(datasets) or 'none'})")
        pairs = []
        for run in runs:
            plan = run.plan_name(name)
            plans[plan] = {
                "path": f"{study_dir(name)}/plans/{plan}.yaml",
                "stages": [str(s["name"]) for s in run.plan["stages"]],
                "study": name,
            }
            pairs += [(d, plan) for d in run.datasets]
        studies[name] = {
            "path": path,
            "runs": runs,
            "pairs": pairs,
            "evals": [eval_dir(d, p) for d, p in pairs],
            "spec": f"{study_dir(name)}/aggregate.yaml",
        }
    return studies


def study_entry(name):
    try:
        return STUDIES[name]
    except KeyError:
        raise WorkflowError(f"unknown study {name!r} (known: {', '.join(STUDIES) or 'none'})") from None


def figure_targets():
    """What `figures` builds: the overview (unless figures.plans is []) and one directory per study."""
    targets = [] if config["figures"].get("plans") == [] else [OVERVIEW]
    return targets + [f"{FIGURES}/{name}" for name in STUDIES]


# ---------------------------------------------------------------- resources
BUILTIN_RESOURCES = {
    "default": {"cpus": 1, "mem_mb": 2000, "runtime": 30},
    "simulate": {"cpus": 2, "mem_mb": 4000, "runtime": 60},
    "ingest": {"cpus": 2},
    "init": {"mem_mb": 4000},
    "reconstruct": {"cpus": 4, "mem_mb": 16000, "runtime": 240, "gpu": True},
    "evaluate": {"mem_mb": 4000},
    "study": {"mem_mb": 4000},
}


def rule_settings(rule):
    """Merged settings of one rule: built-in default < config default < built-in rule < config rule."""
    merged = {}
    for layer in (
        BUILTIN_RESOURCES["default"],
        config["resources"].get("default", {}),
        BUILTIN_RESOURCES.get(rule, {}),
        config["resources"].get(rule, {}),
    ):
        merged.update(layer)
    return merged


def _setting(key, env):
    value = config["slurm"].get(key)
    return value if value else os.environ.get(env) or None


def resources_for(rule):
    """Snakemake resources of a rule: mem_mb, runtime (min), and for Slurm slurm_account,
    slurm_partition (GPU rules: the GPU partition) and gres/slurm_extra. Keys with no value are
    left out, so a profile's default-resources can fill them in."""
    s = rule_settings(rule)
    res = {"mem_mb": s["mem_mb"], "runtime": s["runtime"]}
    account = _setting("account", "PTYCORE_SLURM_ACCOUNT")
    if account:
        res["slurm_account"] = account
    if s.get("gpu"):
        res["gres"] = s.get("gres", "gpu:1")
        partition = s.get("partition") or _setting("gpu_partition", "PTYCORE_SLURM_GPU_PARTITION") or "gpu"
    else:
        partition = s.get("partition") or _setting("partition", "PTYCORE_SLURM_PARTITION")
    if partition:
        res["slurm_partition"] = partition
    if s.get("slurm_extra"):
        res["slurm_extra"] = s["slurm_extra"]
    return res


def threads_for(rule):
    return rule_settings(rule)["cpus"]


# ---------------------------------------------------------------- paths
def sim_dir(dataset):
    return f"{RESULTS}/{dataset}/simulated"


def stage_store(dataset, plan, stage):
    return f"{RESULTS}/{dataset}/{plan}/stages/{stage}.zarr"


def final_store(dataset, plan):
    return stage_store(dataset, plan, PLANS[plan]["stages"][-1])


def eval_dir(dataset, plan):
    return f"{RESULTS}/{dataset}/{plan}/eval"


def dataset_plans(dataset):
    wanted = DATASETS[dataset].get("plans")
    return [plan_name(p) for p in wanted] if wanted else [p for p in PLANS if "study" not in PLANS[p]]


def dataset_stores(dataset):
    """Every store one dataset makes, through each of its plans. Targets list them all, so that
    deleting any one store reruns that step and everything after it (snakemake does not redo a
    missing intermediate output unless a target asks for it)."""
    stores = [sim_dir(dataset)] if is_simulated(dataset) else []
    stores += [f"{RESULTS}/{dataset}/{name}" for name in ("data.zarr", "prepared.zarr", "init.zarr")]
    for plan in dataset_plans(dataset):
        stores += [stage_store(dataset, plan, stage) for stage in PLANS[plan]["stages"]]
        if frc_wanted(dataset, plan):
            for half in halves(dataset):
                stores += [f"{RESULTS}/{half}/{name}" for name in ("prepared.zarr", "init.zarr")]
                stores += [stage_store(half, plan, stage) for stage in PLANS[plan]["stages"]]
        stores.append(eval_dir(dataset, plan))
    return list(dict.fromkeys(stores))


def all_evals(plans=None):
    return [eval_dir(d, p) for d in DATASETS for p in dataset_plans(d) if plans is None or p in plans]


def cli_options(options):
    """{'seed': 1, 'scan_shape': [8, 8], 'no_noise': True} -> '--no-noise --scan-shape 8 8 --seed 1'.
    Sorted by key, so that reordering the YAML does not change the command (and rerun the job)."""
    words = []
    for key, value in sorted(options.items()):
        flag = f"--{str(key).replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            raise ValueError(f"simulate option {key!r}: nested mappings are not command-line options")
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def dataset_entry(dataset):
    """The config entry of a dataset (of its whole dataset for a half, NAME~halfK)."""
    try:
        return DATASETS[split_half(dataset)[0]]
    except KeyError:
        raise WorkflowError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS) or 'none'})") from None


def is_simulated(dataset):
    return "simulate" in dataset_entry(dataset)


# ---------------------------------------------------------------- FRC of two half datasets
def split_half(dataset):
    """'tiny~half2' -> ('tiny', 2); 'tiny' -> ('tiny', None)."""
    base, sep, k = dataset.rpartition(HALF_SEP)
    return (base, int(k)) if sep and k in ("1", "2") else (dataset, None)


def halves(dataset):
    return [f"{dataset}{HALF_SEP}1", f"{dataset}{HALF_SEP}2"]


def check_frc(cfg, plans):
    """Config frc.plans must name known plans."""
    unknown = [p for p in cfg["frc"].get("plans") or [] if plan_name(p) not in plans]
    if unknown:
        raise ValueError(f"frc.plans: unknown plans {unknown} (known: {', '.join(plans)})")


def frc_wanted(dataset, plan):
    """Whether dataset × plan also reconstructs the two half datasets and evaluates their FRC:
    the dataset's own frc: true/false, else frc.enabled; for the plans in frc.plans (default:
    the dataset's plans, not the studies')."""
    if not dataset_entry(dataset).get("frc", config["frc"].get("enabled", False)):
        return False
    wanted = config["frc"].get("plans")
    return plan in ([plan_name(p) for p in wanted] if wanted is not None else dataset_plans(dataset))


def half_option(wildcards):
    _, k = split_half(wildcards.dataset)
    return f"--half {k}" if k else ""


def halves_option(wildcards, input):
    return f"--half1 {input.half1} --half2 {input.half2}" if "half1" in input.keys() else ""


# ---------------------------------------------------------------- rule inputs and params
def step_config(step):
    """Input function: the dataset's config YAML for a step ('preprocess', 'init'), or none."""

    def files(wildcards):
        path = dataset_entry(wildcards.dataset).get(step) or config[step]
        return {"config": resolve(path)} if path else {}

    return files


def preprocess_data(wc):
    """data.zarr of the dataset (a half dataset is cut from its whole dataset's)."""
    return f"{RESULTS}/{split_half(wc.dataset)[0]}/data.zarr"


def config_option(wildcards, input):
    return f"--config {shlex.quote(input.config)}" if "config" in input.keys() else ""


def ingest_input(wc):
    ds = dataset_entry(wc.dataset)
    if is_simulated(wc.dataset):
        return {"simulated": sim_dir(wc.dataset)}
    return {"patterns": resolve(split_patterns(ds["patterns"])[0]), "metadata": resolve(ds["metadata"])}


def ingest_patterns(wildcards, input):
    if is_simulated(wildcards.dataset):
        return f"{input.simulated}/patterns.h5:patterns"
    _, inner = split_patterns(dataset_entry(wildcards.dataset)["patterns"])
    return input.patterns + (f":{inner}" if inner else "")


def ingest_metadata(wildcards, input):
    return f"{input.simulated}/meta.yaml" if is_simulated(wildcards.dataset) else input.metadata


def plan_entry(plan):
    try:
        return PLANS[plan]
    except KeyError:
        raise WorkflowError(f"unknown plan {plan!r} (known: {', '.join(PLANS)})") from None


def reconstruct_input(wc):
    stages = plan_entry(wc.plan)["stages"]
    if wc.stage not in stages:
        raise WorkflowError(f"plan {wc.plan!r} has no stage {wc.stage!r} (stages: {', '.join(stages)})")
    k = stages.index(wc.stage)
    previous = f"{RESULTS}/{wc.dataset}/init.zarr" if k == 0 else stage_store(wc.dataset, wc.plan, stages[k - 1])
    return {"plan": PLANS[wc.plan]["path"], "data": f"{RESULTS}/{wc.dataset}/prepared.zarr", "init": previous}


def retry_scaled_resources(rule):
    """resources_for(rule), with runtime and memory × attempt: a retried job (Slurm: out of
    time or memory) asks for more."""
    res = resources_for(rule)
    for key in ("runtime", "mem_mb"):
        res[key] = (lambda value: lambda wildcards, attempt: value * attempt)(res[key])
    return res


def evaluate_input(wc):
    plan_entry(wc.plan)  # a clear error for an unknown plan
    inputs = {"result": final_store(wc.dataset, wc.plan), "init": f"{RESULTS}/{wc.dataset}/init.zarr"}
    if is_simulated(wc.dataset):
        inputs["simulated"] = sim_dir(wc.dataset)
    if frc_wanted(wc.dataset, wc.plan):
        inputs["half1"], inputs["half2"] = (final_store(half, wc.plan) for half in halves(wc.dataset))
    return inputs


def truth_option(wildcards, input):
    return f"--truth {input.simulated}/truth.zarr" if is_simulated(wildcards.dataset) else ""


# Jobs call `ptycore`: if snakemake runs from a virtualenv that is not activated, put that
# environment's bin/ first on PATH (jobs inherit it locally and on Slurm, which exports the env).
if shutil.which("ptycore") is None and (Path(sys.executable).parent / "ptycore").exists():
    os.environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


# ---------------------------------------------------------------- failures (keep-going runs)
ERROR_LINE_RE = re.compile(r"^ptycore [a-z]+: error: ")


def steps_of(dataset, plan):
    """(step, output, log) of one dataset × plan, in pipeline order (with FRC: each half's steps
    before evaluate, named 'half1 preprocess', 'half1 reconstruct-STAGE', ...)."""

    def stages(name):
        return [
            (f"reconstruct-{stage}", stage_store(name, plan, stage), f"{LOGS}/{name}/{plan}/reconstruct-{stage}.log")
            for stage in PLANS[plan]["stages"]
        ]

    def data_steps(name, names):
        return [(step, f"{RESULTS}/{name}/{out}", f"{LOGS}/{name}/{step}.log") for step, out in names]

    steps = [("simulate", sim_dir(dataset), f"{LOGS}/{dataset}/simulate.log")] if is_simulated(dataset) else []
    steps += data_steps(dataset, (("ingest", "data.zarr"), ("preprocess", "prepared.zarr"), ("init", "init.zarr")))
    steps += stages(dataset)
    if frc_wanted(dataset, plan):
        for half in halves(dataset):
            label = f"half{split_half(half)[1]}"
            half_steps = data_steps(half, (("preprocess", "prepared.zarr"), ("init", "init.zarr"))) + stages(half)
            steps += [(f"{label} {step}", out, log) for step, out, log in half_steps]
    return steps + [("evaluate", eval_dir(dataset, plan), f"{LOGS}/{dataset}/{plan}/evaluate.log")]


def first_error_line(log):
    """The one-line error a ptycore verb prints ('ptycore VERB: error: ...'), else the last
    non-empty line of the log (a traceback's last line, or a message from the shell)."""
    try:
        lines = [line.rstrip() for line in Path(log).read_text(errors="replace").splitlines()]
    except OSError:
        return None
    for line in lines:
        if ERROR_LINE_RE.match(line):
            return line
    lines = [line for line in lines if line.strip()]
    return lines[-1] if lines else None


def failed_runs(plans=None, pairs=None):
    """Each expected dataset × plan without an evaluation: the first step whose output is missing
    (snakemake removes the outputs of a failed job), its log and the log's first error line.
    `pairs`: the (dataset, plan) pairs to check (default: every dataset × its plans in `plans`)."""
    if pairs is None:
        pairs = [(d, p) for d in DATASETS for p in dataset_plans(d) if plans is None or p in plans]
    failed = []
    for dataset, plan in pairs:
        for step, output, log in steps_of(dataset, plan):
            if not Path(output).exists():
                break
        else:
            continue
        error = first_error_line(log) if Path(log).exists() else None
        failed.append(
            {
                "dataset": dataset,
                "plan": plan,
                "step": step,
                "log": log,
                "error": error or "not run (stopped before this step)",
            }
        )
    return failed


def aggregate_despite_failures():
    """onerror hook. With --keep-going a failed dataset leaves the aggregate's input incomplete,
    so snakemake never runs it; build it here from the evaluations that exist and name each
    failed dataset × plan with the first line of its error. Only when the run asked for it."""
    targets = {job.rule.name for job in workflow.dag.targetjobs}
    wanted = []
    if targets & {"all", "aggregate"}:
        wanted.append(("aggregate", None, None))
    if targets & {"figures", "figures_aggregate"} and OVERVIEW in figure_targets():
        wanted.append(("figures", config["figures"].get("plans"), None))
    if targets & {"figures", "study_aggregate"}:
        wanted += [(f"studies/{name}", None, name) for name in STUDIES]
    for name, plans, study_name in wanted:
        study = STUDIES[study_name] if study_name else None
        if study is None:
            evals, failures = all_evals(plans), failed_runs(plans)
            out = Path(OVERVIEW if name == "figures" else f"{RESULTS}/{name}")
        else:
            evals, failures = study["evals"], failed_runs(pairs=study["pairs"])
            out = Path(f"{FIGURES}/{study_name}")
        evals = [e for e in evals if Path(e).exists()]
        log = Path(f"{LOGS}/{name}.log")
        failures_file = Path(f"{LOGS}/{name}-failures.json")
        failures_file.parent.mkdir(parents=True, exist_ok=True)
        failures_file.write_text(json.dumps(failures, indent=1, ensure_ascii=False) + "\n")
        for f in failures:
            print(
                f"FAILED {f['dataset']} / {f['plan']} at {f['step']}: {f['error']}  (log: {f['log']})", file=sys.stderr
            )
        if out.exists():
            shutil.rmtree(out)
        title = "ptycore results" if name == "aggregate" else "ptycore figures"
        title = title if study is None else f"study {out.name}"
        cmd = ["ptycore", "aggregate", "--failures", str(failures_file), "--title", title, "--out", str(out)]
        cmd += ["--study", study["spec"]] if study is not None else []
        cmd += ["--evals", *evals] if evals else []
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not out.exists():
            print(f"aggregate of the datasets that completed failed too (see {log})", file=sys.stderr)
            continue
        # Built outside snakemake's bookkeeping: date it back to 1970 so that the next run, once
        # every branch succeeds, rebuilds it as a normal job (not to 0: snakemake reads 0 as "no time").
        for p in [*out.rglob("*"), out]:
            os.utime(p, (1, 1), follow_symlinks=False)
        print(
            f"aggregate of the {len(evals)} evaluations that completed (and {len(failures)} failed): {out}",
            file=sys.stderr,
        )


def clear_stale_failures():
    """onsuccess hook: a failures list older than its (now rebuilt) aggregate is out of date."""
    outs = {"aggregate": f"{RESULTS}/aggregate", "figures": OVERVIEW}
    outs.update({f"studies/{study}": f"{FIGURES}/{study}" for study in STUDIES})
    for name, out in outs.items():
        failures, out = Path(f"{LOGS}/{name}-failures.json"), Path(out)
        if failures.exists() and out.exists() and out.stat().st_mtime > failures.stat().st_mtime:
            failures.unlink()
