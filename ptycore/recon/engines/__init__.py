"""Reconstruction engines behind one seam.

An engine is built from (stage, context, measurement, state, seed) and offers
``init_carry(state)``, ``iteration(carry, it) -> (carry, terms)`` (one compiled call per
iteration), ``to_state(carry)`` and ``compilations()``. The carry is a pytree the stage
runner checkpoints and restores; engines never touch files or progress bars. Which engines
exist, their options and what they can refine is declared once, in
:mod:`ptycore.recon.engines.registry`.
"""

from ptycore.errors import InvalidPlan
from ptycore.recon.engines.registry import REGISTRY, EngineSpec


def make_engine(stage, context, measurement, state, seed: int, stage_index: int = 0):
    """Build the stage's engine. What the registry cannot check from the plan alone (the number
    of object modes of the incoming state) is checked here and reported as a plan error."""
    spec: EngineSpec = REGISTRY[stage.engine]  # the plan validated the name
    n_obj = int(state.object_phase.shape[0])
    if spec.object_modes is not None and n_obj != spec.object_modes:
        raise InvalidPlan(f"stage {stage.name!r}: engine {stage.engine!r} supports {spec.object_modes} object "
                          f"mode(s), the incoming object has {n_obj}")
    return spec.load()(stage, context, measurement, state, seed=seed, stage_index=stage_index)


__all__ = ["REGISTRY", "EngineSpec", "make_engine"]
