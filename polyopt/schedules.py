r"""Learning-rate schedules and the reduce-on-plateau controller, framework-free.

A schedule is a callable ``count -> value``; ``count`` is the number of steps
already taken (0 at the first update: the optax convention, and torch's
``last_epoch`` after the scheduler's construction). Every factory here checks
its arguments when it is called (``TypeError``/``ValueError`` of the form
``"<schedule>: <arg> must be <allowed>, got <arg>=<value>"``) and returns a
:class:`Schedule`.

What a schedule accepts and returns:

- a Python number: the value is computed in float64 and returned as a Python
  ``float``;
- an array of any Array API namespace (numpy scalars and arrays, torch
  tensors, jax arrays and tracers inside ``jax.jit``, array_api_strict
  arrays), usually 0-d (other shapes work elementwise): the value is an array
  of that namespace, computed with ``xp = array_namespace(count)`` and Array
  API functions only (no Python branching on array values), so it traces and
  compiles. Its floating dtype is

  * the dtype of ``count`` when ``count`` is already floating;
  * otherwise float64 when the namespace offers float64 on ``count``'s
    device (numpy, torch, array_api_strict, jax with ``jax_enable_x64``),
    else the namespace's default floating dtype (jax without x64: float32).

  float64 is preferred over torch's default float32 on purpose: the rules
  cast the value to the parameters' dtype, so float64 runs keep full
  precision and float32 runs get the correctly rounded value.

An adapter whose arrays have no array_api_compat namespace (the Keras
adapter's TensorFlow namespace) passes its own: ``schedule(count, xp=ns)``.
The functions used are ``astype``, ``isdtype``, ``zeros_like``, ``where``,
``minimum``, ``maximum``, ``floor``, ``cos``, ``pow``, arithmetic operators
and comparisons, plus ``__array_namespace_info__`` when present.

Counts are expected to be >= 0; what a schedule returns for a negative count
is not specified.

The plateau controller (:func:`reduce_on_plateau`) is not a schedule: it runs
once per epoch on the host, on Python floats, and its state is a NamedTuple.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from polyopt._namespace import namespace
from polyopt.hyper import NONNEG, POSITIVE, UNIT, Hyper, Interval

__all__ = [
    "Schedule",
    "constant",
    "step_decay",
    "exponential_decay",
    "cosine_decay",
    "warmup_cosine_decay",
    "one_cycle",
    "one_cycle_momentum",
    "rampup_sustain_decay",
    "PlateauState",
    "PlateauController",
    "reduce_on_plateau",
]

Array = Any

_FINITE = Interval(-math.inf, math.inf, lo_closed=False)
_OPEN_UNIT = Interval(0.0, 1.0, lo_closed=False, hi_closed=False)  # (0, 1)
_NUMPY = array_api_compat.array_namespace(np.asarray(0.0))


# --------------------------------------------------------------------------
# the callable


class Schedule:
    """A schedule ``count -> value``, with the name and arguments that built it.

    ``name`` and ``config`` let an adapter rebuild it
    (``getattr(polyopt.schedules, s.name)(**s.config)``), e.g. in a Keras
    ``get_config``.
    """

    __slots__ = ("name", "config", "_function", "__weakref__")

    def __init__(self, name: str, config: dict[str, Any],
                 function: Callable[[Any, Array], Array]) -> None:
        self.name = name
        self.config = dict(config)
        self._function = function

    def __call__(self, count: Any, *, xp: Any = None) -> Any:
        """The value at ``count`` (see the module docstring for types and dtypes)."""
        if isinstance(count, bool) or isinstance(count, np.bool_):
            raise TypeError(f"{self.name}: count must be a number or an array, got count={count!r}")
        if xp is None and isinstance(count, numbers.Real) and not isinstance(count, np.generic):
            t = np.asarray(float(count), dtype=np.float64)
            return float(self._function(_NUMPY, t))
        if xp is None:
            xp = namespace(count)
        return self._function(xp, _as_float(xp, count, self.name))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{self.name}({args})"


_DTYPE_CACHE: dict[tuple[str, str, str], Any] = {}


def _float_dtype(xp: Any, count: Array) -> Any:
    """float64 if ``xp`` offers it on ``count``'s device, else the default float."""
    info_fn = getattr(xp, "__array_namespace_info__", None)
    if info_fn is None:
        return getattr(xp, "float64", None) or xp.float32
    try:
        device = array_api_compat.device(count)
    except Exception:  # noqa: BLE001 - a namespace without device support
        device = None
    info = info_fn()
    default = info.default_dtypes(device=device)["real floating"]
    key = (getattr(xp, "__name__", repr(xp)), str(device), str(default))
    dtype = _DTYPE_CACHE.get(key)
    if dtype is None:
        available = info.dtypes(device=device, kind="real floating")
        dtype = available.get("float64", default)
        _DTYPE_CACHE[key] = dtype
    return dtype


def _as_float(xp: Any, count: Array, owner: str) -> Array:
    dtype = count.dtype
    if xp.isdtype(dtype, "real floating"):
        return count
    if not xp.isdtype(dtype, "integral"):
        raise TypeError(f"{owner}: count must have an integer or real floating dtype, got {dtype}")
    return xp.astype(count, _float_dtype(xp, count))


def _full(xp: Any, like: Array, value: float) -> Array:
    """``value`` as an array shaped, typed and placed like ``like``."""
    return xp.zeros_like(like) + value


# --------------------------------------------------------------------------
# argument checks (messages from polyopt.hyper.Hyper)


def _real(owner: str, name: str, value: Any, allowed: Interval = NONNEG) -> float:
    hyper = Hyper(name, None, kind="real", allowed=allowed)
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf":
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be {hyper.allowed_text()}, got {name}={value!r}")
    hyper.check(value, owner)
    return float(value)


def _integer(owner: str, name: str, value: Any, allowed: Interval = NONNEG) -> int:
    return Hyper(name, None, kind="int", allowed=allowed).check(value, owner)


def _boolean(owner: str, name: str, value: Any) -> bool:
    return Hyper(name, None, kind="bool").check(value, owner)


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    return Hyper(name, None, kind="choice", allowed=allowed).check(value, owner)


# --------------------------------------------------------------------------
# simple schedules


def constant(value: float) -> Schedule:
    """The same value at every step.

    Args:
      value: the value, a finite number >= 0.

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = constant(0.1)
      >>> schedule(0), schedule(1000)
      (0.1, 0.1)
      >>> print(schedule(np.asarray(7)))
      0.1
    """
    value = _real("constant", "value", value)

    def function(xp, t):
        return _full(xp, t, value)

    return Schedule("constant", {"value": value}, function)


def step_decay(initial_value: float, drop: float, steps_drop: float) -> Schedule:
    r"""Step decay: multiply by ``drop`` every ``steps_drop`` steps.

    .. math:: v(t) = v_0 \cdot \text{drop}^{\lfloor t / \text{steps\_drop} \rfloor}

    The classic Keras step-decay function for ``LearningRateScheduler``, with
    the epoch index (0 first) as ``count``. (Versions that use ``1 + epoch``
    drop one epoch earlier.)

    Args:
      initial_value: v_0, a finite number >= 0.
      drop: factor applied at each drop, in (0, 1].
      steps_drop: steps between drops, a number > 0.

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = step_decay(0.1, drop=0.5, steps_drop=10)
      >>> [schedule(t) for t in (0, 9, 10, 25)]
      [0.1, 0.1, 0.05, 0.025]
    """
    owner = "step_decay"
    initial_value = _real(owner, "initial_value", initial_value)
    drop = _real(owner, "drop", drop, Interval(0.0, 1.0, lo_closed=False, hi_closed=True))
    steps_drop = _real(owner, "steps_drop", steps_drop, POSITIVE)

    def function(xp, t):
        return initial_value * xp.pow(_full(xp, t, drop), xp.floor(t / steps_drop))

    return Schedule(owner, {"initial_value": initial_value, "drop": drop,
                            "steps_drop": steps_drop}, function)


def exponential_decay(init_value: float, transition_steps: int, decay_rate: float,
                      transition_begin: int = 0, staircase: bool = False,
                      end_value: float | None = None) -> Schedule:
    r"""Exponential decay, exactly as ``optax.exponential_decay``.

    .. math::
        p = (t - B) / T \ (\lfloor\cdot\rfloor \text{ if staircase}),\quad
        v(t) = \begin{cases} v_0 & t \le B \\ v_0 \cdot r^{p} & t > B \end{cases}

    then clipped from below by ``end_value`` when r < 1, from above when r >= 1.

    Args:
      init_value: v_0, a finite number >= 0.
      transition_steps: T, an integer >= 1.
      decay_rate: r, a number > 0 (r > 1 grows).
      transition_begin: B, an integer >= 0 (default 0): steps held at v_0.
      staircase: decay in steps of T (default False).
      end_value: None (default) or a number >= 0: lower bound when r < 1,
        upper bound when r >= 1.

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = exponential_decay(1.0, transition_steps=10, decay_rate=0.5)
      >>> [schedule(t) for t in (0, 10, 20)]
      [1.0, 0.5, 0.25]
      >>> print(schedule(np.asarray(5)))
      0.7071067811865476

    Notes:
      optax turns ``transition_steps <= 0`` or ``decay_rate == 0`` into a
      constant schedule and a negative ``transition_begin`` into 0 with a log
      message; polyopt raises ValueError instead.
    """
    owner = "exponential_decay"
    init_value = _real(owner, "init_value", init_value)
    transition_steps = _integer(owner, "transition_steps", transition_steps, Interval(1, math.inf))
    decay_rate = _real(owner, "decay_rate", decay_rate, POSITIVE)
    transition_begin = _integer(owner, "transition_begin", transition_begin)
    staircase = _boolean(owner, "staircase", staircase)
    if end_value is not None:
        end_value = _real(owner, "end_value", end_value)
    config = {"init_value": init_value, "transition_steps": transition_steps,
              "decay_rate": decay_rate, "transition_begin": transition_begin,
              "staircase": staircase, "end_value": end_value}

    def function(xp, t):
        decreased = t - transition_begin
        p = decreased / transition_steps
        if staircase:
            p = xp.floor(p)
        # p < 0 only where the value is init_value: clip it so that a long
        # transition_begin cannot overflow decay_rate ** p
        p = xp.maximum(p, _full(xp, t, 0.0))
        decayed = xp.where(decreased <= 0, _full(xp, t, init_value),
                           init_value * xp.pow(_full(xp, t, decay_rate), p))
        if end_value is not None:
            clip = xp.maximum if decay_rate < 1.0 else xp.minimum
            decayed = clip(decayed, _full(xp, t, end_value))
        return decayed

    return Schedule(owner, config, function)


def _cosine_decay_function(init_value: float, decay_steps: int, alpha: float,
                           exponent: float) -> Callable:
    # optax.cosine_decay_schedule, operation for operation
    def function(xp, t):
        count = xp.minimum(t, _full(xp, t, decay_steps))
        cosine = 0.5 * (1 + xp.cos(math.pi * count / decay_steps))
        decayed = (1 - alpha) * cosine**exponent + alpha
        return init_value * decayed

    return function


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0,
                 exponent: float = 1.0) -> Schedule:
    r"""Cosine decay, exactly as ``optax.cosine_decay_schedule``.

    .. math::
        v(t) = v_0 \left[(1 - \alpha)\left(\tfrac12\left(1 + \cos\frac{\pi \min(t, T)}{T}
        \right)\right)^{p} + \alpha\right]

    Args:
      init_value: v_0, a finite number >= 0.
      decay_steps: T, an integer >= 1; the value is held at alpha * v_0 after it.
      alpha: final multiplier, in [0, 1] (default 0).
      exponent: p, a number > 0 (default 1).

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = cosine_decay(1.0, decay_steps=10, alpha=0.1)
      >>> [round(schedule(t), 12) for t in (0, 5, 10, 20)]
      [1.0, 0.55, 0.1, 0.1]
    """
    owner = "cosine_decay"
    init_value = _real(owner, "init_value", init_value)
    decay_steps = _integer(owner, "decay_steps", decay_steps, Interval(1, math.inf))
    alpha = _real(owner, "alpha", alpha, UNIT)
    exponent = _real(owner, "exponent", exponent, POSITIVE)
    return Schedule(owner, {"init_value": init_value, "decay_steps": decay_steps,
                            "alpha": alpha, "exponent": exponent},
                    _cosine_decay_function(init_value, decay_steps, alpha, exponent))


def warmup_cosine_decay(init_value: float, peak_value: float, warmup_steps: int,
                        decay_steps: int, end_value: float = 0.0,
                        exponent: float = 1.0) -> Schedule:
    r"""Linear warmup then cosine decay, exactly as ``optax.warmup_cosine_decay_schedule``.

    .. math::
        v(t) = \begin{cases}
        (v_0 - v_p)(1 - t/W) + v_p & t < W \\
        \text{cosine\_decay}(v_p, D - W, \alpha = v_e / v_p, p)(t - W) & t \ge W
        \end{cases}

    Args:
      init_value: v_0, a finite number >= 0.
      peak_value: v_p, reached at the end of the warmup, a finite number >= 0.
      warmup_steps: W, an integer >= 0 (0: no warmup).
      decay_steps: D, the total length *including* the warmup, an integer > W.
      end_value: v_e, the value after D steps, a finite number >= 0 (default 0).
      exponent: p, a number > 0 (default 1).

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = warmup_cosine_decay(0.0, 1.0, warmup_steps=10, decay_steps=30)
      >>> [round(schedule(t), 12) for t in (0, 5, 10, 20, 30, 99)]
      [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    owner = "warmup_cosine_decay"
    init_value = _real(owner, "init_value", init_value)
    peak_value = _real(owner, "peak_value", peak_value)
    warmup_steps = _integer(owner, "warmup_steps", warmup_steps)
    decay_steps = _integer(owner, "decay_steps", decay_steps, Interval(0, math.inf))
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"{owner}: decay_steps must be an integer > warmup_steps ({warmup_steps}) "
            f"(it includes the warmup), got decay_steps={decay_steps!r}"
        )
    end_value = _real(owner, "end_value", end_value)
    exponent = _real(owner, "exponent", exponent, POSITIVE)
    config = {"init_value": init_value, "peak_value": peak_value, "warmup_steps": warmup_steps,
              "decay_steps": decay_steps, "end_value": end_value, "exponent": exponent}
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    decay = _cosine_decay_function(peak_value, decay_steps - warmup_steps, alpha, exponent)
    difference = init_value - peak_value

    def function(xp, t):
        if warmup_steps == 0:
            return decay(xp, t)
        clipped = xp.minimum(xp.maximum(t, _full(xp, t, 0.0)), _full(xp, t, warmup_steps))
        warmup = difference * (1 - clipped / warmup_steps) + peak_value
        return xp.where(t < warmup_steps, warmup, decay(xp, t - warmup_steps))

    return Schedule(owner, config, function)


# --------------------------------------------------------------------------
# one-cycle


def _anneal_cos(xp, start, end, pct):
    return end + (start - end) / 2.0 * (xp.cos(math.pi * pct) + 1)


def _anneal_linear(xp, start, end, pct):
    return (end - start) * pct + start


_ANNEAL = {"cos": _anneal_cos, "linear": _anneal_linear}


def _one_cycle_checks(owner: str, total_steps: Any, pct_start: Any, anneal: Any,
                      three_phase: Any, convention: Any, pct_final: Any) -> tuple:
    total_steps = _integer(owner, "total_steps", total_steps, Interval(1, math.inf))
    pct_start = _real(owner, "pct_start", pct_start, UNIT)
    anneal = _choice(owner, "anneal", anneal, ("cos", "linear"))
    three_phase = _boolean(owner, "three_phase", three_phase)
    convention = _choice(owner, "convention", convention, ("torch", "optax"))
    if pct_final is not None:
        pct_final = _real(owner, "pct_final", pct_final, UNIT)
        if convention != "optax" or not three_phase:
            raise ValueError(
                f"{owner}: pct_final must be None unless convention='optax' and "
                f"three_phase=True (torch's third phase starts at 2 * pct_start), "
                f"got pct_final={pct_final!r}"
            )
    if convention == "torch":
        if float(pct_start * total_steps) - 1 == 0.0:
            raise ValueError(
                f"{owner}: pct_start * total_steps must not be 1 with convention='torch' "
                f"(OneCycleLR divides by zero at step 0), got pct_start={pct_start!r}, "
                f"total_steps={total_steps!r}"
            )
        return total_steps, pct_start, anneal, three_phase, convention, None, None
    # optax: boundaries of optax.piecewise_interpolate_schedule
    if three_phase:
        pct_final = 0.85 if pct_final is None else pct_final
        bounds = (int(pct_start * total_steps), int(pct_final * total_steps), total_steps)
        if not bounds[0] < bounds[1] < bounds[2]:
            raise ValueError(
                f"{owner}: with convention='optax' and three_phase=True, need "
                f"int(pct_start * total_steps) < int(pct_final * total_steps) < total_steps "
                f"(optax's boundaries would collide), got pct_start={pct_start!r}, "
                f"pct_final={pct_final!r}, total_steps={total_steps!r}"
            )
    else:
        bounds = (int(pct_start * total_steps), total_steps)
        if not bounds[0] < bounds[1]:
            raise ValueError(
                f"{owner}: with convention='optax', need int(pct_start * total_steps) < "
                f"total_steps (optax's boundaries would collide), got pct_start={pct_start!r}, "
                f"total_steps={total_steps!r}"
            )
    return total_steps, pct_start, anneal, three_phase, convention, pct_final, bounds


def _torch_phases(total_steps: int, pct_start: float, three_phase: bool) -> list[float]:
    """End steps of torch OneCycleLR's phases (the same float arithmetic)."""
    if three_phase:
        return [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2,
                total_steps - 1]
    return [float(pct_start * total_steps) - 1, total_steps - 1]


def _torch_cycle(ends: list[float], values: list[float], anneal: str,
                 total_steps: int) -> Callable:
    """torch OneCycleLR.get_lr: phase i anneals values[i] -> values[i+1] until ends[i]."""
    interpolate = _ANNEAL[anneal]
    spans, starts = [], []
    start = 0.0
    for end in ends:
        starts.append(start)
        # a zero span is selected only where torch itself divides by zero (rejected
        # at construction), so any non-zero stand-in is safe
        spans.append(end - start if end - start != 0 else 1.0)
        start = end

    def function(xp, t):
        count = xp.minimum(t, _full(xp, t, total_steps - 1))  # hold after the cycle
        phase_values = [
            interpolate(xp, values[i], values[i + 1], (count - starts[i]) / spans[i])
            for i in range(len(ends))
        ]
        result = phase_values[-1]
        for i in reversed(range(len(ends) - 1)):
            result = xp.where(count <= ends[i], phase_values[i], result)
        return result

    return function


def _piecewise(bounds: tuple[int, ...], values: list[float], anneal: str) -> Callable:
    """optax.piecewise_interpolate_schedule with knots (0, *bounds) and ``values``."""
    interpolate = _ANNEAL[anneal]
    knots = (0,) + tuple(bounds)

    def function(xp, t):
        result = _full(xp, t, values[-1])
        for i in reversed(range(len(knots) - 1)):
            size = max(knots[i + 1] - knots[i], 1)
            value = interpolate(xp, values[i], values[i + 1], (t - knots[i]) / size)
            result = xp.where(t < knots[i + 1], value, result)
        return result

    return function


def one_cycle(total_steps: int, max_value: float, pct_start: float = 0.3,
              anneal: str = "cos", div_factor: float = 25.0, final_div_factor: float = 1e4,
              three_phase: bool = False, convention: str = "torch",
              pct_final: float | None = None) -> Schedule:
    r"""The 1cycle policy (Smith & Topin), as torch's OneCycleLR or optax's onecycle.

    The value rises from ``max_value / div_factor`` to ``max_value``, then
    falls to ``max_value / div_factor / final_div_factor``; with
    ``three_phase`` it first falls back to the initial value and only then
    to the final one. Each phase anneals with
    ``cos``: :math:`e + (s - e)(1 + \cos \pi x)/2` or ``linear``:
    :math:`(e - s)x + s`, x going from 0 to 1 over the phase.

    ``convention='torch'`` reproduces ``torch.optim.lr_scheduler.OneCycleLR``
    (``total_steps``, ``max_lr``, ``anneal_strategy``, ``three_phase``) at
    count = scheduler steps taken: phase ends ``pct_start * total_steps - 1``,
    (three-phase: ``2 * pct_start * total_steps - 2``) and
    ``total_steps - 1``. After ``total_steps - 1`` the final value is held
    (torch extrapolates one more value at ``total_steps``, which no optimizer
    step uses, and raises beyond).

    ``convention='optax'`` reproduces optax's piecewise interpolation, whose
    phases end at ``int(pct_start * total_steps)``
    (``int(pct_final * total_steps)``) and ``total_steps``, one step later
    than torch's, with the final value held after ``total_steps``:

    ====================  ============  ==================================================
    anneal                three_phase   optax function reproduced
    ====================  ============  ==================================================
    ``'cos'``             False         ``cosine_onecycle_schedule``
    ``'linear'``          True          ``linear_onecycle_schedule`` (with ``pct_final``)
    ``'linear'``          False         ``piecewise_interpolate_schedule('linear', ...)``
                                        with ``cosine_onecycle_schedule``'s boundaries
    ``'cos'``             True          ``piecewise_interpolate_schedule('cosine', ...)``
                                        with ``linear_onecycle_schedule``'s boundaries
    ====================  ============  ==================================================

    Args:
      total_steps: steps in the cycle, an integer >= 1.
      max_value: the peak value, a finite number >= 0 (torch ``max_lr``,
        optax ``peak_value``).
      pct_start: fraction of the cycle spent rising, in [0, 1] (default 0.3).
      anneal: ``'cos'`` (default) or ``'linear'`` (torch ``anneal_strategy``).
      div_factor: initial value = max_value / div_factor, > 0 (default 25).
      final_div_factor: final value = initial value / final_div_factor, > 0
        (default 1e4).
      three_phase: rise, fall back to the initial value, then anneal to the
        final value (default False).
      convention: ``'torch'`` (default) or ``'optax'``.
      pct_final: optax only, with ``three_phase=True``: end of the second
        phase as a fraction of the cycle, in [0, 1] (None: optax's 0.85).

    Returns:
      A :class:`Schedule`.

    Raises:
      ValueError: an argument out of range; ``convention='torch'`` with
        ``pct_start * total_steps == 1`` (OneCycleLR divides by zero);
        ``convention='optax'`` with boundaries that collide
        (``int(pct_start * total_steps) >= total_steps``, or not
        ``int(pct_start * T) < int(pct_final * T) < T``); ``pct_final``
        given outside ``convention='optax', three_phase=True``.

    Examples:
      >>> schedule = one_cycle(total_steps=10, max_value=1.0, pct_start=0.3)
      >>> [round(schedule(t), 6) for t in (0, 2, 9)]
      [0.04, 1.0, 4e-06]
      >>> schedule = one_cycle(10, 1.0, anneal="linear", convention="optax")
      >>> [round(schedule(t), 6) for t in (0, 3, 10)]
      [0.04, 1.0, 4e-06]
    """
    owner = "one_cycle"
    total_steps, pct_start, anneal, three_phase, convention, pct_final, bounds = (
        _one_cycle_checks(owner, total_steps, pct_start, anneal, three_phase, convention,
                          pct_final))
    max_value = _real(owner, "max_value", max_value)
    div_factor = _real(owner, "div_factor", div_factor, POSITIVE)
    final_div_factor = _real(owner, "final_div_factor", final_div_factor, POSITIVE)
    config = {"total_steps": total_steps, "max_value": max_value, "pct_start": pct_start,
              "anneal": anneal, "div_factor": div_factor, "final_div_factor": final_div_factor,
              "three_phase": three_phase, "convention": convention, "pct_final": pct_final}
    if convention == "torch":
        initial = max_value / div_factor
        final = initial / final_div_factor
        values = ([initial, max_value, initial, final] if three_phase
                  else [initial, max_value, final])
        function = _torch_cycle(_torch_phases(total_steps, pct_start, three_phase), values,
                                anneal, total_steps)
    else:
        # optax: the knots' values are the cumulative product of the scales
        scales = ([div_factor, 1.0 / div_factor, 1.0 / final_div_factor] if three_phase
                  else [div_factor, 1.0 / (div_factor * final_div_factor)])
        values = [max_value / div_factor]
        for scale in scales:
            values.append(values[-1] * scale)
        function = _piecewise(bounds, values, anneal)
    return Schedule(owner, config, function)


def one_cycle_momentum(total_steps: int, pct_start: float = 0.3, anneal: str = "cos",
                       base_momentum: float = 0.85, max_momentum: float = 0.95,
                       three_phase: bool = False, convention: str = "torch",
                       pct_final: float | None = None) -> Schedule:
    r"""The momentum that one-cycle cycles inversely to the learning rate.

    ``convention='torch'`` reproduces OneCycleLR's ``cycle_momentum=True``
    (the ``momentum`` of SGD, or ``betas[0]`` of Adam-like optimizers): from
    ``max_momentum`` down to ``base_momentum`` while the learning rate rises,
    back up to ``max_momentum`` while it falls (three-phase: up during the
    second phase, constant at ``max_momentum`` during the third). optax has
    no momentum cycling; ``convention='optax'`` anneals between the same
    values at optax's phase boundaries (see :func:`one_cycle`), so that the
    momentum turns where the optax learning rate does. The same arguments as
    the matching :func:`one_cycle` give the matching momentum.

    Args:
      total_steps: steps in the cycle, an integer >= 1.
      pct_start: fraction of the cycle spent rising (lr), in [0, 1] (default 0.3).
      anneal: ``'cos'`` (default) or ``'linear'``.
      base_momentum: momentum at the learning-rate peak, in [0, 1] (default 0.85).
      max_momentum: momentum at the start and end, in [0, 1] (default 0.95).
      three_phase: as in :func:`one_cycle` (default False).
      convention: ``'torch'`` (default) or ``'optax'``.
      pct_final: as in :func:`one_cycle`.

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> momentum = one_cycle_momentum(total_steps=10, pct_start=0.3)
      >>> [round(momentum(t), 6) for t in (0, 2, 9)]
      [0.95, 0.85, 0.95]
    """
    owner = "one_cycle_momentum"
    total_steps, pct_start, anneal, three_phase, convention, pct_final, bounds = (
        _one_cycle_checks(owner, total_steps, pct_start, anneal, three_phase, convention,
                          pct_final))
    base_momentum = _real(owner, "base_momentum", base_momentum, UNIT)
    max_momentum = _real(owner, "max_momentum", max_momentum, UNIT)
    config = {"total_steps": total_steps, "pct_start": pct_start, "anneal": anneal,
              "base_momentum": base_momentum, "max_momentum": max_momentum,
              "three_phase": three_phase, "convention": convention, "pct_final": pct_final}
    values = ([max_momentum, base_momentum, max_momentum, max_momentum] if three_phase
              else [max_momentum, base_momentum, max_momentum])
    if convention == "torch":
        function = _torch_cycle(_torch_phases(total_steps, pct_start, three_phase), values,
                                anneal, total_steps)
    else:
        function = _piecewise(bounds, values, anneal)
    return Schedule(owner, config, function)


# --------------------------------------------------------------------------
# ramp-up, sustain, decay


def rampup_sustain_decay(lr_start: float, lr_max: float, lr_min: float, rampup: int,
                         sustain: int, decay: float) -> Schedule:
    r"""Linear ramp-up, a plateau, then exponential decay (the Kaggle TPU schedule).

    .. math::
        v(t) = \begin{cases}
        (v_{max} - v_{start}) / R \cdot t + v_{start} & t < R \\
        v_{max} & R \le t < R + S \\
        (v_{max} - v_{min})\, d^{\,t - R - S} + v_{min} & t \ge R + S
        \end{cases}

    The argument names follow the notebook's constants (``LR_START``,
    ``LR_MAX``, ``LR_MIN``, ``LR_RAMPUP_EPOCHS``, ``LR_SUSTAIN_EPOCHS``,
    ``LR_EXP_DECAY``); ``count`` is the epoch index (0 first), as Keras's
    ``LearningRateScheduler`` passes it.

    Args:
      lr_start: v_start, the value at count 0, a finite number >= 0.
      lr_max: v_max, reached after the ramp-up, a finite number >= 0.
      lr_min: v_min, approached during the decay, a finite number >= 0.
      rampup: R, ramp-up steps, an integer >= 0.
      sustain: S, steps held at v_max, an integer >= 0.
      decay: d, the decay factor per step, in [0, 1].

    Returns:
      A :class:`Schedule`.

    Examples:
      >>> schedule = rampup_sustain_decay(0.1, 0.5, 0.1, rampup=4, sustain=2, decay=0.5)
      >>> [round(schedule(t), 12) for t in (0, 2, 4, 5, 6, 7)]
      [0.1, 0.3, 0.5, 0.5, 0.5, 0.3]
    """
    owner = "rampup_sustain_decay"
    lr_start = _real(owner, "lr_start", lr_start)
    lr_max = _real(owner, "lr_max", lr_max)
    lr_min = _real(owner, "lr_min", lr_min)
    rampup = _integer(owner, "rampup", rampup)
    sustain = _integer(owner, "sustain", sustain)
    decay = _real(owner, "decay", decay, UNIT)
    config = {"lr_start": lr_start, "lr_max": lr_max, "lr_min": lr_min, "rampup": rampup,
              "sustain": sustain, "decay": decay}
    slope = (lr_max - lr_start) / rampup if rampup > 0 else 0.0

    def function(xp, t):
        ramp = slope * t + lr_start
        exponent = xp.maximum(t - rampup - sustain, _full(xp, t, 0.0))
        decayed = (lr_max - lr_min) * xp.pow(_full(xp, t, decay), exponent) + lr_min
        return xp.where(t < rampup, ramp,
                        xp.where(t < rampup + sustain, _full(xp, t, lr_max), decayed))

    return Schedule(owner, config, function)


# --------------------------------------------------------------------------
# reduce on plateau


class PlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau` (Python numbers, host side).

    learning_rate: the current learning rate.
    best: the best metric so far; None before the first metric (Keras
      convention), +inf / -inf (torch convention, mode min / max).
    wait: epochs without improvement (Keras ``wait``, torch ``num_bad_epochs``).
    cooldown_counter: epochs of cooldown left.
    num_reductions: how many times the learning rate was reduced.
    """

    learning_rate: float
    best: float | None
    wait: int
    cooldown_counter: int
    num_reductions: int


class PlateauController(NamedTuple):
    """``init(learning_rate) -> PlateauState``; ``update(state, metric) -> PlateauState``."""

    init: Callable[[float], PlateauState]
    update: Callable[[PlateauState, Any], PlateauState]


def reduce_on_plateau(factor: float = 0.1, patience: int = 10, min_delta: float = 1e-4,
                      cooldown: int = 0, min_lr: float = 0.0, mode: str = "auto",
                      convention: str = "keras", threshold_mode: str | None = None,
                      eps: float | None = None) -> PlateauController:
    r"""Reduce the learning rate when a metric stops improving: a pure controller.

    Call ``update`` once per epoch with the monitored metric; it returns the
    next state, whose ``learning_rate`` the adapter gives the optimizer. The
    argument names are the native ones (Keras and torch both say ``min_lr``,
    ``factor``, ``patience``, ``cooldown``).

    ``convention='keras'`` is ``keras.callbacks.ReduceLROnPlateau``
    (``on_epoch_end``):

    1. in cooldown: ``cooldown_counter -= 1``, ``wait = 0``;
    2. improvement (``metric + min_delta < best`` in mode min,
       ``metric - min_delta > best`` in mode max; the first metric always
       improves): ``best = metric``, ``wait = 0``;
    3. otherwise, if not in cooldown: ``wait += 1``; when ``wait >= patience``
       and ``learning_rate > min_lr`` (compared in float32, as Keras does):
       ``learning_rate = max(learning_rate *
       factor, min_lr)``, ``cooldown_counter = cooldown``, ``wait = 0``.

    ``convention='torch'`` is ``torch.optim.lr_scheduler.ReduceLROnPlateau``
    (``min_delta`` is its ``threshold``):

    1. improvement (mode min: ``metric < best * (1 - min_delta)`` ('rel') or
       ``metric < best - min_delta`` ('abs'); mode max: ``metric > best *
       (1 + min_delta)`` or ``metric > best + min_delta``; best starts at
       +inf / -inf): ``best = metric``, ``wait = 0``; else ``wait += 1``;
    2. in cooldown: ``cooldown_counter -= 1``, ``wait = 0``;
    3. when ``wait > patience``: ``new = max(learning_rate * factor,
       min_lr)``, taken only if ``learning_rate - new > eps``;
       ``cooldown_counter = cooldown``, ``wait = 0`` in either case.

    A NaN metric is never an improvement (every comparison with NaN is
    false), so it counts as a bad epoch, in both conventions. With
    ``convention='keras'`` a NaN *first* metric becomes ``best``, as in
    Keras, and then no later metric improves on it: the learning rate is
    reduced every ``patience`` epochs until ``min_lr``.

    Args:
      factor: new learning rate = learning_rate * factor, in (0, 1) (default 0.1).
      patience: epochs without improvement before a reduction, an integer
        >= 0 (default 10).
      min_delta: the smallest change that counts as an improvement, >= 0
        (default 1e-4; Keras ``min_delta``, torch ``threshold``).
      cooldown: epochs after a reduction during which no bad epochs are
        counted, an integer >= 0 (default 0).
      min_lr: lower bound on the learning rate, >= 0 (default 0).
      mode: ``'min'``, ``'max'`` or ``'auto'`` (default; here the same as
        ``'min'``: Keras infers the direction from the monitored quantity's
        name, ``'val_loss'`` by default, which this controller does not see).
      convention: ``'keras'`` (default) or ``'torch'``.
      threshold_mode: torch only: ``'rel'`` (torch's default) or ``'abs'``;
        None means ``'rel'`` for torch and ``'abs'`` (the only Keras rule)
        for Keras. ``'rel'`` with ``convention='keras'`` is a ValueError.
      eps: torch only: a reduction smaller than eps is skipped, >= 0 (None:
        torch's 1e-8). Not None with ``convention='keras'`` is a ValueError.

    Returns:
      A :class:`PlateauController` ``(init, update)``. ``init(learning_rate)``
      takes a number >= 0; ``update(state, metric)`` takes a Python number or
      a 0-d array of any library (read on the host with ``float``).

    Examples:
      >>> plateau = reduce_on_plateau(factor=0.5, patience=1)
      >>> state = plateau.init(0.1)
      >>> for metric in [1.0, 0.5, 0.6, 0.7, 0.4]:
      ...     state = plateau.update(state, metric)
      ...     print(state.learning_rate, state.wait)
      0.1 0
      0.1 0
      0.05 0
      0.025 0
      0.025 0

    Notes:
      Keras keeps the learning rate in a float32 variable (its default
      floatx) and compares metrics in floatx; this controller keeps float64.
      The decisions agree unless a metric ties with ``best`` within float32
      rounding; the learning rates agree to float32 rounding (exactly with
      ``keras.config.set_floatx('float64')``).
    """
    owner = "reduce_on_plateau"
    factor = _real(owner, "factor", factor, _OPEN_UNIT)
    patience = _integer(owner, "patience", patience)
    min_delta = _real(owner, "min_delta", min_delta)
    cooldown = _integer(owner, "cooldown", cooldown)
    min_lr = _real(owner, "min_lr", min_lr)
    mode = _choice(owner, "mode", mode, ("auto", "min", "max"))
    convention = _choice(owner, "convention", convention, ("keras", "torch"))
    if threshold_mode is not None:
        threshold_mode = _choice(owner, "threshold_mode", threshold_mode, ("rel", "abs"))
    if eps is not None:
        eps = _real(owner, "eps", eps)
    if convention == "keras":
        if threshold_mode == "rel":
            raise ValueError(
                f"{owner}: threshold_mode must be None or 'abs' with convention='keras' "
                f"(Keras's min_delta is absolute), got threshold_mode='rel'"
            )
        if eps is not None:
            raise ValueError(
                f"{owner}: eps must be None with convention='keras' (torch only), got eps={eps!r}"
            )
        threshold_mode = "abs"
    else:
        threshold_mode = "rel" if threshold_mode is None else threshold_mode
        eps = 1e-8 if eps is None else eps
    maximize = mode == "max"

    def init(learning_rate: float) -> PlateauState:
        learning_rate = _real(owner, "learning_rate", learning_rate)
        if convention == "keras":
            best = None
        else:
            best = -math.inf if maximize else math.inf
        return PlateauState(learning_rate, best, 0, 0, 0)

    def metric_value(metric: Any) -> float:
        if isinstance(metric, (bool, np.bool_, str, bytes)):
            raise TypeError(f"{owner}: metric must be a real number or a 0-d array, "
                            f"got metric={metric!r}")
        try:
            return float(metric)
        except (TypeError, ValueError):
            raise TypeError(f"{owner}: metric must be a real number or a 0-d array, "
                            f"got metric={metric!r}") from None

    def keras_update(state: PlateauState, metric: Any) -> PlateauState:
        current = metric_value(metric)
        learning_rate, best, wait, cooldown_counter, num_reductions = state
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if best is None or (current - min_delta > best if maximize
                            else current + min_delta < best):
            best = current
            wait = 0
        elif not cooldown_counter > 0:
            wait += 1
            # Keras: `old_lr > np.float32(min_lr)`, a float32 comparison (NEP 50)
            if wait >= patience and np.float32(learning_rate) > np.float32(min_lr):
                learning_rate = max(learning_rate * factor, min_lr)
                num_reductions += 1
                cooldown_counter = cooldown
                wait = 0
        return PlateauState(learning_rate, best, wait, cooldown_counter, num_reductions)

    def is_better(current: float, best: float) -> bool:
        if not maximize and threshold_mode == "rel":
            return current < best * (1.0 - min_delta)
        if not maximize:
            return current < best - min_delta
        if threshold_mode == "rel":
            return current > best * (min_delta + 1.0)
        return current > best + min_delta

    def torch_update(state: PlateauState, metric: Any) -> PlateauState:
        current = metric_value(metric)
        learning_rate, best, wait, cooldown_counter, num_reductions = state
        if is_better(current, best):
            best = current
            wait = 0
        else:
            wait += 1
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if wait > patience:
            new = max(learning_rate * factor, min_lr)
            if learning_rate - new > eps:
                learning_rate = new
                num_reductions += 1
            cooldown_counter = cooldown
            wait = 0
        return PlateauState(learning_rate, best, wait, cooldown_counter, num_reductions)

    return PlateauController(init, keras_update if convention == "keras" else torch_update)
