# Data steps, one dataset each: simulate (simulated datasets only) → ingest → preprocess → init.
# A half dataset NAME~halfK (config frc) has no data.zarr of its own: its preprocess cuts half K
# of the scan from NAME's data.zarr (ptycore preprocess --half K), then init and reconstruct as usual.


rule simulate:
    """Simulated dataset: patterns.h5 (dataset 'patterns'), meta.yaml and truth.zarr."""
    output:
        directory(f"{RESULTS}/{{dataset}}/simulated"),
    log:
        f"{LOGS}/{{dataset}}/simulate.log",
    benchmark:
        f"{BENCH}/{{dataset}}/simulate.tsv"
    wildcard_constraints:
        dataset=NAME_RE,
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("simulate")
    resources:
        **resources_for("simulate"),
    params:
        options=lambda wc: cli_options(dataset_entry(wc.dataset)["simulate"]),
    shell:
        "ptycore simulate {params.options} --out {output} > {log} 2>&1"


rule ingest:
    """Raw patterns + acquisition metadata → data.zarr (validated, checksummed)."""
    input:
        unpack(ingest_input),
    output:
        directory(f"{RESULTS}/{{dataset}}/data.zarr"),
    log:
        f"{LOGS}/{{dataset}}/ingest.log",
    benchmark:
        f"{BENCH}/{{dataset}}/ingest.tsv"
    wildcard_constraints:
        dataset=NAME_RE,
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
        directory(f"{RESULTS}/{{dataset}}/prepared.zarr"),
    log:
        f"{LOGS}/{{dataset}}/preprocess.log",
    benchmark:
        f"{BENCH}/{{dataset}}/preprocess.tsv"
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
        data=f"{RESULTS}/{{dataset}}/prepared.zarr",
    output:
        directory(f"{RESULTS}/{{dataset}}/init.zarr"),
    log:
        f"{LOGS}/{{dataset}}/init.log",
    benchmark:
        f"{BENCH}/{{dataset}}/init.tsv"
    conda:
        "../envs/ptycore.yaml"
    threads: threads_for("init")
    resources:
        **resources_for("init"),
    params:
        config=config_option,
    shell:
        "ptycore init --data {input.data} {params.config} --out {output} > {log} 2>&1"
