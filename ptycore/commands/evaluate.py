"""``ptycore evaluate``: metrics, figures and an HTML report of one reconstruction.

Writes ``OUT/metrics.json`` (schema in :mod:`ptycore.evaluate`), ``OUT/report.html`` (self-contained)
and the figures (PNG), atomically. With ``--truth`` the depth-summed and per-slice phase are
compared with the ground truth after resampling, registration and offset removal.
"""

from __future__ import annotations

HELP = "evaluate a reconstruction: metrics.json, figures and report.html (against the truth if given)"


def add_arguments(p):
    p.add_argument("--result", required=True, help="result store from 'ptycore reconstruct' (any store with "
                   "object_phase and pixel_size_A)")
    p.add_argument("--truth", help="truth store (truth.zarr from 'ptycore simulate') to compare with")
    p.add_argument("--out", required=True, help="evaluation directory to write (metrics.json, report.html, PNGs)")
    p.add_argument("--init", help="init store: position corrections are measured from its positions (quiver plot)")
    p.add_argument("--half1", help="first of two independent half reconstructions, for the FRC resolution")
    p.add_argument("--half2", help="second half reconstruction (with --half1)")
    p.add_argument("--dataset", help="dataset name in metrics.json (default: from the provenance or the data "
                   "store's directory)")
    p.add_argument("--plan", help="plan name in metrics.json (default: the plan in the provenance)")
    p.add_argument("--margin-A", type=float, default=0.5,
                   help="margin in Å removed inside the scanned area before comparing (default 0.5)")
    p.add_argument("--no-figures", action="store_true", help="metrics and report only, no PNG figures")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--data-only", help="a data-only result of the same data (same object grid): report how far "
                   "this (prior) result moved from it and both held-out losses (metrics prior_check)")


def run(args) -> int:
    from ptycore.evaluate import evaluate

    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"evaluate: {msg}", flush=True))
    m = evaluate(args.result, args.out, truth=args.truth, init=args.init, half1=args.half1, half2=args.half2,
                 dataset=args.dataset, plan=args.plan, margin_A=args.margin_A, figures=not args.no_figures,
                 overwrite=args.overwrite, progress=say, data_only=args.data_only)
    summary = [f"{m['dataset']} / {m['plan']}"]
    if m.get("ssim_phase_sum") is not None:
        summary.append(f"SSIM {m['ssim_phase_sum']:.4f}, PSNR {m['psnr_phase_sum']:.2f} dB")
    if m.get("information_limit_A") is not None:
        summary.append(f"information limit {m['information_limit_A']:.3g} Å")
    if m.get("frc_resolution_A") is not None:
        summary.append(f"FRC {m['frc_resolution_A']:.3g} Å")
    if m.get("final_loss") is not None:
        summary.append(f"final {m['data_fit_term']} loss {m['final_loss']:.4g}")
    check = m.get("prior_check")
    if check:
        summary.append(f"prior moved the phase by {check['rms_phase_difference_rad']:.3g} rad RMS "
                       f"(SSIM {check['ssim_phase_sum']:.3f} to the data-only result)")
    if not args.quiet:
        print("evaluate: " + "; ".join(summary))
    print(f"wrote {args.out}")
    return 0
