"""Adam and its variants: AdamW, AMSGrad, Adamax, NAdam, RAdam."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import NONE, PARAM, Slot


class AdamState(NamedTuple):
    count: Any
    first_moment: list
    second_moment: list
    max_second_moment: list  # empty unless amsgrad


def _moments(xp, b1, b2, g, m, v):
    """m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) |g|^2 (real for complex g:
    optax's ``abs_sq``; a complex slot holds it as its real part).

    For real g they are computed as torch.optim computes them: m + (1 - b1)
    (g - m) (its ``lerp_``, Keras's form) for a number b1 > 0.5, and b2 v +
    ((1 - b2) g) g (its ``addcmul_``), so that an eager torch step runs each
    as one fused operation (polyopt.torch's ``_eager._contracted``). A b1 of
    at most 0.5 or given as an array keeps b1 m + (1 - b1) g, exact at b1 = 0.
    """
    if _base.is_complex(xp, g):
        return b1 * m + (1 - b1) * g, b2 * _base.real_part(xp, v) + (1 - b2) * _base.abs_sq(xp, g)
    if isinstance(b1, numbers.Number) and b1 > 0.5:
        m = m + (1 - b1) * (g - m)
    else:
        m = b1 * m + (1 - b1) * g
    return m, b2 * v + ((1 - b2) * g) * g


def _one_minus_power(xp, b, t):
    """The bias correction 1 - b**t for b in [0, 1) and t >= 1 (a float array).

    For a Python number b this is -expm1(t * log(b)) with log(b) taken in
    double precision. The plain 1 - b**t first rounds b to t's dtype: in
    float32, 0.999 becomes 0.99900001 and 1 - 0.999**t is off by up to 1.3e-5
    relative, a bias of every step that torch and optax (which compute it in
    double) do not have. A 0-d array b (a runtime b1) keeps the plain form.
    """
    if isinstance(b, numbers.Number) and b > 0:
        return -xp.expm1(t * math.log(b))
    return 1 - b ** t


def _radam_rho(xp, b2, rho_inf, t):
    """rho_t = rho_inf - 2 t b2^t / (1 - b2^t), without its cancellation.

    rho_inf is ~2/(1 - b2) (1999 for b2 = 0.999) while rho_t starts at 1 and
    crosses the threshold 5 by a margin of 0.004 at t = 5, so the plain
    difference loses all but a few digits in float32 (an error of 0.03 in
    rho_5 and of 1e-4 in the rectification term). With L = -log(b2), y = t L:
    rho_t = (rho_inf - 2/L) + (2/L) (1 - y / expm1(y)), where the first term
    is a double-precision constant and 1 - y/expm1(y) = y/2 - y^2/12 + y^4/720
    - ... is summed as a series for y < 1/4 (relative truncation error < 2e-13).
    In float64 this is also closer to the exact value than the plain formula
    (2e-15 against up to 3e-11 absolute, checked with mpmath).
    """
    if not (isinstance(b2, numbers.Number) and b2 > 0):
        b2t = b2 ** t
        return rho_inf - 2 * t * b2t / (1 - b2t)
    log_b2 = -math.log(b2)
    y = t * log_b2
    y2 = y * y
    series = y * (0.5 - y * (1 / 12 - y2 * (1 / 720 - y2 * (1 / 30240 - y2 / 1209600))))
    capped = xp.where(y < 64.0, y, xp.full_like(y, 64.0))  # expm1(y > 88) overflows float32
    direct = 1 - capped / xp.expm1(capped)
    return (rho_inf - 2 / log_b2) + (2 / log_b2) * xp.where(y < 0.25, series, direct)


def _moment_slots(amsgrad: bool) -> tuple:
    """The slots of a rule with state (count, m, v, max of v if amsgrad else [])."""
    return (Slot("first_moment"), Slot("second_moment"),
            Slot("max_second_moment", PARAM if amsgrad else NONE))


def _adam(name, learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad, amsgrad_form,
          weight_decay, weight_decay_mode, first_moment_bias_correction, state_dtype) -> Rule:

    def step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def scalars(like):
            t = _base.step_number(xp, state.count, like)
            beta1 = _base.scalar(xp, b1, like)
            bc1 = _one_minus_power(xp, beta1, t) if first_moment_bias_correction else 1.0
            return beta1, bc1, _one_minus_power(xp, b2, t), _base.scalar(xp, lr_value, like)

        updates, ms, vs, maxes = [], [], [], []
        for i, g in enumerate(grads):
            beta1, bc1, bc2, lr = scalars(g)
            m, v = _moments(xp, beta1, b2, g, state.first_moment[i], state.second_moment[i])
            ms.append(m)
            vs.append(v)
            # v_hat = v_raw / c2: the bias-corrected second moment (c2 None: uncorrected)
            if amsgrad and amsgrad_form == "corrected":
                v_max = xp.maximum(_base.real_part(xp, state.max_second_moment[i]), v / bc2)
                v_hat, v_raw, c2 = v_max, v_max * bc2, bc2
            elif amsgrad:
                v_max = xp.maximum(_base.real_part(xp, state.max_second_moment[i]), v)
                if amsgrad_form == "uncorrected":
                    v_hat, v_raw, c2 = v_max, v_max, None
                else:
                    v_hat, v_raw, c2 = v_max / bc2, v_max, bc2
            else:
                v_hat, v_raw, c2 = v / bc2, v, bc2
            if amsgrad:
                maxes.append(v_max)
            # the update is (step * m) / denom with a 0-d step, as torch's
            # addcdiv_ and Keras compute it (one pass over m fewer than m / bc1)
            if eps_placement == "hat":
                step = lr / bc1 if c2 is None else lr * xp.sqrt(c2) / bc1
                denom = xp.sqrt(_base.plus_root(v_raw, eps_root)) + eps
            else:
                step = lr / bc1
                denom = xp.sqrt(_base.plus_root(v_hat, eps_root)) + eps
            updates.append((-step * m) / denom)
        return updates, (ms, vs, maxes), lr_value

    return _base.stateful_rule(name, AdamState, _moment_slots(amsgrad), step,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, state_dtype=state_dtype,
                               complex_params=True)


_ADAM_DOC = r"""

    .. math::
        \begin{aligned}
        &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
         v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2\\
        &\hat m_t \leftarrow m_t / (1 - \beta_1^t), \quad
         \hat v_t \leftarrow v_t / (1 - \beta_2^t)
         \quad (\hat v_t \leftarrow \max(\hat v_{t-1}, \hat v_t)\ \text{with amsgrad})\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}}
            + \epsilon) \quad\text{('outside')}\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            m_t / (\sqrt{v_t} + \epsilon) \quad\text{('hat', Keras)}
        \end{aligned}

    Args:
      learning_rate: \gamma (default 0.001; may be a schedule).
      b1: \beta_1 in [0, 1) (default 0.9).
      b2: \beta_2 in [0, 1) (default 0.999).
      eps: \epsilon >= 0 (default 1e-8; Keras uses 1e-7 in 'hat' placement).
      eps_root: \epsilon_{root} >= 0, inside the sqrt (optax; default 0).
      eps_placement: 'outside' (torch, optax) or 'hat' (Keras).
      amsgrad: keep the running maximum of v (default False).
      amsgrad_form: 'raw' (torch, Keras: maximum of raw v, then corrected),
        'corrected' (optax: maximum of bias-corrected v) or 'uncorrected'
        (the AMSGrad paper, optax ``bias_correction_nu=False``: maximum of
        raw v, never corrected).
      weight_decay: \lambda >= 0.
      weight_decay_mode: 'l2' (torch Adam), 'decoupled' (torch AdamW, Keras,
        optax adamw: p -= lr*wd*p) or 'decoupled_unscaled' (tfa: p -= wd*p).
      first_moment_bias_correction: divide m by 1 - b1^t (default True;
        False is the AMSGrad paper, optax ``bias_correction_mu=False``).

    Returns:
      A :class:`Rule`; state :class:`AdamState`.
"""


@hyper.ADAM.factory
def adam(learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad, amsgrad_form,
         weight_decay, weight_decay_mode, first_moment_bias_correction, state_dtype) -> Rule:
    return _adam("adam", learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad,
                 amsgrad_form, weight_decay, weight_decay_mode, first_moment_bias_correction,
                 state_dtype)


adam.__doc__ = "Adam (Kingma and Ba, 2015)." + _ADAM_DOC + r"""
    Examples:
      The first step is -lr * sign(g) when eps is small:

      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adam(learning_rate=0.1)
      >>> params = [np.array([1.0, 2.0])]
      >>> updates, state = rule.update([np.array([3.0, -0.5])], rule.init(params), params)
      >>> np.round(updates[0], 6).tolist()
      [-0.1, 0.1]
    """


@hyper.ADAMW.factory
def adamw(learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad, amsgrad_form,
          weight_decay, weight_decay_mode, first_moment_bias_correction, state_dtype) -> Rule:
    return _adam("adamw", learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad,
                 amsgrad_form, weight_decay, weight_decay_mode, first_moment_bias_correction,
                 state_dtype)


adamw.__doc__ = ("AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay "
                 "(default weight_decay=0.01, weight_decay_mode='decoupled', as torch.optim.AdamW)."
                 + _ADAM_DOC)


@hyper.AMSGRAD.factory
def amsgrad(learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad, amsgrad_form,
            weight_decay, weight_decay_mode, first_moment_bias_correction, state_dtype) -> Rule:
    """AMSGrad (Reddi et al., 2018): :func:`adam` with ``amsgrad=True`` by default."""
    return _adam("amsgrad", learning_rate, b1, b2, eps, eps_root, eps_placement, amsgrad,
                 amsgrad_form, weight_decay, weight_decay_mode, first_moment_bias_correction,
                 state_dtype)


class AdamaxState(NamedTuple):
    count: Any
    first_moment: list
    infinity_norm: list


@hyper.ADAMAX.factory
def adamax(learning_rate, b1, b2, eps, eps_placement, weight_decay, weight_decay_mode,
           state_dtype) -> Rule:
    r"""Adamax (Kingma and Ba, 2015): Adam with the infinity norm.

    .. math::
        \begin{aligned}
        &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t\\
        &u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \quad\text{('inside')}\\
        &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} m_t / u_t
        \end{aligned}

    Args:
      learning_rate: \gamma (default 0.002, the paper's and torch's).
      b1, b2: in [0, 1) (defaults 0.9, 0.999).
      eps: \epsilon (default 1e-8).
      eps_placement: 'inside' (torch, optax: inside the max) or 'outside'
        (Keras: u_t = max(b2 u, |g|), step m / (u + eps)).
      weight_decay, weight_decay_mode: see :func:`adam`.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adamax(learning_rate=0.1, eps=0.0)
      >>> params = [np.array([1.0])]
      >>> updates, _ = rule.update([np.array([-4.0])], rule.init(params), params)
      >>> float(updates[0][0])
      0.1
    """

    def update_step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def step_size(like):
            beta1 = _base.scalar(xp, b1, like)
            t = _base.step_number(xp, state.count, like)
            return beta1, _base.scalar(xp, lr_value, like) / _one_minus_power(xp, beta1, t)

        updates, ms, us = [], [], []
        for g, m, u in zip(grads, state.first_moment, state.infinity_norm):
            beta1, step = step_size(g)
            m = beta1 * m + (1 - beta1) * g
            if eps_placement == "inside":
                u = xp.maximum(b2 * _base.real_part(xp, u), xp.abs(g) + eps)
                updates.append(-step * (m / u))
            else:
                u = xp.maximum(b2 * _base.real_part(xp, u), xp.abs(g))
                updates.append(-step * (m / (u + eps)))
            ms.append(m)
            us.append(u)
        return updates, (ms, us), lr_value

    return _base.stateful_rule("adamax", AdamaxState,
                               (Slot("first_moment"), Slot("infinity_norm")), update_step,
                               state_dtype=state_dtype, complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode)


class NAdamState(NamedTuple):
    count: Any
    first_moment: list
    second_moment: list
    momentum_product: Any  # 0-d: prod of mu_1..mu_t (Dozat's schedule); 1.0 otherwise


@hyper.NADAM.factory
def nadam(learning_rate, b1, b2, eps, eps_root, momentum_decay, momentum_schedule,
          weight_decay, weight_decay_mode, state_dtype, momentum_product_dtype) -> Rule:
    r"""NAdam (Dozat, 2016): Adam with Nesterov momentum.

    .. math::
        \begin{aligned}
        &\mu_t \leftarrow \beta_1 (1 - \tfrac12 0.96^{t \psi}), \quad
         \Pi_t \leftarrow \Pi_{t-1} \mu_t\\
        &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
         v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
         \hat v_t \leftarrow v_t / (1 - \beta_2^t)\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \Big(
           \frac{1 - \mu_t}{1 - \Pi_t} g_t + \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} m_t \Big)
           / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
        \end{aligned}

    With ``momentum_schedule=False`` (optax.nadam) mu is the constant b1 and
    the step is (b1 m_t / (1 - b1^{t+1}) + (1 - b1) g_t / (1 - b1^t)) / (sqrt(v_hat) + eps).

    Args:
      learning_rate: \gamma (default 0.002, Dozat's and torch's).
      b1, b2: in [0, 1) (defaults 0.9, 0.999).
      eps: \epsilon (default 1e-8).
      eps_root: inside the sqrt (optax; default 0).
      momentum_decay: \psi >= 0 (default 0.004, torch; Keras's Nadam is 1.0).
      momentum_schedule: Dozat's warming schedule (True) or constant b1 (False).
      weight_decay, weight_decay_mode: see :func:`adam` (torch NAdam's
        decoupled_weight_decay=True is 'decoupled').
      momentum_product_dtype: None (the params' dtype) or 'float32': the
        product of the schedule's mu is kept and multiplied in float32, mu
        itself computed in the params' dtype (torch.optim.NAdam's ``mu_product``,
        a float32 tensor under torch's default dtype).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.nadam(learning_rate=0.1, momentum_schedule=False, eps=0.0)
      >>> params = [np.array([1.0])]
      >>> updates, _ = rule.update([np.array([2.0])], rule.init(params), params)
      >>> round(float(updates[0][0]), 6)   # -(0.9*0.2/0.19 + 0.1*2/0.1) / 2 * 0.1
      -0.147368
    """

    def momentum_product(xp, params):
        dtype = (_base.real_dtype(xp, xp.result_type(*params)) if momentum_product_dtype is None
                 else getattr(xp, momentum_product_dtype))
        return (xp.ones((), dtype=dtype, device=_base._device(params[0])),)

    def step(xp, grads, params, state, lr_value):
        product = state.momentum_product
        if momentum_schedule:
            # mu in the product's dtype, or in the params' when the product has its own
            ref = product if momentum_product_dtype is None else xp.astype(
                product, _base.real_dtype(xp, xp.result_type(*grads)))
            t = _base.step_number(xp, state.count, ref)
            beta1 = _base.scalar(xp, b1, ref)
            mu = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
            mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
            product = product * xp.astype(mu, product.dtype)

        @_base.per_dtype
        def scalars(like):
            t = _base.step_number(xp, state.count, like)
            beta1 = _base.scalar(xp, b1, like)
            lr = _base.scalar(xp, lr_value, like)
            if momentum_schedule:
                prod = _base.scalar(xp, product, like)
                mu_t, mu_n = _base.scalar(xp, mu, like), _base.scalar(xp, mu_next, like)
                grad_coef = lr * (1 - mu_t) / (1 - prod)
                moment_coef = lr * mu_n / (1 - prod * mu_n)
            else:
                grad_coef = lr * (1 - beta1) / _one_minus_power(xp, beta1, t)
                moment_coef = lr * beta1 / _one_minus_power(xp, beta1, t + 1)
            return beta1, _one_minus_power(xp, b2, t), grad_coef, moment_coef

        updates, ms, vs = [], [], []
        for g, m, v in zip(grads, state.first_moment, state.second_moment):
            beta1, bc2, grad_coef, moment_coef = scalars(g)
            m, v = _moments(xp, beta1, b2, g, m, v)
            denom = xp.sqrt(_base.plus_root(v / bc2, eps_root)) + eps
            updates.append(-(grad_coef * g + moment_coef * m) / denom)
            ms.append(m)
            vs.append(v)
        return updates, (ms, vs, product), lr_value

    return _base.stateful_rule("nadam", NAdamState,
                               (Slot("first_moment"), Slot("second_moment")), step,
                               scalars=momentum_product, state_dtype=state_dtype,
                               complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode)


class RAdamState(NamedTuple):
    count: Any
    first_moment: list
    second_moment: list
    max_second_moment: list  # empty unless amsgrad


def _radam(name, learning_rate, b1, b2, eps, eps_root, eps_placement, threshold, fallback,
           nesterov, amsgrad, total_steps, warmup_proportion, min_lr, weight_decay,
           weight_decay_mode, state_dtype, *, read_twice=False) -> Rule:
    """RAdam; ``read_twice`` (``ranger(read_twice=True)``, which polyopt.optax and
    polyopt.keras ask for): for a wrapper whose outputs each read the update (Ranger's
    Lookahead), the rectified-or-plain direction is divided by a runtime 1 before
    ``-lr`` multiplies it: the same numbers (x / 1 == x) and, under XLA, one temporary
    per param instead of two.

    XLA (jax.jit, Keras ``jit_compile``) fuses elementwise work into one loop per
    output. Lookahead's two outputs, the slow weights and the params, are two loops
    that both read the update; XLA recomputes cheap work in each, but computes an
    expensive operation (a division, a square root) that both read once, into a
    temporary array. RAdam's step is a product of two such quotients, m / (1 - b1^t)
    and sqrt(1 - b2^t) / (sqrt(v) + eps): two temporaries per param, each written once
    and read by both loops. Divided by 1, the direction is the one quotient both loops
    read, and the two fuse into the loop that computes it: on ResNet-18 18 passes over
    the params per step instead of 21, and half the temporary memory, which jax's CPU
    client allocates at every call (docs/performance.md, "Ranger and Lookahead under
    XLA"). ``-lr *`` stays in the loops, which compute ``p - lr * direction`` as before
    (as a fused multiply-add where XLA contracts it), so the compiled numbers are the
    same too (tests/test_jax_rules_jit.py). Not for plain RAdam, whose one loop reads
    the direction once, nor for torch, whose compiler fuses the whole step into one
    kernel: there it only adds a division per element (5-17 % on polyopt.torch's
    compiled Ranger step); complex params are left as they are (a complex division
    by 1 + 0j is not exact).
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0

    def step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def scalars(like):
            t = _base.step_number(xp, state.count, like)
            beta1 = _base.scalar(xp, b1, like)
            bc1, bc2 = _one_minus_power(xp, beta1, t), _one_minus_power(xp, b2, t)
            rho = _radam_rho(xp, b2, rho_inf, t)
            rectify = rho >= threshold
            real = _base.real_dtype(xp, like.dtype)
            safe_rho = xp.where(rectify, rho, xp.asarray(threshold, dtype=real))
            # rho_t < rho_inf: when rectifying, rho_inf > threshold > 4. Otherwise
            # (b2 < 0.67 gives rho_inf <= 5: never rectified) any value > 4 keeps
            # the unused branch free of 0/0 and sqrt(-x) (and of their warnings).
            inf = _base.scalar(xp, rho_inf, like)
            if isinstance(inf, float):
                inf = xp.asarray(inf, dtype=real, device=_base._device(like))
            safe_inf = xp.where(inf > threshold, inf, safe_rho + 1)
            rect = xp.sqrt((safe_rho - 4) * (safe_rho - 2) * safe_inf
                           / ((safe_inf - 4) * (safe_inf - 2) * safe_rho))
            lr = _base.scalar(xp, lr_value, like)
            if total_steps > 0:  # tensorflow-addons' warmup and linear decay
                warmup = total_steps * warmup_proportion
                decay_steps = max(total_steps - warmup, 1.0)
                rate = (min_lr - lr) / decay_steps
                warm = lr * t / warmup if warmup > 0 else lr
                lr = xp.where(t <= warmup, warm,
                              lr + rate * xp.minimum(t - warmup, xp.asarray(
                                  decay_steps, dtype=real)))
            bc1_next = _one_minus_power(xp, beta1, t + 1) if nesterov else None
            # a runtime 1 (t >= 1), one per dtype: XLA does not see that it is 1
            one = xp.astype(t > 0, like.dtype) if read_twice and xp.isdtype(
                like.dtype, "real floating") else None
            return beta1, bc1, bc1_next, bc2, rectify, rect, lr, one

        updates, ms, vs, maxes, lrs = [], [], [], [], []
        for i, g in enumerate(grads):
            beta1, bc1, bc1_next, bc2, rectify, rect, lr, one = scalars(g)
            m, v = _moments(xp, beta1, b2, g, state.first_moment[i], state.second_moment[i])
            ms.append(m)
            vs.append(v)
            if amsgrad:
                v = xp.maximum(_base.real_part(xp, state.max_second_moment[i]), v)
                maxes.append(v)
            if nesterov:
                m_hat = beta1 * m / bc1_next + (1 - beta1) * g / bc1
            else:
                m_hat = m / bc1
            if eps_placement == "hat":
                adaptive = xp.sqrt(bc2) / (xp.sqrt(_base.plus_root(v, eps_root)) + eps)
            else:
                adaptive = 1 / (xp.sqrt(_base.plus_root(v / bc2, eps_root)) + eps)
            rectified = m_hat * (rect * adaptive)
            plain = m_hat if fallback == "momentum" else xp.zeros_like(m_hat)
            direction = xp.where(rectify, rectified, plain)
            updates.append(-lr * (direction if one is None else direction / one))
            lrs.append(lr)
        # decoupled decay uses the scheduled (tfa warmup) learning rate, as tfa does
        return updates, (ms, vs, maxes), lrs

    return _base.stateful_rule(name, RAdamState, _moment_slots(amsgrad), step,
                               state_dtype=state_dtype, complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode)


@hyper.RADAM.factory
def radam(learning_rate, b1, b2, eps, eps_root, eps_placement, threshold, fallback, nesterov,
          amsgrad, total_steps, warmup_proportion, min_lr, weight_decay,
          weight_decay_mode, state_dtype) -> Rule:
    r"""RAdam (Liu et al., 2020): Adam with the variance of the adaptive step rectified.

    .. math::
        \begin{aligned}
        &\rho_\infty \leftarrow 2 / (1 - \beta_2) - 1, \quad
         \rho_t \leftarrow \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)\\
        &r_t \leftarrow \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
            {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma_t \hat m_t\, r_t\,
            \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}
            \ \text{if } \rho_t \ge \text{threshold ('hat')},
            \ \text{else } \theta_{t-1} - \gamma_t \hat m_t
        \end{aligned}

    Args:
      learning_rate: \gamma (default 0.001; may be a schedule).
      b1, b2: in [0, 1) (defaults 0.9, 0.999).
      eps: \epsilon (default 1e-8).
      eps_root: inside the sqrt (optax; default 0).
      eps_placement: 'hat' (paper, torch: eps on the raw sqrt(v)) or
        'outside' (optax, tensorflow-addons: after bias correction).
      threshold: rectify when rho_t >= threshold (> 4; default 5). torch
        tests rho_t > 5; rho_t never equals 5 exactly for b2 < 1 and integer t.
      fallback: 'momentum' (step with m_hat below the threshold) or 'none'.
      nesterov: optax's Nesterov variant, m_hat = b1 m_t / (1 - b1^{t+1}) +
        (1 - b1) g_t / (1 - b1^t) (default False).
      amsgrad: the running maximum of raw v (tensorflow-addons; default False).
      total_steps, warmup_proportion, min_lr: tensorflow-addons' schedule:
        linear warmup over total_steps*warmup_proportion steps, then linear
        decay to min_lr at total_steps (total_steps=0 disables it).
      weight_decay, weight_decay_mode: see :func:`adam`; decoupled decay
        uses the scheduled learning rate (as tfa does).

    Examples:
      Below the threshold RAdam steps with the bias-corrected momentum:

      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.radam(learning_rate=0.1)
      >>> params = [np.array([1.0])]
      >>> updates, _ = rule.update([np.array([3.0])], rule.init(params), params)
      >>> round(float(updates[0][0]), 12)
      -0.3
    """
    return _radam("radam", learning_rate, b1, b2, eps, eps_root, eps_placement, threshold,
                  fallback, nesterov, amsgrad, total_steps, warmup_proportion, min_lr,
                  weight_decay, weight_decay_mode, state_dtype)
