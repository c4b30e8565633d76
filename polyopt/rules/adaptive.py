"""Per-coordinate adaptive rules without bias correction: AdaGrad, RMSprop, AdaDelta."""

from __future__ import annotations

from typing import Any, NamedTuple

from polyopt import hyper
from polyopt.rules import _base
from polyopt.rules._base import Rule
from polyopt.rules._state import NONE, PARAM, Slot


class AdagradState(NamedTuple):
    count: Any
    sum_of_squares: list


@hyper.ADAGRAD.factory
def adagrad(learning_rate, initial_accumulator_value, eps, eps_placement, lr_decay,
            weight_decay, weight_decay_mode, state_dtype) -> Rule:
    r"""AdaGrad (Duchi et al., 2011).

    .. math::
        \begin{aligned}
        &s_0 \leftarrow s_{init}\\
        &s_t \leftarrow s_{t-1} + g_t^2\\
        &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}
            \frac{g_t}{\sqrt{s_t} + \epsilon}
            \quad\text{or}\quad \frac{g_t}{\sqrt{s_t + \epsilon}}\ \text{('inside')}
        \end{aligned}

    Args:
      learning_rate: \gamma (default 0.01).
      initial_accumulator_value: s_init >= 0 (default 0, torch; Keras and optax use 0.1).
      eps: \epsilon >= 0 (default 1e-10, torch; Keras and optax 1e-7 inside the sqrt).
      eps_placement: 'outside' (torch) or 'inside' (Keras, optax).
      lr_decay: \eta >= 0 (torch; default 0).
      weight_decay, weight_decay_mode: see :func:`sgd`.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adagrad(learning_rate=0.5)
      >>> params = [np.array([1.0, 1.0])]
      >>> updates, _ = rule.update([np.array([2.0, -4.0])], rule.init(params), params)
      >>> np.round(updates[0], 6).tolist()
      [-0.5, 0.5]
    """

    def step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def step_size(like):
            lr = _base.scalar(xp, lr_value, like)
            if _base.is_zero(lr_decay):
                return lr
            return lr / (1 + xp.astype(state.count, _base.real_dtype(xp, like.dtype)) * lr_decay)

        updates, sums = [], []
        for g, s in zip(grads, state.sum_of_squares):
            s = _base.real_part(xp, s) + _base.abs_sq(xp, g)
            if eps_placement == "outside":
                denom = xp.sqrt(s) + eps
            else:
                denom = xp.sqrt(s + eps)
            updates.append(-step_size(g) * (g / denom))
            sums.append(s)
        return updates, (sums,), lr_value

    return _base.stateful_rule("adagrad", AdagradState,
                               (Slot("sum_of_squares", init=initial_accumulator_value),), step,
                               state_dtype=state_dtype, complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, sparse="updates_and_state")


class RMSpropState(NamedTuple):
    count: Any
    mean_square: list
    mean_grad: list  # empty unless centered
    momentum: list  # empty without momentum


@hyper.RMSPROP.factory
def rmsprop(learning_rate, decay, eps, eps_placement, initial_scale, centered, momentum,
            nesterov, momentum_form, bias_correction, weight_decay, weight_decay_mode,
            state_dtype) -> Rule:
    r"""RMSprop (Tieleman and Hinton, 2012), optionally centered (Graves, 2013).

    .. math::
        \begin{aligned}
        &v_t \leftarrow \rho v_{t-1} + (1 - \rho) g_t^2, \quad
         \bar g_t \leftarrow \rho \bar g_{t-1} + (1 - \rho) g_t \ \text{(centered)}\\
        &\tilde v_t \leftarrow v_t - \bar g_t^2 \ \text{(centered) else } v_t\\
        &d_t \leftarrow g_t / \sqrt{\tilde v_t + \epsilon}\ \text{('inside')}
          \ \text{or}\ g_t / (\sqrt{\tilde v_t} + \epsilon)\ \text{('outside')}\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma d_t \quad\text{(no momentum)}
        \end{aligned}

    With momentum, d_t feeds heavy-ball momentum in ``momentum_form``.

    Args:
      learning_rate: \gamma (default 0.001).
      decay: \rho in [0, 1) (default 0.9; torch 'alpha' defaults to 0.99).
      eps: \epsilon (default 1e-8).
      eps_placement: 'inside' (Keras, optax) or 'outside' (torch).
      initial_scale: v_0 (optax; default 0).
      centered: subtract the squared mean gradient (default False).
      momentum: in [0, 1] (default 0: no momentum state).
      nesterov: Nesterov momentum (optax; default False).
      momentum_form: 'velocity' (Keras, optax: the buffer holds lr-scaled
        steps) or 'buffer' (torch: the buffer holds d_t, lr multiplies it).
      bias_correction: divide v (and the mean gradient) by 1 - rho^t (optax).
      weight_decay, weight_decay_mode: see :func:`sgd`.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.rmsprop(learning_rate=0.01, eps=0.0)
      >>> params = [np.array([1.0])]
      >>> updates, _ = rule.update([np.array([2.0])], rule.init(params), params)
      >>> round(float(updates[0][0]), 6)   # -lr * g / sqrt(0.1 * g**2)
      -0.031623
    """
    use_momentum = not _base.is_zero(momentum)

    slots = (Slot("mean_square", init=initial_scale),
             Slot("mean_grad", PARAM if centered else NONE),
             Slot("momentum", PARAM if use_momentum else NONE))

    def step(xp, grads, params, state, lr_value):
        @_base.per_dtype
        def correction(like):
            if not bias_correction:
                return 1.0
            return 1 - decay ** _base.step_number(xp, state.count, like)

        buffers, _ = _base.momentum_buffers(xp, state.momentum, grads, use_momentum, state.count)
        updates, squares, means, slots = [], [], [], []
        for i, g in enumerate(grads):
            v = (decay * _base.real_part(xp, state.mean_square[i])
                 + (1 - decay) * _base.abs_sq(xp, g))
            squares.append(v)
            v_hat = v / correction(g) if bias_correction else v
            if centered:
                mg = decay * state.mean_grad[i] + (1 - decay) * g
                means.append(mg)
                mg_hat = mg / correction(g) if bias_correction else mg
                v_hat = v_hat - _base.abs_sq(xp, mg_hat)
            if eps_placement == "inside":
                direction = g / xp.sqrt(v_hat + eps)
            else:
                direction = g / (xp.sqrt(v_hat) + eps)
            lr = _base.scalar(xp, lr_value, g)
            if use_momentum:
                u, slot = _base.momentum_step(
                    xp, direction, buffers[i], _base.scalar(xp, momentum, g), lr,
                    nesterov=nesterov, form=momentum_form)
                slots.append(slot)
            else:
                u = -lr * direction
            updates.append(u)
        if not use_momentum:
            slots = list(state.momentum)  # momentum 0 (a number) leaves buffers as they are
        return updates, (squares, means, slots), lr_value

    # without momentum a zero gradient gives a zero step; the averages decay everywhere
    return _base.stateful_rule("rmsprop", RMSpropState, slots, step, state_dtype=state_dtype,
                               complex_params=True,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode,
                               sparse="dense" if use_momentum else "updates")


class AdadeltaState(NamedTuple):
    count: Any
    mean_square_grad: list
    mean_square_delta: list


@hyper.ADADELTA.factory
def adadelta(learning_rate, rho, eps, weight_decay, weight_decay_mode, state_dtype) -> Rule:
    r"""AdaDelta (Zeiler, 2012).

    .. math::
        \begin{aligned}
        &E[g^2]_t \leftarrow \rho E[g^2]_{t-1} + (1 - \rho) g_t^2\\
        &\Delta_t \leftarrow \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}
            {\sqrt{E[g^2]_t + \epsilon}} g_t\\
        &E[\Delta^2]_t \leftarrow \rho E[\Delta^2]_{t-1} + (1 - \rho) \Delta_t^2\\
        &\theta_t \leftarrow \theta_{t-1} - \gamma \Delta_t
        \end{aligned}

    Args:
      learning_rate: \gamma (default 1.0, the paper's; Keras defaults to 0.001,
        optax to no scaling at all, which ascends the loss).
      rho: in [0, 1) (default 0.95, the paper's; torch and optax use 0.9).
      eps: \epsilon (default 1e-6, the paper's and torch's; Keras 1e-7).
      weight_decay, weight_decay_mode: see :func:`sgd`.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.adadelta(rho=0.9, eps=1e-6)
      >>> params = [np.array([0.0])]
      >>> updates, _ = rule.update([np.array([1.0])], rule.init(params), params)
      >>> round(float(updates[0][0]), 8)   # -sqrt(eps) / sqrt(0.1 + eps)
      -0.00316226
    """

    def step(xp, grads, params, state, lr_value):
        updates, grad_sq, delta_sq = [], [], []
        for g, eg, ed in zip(grads, state.mean_square_grad, state.mean_square_delta):
            eg = rho * eg + (1 - rho) * (g * g)
            delta = xp.sqrt(ed + eps) / xp.sqrt(eg + eps) * g
            ed = rho * ed + (1 - rho) * (delta * delta)
            updates.append(-_base.scalar(xp, lr_value, g) * delta)
            grad_sq.append(eg)
            delta_sq.append(ed)
        return updates, (grad_sq, delta_sq), lr_value

    return _base.stateful_rule("adadelta", AdadeltaState,
                               (Slot("mean_square_grad"), Slot("mean_square_delta")), step,
                               state_dtype=state_dtype,
                               learning_rate=learning_rate, weight_decay=weight_decay,
                               weight_decay_mode=weight_decay_mode, sparse="updates")
