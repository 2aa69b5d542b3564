# Data steps, one dataset each: simulate (simulated datasets only) → ingest → preprocess → init.
# A half dataset NAME~halfK (config frc) has no data.zarr of its own: its preprocess cuts half K
# of the scan from NAME's data.zarr (ptycore preprocess --half K), then init and reconstruct as usual.
# Output, log and benchmark paths: the step table in ptycore/pipeline/layout.py.


rule simulate:
    """Simulated dataset: patterns.h5 (dataset 'patterns'), meta.yaml and truth.zarr."""
    output:
        directory(output_of("simulate")),
    log:
        log_of("simulate"),
    benchmark:
        benchmark_of("simulate")
    wildcard_constraints:
        dataset=layout.dataset_constraint("simulate"),
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("simulate")
    resources:
        **resources_for("simulate"),
    params:
        options=simulate_options,
    shell:
        "ptycore simulate {params.options} --out {output} > {log} 2>&1"


rule ingest:
    """Raw patterns + acquisition metadata → data.zarr (validated, checksummed). A raw file that
    does not exist fails this job only (with one line naming it), not the whole DAG."""
    input:
        unpack(ingest_input),
    output:
        directory(output_of("ingest")),
    log:
        log_of("ingest"),
    benchmark:
        benchmark_of("ingest")
    wildcard_constraints:
        dataset=layout.dataset_constraint("ingest"),
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("ingest")
    resources:
        **resources_for("ingest"),
    params:
        patterns=ingest_patterns,
        metadata=ingest_metadata,
    shell:
        "ptycore ingest --patterns {params.patterns:q} --meta {params.metadata:q} --workers {threads}"
        " --out {output} > {log} 2>&1"


rule preprocess:
    """data.zarr → prepared.zarr (crop / bin / pad / resample / noise, per the preprocess config;
    for NAME~halfK, half K of NAME's scan columns)."""
    input:
        unpack(step_config("preprocess")),
        data=preprocess_data,
    output:
        directory(output_of("preprocess")),
    log:
        log_of("preprocess"),
    benchmark:
        benchmark_of("preprocess")
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("preprocess")
    resources:
        **resources_for("preprocess"),
    params:
        config=config_option,
        half=half_option,
    shell:
        "ptycore preprocess --data {input.data} {params.config} {params.half} --out {output} > {log} 2>&1"


rule init:
    """prepared.zarr → init.zarr (probe from aberrations, object, positions, tilts)."""
    input:
        unpack(step_config("init")),
        data=output_of("preprocess"),
    output:
        directory(output_of("init")),
    log:
        log_of("init"),
    benchmark:
        benchmark_of("init")
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("init")
    resources:
        **resources_for("init"),
    params:
        config=config_option,
    shell:
        "ptycore init --data {input.data} {params.config} --out {output} > {log} 2>&1"
