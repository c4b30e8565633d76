"""Factored second moments: Adafactor."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base, _state
from polyopt.rules._base import Rule
from polyopt.rules._state import NONE, Slot

#: the machine epsilon of each floating dtype (``eps=None``, as torch's finfo(dtype).eps)
_MACHINE_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10,
                "bfloat16": 2.0**-7, "complex128": 2.0**-52, "complex64": 2.0**-23}


class AdafactorState(NamedTuple):
    count: Any
    v_row: list  # factored params: the mean of g^2 over the row axes; others: shape (0,)
    v_col: list  # factored params: the mean of g^2 over the column axes; others: shape (0,)
    v: list  # params not factored: the full second moment; factored ones: shape (0,)
    momentum: list  # only with momentum (else empty)


def factor_axes(shape: tuple, layout: Any, factoring: str,
                min_size: int) -> tuple[tuple, tuple] | None:
    """(the axes ``v_row`` averages over, the axes ``v_col`` averages over) of a
    tensor of ``shape``, or None when it is not factored.

    'layout': the reduction axes, then the output axes (no axis is left: the
    param as its matrix (output, reduction)); 'last_two': the last axis, then
    the one before (torch, Keras; the others are batch axes); 'largest_two':
    the largest axis, then the second largest (optax; ties: the first). The
    tensor is factored when it has 2 or more axes and both factored sizes are
    at least ``min_size``.
    """
    n = len(shape)
    if factoring == "none" or n < 2:
        return None
    if factoring == "layout":
        output, reduction = _state.matrix_axes(layout, n)
        if not output:  # NOT_A_MATRIX: not factored
            return None
        axes = (tuple(reduction), tuple(output))
    elif factoring == "last_two":
        axes = ((n - 1,), (n - 2,))
    else:  # a stable sort of the axes by size, as numpy's argsort of a short shape
        order = sorted(range(n), key=lambda i: shape[i])
        axes = ((order[-1],), (order[-2],))
    sizes = [math.prod([shape[i] for i in group]) for group in axes]  # (torch.compile: lists)
    return None if min(sizes) < min_size else axes


def _without(shape: tuple, axes: tuple) -> tuple:
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _slots(factoring: str, min_size: int, momentum: bool, momentum_dtype: str | None) -> tuple:
    def row(shape, layout):
        axes = factor_axes(shape, layout, factoring, min_size)
        return (0,) if axes is None else _without(shape, axes[0])

    def col(shape, layout):
        axes = factor_axes(shape, layout, factoring, min_size)
        return (0,) if axes is None else _without(shape, axes[1])

    def full(shape, layout):
        return shape if factor_axes(shape, layout, factoring, min_size) is None else (0,)

    return (Slot("v_row", row), Slot("v_col", col), Slot("v", full),
            Slot("momentum", dtype=momentum_dtype or "state") if momentum
            else Slot("momentum", NONE))


def _rms(xp, x):
    return xp.sqrt(xp.mean(_base.abs_sq(xp, x)))


@hyper.ADAFACTOR.factory
def adafactor(learning_rate, relative_step, beta2_decay, decay_offset, eps, eps_placement, eps2,
              clipping_threshold, multiply_by_parameter_scale, param_scale_after_decay,
              factoring, min_dim_size_to_factor, momentum, momentum_dtype, weight_decay,
              weight_decay_mode, state_dtype) -> Rule:
    r"""Adafactor (Shazeer & Stern, 2018): Adam's second moment, factored.

    .. math::
        \begin{aligned}
        &\hat\beta_{2,t} = 1 - t^{\tau}, \quad
         \rho_t = \min(\gamma, 1/\sqrt{t}), \quad
         \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\,\rho_t\\
        &R_t = \hat\beta_{2,t} R_{t-1} + (1 - \hat\beta_{2,t})
            \operatorname{mean}_{\text{cols}}(G_t^2 + \epsilon_1)\\
        &C_t = \hat\beta_{2,t} C_{t-1} + (1 - \hat\beta_{2,t})
            \operatorname{mean}_{\text{rows}}(G_t^2 + \epsilon_1)\\
        &\hat V_t = R_t C_t / \operatorname{mean}(R_t), \quad
         U_t = G_t / \sqrt{\hat V_t}, \quad
         \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t) / d)\\
        &\theta_t = \theta_{t-1} - \alpha_t \hat U_t
        \end{aligned}

    A tensor that is not factored (fewer than 2 axes, or ``factoring='none'``,
    or a factored size below ``min_dim_size_to_factor``) keeps the full
    :math:`V_t = \hat\beta_{2,t} V_{t-1} + (1 - \hat\beta_{2,t})(G_t^2 + \epsilon_1)`.
    Per tensor (``uses_layout``): a (m, n) weight keeps m + n numbers of
    state, not m n. With the default ``factoring='layout'`` the rows are the
    output axes and the columns the reduction axes of each param's layout, so
    a layer gives the same numbers in torch's (out, in) and Keras's/Flax's
    (in, out) layouts.

    Args:
      learning_rate: \gamma: the cap of the relative step (default 1e-2, the
        paper's constant) or, with ``relative_step=False``, the step size.
      relative_step: \rho_t = min(\gamma, 1/sqrt(t)) (default True) or \gamma.
      beta2_decay: \tau <= 0 (default -0.8; optax ``decay_rate=0.8``).
      decay_offset: \hat\beta_2's t is counted from this step (optax; the
        steps before it count as its first, where optax's statistics become NaN).
      eps: \epsilon_1 (default 1e-30), or None: the params' machine epsilon.
      eps_placement: 'inside' (the paper, Keras, optax: in G^2 + \epsilon_1) or
        'floor' (torch: V = R C / max(mean R, \epsilon_1), U = G / max(sqrt V,
        \epsilon_1)).
      eps2: \epsilon_2, the smallest parameter scale (default 1e-3).
      clipping_threshold: d (default 1.0), None: no update clipping.
      multiply_by_parameter_scale: scale by max(\epsilon_2, RMS(\theta)) (default True).
      param_scale_after_decay: the scale reads the decayed param (Keras).
      factoring: 'layout' (default), 'last_two' (torch, Keras), 'largest_two'
        (optax), 'none'.
      min_dim_size_to_factor: factor only when both factored sizes are at
        least this (default 0; optax 128).
      momentum: None (default) or \beta_1: the step is an exponential average
        of the steps above (optax, without debiasing).
      momentum_dtype: the momentum's storage dtype (optax ``dtype_momentum``;
        default None: the statistics' dtype, ``state_dtype`` else the param's).
      weight_decay, weight_decay_mode: decoupled (default: times the learning
        rate, not the relative step; torch, Keras), 'decoupled_unscaled' (optax
        weight_decay_rate) or 'l2'.
      state_dtype: dtype of the statistics (and of the momentum without momentum_dtype).

    Returns:
      A :class:`Rule` (``uses_layout``, not elementwise); state
      :class:`AdafactorState` (count, v_row, v_col, v, momentum).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adafactor()
      >>> params = [np.ones((4, 3))]
      >>> state = rule.init(params)
      >>> [a.shape for a in (state.v_row[0], state.v_col[0], state.v[0])]
      [(4,), (3,), (0,)]
      >>> updates, state = rule.update([np.full((4, 3), 2.0)], state, params)
      >>> float(updates[0][0, 0])   # -min(1e-2, 1/sqrt(1)) * RMS(p) * sign(g)
      -0.01

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost", ICML 2018, https://arxiv.org/abs/1804.04235

    Notes:
      torch.optim.Adafactor: lr=1e-2, eps=(None, 1e-3) 'floor', factors the
      last two axes, decay times lr before the step. keras.optimizers.Adafactor:
      learning_rate=1e-3, factors the last two axes, decays the weights
      before the step (the scale reads them decayed), keeps a full-size
      velocity as well; its relative_step=False still caps the step at
      1/sqrt(t). optax.adafactor: no relative step, the two largest axes when
      both are >= 128, momentum, weight_decay_rate unscaled, its decay
      schedule computed in float32.
    """
    use_momentum = momentum is not None and not _base.is_zero(momentum)  # an array: on
    slots = _slots(factoring, min_dim_size_to_factor, use_momentum, momentum_dtype)
    inside = eps_placement == "inside"

    def step(xp, grads, params, state, lr_value, layouts):
        updates, rows, cols, fulls, momenta = [], [], [], [], []
        use_momentum = bool(state.momentum)
        for i, (g, p) in enumerate(zip(grads, params)):
            shape = tuple(int(d) for d in g.shape)
            t = _base.step_number(xp, state.count, g)
            one = xp.full_like(t, 1.0)
            # steps before the offset count as its first (optax's state turns NaN there);
            # with no offset max(t, 1) is t (t >= 1): one formula, the offset may be traced
            decay_t = xp.maximum(t - _base.scalar(xp, decay_offset, t), one)
            keep = decay_t ** beta2_decay  # 1 - beta2_t
            beta2 = 1 - keep
            e = _MACHINE_EPS[_state.dtype_name(g)] if eps is None else eps
            g2 = _base.abs_sq(xp, g)
            g2 = g2 + e if inside else g2
            axes = factor_axes(shape, layouts[i], factoring, min_dim_size_to_factor)
            if axes is None:
                v = beta2 * _base.real_part(xp, state.v[i]) + keep * g2
                estimate = v
                rows.append(state.v_row[i])
                cols.append(state.v_col[i])
                fulls.append(v)
            else:
                over_rows, over_cols = axes
                r = (beta2 * _base.real_part(xp, state.v_row[i])
                     + keep * xp.mean(g2, axis=over_rows))
                c = (beta2 * _base.real_part(xp, state.v_col[i])
                     + keep * xp.mean(g2, axis=over_cols))
                left = [a for a in range(len(shape)) if a not in over_rows]
                norm = xp.mean(r, axis=tuple(left.index(a) for a in over_cols), keepdims=True)
                if not inside:
                    norm = xp.maximum(norm, xp.full_like(norm, e))
                r_shape = tuple(1 if a in over_rows else d for a, d in enumerate(shape))
                c_shape = tuple(1 if a in over_cols else d for a, d in enumerate(shape))
                estimate = xp.reshape(r / norm, r_shape) * xp.reshape(c, c_shape)
                rows.append(r)
                cols.append(c)
                fulls.append(state.v[i])
            if not inside:
                estimate = xp.maximum(estimate, xp.full_like(estimate, e * e))
            u = g / xp.sqrt(estimate)
            if clipping_threshold is not None:
                u = u / xp.maximum(one, _rms(xp, u) / clipping_threshold)
            rate = _base.scalar(xp, lr_value, g)
            if relative_step:
                rate = xp.minimum(xp.full_like(t, rate) if isinstance(rate, float) else rate,
                                  one / xp.sqrt(t))
            if multiply_by_parameter_scale:
                seen = p
                if param_scale_after_decay and weight_decay_mode != "l2" and not _base.is_zero(
                        weight_decay):
                    decay = _base.scalar(xp, weight_decay, p)
                    if weight_decay_mode == "decoupled":
                        decay = _base.scalar(xp, lr_value, p) * decay
                    seen = p - p * decay
                scale = _rms(xp, seen)
                rate = rate * xp.maximum(scale, xp.full_like(scale, eps2))
            change = rate * u
            if use_momentum:
                change = momentum * state.momentum[i] + (1 - momentum) * change
                momenta.append(change)
            updates.append(-change)
        return updates, (rows, cols, fulls, momenta), lr_value

    return _base.stateful_rule("adafactor", AdafactorState, slots, step,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, state_dtype=state_dtype,
                               uses_layout=True, elementwise=False, complex_params=True,
                               # G / sqrt(V) is zero where G is; the statistics decay everywhere
                               sparse="dense" if use_momentum else "updates")
