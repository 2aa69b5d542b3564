# ptycore pipeline: simulate/ingest → preprocess → init → reconstruct (one job per plan stage)
# → evaluate → aggregate, for every dataset × plan in config/config.yaml.
#
#   snakemake --profile profiles/local            # whole DAG on this machine
#   snakemake --profile profiles/slurm            # on a Slurm cluster (GPU partition for reconstruct)
#   snakemake --profile profiles/local figures    # paper figures and tables → results/figures
#                                                 # (overview/ and one directory per study in config studies)
#   snakemake --profile profiles/local dataset_NAME    # one dataset, every plan
#
# With config frc (enabled: true, or a dataset's frc: true), each dataset × plan is also
# reconstructed from each half of its scan (results/NAME~half1/, results/NAME~half2/: the even and
# the odd scan columns) and evaluate reports the Fourier ring correlation of the two halves.
#
# Each rule is a thin call of one `ptycore` verb; the logic (datasets, the step table and output
# layout, studies, failures, the run lock) is in ptycore/pipeline/. Outputs are zarr stores under
# results/{dataset}/{plan}/..., logs (the verb's stdout and stderr) under results/logs/,
# benchmarks under results/benchmarks/.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


try:
    validate(config, "workflow/schemas/config.schema.yaml")
except WorkflowError as _err:
    _cause = _err.__context__  # the jsonschema ValidationError
    if not hasattr(_cause, "absolute_path"):
        raise
    raise WorkflowError(f"invalid config: {readable_config_error(_cause)}") from None


from ptycore.pipeline.model import Pipeline

try:
    PIPE = Pipeline(config, basedir=workflow.basedir)
except PtycoreError as _err:
    raise WorkflowError(f"invalid config: {_err}") from None
DATASETS = PIPE.datasets


# Every run holds the run lock of its working directory while it lives, so that the nightly run
# clears snakemake's lock only when no run is alive (ptycore/pipeline/lock.py).
if workflow.is_main_process:
    from ptycore.pipeline.lock import RunLockBusy, check_unlock, hold_run_lock

    try:
        check_unlock(sys.argv)
        hold_run_lock(".")
    except RunLockBusy as _err:
        raise WorkflowError(str(_err)) from None


wildcard_constraints:
    dataset=DATASET_RE,
    plan=NAME_RE,
    stage=NAME_RE,


# JAX: never grab the whole GPU up front (several jobs may share one locally); nothing here forces
# a platform, so JAX uses a GPU where a CUDA jaxlib finds one and the CPU everywhere else.
shell.prefix("export XLA_PYTHON_CLIENT_PREALLOCATE=false; ")


# ---------------------------------------------------------------- targets
localrules:
    all,
    evaluations,
    figures,
    study_plan,
    study_spec,


# --keep-going: a failed dataset stops only its own branch, so snakemake never runs the aggregate;
# this hook builds it from the evaluations that exist, listing the failures
# (results/logs/aggregate-failures.json), and marks it for rebuilding by the next run.
onerror:
    from ptycore.pipeline.failures import aggregate_despite_failures

    aggregate_despite_failures(PIPE, {job.rule.name for job in workflow.dag.targetjobs})


onsuccess:
    from ptycore.pipeline.failures import clear_stale_failures

    clear_stale_failures(PIPE)


rule all:
    """Every dataset × plan reconstructed and evaluated, aggregated into results/aggregate."""
    default_target: True
    input:
        layout.AGGREGATE,
        PIPE.all_stores(),


rule evaluations:
    """Every dataset × plan evaluated, without the aggregate."""
    input:
        PIPE.all_stores(),


rule figures:
    """Paper figures and tables → results/figures: overview/ (the aggregate of the evaluated
    datasets for the plans in config figures.plans, default all; none for []) and, for each study
    in config studies, results/figures/NAME/ (table.csv, study_<metric>.png, report.html)."""
    input:
        PIPE.figure_targets(),


# one target per dataset: `snakemake dataset_NAME` runs that dataset through every plan
for _name in DATASETS:

    rule:
        name:
            f"dataset_{_name}"
        input:
            PIPE.dataset_stores(_name),


include: "workflow/rules/data.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/studies.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/prior.smk"
