"""``ptycore reconstruct``: run a plan's stages on a prepared dataset, write one result store.

Exit codes: 0 done, 2 bad input (or an estimated peak memory that does not fit), 3 diverged,
128 + signal number when SIGTERM/SIGINT stopped it after writing a checkpoint (resume with
``--resume``)."""

from __future__ import annotations

from pathlib import Path

HELP = "run a reconstruction plan (all stages, or one with --stage) and write a result store"


def add_arguments(p):
    p.add_argument("--plan", default="default",
                   help="plan YAML, or the name of a shipped plan ('ptycore plans' lists them); default: 'default', "
                        "the adaptive plan (slices, probe modes, steps and iterations from the data's metadata)")
    p.add_argument("--data", required=True, help="prepared.zarr from 'ptycore preprocess'")
    p.add_argument("--init", required=True, help="init.zarr from 'ptycore init', or a previous stage's result store")
    p.add_argument("--out", required=True, help="result store to write (zarr v3)")
    p.add_argument("--stage", help="run only this stage (default: all stages in order)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in <out>.partial (written every checkpoint_every iterations "
                        "and on SIGTERM/SIGINT; a damaged checkpoint is refused, naming it); starts from scratch if "
                        "there are none, and does nothing if <out> already holds this plan's result from the same "
                        "inputs")
    p.add_argument("--restart-stale", action="store_true",
                   help="with --resume: a checkpoint that cannot continue (another plan, other inputs, damaged) is "
                        "removed with a warning and its stage starts over, instead of being refused (what the "
                        "workflow's retries use)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result store")
    p.add_argument("--seed", type=int, help="override the plan's seed")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output, no physics warnings (they are in the provenance and the report)")
    p.add_argument("--max-memory-gb", type=float, metavar="GB",
                   help="memory the run may use, instead of the free memory detected (device memory on a GPU): "
                        "the run is refused before it starts if its estimated peak is larger")
    p.add_argument("--devices", metavar="N|all",
                   help="devices to shard the scan positions over (data parallelism; same result up to float32 "
                        "rounding): a number or 'all' (default: every device of every process when started as "
                        "several processes by srun, mpirun or 'ptycore launch', else the plan's devices:, 1 unless "
                        "it says); each process reads only its devices' patterns from --data, and the memory "
                        "estimate, its check and the recorded peaks are per device")


def check_checkpoints(out) -> None:
    """Before ``--resume``: every checkpoint in ``<out>.partial/checkpoints`` must read back whole
    (a truncated or garbage file is refused with its path, rather than failing mid-run)."""
    import json
    import zipfile

    import numpy as np

    from ptycore.errors import InvalidData
    from ptycore.store import partial_path

    for ckpt in sorted((partial_path(out) / "checkpoints").glob("*.npz")):
        if ".tmp" in ckpt.suffixes:
            continue
        try:
            with np.load(ckpt, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                int(meta["iteration"])
                for key in f.files:
                    f[key]  # reading each member checks its zip CRC
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            reason = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
            raise InvalidData(f"{ckpt}: checkpoint is damaged ({reason}); delete it to restart stage "
                              f"{ckpt.stem!r} from its start, or run without --resume") from None


def run(args) -> int:
    from ptycore.distributed import initialize
    from ptycore.errors import InvalidArgument

    if args.devices is not None and args.devices != "all" and not args.devices.isdigit():
        raise InvalidArgument(f"--devices must be a number or 'all', got {args.devices!r}")
    initialize()  # several processes (srun, mpirun, ptycore launch): connect them before JAX computes
    from ptycore.recon.reconstruct import reconstruct

    if args.max_memory_gb is not None and not args.max_memory_gb > 0:
        raise InvalidArgument(f"--max-memory-gb must be > 0, got {args.max_memory_gb}")
    if args.restart_stale and not args.resume:
        raise InvalidArgument("--restart-stale only applies with --resume")
    if args.resume and not args.restart_stale:
        check_checkpoints(args.out)

    from ptycore.commands.plans import plan_path
    from ptycore.distributed import is_writer

    out = reconstruct(plan_path=plan_path(args.plan), data_path=args.data, init_path=args.init, out_path=args.out,
                      stage=args.stage, resume=args.resume, restart_stale=args.restart_stale,
                      overwrite=args.overwrite, seed=args.seed,
                      progress=not args.quiet, max_memory_gb=args.max_memory_gb, devices=args.devices,
                      **({"on_warning": None} if args.quiet else {}))
    if not is_writer():
        return 0
    if out.already_complete:
        print(f"{Path(out.path)} is already complete (same plan and inputs); nothing to resume")
    else:
        print(f"wrote {Path(out.path)}")
    return 0
