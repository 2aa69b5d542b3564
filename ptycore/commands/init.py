"""``ptycore init``: prepared.zarr → init.zarr (probe, object, positions, tilts, slice thickness)."""

from __future__ import annotations

HELP = "initial state (probe from aberrations or vacuum, object, positions, tilts): prepared.zarr → init.zarr"


def add_arguments(p):
    p.add_argument("--data", required=True, help="prepared.zarr from 'ptycore preprocess'")
    p.add_argument("--config", help="init YAML (see config/init/); default: aperture probe, 1 mode, 1 slice")
    p.add_argument("--out", required=True, help="output store (zarr v3, the result-store layout), written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--quiet", action="store_true", help="no summary, no physics warnings")


def run(args) -> int:
    import sys

    from ptycore.data.initialize import initialize

    summary = initialize(args.data, args.config, args.out, overwrite=args.overwrite)
    for line in [] if args.quiet else summary["warnings"]:
        print(f"ptycore init: warning: {line}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {summary['out']}: object {summary['object_shape']}, probe {summary['probe_shape']} of "
              f"{summary['mean_counts']:.4g} counts, pixel {summary['pixel_size_A']:.4g} Å, slice "
              f"{summary['slice_thickness_A']:.4g} Å")
    return 0
