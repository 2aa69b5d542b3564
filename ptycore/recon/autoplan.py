"""Plans that adapt to the data: ``auto`` fields and expressions, resolved from the prepared data.

A plan field may be written as ``auto`` (one of the rules below) or as an expression, a string
starting with ``=`` over the data's facts (``"= clip(ceil(800 / n_batches), 30, 100)"``).
``ptycore reconstruct`` resolves them against the prepared data's metadata before anything
runs; the resolved plan (numbers only) is what runs, what is hashed and what the provenance
records, together with the facts and a note per rule.

Facts (:class:`DataFacts`, from ``prepared.zarr`` and the init): ``energy_kv``,
``convergence_mrad``, ``defocus_A``, ``thickness_A`` (None when unknown), ``dose_e_per_A2``
(mean counts per pattern / scan-step area), ``scan_step_A`` (the larger of dy, dx),
``pixel_size_A``, ``detector_px`` (N), ``n_positions``; derived: ``wavelength_A``,
``depth_of_field_A``, ``probe_radius_A``, ``window_A``, ``overlap``, ``auto_slices``,
``auto_slice_thickness_A``, ``auto_probe_modes``, ``dose_factor``, ``total_counts`` (the
detected electrons of all patterns: the mean counts per pattern × n_positions); per stage
``n_batches`` (= ceil(n_positions / batch_size)), ``slices`` (the stage's resolved slice count),
``iterations`` (the stage's, once resolved: for its losses' schedules) and ``train_counts`` (the
counts of the positions the stage does not hold out, ``N`` of LM's objective: what the MAP weight
of the ``prior`` term, ``W = 1 / (2 N sigma^2)``, needs).

Where expressions may stand: a stage's ``iterations``, ``batch_size``, ``resample`` fields, each
parameter's ``lr``, any other number at the stage's top level, and its losses' weights and
``sigma_rad`` (a number, or any number of a schedule: ``start``, ``end``, ``value``, ``to_iter``, ...).

The rules (each a function here, tested against its formula in tests/test_autoplan.py):

- **slices**: depth of field ``DOF = λ / α²``; slice thickness target
  ``dz = min(DOF / 2, STRONG_SCATTERING_SLICE_A)`` (Nyquist in depth, and no thicker than about
  one zone-axis unit cell: thicker slices cannot follow channelling along a column);
  ``slices = max(1, ceil(thickness / dz))``. Unknown thickness: one slice, with a note.
- **probe_modes** from the dose ``D`` (e/Å²): 1 below ``1e5`` (too few counts to constrain
  another probe), else 2.
- **lr** of a gradient stage's parameter: ``BASE_LR[param] × dose_factor``,
  ``dose_factor = clip(sqrt(D / 1e5), 0.5, 1)``. Per slice: Adam moves each slice's phase by
  about its lr a step whatever the number of slices (measured on 8 SrTiO3 unit cells, steps
  divided by sqrt(slices) left the slices under-fitted in 200 iterations).
- **object_pad_px**: the pixels by which the probe disc at the scan's edge (radius
  ``r = |Δf| α + 0.61 λ / α``) reaches beyond half the probe window, 0 when the probe fits.
- **iterations**: no fixed rule; write an expression (the default plan does).

Checks of the physics (:func:`physics_warnings`, one line each, with the numbers): slices
thicker than ``dz``, a probe diameter ``2r`` larger than the window ``N × pixel``, a linear
overlap ``1 - step / 2r`` below ``MIN_OVERLAP``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

from ptycore.errors import InvalidPlan
from ptycore.physics.electron import wavelength_A

#: the thickest slice that still follows channelling along a zone-axis column (about one
#: perovskite unit cell, 3.9 Å): measured, the 4 Å slices of multislice-study reach SSIM 0.96
#: at 4-6 SrTiO3 unit cells where 4 fixed slices (6-8 Å) reach 0.82-0.85
STRONG_SCATTERING_SLICE_A = 4.0
#: slices per depth of field λ/α² (the depth resolution of multislice ptychography, sampled twice)
SLICES_PER_DEPTH_OF_FIELD = 2
#: dose (e/Å²) from which a second probe mode is fitted
TWO_PROBE_MODES_DOSE = 1e5
#: dose at which the step sizes are the base values (sqrt scaling below, at least half)
FULL_STEP_DOSE = 1e5
#: Adam step sizes of a gradient stage at full dose, per optimiser step, in the parameter's units
BASE_LR = {"object_phase": 0.02, "object_amplitude": 0.002, "probe": 0.01, "positions": 0.005, "tilts": 0.05,
           "slice_thickness": 0.01}
#: linear overlap 1 - step / probe diameter below which the scan is flagged
MIN_OVERLAP = 0.5
#: the Airy radius of the diffraction-limited probe: 0.61 λ / α
AIRY = 0.61


# ---------------------------------------------------------------- the physics rules
def depth_of_field_A(energy_kv: float, convergence_mrad: float) -> float:
    """λ / α² (Å)."""
    alpha = convergence_mrad * 1e-3
    return wavelength_A(energy_kv) / alpha**2


def probe_radius_A(energy_kv: float, convergence_mrad: float, defocus_A: float) -> float:
    """Radius of the probe at the sample: the geometric disc ``|Δf| α`` plus the Airy radius 0.61 λ/α."""
    alpha = convergence_mrad * 1e-3
    return abs(defocus_A) * alpha + AIRY * wavelength_A(energy_kv) / alpha


def slice_thickness_bound_A(energy_kv: float, convergence_mrad: float) -> float:
    """The thickest slice the rules allow: min(λ/α² / 2, STRONG_SCATTERING_SLICE_A)."""
    return min(depth_of_field_A(energy_kv, convergence_mrad) / SLICES_PER_DEPTH_OF_FIELD, STRONG_SCATTERING_SLICE_A)


def auto_slices(thickness_A: float | None, energy_kv: float, convergence_mrad: float) -> int:
    """max(1, ceil(thickness / bound)); 1 when the thickness is unknown."""
    if thickness_A is None:
        return 1
    return max(1, math.ceil(thickness_A / slice_thickness_bound_A(energy_kv, convergence_mrad) - 1e-9))


def auto_probe_modes(dose_e_per_A2: float) -> int:
    return 1 if dose_e_per_A2 < TWO_PROBE_MODES_DOSE else 2


def dose_factor(dose_e_per_A2: float) -> float:
    """clip(sqrt(D / FULL_STEP_DOSE), 0.5, 1): smaller steps on noisier data."""
    return min(1.0, max(0.5, math.sqrt(dose_e_per_A2 / FULL_STEP_DOSE)))


def auto_lr(parameter: str, dose_e_per_A2: float) -> float:
    if parameter not in BASE_LR:
        raise KeyError(parameter)
    return BASE_LR[parameter] * dose_factor(dose_e_per_A2)


def linear_overlap(scan_step_A: float, probe_radius_A: float) -> float:
    """1 - step / (2 r): the fraction of the probe diameter shared by neighbouring positions."""
    return 1.0 - scan_step_A / (2.0 * probe_radius_A)


# ---------------------------------------------------------------- facts
@dataclass(frozen=True)
class DataFacts:
    energy_kv: float
    convergence_mrad: float
    defocus_A: float
    thickness_A: float | None
    dose_e_per_A2: float
    scan_step_A: float
    pixel_size_A: float
    detector_px: int
    n_positions: int
    notes: tuple[str, ...] = field(default=())
    #: mean counts per pattern (e); None: the dose times the scan-step area
    mean_counts: float | None = None

    @property
    def window_A(self) -> float:
        return self.detector_px * self.pixel_size_A

    @property
    def counts_per_pattern(self) -> float:
        """Mean counts per pattern (e): measured, or the dose times the scan-step area."""
        return self.mean_counts if self.mean_counts is not None else self.dose_e_per_A2 * self.scan_step_A ** 2

    def train_counts(self, validation_fraction: float) -> float:
        """The counts of a stage's training positions (those not held out: ``split_validation``'s
        ``round(fraction × n_positions)`` are), the ``N`` of LM's objective ``Phi = sum (a - sqrt(d))^2 / N``."""
        held = int(round(validation_fraction * self.n_positions))
        return self.counts_per_pattern * (self.n_positions - held)

    def names(self) -> dict[str, float]:
        """Every name an expression may use (thickness_A is 0 when unknown)."""
        r = probe_radius_A(self.energy_kv, self.convergence_mrad, self.defocus_A)
        return {
            "energy_kv": self.energy_kv, "convergence_mrad": self.convergence_mrad, "defocus_A": self.defocus_A,
            "thickness_A": self.thickness_A or 0.0, "dose_e_per_A2": self.dose_e_per_A2,
            "scan_step_A": self.scan_step_A, "pixel_size_A": self.pixel_size_A, "detector_px": self.detector_px,
            "n_positions": self.n_positions, "wavelength_A": wavelength_A(self.energy_kv),
            "depth_of_field_A": depth_of_field_A(self.energy_kv, self.convergence_mrad), "probe_radius_A": r,
            "window_A": self.window_A, "overlap": linear_overlap(self.scan_step_A, r),
            "auto_slices": auto_slices(self.thickness_A, self.energy_kv, self.convergence_mrad),
            "auto_slice_thickness_A": slice_thickness_bound_A(self.energy_kv, self.convergence_mrad),
            "auto_probe_modes": auto_probe_modes(self.dose_e_per_A2), "dose_factor": dose_factor(self.dose_e_per_A2),
            "total_counts": self.counts_per_pattern * self.n_positions,
        }

    def record(self) -> dict:
        return {**asdict(self), "notes": list(self.notes)}


#: what an adaptive plan is checked against when no data is given (``ptycore plans``, load_plan):
#: 6 SrTiO3 unit cells at 300 kV, 21.4 mrad, 150 Å defocus, 1e6 e/Å², 16×16 scan, 48 px
NOMINAL = DataFacts(energy_kv=300.0, convergence_mrad=21.4, defocus_A=150.0, thickness_A=23.43,
                    dose_e_per_A2=1e6, scan_step_A=0.4, pixel_size_A=0.325, detector_px=48, n_positions=256)


def facts_from_metadata(meta: dict, *, pixel_size_A: float, detector_px: int, n_positions: int,
                        mean_counts: float | None, thickness_A: float | None = None) -> DataFacts:
    """Facts from a prepared store's ``attrs['metadata']`` (a mapping) and its shapes.

    ``thickness_A`` overrides the metadata's (the init's, e.g. from an init config); the dose
    is the mean counts per pattern over the scan-step area (the metadata's dose_e_per_A2 when
    the counts are not known)."""
    step = meta.get("scan_step_A") or [1.0, 1.0]
    step_y, step_x = (float(step[0]), float(step[-1]))
    notes = []
    thickness = thickness_A if thickness_A is not None else meta.get("thickness_A")
    if thickness is None:
        notes.append("the sample thickness is unknown (no thickness_A in the metadata): auto slices = 1, a "
                     "single-slice reconstruction; give thickness_A for a multislice one")
    if mean_counts is not None and mean_counts > 0:
        dose = float(mean_counts) / (step_y * step_x)
    elif meta.get("dose_e_per_A2"):
        dose = float(meta["dose_e_per_A2"])
    else:
        dose = NOMINAL.dose_e_per_A2
        notes.append(f"the dose is unknown: auto rules assume {dose:g} e/Å²")
    return DataFacts(energy_kv=float(meta["energy_kv"]), convergence_mrad=float(meta["convergence_mrad"]),
                     defocus_A=float(meta.get("defocus_A") or 0.0),
                     thickness_A=None if thickness is None else float(thickness), dose_e_per_A2=dose,
                     scan_step_A=max(step_y, step_x), pixel_size_A=float(pixel_size_A), detector_px=int(detector_px),
                     n_positions=int(n_positions), notes=tuple(notes),
                     mean_counts=float(mean_counts) if mean_counts is not None and mean_counts > 0 else None)


# ---------------------------------------------------------------- resolving a plan record
#: the fields ``auto`` may stand for (within each stage)
AUTO_FIELDS = ("resample.slices", "resample.slice_thickness_A", "resample.probe_modes", "resample.object_pad_px",
               "optimize.<parameter>.lr")


def is_rule(value) -> bool:
    return value == "auto" or (isinstance(value, str) and value.lstrip().startswith("="))


def has_rules(record) -> bool:
    """Whether a plan mapping has any ``auto`` or ``= expression`` value."""
    if isinstance(record, dict):
        return any(has_rules(v) for v in record.values())
    if isinstance(record, list):
        return any(has_rules(v) for v in record)
    return is_rule(record)


def evaluate(expression: str, names: dict, where: str) -> float:
    """Evaluate ``= expression`` (arithmetic, comparisons, ``a if c else b``, and min, max, ceil,
    floor, round, sqrt, log10, clip(x, lo, hi)) over ``names``; InvalidPlan naming ``where``."""
    from simpleeval import EvalWithCompoundTypes, InvalidExpression

    functions = {"min": min, "max": max, "ceil": math.ceil, "floor": math.floor, "round": round, "sqrt": math.sqrt,
                 "log10": math.log10, "abs": abs, "clip": lambda x, lo, hi: min(max(x, lo), hi)}
    text = expression.lstrip()[1:].strip()
    try:
        value = EvalWithCompoundTypes(names=names, functions=functions).eval(text)
    except InvalidExpression as err:
        known = ", ".join(sorted(names))
        raise InvalidPlan(f"{where}: {expression!r}: {err} (names: {known})") from None
    except (ArithmeticError, ValueError, TypeError, SyntaxError) as err:
        raise InvalidPlan(f"{where}: {expression!r}: {err.__class__.__name__}: {err}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidPlan(f"{where}: {expression!r} gives {value!r}, not a finite number")
    return value


def _integral(value, where):
    if isinstance(value, float):
        if abs(value - round(value)) > 1e-9:
            raise InvalidPlan(f"{where}: must be a whole number, the rule gives {value:g}")
        value = int(round(value))
    return value


def resolve_record(record: dict, facts: DataFacts, source: str = "plan") -> tuple[dict, list[str]]:
    """The plan mapping with every ``auto`` and expression replaced by its number, and a note per
    rule (``stages[1].resample.slices: auto = 6 (thickness 23.4 Å / slice bound 4 Å)``)."""
    out = copy.deepcopy(record)
    names = facts.names()
    notes = list(facts.notes)
    stages = out.get("stages") if isinstance(out, dict) else None
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if not isinstance(stage, dict):
            continue
        where = f"{source}: stages[{i}]"
        batch = stage.get("batch_size", 32)
        if is_rule(batch):
            stage["batch_size"] = batch = _integral(_value(batch, names, f"{where}.batch_size", None), where)
        local = {**names, "n_batches": math.ceil(facts.n_positions / max(1, int(batch)))}
        resample = stage.get("resample") if isinstance(stage.get("resample"), dict) else {}
        slices = None
        for key in ("slices", "slice_thickness_A", "probe_modes", "object_pad_px"):
            if key in resample and is_rule(resample[key]):
                value = _value(resample[key], local, f"{where}.resample.{key}", _auto_resample(key, facts))
                resample[key] = _integral(value, f"{where}.resample.{key}") if key != "slice_thickness_A" else value
                notes.append(f"stages[{i}].resample.{key}: {_rule_text(key, facts, resample[key])}")
            if key == "slices" and isinstance(resample.get(key), int):
                slices = resample[key]
        if slices is None and isinstance(resample.get("slice_thickness_A"), (int, float)) and facts.thickness_A:
            slices = max(1, round(facts.thickness_A / resample["slice_thickness_A"]))
        local["slices"] = slices if slices is not None else (1 if i == 0 else local.get("slices", 1))
        names["slices"] = local["slices"]  # a later stage without resample.slices keeps the slices it gets
        if is_rule(stage.get("iterations")):
            stage["iterations"] = _integral(_value(stage["iterations"], local, f"{where}.iterations", None),
                                            f"{where}.iterations")
            notes.append(f"stages[{i}].iterations: {stage['iterations']} ({stage.get('name')}, "
                         f"{local['n_batches']} batches per iteration)")
        local["iterations"] = stage.get("iterations") if isinstance(stage.get("iterations"), int) else 0
        fraction = stage.get("validation_fraction", 0.0)
        local["train_counts"] = facts.train_counts(fraction if isinstance(fraction, (int, float)) else 0.0)
        losses = stage.get("losses") or {}
        for lname, loss in list(losses.items()):
            if not has_rules(loss):
                continue
            lwhere = f"{where}.losses.{lname}"
            if isinstance(loss, dict):
                for key in ("weight", "sigma_rad"):
                    _resolve_schedule(loss, key, local, f"{lwhere}.{key}")
            else:
                _resolve_schedule(losses, lname, local, lwhere)
            notes.append(f"stages[{i}].losses.{lname}: {_loss_text(losses[lname])} "
                         f"(train_counts {local['train_counts']:.4g}, iterations {local['iterations']})")
        engine = stage.get("engine", "gradient")
        for param, opt in (stage.get("optimize") or {}).items():
            if isinstance(opt, dict) and is_rule(opt.get("lr")):
                auto = None
                if engine == "gradient" and param in BASE_LR:
                    auto = auto_lr(param, facts.dose_e_per_A2)
                elif opt.get("lr") == "auto":
                    raise InvalidPlan(f"{where}.optimize.{param}.lr: 'auto' is a rule for gradient stages only "
                                      f"(this stage runs {engine!r}); give a number")
                opt["lr"] = float(_value(opt["lr"], local, f"{where}.optimize.{param}.lr", auto))
                notes.append(f"stages[{i}].optimize.{param}.lr: {opt['lr']:.4g}")
        for key, value in list(stage.items()):  # any other expression at the stage's top level
            if isinstance(value, str) and value.lstrip().startswith("="):
                stage[key] = _value(value, local, f"{where}.{key}", None)
    _no_rules_left(out, source)
    return out, notes


def _loss_text(loss) -> str:
    """A resolved loss's numbers, for the plan's notes."""
    resolved = loss if isinstance(loss, dict) else {"weight": loss}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                     f"{k} " + " ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
                     for k, v in resolved.items() if isinstance(v, (float, dict)))


def _resolve_schedule(container: dict, key: str, names: dict, where: str) -> None:
    """``container[key]``, a number or a schedule mapping, with its expressions evaluated."""
    value = container.get(key)
    if is_rule(value):
        container[key] = float(_value(value, names, where, None))
    elif isinstance(value, dict):
        for k, v in value.items():
            if is_rule(v):
                number = _value(v, names, f"{where}.{k}", None)
                value[k] = _integral(number, f"{where}.{k}") if k.endswith("_iter") else float(number)
        for i, point in enumerate(value.get("points") or []):
            if isinstance(point, (list, tuple)) and len(point) == 2:
                it, v = point
                w = f"{where}.points[{i}]"
                value["points"][i] = [_integral(_value(it, names, w, None), w) if is_rule(it) else it,
                                      float(_value(v, names, w, None)) if is_rule(v) else v]


def _value(value, names, where, auto):
    if value == "auto":
        if auto is None:
            raise InvalidPlan(f"{where}: no 'auto' rule for this field (auto is known for "
                              f"{', '.join(AUTO_FIELDS)}); write a number or an expression '= ...'")
        return auto
    return evaluate(value, names, where)


def _auto_resample(key: str, facts: DataFacts):
    if key == "slices":
        return auto_slices(facts.thickness_A, facts.energy_kv, facts.convergence_mrad)
    if key == "slice_thickness_A":
        return slice_thickness_bound_A(facts.energy_kv, facts.convergence_mrad)
    if key == "probe_modes":
        return auto_probe_modes(facts.dose_e_per_A2)
    r = probe_radius_A(facts.energy_kv, facts.convergence_mrad, facts.defocus_A)
    return max(0, math.ceil((r - facts.window_A / 2) / facts.pixel_size_A))


def _rule_text(key: str, facts: DataFacts, value) -> str:
    bound = slice_thickness_bound_A(facts.energy_kv, facts.convergence_mrad)
    dof = depth_of_field_A(facts.energy_kv, facts.convergence_mrad)
    if key == "slices":
        if facts.thickness_A is None:
            return f"{value} (the sample thickness is unknown: a single slice; give thickness_A for more)"
        return (f"{value} (thickness {facts.thickness_A:.4g} Å / slice bound {bound:.3g} Å = min(λ/α² / 2 = "
                f"{dof / 2:.3g}, {STRONG_SCATTERING_SLICE_A:g}))")
    if key == "slice_thickness_A":
        return f"{value:.4g} Å (min(λ/α² / 2 = {dof / 2:.3g}, {STRONG_SCATTERING_SLICE_A:g}))"
    if key == "probe_modes":
        return f"{value} (dose {facts.dose_e_per_A2:.3g} e/Å²)"
    return f"{value} px (probe radius {probe_radius_A(facts.energy_kv, facts.convergence_mrad, facts.defocus_A):.3g} " \
           f"Å, window {facts.window_A:.3g} Å)"


def _no_rules_left(record, source, path=""):
    if isinstance(record, dict):
        for k, v in record.items():
            _no_rules_left(v, source, f"{path}.{k}" if path else str(k))
    elif isinstance(record, list):
        for i, v in enumerate(record):
            _no_rules_left(v, source, f"{path}[{i}]")
    elif is_rule(record):
        raise InvalidPlan(f"{source}: {path}: {record!r}: 'auto' or an expression is not allowed here (auto is "
                          f"known for {', '.join(AUTO_FIELDS)}; expressions for numbers of a stage's iterations, "
                          "batch_size, resample and lr)")


# ---------------------------------------------------------------- physics checks
def physics_warnings(facts: DataFacts, *, slices: int | None = None,
                     slice_thickness_A: float | None = None) -> list[str]:
    """One line each, with the numbers: slices too thick for the stated thickness, a probe that
    does not fit its window at this defocus, a scan overlap too low."""
    out = []
    bound = slice_thickness_bound_A(facts.energy_kv, facts.convergence_mrad)
    if slices is not None and slice_thickness_A is not None and slices > 1 and slice_thickness_A > 1.5 * bound:
        out.append(f"slices of {slice_thickness_A:.3g} Å are too thick for this sample: {slices} slices over "
                   f"{slices * slice_thickness_A:.4g} Å, the bound min(λ/α² / 2, {STRONG_SCATTERING_SLICE_A:g} Å) is "
                   f"{bound:.3g} Å at {facts.energy_kv:g} kV, {facts.convergence_mrad:g} mrad (use "
                   f"{auto_slices(slices * slice_thickness_A, facts.energy_kv, facts.convergence_mrad)} slices)")
    r = probe_radius_A(facts.energy_kv, facts.convergence_mrad, facts.defocus_A)
    if 2 * r > facts.window_A:
        out.append(f"the probe does not fit its window: diameter 2(|Δf|α + 0.61λ/α) = {2 * r:.3g} Å at defocus "
                   f"{facts.defocus_A:g} Å, {facts.convergence_mrad:g} mrad, window {facts.detector_px} px × "
                   f"{facts.pixel_size_A:.4g} Å = {facts.window_A:.3g} Å (less defocus, or a finer detector pixel)")
    overlap = linear_overlap(facts.scan_step_A, r)
    if overlap < MIN_OVERLAP:
        out.append(f"the scan overlap is low: 1 - step/diameter = 1 - {facts.scan_step_A:.3g} / {2 * r:.3g} Å = "
                   f"{overlap:.2f} (< {MIN_OVERLAP}); the reconstruction may not be unique (smaller steps or more "
                   "defocus)")
    return out


# ---------------------------------------------------------------- for a run
def facts_for_run(data_attrs: dict, patterns_shape, init_attrs: dict, state_thickness_A: float,
                  source: str = "data") -> DataFacts:
    """Facts of a reconstruction's inputs: the prepared store's attrs (metadata, pixel size, mean
    counts) and patterns shape, and the thickness the init carries (``attrs['thickness_A']``, None
    when unknown; older stores without it: their slices × slice thickness), and its convergence
    semi-angle when the init config overrode the metadata's (``attrs['convergence_mrad']``)."""
    meta = data_attrs.get("metadata")
    if not isinstance(meta, dict) or "pixel_size_A" not in data_attrs or patterns_shape is None:
        from ptycore.errors import InvalidData

        raise InvalidData(f"{source}: no metadata, pixel_size_A or patterns to resolve the plan's auto fields from "
                          "(run 'ptycore preprocess' first)")
    stats = data_attrs.get("stats") or {}
    thickness = init_attrs["thickness_A"] if "thickness_A" in init_attrs else state_thickness_A
    if init_attrs.get("convergence_mrad") is not None:  # the init config's override (what the run fits with)
        meta = {**meta, "convergence_mrad": init_attrs["convergence_mrad"]}
    return facts_from_metadata(meta, pixel_size_A=float(data_attrs["pixel_size_A"]),
                               detector_px=int(patterns_shape[-1]), n_positions=int(patterns_shape[0]),
                               mean_counts=stats.get("mean_counts"), thickness_A=thickness)


def slice_warnings(facts: DataFacts, stages, n_slices: int, total_thickness_A: float) -> list[str]:
    """physics_warnings for the slices each stage runs (a stage's resample changes them, the next
    stage keeps them), and for the probe and the scan, each line once."""
    out = physics_warnings(facts)
    if facts.thickness_A is None:
        return out
    for stage in stages:
        rs = stage.resample
        if rs.slices is not None:
            n_slices = rs.slices
        elif rs.slice_thickness_A is not None:
            n_slices = max(1, round(total_thickness_A / rs.slice_thickness_A))
        for line in physics_warnings(facts, slices=n_slices, slice_thickness_A=total_thickness_A / n_slices):
            if line not in out:
                out.append(f"stage {stage.name!r}: {line}" if line.startswith("slices") else line)
    return list(dict.fromkeys(out))
