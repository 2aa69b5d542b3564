# Studies (config studies: config/studies/NAME.yaml): each run is a derived plan
# (results/studies/NAME/plans/study-NAME-RUNID.yaml, written at parse time by common.smk's
# collect_studies), reconstructed and evaluated by the ordinary rules as
# results/{dataset}/study-NAME-RUNID/...; this rule gathers a study's evaluations.


rule study_aggregate:
    """A study's evaluations → results/figures/NAME: table.csv (one row per run × dataset, factor
    levels, seed, metrics), study_<metric>.png against the factor, metrics.csv/.zarr, report.html."""
    input:
        evals=lambda wc: study_entry(wc.study)["evals"],
        spec=lambda wc: study_entry(wc.study)["spec"],
    output:
        directory(f"{FIGURES}/{{study}}"),
    log:
        f"{LOGS}/studies/{{study}}.log",
    benchmark:
        f"{BENCH}/studies/{{study}}.tsv"
    wildcard_constraints:
        study="|".join(re.escape(name) for name in STUDIES) or "(?!)",
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("study")
    resources:
        **resources_for("study"),
    shell:
        "ptycore aggregate --evals {input.evals} --study {input.spec} --title 'study {wildcards.study}'"
        " --out {output} > {log} 2>&1"
