"""``ptycore simulate``: a 4D-STEM dataset of a crystal from abTEM, in the ingest format, with its truth.

Writes ``OUT/patterns.h5`` (dataset ``patterns``, (scan_y, scan_x, ky, kx) float32, zero frequency
at index N//2), ``OUT/meta.yaml`` (acquisition metadata) and ``OUT/truth.zarr`` (object phase per
slice, its depth sum, the probe, positions, pixel size, origin and provenance). See
:mod:`ptycore.data.simulate` for the geometry and frames.
"""

from __future__ import annotations

import math
from pathlib import Path

HELP = "simulate a 4D-STEM dataset of a crystal with abTEM (patterns.h5 + meta.yaml + truth.zarr)"


def add_arguments(p):
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--crystal", default="SrTiO3", help="crystal, viewed along [001] (SrTiO3, Si; default SrTiO3)")
    p.add_argument("--cells-z", type=int, default=1, help="thickness in unit cells along the beam (default 1)")
    p.add_argument("--energy-kv", type=float, default=300.0, help="beam energy in kV (default 300)")
    p.add_argument("--convergence-mrad", type=float, default=21.4, help="probe semi-angle in mrad (default 21.4)")
    p.add_argument("--defocus-A", type=float, default=150.0,
                   help="defocus in Å, = -C10, abTEM's sign: positive = underfocus (default 150)")
    p.add_argument("--C30-A", type=float, default=0.0, help="spherical aberration C30 in Å (default 0)")
    p.add_argument("--scan-shape", type=int, nargs=2, default=[16, 16], metavar=("NY", "NX"),
                   help="probe positions (default 16 16)")
    p.add_argument("--scan-step-A", type=float, nargs="+", default=[0.4], metavar="STEP",
                   help="scan step in Å: one value, or DY DX (default 0.4)")
    p.add_argument("--detector-px", type=int, default=64, help="detector pixels per side (default 64)")
    p.add_argument("--detector-pixel-mrad", type=float, default=1.25,
                   help="requested angular size of one detector pixel; the achieved value makes the periodic "
                        "window a whole number of unit cells and is what meta.yaml records (default 1.25)")
    p.add_argument("--dose", type=float, default=1e6, help="dose in e/Å² (> 0; default 1e6)")
    p.add_argument("--no-noise", action="store_true", help="write expected counts (no Poisson noise)")
    p.add_argument("--truth-slice-A", type=float, help="slice thickness of the truth object in Å "
                   "(default: one slice per unit cell)")
    p.add_argument("--sim-slice-A", type=float, help="multislice slice thickness in Å (default: half a unit cell)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson noise (default 0)")
    p.add_argument("--tilt-mrad", type=float, nargs=2, default=[0.0, 0.0], metavar=("TY", "TX"),
                   help="crystal mistilt in mrad, ptycore's tilt convention (default 0 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from ptycore.data.simulate import SimulationParams, plan_geometry, simulate, write_dataset
    from ptycore.errors import InvalidArgument
    from ptycore.store import partial_path, refuse_existing

    if len(args.scan_step_A) not in (1, 2):
        raise InvalidArgument(f"--scan-step-A takes one value or DY DX, got {len(args.scan_step_A)} values")
    step = tuple(args.scan_step_A) * (2 // len(args.scan_step_A))
    params = SimulationParams(
        crystal=args.crystal, cells_z=args.cells_z, energy_kv=args.energy_kv,
        convergence_mrad=args.convergence_mrad, defocus_A=args.defocus_A, C30_A=args.C30_A,
        scan_shape=tuple(args.scan_shape), scan_step_A=step, detector_px=args.detector_px,
        detector_pixel_mrad=args.detector_pixel_mrad, dose_e_per_A2=args.dose, noise=not args.no_noise,
        truth_slice_A=args.truth_slice_A, sim_slice_A=args.sim_slice_A, seed=args.seed,
        tilt_mrad=tuple(args.tilt_mrad),
    )
    geometry = plan_geometry(params)  # validates every option before any compute
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    if partial_path(out).exists() and not partial_path(out).is_dir():
        raise InvalidArgument(f"{partial_path(out)}: is in the way (a file, not a directory)")

    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"simulate: {msg}", flush=True))
    for note in geometry.notes:
        print(f"simulate: note: {note}", flush=True)
    say(f"{params.crystal} [001], {geometry.tiles}x{geometry.tiles}x{params.cells_z} cells, window "
        f"{geometry.window_A:.4g} Å, detector {params.detector_px} px of {geometry.detector_pixel_mrad:.4g} mrad, "
        f"pixel {geometry.pixel_size_A:.4g} Å")
    dataset = simulate(params, geometry, progress=say)
    write_dataset(dataset, out, overwrite=args.overwrite)
    per_position = params.dose_e_per_A2 * step[0] * step[1]
    frac = dataset.detector_fraction
    say(f"{math.prod(params.scan_shape)} patterns of {per_position:.4g} e each; detector caught "
        f"{100 * frac[0]:.2f}-{100 * frac[2]:.2f} % of the beam before normalisation; {dataset.seconds:.1f} s")
    print(f"wrote {out}")
    return 0
