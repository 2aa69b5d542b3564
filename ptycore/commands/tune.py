"""``ptycore tune``: an Optuna study over plan fields and init parameters on a dask cluster."""

from __future__ import annotations

HELP = ("hyperparameter search (Optuna on a dask LocalCluster or SLURMCluster): search space YAML → study "
        "folder with the best plan, study table, figures and report; rerun to resume")


def add_arguments(p):
    p.add_argument("--space", required=True, help="search space YAML (see config/tune/ and ptycore/tune/__init__.py)")
    p.add_argument("--out", required=True, help="study folder (e.g. results/tune/NAME); an existing one is resumed")
    p.add_argument("--plan", help="base plan YAML (replaces the space's 'plan')")
    p.add_argument("--data", nargs="+", metavar="PREPARED", help="prepared stores (replace the space's data)")
    p.add_argument("--init-config", help="init config YAML for every dataset (replaces the space's)")
    p.add_argument("--trials", type=int, help="trials to finish in total (replaces the space's 'trials')")
    p.add_argument("--workers", type=int, help="trials at once: local workers / maximum Slurm jobs")
    p.add_argument("--cluster", choices=["local", "slurm"], help="dask cluster (replaces the space's cluster.kind)")
    p.add_argument("--storage", help="Optuna RDB URL (default: the journal file <out>/study.journal)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from ptycore.errors import InvalidArgument
    from ptycore.tune.execute import prepare, run_study

    for name in ("trials", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidArgument(f"--{name}: must be >= 1, got {value}")
    setup = prepare(args.space, args.out, plan=args.plan, data=args.data, init_config=args.init_config,
                    trials=args.trials, workers=args.workers, cluster=args.cluster, storage=args.storage)
    summary = run_study(setup, progress=not args.quiet)
    best = ("no trial completed" if summary["best_trial"] is None
            else f"best trial {summary['best_trial']} ({summary['best_value']:.6g}) → {summary['best_plan']}")
    print(f"wrote {setup.out}: {summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} "
          f"pruned, {summary['failed']} failed); {best}; report {summary['report']}")
    return 0
