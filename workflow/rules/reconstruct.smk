# One reconstruct job per plan stage: stage K starts from stage K-1's result store (stage 1 from
# init.zarr) and writes its own store. Stage names come from the plan YAML (ptycore.pipeline.model).
# The half datasets of the FRC (NAME~half1, NAME~half2) run through this same rule.
#
# --resume: a job that is run again after it was killed (Slurm requeue after preemption or a node
# failure, a retry after running out of time, a rerun of an incomplete job) continues from the
# checkpoint in <out>.partial/checkpoints/ instead of iteration 0; with no checkpoint it starts
# from the beginning. --restart-stale: a checkpoint left by an earlier version of the plan or
# other inputs (the dataset or plan changed since the kill) is removed and the stage starts over,
# instead of failing the job every night until someone deletes it.
#
# devices: N (the dataset's, else the plan's; default 1): the job runs N connected processes, one
# per device, started by the `mpi` resource: `srun -n N` in a Slurm job of N tasks (N GPUs, one
# task each, for the GPU rule), `ptycore launch -n N` with profiles/local. One device: the command
# is plain `ptycore reconstruct`.


rule reconstruct:
    """One stage of a plan → results/{dataset}/{plan}/stages/{stage}.zarr."""
    input:
        unpack(reconstruct_input),
    output:
        directory(output_of("reconstruct")),
    log:
        log_of("reconstruct"),
    benchmark:
        benchmark_of("reconstruct")
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("reconstruct")
    resources:
        **device_scaled_resources("reconstruct"),
    params:
        launch=launch_prefix,
    shell:
        "{params.launch}ptycore reconstruct --plan {input.plan:q} --data {input.data} --init {input.init}"
        " --stage {wildcards.stage} --resume --restart-stale --out {output} > {log} 2>&1"
