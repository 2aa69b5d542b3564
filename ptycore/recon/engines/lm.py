"""Levenberg-Marquardt engine: matrix-free generalised Gauss-Newton steps.

The objective is the problem's noise-model loss over every training position,
``Phi(x) = sum_positions sum_pixels l(a(x)) / N`` (``a``: model amplitudes, ``N``: the measured
counts; see :mod:`ptycore.recon.problem`). One outer step (one compiled call):

1. **Gradient and scale** (skipped after a rejected step: nothing moved): ``g = J^T (h r) / N``
   summed over position batches under ``lax.scan``, and a diagonal ``D`` that approximates
   ``diag(G)`` from the illumination: ``h/2 |P|^2 |O|^2`` per object pixel for the phase,
   ``h/2 |P|^2`` for the amplitude (``sum |P|^2`` over positions and probe modes scattered into
   the object frame), ``h/2 s^2 sum |O|^2`` for the probe (``s``: the probe parameterisation's
   scale), and for positions the exact diagonal from two Jacobian-vector products (a pattern
   depends on its own position only).
2. **Damped Gauss-Newton system** ``(G + lambda D) d = -g`` with ``G v = J^T diag(h) J v / N``,
   products accumulated over position batches under ``lax.scan`` (``jax.linearize`` then
   ``jax.linear_transpose``, so memory stays one batch), solved by preconditioned conjugate
   gradients: Jacobi preconditioner ``(1 + lambda) D`` (on by default), warm start from the
   previous step, forcing tolerance ``|r| <= tol |g|``, at most ``cg_iterations`` iterations.
   Without ``marquardt`` the damping matrix is the identity times the mean of ``D``. With
   ``damping_floor`` f > 0 each parameter's damping scale is ``max(D, f max D)``: Marquardt's
   diagonal alone damps a weakly lit pixel (the field's edge; depth-alternating patterns between
   slices) only by its own tiny curvature, so one step can move it by radians; the floor damps it
   as at least the fraction f of the best-lit ones, as rPIE regularises ePIE's denominator
   (Maiden et al., Optica 4, 736 (2017)).
3. **Gain ratio** ``rho = (Phi(x) - Phi(x + d)) / (-g.d - d.G.d / 2)``: the step is accepted if
   ``rho > 1e-4`` (then the constraints that are due are applied), else the parameters stay
   exactly as they were; the damping is multiplied by 4 when ``rho < 0.25`` (or on rejection)
   and by 1/4 when ``rho > 0.75`` (Kandel et al., Opt. Express 29, 23019 (2021)), within
   ``[damping_min, damping_max]``.

With a ``prior`` loss (RED, :mod:`ptycore.prior.guidance`) the objective has the extra residuals
``sqrt(W) (P(phase) - t)``: ``Phi += W/2 |P(phase) - t|^2``, ``g += W P^T (P(phase) - t)``,
``G v += W P^T P v`` (exact: the residuals are linear in the phase) and ``D += W diag(P^T P)``;
the target ``t = sg(D_sigma(P(phase)))`` is renewed at the start of a step after an accepted one
(kept after a rejection), so the gain ratio compares one objective and an accepted step lowers
it (history: ``prior``, ``prior_sigma_rad``, ``lm_objective_start``).

A parameter takes part from its ``start`` to its ``stop`` (its tangent components are zero
otherwise); its ``lr`` must be > 0 and is otherwise unused (LM's step length comes from the
system). History per step: the data terms at the start of the step, ``lm_objective`` after it,
``damping``, ``cg_iterations``, ``gain_ratio``, ``accepted`` and ``gradient_equivalents`` (one
value-and-gradient pass = 1, a Gauss-Newton product, i.e. a jvp + vjp pair, = 2, a forward-only
loss = 0.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ptycore.physics.shifts import crop_patches, split_positions
from ptycore.recon.constraints import apply_constraints
from ptycore.recon.engines.base import Engine
from ptycore.recon.parameters import Parameters, PixelProbe
from ptycore.recon.placement import positions_sum, varying_like
from ptycore.recon.state import State

#: smallest gain ratio of an accepted step
ACCEPT_RATIO = 1e-4


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y).real for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                                                   strict=True))


def tree_axpy(alpha, x, y):
    """alpha * x + y over pytrees."""
    return jax.tree_util.tree_map(lambda u, v: alpha * u + v, x, y)


def _zeros(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def pcg(matvec, b, x0, precondition, *, max_iterations: int, tolerance: float):
    """Preconditioned conjugate gradients for ``A x = b`` (``A`` symmetric positive definite, given
    by ``matvec``; ``precondition(r)`` applies ``M^-1``), from ``x0``, until
    ``|r| <= tolerance |b|`` or ``max_iterations`` products after the start. Returns
    ``(x, A x, iterations)``."""
    ax0 = matvec(x0)
    r0 = tree_axpy(-1.0, ax0, b)
    z0 = precondition(r0)
    target = tolerance**2 * tree_vdot(b, b)

    def cond(c):
        k, _, _, r, _, _, _ = c
        return (k < max_iterations) & (tree_vdot(r, r) > target)

    def body(c):
        k, x, ax, r, z, p, rz = c
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = tree_axpy(alpha, p, x)
        ax = tree_axpy(alpha, ap, ax)
        r = tree_axpy(-alpha, ap, r)
        z = precondition(r)
        rz_new = tree_vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = tree_axpy(beta, p, z)
        return k + 1, x, ax, r, z, p, rz_new

    init = (jnp.zeros((), jnp.int32), x0, ax0, r0, z0, z0, tree_vdot(r0, z0))
    k, x, ax, *_ = lax.while_loop(cond, body, init)
    return x, ax, k


class LMEngine(Engine):
    """Matrix-free Levenberg-Marquardt (see the module docstring)."""

    fixed_batches = True

    def __init__(self, stage, context, measurement, state: State, *, seed: int, stage_index: int = 0):
        super().__init__(stage, context, measurement, state, seed=seed, stage_index=stage_index)
        self.options = stage.options
        self.names = list(stage.optimize)
        self.parameters = Parameters(self.names, state)
        counts = self.counts(self.train_idx)
        self.norm = 1.0 / max(counts, 1e-12)
        probe_part = [p for p in self.parameters.parts if isinstance(p, PixelProbe)]
        self.probe_scale = probe_part[0].scale if probe_part else 1.0
        self.curvature = 2.0 if self.options.noise_model == "amplitude" else 4.0  # typical h near the fit
        # the same batches every step: LM sums over all positions, the grouping only bounds memory
        idx, mask = self.batches(0)
        self._fixed_batches = (jnp.asarray(idx), jnp.asarray(mask))

    def batches(self, it: int):
        if hasattr(self, "_fixed_batches"):
            return self._fixed_batches
        return super().batches(it)

    # ------------------------------------------------------------ carry
    def init_carry(self, state: State):
        carried = self.parameters.carried(state)
        params = self.parameters.view(state, carried)
        zeros = _zeros(params)
        real = self.measured.dtype  # float32, or float64 under jax x64
        lm = {"damping": jnp.asarray(self.options.damping, real), "step": zeros, "fresh": jnp.bool_(True),
              "objective": jnp.asarray(jnp.inf, real), "gradient": zeros, "scale": zeros,
              "terms": {n: jnp.zeros((), real) for n in self._term_names()}}
        if self._prior is not None:  # the RED target of the current object (renewed after every accepted step)
            lm["prior_target"] = jnp.zeros(self._prior.to_prior(state.object_phase).shape, real)
        return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (state, carried, lm))

    def to_state(self, carry) -> State:
        return carry[0]

    def _term_names(self):
        return ["single"] + [n for n in self.stage.losses if n not in ("single", "prior")]

    # ------------------------------------------------------------ the prior's residuals (RED)
    @property
    def _prior(self):
        return self.problem.prior_map if "prior" in self.stage.losses else None

    def prior_target(self, params, state, sigma_rad):
        """``sg(D_sigma(P(phase)))`` of the object the parameters render (its residuals' target)."""
        return self._prior.red_target(self.parameters.render(params, state).object_phase, sigma_rad)

    def prior_parts(self, params, state, target, weight):
        """The prior residuals ``sqrt(W) (P(phase) - target)`` as objective ``W/2 |.|^2``, its
        gradient ``W P^T (P(phase) - target)`` and its share ``W diag(P^T P)`` of the diagonal
        scale, over the parameters (zeros unless ``object_phase`` is one)."""
        phase = self.parameters.render(params, state).object_phase
        value = self._prior.red_loss(phase, target)
        grad, scale = _zeros(params), _zeros(params)
        if "object_phase" in params:
            grad["object_phase"] = weight * self._prior.red_gradient(phase, target)
            scale["object_phase"] = jnp.full_like(params["object_phase"], weight * self._prior.normal_diagonal())
        return weight * value, grad, scale, value

    def prior_product(self, v, weight):
        """The prior residuals' Gauss-Newton product ``W P^T P v`` (exact: they are linear in the phase)."""
        out = _zeros(v)
        if "object_phase" in v:
            out["object_phase"] = weight * self._prior.normal_product(v["object_phase"])
        return out

    # ------------------------------------------------------------ the model as a function of parameters
    def amplitudes(self, params, state, idx):
        return self.problem.amplitudes(self.parameters.render(params, state), idx)

    def objective(self, params, state, measured, batches, masks):
        """``Phi``: the noise-model loss over every batch (forward only)."""

        def body(total, batch):
            idx, mask = batch
            _, _, loss = self.problem.residuals(self.amplitudes(params, state, idx), measured[idx], mask)
            return total + positions_sum(jnp.sum(loss)), None

        total, _ = lax.scan(body, jnp.zeros((), measured.dtype), (batches, masks))
        return total * self.norm

    def gradient(self, params, state, measured, batches, masks):
        """``(Phi, g, D, terms)``: objective, gradient, the diagonal scale and the batch-mean data terms."""

        def body(acc, batch):
            idx, mask = batch
            a, vjp = jax.vjp(lambda p: self.amplitudes(p, state, idx), params)
            r, h, loss = self.problem.residuals(a, measured[idx], mask)
            (g,) = positions_sum(vjp(h * r))
            total, grad, scale = acc
            scale = jax.tree_util.tree_map(jnp.add, scale,
                                           positions_sum(self._batch_scale(params, state, idx, mask, h)))
            terms = self.problem.data_terms(a * a, measured[idx], mask, self._term_names())
            return (total + positions_sum(jnp.sum(loss)), jax.tree_util.tree_map(jnp.add, grad, g), scale), terms

        init = (jnp.zeros((), measured.dtype), _zeros(params), _zeros(params))
        (total, grad, scale), terms = lax.scan(body, init, (batches, masks))
        grad = jax.tree_util.tree_map(lambda x: x * self.norm, grad)
        scale = jax.tree_util.tree_map(lambda x: x * self.norm, scale)
        return total * self.norm, grad, scale, {k: jnp.mean(v) for k, v in terms.items()}

    def _batch_scale(self, params, state, idx, mask, h):
        """This batch's share of the diagonal ``D`` (see the module docstring)."""
        s = self.parameters.render(params, state)
        window = self.ctx.optics.grid.shape
        top_left, _ = split_positions(s.positions_A[idx], self.ctx.optics.grid.pixel_size_A, window)
        half_h = 0.5 * self.curvature
        out = _zeros(params)
        obj_shape = s.object_phase.shape[-2:]
        if "object_phase" in params or "object_amplitude" in params:
            probe2 = jnp.sum(jnp.abs(s.probe) ** 2, axis=0)  # (ny, nx), summed over modes
            weights = jnp.broadcast_to(probe2, (idx.shape[0],) + probe2.shape) * mask[:, None, None]
            crop = lambda a: crop_patches(a, top_left, window)  # noqa: E731
            illum = jax.linear_transpose(crop, jnp.zeros(obj_shape, weights.dtype))(weights)[0]
            if "object_phase" in params:
                out["object_phase"] = jnp.broadcast_to(half_h * illum * s.object_amplitude**2,
                                                       params["object_phase"].shape)
            if "object_amplitude" in params:
                out["object_amplitude"] = jnp.broadcast_to(half_h * illum, params["object_amplitude"].shape)
        if "probe" in params:
            obj2 = jnp.prod(s.object_amplitude[0] ** 2, axis=0)  # (Hy, Wx), through every slice
            patches = crop_patches(obj2, top_left, window) * mask[:, None, None]
            out["probe"] = jnp.broadcast_to(half_h * self.probe_scale**2 * jnp.sum(patches, axis=0),
                                            params["probe"].shape)
        if "positions" in params:
            f = lambda p: self.amplitudes(p, state, idx)  # noqa: E731
            rows = []
            for axis in (0, 1):
                tangent = _zeros(params)
                tangent["positions"] = tangent["positions"].at[idx, axis].set(1.0)
                # on N devices the tangent is the device's own positions: primal and tangent vary
                _, jv = jax.jvp(f, (varying_like(params, idx),), (varying_like(tangent, idx),))
                rows.append(jnp.sum(h * jv**2, axis=(-2, -1)))  # (batch,)
            diag = jnp.stack(rows, axis=-1) * mask[:, None]
            out["positions"] = jnp.zeros_like(params["positions"]).at[idx].add(diag)
        return out

    def gauss_newton_product(self, params, state, v, measured, batches, masks):
        """``G v = J^T diag(h) J v / N`` over every batch (one batch in memory at a time)."""

        def body(acc, batch):
            idx, mask = batch
            a, f_jvp = jax.linearize(lambda p: self.amplitudes(p, state, idx), params)
            _, h, _ = self.problem.residuals(a, measured[idx], mask)
            (jtu,) = positions_sum(jax.linear_transpose(f_jvp, params)(h * f_jvp(v)))
            return jax.tree_util.tree_map(jnp.add, acc, jtu), None

        total, _ = lax.scan(body, _zeros(params), (batches, masks))
        return jax.tree_util.tree_map(lambda x: x * self.norm, total)

    def solve(self, params, state, gradient, scale, damping, x0, active, measured, batches, masks, prior_weight=None):
        """PCG on the damped system; returns ``(step, G step, iterations)``. ``active`` (label ->
        bool) zeroes the components of parameters that do not take part. With ``prior_weight``
        ``G`` includes the prior residuals' block (``gradient`` and ``scale`` then include theirs)."""
        gate = lambda tree: {n: jnp.where(active[n], x, jnp.zeros_like(x)) for n, x in tree.items()}  # noqa: E731
        if self.options.marquardt:
            damp = scale
        else:
            mean = sum(jnp.sum(x) for x in scale.values()) / sum(x.size for x in scale.values())
            damp = jax.tree_util.tree_map(lambda x: jnp.full_like(x, mean), scale)
        # pixels no probe reaches have D = 0: a small floor keeps the damped system definite there
        floor = 1e-6 * jnp.max(jnp.stack([jnp.max(x) for x in damp.values()]))
        if self.options.damping_floor > 0:  # each parameter's weakly lit pixels: at least f of its largest
            damp = {n: jnp.maximum(x, self.options.damping_floor * jnp.max(x)) for n, x in damp.items()}
        damp = jax.tree_util.tree_map(lambda x: jnp.maximum(x, floor), damp)

        def matvec(v):
            v = gate(v)
            gv = self.gauss_newton_product(params, state, v, measured, batches, masks)
            if prior_weight is not None:
                gv = jax.tree_util.tree_map(jnp.add, gv, self.prior_product(v, prior_weight))
            return gate(tree_axpy(damping, jax.tree_util.tree_map(jnp.multiply, damp, v), gv))

        if self.options.preconditioner:
            # Jacobi: diag(G + lambda D) ~ D_G + lambda D (D_G: the illumination estimate of diag G)
            diag = jax.tree_util.tree_map(lambda s, d: jnp.maximum(s, floor) + damping * d, scale, damp)
            precondition = lambda r: gate(jax.tree_util.tree_map(jnp.divide, r, diag))  # noqa: E731
        else:
            precondition = gate
        b = gate(jax.tree_util.tree_map(jnp.negative, gradient))
        x, ax, k = pcg(matvec, b, gate(x0), precondition, max_iterations=self.options.cg_iterations,
                       tolerance=self.options.cg_tolerance)
        gx = tree_axpy(-damping, jax.tree_util.tree_map(jnp.multiply, damp, x), ax)
        return x, gx, k

    # ------------------------------------------------------------ the compiled outer step
    def _iteration_impl(self, carry, measured, batches, masks, val_batches, val_masks, hyper):
        state, carried, lm = carry
        params = self.parameters.view(state, carried)
        active = hyper["active"]

        def fresh():
            return self.gradient(params, state, measured, batches, masks)

        def reuse():
            return lm["objective"], lm["gradient"], lm["scale"], lm["terms"]

        objective, gradient, scale, terms = lax.cond(lm["fresh"], fresh, reuse)
        data_objective, data_gradient, data_scale = objective, gradient, scale
        prior_weight, prior_extra = None, {}
        if self._prior is not None:  # Phi += W/2 |P(phase) - t|^2, t denoised at the step's start (kept if rejected)
            target = lax.cond(lm["fresh"], lambda: self.prior_target(params, state, hyper["prior_sigma_rad"]),
                              lambda: lm["prior_target"])
            prior_weight = hyper["prior_weight"]
            value, p_grad, p_scale, raw = self.prior_parts(params, state, target, prior_weight)
            objective = objective + value
            gradient = jax.tree_util.tree_map(jnp.add, gradient, p_grad)
            scale = jax.tree_util.tree_map(jnp.add, scale, p_scale)
            prior_extra = {"prior": raw, "prior_sigma_rad": hyper["prior_sigma_rad"]}
        damping = lm["damping"]
        step, g_step, cg_iterations = self.solve(params, state, gradient, scale, damping, lm["step"], active,
                                                 measured, batches, masks, prior_weight)
        trial = jax.tree_util.tree_map(jnp.add, params, step)
        trial_data = self.objective(trial, state, measured, batches, masks)
        trial_objective = trial_data
        if self._prior is not None:
            trial_objective = trial_data + self.prior_parts(trial, state, target, prior_weight)[0]
        predicted = -tree_vdot(gradient, step) - 0.5 * tree_vdot(step, g_step)
        actual = objective - trial_objective
        ratio = jnp.where(predicted > 0, actual / jnp.where(predicted > 0, predicted, 1.0), -1.0)
        accepted = jnp.isfinite(trial_objective) & (ratio > ACCEPT_RATIO)
        factor = jnp.where(accepted & (ratio > 0.75), 0.25, jnp.where(accepted & (ratio >= 0.25), 1.0, 4.0))
        new_damping = jnp.clip(damping * factor, self.options.damping_min, self.options.damping_max)
        updates = {n: jnp.where(accepted, x, jnp.zeros_like(x)) for n, x in step.items()}
        new_state, new_carried = self.parameters.apply(state, carried, params, updates)
        flags = hyper["constraints"] & accepted
        new_state = apply_constraints(new_state, self.ctx, self.constraints, flags)
        real = measured.dtype
        new_lm = {"damping": new_damping.astype(real), "step": step, "fresh": accepted,
                  "objective": jnp.where(accepted, trial_data, data_objective).astype(real),
                  "gradient": data_gradient, "scale": data_scale, "terms": terms}
        if self._prior is not None:
            new_lm["prior_target"] = target.astype(real)
            prior_extra["lm_objective_start"] = objective
        n_products = cg_iterations + 1  # the warm start's residual is one more product
        lm_objective = jnp.where(accepted, trial_objective, objective).astype(real)
        report = {**terms, **prior_extra, "lm_objective": lm_objective, "damping": damping, "gain_ratio": ratio,
                  "cg_iterations": cg_iterations.astype(jnp.float32), "accepted": accepted.astype(jnp.float32),
                  "gradient_equivalents": (jnp.where(lm["fresh"], 1.0, 0.0) + 2.0 * n_products + 0.5)}
        out = self.summarise(new_state, measured, report, val_batches, val_masks)
        return (new_state, new_carried, new_lm), out

    # ------------------------------------------------------------ per-iteration host side
    def hyper(self, it: int) -> dict:
        cfg = self.stage.optimize
        prior = self.stage.losses.get("prior")
        return {"active": {n: jnp.bool_(cfg[n].active_at(it) and cfg[n].lr_at(it) > 0) for n in self.names},
                "constraints": self.constraint_flags(it), "prior_sigma_rad": self.prior_sigma(it),
                "prior_weight": jnp.float32(prior.weight.at(it) if prior is not None else 0.0)}
