# Evaluate each dataset × plan (final stage), then aggregate across datasets. With failures
# (--keep-going), the Snakefile's onerror hook builds the aggregates from what completed
# (ptycore/pipeline/failures.py); their rebuild stamp then makes the next run rebuild them here.


rule evaluate:
    """Final stage's store (+ truth for simulated data, + with FRC the two half reconstructions'
    final stores) → metrics.json, figures, report.html."""
    input:
        unpack(evaluate_input),
    output:
        directory(output_of("evaluate")),
    log:
        log_of("evaluate"),
    benchmark:
        benchmark_of("evaluate")
    wildcard_constraints:
        dataset=layout.dataset_constraint("evaluate"),
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("evaluate")
    resources:
        **resources_for("evaluate"),
    params:
        truth=truth_option,
        halves=halves_option,
    shell:
        "ptycore evaluate --result {input.result} {params.truth} {params.halves} --init {input.init}"
        " --dataset {wildcards.dataset} --plan {wildcards.plan} --out {output} > {log} 2>&1"


rule aggregate:
    """Every dataset × plan's evaluation → tables, figures and an HTML report across datasets."""
    input:
        evals=PIPE.evals(),
        stamp=rebuild_stamp("aggregate"),
    output:
        directory(layout.AGGREGATE),
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{layout.BENCH}/aggregate.tsv"
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("aggregate")
    resources:
        **resources_for("aggregate"),
    shell:
        "ptycore aggregate --evals {input.evals} --title 'ptycore results' --out {output} > {log} 2>&1"


rule figures_aggregate:
    """The figures overview: the aggregate of the evaluated datasets for the plans in config
    figures.plans (default: every plan). Per-study figures: workflow/rules/studies.smk."""
    input:
        evals=PIPE.evals(PIPE.figures_plans()),
        stamp=rebuild_stamp("figures"),
    output:
        directory(layout.OVERVIEW),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{layout.BENCH}/figures.tsv"
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("figures")
    resources:
        **resources_for("figures"),
    shell:
        "ptycore aggregate --evals {input.evals} --title 'ptycore figures' --out {output} > {log} 2>&1"
