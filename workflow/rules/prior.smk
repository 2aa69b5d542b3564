# The learned crystal prior (issue 20): `snakemake --profile profiles/local prior` makes the
# training data and trains the prior of config/prior/default.yaml → results/prior/crystal-prior
# (prior.eqx + prior.json: the shipped ptycore/prior/weights/crystal-prior.{eqx,json}).

PRIOR_CONFIG = f"{workflow.basedir}/config/prior/default.yaml"


localrules:
    prior,


rule prior:
    """The crystal prior of config/prior/default.yaml → results/prior/crystal-prior."""
    input:
        f"{RESULTS}/prior/crystal-prior",


rule prior_data:
    """Per-slice phase patches of many crystals (no perovskites), manifest, held-out split."""
    input:
        config=PRIOR_CONFIG,
    output:
        directory(f"{RESULTS}/prior/data.zarr"),
    log:
        f"{LOGS}/prior/data.log",
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("prior_data")
    resources:
        **resources_for("prior_data"),
    shell:
        "ptycore prior data --config {input.config} --out {output} --quiet > {log} 2>&1"


rule prior_train:
    """The denoiser trained on the data store: prior.eqx, prior.json, curves.json, curves.png."""
    input:
        config=PRIOR_CONFIG,
        data=f"{RESULTS}/prior/data.zarr",
    output:
        directory(f"{RESULTS}/prior/crystal-prior"),
    log:
        f"{LOGS}/prior/train.log",
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("prior_train")
    resources:
        **resources_for("prior_train"),
    shell:
        "ptycore prior train --config {input.config} --data {input.data} --out {output} --quiet > {log} 2>&1"
