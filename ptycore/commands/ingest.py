"""``ptycore ingest``: raw patterns + acquisition metadata → data.zarr (validated, oriented, checksummed)."""

from __future__ import annotations

HELP = ("read raw patterns (Merlin .mib, Gatan .dm3/.dm4, EMPAD, Dectris Arina, EMD/py4DSTEM, MRC, HDF5, "
        ".npy/.npz, .mat, zarr) and their metadata into data.zarr")


def add_arguments(p):
    p.add_argument("--patterns", required=True, metavar="FILE[:DATASET]",
                   help="pattern file, with the dataset path inside it where the file holds several arrays "
                        "(e.g. scan.h5:/entry/data); (scan_y, scan_x, ky, kx) or (n_pos, ky, kx), other axis "
                        "orders by pattern_axes in the metadata")
    p.add_argument("--meta", help="acquisition metadata YAML (energy_kv, convergence_mrad, ...); its keys override "
                                  "the pattern file's header and fill what the header lacks (default: the header "
                                  "alone)")
    p.add_argument("--out", required=True, help="output store (zarr v3), written atomically")
    p.add_argument("--max-memory-mb", type=float, default=1024,
                   help="working memory for pattern chunks in MB; sets the chunk size (default 1024)")
    p.add_argument("--chunk-patterns", type=int, help="patterns per chunk (default: from --max-memory-mb, <= 256)")
    p.add_argument("--negative-tolerance", type=float,
                   help="reject a frame with a value below -TOL (data units); default: below "
                        "-max(1, 5%% of the frame's maximum)")
    p.add_argument("--workers", type=int, default=2, help="threads reading and writing chunks (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args) -> int:
    import sys

    from ptycore.data.ingest import ingest

    summary = ingest(args.patterns, args.meta, args.out, overwrite=args.overwrite, max_memory_mb=args.max_memory_mb,
                     chunk_patterns=args.chunk_patterns, negative_tolerance=args.negative_tolerance,
                     workers=args.workers, progress=sys.stderr.isatty() and not args.quiet)
    if not args.quiet:
        ky, kx = summary["detector_shape"]
        print(f"wrote {summary['out']}: {summary['n_pos']} patterns of {ky}x{kx}, "
              f"mean {summary['mean_counts']:.4g} counts per pattern"
              + (f", {summary['bad_pixels']} detector pixels masked" if summary["bad_pixels"] else ""))
    return 0
