"""PNG figures of a reconstruction and of a set of evaluations (matplotlib, Agg, no pyplot state).

Every function writes one PNG and returns its path. Images are shown in (y, x) with y down, as
stored; lengths on axes and scale bars are in Å.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Ellipse, Rectangle
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from ptycore.metrics import NON_LOSS_TERMS

DPI = 110


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def nice_length(target: float) -> float:
    """The largest of 1, 2, 5 × 10^n not above ``target`` (> 0)."""
    if not target > 0:
        return 1.0
    exponent = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exponent <= target:
            return m * 10**exponent
    return 10**exponent


def _fmt_A(length: float) -> str:
    return f"{length:g} Å"


def add_scale_bar(ax, pixel_size_A: float, width_px: int, color: str = "white") -> None:
    """A bar of a round length (about a fifth of the image width) in the lower left corner."""
    length = nice_length(0.2 * width_px * pixel_size_A)
    bar = AnchoredSizeBar(ax.transData, length / pixel_size_A, _fmt_A(length), "lower left", pad=0.4,
                          color=color, frameon=False, size_vertical=max(width_px / 80, 0.6),
                          fontproperties=FontProperties(family="sans-serif", size=9, weight="bold"))
    ax.add_artist(bar)


def _image(ax, image, pixel_size_A, *, cmap="gray", title=None, vmin=None, vmax=None, bar=True, colorbar=None,
           label="rad"):
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if bar:
        color = {"gray": "yellow", "RdBu_r": "black", "twilight": "black"}.get(cmap, "white")
        add_scale_bar(ax, pixel_size_A, image.shape[1], color=color)
    if colorbar is not None:
        cb = colorbar.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label(label, fontsize=9)
        cb.ax.tick_params(labelsize=8)
    return im


def _robust_limits(image, lo=0.5, hi=99.5):
    finite = np.asarray(image)[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(finite, [lo, hi])
    return (float(vmin), float(vmax)) if vmax > vmin else (float(vmin) - 0.5, float(vmin) + 0.5)


# ---------------------------------------------------------------- one reconstruction
def phase_figure(path, phase, pixel_size_A: float, *, title="Depth-summed phase", box=None, label="rad") -> Path:
    """Phase image with a scale bar; ``box`` = (y0, x0, h, w) pixels outlines the evaluated area.

    The grey scale spans the 0.5-99.5 percentiles inside the box (the unscanned border of an
    object is unconstrained and would otherwise take the whole range)."""
    h, w = phase.shape
    region = phase if box is None else phase[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
    vmin, vmax = _robust_limits(region)
    fig = Figure(layout="constrained", figsize=(5.2, 5.2 * h / w + 0.4))
    ax = fig.add_subplot()
    _image(ax, phase, pixel_size_A, title=title, colorbar=fig, label=label, vmin=vmin, vmax=vmax)
    if box is not None:
        y0, x0, bh, bw = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), bw, bh, fill=False, ec="cyan", lw=1.2, ls="--"))
        ax.text(x0, y0 - 1, "scanned area", color="cyan", fontsize=8, va="bottom")
    return _save(fig, path)


def comparison_figure(path, result, truth, pixel_size_A: float, *, ssim=None, psnr=None, title="") -> Path:
    """Aligned reconstruction, truth and their difference (offset removed) on one grid."""
    r = result - result.mean()
    t = truth - truth.mean()
    vmin, vmax = _robust_limits(np.concatenate([r.ravel(), t.ravel()]))
    d = r - t
    dl = max(abs(v) for v in _robust_limits(d)) or 1.0
    fig = Figure(layout="constrained", figsize=(12, 3.6 * r.shape[0] / r.shape[1] + 0.8))
    axes = fig.subplots(1, 3)
    im = _image(axes[0], r, pixel_size_A, title="reconstruction", vmin=vmin, vmax=vmax)
    _image(axes[1], t, pixel_size_A, title="truth (resampled, registered)", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=axes[:2], fraction=0.046, pad=0.02).set_label("rad (offset removed)", fontsize=9)
    _image(axes[2], d, pixel_size_A, title="difference", cmap="RdBu_r", vmin=-dl, vmax=dl, colorbar=fig)
    parts = [title] if title else []
    if ssim is not None:
        parts.append(f"SSIM {ssim:.3f}")
    if psnr is not None:
        parts.append(f"PSNR {psnr:.1f} dB")
    if parts:
        fig.suptitle(", ".join(parts), fontsize=11)
    return _save(fig, path)


def montage_figure(path, images, pixel_size_A: float, *, title: str, labels: Sequence[str], cmap="gray",
                   label="rad", shared=True) -> Path:
    """Images side by side (at most 4 per row), one scale bar on the first."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    h, w = images[0].shape
    fig = Figure(layout="constrained", figsize=(3.1 * cols + 0.6, 3.1 * rows * h / w + 0.7))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    vmin, vmax = _robust_limits(np.stack(images)) if shared else (None, None)
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_visible(False)
            continue
        im = _image(ax, images[i], pixel_size_A, cmap=cmap, title=labels[i], vmin=vmin, vmax=vmax, bar=(i == 0))
    if shared:
        cb = fig.colorbar(im, ax=list(axes[:n]), fraction=0.025, pad=0.02)
        cb.set_label(label, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def probe_figure(path, probe, pixel_size_A: float, powers: Sequence[float] | None = None) -> Path:
    """Amplitude (top) and phase (bottom, where the amplitude exceeds 5 % of its peak) of each mode."""
    probe = np.asarray(probe)
    n = probe.shape[0]
    if powers is None:
        p = np.sum(np.abs(probe) ** 2, axis=(-2, -1))
        powers = p / p.sum()
    fig = Figure(layout="constrained", figsize=(2.9 * n + 1.0, 6.0))
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for m in range(n):
        amp = np.abs(probe[m])
        phase = np.angle(probe[m])
        phase = np.where(amp > 0.05 * amp.max(), phase, np.nan)
        _image(axes[0, m], amp, pixel_size_A, cmap="magma", title=f"mode {m}: {100 * powers[m]:.1f} %",
               bar=(m == 0), colorbar=fig if m == n - 1 else None, label="|probe|")
        _image(axes[1, m], phase, pixel_size_A, cmap="twilight", vmin=-np.pi, vmax=np.pi, bar=False,
               colorbar=fig if m == n - 1 else None, label="phase (rad)")
    axes[0, 0].set_ylabel("amplitude")
    axes[1, 0].set_ylabel("phase")
    fig.suptitle("Probe modes (power fraction in titles)", fontsize=11)
    return _save(fig, path)


def spectrum_figure(path, image, pixel_size_A: float, info) -> Path:
    """log10 power spectrum of the phase with the information-limit ring, and its radial average."""
    from ptycore.metrics import power_spectrum_2d

    spec2d = np.log10(power_spectrum_2d(image) + 1e-30)
    h, w = spec2d.shape
    fig = Figure(layout="constrained", figsize=(11, 4.6))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    kn = 0.5 / pixel_size_A
    dky, dkx = 1 / (h * pixel_size_A), 1 / (w * pixel_size_A)
    # pixel edges of the fftshift order (frequency (i - N//2) dk at index i), y down like the image
    extent = [(-(w // 2) - 0.5) * dkx, (w - 1 - w // 2 + 0.5) * dkx,
              (h - 1 - h // 2 + 0.5) * dky, (-(h // 2) - 0.5) * dky]
    vmin, vmax = np.percentile(spec2d, [5, 99.9])
    im = ax0.imshow(spec2d, cmap="inferno", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    k = info.k_limit_invA
    ax0.add_patch(Ellipse((0, 0), 2 * k, 2 * k, fill=False, ec="cyan", lw=1.2, ls="--"))
    ax0.text(0.02, 0.02, f"information limit {info.limit_A:.2f} Å", color="cyan", fontsize=9,
             transform=ax0.transAxes)
    ax0.set_xlabel("k_x (1/Å)")
    ax0.set_ylabel("k_y (1/Å)")
    ax0.set_title("log10 power spectrum of the phase (Hann window)", fontsize=10)
    fig.colorbar(im, ax=ax0, fraction=0.046, pad=0.03)
    s = info.spectrum
    ax1.semilogy(s.k_invA[1:], s.power[1:], color="k", lw=1.2, label="ring average")
    ax1.axhline(info.floor, color="tab:gray", ls=":", label="noise floor")
    ax1.axhline(info.threshold, color="tab:orange", ls="--", label="threshold (2 × floor)")
    ax1.axvline(k, color="tab:cyan", ls="--", label=f"limit {info.limit_A:.2f} Å")
    ax1.axvspan(0.9 * kn, kn, color="tab:gray", alpha=0.15, label="floor band")
    ax1.set_xlabel("spatial frequency k (1/Å)")
    ax1.set_ylabel("power")
    ax1.set_xlim(0, kn)
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    _distance_axis(ax1, kn)
    return _save(fig, path)


def _distance_axis(ax, k_max: float) -> None:
    """A top axis in Å (1/k) over a spatial-frequency axis."""
    secondary = ax.secondary_xaxis("top", functions=(lambda x: 1 / np.maximum(x, 1e-6),
                                                     lambda d: 1 / np.maximum(d, 1e-6)))
    candidates = (5, 2, 1.5, 1, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
    ticks = [t for t in candidates if 1 / t <= k_max * 1.0001]
    while len(ticks) > 8:
        ticks = ticks[::2]
    secondary.set_xticks(ticks)
    secondary.set_xticklabels([f"{t:g}" for t in ticks])
    secondary.set_xlabel("distance 1/k (Å)")


def loss_figure(path, history: Mapping[str, np.ndarray], stage_names: Sequence[str] = ()) -> Path:
    """Each loss term per iteration (log y), validation included; stage boundaries dashed."""
    fig = Figure(layout="constrained", figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    plotted = 0
    for term, values in sorted(history.items()):
        values = np.asarray(values, np.float64)
        if term in NON_LOSS_TERMS or values.ndim != 1:
            continue
        ok = np.isfinite(values) & (values > 0)
        if not ok.any():
            continue
        it = np.arange(len(values))
        style = {"ls": "--", "lw": 1.8, "color": "k"} if term == "validation" else {"lw": 1.4}
        ax.semilogy(it[ok], values[ok], label=term, **style)
        plotted += 1
    stage = history.get("stage")
    if stage is not None and len(stage):
        stage = np.asarray(stage)
        starts = np.nonzero(np.diff(stage))[0] + 1
        for s in starts:
            ax.axvline(s - 0.5, color="tab:gray", ls=":", lw=1)
        for s0 in np.concatenate([[0], starts]).astype(int):
            idx = int(stage[s0])
            name = stage_names[idx] if idx < len(stage_names) else f"stage {idx}"
            ax.text(s0, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom",
                    color="tab:gray")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss history", transform=ax.transAxes, ha="center")
    return _save(fig, path)


def positions_figure(path, initial_A, final_A) -> Path:
    """Position corrections (final minus initial) as arrows, exaggerated to be visible."""
    initial_A = np.asarray(initial_A, np.float64)
    final_A = np.asarray(final_A, np.float64)
    delta = final_A - initial_A
    mag = np.hypot(delta[:, 0], delta[:, 1])
    span = max(np.ptp(initial_A[:, 0]), np.ptp(initial_A[:, 1]), 1e-6)
    n_side = max(1.0, math.sqrt(len(initial_A)))
    key = nice_length(float(np.percentile(mag, 90))) if mag.max() > 0 else 0.01
    scale = key / (0.8 * span / n_side)  # key arrow length ~ 0.8 of the grid step
    fig = Figure(layout="constrained", figsize=(6.4, 5.6))
    ax = fig.add_subplot()
    q = ax.quiver(initial_A[:, 1], initial_A[:, 0], delta[:, 1], -delta[:, 0], mag, cmap="viridis",
                  angles="xy", scale_units="xy", scale=scale, width=0.004)
    ax.plot(initial_A[:, 1], initial_A[:, 0], ".", color="0.55", ms=2.5, zorder=0)
    ax.quiverkey(q, 0.82, 1.03, key, f"{key:g} Å", labelpos="E", coordinates="axes")
    pad = 1.5 * span / n_side
    ax.set_xlim(initial_A[:, 1].min() - pad, initial_A[:, 1].max() + pad)
    ax.set_ylim(initial_A[:, 0].max() + pad, initial_A[:, 0].min() - pad)  # y down, as in the images
    ax.set_aspect("equal")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    cb = fig.colorbar(q, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("|correction| (Å)")
    ax.set_title(f"Position corrections: RMS {np.sqrt(np.mean(mag ** 2)):.3f} Å, max {mag.max():.3f} Å",
                 fontsize=10, loc="left")
    return _save(fig, path)


def frc_figure(path, frc) -> Path:
    fig = Figure(layout="constrained", figsize=(7, 4.3))
    ax = fig.add_subplot()
    ax.plot(frc.k_invA[1:], frc.frc[1:], color="k", lw=1.4, label="FRC")
    ax.axhline(frc.threshold, color="tab:orange", ls="--", label="1/7 threshold")
    label = f"resolution {frc.resolution_A:.2f} Å" + (" (Nyquist)" if frc.reached_nyquist else "")
    ax.axvline(frc.k_resolution_invA, color="tab:cyan", ls="--", label=label)
    ax.set_xlabel("spatial frequency k (1/Å)")
    ax.set_ylabel("Fourier ring correlation")
    ax.set_ylim(-0.2, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_xlim(0, frc.k_invA[-1])
    _distance_axis(ax, frc.k_invA[-1])
    ax.set_title("Fourier ring correlation of the two half reconstructions", fontsize=10, loc="left")
    return _save(fig, path)


# ---------------------------------------------------------------- across evaluations
def bar_figure(path, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str,
               failed: Sequence[bool] | None = None) -> Path:
    """One bar per run; failed or missing values are marked with a red cross."""
    n = len(labels)
    fig = Figure(layout="constrained", figsize=(max(6.5, 0.6 * n + 3.5), 4.4))
    ax = fig.add_subplot()
    x = np.arange(n)
    vals = np.asarray([np.nan if v is None else v for v in values], np.float64)
    ok = np.isfinite(vals)
    bars = ax.bar(x[ok], vals[ok], color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.4g}" for v in vals[ok]], fontsize=8, padding=2)
    bad = ~ok if failed is None else (~ok | np.asarray(failed, bool))
    ymin = 0.0 if not ok.any() else min(0.0, float(np.nanmin(vals)))
    ax.plot(x[bad], np.full(bad.sum(), ymin), "x", color="tab:red", ms=10, mew=2,
            label="failed / not available" if bad.any() else None)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if bad.any():
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.12)
    return _save(fig, path)


def study_figure(path, factor: str, series: Mapping[str, tuple[Sequence, Sequence[float]]], *, metric: str,
                 title: str, log_x: bool = False) -> Path:
    """``metric`` against the study's factor, one line per dataset: series = {label: (x, y)}."""
    fig = Figure(layout="constrained", figsize=(7, 4.6))
    ax = fig.add_subplot()
    categorical = any(not isinstance(v, int | float) for xs, _ in series.values() for v in xs)
    categories = []
    if categorical:
        for xs, _ in series.values():
            for v in xs:
                if str(v) not in categories:
                    categories.append(str(v))
    for label, (xs, ys) in series.items():
        xv = [categories.index(str(v)) for v in xs] if categorical else list(xs)
        order = np.argsort(xv)
        ax.plot(np.asarray(xv)[order], np.asarray(ys, np.float64)[order], "o-", label=label)
    if categorical:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=30, ha="right")
    elif log_x:
        ax.set_xscale("log")
    ax.set_xlabel(factor)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
