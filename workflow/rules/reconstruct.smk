# One reconstruct job per plan stage: stage K starts from stage K-1's result store (stage 1 from
# init.zarr) and writes its own store. Stage names come from the plan YAML (read in common.smk).
# The half datasets of the FRC (NAME~half1, NAME~half2) run through this same rule.


rule reconstruct:
    """One stage of a plan → results/{dataset}/{plan}/stages/{stage}.zarr."""
    input:
        unpack(reconstruct_input),
    output:
        directory(f"{RESULTS}/{{dataset}}/{{plan}}/stages/{{stage}}.zarr"),
    log:
        f"{LOGS}/{{dataset}}/{{plan}}/reconstruct-{{stage}}.log",
    benchmark:
        f"{BENCH}/{{dataset}}/{{plan}}/reconstruct-{{stage}}.tsv"
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("reconstruct")
    resources:
        **retry_scaled_resources("reconstruct"),
    shell:
        "ptycore reconstruct --plan {input.plan:q} --data {input.data} --init {input.init}"
        " --stage {wildcards.stage} --out {output} > {log} 2>&1"
