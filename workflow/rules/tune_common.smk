# Helpers of workflow/rules/tune.smk: the search spaces of config tune (no rules here).


def collect_tunes(paths):
    """{name: {space, plan, data, init}} for each search space in config tune."""
    from ptycore.errors import PtycoreError
    from ptycore.tune.space import load_space

    tunes = {}
    for p in paths:
        try:
            space = load_space(resolve(p))
        except PtycoreError as err:
            raise WorkflowError(f"invalid config: tune: {err}") from None
        unknown = [d for d in space.datasets if d not in DATASETS]
        if space.name in tunes or not space.datasets or unknown:
            why = f"two spaces named {space.name!r}" if space.name in tunes else "needs 'datasets' (workflow names)"
            why = f"datasets: unknown {unknown} (known: {', '.join(DATASETS)})" if unknown else why
            raise WorkflowError(f"invalid config: tune: {p}: {why}")
        init = resolve(space.init) if space.init else dataset_entry(space.datasets[0]).get("init") or config["init"]
        tunes[space.name] = {
            "space": resolve(p),
            "plan": plan_path(space.plan),
            "data": [f"{RESULTS}/{d}/prepared.zarr" for d in space.datasets],
            "init": {"init": resolve(init)} if init else {},
        }
    return tunes


TUNES = collect_tunes(config.get("tune", []))
