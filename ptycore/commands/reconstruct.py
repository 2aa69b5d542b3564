"""``ptycore reconstruct``: run a plan's stages on a prepared dataset, write one result store."""

from __future__ import annotations

from pathlib import Path

HELP = "run a reconstruction plan (all stages, or one with --stage) and write a result store"


def add_arguments(p):
    p.add_argument("--plan", required=True, help="plan YAML (see config/plans/)")
    p.add_argument("--data", required=True, help="prepared.zarr from 'ptycore preprocess'")
    p.add_argument("--init", required=True, help="init.zarr from 'ptycore init', or a previous stage's result store")
    p.add_argument("--out", required=True, help="result store to write (zarr v3)")
    p.add_argument("--stage", help="run only this stage (default: all stages in order)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in <out>.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result store")
    p.add_argument("--seed", type=int, help="override the plan's seed")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from ptycore.recon.reconstruct import reconstruct

    out = reconstruct(plan_path=args.plan, data_path=args.data, init_path=args.init, out_path=args.out,
                      stage=args.stage, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
                      progress=not args.quiet)
    print(f"wrote {Path(out)}")
    return 0
