"""Reading the workflow config (``config/config.yaml``, schema ``workflow/schemas/config.schema.yaml``):
paths, readable schema errors, per-rule resources and ``ptycore`` command-line options."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ptycore.errors import InvalidArgument

PATTERN_SUFFIXES = (".h5", ".hdf5", ".npy", ".mat", ".raw", ".zarr")
METADATA_SUFFIXES = (".yaml", ".yml")


class ConfigError(InvalidArgument):
    """The workflow config names something that does not exist or does not fit together."""


def resolve(path, basedir: str | Path | None = None) -> str:
    """A path from the config: absolute, else relative to the working directory if it exists
    there, else relative to the workflow's own directory ``basedir`` (so the shipped plans and
    step configs are found when running with --directory elsewhere)."""
    p = Path(os.path.expanduser(os.path.expandvars(str(path))))
    if p.is_absolute() or p.exists() or basedir is None:
        return str(p)
    shipped = Path(basedir) / p
    return str(shipped) if shipped.exists() else str(p)


def split_patterns(spec) -> tuple[str, str | None]:
    """'scan.h5:entry/data' -> ('scan.h5', 'entry/data'); 'scan.npy' -> ('scan.npy', None)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and Path(head).suffix.lower() in PATTERN_SUFFIXES:
        return head, tail
    return str(spec), None


def readable_config_error(err) -> str:
    """One line naming the config key and what is wrong with it, from a jsonschema
    ``ValidationError`` (jsonschema's own message is pages long)."""
    import jsonschema

    top = err
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    where_path = list(top.absolute_path)
    where = _where(where_path) or "(top level)"
    if top.validator == "oneOf" and len(where_path) == 2 and where_path[0] == "datasets":
        return f"{where}: a dataset needs either 'simulate:' or both 'patterns:' and 'metadata:'"
    inner = list(err.absolute_path)
    if inner != where_path:
        where = _where(inner) or where
    message = err.message if len(err.message) < 300 else f"{err.message[:300]} ..."
    return f"{where}: {message}"


def _where(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# ---------------------------------------------------------------- resources
BUILTIN_RESOURCES = {
    "default": {"cpus": 1, "mem_mb": 2000, "runtime": 30},
    "simulate": {"cpus": 2, "mem_mb": 4000, "runtime": 60},
    "ingest": {"cpus": 2},
    "init": {"mem_mb": 4000},
    "reconstruct": {"cpus": 4, "mem_mb": 16000, "runtime": 240, "gpu": True},
    "evaluate": {"mem_mb": 4000},
    "study": {"mem_mb": 4000},
    "prior_data": {"mem_mb": 4000},
    "prior_train": {"cpus": 2, "mem_mb": 6000, "runtime": 120},
}


def rule_settings(config: dict, rule: str) -> dict:
    """Merged settings of one rule: built-in default < config default < built-in rule < config rule."""
    merged = {}
    configured = config.get("resources") or {}
    for layer in (BUILTIN_RESOURCES["default"], configured.get("default", {}), BUILTIN_RESOURCES.get(rule, {}),
                  configured.get(rule, {})):
        merged.update(layer)
    return merged


def _slurm_setting(config: dict, key: str, env: str):
    value = (config.get("slurm") or {}).get(key)
    return value if value else os.environ.get(env) or None


def resources_for(config: dict, rule: str) -> dict:
    """Snakemake resources of a rule: mem_mb, runtime (min), and for Slurm slurm_account,
    slurm_partition (GPU rules: the GPU partition) and gres/slurm_extra. Keys with no value are
    left out, so a profile's default-resources can fill them in."""
    s = rule_settings(config, rule)
    res = {"mem_mb": s["mem_mb"], "runtime": s["runtime"]}
    account = _slurm_setting(config, "account", "PTYCORE_SLURM_ACCOUNT")
    if account:
        res["slurm_account"] = account
    if s.get("gpu"):
        res["gres"] = s.get("gres", "gpu:1")
        partition = s.get("partition") or _slurm_setting(config, "gpu_partition", "PTYCORE_SLURM_GPU_PARTITION") \
            or "gpu"
    else:
        partition = s.get("partition") or _slurm_setting(config, "partition", "PTYCORE_SLURM_PARTITION")
    if partition:
        res["slurm_partition"] = partition
    if s.get("slurm_extra"):
        res["slurm_extra"] = s["slurm_extra"]
    return res


def retry_scaled_resources(config: dict, rule: str) -> dict:
    """resources_for(rule), with runtime and memory × attempt: a retried job (Slurm: out of time
    or memory) asks for more. The values are functions of (wildcards, attempt), as Snakemake takes them."""
    res = resources_for(config, rule)
    for key in ("runtime", "mem_mb"):
        res[key] = (lambda value: lambda wildcards, attempt: value * attempt)(res[key])
    return res


#: how a job on several devices starts its processes, unless resources.<rule>.launcher says otherwise
#: (the Snakemake ``mpi`` resource; profiles/local sets it to ``ptycore launch``)
DEFAULT_LAUNCHER = "srun"


def device_resources(config: dict, rule: str, n_devices: int) -> dict:
    """What one job of a rule on ``n_devices`` devices asks for beyond :func:`resources_for`, as
    snakemake-executor-plugin-slurm reads it. One device: nothing changes (a GPU rule keeps
    ``gres`` gpu:1). N > 1: N tasks (one process per device, ``tasks``) started by the launcher
    (``mpi``, default srun) and, for a GPU rule, N GPUs with one task each (``gpu``,
    ``tasks_per_gpu``; ``nodes`` = ceil(N / gpus_per_node) when the rule's ``gpus_per_node`` is
    set) instead of the gres; ``mem_mb`` is per node, so × the tasks on one node."""
    s = rule_settings(config, rule)
    if n_devices <= 1:
        return {}
    out = {"tasks": n_devices, "mpi": s.get("launcher") or DEFAULT_LAUNCHER, "gres": None}
    per_node = n_devices
    if s.get("gpu"):
        out.update(gpu=n_devices, tasks_per_gpu=1)
        if s.get("gpus_per_node"):
            per_node = min(n_devices, s["gpus_per_node"])
            out["nodes"] = -(-n_devices // s["gpus_per_node"])
    out["mem_mb"] = s["mem_mb"] * per_node
    return out


DEVICE_KEYS = ("tasks", "mpi", "gpu", "tasks_per_gpu", "nodes")


def device_scaled_resources(config: dict, rule: str, devices_of) -> dict:
    """:func:`retry_scaled_resources` for a rule whose jobs run on ``devices_of(wildcards)``
    devices each (see :func:`device_resources`): every value a function of (wildcards, attempt);
    a key a job does not need is None (snakemake leaves it out)."""
    base = resources_for(config, rule)
    res = {k: v for k, v in base.items() if k not in ("gres", "mem_mb", "runtime")}

    def per_job(key, default=None, scaled=False):
        def value(wildcards, attempt):
            extra = device_resources(config, rule, devices_of(wildcards))
            v = extra.get(key, default)
            return v * attempt if scaled else v
        return value

    res["runtime"] = per_job("runtime", base["runtime"], scaled=True)
    res["mem_mb"] = per_job("mem_mb", base["mem_mb"], scaled=True)
    if "gres" in base:
        res["gres"] = per_job("gres", base["gres"])
    for key in DEVICE_KEYS:
        res[key] = per_job(key)
    return res


def launch_prefix(n_devices: int, launcher: str | None) -> str:
    """The start of a command that runs on ``n_devices`` devices: nothing for one, else
    ``LAUNCHER -n N `` (srun, mpirun and ``ptycore launch`` all take -n N and the command)."""
    return "" if n_devices <= 1 else f"{launcher or DEFAULT_LAUNCHER} -n {n_devices} "


def threads_for(config: dict, rule: str) -> int:
    return rule_settings(config, rule)["cpus"]


# ---------------------------------------------------------------- command lines
def cli_options(options: dict, what: str = "simulate") -> str:
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
            raise ConfigError(f"{what} option {key!r}: nested mappings are not command-line options")
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def put_interpreter_on_path(executable: str) -> None:
    """Jobs call ``ptycore``: if snakemake runs from a virtualenv that is not activated, put that
    environment's bin/ first on PATH (jobs inherit it locally and on Slurm, which exports the env)."""
    import shutil

    bin_dir = Path(executable).parent
    if shutil.which("ptycore") is None and (bin_dir / "ptycore").exists():
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
