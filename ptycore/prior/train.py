"""Training the crystal prior's denoiser: a denoising objective, AdamW, checkpoints and resume.

Objective. A clean training patch ``x`` (radians), a noise level ``sigma`` drawn log-uniformly in
``[sigma_min, sigma_max] = [sigma_min_factor, sigma_max_factor] x phase scale`` (the RMS phase of
the training patches; 0.01x to 1x by default: from a well-converged reconstruction's residual
noise to noise as strong as the object itself), the noisy patch ``y = x + sigma eps`` with
``eps ~ N(0, 1)``, and the loss ``|| (D(y, sigma) - x) / (c_out(sigma) s) ||^2`` averaged over
pixels and the batch (EDM's weighting: uniform in the network's own output, see
:mod:`ptycore.prior.model`). Its minimiser is the posterior mean E[x | y] at every sigma. Each
patch is put in a random one of the 8 orientations of the square (rotations by 90° and mirrors:
symmetries of a projected potential on a square grid).

Reproducible and resumable. The batch of step ``k`` (patches, orientations, sigmas, noise) is
drawn from ``numpy.random.default_rng([seed, k])``: it depends on the step only, so a run
resumed from a checkpoint draws exactly what the uninterrupted run would, and ends with the same
weights. Checkpoints (every ``checkpoint_every`` steps and at the end; weights + optimiser
state + history, written to a temporary file renamed into place) live in
``<out>.partial/checkpoints/`` while the run is unfinished; ``--resume`` continues from there.

Output directory (``ptycore prior train --out PRIOR``): ``prior.eqx`` + ``prior.json`` (the
denoiser and its :class:`~ptycore.prior.model.PriorInfo`, with the provenance: data config and
manifest hashes, seeds, steps, versions, the held-out table), ``curves.json`` (training loss per
step, held-out loss per noise level at every evaluation), ``curves.png``.

Held-out evaluation. On up to ``eval_patches`` patches of the held-out compounds (materials the
prior never sees), at each of ``sigma_bins`` noise levels log-spaced over the training range,
with fixed noise: the mean squared error of the denoiser against the truth, and of the identity
(the noisy patch itself; its MSE is sigma²). The denoiser earns its place where its MSE is
below the identity's at every level.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ptycore.errors import InvalidArgument, InvalidData
from ptycore.prior.data import PriorDataConfig


class PriorTrainConfig(BaseModel):
    """The ``train`` section of ``config/prior/default.yaml``."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, ge=0, description="weights initialisation and batch draws")
    steps: int = Field(default=1000, ge=1, description="optimiser steps")
    batch_size: int = Field(default=16, ge=1, le=4096)
    lr: float = Field(default=2e-3, gt=0, le=1.0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(default=100, ge=0, description="linear warm-up, then cosine decay to lr/100")
    weight_decay: float = Field(default=1e-4, ge=0, le=1.0)
    levels: int = Field(default=3, ge=1, le=6)
    filters: int = Field(default=16, ge=4, le=256)
    sigma_min_factor: float = Field(default=0.01, gt=0, description="sigma_min / phase scale")
    sigma_max_factor: float = Field(default=1.0, gt=0, description="sigma_max / phase scale")
    sigma_bins: int = Field(default=5, ge=1, le=20, description="noise levels of the held-out table")
    eval_patches: int = Field(default=128, ge=1, description="held-out patches per evaluation")
    eval_every: int = Field(default=250, ge=1, description="steps between held-out evaluations")
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    evaluate_srtio3: bool = Field(default=True, description="also the held-out table on SrTiO3 (never seen)")

    @model_validator(mode="after")
    def _sigma_range(self):
        if self.sigma_max_factor <= self.sigma_min_factor:
            raise ValueError(f"sigma_max_factor {self.sigma_max_factor} must be > sigma_min_factor "
                             f"{self.sigma_min_factor}")
        return self

    def hash(self) -> str:
        import hashlib

        return "sha256:" + hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class PriorConfig(BaseModel):
    """``config/prior/default.yaml``: a ``data`` section (:class:`~ptycore.prior.data.PriorDataConfig`)
    and a ``train`` section (:class:`PriorTrainConfig`)."""

    model_config = ConfigDict(extra="forbid")

    data: PriorDataConfig = Field(default_factory=PriorDataConfig)
    train: PriorTrainConfig = Field(default_factory=PriorTrainConfig)


def load_prior_config(path: str | Path | None) -> PriorConfig:
    """The validated config file (defaults for None); a bad file or value -> one line naming it."""
    from ptycore.data.preprocess import load_config

    return load_config(path, PriorConfig)


# ---------------------------------------------------------------- batches
def orient(patches: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each patch in one of the 8 orientations of the square (code 0..7: k·90° rotation, mirror if >= 4)."""
    out = np.empty_like(patches)
    for i, code in enumerate(codes):
        p = np.rot90(patches[i], int(code) % 4)
        out[i] = p[:, ::-1] if code >= 4 else p
    return out


def draw_batch(train: np.ndarray, step: int, cfg: PriorTrainConfig, sigma_range: tuple[float, float]):
    """(clean, sigma, noise) of step ``step``: a function of (seed, step) only (see the module docstring)."""
    rng = np.random.default_rng([cfg.seed, step])
    index = rng.integers(0, len(train), cfg.batch_size)
    clean = orient(train[index], rng.integers(0, 8, cfg.batch_size))
    lo, hi = sigma_range
    sigma = np.exp(rng.uniform(math.log(lo), math.log(hi), cfg.batch_size)).astype(np.float32)
    noise = rng.standard_normal(clean.shape, dtype=np.float32)
    return clean, sigma, noise


def sigma_levels(lo: float, hi: float, bins: int) -> np.ndarray:
    return np.geomspace(lo, hi, bins) if bins > 1 else np.asarray([math.sqrt(lo * hi)])


# ---------------------------------------------------------------- the compiled pieces
def _optimizer(cfg: PriorTrainConfig):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, max(cfg.steps - 1, 0)),
                                                  max(cfg.steps, cfg.warmup_steps + 1), cfg.lr / 100)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _compiled(static, optimizer):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def loss_fn(params, clean, sigma, noise):
        model = eqx.combine(params, static)
        noisy = clean + sigma[:, None, None] * noise
        estimate = jax.vmap(model)(noisy, sigma)
        s = sigma / model.phase_scale_rad
        c_out = s / jnp.sqrt(s**2 + 1.0) * model.phase_scale_rad
        return jnp.mean(((estimate - clean) / c_out[:, None, None]) ** 2)

    @jax.jit
    def step(params, opt_state, clean, sigma, noise):
        loss, grads = jax.value_and_grad(loss_fn)(params, clean, sigma, noise)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def denoise(params, noisy, sigma):
        return jax.vmap(eqx.combine(params, static))(noisy, sigma)

    return step, denoise


def heldout_table(denoise_fn, patches: np.ndarray, levels: np.ndarray, seed: int, chunk: int = 32) -> list[dict]:
    """Per noise level: MSE (rad²) of the denoiser and of the identity on ``patches`` (fixed noise)."""
    rows = []
    for k, sigma in enumerate(levels):
        rng = np.random.default_rng([seed, 7, k])
        noise = rng.standard_normal(patches.shape, dtype=np.float32)
        noisy = patches + np.float32(sigma) * noise
        sq_d = sq_i = 0.0
        for a in range(0, len(patches), chunk):
            est = np.asarray(denoise_fn(noisy[a : a + chunk], np.full(len(noisy[a : a + chunk]), sigma, np.float32)))
            sq_d += float(np.sum((est.astype(np.float64) - patches[a : a + chunk]) ** 2))
            sq_i += float(np.sum((noisy[a : a + chunk].astype(np.float64) - patches[a : a + chunk]) ** 2))
        n = patches.size
        rows.append({"sigma_rad": float(sigma), "mse_denoiser_rad2": sq_d / n, "mse_identity_rad2": sq_i / n,
                     "ratio": (sq_d / sq_i) if sq_i > 0 else float("nan")})
    return rows


def srtio3_table(denoise_fn, data_cfg: PriorDataConfig, levels: np.ndarray, seed: int) -> list[dict]:
    """The held-out table on SrTiO3 (a perovskite: never in the training data), rendered exactly as
    the training data of ``data_cfg``: [001], [011] and [111], 2 slices each, 4 patches per slice."""
    from ptycore.prior.data import evaluation_patches

    cfg = data_cfg.model_copy(update={"slices_per_structure": 2, "patches_per_slice": 4, "zone_axes": 3})
    return heldout_table(denoise_fn, evaluation_patches("SrTiO3", cfg, seed=seed), levels, seed)


# ---------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, params, opt_state, meta: dict) -> None:
    import equinox as eqx

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "last.eqx.tmp"
    eqx.tree_serialise_leaves(tmp, (params, opt_state))
    tmp_meta = path / "last.json.tmp"
    tmp_meta.write_text(json.dumps(meta))
    tmp.replace(path / "last.eqx")
    tmp_meta.replace(path / "last.json")


def _load_checkpoint(path: Path, like, expect: dict):
    import equinox as eqx

    weights, meta_file = path / "last.eqx", path / "last.json"
    if not (weights.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        state = eqx.tree_deserialise_leaves(weights, like)
    except Exception as err:  # a truncated or foreign file
        raise InvalidData(f"{weights}: checkpoint is damaged ({err.__class__.__name__}); remove it to start "
                          "again") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise InvalidData(f"{meta_file}: checkpoint is from another run ({key} differs); remove it or run "
                              "without --resume")
    return state, meta


# ---------------------------------------------------------------- the run
def train(data_path: str | Path, out: str | Path, cfg: PriorTrainConfig, *, resume: bool = False,
          overwrite: bool = False, progress: bool = False, log=print, figures: bool = True) -> dict:
    """Train a denoiser on the store ``data_path`` and write the prior directory ``out``."""
    import equinox as eqx
    import jax

    from ptycore.prior.data import read_dataset
    from ptycore.prior.model import Denoiser, PriorInfo, parameter_count, save_prior
    from ptycore.store import atomic_output, provenance, refuse_existing

    out = Path(out)
    refuse_existing(out, overwrite)
    data = read_dataset(data_path)
    attrs = data.attrs
    patch_px = int(data.patches.shape[-1])
    if patch_px % 2**cfg.levels:
        raise InvalidArgument(f"train.levels {cfg.levels}: patches of {patch_px} px are not a multiple of "
                              f"2**levels = {2**cfg.levels}")
    train_patches = data.patches[~data.heldout]
    held_patches = data.patches[data.heldout]
    if len(train_patches) == 0:
        raise InvalidData(f"{data_path}: no training patches (every compound is held out)")
    if len(held_patches) == 0:
        raise InvalidData(f"{data_path}: no held-out patches (data.heldout_fraction is 0): the held-out table "
                          "needs some")
    held_patches = held_patches[np.random.default_rng([cfg.seed, 3]).permutation(len(held_patches))[
        : cfg.eval_patches]]
    scale = float(attrs["phase_rms_rad"])
    sigma_range = (cfg.sigma_min_factor * scale, cfg.sigma_max_factor * scale)
    levels = sigma_levels(*sigma_range, cfg.sigma_bins)

    model = Denoiser(cfg.levels, cfg.filters, scale, key=jax.random.PRNGKey(cfg.seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = _optimizer(cfg)
    opt_state = optimizer.init(params)
    step_fn, denoise = _compiled(static, optimizer)
    expect = {"train_config_hash": cfg.hash(), "data_manifest_hash": attrs["manifest_hash"]}

    history = {"step": [], "loss": [], "eval_step": [], "heldout": [], "seconds": 0.0}
    start = 0
    with atomic_output(out, overwrite=overwrite, keep_partial_on_error=True) as tmp:
        ckpt = tmp / "checkpoints"
        if resume:
            loaded = _load_checkpoint(ckpt, (params, opt_state), expect)
            if loaded is not None:
                (params, opt_state), meta = loaded
                start, history = int(meta["step"]), meta["history"]
                log(f"prior train: resuming at step {start} of {cfg.steps}")
            else:
                log("prior train: no checkpoint to resume from, starting at step 0")
        elif ckpt.exists():
            for f in ckpt.iterdir():
                f.unlink()
        t0 = time.perf_counter() - float(history.get("seconds", 0.0))
        n_params = parameter_count(params)
        log(f"prior train: {n_params} parameters, {len(train_patches)} training / {len(held_patches)} held-out "
            f"patches of {patch_px}², sigma {sigma_range[0]:.3g}-{sigma_range[1]:.3g} rad, {cfg.steps} steps")

        def evaluate(step):
            table = heldout_table(lambda y, s: denoise(params, y, s), held_patches, levels, cfg.seed)
            history["eval_step"].append(step)
            history["heldout"].append(table)
            log(f"prior train: step {step}: held-out MSE / identity " + " ".join(
                f"{row['sigma_rad']:.3g}:{row['ratio']:.3f}" for row in table))
            return table

        from ptycore.recon.runner import _Progress  # the runner's bar (terminal) or log lines every ~10 %

        bar = _Progress("prior train", cfg.steps, progress)
        try:
            for k in range(start, cfg.steps):
                t_step = time.perf_counter()
                clean, sigma, noise = draw_batch(train_patches, k, cfg, sigma_range)
                params, opt_state, loss = step_fn(params, opt_state, clean, sigma, noise)
                history["step"].append(k + 1)
                history["loss"].append(float(loss))
                bar.update(k, {"loss": history["loss"][-1]}, time.perf_counter() - t_step)
                if not math.isfinite(history["loss"][-1]):
                    raise InvalidData(f"prior train: the loss became {history['loss'][-1]} at step {k + 1}; "
                                      "lower train.lr")
                done = k + 1
                if done % cfg.eval_every == 0 and done < cfg.steps:
                    evaluate(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    history["seconds"] = time.perf_counter() - t0
                    _save_checkpoint(ckpt, params, opt_state, {**expect, "step": done, "history": history})
        finally:
            bar.close()
        table = evaluate(cfg.steps) if (not history["eval_step"] or history["eval_step"][-1] != cfg.steps) \
            else history["heldout"][-1]
        seconds = time.perf_counter() - t0
        history["seconds"] = seconds
        srtio3 = None
        if cfg.evaluate_srtio3:
            srtio3 = srtio3_table(lambda y, s: denoise(params, y, s), PriorDataConfig.model_validate(attrs["config"]),
                                  levels, cfg.seed)
            log("prior train: SrTiO3 (never seen) MSE / identity " + " ".join(
                f"{row['sigma_rad']:.3g}:{row['ratio']:.3f}" for row in srtio3))
        info = PriorInfo(
            pixel_size_A=float(attrs["pixel_size_A"]), slice_thickness_A=float(attrs["slice_thickness_A"]),
            patch_px=patch_px, sigma_min_rad=sigma_range[0], sigma_max_rad=sigma_range[1], phase_scale_rad=scale,
            levels=cfg.levels, filters=cfg.filters, energy_kv=float(attrs["energy_kv"]), parameters=n_params,
            provenance=provenance(
                command="prior train", data=str(data_path), data_config_hash=attrs["config_hash"],
                data_manifest_hash=attrs["manifest_hash"], data_config=attrs["config"],
                train_config=cfg.model_dump(), train_config_hash=cfg.hash(), steps=cfg.steps,
                seeds={"train": cfg.seed, "data": attrs["config"]["seed"]}, training_seconds=round(seconds, 1),
                heldout=table, srtio3=srtio3, heldout_compounds=sorted({r["formula"] for r in data.manifest
                                                         if r["split"] == "heldout"}),
                sigma_rad_per_V_A=attrs["sigma_rad_per_V_A"], equinox=_version("equinox")),
        )
        save_prior(tmp, eqx.combine(params, static), info)
        (tmp / "curves.json").write_text(json.dumps(history) + "\n")
        if figures:
            plot_curves(history, tmp / "curves.png")
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    return {"out": str(out), "parameters": n_params, "seconds": seconds, "heldout": table}


def _version(pkg: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def plot_curves(history: dict, path: Path) -> None:
    """Training loss per step (and a running mean), held-out MSE / identity per noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = np.asarray(history["loss"])
    a.semilogy(history["step"], loss, lw=0.5, alpha=0.4, label="loss per step")
    if len(loss) >= 20:
        w = max(10, len(loss) // 50)
        a.semilogy(history["step"][w - 1 :], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
    a.set_xlabel("step")
    a.set_ylabel("weighted denoising loss")
    a.legend()
    if history["heldout"]:
        ratios = np.asarray([[row["ratio"] for row in table] for table in history["heldout"]])
        sigmas = [row["sigma_rad"] for row in history["heldout"][0]]
        for j, s in enumerate(sigmas):
            b.semilogy(history["eval_step"], ratios[:, j], "o-", label=f"σ = {s:.3g} rad")
        b.axhline(1.0, color="k", lw=0.8, ls="--")
        b.set_xlabel("step")
        b.set_ylabel("held-out MSE / identity MSE")
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
