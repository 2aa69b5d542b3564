"""``ptycore plans``: the shipped plans (config/plans/), what data each is for, and its stages.

``ptycore plans NAME --resolve --data prepared.zarr [--init init.zarr]`` prints the plan as it
would run on that dataset: its ``auto`` fields and expressions resolved (ptycore.recon.autoplan),
a note per rule and the physics warnings."""

from __future__ import annotations

from pathlib import Path

HELP = "list the shipped reconstruction plans and what data each is for (or show one, resolved for a dataset)"

#: the shipped plans: config/plans/ of the project
PLANS_DIR = Path(__file__).resolve().parent.parent.parent / "config" / "plans"


def plan_path(name_or_path: str) -> Path:
    """A plan file, or the shipped plan of that name (config/plans/NAME.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        return path
    shipped = PLANS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    from ptycore.errors import InvalidPlan

    known = ", ".join(p.stem for p in sorted(PLANS_DIR.glob("*.yaml"))) or f"none in {PLANS_DIR}"
    raise InvalidPlan(f"{name_or_path}: no such plan file, nor a shipped plan of that name (shipped: {known})")


def add_arguments(p):
    p.add_argument("name", nargs="?", help="show this plan (a shipped name or a YAML path) instead of the list")
    p.add_argument("--data", help="with NAME: resolve the plan's auto fields for this prepared.zarr")
    p.add_argument("--init", help="with --data: the init store (its thickness; default: the data's metadata)")


def _stage_line(stage) -> str:
    rs = stage.resample
    bits = [f"{stage.engine} × {stage.iterations}"]
    for key in ("slices", "slice_thickness_A", "probe_modes", "detector_px"):
        value = getattr(rs, key)
        if value is not None:
            bits.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    return f"{stage.name} ({', '.join(bits)})"


def run(args) -> int:
    import yaml

    from ptycore.errors import InvalidArgument
    from ptycore.plan import load_plan

    if args.name is None:
        if args.data or args.init:
            raise InvalidArgument("--data and --init need a plan NAME")
        paths = sorted(PLANS_DIR.glob("*.yaml"))
        width = max((len(p.stem) for p in paths), default=4)
        for path in paths:
            plan = load_plan(path)
            auto = " [adaptive: stages below resolved for 6 u.c. SrTiO3, 300 kV, 1e6 e/Å²]" if plan.adaptive else ""
            print(f"{plan.name:<{width}}  {plan.for_ or '(no for: given)'}{auto}")
            print(f"{'':<{width}}  stages: {'; '.join(_stage_line(s) for s in plan.stages)}")
        return 0
    plan = load_plan(plan_path(args.name))
    notes, warnings = [], []
    if args.data:
        from ptycore.recon.reconstruct import resolve_plan
        from ptycore.recon.state import load_state
        from ptycore.store import open_store

        if args.init:
            state, _ = load_state(args.init)
            plan, _, notes, warnings = resolve_plan(plan, args.data, args.init, state)
        else:
            from ptycore.recon import autoplan
            from ptycore.recon.reconstruct import _stored_patterns_shape

            attrs = dict(open_store(args.data).attrs)
            facts = autoplan.facts_for_run(attrs, _stored_patterns_shape(args.data), {}, None, args.data)
            plan, notes = plan.resolve(facts)
            warnings = autoplan.physics_warnings(facts)
    elif args.init:
        raise InvalidArgument("--init needs --data")
    print(yaml.safe_dump(plan.resolved(), sort_keys=False, allow_unicode=True), end="")
    for line in notes:
        print(f"# {line}")
    for line in warnings:
        print(f"# warning: {line}")
    return 0
