"""Layer-wise trust ratios: LAMB and LARS.

Both scale each tensor's step by ``||param|| / ||update||``, one norm over the
whole tensor: the rules are per-tensor (``elementwise=False``), but the norm
does not depend on how a tensor's axes split into input and output, so they
do not use layouts (``uses_layout=False``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import NONE, PARAM, Slot
from polyopt.rules.adam_family import _moments, _one_minus_power


class LambState(NamedTuple):
    count: Any
    first_moment: list
    second_moment: list


class LarsState(NamedTuple):
    count: Any
    momentum: list


def _norm(xp, x):
    """The Euclidean norm of a whole tensor (a 0-d real array, also for complex x)."""
    return xp.sqrt(xp.sum(_base.abs_sq(xp, x)))


def _trust_ratio(xp, param_norm, norm, coefficient, eps, denominator=None):
    """``coefficient * param_norm / (denominator + eps)``, or 1 where ``param_norm``
    or ``norm`` is 0 (as optax's scale_by_trust_ratio and Keras's Lamb: a tensor
    at zero, or one that gets no update, is stepped unscaled). ``denominator``
    defaults to ``norm``."""
    denominator = norm if denominator is None else denominator
    ratio = coefficient * param_norm / (denominator + eps)
    one = xp.ones((), dtype=param_norm.dtype)
    return xp.where((param_norm > 0) & (norm > 0), ratio, one)


@hyper.LAMB.factory
def lamb(learning_rate, b1, b2, eps, eps_root, weight_decay, weight_decay_mode,
         trust_ratio, trust_coefficient, state_dtype) -> Rule:
    r"""LAMB (You et al., 2019): Adam's step rescaled per tensor by a trust ratio.

    .. math::
        \begin{aligned}
        &m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
         v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2\\
        &r_t \leftarrow \frac{m_t / (1 - \beta_1^t)}
            {\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}\\
        &d_t \leftarrow r_t + \lambda \theta_{t-1}, \quad
         \theta_t \leftarrow \theta_{t-1} - \gamma\,
            \frac{\phi\,\|\theta_{t-1}\|}{\|d_t\|}\, d_t
            \quad\text{('inside': the paper, optax)}\\
        &\theta' \leftarrow \theta_{t-1} - \gamma \lambda \theta_{t-1}, \quad
         \theta_t \leftarrow \theta' - \gamma\,\frac{\|\theta'\|}{\|r_t\|}\, r_t
            \quad\text{('decoupled': Keras)}
        \end{aligned}

    The norms are over each whole tensor; the ratio is 1 where either norm is
    0 (a tensor initialised at zero takes the plain step).

    Args:
      learning_rate: \gamma (default 0.001; may be a schedule).
      b1: \beta_1 in [0, 1) (default 0.9).
      b2: \beta_2 in [0, 1) (default 0.999).
      eps: \epsilon >= 0 (default 1e-6: the paper's and optax's; Keras 1e-7).
      eps_root: \epsilon_{root} >= 0, inside the sqrt (optax; default 0).
      weight_decay: \lambda >= 0 (default 0).
      weight_decay_mode: 'inside' (default: the paper, optax: the decay joins
        the update before its norm is taken) or 'decoupled' (Keras: the param
        is decayed first, p -= lr * wd * p, and the ratio uses the decayed
        param and the Adam step alone).
      trust_ratio: scale by the trust ratio (default True; False: Adam with
        the decay above, e.g. for biases in a torch param group).
      trust_coefficient: \phi > 0, multiplies the ratio (default 1).
      state_dtype: dtype of the moments (optax ``mu_dtype``).

    Returns:
      A :class:`Rule`; state :class:`LambState` (count, first_moment, second_moment).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.lamb(learning_rate=0.1)
      >>> params = [np.array([3.0, 4.0]), np.zeros(2)]
      >>> grads = [np.array([1.0, -1.0]), np.array([2.0, 0.0])]
      >>> updates, _ = rule.update(grads, rule.init(params), params)
      >>> np.round(updates[0], 6).tolist()   # ||p|| = 5 = ||update|| / lr
      [-0.353553, 0.353553]
      >>> np.round(updates[1], 6).tolist()   # p at 0: ratio 1, Adam's step
      [-0.1, -0.0]

    References:
      You et al., "Large Batch Optimization for Deep Learning: Training BERT
      in 76 minutes", ICLR 2020, https://arxiv.org/abs/1904.00962

    Notes:
      optax.lamb: learning_rate required, eps 1e-6, weight_decay 0, decay
      'inside', ``mask`` for the decay only (polyopt.optax.lamb takes it).
      keras.optimizers.Lamb: learning_rate 1e-3, epsilon 1e-7, decay
      'decoupled' (Keras's base class decays before the step).
      torch has no LAMB.
    """

    def step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def scalars(like):
            t = _base.step_number(xp, state.count, like)
            beta1 = _base.scalar(xp, b1, like)
            return (beta1, _one_minus_power(xp, beta1, t), _one_minus_power(xp, b2, t),
                    _base.scalar(xp, lr_value, like))

        updates, ms, vs = [], [], []
        for g, p, m, v in zip(grads, params, state.first_moment, state.second_moment):
            beta1, bc1, bc2, lr = scalars(g)
            m, v = _moments(xp, beta1, b2, g, m, v)
            ms.append(m)
            vs.append(v)
            r = (m / bc1) / (xp.sqrt(_base.plus_root(v / bc2, eps_root)) + eps)
            decay = not _base.is_zero(weight_decay)
            if weight_decay_mode == "decoupled" and decay:
                # Keras's two assigns: p' = p - p*wd*lr, then p' - ratio*lr*r; the
                # update is their difference (exact, Sterbenz: p' - ratio*lr*r is
                # within a factor 2 of p), so p + update rounds as Keras does.
                point = p - p * _base.scalar(xp, weight_decay, p) * lr
                scale = lr
                if trust_ratio:
                    scale = _trust_ratio(xp, _norm(xp, point), _norm(xp, r),
                                         trust_coefficient, 0.0) * lr
                updates.append((point - scale * r) - p)
                continue
            if decay:
                r = r + _base.scalar(xp, weight_decay, p) * p
            if trust_ratio:
                r = _trust_ratio(xp, _norm(xp, p), _norm(xp, r), trust_coefficient, 0.0) * r
            updates.append(-lr * r)
        return updates, (ms, vs), lr_value

    rule = _base.stateful_rule("lamb", LambState, (Slot("first_moment"), Slot("second_moment")),
                               step, learning_rate=learning_rate, weight_decay=0.0,
                               weight_decay_mode="l2", state_dtype=state_dtype,
                               complex_params=True)
    return rule._replace(elementwise=not trust_ratio)


@hyper.LARS.factory
def lars(learning_rate, momentum, nesterov, momentum_form, weight_decay, trust_ratio,
         trust_coefficient, trust_norm, eps, state_dtype) -> Rule:
    r"""LARS (You et al., 2017): SGD with momentum, each tensor's step scaled by
    a local learning rate.

    .. math::
        \begin{aligned}
        &d_t \leftarrow g_t + \beta \theta_{t-1}\\
        &\lambda_t \leftarrow \frac{\eta\,\|\theta_{t-1}\|}
            {\|g_t\| + \beta \|\theta_{t-1}\| + \epsilon}\quad\text{('separate': the paper)}
         \quad\text{or}\quad
         \frac{\eta\,\|\theta_{t-1}\|}{\|d_t\| + \epsilon}\quad\text{('combined': optax)}\\
        &v_t \leftarrow \mu v_{t-1} + \gamma \lambda_t d_t, \quad
         \theta_t \leftarrow \theta_{t-1} - v_t
         \quad (\theta_{t-1} - \gamma \lambda_t d_t - \mu v_t \text{ with nesterov})
        \end{aligned}

    The norms are over each whole tensor; \lambda_t is 1 where
    \|\theta_{t-1}\| or the gradient's norm (\|g_t\| 'separate', \|d_t\|
    'combined') is 0, as optax and TensorFlow's LARSOptimizer do: a tensor
    initialised at zero takes the plain SGD step.

    Args:
      learning_rate: \gamma, the global rate (default 1.0: with the trust
        coefficient 0.001 the step is about 0.001 * ||\theta|| per tensor;
        may be a schedule).
      momentum: \mu in [0, 1] (default 0.9: the paper's, optax's).
      nesterov: Nesterov momentum (default False; optax's ``nesterov``).
      momentum_form: 'velocity' (default: the paper, optax: the buffer sums
        lr-scaled steps) or 'buffer' (torch SGD's: lr multiplies the buffer);
        they differ only when the learning rate changes.
      weight_decay: \beta >= 0 (default 0), added to the gradient (inside the
        trust ratio, as the paper and optax).
      trust_ratio: scale by \lambda_t (default True; False: SGD with momentum
        and L2, as optax's ``trust_ratio_mask`` False).
      trust_coefficient: \eta > 0 (default 0.001: the paper's, optax's).
      trust_norm: 'separate' (default: the paper, TensorFlow's LARSOptimizer:
        \|g\| + \beta\|\theta\|) or 'combined' (optax: \|g + \beta\theta\|).
      eps: \epsilon >= 0 in the ratio's denominator (default 0, optax's).
      state_dtype: dtype of the momentum buffer.

    Returns:
      A :class:`Rule`; state :class:`LarsState` (count, momentum).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.lars(learning_rate=1.0, trust_coefficient=0.01)
      >>> params = [np.array([3.0, 4.0])]
      >>> updates, _ = rule.update([np.array([0.6, 0.8])], rule.init(params), params)
      >>> np.round(updates[0], 6).tolist()   # 0.01 * 5 / 1 = 0.05 times g
      [-0.03, -0.04]

    References:
      You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
      2017, https://arxiv.org/abs/1708.03888

    Notes:
      optax.lars: learning_rate required, momentum 0.9, trust_coefficient
      0.001, eps 0, trust_norm 'combined', masks ``weight_decay_mask`` and
      ``trust_ratio_mask`` (polyopt.optax.lars takes both). torch and Keras
      have no LARS.
    """
    use_momentum = not _base.is_zero(momentum)

    def step(xp, grads, params, state, lr_value):
        buffers, first = _base.momentum_buffers(xp, state.momentum, grads, use_momentum,
                                                state.count)
        updates, slots = [], []
        for i, (g, p) in enumerate(zip(grads, params)):
            lr = _base.scalar(xp, lr_value, g)
            d = g
            if not _base.is_zero(weight_decay):
                d = g + _base.scalar(xp, weight_decay, p) * p
            if trust_ratio:
                p_norm = _norm(xp, p)
                if trust_norm == "combined":
                    ratio = _trust_ratio(xp, p_norm, _norm(xp, d), trust_coefficient, eps)
                else:
                    g_norm = _norm(xp, g)
                    denominator = g_norm + _base.scalar(xp, weight_decay, p) * p_norm
                    ratio = _trust_ratio(xp, p_norm, g_norm, trust_coefficient, eps,
                                         denominator)
                d = ratio * d
            if use_momentum:
                u, slot = _base.momentum_step(xp, d, buffers[i], _base.scalar(xp, momentum, g),
                                              lr, nesterov=nesterov, form=momentum_form,
                                              first=first)
                slots.append(slot)
            else:
                u = -lr * d
            updates.append(u)
        # momentum 0 (a number) leaves existing buffers as they are, as torch's SGD
        return updates, (slots if use_momentum else list(state.momentum),), lr_value

    slots = (Slot("momentum", PARAM if use_momentum else NONE),)
    rule = _base.stateful_rule("lars", LarsState, slots, step, learning_rate=learning_rate,
                               weight_decay=0.0, weight_decay_mode="l2",
                               state_dtype=state_dtype, complex_params=True)
    return rule._replace(elementwise=not trust_ratio)
