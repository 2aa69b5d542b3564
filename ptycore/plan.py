"""Reconstruction plans: ordered stages, validated with pydantic before any compute.

A plan is YAML::

    name: gradient-single-slice
    seed: 0
    stages:
      - name: main
        engine: gradient
        iterations: 200
        batch_size: 32
        grouping: random            # random | compact | sparse
        resample: {probe_modes: 4, slices: 1, object_pad_px: 0}   # detector_px: see below
        optimize:                   # per parameter: optimizer, lr, start/stop iteration, lr schedule
          object_phase: {optimizer: adam, lr: 0.02}
          probe: {optimizer: adam, lr: 0.02, start: 5}
          positions: {optimizer: adam, lr: 0.01, start: 10}
        losses:                     # weight: a number or a schedule
          single: 1.0
          pacbed: 0.5
          sparse: {schedule: linear, start: 0.0, end: 0.1, from_iter: 0, to_iter: 100}
        constraints:
          probe_orthogonalize: {every: 1}
          object_amplitude_bounds: {every: 1, min: 0.0, max: 1.0}

Coarse to fine: ``resample: {detector_px: 32}`` makes a stage fit only the central 32×32 pixels
of each diffraction pattern, so its object pixel is ``pixel_size_A × N / 32`` (N: the detector
size) over the same field of view; a later stage without ``detector_px`` uses the full
detector again. Object and probe are Fourier-resampled when the stage starts.

A parameter's ``start`` may not lie beyond the stage's ``iterations`` (``start`` equal to
``iterations`` keeps it fixed), some data-fit loss (single, poisson, anscombe) must have a
non-zero weight, and no number may be NaN.

``devices:`` (top level, default 1) is how many devices one run of the plan asks for: the
workflow requests that many GPUs / tasks and starts that many processes (``ptycore reconstruct``
uses them all; see ``--devices``).

``for:`` (top level) says what data the plan is for (``ptycore plans`` shows it). Fields may be
``auto`` or ``"= expression"``: rules resolved from the prepared data when ``ptycore reconstruct``
starts (see :mod:`ptycore.recon.autoplan`); such a plan is validated as resolved for nominal data
and ``plan.resolve(facts)`` gives the plan for a dataset.

Deep generative prior: ``object: {model: dgp, levels: 3, filters: 16, input_noise: 0.025,
pretrain_iterations: 50, lr: 1e-3}`` (and likewise ``probe:``) makes a gradient stage generate
the object (or probe) by a U-Net whose weights are optimised instead of the pixels (see
ptycore.recon.networks); the stage then leaves ``object_phase``/``object_amplitude`` (or
``probe``) out of ``optimize``.

Learned prior (ptycore.prior.guidance): ``prior: {path: shipped | PATH, sigma_rad: 0.05}`` at the
top level (or per stage, overriding it) names the denoiser of every stage that uses one: a
``prior`` loss in a gradient or lm stage, ``losses: {prior: {weight: W, sigma_rad: S}}`` (both a
number or a schedule; ``sigma_rad`` defaults to the ``prior:``'s; in a gradient stage
``denoise_every: K`` renews the RED target every K iterations instead of every one, the
denoiser being the costly part), or an ``engine: dps`` stage
(options under ``dps:``; it refines ``object_phase`` only, so ``optimize`` may be left out, and
its ``lr``/``start``/``stop`` are unused; constraints are refused there).
Without a ``prior:`` such a stage uses the shipped one.

Errors name the field, e.g. ``stages[1].losses.poisson.weight: must be >= 0``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from ptycore.errors import InvalidPlan
from ptycore.recon.engines.registry import DATA_FIT_LOSSES, LOSSES, PARAMETERS, REGISTRY

ENGINES = tuple(REGISTRY)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- schedules
class Schedule(_Strict):
    """A value that changes with the iteration (within a stage, iteration counted from 0).

    constant: ``value``; linear: ``start`` → ``end`` between ``from_iter`` and ``to_iter``;
    step: ``start`` before ``at_iter`` and ``end`` from it; cosine: half-cosine from ``start``
    to ``end`` between ``from_iter`` and ``to_iter``; piecewise: ``points`` [[iter, value], ...]
    linearly interpolated (held constant outside).
    """

    schedule: Literal["constant", "linear", "step", "cosine", "piecewise"] = "constant"
    value: float | None = None
    start: float | None = None
    end: float | None = None
    from_iter: int = Field(default=0, ge=0)
    to_iter: int | None = Field(default=None, ge=0)
    at_iter: int | None = Field(default=None, ge=0)
    points: list[tuple[int, float]] | None = None

    @model_validator(mode="after")
    def _check(self):
        kind = self.schedule
        need = {
            "constant": ("value",),
            "linear": ("start", "end", "to_iter"),
            "cosine": ("start", "end", "to_iter"),
            "step": ("start", "end", "at_iter"),
            "piecewise": ("points",),
        }[kind]
        for key in need:
            if getattr(self, key) is None:
                raise ValueError(f"a {kind} schedule needs {key!r}")
        if any(math.isnan(v) for v in self.values()):
            raise ValueError("is not a number (NaN)")
        if kind in ("linear", "cosine") and self.to_iter <= self.from_iter:
            raise ValueError("to_iter must be > from_iter")
        if kind == "piecewise":
            its = [p[0] for p in self.points]
            if its != sorted(its) or len(set(its)) != len(its):
                raise ValueError("piecewise points must have strictly increasing iterations")
        return self

    def values(self) -> list[float]:
        return [v for v in (self.value, self.start, self.end) if v is not None] + [p[1] for p in self.points or []]

    def at(self, it: int) -> float:
        k = self.schedule
        if k == "constant":
            return float(self.value)
        if k == "step":
            return float(self.start if it < self.at_iter else self.end)
        if k == "piecewise":
            its = [p[0] for p in self.points]
            vals = [p[1] for p in self.points]
            if it <= its[0]:
                return float(vals[0])
            if it >= its[-1]:
                return float(vals[-1])
            for (i0, v0), (i1, v1) in zip(self.points[:-1], self.points[1:], strict=True):
                if i0 <= it <= i1:
                    return float(v0 + (v1 - v0) * (it - i0) / (i1 - i0))
        t = min(max((it - self.from_iter) / (self.to_iter - self.from_iter), 0.0), 1.0)
        if k == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return float(self.start + (self.end - self.start) * t)


def _as_schedule(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"schedule": "constant", "value": float(v)}
    return v


# ---------------------------------------------------------------- optimisation
class _Learning(_Strict):
    """What every optimised thing has: a learning rate (a number or a schedule, >= 0), Adam's
    betas, and the iterations it learns in (``start`` to ``stop``, passed to the compiled
    iteration as data)."""

    lr: Annotated[Schedule, Field(description="step size in the parameter's units")]
    start: int = Field(default=0, ge=0, description="first iteration that updates this parameter")
    stop: int | None = Field(default=None, ge=1, description="iteration from which it is frozen again")
    b1: float = Field(default=0.9, ge=0, lt=1)
    b2: float = Field(default=0.999, ge=0, lt=1)

    _lr = field_validator("lr", mode="before")(classmethod(lambda cls, v: _as_schedule(v)))

    @field_validator("lr", mode="after")
    @classmethod
    def _non_negative(cls, v):
        if any(x < 0 for x in v.values()):
            raise ValueError("must be >= 0")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.stop is not None and self.stop <= self.start:
            raise ValueError("stop must be > start")
        return self

    def lr_at(self, it: int) -> float:
        if it < self.start or (self.stop is not None and it >= self.stop):
            return 0.0
        return self.lr.at(it)

    def active_at(self, it: int) -> bool:
        return self.start <= it and (self.stop is None or it < self.stop)


class ParameterOptimizer(_Learning):
    """How one parameter learns: optimiser, learning rate (optionally scheduled), onset/stop."""

    optimizer: Literal["adam", "sgd", "momentum", "lbfgs"] = Field(
        default="adam", description="lbfgs: quasi-Newton direction at a fixed step lr; for few, smooth parameters "
        "(slice thickness, global tilt) whose mini-batch gradients agree")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    memory: int = Field(default=10, ge=1, le=100, description="L-BFGS history length")


class Loss(_Strict):
    weight: Schedule
    #: the ``prior`` loss only: the denoiser's noise level (rad), a number or a schedule (default:
    #: the stage's or plan's ``prior.sigma_rad``)
    sigma_rad: Schedule | None = None
    #: the ``prior`` loss of a gradient stage only: iterations between renewals of the RED target
    #: ``sg(D_sigma(x))`` (the denoiser runs once per ``denoise_every`` iterations; 1: every iteration)
    denoise_every: int = Field(default=1, ge=1)

    _w = field_validator("weight", "sigma_rad", mode="before")(classmethod(lambda cls, v: _as_schedule(v)))

    @field_validator("weight", mode="after")
    @classmethod
    def _non_negative(cls, v):
        if any(x < 0 for x in v.values()):
            raise ValueError("must be >= 0")
        return v

    @field_validator("sigma_rad", mode="after")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(x <= 0 for x in v.values()):
            raise ValueError("must be > 0 (a noise level in rad)")
        return v

    @model_serializer(mode="wrap")
    def _without_unset_sigma(self, handler):
        out = handler(self)
        if out.get("sigma_rad", 0) is None:
            del out["sigma_rad"]
        if out.get("denoise_every") == 1:  # the default is left out: plans without it keep their hash
            del out["denoise_every"]
        return out


class PriorSource(_Strict):
    """The learned prior a stage uses (``ptycore.prior.guidance``): ``path`` ``shipped`` (the
    weights in the package) or the path of saved weights; ``sigma_rad`` the ``prior`` loss's
    noise level when the loss gives none."""

    path: str = Field(default="shipped", min_length=1, description="shipped, or a saved prior (weights + info)")
    sigma_rad: Schedule = Field(default_factory=lambda: Schedule(value=0.05),
                                description="denoiser noise level (rad) of the prior loss, a number or a schedule")

    _s = field_validator("sigma_rad", mode="before")(classmethod(lambda cls, v: _as_schedule(v)))

    @field_validator("sigma_rad", mode="after")
    @classmethod
    def _positive(cls, v):
        if any(x <= 0 for x in v.values()):
            raise ValueError("must be > 0 (a noise level in rad)")
        return v


# ---------------------------------------------------------------- constraints
class Constraint(_Strict):
    every: int = Field(default=1, ge=1, description="apply after every N-th iteration")
    start: int = Field(default=0, ge=0)
    stop: int | None = Field(default=None, ge=1)

    def due(self, it: int) -> bool:
        return it >= self.start and (self.stop is None or it < self.stop) and (it - self.start) % self.every == 0


class ProbeOrthogonalize(Constraint):
    pass


class ProbeAperture(Constraint):
    """Zero the probe's Fourier components beyond ``scale`` × the convergence angle."""

    scale: float = Field(default=1.1, gt=0)


class ProbeIntensity(Constraint):
    """Rescale the probe to the data's mean total counts."""


class AmplitudeBounds(Constraint):
    min: float = Field(default=0.0, ge=0)
    max: float = Field(default=1.0, gt=0)


class PhasePositive(Constraint):
    pass


class KzFilter(Constraint):
    """Missing-wedge filter on the object phase across slices (needs >= 2 slices).

    Ptychography measures the object's 3-D spectrum only inside a cone |kz| <~ alpha |kr|
    (alpha: the probe's convergence semi-angle); components outside are damped by
    ``1 - (2/pi) atan((beta kz)^2 / ((alpha kr)^2 + eps))``.
    """

    beta: float = Field(default=1.0, gt=0, description="sharpness: larger damps more")
    alpha_mrad: float | None = Field(default=None, gt=0, description="cone half-angle (default: convergence)")


class LateralBlur(Constraint):
    sigma_px: float = Field(default=0.5, gt=0)


class ZBlur(Constraint):
    sigma_slices: float = Field(default=1.0, gt=0)


class PhaseRampRemoval(Constraint):
    pass


class PositionRecenter(Constraint):
    pass


class TiltSmooth(Constraint):
    sigma_px: float = Field(default=2.0, gt=0, description="Gaussian over the scan grid (per-position tilts)")


class Constraints(_Strict):
    probe_orthogonalize: ProbeOrthogonalize | None = None
    probe_aperture: ProbeAperture | None = None
    probe_intensity: ProbeIntensity | None = None
    object_amplitude_bounds: AmplitudeBounds | None = None
    phase_positive: PhasePositive | None = None
    kz_filter: KzFilter | None = None
    lateral_blur: LateralBlur | None = None
    z_blur: ZBlur | None = None
    phase_ramp_removal: PhaseRampRemoval | None = None
    position_recenter: PositionRecenter | None = None
    tilt_smooth: TiltSmooth | None = None

    def active(self) -> dict[str, Constraint]:
        return {k: v for k, v in self if v is not None}


class Resample(_Strict):
    """How the incoming state is changed when the stage starts.

    ``detector_px`` changes the object pixel size the physical way: the stage fits only the
    central ``detector_px`` × ``detector_px`` pixels of each (square) diffraction pattern, so its
    object pixel is ``pixel_size_A × N / detector_px`` (N: the full detector; the probe window
    ``N × pixel_size_A`` stays the same). Coarse first stages are faster and a good start; a
    later stage with ``detector_px`` unset (the full detector) returns to the data's pixel size.
    Object and probe are Fourier-resampled on entry (see ptycore.recon.state.resample_pixels).
    """

    @model_validator(mode="after")
    def _one_slice_setting(self):
        if self.slices is not None and self.slice_thickness_A is not None:
            raise ValueError("give slices or slice_thickness_A, not both")
        return self

    @field_validator("detector_px")
    @classmethod
    def _even_detector(cls, v):
        if v is not None and v % 2:
            raise ValueError(f"must be even (the zero frequency stays at the centre pixel), got {v}")
        return v

    probe_modes: int | None = Field(default=None, ge=1, le=32)
    slices: int | None = Field(default=None, ge=1, le=512)
    slice_thickness_A: float | None = Field(
        default=None, gt=0, description="target slice thickness: slices = round(total thickness / this)")
    object_pad_px: int = Field(default=0, ge=0)
    tilts: Literal["global", "per_position"] | None = None
    detector_px: int | None = Field(
        default=None, ge=16, le=8192,
        description="central detector pixels (per side) this stage fits; None: the full detector. "
        "Object pixel = pixel_size_A x N / detector_px")


# ---------------------------------------------------------------- deep generative prior
class Network(_Learning):
    """A U-Net that generates the object or the probe (ptycore.recon.networks), with its own
    optimiser: ``lr`` (a number or a schedule), ``start``/``stop`` as for every parameter."""

    model: Literal["dgp"] = Field(description="dgp: a deep generative prior (U-Net)")
    levels: int = Field(default=3, ge=1, le=6, description="U-Net levels (max-pool steps)")
    filters: int = Field(default=16, ge=1, le=256, description="channels of the first level (doubling per level)")
    norm: Literal["group", "instance", "none"] = Field(default="group", description="normalisation after each conv")
    input_noise: float = Field(default=0.025, ge=0, le=1,
                               description="std of the Gaussian noise added to the input each step, in units of "
                               "the input's range")
    pretrain_iterations: int = Field(default=50, ge=0, le=100000,
                                     description="steps fitting the network to reproduce the incoming estimate")
    pretrain_lr: float = Field(default=1e-3, gt=0)
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: Schedule = Field(default_factory=lambda: Schedule(value=1e-3), description="learning rate of the weights")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW's decoupled weight decay (unused by adam)")


class ObjectNetwork(Network):
    output: Literal["amplitude_phase", "phase", "potential"] = Field(
        default="amplitude_phase", description="what the network makes: amplitude and phase; the phase only "
        "(the amplitude stays as it came in); or a non-negative phase (softplus, a projected potential)")
    identical_slices: bool = Field(default=False, description="one output for every slice (multislice warm-up)")


class ProbeNetwork(Network):
    """Output channels: real and imaginary parts of each probe mode."""


#: constraints that change the pixels of the object / probe (a network-made field is the network's output)
_OBJECT_CONSTRAINTS = ("object_amplitude_bounds", "phase_positive", "kz_filter", "lateral_blur", "z_blur",
                       "phase_ramp_removal")
_PROBE_CONSTRAINTS = ("probe_orthogonalize", "probe_aperture", "probe_intensity")
_NETWORK_FIELDS = {"object": (ObjectNetwork, ("object_phase", "object_amplitude"), _OBJECT_CONSTRAINTS),
                   "probe": (ProbeNetwork, ("probe",), _PROBE_CONSTRAINTS)}


class _StageBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    engine: str = Field(default="gradient", description="one of the registered engines (ptycore.recon.engines)")
    iterations: int = Field(ge=1, le=100000)
    batch_size: int = Field(default=32, ge=1)
    grouping: Literal["random", "compact", "sparse"] = "random"
    resample: Resample = Field(default_factory=Resample)
    optimize: dict[str, ParameterOptimizer]
    losses: dict[str, Loss] = Field(default_factory=lambda: {"single": Loss(weight=1.0)})
    constraints: Constraints = Field(default_factory=Constraints)
    checkpoint_every: int = Field(default=20, ge=1)
    validation_fraction: float = Field(default=0.0, ge=0, lt=0.5, description="positions held out of updates")
    propagator_bandlimit: float | None = Field(
        default=None, gt=0, le=1,
        description="fraction of the probe window's Nyquist frequency the Fresnel propagator between slices "
        "passes (a hard disk); null (the default): no limit, every detector pixel is modelled. 2/3 is the "
        "anti-aliasing limit of simulation codes: in a reconstruction it removes the outer third of the "
        "detector from the model after the first slice, which on a detector less than 1.5x the convergence "
        "angle wide cuts into the bright-field disc itself")
    object: ObjectNetwork | None = Field(default=None, description="object generated by a network (model: dgp)")
    probe: ProbeNetwork | None = Field(default=None, description="probe generated by a network (model: dgp)")
    prior: PriorSource | None = Field(default=None, description="the learned prior of this stage's prior loss or "
                                      "dps engine (default: the plan's prior:)")

    @model_validator(mode="before")
    @classmethod
    def _network_keys(cls, v):
        """Unknown keys of ``object:`` / ``probe:`` named with the stage; ``optimize`` may be left
        out when a network is optimised."""
        if not isinstance(v, dict):
            return v
        where = f"stage {v.get('name', '?')!r}"
        for key, (model, _, _) in _NETWORK_FIELDS.items():
            cfg = v.get(key)
            if cfg is None:
                continue
            if not isinstance(cfg, dict):
                raise ValueError(f"{where}: {key}: a mapping like {{model: dgp, levels: 3, filters: 16}}, "
                                 f"got {type(cfg).__name__}")
            for name in cfg:
                if name not in model.model_fields:
                    raise ValueError(f"{where}: {key}.{name}: unknown key{_hint(name, list(model.model_fields))}")
            if "model" not in cfg:
                raise ValueError(f"{where}: {key}.model: required key is missing (model: dgp)")
        if "optimize" not in v and any(v.get(k) is not None for k in _NETWORK_FIELDS):
            v = {**v, "optimize": {}}
        if "optimize" not in v and v.get("engine") == "dps":  # dps refines the object phase only
            v = {**v, "optimize": {"object_phase": {"lr": 1.0}}}
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, v):
        if isinstance(v, dict) and "noise_model" in v:
            engine = v.get("engine", "gradient")
            hint = (f"put it under the engine: '{engine}: {{noise_model: ...}}'" if engine in ("lsqml", "lm")
                    else "the gradient engine's noise model is its data loss (single or poisson)")
            raise ValueError(f"noise_model is an engine option: {hint}")
        return v

    @field_validator("losses", mode="before")
    @classmethod
    def _loss_shorthand(cls, v):
        if isinstance(v, dict):
            return {k: ({"weight": w} if not isinstance(w, dict) or "weight" not in w else w) for k, w in v.items()}
        return v

    @field_validator("optimize")
    @classmethod
    def _known_parameters(cls, v):
        for key in v:
            if key not in PARAMETERS:
                raise ValueError(f"unknown parameter {key!r}{_hint(key, PARAMETERS)}")
        return v

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v):
        for key in v:
            if key not in LOSSES:
                raise ValueError(f"unknown loss {key!r}{_hint(key, LOSSES)}")
        if not any(k in v for k in DATA_FIT_LOSSES):
            raise ValueError(f"needs a data-fit loss: one of {', '.join(DATA_FIT_LOSSES)}")
        return v

    @field_validator("engine")
    @classmethod
    def _registered(cls, v):
        if v not in REGISTRY:
            raise ValueError(f"unknown engine {v!r}{_hint(v, list(REGISTRY))}")
        return v

    @model_validator(mode="after")
    def _fits_the_data_within_its_iterations(self):
        where = f"stage {self.name!r}"
        if not self.optimize and self.object is None and self.probe is None:
            raise ValueError(f"{where}: optimize: at least one parameter must be optimised")
        for key in _NETWORK_FIELDS:
            net = getattr(self, key)
            if net is not None and net.start > self.iterations:
                raise ValueError(f"{where}: {key}.start {net.start} is beyond the stage's {self.iterations} "
                                 f"iterations: the {key} network would never be updated")
        for key, opt in self.optimize.items():
            if opt.start > self.iterations:
                raise ValueError(f"{where}: optimize.{key}.start {opt.start} is beyond the stage's "
                                 f"{self.iterations} iterations: {key} would never be updated (at most "
                                 f"{self.iterations}; leave {key} out of optimize to keep it fixed)")
        data_fit = {k: v for k, v in self.losses.items() if k in DATA_FIT_LOSSES}
        if data_fit and all(max(loss.weight.values(), default=0.0) == 0 for loss in data_fit.values()):
            raise ValueError(f"{where}: every data-fit loss has weight 0 ({', '.join(data_fit)}): "
                             "nothing fits the data")
        return self

    @model_validator(mode="after")
    def _engine_scope(self):
        """What the registry says the engine can do: its parameters, losses and options."""
        spec = REGISTRY[self.engine]
        for other in REGISTRY:
            if other != self.engine and getattr(self, other) is not None:
                raise ValueError(f"options {other!r} belong to engine {other!r}, but this stage runs "
                                 f"{self.engine!r}")
        if getattr(self, self.engine) is None:  # the engine's defaults, written out in the resolved plan
            setattr(self, self.engine, spec.options())
        for key in self.optimize:
            if key not in spec.parameters:
                raise ValueError(f"engine {self.engine!r} refines only {', '.join(spec.parameters)}, not {key!r} "
                                 "(use a gradient stage)")
        for key, (_, fields, constraints) in _NETWORK_FIELDS.items():
            if getattr(self, key) is None:
                continue
            if self.engine != "gradient":
                raise ValueError(f"stage {self.name!r}: {key}: {{model: dgp}} needs engine 'gradient', not "
                                 f"{self.engine!r} (lm's Gauss-Newton scaling is made for pixels)")
            for name in fields:
                if name in self.optimize:
                    raise ValueError(f"stage {self.name!r}: optimize.{name}: the {key} is generated by its network "
                                     f"here; leave {name} out of optimize (the network's lr is {key}.lr)")
            for name in constraints:
                if getattr(self.constraints, name) is not None:
                    raise ValueError(f"stage {self.name!r}: constraints.{name} changes {key} pixels, which this "
                                     f"stage generates by its network (drop it; the network's output options "
                                     f"are output and identical_slices)")
        if self.engine == "dps" and self.constraints.active():
            raise ValueError(f"stage {self.name!r}: constraints: the dps engine applies none (its sampler state is "
                             f"the noisy object on the prior's grid): drop {', '.join(self.constraints.active())}")
        if "prior" in self.losses and "prior" not in spec.losses:
            hint = ("the dps engine samples with the prior itself: drop losses.prior" if self.engine == "dps"
                    else f"engine {self.engine!r} cannot use it; use a gradient or lm stage")
            raise ValueError(f"stage {self.name!r}: losses.prior: {hint}")
        for key, loss in self.losses.items():
            if loss.sigma_rad is not None and key != "prior":
                raise ValueError(f"stage {self.name!r}: losses.{key}.sigma_rad: only the prior loss has a noise level")
            if loss.denoise_every != 1 and (key != "prior" or self.engine != "gradient"):
                raise ValueError(f"stage {self.name!r}: losses.{key}.denoise_every: only the prior loss of a gradient "
                                 "stage has it (lm renews the RED target after every accepted step)")
        for key in self.losses:
            if key not in spec.losses:
                raise ValueError(f"engine {self.engine!r} fits the data only; loss {key!r} needs a gradient "
                                 f"stage (data losses are reported: {', '.join(spec.losses)})")
        return self

    @model_serializer(mode="wrap")
    def _only_own_options(self, handler):
        """The resolved stage names only its own engine's options (not a None for every other engine)."""
        out = handler(self)
        return {k: v for k, v in out.items() if not (k in REGISTRY and k != self.engine)
                and not ((k in _NETWORK_FIELDS or k == "prior") and v is None)}

    @property
    def uses_prior(self) -> bool:
        """Whether the stage needs the learned prior (a ``prior`` loss, or the ``dps`` engine)."""
        return "prior" in self.losses or self.engine == "dps"

    @property
    def options(self):
        """This stage's engine options (the engine's options model; defaults when not given)."""
        return getattr(self, self.engine)


#: a stage: the fields above, plus one optional options field per registered engine, named after it
Stage = create_model(
    "Stage", __base__=_StageBase,
    **{name: (spec.options | None, Field(default=None, description=f"options of the {name} engine"))
       for name, spec in REGISTRY.items()},
)


class Plan(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "plan"
    for_: str | None = Field(default=None, alias="for", description="what data this plan is for (ptycore plans)")
    seed: int = 0
    #: devices one run of this plan asks for (the workflow requests them; see ``ptycore reconstruct --devices``)
    devices: int = Field(default=1, ge=1, description="devices (GPUs, processes) one run of this plan asks for")
    stages: list[Stage] = Field(min_length=1)
    #: the learned prior of every stage that uses one and names none itself (ptycore.prior.guidance)
    prior: PriorSource | None = Field(default=None, description="learned prior: {path: shipped | PATH, sigma_rad}")
    #: the plan as written, when it has ``auto`` fields or expressions (see ptycore.recon.autoplan)
    _rules: dict | None = PrivateAttr(default=None)
    _source: str = PrivateAttr(default="plan")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique, repeated: {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _priors(self):
        """Every stage that uses the prior gets the plan's (or the shipped one) unless it names its
        own, and a ``prior`` loss without ``sigma_rad`` gets its prior's: the resolved plan says
        which prior and noise level each stage uses."""
        for stage in self.stages:
            if not stage.uses_prior:
                if stage.prior is not None:
                    raise ValueError(f"stage {stage.name!r}: prior: nothing in this stage uses it (add losses.prior "
                                     "or run engine dps)")
                continue
            if stage.prior is None:
                stage.prior = (self.prior or PriorSource()).model_copy(deep=True)
            loss = stage.losses.get("prior")
            if loss is not None and loss.sigma_rad is None:
                loss.sigma_rad = stage.prior.sigma_rad.model_copy(deep=True)
        return self

    @model_serializer(mode="wrap")
    def _without_unset_prior(self, handler):
        """A plan without a prior resolves (and hashes) as it did before priors existed."""
        out = handler(self)
        if out.get("prior", 0) is None:
            del out["prior"]
        return out

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise InvalidPlan(f"no stage named {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    @property
    def adaptive(self) -> bool:
        """Whether fields are rules (``auto``, ``= ...``) resolved from the data: this plan's own
        numbers are then those of the nominal data (ptycore.recon.autoplan.NOMINAL)."""
        return self._rules is not None

    def resolve(self, facts) -> tuple[Plan, list[str]]:
        """The plan for data with these facts (``autoplan.DataFacts``) and a note per rule; a plan
        without rules is returned as it is."""
        if self._rules is None:
            return self, []
        from ptycore.recon.autoplan import resolve_record

        record, notes = resolve_record(self._rules, facts, self._source)
        return _validate(record, self._source), notes

    def resolved(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def hash(self) -> str:
        """What the plan computes: ``devices`` (where it runs) is left out, so a checkpoint or result of
        the plan on one device is the same plan's on N."""
        record = {k: v for k, v in self.resolved().items() if k != "devices"}
        return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _hint(key: str, known) -> str:
    m = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {m[0]!r}?)" if m else f" (known: {', '.join(known)})"


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_check(), Schedule]",) or str(part).startswith(("function-", "constrained")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "greater_than_equal":
        msg = f"must be >= {first['ctx']['ge']}"
    if isinstance(first.get("input"), float) and math.isnan(first["input"]):
        msg = "is not a number (NaN)"
    return f"{source}: {_loc(first['loc'])}: {msg}"


def _validate(record: dict, source: str) -> Plan:
    try:
        return Plan.model_validate(record)
    except ValidationError as err:
        raise InvalidPlan(format_validation_error(err, source)) from None


def parse_plan(record: Any, source: str = "plan") -> Plan:
    """A validated plan. One with ``auto`` fields or ``= expressions`` is checked as resolved
    for the nominal data (``autoplan.NOMINAL``) and keeps its rules: ``plan.resolve(facts)``
    gives the plan for a dataset (``ptycore reconstruct`` does that)."""
    if not isinstance(record, dict):
        raise InvalidPlan(f"{source}: a plan is a mapping with 'stages', got {type(record).__name__}")
    from ptycore.recon.autoplan import NOMINAL, has_rules, resolve_record

    if not has_rules(record):
        return _validate(record, source)
    plan = _validate(resolve_record(record, NOMINAL, source)[0], source)
    plan._rules, plan._source = record, source
    return plan


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise InvalidPlan(f"{path}: plan file not found")
    try:
        record = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidPlan(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_plan(record, str(path))
