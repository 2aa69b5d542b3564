"""``ptycore prior data|train|show``: the learned crystal prior's training data, its training, its info.

* ``ptycore prior data --config config/prior/default.yaml --out DIR``: per-slice phase patches of
  many simulated crystals (no perovskites), a manifest and a held-out split, as one zarr v3 store
  (:mod:`ptycore.prior.data`).
* ``ptycore prior train --data DIR --out PRIOR [--config ...] [--steps N] [--resume]``: the
  noise-conditioned U-Net denoiser, checkpointed and resumable, its training curves and held-out
  table (:mod:`ptycore.prior.train`). PRIOR is a directory holding ``prior.eqx`` + ``prior.json``.
* ``ptycore prior show [PRIOR]``: a prior's info and held-out table (default: the shipped prior).
"""

from __future__ import annotations

HELP = "the learned crystal prior: make its training data (data), train it (train), show a prior (show)"


def add_arguments(p):
    sub = p.add_subparsers(dest="prior_command", metavar="COMMAND", required=True)
    d = sub.add_parser("data", help="simulate the training patches (zarr store with manifest and held-out split)",
                       description="simulate the training patches: per-slice phases of many crystals with abTEM "
                                   "(perovskites excluded), a manifest and a held-out split by compound")
    d.add_argument("--config", help="prior config YAML (its 'data' section; default: built-in defaults, "
                                    "= config/prior/default.yaml)")
    d.add_argument("--out", required=True, help="output zarr store (written atomically)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output")
    d.add_argument("--quiet", action="store_true", help="no progress output")

    t = sub.add_parser("train", help="train the denoiser on a data store (checkpointed, --resume)",
                       description="train the noise-conditioned denoiser on a store from 'ptycore prior data'")
    t.add_argument("--data", required=True, help="training data store from 'ptycore prior data'")
    t.add_argument("--out", required=True, help="output directory: prior.eqx, prior.json, curves.json, curves.png")
    t.add_argument("--config", help="prior config YAML (its 'train' section; default: built-in defaults)")
    t.add_argument("--steps", type=int, help="optimiser steps (overrides train.steps)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.partial/checkpoints")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t.add_argument("--no-figures", action="store_true", help="do not draw curves.png")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    s = sub.add_parser("show", help="print a prior's info and held-out table (default: the shipped prior)",
                       description="print a prior's info and held-out table")
    s.add_argument("prior", nargs="?", default="shipped",
                   help="NAME.eqx, NAME.json, a directory with prior.eqx, or 'shipped' (default)")


def _data(args) -> int:
    from ptycore.prior.data import write_dataset
    from ptycore.prior.train import load_prior_config
    from ptycore.store import refuse_existing

    cfg = load_prior_config(args.config).data
    refuse_existing(args.out, args.overwrite)
    summary = write_dataset(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet,
                            config_source=args.config)
    if not args.quiet:
        print(f"prior data: {summary['structures']} structures, {summary['patches']} patches "
              f"({summary['heldout_patches']} held out: {', '.join(summary['heldout_compounds'])}), "
              f"RMS phase {summary['phase_rms_rad']:.4g} rad, {summary['seconds']:.1f} s")
    print(f"wrote {args.out}")
    return 0


def _train(args) -> int:
    from ptycore.errors import InvalidArgument
    from ptycore.prior.data import read_dataset
    from ptycore.prior.train import load_prior_config, train
    from ptycore.store import refuse_existing

    cfg = load_prior_config(args.config).train
    if args.steps is not None:
        if args.steps < 1:
            raise InvalidArgument(f"--steps must be >= 1, got {args.steps}")
        cfg = cfg.model_copy(update={"steps": args.steps})
    refuse_existing(args.out, args.overwrite)
    read_dataset(args.data)  # a missing or foreign store is refused before anything is written
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    summary = train(args.data, args.out, cfg, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.quiet, log=say, figures=not args.no_figures)
    say(f"prior train: {summary['parameters']} parameters, {summary['seconds']:.0f} s")
    print(f"wrote {args.out}")
    return 0


def held_out_lines(info) -> list[str]:
    table = info.provenance.get("heldout") or []
    lines = [f"{'sigma (rad)':>12} {'MSE denoiser':>14} {'MSE identity':>14} {'ratio':>7}"]
    for row in table:
        lines.append(f"{row['sigma_rad']:12.4g} {row['mse_denoiser_rad2']:14.4g} {row['mse_identity_rad2']:14.4g} "
                     f"{row['ratio']:7.3f}")
    return lines


def _show(args) -> int:
    from ptycore.prior.model import load_prior

    _, info = load_prior(args.prior)
    prov = info.provenance
    print(f"prior: {args.prior}")
    print(f"  grid: pixel {info.pixel_size_A} Å, slice {info.slice_thickness_A} Å, patches {info.patch_px}², "
          f"{info.energy_kv:g} kV")
    print(f"  noise: sigma {info.sigma_min_rad:.4g}-{info.sigma_max_rad:.4g} rad (phase scale "
          f"{info.phase_scale_rad:.4g} rad)")
    print(f"  network: U-Net levels={info.levels} filters={info.filters}, {info.parameters} parameters")
    if prov:
        print(f"  trained: {prov.get('steps')} steps in {prov.get('training_seconds')} s, seeds {prov.get('seeds')}, "
              f"data manifest {str(prov.get('data_manifest_hash'))[:19]}")
        held = prov.get("heldout_compounds")
        if held:
            print(f"  held-out compounds: {', '.join(held)}")
        print("  held-out table:")
        for line in held_out_lines(info):
            print("    " + line)
        srtio3 = prov.get("srtio3")
        if srtio3:
            print("  SrTiO3 (perovskite, never seen):")
            for row in srtio3:
                print(f"    {row['sigma_rad']:12.4g} {row['mse_denoiser_rad2']:14.4g} "
                      f"{row['mse_identity_rad2']:14.4g} {row['ratio']:7.3f}")
    return 0


def run(args) -> int:
    return {"data": _data, "train": _train, "show": _show}[args.prior_command](args)
