"""The engine registry: every engine declares here, in one entry, its options model, the
parameters it can refine, the losses it accepts and where its class lives.

Plan validation (:mod:`ptycore.plan`) builds each stage's engine-specific options field from
this table (a stage running engine ``lsqml`` takes its options under ``lsqml:``), and rejects a
parameter or loss the engine cannot handle, naming the stage; the runner builds engines through
:func:`ptycore.recon.engines.make_engine`. This module imports no JAX: plans validate without it.

Adding an engine: write its class (``ptycore.recon.engines.base.Engine``: ``init_carry``,
``_iteration_impl``, ``hyper``, ``to_state``), its options model below, and one entry in
:data:`REGISTRY`. See ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: every parameter a plan can name under ``optimize:``
PARAMETERS = ("object_phase", "object_amplitude", "probe", "positions", "tilts", "slice_thickness")
#: every loss a plan can name under ``losses:``
LOSSES = ("single", "poisson", "anscombe", "pacbed", "sparse", "tv_xy", "tv_z", "surface_zero", "l2", "prior")
DATA_FIT_LOSSES = ("single", "poisson", "anscombe")


class EngineOptions(BaseModel):
    """Base of every engine's options model (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class GradientOptions(EngineOptions):
    """The gradient engine has no options of its own: its noise model is its data loss
    (``single``: amplitudes, ``poisson``: counts) and its steps are the ``optimize`` entries."""


class EPIEOptions(EngineOptions):
    """ePIE's step sizes are the ``optimize`` learning rates (1.0 = classic alpha/beta)."""


class LSQMLOptions(EngineOptions):
    noise_model: Literal["gaussian", "poisson"] = Field(
        default="gaussian", description="likelihood of the exit-wave update: gaussian (noise on amplitudes) or "
        "poisson (counts; better at low dose)")


class LMOptions(EngineOptions):
    """Matrix-free Levenberg–Marquardt (generalised Gauss–Newton, preconditioned CG, gain-ratio damping)."""

    noise_model: Literal["amplitude", "poisson"] = Field(
        default="amplitude", description="amplitude: least squares on sqrt(counts); poisson: counts")
    damping: float = Field(default=1e-2, gt=0, description="initial damping, relative to the Marquardt scale")
    damping_min: float = Field(default=1e-8, gt=0)
    damping_max: float = Field(default=1e8, gt=0)
    cg_iterations: int = Field(default=20, ge=1, le=500, description="most CG iterations per step")
    cg_tolerance: float = Field(default=0.1, gt=0, lt=1, description="forcing tolerance: stop at |r| <= tol |g|")
    preconditioner: bool = Field(default=True, description="Jacobi preconditioner from the illumination")
    marquardt: bool = Field(default=True, description="damp by the diagonal (Marquardt scaling), not the identity")
    damping_floor: float = Field(
        default=0.0, ge=0, lt=1, description="smallest damping scale, as a fraction of each parameter's largest "
        "(rPIE-like: weakly lit pixels are damped as a lit one by that fraction; 0: Marquardt's diagonal only)")


class DPSOptions(EngineOptions):
    """Diffusion posterior sampling with the learned prior (``ptycore.recon.engines.dps``), warm-started
    from the incoming object: one sampler step per iteration, from ``sigma_start_rad`` down to
    ``sigma_end_rad`` (then to 0 in the last step)."""

    sigma_start_rad: float = Field(
        default=0.034, gt=0, description="noise added to the warm start (a partial noising) and the first step's "
        "noise level, rad; the default is half the shipped prior's phase scale (0.0676 rad RMS per 2 Å slab, "
        "trained 6.76e-4 to 6.76e-2 rad): a warm start's atomic columns survive it, what lies within half the "
        "object's own strength is redrawn by the prior")
    sigma_end_rad: float = Field(default=0.005, gt=0, description="noise level of the last sampler step, rad")
    schedule: Literal["karras", "geometric"] = Field(
        default="karras", description="karras: EDM's (sigma_start^(1/rho) ... sigma_end^(1/rho))^rho; geometric: "
        "log-spaced")
    rho: float = Field(default=7.0, gt=0, description="exponent of the karras schedule")
    guidance_rad: float = Field(
        default=0.05, ge=0, description="physics guidance at full weight: the RMS phase change (rad) one step's "
        "data-fit gradient makes (the gradient is normalised: Adam-smoothed or by its RMS)")
    guidance_shift: float = Field(
        default=4.0, description="MEP-Diffusion's shifted sigmoid: weight sigmoid(shift - logSNR)^(1/2), logSNR = "
        "-2 ln(sigma / sigma_data)")
    sigma_data_rad: float | None = Field(
        default=None, gt=0, description="the data scale of logSNR (default: the prior's phase_scale_rad)")
    through_denoiser: bool = Field(
        default=False, description="guidance as the gradient w.r.t. the noisy z through the denoiser (DPS of "
        "Chung et al., MEP-Diffusion's formula; one more backward pass of the denoiser), else w.r.t. x0 at x0")
    adam: bool = Field(default=True, description="Adam-smoothed guidance (moments over the steps); else the "
                       "gradient divided by its RMS")
    adam_b1: float = Field(default=0.9, ge=0, lt=1)
    adam_b2: float = Field(default=0.999, ge=0, lt=1)
    eta: float = Field(default=0.0, ge=0, le=1, description="fresh noise per step: 0 deterministic (DDIM), 1 "
                       "ancestral")

    @model_validator(mode="after")
    def _decreasing(self):
        if self.sigma_end_rad >= self.sigma_start_rad:
            raise ValueError(f"sigma_end_rad {self.sigma_end_rad} must be below sigma_start_rad "
                             f"{self.sigma_start_rad}")
        return self


@dataclass(frozen=True)
class EngineSpec:
    name: str
    summary: str
    engine_class: str  # "module:Class", imported when the engine is built
    options: type[EngineOptions]
    parameters: tuple[str, ...]
    losses: tuple[str, ...]
    object_modes: int | None = None  # the only number of object modes supported, if limited

    def load(self):
        import importlib

        module, _, name = self.engine_class.partition(":")
        return getattr(importlib.import_module(module), name)


_PROJECTION_PARAMETERS = ("object_phase", "object_amplitude", "probe", "positions")
_PROJECTION_LOSSES = ("single", "poisson", "anscombe", "pacbed")

REGISTRY: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("gradient", "automatic differentiation of the multislice model, optax optimisers",
                   "ptycore.recon.engines.gradient:GradientEngine", GradientOptions, PARAMETERS, LOSSES),
        EngineSpec("epie", "extended ptychographic iterative engine (batched, mixed-state multislice)",
                   "ptycore.recon.engines.epie:EPIEEngine", EPIEOptions, _PROJECTION_PARAMETERS,
                   _PROJECTION_LOSSES, object_modes=1),
        EngineSpec("lsqml", "least-squares maximum likelihood with optimal step lengths",
                   "ptycore.recon.engines.lsqml:LSQMLEngine", LSQMLOptions, _PROJECTION_PARAMETERS,
                   _PROJECTION_LOSSES, object_modes=1),
        EngineSpec("lm", "matrix-free Levenberg-Marquardt: Gauss-Newton steps by preconditioned CG",
                   "ptycore.recon.engines.lm:LMEngine", LMOptions,
                   ("object_phase", "object_amplitude", "probe", "positions"), _PROJECTION_LOSSES + ("prior",)),
        EngineSpec("dps", "diffusion posterior sampling with the learned prior, warm-started from the incoming "
                   "object (object phase only: amplitude, probe, positions stay as they come in)",
                   "ptycore.recon.engines.dps:DPSEngine", DPSOptions, ("object_phase",), DATA_FIT_LOSSES),
    )
}
