"""Rules that wrap or compose other rules, and the composable pieces.

chain, lookahead, ranger, sam, apply_if_finite; clip_by_global_norm,
centralize (gradient centralization), add_decayed_weights (coupled L2),
decoupled_weight_decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from polyopt import hyper
from polyopt._namespace import fused
from polyopt.rules import _base, _state
from polyopt.rules._base import Rule
from polyopt.rules.adam_family import _radam


class ChainState(NamedTuple):
    inner: tuple  # one state per chained rule


def chain(*rules: Rule) -> Rule:
    """Apply rules in sequence: each one's updates are the next one's grads.

    As optax.chain. Gradient transforms (clip_by_global_norm, centralize,
    add_decayed_weights) go before the optimizer, decoupled_weight_decay
    after it.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.chain(rules.clip_by_global_norm(1.0), rules.sgd(learning_rate=0.5))
      >>> params = [np.array([0.0, 0.0])]
      >>> updates, _ = rule.update([np.array([3.0, 4.0])], rule.init(params), params)
      >>> np.round(updates[0], 12).tolist()
      [-0.3, -0.4]
    """
    if not rules:
        raise ValueError("chain: needs at least one rule, got none")
    for i, r in enumerate(rules):
        if not (hasattr(r, "init") and hasattr(r, "update")):
            raise TypeError(f"chain: rules[{i}] must be a Rule (init, update), got {r!r}")

    uses_layout = any(_capability(r, "uses_layout") for r in rules)

    def init(params, layouts=None):
        params = _base.check_params("chain", params)
        return ChainState(tuple(_base.init_of(r, params, layouts) for r in rules))

    def update(grads, state, params, layouts=None):
        _base.check_state("chain", state, ChainState)
        if len(state.inner) != len(rules):
            raise ValueError(
                f"chain.update: state holds {len(state.inner)} states for {len(rules)} rules")
        new_states = []
        for r, s in zip(rules, state.inner):
            grads, s = _base.update_of(r, grads, s, params, layouts)
            new_states.append(s)
        return grads, ChainState(tuple(new_states))

    # a per-tensor transform first and elementwise rules after it: that
    # transform, then the chain with the first rule's elementwise rest
    first = _capability(rules[0], "prefix")
    prefix = None
    if first is not None and all(_capability(r, "elementwise") for r in rules[1:]):
        prefix = (first[0], chain(first[1], *rules[1:]))
    return Rule(init, update, elementwise=all(_capability(r, "elementwise") for r in rules),
                uses_layout=uses_layout,
                needs_closure=any(_capability(r, "needs_closure") for r in rules),
                prefix=prefix)


def _capability(rule: Any, name: str) -> Any:
    """A rule's declared capability (``Rule``'s default for a bare (init, update) pair)."""
    return getattr(rule, name, Rule._field_defaults[name])


class CountState(NamedTuple):
    count: Any


def _stateless(name: str, fn: Callable, check: Callable | None = None, *,
               per_tensor: bool = False, uses_layout: bool = False,
               separable: bool = False) -> Rule:
    """A rule whose state is only a step count; fn(xp, grads, params, count) -> updates
    (with ``uses_layout``: fn(xp, grads, params, count, layouts), one Layout or
    None per param).

    ``check(owner, params)``, if given, checks the params' shapes in init and update.
    ``separable``: fn takes each gradient alone and does not read the count,
    so the rule declares its :attr:`Rule.prefix`: fn itself, then a rule that
    only counts.
    """

    def init(params, layouts=None):
        params = _base.check_params(name, params)
        if check is not None:
            check(f"{name}.init", params)
        if uses_layout:
            _state.layouts_for(f"{name}.init", params, layouts)
        xp = _base.namespace(*params)
        return CountState(_base.zeros_count(xp, params[0]))

    def update(grads, state, params, layouts=None):
        _base.check_state(name, state, CountState)
        xp, grads, params = _base.check_update(name, grads, state, params)
        if check is not None:
            check(f"{name}.update", params)
        if uses_layout:
            layouts = _state.layouts_for(f"{name}.update", params, layouts)
            updates = fn(xp, grads, params, state.count, layouts)
        else:
            updates = fn(xp, grads, params, state.count)
        return updates, CountState(_base.increment(state.count))

    rule = Rule(init, update, elementwise=not per_tensor, uses_layout=uses_layout)
    if not separable:
        return rule

    def transform(grads, params, layouts=None):
        xp, grads, params = _base.check_update(name, grads, None, params)
        if check is not None:
            check(f"{name}.update", params)
        if uses_layout:
            return fn(xp, grads, params, None, _state.layouts_for(f"{name}.update", params,
                                                                   layouts))
        return fn(xp, grads, params, None)

    counting = _stateless(name, lambda xp, grads, params, count: grads)
    return rule._replace(prefix=(transform, counting))


@hyper.CLIP_BY_GLOBAL_NORM.factory
def clip_by_global_norm(max_norm, eps) -> Rule:
    r"""Scale all gradients by max_norm / (norm + eps) when norm + eps >= max_norm.

    .. math::
        g \leftarrow \frac{g}{\lVert g \rVert_2 + \epsilon} \cdot c
        \quad\text{if } \lVert g \rVert_2 + \epsilon \ge c \text{ else } g

    The norm is taken over all arrays together. eps=0 is optax's
    ``clip_by_global_norm`` and Keras's ``global_clipnorm``; eps=1e-6 is
    torch's ``clip_grad_norm_`` (g * min(c / (norm + 1e-6), 1)). Gradients
    with norm + eps below max_norm pass unchanged. With
    max_norm=0 every gradient becomes 0 (all-zero gradients stay 0, not NaN).

    Args:
      max_norm: c >= 0 (default 1.0; a number or a 0-d array).
      eps: \epsilon >= 0 added to the norm (default 0).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.clip_by_global_norm(1.0)
      >>> params = [np.zeros(2)]
      >>> rule.update([np.array([3.0, 4.0])], rule.init(params), params)[0][0].tolist()
      [0.6, 0.8]
    """

    def fn(xp, grads, params, count):
        norm = global_norm(xp, grads)
        outs = []
        for g in grads:
            limit = _as_array(xp, max_norm, g)
            total = xp.astype(norm, g.dtype) + eps
            keep = total < limit
            total = xp.where(total > 0, total, xp.full_like(total, 1.0))  # max_norm=0, g=0
            # optax's order of operations: (g / norm) * max_norm
            outs.append(xp.where(keep, g, (g / total) * limit))
        return outs

    # one norm over all arrays: not elementwise (a shard or a bucket has its own norm)
    return _stateless("clip_by_global_norm", fn, per_tensor=True)


def _as_array(xp, value: Any, like) -> Any:
    """A hyperparameter as a 0-d array of ``like``'s dtype, namespace and device."""
    value = _base.scalar(xp, value, like)
    if hasattr(value, "shape"):
        return value
    return xp.asarray(value, dtype=like.dtype, device=_base._device(like))


def global_norm(xp, arrays) -> Any:
    """sqrt of the sum of squares of all arrays, in the widest dtype among them."""
    dtype = xp.result_type(*arrays)
    total = None
    for a in arrays:
        s = xp.sum(xp.astype(a, dtype) * xp.astype(a, dtype))
        total = s if total is None else total + s
    return xp.sqrt(total)


@hyper.CENTRALIZE.factory
def centralize(keep_axis, min_ndim) -> Rule:
    r"""Gradient centralization (Yong et al., 2020): subtract from each gradient with
    at least ``min_ndim`` axes its mean over every axis except ``keep_axis``.

    .. math::
        g \leftarrow g - \operatorname{mean}_{\text{axes} \ne k}(g)
        \quad\text{if } g.\mathrm{ndim} \ge \text{min\_ndim}

    Args:
      keep_axis: None (default): the mean is taken over each gradient's
        reduction axes, from its :class:`~polyopt.rules._state.Layout`
        (``layouts=`` of init and update; the adapters pass their framework's:
        axis 0 of torch's (out, in, kh, kw), the last axis of Keras's and
        Flax's (kh, kw, in, out); without layouts, axis 0 is the output).
        An integer k fixes the output axis for every gradient instead (0 for
        torch layouts, -1 for Keras's); it must be a valid axis of every
        centralized gradient (checked in init and update, never wrapped).
      min_ndim: centralize only gradients with at least this many axes
        (default 2: dense and conv kernels, as Ranger's ``gc_conv_only=False``;
        4: conv kernels only, as ``gc_conv_only=True``).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.centralize()
      >>> params = [np.zeros((2, 2))]
      >>> grads = [np.array([[1.0, 3.0], [0.0, 4.0]])]
      >>> rule.update(grads, rule.init(params), params)[0][0].tolist()
      [[-1.0, 1.0], [-2.0, 2.0]]
    """

    def check(owner, arrays):
        for i, a in enumerate(arrays):
            if a.ndim >= min_ndim and not -a.ndim <= keep_axis < a.ndim:
                raise ValueError(
                    f"{owner}: keep_axis={keep_axis} is not an axis of params[{i}], "
                    f"which has shape {tuple(a.shape)}")

    def fn(xp, grads, params, count, layouts=None):
        outs = []
        kernels = fused(xp)
        for i, g in enumerate(grads):
            if g.ndim < min_ndim:
                outs.append(g)
                continue
            if layouts is None:
                keep = keep_axis % g.ndim
                axes = tuple(a for a in range(g.ndim) if a != keep)
            else:  # the layout's reduction axes (a 1-D gradient: all of it)
                axes = _state.matrix_axes(layouts[i], g.ndim)[1]
            outs.append(kernels.centered(xp, g, axes))
        return outs

    if keep_axis is None:
        return _stateless("centralize", fn, per_tensor=True, uses_layout=True, separable=True)
    return _stateless("centralize", fn, check, per_tensor=True, separable=True)


@hyper.ADD_DECAYED_WEIGHTS.factory
def add_decayed_weights(weight_decay) -> Rule:
    """g + weight_decay * p: coupled L2 weight decay, placed before the optimizer."""

    def fn(xp, grads, params, count):
        return _base.add_l2(xp, grads, params, weight_decay, "l2")

    return _stateless("add_decayed_weights", fn)


@hyper.DECOUPLED_WEIGHT_DECAY.factory
def decoupled_weight_decay(weight_decay, learning_rate) -> Rule:
    """u - learning_rate * weight_decay * p: decoupled decay, placed after the optimizer.

    learning_rate may be a schedule (evaluated at this piece's own count).
    """

    def fn(xp, updates, params, count):
        lr = _base.evaluate(learning_rate, count)
        return _base.apply_decoupled(xp, updates, params, weight_decay, lr, "decoupled")

    return _stateless("decoupled_weight_decay", fn)


class LookaheadState(NamedTuple):
    count: Any
    slow: list  # the slow weights
    inner: Any  # the fast rule's state


@hyper.LOOKAHEAD.factory
def lookahead(inner: Rule, sync_period, slow_step_size, reset_state) -> Rule:
    r"""Lookahead (Zhang et al., 2019) around any rule.

    The inner ("fast") rule steps every time; every ``sync_period`` steps the
    slow weights move toward the fast ones and the fast weights restart there:

    .. math::
        \begin{aligned}
        &\textbf{input: } \theta_0 \text{ (params)}, k, \alpha, \text{inner rule}\\
        &\textbf{initialize: } \phi \leftarrow \theta_0 \text{ (slow weights)}\\
        &\textbf{for } t = 1, 2, \ldots:\\
        &\quad \theta_t \leftarrow \theta_{t-1} + \text{inner.update}(g_t, \theta_{t-1})\\
        &\quad \textbf{if } t \equiv 0 \pmod k:\
            \phi \leftarrow \phi + \alpha (\theta_t - \phi), \quad \theta_t \leftarrow \phi
            \quad (\text{inner state} \leftarrow \text{init if reset\_state})
        \end{aligned}

    The params the rule updates (and at which gradients are taken) are the
    fast weights; the slow weights live in ``state.slow``. After a
    synchronisation both are equal (up to the rounding of ``p + (slow - p)``).

    Args:
      inner: the fast rule.
      sync_period: k >= 1 (default 6, tensorflow-addons' and Ranger's; torch
        spelling ``k``).
      slow_step_size: \alpha in [0, 1] (default 0.5; torch spelling ``alpha``).
      reset_state: re-initialise the inner rule's state (with ``inner.init``
        of the fast params before the synchronising step) after every
        synchronisation, as ``optax.lookahead(..., reset_state=True)``
        (default False: tensorflow-addons, Ranger, optax's default).

    Returns:
      A :class:`Rule`; state :class:`LookaheadState` (count, slow, inner).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.lookahead(rules.sgd(learning_rate=1.0), sync_period=2, slow_step_size=0.5)
      >>> params = [np.array([0.0])]
      >>> state = rule.init(params)
      >>> for _ in range(2):
      ...     updates, state = rule.update([np.array([-1.0])], state, params)
      ...     params = [p + u for p, u in zip(params, updates)]
      >>> params[0].tolist()   # fast reached 2, slow moved half way
      [1.0]

    References:
      Zhang, Lucas, Hinton and Ba, "Lookahead Optimizer: k steps forward, 1
      step back", NeurIPS 2019, https://arxiv.org/abs/1907.08610

    Notes:
      optax.lookahead keeps ``LookaheadParams(fast, slow)`` as the params:
      polyopt's params are optax's ``params.fast`` and ``state.slow`` is
      optax's ``params.slow``; the sync condition (``steps_since_sync ==
      sync_period - 1``) and ``reset_state`` are the same.
      tensorflow-addons' Lookahead and lessw2020's Ranger copy the slow weights
      into the model; polyopt's params are those model weights.
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"lookahead: inner must be a Rule (init, update), got {inner!r}")

    slots = (_state.Slot("slow", dtype="param", init="param"),)

    def init(params, layouts=None):
        params = _base.check_params("lookahead", params)
        xp = _base.namespace(*params)
        slow, = _state.build("lookahead", slots, params)
        return LookaheadState(_base.zeros_count(xp, params[0]), slow,
                              _base.init_of(inner, params, layouts))

    def update(grads, state, params, layouts=None):
        _base.check_state("lookahead", state, LookaheadState)
        xp, grads, params = _base.check_update("lookahead", grads, state, params, [state.slow])
        fast_updates, inner_state = _base.update_of(inner, grads, state.inner, params, layouts)
        count = _base.increment(state.count)
        sync = (count % sync_period) == 0
        updates, slow = [], []
        for p, u, s in zip(params, fast_updates, state.slow):
            synced = s + _base.scalar(xp, slow_step_size, p) * ((p + u) - s)
            new_slow = xp.where(sync, synced, s)
            # the update reads new_slow, not s (the same numbers): under XLA with a
            # donated state, the loop that writes the slow weights in place then no
            # longer needs s and p copied first for the params' loop
            # (docs/performance.md, "Ranger and Lookahead under XLA")
            updates.append(xp.where(sync, new_slow - p, u))
            slow.append(new_slow)
        if reset_state:
            inner_state = _state.select(xp, sync, _base.init_of(inner, params, layouts),
                                        inner_state)
        return updates, LookaheadState(count, slow, inner_state)

    rule = _wrapping(inner, init, update, slots)
    inner_prefix = _capability(inner, "prefix")
    if inner_prefix is None:
        return rule
    # the inner rule's grads are the ones given: its transform comes first
    rest = lookahead(inner_prefix[1], sync_period, slow_step_size, reset_state)
    return rule._replace(prefix=(inner_prefix[0], rest))


def _wrapping(inner: Any, init: Callable, update: Callable, slots: tuple = ()) -> Rule:
    """A Rule around ``inner``, with its capabilities."""
    return Rule(init, update, slots=slots, elementwise=_capability(inner, "elementwise"),
                uses_layout=_capability(inner, "uses_layout"),
                needs_closure=_capability(inner, "needs_closure"),
                eval_params=_capability(inner, "eval_params"))


@hyper.RANGER.factory
def ranger(learning_rate, b1, b2, eps, eps_root, eps_placement, threshold, fallback, nesterov,
           amsgrad, total_steps, warmup_proportion, min_lr, weight_decay, weight_decay_mode,
           state_dtype, sync_period, slow_step_size, reset_state, gradient_centralization, *,
           read_twice=False) -> Rule:
    r"""Ranger (Wright, 2019): Lookahead over RAdam, with gradient centralization.

    ``lookahead(chain(centralize(), radam(...)), sync_period, slow_step_size)``.
    The defaults reproduce lessw2020's Ranger (version 20.4.11,
    ``ranger/ranger.py``): b1=0.95, b2=0.999, eps=1e-5 on the raw sqrt(v)
    ('hat'), threshold 5, momentum fallback, k=6, alpha=0.5, gradient
    centralization of every gradient with ndim > 1 over all axes but the output
    (axis 0 in torch's layouts),
    decoupled weight decay p -= lr * weight_decay * p.

    Args:
      As :func:`radam` and :func:`lookahead`, plus
      gradient_centralization: centralize gradients with ndim >= 2 over
        their layout's reduction axes (default True). The rule uses layouts:
        pass ``layouts=`` to init and update (the adapters pass their
        framework's); without them axis 0 is the output (torch's layouts).
        For lessw2020's ``gc_conv_only=True`` compose by hand:
        ``lookahead(chain(centralize(min_ndim=4), radam(...)))``.
      read_twice: a hint for XLA, not a hyperparameter (default False): RAdam's
        direction is divided by a runtime 1 before ``-lr`` multiplies it, the same
        numbers, so that XLA computes it once for Lookahead's two loops (the slow
        weights', the params') instead of keeping RAdam's two quotients for both:
        18 passes over the params per step instead of 21 and half the temporary
        memory. polyopt.optax and polyopt.keras (on tensorflow and jax) set it;
        torch's compiler fuses the step into one kernel, where the division only
        costs (docs/performance.md, "Ranger and Lookahead under XLA").

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.ranger(learning_rate=0.1)
      >>> params = [np.array([1.0])]
      >>> updates, _ = rule.update([np.array([2.0])], rule.init(params), params)
      >>> round(float(updates[0][0]), 12)   # below the threshold: -lr * m_hat
      -0.2

    References:
      Wright, Ranger, https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer;
      Liu et al. 2020 (RAdam); Zhang et al. 2019 (Lookahead); Yong et al. 2020
      (gradient centralization).

    Notes:
      Differences from lessw2020's code, none of which changes the default
      numbers: it rectifies when N_sma > threshold, polyopt when rho_t >=
      threshold (equal only if rho_t hits the threshold exactly, which it does
      not for b2=0.999); it computes in float32 (``p.data.float()``) whatever
      the params' dtype, polyopt in the params' dtype; its ``weight_decay``
      shrinks p in place before the step, which equals polyopt's decoupled
      decay because the step does not read p.
    """
    if not isinstance(read_twice, bool):
        raise TypeError(f"ranger: read_twice must be True or False, got read_twice={read_twice!r}")
    inner = _radam("ranger", learning_rate, b1, b2, eps, eps_root, eps_placement, threshold,
                   fallback, nesterov, amsgrad, total_steps, warmup_proportion, min_lr,
                   weight_decay, weight_decay_mode, state_dtype, read_twice=read_twice)
    if gradient_centralization:
        inner = chain(centralize(), inner)
    return lookahead(inner, sync_period, slow_step_size, reset_state)


class SAMRule(NamedTuple):
    """A SAM rule: the inner rule's (init, update) plus ``perturb`` and ``ascent``.

    ``perturb(params, grads) -> params'`` gives the point at which to take the
    second gradient; ``update(grads_at_perturbed, state, params)`` is the
    inner rule's update, applied to the original params. ``ascent(grads,
    params) -> e`` is the same step in updates form (params' = params + e),
    for frameworks that apply updates rather than set params (optax).
    """

    init: Callable
    update: Callable
    perturb: Callable
    ascent: Callable
    slots: tuple = ()
    elementwise: bool = False  # the ascent's norm is over all arrays together
    uses_layout: bool = False
    needs_closure: bool = True  # a second gradient at the perturbed point
    eval_params: Callable | None = None


@hyper.SAM.factory
def sam(inner: Rule, rho, eps, adaptive) -> SAMRule:
    r"""Sharpness-aware minimization (Foret et al., 2021; ASAM: Kwon et al., 2021).

    .. math::
        \begin{aligned}
        &\textbf{for each step, with } T = \operatorname{diag}|\theta|
            \text{ (adaptive) else } I:\\
        &\quad g \leftarrow \nabla f(\theta), \quad
            \hat\epsilon \leftarrow \rho \frac{T^2 g}{\lVert T g \rVert_2 + \epsilon}
            \quad\text{(one norm over all arrays)}\\
        &\quad g' \leftarrow \nabla f(\theta + \hat\epsilon)\\
        &\quad \theta \leftarrow \theta + \text{inner.update}(g', \theta)
        \end{aligned}

    The caller evaluates the gradient at ``perturb(params, grads)`` and passes
    it to ``update`` with the original params.

    Args:
      inner: the base rule.
      rho: radius >= 0 (default 0.05; a number or a 0-d array).
      eps: added to the norm (default 1e-12, davda54/sam; optax.contrib.sam: 0).
      adaptive: ASAM's scale-invariant ascent (default False).

    Returns:
      A :class:`SAMRule` (init, update, perturb, ascent); the state is the
      inner rule's.

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.sam(rules.sgd(learning_rate=0.1), rho=0.5, eps=0.0)
      >>> rule.perturb([np.array([1.0, 1.0])], [np.array([3.0, 4.0])])[0].tolist()
      [1.3, 1.4]

    References:
      Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
      Efficiently Improving Generalization", ICLR 2021; Kwon et al., "ASAM",
      ICML 2021; https://github.com/davda54/sam.

    Notes:
      davda54/sam: ``SAM(params, Base, rho, adaptive)``; ``first_step`` is
      ``perturb`` (eps 1e-12), ``second_step`` restores the old params and
      runs the base optimizer: ``update`` with the original params.

      optax.contrib.sam(opt, chain(normalize(), sgd(rho)), sync_period=2) in
      its default (transparent) mode takes two ``update`` calls per SAM step.
      The first, with g(w), returns the ascent rho * g / ||g|| (w' = w + e)
      and caches w; the second, with g(w'), returns w + u - w' with
      u = opt.update(g(w'), opt_state, w), so the params become w + u. That
      is ``perturb`` with ``eps=0`` followed by ``update(g(w'), state, w)``.
      sync_period=n > 2 takes n - 1 normalized ascent steps, each from the
      last perturbed point: ``perturb`` applied n - 1 times, each time with
      the gradient at the current perturbed point. ``opaque_mode=True`` gives
      the same numbers in one call. optax has no ASAM (adaptive=False) and no
      eps; where optax divides 0 by 0 (an all-zero gradient) ``perturb``
      returns the params unchanged.
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"sam: inner must be a Rule (init, update), got {inner!r}")

    def _ascent(grads, params, method):
        xp, grads, params = _base.check_update("sam", grads, None, params, method=method)
        scaled = [xp.abs(p) * g for p, g in zip(params, grads)] if adaptive else grads
        norm = global_norm(xp, scaled)
        out = []
        for p, g in zip(params, grads):
            denom = xp.astype(norm, g.dtype) + eps
            # a zero (scaled) gradient gives no perturbation, not 0/0
            denom = xp.where(denom > 0, denom, xp.full_like(denom, 1.0))
            scale = _base.scalar(xp, rho, g) / denom
            out.append((p * p) * g * scale if adaptive else g * scale)
        return out

    def ascent(grads, params):
        return _ascent(grads, params, "ascent")

    def perturb(params, grads):
        return [p + e for p, e in zip(params, _ascent(grads, params, "perturb"))]

    return SAMRule(inner.init, inner.update, perturb, ascent,
                   uses_layout=_capability(inner, "uses_layout"))


class ApplyIfFiniteState(NamedTuple):
    count: Any  # steps seen, finite or not
    notfinite_count: Any  # consecutive steps with a non-finite gradient (0 after a finite one)
    last_finite: Any  # 0-d bool: were the last step's gradients all finite
    total_notfinite: Any  # steps skipped or applied with a non-finite gradient, never reset
    inner: Any  # the inner rule's state


@hyper.APPLY_IF_FINITE.factory
def apply_if_finite(inner: Rule, max_consecutive_errors) -> Rule:
    r"""Skip every step whose gradients hold a NaN or an infinity (as loss scaling does).

    A skipped step returns zero updates and leaves the inner rule's state as it
    was: no NaN ever reaches the moments. The state counts the skips. After
    more than ``max_consecutive_errors`` non-finite steps in a row the steps
    are applied anyway, so that a run that has truly diverged shows it.

    Args:
      inner: the rule to protect.
      max_consecutive_errors: an integer >= 0, or ``math.inf`` (the default:
        never apply a non-finite step).

    Returns:
      A :class:`Rule`; state :class:`ApplyIfFiniteState` (count,
      notfinite_count, last_finite, total_notfinite, inner).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.apply_if_finite(rules.adam(learning_rate=0.1))
      >>> params = [np.ones(2)]
      >>> state = rule.init(params)
      >>> updates, state = rule.update([np.array([np.nan, 1.0])], state, params)
      >>> updates[0].tolist(), int(state.total_notfinite), int(state.inner.count)
      ([0.0, 0.0], 1, 0)

    Notes:
      The same semantics and state fields as ``optax.apply_if_finite``
      (``inner_state`` is ``inner`` here, and ``count`` is added).
      torch.amp.GradScaler skips the step the same way but also lowers the
      loss scale; Keras's LossScaleOptimizer likewise.
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"apply_if_finite: inner must be a Rule (init, update), got {inner!r}")

    def init(params, layouts=None):
        params = _base.check_params("apply_if_finite", params)
        xp = _base.namespace(*params)
        zero = _base.zeros_count(xp, params[0])
        return ApplyIfFiniteState(zero, zero, zero == 0, zero,
                                  _base.init_of(inner, params, layouts))

    def update(grads, state, params, layouts=None):
        _base.check_state("apply_if_finite", state, ApplyIfFiniteState)
        xp, grads, params = _base.check_update("apply_if_finite", grads, state, params)
        finite = xp.all(xp.isfinite(grads[0]))
        for g in grads[1:]:
            finite = finite & xp.all(xp.isfinite(g))
        notfinite_count = xp.where(finite, state.notfinite_count * 0,
                                   _base.increment(state.notfinite_count))
        apply = finite
        if max_consecutive_errors != math.inf:
            apply = finite | (notfinite_count > int(max_consecutive_errors))
        # a skipped step's result is discarded: give the inner rule zeros, not
        # infinities (no NaN arithmetic, no floating-point warnings)
        grads = [xp.where(apply, g, xp.zeros_like(g)) for g in grads]
        updates, inner_state = _base.update_of(inner, grads, state.inner, params, layouts)
        updates = [xp.where(apply, u, xp.zeros_like(u)) for u in updates]
        inner_state = _state.select(xp, apply, inner_state, state.inner)
        total = xp.where(finite, state.total_notfinite, _base.increment(state.total_notfinite))
        return updates, ApplyIfFiniteState(_base.increment(state.count), notfinite_count,
                                           finite, total, inner_state)

    return _wrapping(inner, init, update)
