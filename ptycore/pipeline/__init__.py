"""The Snakemake workflow's logic, as plain Python (no Snakemake import), so that it can be tested.

The Snakefile and ``workflow/rules/*.smk`` hold only rules and thin input functions that call
this package:

* :mod:`ptycore.pipeline.layout`: the output layout and the pipeline's steps, from one table;
* :mod:`ptycore.pipeline.config`: reading the workflow config (paths, readable schema errors,
  per-rule resources, command-line options);
* :mod:`ptycore.pipeline.datasets`: datasets from the config and the nightly inbox;
* :mod:`ptycore.pipeline.model`: :class:`Pipeline`, the datasets × plans × studies of one
  config, and what each rule of the DAG needs from it;
* :mod:`ptycore.pipeline.failures`: which runs failed, at which step, with what error, and the
  aggregate rebuilt from what completed (atomically);
* :mod:`ptycore.pipeline.lock`: the run lock every pipeline run holds, so that the nightly run
  only clears Snakemake's lock when no run is alive;
* :mod:`ptycore.pipeline.nightly`: the nightly entry point (``workflow/scripts/nightly.sh``).
"""
