# Hyperparameter studies (config tune: config/tune/NAME.yaml; format in ptycore/tune/__init__.py):
# `snakemake tune` runs `ptycore tune` for each space on the prepared stores of its workflow
# datasets → results/tune/NAME (trials, study table, best plan, figures, report). The trials run
# on the dask cluster the space names (a LocalCluster inside this job, or Slurm jobs of their own).


include: "tune_common.smk"


localrules:
    tune,


rule tune:
    """Every search space in config tune → results/tune/NAME."""
    input:
        [f"{RESULTS}/tune/{name}" for name in TUNES],


rule tune_study:
    """One search space → results/tune/NAME: trials/, study.csv/.zarr, best/plan.yaml, figures/, report.html."""
    input:
        unpack(lambda wc: {"space": TUNES[wc.tune]["space"], "plan": TUNES[wc.tune]["plan"], **TUNES[wc.tune]["init"]}),
        data=lambda wc: TUNES[wc.tune]["data"],
    output:
        directory(f"{RESULTS}/tune/{{tune}}"),
    log:
        f"{LOGS}/tune/{{tune}}.log",
    benchmark:
        f"{layout.BENCH}/tune/{{tune}}.tsv"
    wildcard_constraints:
        tune="|".join(re.escape(name) for name in TUNES) or "(?!)",
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("tune")
    resources:
        **resources_for("tune"),
    params:
        init=lambda wc, input: f"--init-config {shlex.quote(input.init)}" if "init" in input.keys() else "",
    shell:
        "ptycore tune --space {input.space:q} --plan {input.plan:q} --data {input.data} {params.init}"
        " --out {output} --quiet > {log} 2>&1"
