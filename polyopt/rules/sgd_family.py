"""Stochastic gradient descent with (Nesterov) momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import NONE, PARAM, Slot


class SGDState(NamedTuple):
    count: Any  # 0-d int32: steps taken
    momentum: list  # one buffer per param; empty without momentum


@hyper.SGD.factory
def sgd(learning_rate, momentum, dampening, nesterov, weight_decay, weight_decay_mode,
        momentum_form, state_dtype) -> Rule:
    r"""SGD with optional heavy-ball or Nesterov momentum.

    .. math::
        \begin{aligned}
        &g_t \leftarrow \nabla f(\theta_{t-1}) + \lambda \theta_{t-1}
            \quad\text{(weight\_decay\_mode='l2')}\\
        &b_t \leftarrow \mu b_{t-1} + (1 - \tau) g_t \quad (b_1 = g_1)\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma (g_t + \mu b_t \text{ if nesterov else } b_t)
        \end{aligned}

    Args:
      learning_rate: step size \gamma (default 0.01, >= 0, may be a schedule).
      momentum: \mu in [0, 1] (default 0: plain SGD, no state).
      dampening: \tau in [0, 1] (torch; default 0).
      nesterov: Nesterov momentum (default False).
      weight_decay: \lambda >= 0 (default 0).
      weight_decay_mode: 'l2' (torch SGD), 'decoupled' (Keras: p -= lr*wd*p),
        or 'decoupled_unscaled'.
      momentum_form: 'buffer' (torch, optax: b sums gradients, lr multiplies
        it) or 'velocity' (Keras: v = mu*v - lr*g; p += v). The two differ
        only when the learning rate changes.

    Returns:
      A :class:`Rule`; state :class:`SGDState`.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.sgd(learning_rate=0.1, momentum=0.9)
      >>> params = [np.array([1.0, -2.0])]
      >>> state = rule.init(params)
      >>> updates, state = rule.update([np.array([0.5, 1.0])], state, params)
      >>> [float(u) for u in updates[0]]
      [-0.05, -0.1]

    Notes:
      torch.optim.SGD: momentum_form='buffer' (its default). Keras SGD:
      momentum_form='velocity', weight_decay_mode='decoupled'. optax.sgd:
      the defaults (optax has no dampening).
    """
    use_momentum = not _base.is_zero(momentum)

    def step(xp, grads, params, state, lr_value):
        buffers, first = _base.momentum_buffers(xp, state.momentum, grads, use_momentum,
                                                state.count)
        updates, slots = [], []
        for i, g in enumerate(grads):
            lr = _base.scalar(xp, lr_value, g)
            if use_momentum:
                u, slot = _base.momentum_step(
                    xp, g, buffers[i], _base.scalar(xp, momentum, g), lr,
                    nesterov=nesterov, form=momentum_form,
                    dampening=_base.scalar(xp, dampening, g), first=first,
                )
                slots.append(slot)
            else:
                u = -lr * g
            updates.append(u)
        # momentum 0 (a number) leaves existing buffers as they are, as torch does
        return updates, (slots if use_momentum else list(state.momentum),), lr_value

    slots = (Slot("momentum", PARAM if use_momentum else NONE),)
    return _base.stateful_rule("sgd", SGDState, slots, step, state_dtype=state_dtype,
                               complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode,
                               sparse="dense" if use_momentum else "updates_and_state")
