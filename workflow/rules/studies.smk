# Studies (config studies: config/studies/NAME.yaml): each run is a derived plan, expanded in
# memory when the workflow is read (ptycore.pipeline.model, ptycore.studies) and written by the
# study_plan rule to results/studies/NAME/plans/study-NAME-RUNID.yaml; its text is the rule's
# param, so a plan is rewritten (and its runs redone) only when its content changes. The ordinary
# rules reconstruct and evaluate it as results/{dataset}/study-NAME-RUNID/...; study_aggregate
# gathers a study's evaluations.


wildcard_constraints:
    study="|".join(re.escape(name) for name in PIPE.studies) or "(?!)",


rule study_plan:
    """A study run's derived plan (the base plan with the run's levels and seed)."""
    output:
        layout.study_plan_path("{study}", "{plan}"),
    log:
        f"{LOGS}/studies/{{study}}/plans/{{plan}}.log",
    params:
        text=study_plan_text,
    run:
        write_derived(output[0], params.text, log[0])


rule study_spec:
    """A study's aggregate.yaml: which evaluation is which run, factor level and seed."""
    output:
        layout.study_spec_path("{study}"),
    log:
        f"{LOGS}/studies/{{study}}/aggregate-spec.log",
    params:
        text=study_spec_text,
    run:
        write_derived(output[0], params.text, log[0])


rule study_aggregate:
    """A study's evaluations → results/figures/NAME: table.csv (one row per run × dataset, factor
    levels, seed, metrics), study_<metric>.png against the factor, metrics.csv/.zarr, report.html."""
    input:
        evals=study_evals,
        spec=study_spec,
        stamp=rebuild_stamp("studies/{study}"),
    output:
        directory(f"{FIGURES}/{{study}}"),
    log:
        f"{LOGS}/studies/{{study}}.log",
    benchmark:
        f"{layout.BENCH}/studies/{{study}}.tsv"
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("study")
    resources:
        **resources_for("study"),
    shell:
        "ptycore aggregate --evals {input.evals} --study {input.spec} --title 'study {wildcards.study}'"
        " --out {output} > {log} 2>&1"
