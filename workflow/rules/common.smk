# Thin glue between the rules and ptycore.pipeline, which holds the workflow's logic (datasets and
# inbox, plans and studies, the output layout and steps, failures; tested without snakemake).
# No rules here; the Snakefile includes this first and then sets PIPE (ptycore.pipeline.model.Pipeline).

import re
import sys
from functools import wraps
from pathlib import Path

from snakemake.exceptions import WorkflowError

from ptycore.errors import PtycoreError
from ptycore.pipeline import layout
from ptycore.pipeline.config import put_interpreter_on_path, readable_config_error
from ptycore.pipeline.config import device_scaled_resources as _device_scaled_resources
from ptycore.pipeline.config import launch_prefix as _launch_prefix
from ptycore.pipeline.config import resources_for as _resources_for
from ptycore.pipeline.config import retry_scaled_resources as _retry_scaled_resources
from ptycore.pipeline.config import threads_for as _threads_for
from ptycore.pipeline.model import config_option as _config_option
from ptycore.pipeline.model import half_option as _half_option

RESULTS, LOGS, FIGURES, BENCH = layout.RESULTS, layout.LOGS, layout.FIGURES, layout.BENCH
NAME_RE, DATASET_RE = layout.NAME_RE, layout.DATASET_RE

put_interpreter_on_path(sys.executable)


def _one_line(fn):
    """An input function whose PtycoreError (unknown plan, stage, dataset) is one WorkflowError line."""

    @wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PtycoreError as err:
            raise WorkflowError(str(err)) from None

    return call


# ---------------------------------------------------------------- paths and resources of a step's rule
def output_of(step):
    return layout.output_pattern(step)


def log_of(step):
    return layout.log_pattern(step)


def benchmark_of(step):
    return layout.benchmark_pattern(step)


def resources_for(rule):
    return _resources_for(config, rule)


def retry_scaled_resources(rule):
    return _retry_scaled_resources(config, rule)


def threads_for(rule):
    return _threads_for(config, rule)


@_one_line
def reconstruct_devices(wc):
    """Devices of one reconstruct job: the dataset's devices:, else the plan's, else 1."""
    return PIPE.devices(wc.dataset, wc.plan)


def device_scaled_resources(rule):
    """retry_scaled_resources, and N tasks / GPUs / the mpi launcher for a job on N devices."""
    return _device_scaled_resources(config, rule, reconstruct_devices)


def launch_prefix(wildcards, resources):
    """'' on one device, else 'LAUNCHER -n N ' (resources.mpi: srun on Slurm, 'ptycore launch' in
    profiles/local)."""
    return _launch_prefix(reconstruct_devices(wildcards), resources.get("mpi"))


# ---------------------------------------------------------------- input functions and params
def step_config(step):
    """Input function: the dataset's config YAML for a step ('preprocess', 'init'), or none."""
    return _one_line(lambda wc: PIPE.step_config(step, wc.dataset))


def config_option(wildcards, input):
    return _config_option(dict(input.items()))


def half_option(wildcards):
    return _half_option(wildcards.dataset)


@_one_line
def simulate_options(wc):
    return PIPE.simulate_options(wc.dataset)


@_one_line
def ingest_input(wc):
    return PIPE.ingest_inputs(wc.dataset)


@_one_line
def ingest_patterns(wc):
    return PIPE.ingest_patterns(wc.dataset)


@_one_line
def ingest_metadata(wc):
    return PIPE.ingest_metadata(wc.dataset)


@_one_line
def preprocess_data(wc):
    return PIPE.preprocess_data(wc.dataset)


@_one_line
def reconstruct_input(wc):
    return PIPE.reconstruct_inputs(wc.dataset, wc.plan, wc.stage)


@_one_line
def evaluate_input(wc):
    return PIPE.evaluate_inputs(wc.dataset, wc.plan)


def truth_option(wildcards, input):
    return f"--truth {input.simulated}/truth.zarr" if "simulated" in input.keys() else ""


def halves_option(wildcards, input):
    return f"--half1 {input.half1} --half2 {input.half2}" if "half1" in input.keys() else ""


def rebuild_stamp(name):
    """The aggregate's rebuild stamp as an input, once the failure hook has written one
    (ptycore.pipeline.failures): newer than the aggregate it built, so the next run rebuilds it."""
    from ptycore.pipeline.failures import rebuild_stamp_input

    return lambda wc: rebuild_stamp_input(name.format(**dict(wc.items())))


def write_derived(path, text, log):
    """The run of study_plan / study_spec: write the file, and say so in the log."""
    from ptycore.studies import write_if_changed

    write_if_changed(path, text)
    Path(log).write_text(f"wrote {path}\n")


@_one_line
def study_plan_text(wc):
    return PIPE.plan(wc.plan).text


@_one_line
def study_spec_text(wc):
    return PIPE.study(wc.study).spec_text


@_one_line
def study_evals(wc):
    return PIPE.study(wc.study).evals


@_one_line
def study_spec(wc):
    return PIPE.study(wc.study).spec
