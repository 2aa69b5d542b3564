"""Reconstruction engines behind one seam.

An engine is built from (stage, context, measurement, state, seed) and offers
``init_carry(state)``, ``iteration(carry, it) -> (carry, terms)`` (one compiled call per
iteration), ``to_state(carry)`` and ``compilations()``. The carry is a pytree the stage
runner checkpoints and restores; engines never touch files or progress bars.
"""

from ptycore.recon.engines.epie import EPIEEngine
from ptycore.recon.engines.gradient import GradientEngine
from ptycore.recon.engines.lsqml import LSQMLEngine

ENGINES = {"gradient": GradientEngine, "epie": EPIEEngine, "lsqml": LSQMLEngine}


def make_engine(stage, context, measurement, state, seed: int, stage_index: int = 0):
    try:
        cls = ENGINES[stage.engine]
    except KeyError:
        raise ValueError(f"engine {stage.engine!r} is not available (available: {', '.join(ENGINES)})") from None
    return cls(stage, context, measurement, state, seed=seed, stage_index=stage_index)
