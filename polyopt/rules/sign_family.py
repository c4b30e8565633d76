"""Sign-based rules: Lion."""

from __future__ import annotations

from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import Slot


def _sign(xp, x):
    """sign(x) with NaN kept (as jnp.sign and torch.sign), by comparisons:
    array_api_compat's torch ``sign`` assigns NaNs by index, which torch.compile
    cannot trace."""
    one = xp.ones((), dtype=x.dtype)
    return xp.where(x > 0, one, xp.where(x < 0, -one, x * 0))


class LionState(NamedTuple):
    count: Any
    momentum: list


@hyper.LION.factory
def lion(learning_rate, b1, b2, weight_decay, weight_decay_mode, state_dtype) -> Rule:
    r"""Lion (Chen et al., 2023): the sign of an interpolated momentum.

    .. math::
        \begin{aligned}
        &\textbf{input: } \gamma, \beta_1, \beta_2, \lambda; \quad
         \textbf{initialize: } m_0 \leftarrow 0\\
        &\textbf{for } t = 1, 2, \ldots:\\
        &\quad c_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t\\
        &\quad \theta_t \leftarrow \theta_{t-1} - \gamma\,(\operatorname{sign}(c_t)
            + \lambda \theta_{t-1})\\
        &\quad m_t \leftarrow \beta_2 m_{t-1} + (1 - \beta_2) g_t
        \end{aligned}

    Elementwise; one slot (the momentum), so half of Adam's state.

    Args:
      learning_rate: \gamma (default 1e-4, the paper's advice of a rate 3-10x
        smaller than AdamW's; Keras uses 1e-3, optax requires one).
      b1: \beta_1 in [0, 1), interpolation of the update (default 0.9).
      b2: \beta_2 in [0, 1), decay of the momentum (default 0.99).
      weight_decay: \lambda >= 0 (default 0; optax.lion 1e-3).
      weight_decay_mode: 'decoupled' (default: the paper, optax, Keras:
        p -= lr * wd * p), 'l2' or 'decoupled_unscaled'.
      state_dtype: dtype of the momentum (optax ``mu_dtype``).

    Returns:
      A :class:`Rule`; state :class:`LionState` (count, momentum).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.lion(learning_rate=0.1)
      >>> params = [np.array([1.0, 2.0])]
      >>> updates, _ = rule.update([np.array([3.0, -0.5])], rule.init(params), params)
      >>> updates[0].tolist()   # -lr * sign(g) on the first step
      [-0.1, 0.1]

    References:
      Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023,
      https://arxiv.org/abs/2302.06675

    Notes:
      optax.lion: learning_rate required, weight_decay=1e-3 (decoupled, times
      lr), ``mu_dtype``; keras.optimizers.Lion: learning_rate=1e-3,
      weight_decay=None (decoupled, times lr, applied before the step, which
      is the same here: the step does not read the params); torch has none.
    """

    def step(xp, grads, params, state, lr_value):
        updates, momenta = [], []
        for g, m in zip(grads, state.momentum):
            beta1, beta2 = _base.scalar(xp, b1, g), _base.scalar(xp, b2, g)
            direction = _sign(xp, beta1 * m + (1 - beta1) * g)
            updates.append(-_base.scalar(xp, lr_value, g) * direction)
            momenta.append(beta2 * m + (1 - beta2) * g)
        return updates, (momenta,), lr_value

    return _base.stateful_rule("lion", LionState, (Slot("momentum"),), step,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, state_dtype=state_dtype)
