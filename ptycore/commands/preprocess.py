"""``ptycore preprocess``: data.zarr → prepared.zarr (crop, bin, pad, resample, noise, ... in a fixed order)."""

from __future__ import annotations

HELP = ("crop / bin / resample / pad the detector, crop or halve the scan, inject dose noise: "
        "data.zarr → prepared.zarr")


def add_arguments(p):
    p.add_argument("--data", required=True, help="data.zarr from 'ptycore ingest'")
    p.add_argument("--config", help="preprocess YAML (see config/preprocess/); default: only clip negative values")
    p.add_argument("--half", type=int, metavar="{1,2}",
                   help="keep every other scan column (1: columns 0, 2, ...; 2: columns 1, 3, ...) for the Fourier "
                        "ring correlation of two half-data reconstructions; the other steps see the whole scan, so "
                        "the two halves split its prepared data exactly, in one object frame (overrides 'half:' "
                        "in the config)")
    p.add_argument("--out", required=True, help="output store (zarr v3), written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args) -> int:
    import sys

    from ptycore.data.preprocess import preprocess

    summary = preprocess(args.data, args.config, args.out, overwrite=args.overwrite,
                         progress=sys.stderr.isatty() and not args.quiet, half=args.half)
    if not args.quiet:
        n = summary["detector_shape"][0]
        print(f"wrote {summary['out']}: {summary['n_pos']} patterns of {n}x{n}, detector pixel "
              f"{summary['detector_pixel_mrad']:.4g} mrad, real-space pixel {summary['pixel_size_A']:.4g} Å; "
              f"steps: {', '.join(summary['steps']) or 'none'}")
    return 0
