"""Schedule-Free AdamW and ADOPT: Adam variants with a state beyond Adam's moments
(Schedule-Free keeps its iterate z and evaluates elsewhere than it steps;
ADOPT normalizes by the previous second moment and starts with a step that
only fills it)."""

from __future__ import annotations

from typing import Any, NamedTuple

from polyopt import hyper
from polyopt._namespace import namespace
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import Slot
from polyopt.rules.adam_family import _one_minus_power


class ScheduleFreeState(NamedTuple):
    count: Any
    z: list  # the base iterate (the reference's and Keras's "z"/"momentum")
    second_moment: list
    b1: Any  # the b1 the params y were last interpolated with (for the eval point)
    weight_sum: Any  # sum of the averaging weights
    max_lr: Any  # the largest (warmed-up) learning rate so far


def _scalar_dtype(xp, params):
    return xp.result_type(*params)


@hyper.SCHEDULE_FREE_ADAMW.factory
def schedule_free_adamw(learning_rate, b1, b2, eps, warmup_steps, warmup_lag, r,
                        weight_lr_power, weight_decay, weight_decay_mode,
                        state_dtype) -> Rule:
    r"""Schedule-Free AdamW (Defazio et al., 2024): no learning-rate schedule; the
    params are the interpolation y of an iterate z and its running average x.

    .. math::
        \begin{aligned}
        &\gamma_t = \gamma \min(1, t / T_{warmup}), \quad
         c_t = \frac{w_t}{\sum_{i \le t} w_i}, \quad
         w_t = t^r \, (\max_{i \le t} \gamma_i)^{p}\\
        &v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
         d_t = g_t / (\sqrt{v_t / (1 - \beta_2^t)} + \epsilon) + \lambda y_t\\
        &z_{t+1} = z_t - \gamma_t d_t, \quad
         x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}, \quad
         y_{t+1} = \beta_1 x_{t+1} + (1 - \beta_1) z_{t+1}
        \end{aligned}

    The params are y (where gradients are taken); the point to evaluate is x =
    (y - (1 - b1) z) / b1: ``rule.eval_params(params, state)``. The state holds z
    (a copy of the params at init) and v, not x.

    Args:
      learning_rate: \gamma (default 0.0025, the reference's, Keras's, optax's).
      b1: \beta_1 in (0, 1) (default 0.9).
      b2: \beta_2 in [0, 1) (default 0.999).
      eps: \epsilon outside the root (default 1e-8).
      warmup_steps: T_warmup, linear warmup of the step size (default 0: none).
      warmup_lag: optax.contrib's off-by-one: the z step uses \gamma_{t-1}, the
        averaging weight \gamma_t (default False: both \gamma_t).
      r: polynomial weighting power (default 0).
      weight_lr_power: p (default 2; Keras averages uniformly: 0).
      weight_decay: \lambda >= 0 (default 0).
      weight_decay_mode: 'gradient' (default: \lambda y_t in d_t, the reference and
        optax) or 'variable' (Keras: y <- y - \gamma \lambda y before the step, with
        the learning rate before warmup).
      state_dtype: dtype z and v are stored in (optax ``state_dtype`` is z's).

    Returns:
      A :class:`Rule` with ``eval_params``; state :class:`ScheduleFreeState`
      (count, z, second_moment, b1, weight_sum, max_lr).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.schedule_free_adamw(learning_rate=0.1, eps=0.0)
      >>> params = [np.array([1.0])]
      >>> state = rule.init(params)
      >>> updates, state = rule.update([np.array([2.0])], state, params)
      >>> y = [p + u for p, u in zip(params, updates)]
      >>> float(state.z[0][0]), float(y[0][0]), float(rule.eval_params(y, state)[0][0])
      (0.9, 0.9, 0.9)

    References:
      Defazio et al., "The Road Less Scheduled", NeurIPS 2024,
      https://arxiv.org/abs/2405.15682

    Notes:
      The step is computed as the reference (facebookresearch/schedule_free)
      does, without forming x: y' - y = c (z - y) + \gamma_t (\beta_1 (1 - c) - 1) d
      (exactly 0 for a zero gradient at the start, where z = y); optax and Keras
      recover x = (y - (1 - b1) z) / b1 and interpolate, the same numbers to
      rounding. optax.contrib.schedule_free_adamw: ``warmup_lag=True`` (with
      warmup or a schedule), no r. keras.optimizers.ScheduleFreeAdamW:
      ``weight_lr_power=0``, ``weight_decay_mode='variable'``; Keras evaluates
      at y (model.evaluate uses the variables).
    """
    decay = not _base.is_zero(weight_decay)

    def scalars(xp, params):
        dtype = _scalar_dtype(xp, params)
        device = _base._device(params[0])
        zero = xp.zeros((), dtype=dtype, device=device)
        return (_as_array(xp, b1, zero), zero, xp.zeros((), dtype=dtype, device=device))

    def warmed(xp, lr, t):
        if warmup_steps == 0:
            return lr
        return lr * xp.minimum(t / warmup_steps, xp.ones((), dtype=t.dtype))

    def step(xp, grads, params, state, lr_value):
        like = state.weight_sum
        t = _base.step_number(xp, state.count, like)
        lr_now = _base.scalar(xp, lr_value, like)
        if warmup_lag:
            lr_step = warmed(xp, lr_now, t - 1)
            lr_next = _base.evaluate(learning_rate, _base.increment(state.count))
            lr_weight = warmed(xp, _base.scalar(xp, lr_next, like), t)
        else:
            lr_step = lr_weight = warmed(xp, lr_now, t)
        max_lr = xp.maximum(state.max_lr, lr_weight)
        weight = max_lr ** weight_lr_power
        if not _base.is_zero(r):
            weight = weight * t ** r
        weight_sum = state.weight_sum + weight
        positive = weight_sum > 0
        one = xp.ones((), dtype=like.dtype, device=_base._device(like))
        ck = xp.where(positive, weight / xp.where(positive, weight_sum, one), 0 * one)
        beta1_now = _as_array(xp, b1, like)
        bc2 = _one_minus_power(xp, b2, t)

        updates, zs, vs = [], [], []
        for g, y, z, v in zip(grads, params, state.z, state.second_moment):
            c = _base.scalar(xp, ck, g)
            beta1 = _base.scalar(xp, beta1_now, g)
            v = (1 - b2) * (g * g) + b2 * v
            d = g / (xp.sqrt(v / _base.scalar(xp, bc2, g)) + eps)
            if decay and weight_decay_mode == "gradient":
                d = d + _base.scalar(xp, weight_decay, g) * y
            lr = _base.scalar(xp, lr_step, g)
            # y' = b1 x' + (1 - b1) z' with x' = (1 - c) x + c z' and x = (y - (1 - b1) z) / b1,
            # written without x (as the reference does): y' - y = c (z - y) + lr (b1 (1 - c) - 1) d
            update = c * (z - y) + lr * (beta1 * (1 - c) - 1) * d
            if decay and weight_decay_mode == "variable":
                # Keras decays the variable y first (y -= lr wd y), then steps from there
                shrink = y * _base.scalar(xp, weight_decay, g) * _base.scalar(xp, lr_now, g)
                update = update - (1 - c) * shrink
            updates.append(update)
            zs.append(z - lr * d)
            vs.append(v)
        return updates, (zs, vs, beta1_now, weight_sum, max_lr), 0.0

    rule = _base.stateful_rule(
        "schedule_free_adamw", ScheduleFreeState,
        (Slot("z", init="param"), Slot("second_moment")), step, scalars=scalars,
        learning_rate=learning_rate, weight_decay=0.0, weight_decay_mode="decoupled",
        state_dtype=state_dtype)
    return rule._replace(eval_params=schedule_free_eval_params)


def _as_array(xp, value, like):
    """``value`` (a number or a 0-d array) as a 0-d array of ``like``'s dtype."""
    if hasattr(value, "shape"):
        return _base.scalar(xp, value, like)
    return xp.full_like(like, float(value))


def schedule_free_eval_params(params, state) -> list:
    """The point a Schedule-Free rule is evaluated at: x = (y - (1 - b1) z) / b1,
    from the params y and the state's z and b1 (a :class:`ScheduleFreeState`,
    or a state holding one as ``inner``, e.g. a chain's last)."""
    if not hasattr(state, "z") or not hasattr(state, "b1"):
        raise TypeError(
            "schedule_free_eval_params: state must be a ScheduleFreeState (with z and b1), "
            f"got {type(state).__name__}")
    params = list(params)
    if len(state.z) != len(params):
        raise ValueError(
            f"schedule_free_eval_params: state holds z for {len(state.z)} params, "
            f"got {len(params)} params")
    xp = namespace(*params)
    out = []
    for y, z in zip(params, state.z):
        b1 = _base.scalar(xp, state.b1, y)
        z = z if z.dtype == y.dtype else xp.astype(z, y.dtype)
        out.append((y - (1 - b1) * z) / b1)
    return out


def schedule_free_train_params(eval_params, state) -> list:
    """The inverse of :func:`schedule_free_eval_params`: the params y = b1 x + (1 - b1) z
    from the evaluation point x (an adapter's switch back to training)."""
    if not hasattr(state, "z") or not hasattr(state, "b1"):
        raise TypeError(
            "schedule_free_train_params: state must be a ScheduleFreeState (with z and b1), "
            f"got {type(state).__name__}")
    eval_params = list(eval_params)
    xp = namespace(*eval_params)
    out = []
    for x, z in zip(eval_params, state.z):
        b1 = _base.scalar(xp, state.b1, x)
        z = z if z.dtype == x.dtype else xp.astype(z, x.dtype)
        out.append(b1 * x + (1 - b1) * z)
    return out


class ADOPTState(NamedTuple):
    count: Any
    first_moment: list
    second_moment: list


@hyper.ADOPT.factory
def adopt(learning_rate, b1, b2, eps, use_clipping, clip_exponent, nesterov, weight_decay,
          weight_decay_mode, state_dtype) -> Rule:
    r"""ADOPT (Taniguchi et al., 2024): Adam that normalizes each gradient by the
    second moment of the *previous* gradients, before the momentum.

    .. math::
        \begin{aligned}
        &t = 0:\ v_0 = g_0^2 \text{ (no step)}\\
        &t \ge 1:\ m_t = \beta_1 m_{t-1} + (1 - \beta_1)
           \operatorname{clip}\!\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon), c_t\big),
         \quad \theta_t = \theta_{t-1} - \gamma m_t,\\
        &\qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
         c_t = t^{\,\texttt{clip\_exponent}}
        \end{aligned}

    Elementwise; the first call fills v and returns a zero update (weight decay
    in 'decoupled' mode still applies).

    Args:
      learning_rate: \gamma (default 1e-3, the paper's; optax requires one).
      b1: \beta_1 in [0, 1) (default 0.9).
      b2: \beta_2 in [0, 1) (default 0.9999, the paper's).
      eps: \epsilon, the floor of \sqrt{v} (default 1e-6).
      use_clipping: clip the normalized gradient (default True).
      clip_exponent: c_t = t ** clip_exponent (default 0.25, the paper's and
        optax's ``clip_value_fn``).
      nesterov: Nesterov momentum (optax).
      weight_decay: \lambda >= 0 (default 0).
      weight_decay_mode: 'l2' (default), 'decoupled' or 'decoupled_unscaled'.
      state_dtype: dtype of the moments (optax ``mu_dtype``: m only).

    Returns:
      A :class:`Rule`; state :class:`ADOPTState` (count, first_moment, second_moment).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adopt(learning_rate=0.1)
      >>> params = [np.array([1.0])]
      >>> state = rule.init(params)
      >>> updates, state = rule.update([np.array([2.0])], state, params)
      >>> float(updates[0][0]), float(state.second_moment[0][0])   # only fills v
      (-0.0, 4.0)
      >>> updates, state = rule.update([np.array([2.0])], state, params)
      >>> round(float(updates[0][0]), 6)   # -0.1 * 0.1 * clip(2 / 2, 1)
      -0.01

    References:
      Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
      Optimal Rate", NeurIPS 2024, https://arxiv.org/abs/2411.02853

    Notes:
      optax.contrib.adopt: the defaults (learning_rate required, no weight
      decay). torch and Keras have no ADOPT.
    """

    def step(xp, grads, params, state, lr_value):
        updates, ms, vs = [], [], []
        for g, m, v in zip(grads, state.first_moment, state.second_moment):
            one = xp.ones((), dtype=g.dtype, device=_base._device(g))
            first = state.count == 0
            beta1 = xp.where(first, one, _base.scalar(xp, b1, g) * one)
            beta2 = xp.where(first, 0.0 * one, b2 * one)
            normalized = g / xp.maximum(xp.sqrt(v), eps * one)
            if use_clipping:
                clip = xp.astype(state.count, g.dtype) ** clip_exponent
                normalized = xp.minimum(xp.maximum(normalized, -clip), clip)
            v = (1 - beta2) * (g * g) + beta2 * v
            m = (1 - beta1) * normalized + beta1 * m
            direction = (1 - beta1) * normalized + beta1 * m if nesterov else m
            updates.append(-_base.scalar(xp, lr_value, g) * direction)
            ms.append(m)
            vs.append(v)
        return updates, (ms, vs), lr_value

    return _base.stateful_rule("adopt", ADOPTState,
                               (Slot("first_moment"), Slot("second_moment")), step,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, state_dtype=state_dtype)
