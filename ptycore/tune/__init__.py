"""``ptycore tune``: hyperparameter search over plan fields and init parameters with Optuna, each
trial a reconstruction run in a dask worker (a LocalCluster by default, a dask-jobqueue
SLURMCluster on clusters); the study lives in a storage that survives (a journal file in the
study folder by default, an RDB URL as an option) and an interrupted study resumes.

A search space (``config/tune/NAME.yaml``), validated before any compute::

    name: lr-defocus                  # optional (default: the file's stem)
    plan: gradient-single-slice       # base plan: a name in config/plans/ or a path to a plan YAML
    data:                             # prepared stores (ptycore preprocess); --data replaces them
      - {prepared: results/sto/prepared.zarr, init: config/init/default.yaml}
    # datasets: [srtio3-2cells]       # or workflow dataset names: results/NAME/prepared.zarr
    init: config/init/default.yaml    # base init config (default: the verb's defaults)
    trials: 40                        # trials that finish: complete, pruned or failed
    objective: validation             # held-out positions' loss (needs validation_fraction), or data_fit
    report_every: 5                   # iterations between reports to the pruner
    pruner: {kind: median, n_startup_trials: 4, n_warmup_steps: 10}   # median | hyperband | none
    sampler: {kind: tpe, n_startup_trials: 8, constant_liar: true}    # tpe | random
    seed: 0                           # sampler seed; the k-th trial's sampler uses seed + k
    fixed: {"stages[main].validation_fraction": 0.1}                  # plan overrides for every trial
    parameters:                       # plan fields in the studies' override syntax, or init.FIELD
      "stages[main].optimize.object_phase.lr": {low: 1.0e-3, high: 1.0e-1, log: true}
      "stages[main].batch_size": {choices: [8, 16, 32]}
      "stages[main].resample.probe_modes": {low: 1, high: 4}          # whole numbers: an integer range
      "init.defocus_A": {low: 60.0, high: 140.0}
      "init.scan_rotation_deg": {low: -3.0, high: 3.0}
    cluster:
      kind: local                     # local | slurm
      workers: 2                      # local: worker processes = trials at once
      slurm: {partition: gpu, account: myproject, walltime: "02:00:00", cores: 4, memory: 16GB, gpus: 1,
              minimum_jobs: 0, maximum_jobs: 8, lifetime_margin_minutes: 10}
    storage: null                     # RDB URL (postgresql://..., sqlite:///...) instead of the journal file
    retries: 1                        # reruns of a trial whose worker was lost

Init parameters (``init.FIELD``) are the fields of the init config (``ptycore init``:
``defocus_A``, ``convergence_mrad``, ``probe_modes``, ``slices``, ``slice_thickness_A``,
``thickness_A``, ...) and ``scan_rotation_deg`` (a rotation of the nominal positions, composed
with the config's ``affine``); tuning any of them makes every trial run ``ptycore init`` itself.
``convergence_mrad`` overrides the data's metadata twice: init builds the probe's aperture with
it, and the reconstruction uses it (probe-aperture constraint, ``kz_filter``, detector-crop
checks), reading it from the init store.

The study folder (``--out``): ``trials/NNNN/`` (``plan.yaml``, ``init.yaml`` when init
parameters are tuned, ``result-D.zarr`` per dataset D, ``init-D.zarr``), ``study.journal``,
``study.csv`` and ``study.zarr`` (one row per trial: parameters, objective, state, seconds,
worker, Slurm job and GPU, seeds, first error line), ``best/plan.yaml`` (a ready plan;
``best/init.yaml``), ``figures/*.png``, ``report.html``, ``logs/slurm/`` (the Slurm jobs' logs).
"""
