"""Parameters: the pytree of what a stage optimises, and how the state is rendered from it.

A stage optimises some of the plan's parameters (``object_phase``, ``object_amplitude``,
``probe``, ``positions``, ``tilts``, ``slice_thickness``). Each is provided by a
*parameterisation* that knows how its part of the :class:`~ptycore.recon.state.State` (the
rendered, physical arrays that losses, constraints and stores see) is made from parameters:

- :class:`PixelObject`: the object as pixels, amplitude and phase ``(obj_modes, slices, Hy, Wx)``;
- :class:`PixelProbe`: the probe as pixels, real and imaginary parts stacked ``(2, modes, ny, nx)``
  in units of the initial peak amplitude (so a learning rate is dose-independent);
- :class:`Direct`: a state field as it is (positions in Å, tilts in mrad, slice thickness in Å).

A parameterisation has four methods. ``carried(state)``: what it must keep between steps
besides the state (nothing for pixels, which *are* the state; a network's weights);
``view(state, carried)``: its parameters (a dict label -> array or pytree) to differentiate;
``render(params, state)``: the state with its arrays made from parameters (what losses see);
``apply(state, carried, params, updates)``: the state and carried values after an optimiser
update. ``render`` also takes the part's ``carried`` (a network needs its input and noise
step; pixels ignore it), and a part may have ``finish(state, carried)``: the state as its
parameters now stand (a network's noise-free output, see :mod:`ptycore.recon.networks`),
called by the engine after its steps and before constraints. Pixels add the update to the
state's own array, so a parameter whose update is 0 stays exactly as it was (a frozen probe is
bit-for-bit the incoming one); a network adds it to its weights and renders. Constraints act on
the rendered state; engines, losses and stores never see anything else.
"""

from __future__ import annotations

import jax.numpy as jnp

from ptycore.recon.state import State


class PixelObject:
    labels = ("object_phase", "object_amplitude")

    def __init__(self, labels):
        self.labels = tuple(labels)

    def carried(self, state: State) -> dict:
        return {}

    def view(self, state: State, carried: dict) -> dict:
        return {label: getattr(state, label) for label in self.labels}

    def render(self, params: dict, state: State, carried: dict | None = None) -> State:
        return state._replace(**{label: params[label] for label in self.labels})

    def apply(self, state: State, carried: dict, params: dict, updates: dict):
        return state._replace(**{label: getattr(state, label) + updates[label] for label in self.labels}), {}


class PixelProbe:
    labels = ("probe",)

    def __init__(self, state: State):
        #: the probe learns in units of its initial peak amplitude: its lr is dose-independent
        self.scale = float(jnp.max(jnp.abs(state.probe))) or 1.0

    def carried(self, state: State) -> dict:
        return {}

    def view(self, state: State, carried: dict) -> dict:
        return {"probe": jnp.stack([state.probe.real, state.probe.imag]) / self.scale}

    def render(self, params: dict, state: State, carried: dict | None = None) -> State:
        return state._replace(probe=self._complex(params["probe"]))

    def apply(self, state: State, carried: dict, params: dict, updates: dict):
        return state._replace(probe=state.probe + self._complex(updates["probe"])), {}

    def _complex(self, value):
        return ((value[0] + 1j * value[1]) * self.scale).astype(jnp.result_type(value.dtype, jnp.complex64))


#: plan parameter name -> State field, for parameters used as they are
DIRECT_FIELDS = {"positions": "positions_A", "tilts": "tilts_mrad", "slice_thickness": "slice_thickness_A"}


class Direct:
    def __init__(self, label: str):
        self.labels = (label,)
        self.field = DIRECT_FIELDS[label]

    def carried(self, state: State) -> dict:
        return {}

    def view(self, state: State, carried: dict) -> dict:
        return {self.labels[0]: getattr(state, self.field)}

    def render(self, params: dict, state: State, carried: dict | None = None) -> State:
        return state._replace(**{self.field: params[self.labels[0]]})

    def apply(self, state: State, carried: dict, params: dict, updates: dict):
        return state._replace(**{self.field: getattr(state, self.field) + updates[self.labels[0]]}), {}


class Parameters:
    """The parameterisations of the parameters a stage optimises (``names``, in plan order),
    with the four methods above over all of them; ``carried`` is a dict per parameterisation."""

    def __init__(self, names, state: State, parameterisations=None):
        self.names = list(names)
        parts = list(parameterisations or [])
        taken = {label for p in parts for label in p.labels}
        object_labels = [n for n in self.names if n in PixelObject.labels and n not in taken]
        if object_labels:
            parts.append(PixelObject(object_labels))
        if "probe" in self.names and "probe" not in taken:
            parts.append(PixelProbe(state))
        parts += [Direct(n) for n in self.names if n in DIRECT_FIELDS and n not in taken]
        self.parts = parts
        missing = set(self.names) - {label for p in parts for label in p.labels}
        if missing:
            raise ValueError(f"no parameterisation for {sorted(missing)}")

    def carried(self, state: State) -> list:
        return [part.carried(state) for part in self.parts]

    def view(self, state: State, carried: list) -> dict:
        out = {}
        for part, c in zip(self.parts, carried, strict=True):
            out.update(part.view(state, c))
        return {n: out[n] for n in self.names}

    def render(self, params: dict, state: State, carried: list | None = None) -> State:
        for i, part in enumerate(self.parts):
            state = part.render(params, state) if carried is None else part.render(params, state, carried[i])
        return state

    def finish(self, state: State, carried: list) -> State:
        """The state as every parameterisation now stands (a network's noise-free output)."""
        for part, c in zip(self.parts, carried, strict=True):
            if hasattr(part, "finish"):
                state = part.finish(state, c)
        return state

    def apply(self, state: State, carried: list, params: dict, updates: dict):
        new = []
        for part, c in zip(self.parts, carried, strict=True):
            state, c = part.apply(state, c, params, updates)
            new.append(c)
        return state, new
