"""The one hyperparameter spec: names, defaults, allowed values, native spellings.

Every rule factory in :mod:`polyopt.rules` takes its defaults and its argument
checks from the :class:`Spec` registered here, and the framework adapters
generate their signatures, ``get_config`` and error messages from the same
spec, so that a default or a range is written exactly once.

A :class:`Hyper` names one argument. ``torch``, ``keras`` and ``optax`` give
its spelling in that framework when it differs from the canonical (optax-like)
name, e.g. ``Hyper("b1", ..., torch="betas[0]", keras="beta_1")``.
``aliases`` give a framework's spelling of values (:class:`Alias`), e.g. torch's
``adjust_lr_fn=None`` for Muon's ``lr_scale='spectral'``: ``Spec.validate``
reads them in that framework and every rule sees the canonical value.
``runtime=True`` marks values a framework changes while training (torch
``group["lr"]``, a Keras learning-rate variable, OneCycleLR's momentum): rules
accept them as 0-d arrays and never branch on their value.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "Alias",
    "Hyper",
    "Spec",
    "Interval",
    "SPECS",
    "spec",
    "describe",
]

_MISSING = object()


# --------------------------------------------------------------------------
# checks


@dataclass(frozen=True)
class Interval:
    """A range of real numbers, e.g. ``Interval(0, 1, hi_closed=False)`` is [0, 1)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_closed: bool = True
    hi_closed: bool = False

    def __contains__(self, x: float) -> bool:
        lo_ok = x >= self.lo if self.lo_closed else x > self.lo
        hi_ok = x <= self.hi if self.hi_closed else x < self.hi
        return bool(lo_ok and hi_ok)  # NaN fails both comparisons

    def __str__(self) -> str:
        lo = "[" if self.lo_closed else "("
        hi = "]" if self.hi_closed else ")"
        return f"{lo}{_fmt(self.lo)}, {_fmt(self.hi)}{hi}"


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(int(x)) if float(x).is_integer() else repr(x)


NONNEG = Interval(0.0, math.inf)
POSITIVE = Interval(0.0, math.inf, lo_closed=False)
UNIT_OPEN = Interval(0.0, 1.0)  # [0, 1)
UNIT = Interval(0.0, 1.0, hi_closed=True)  # [0, 1]


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or type(x).__name__ in ("bool_", "bool")


def _scalar_value(value: Any) -> float | None:
    """The float value of a Python/numpy number or a concrete 0-d array.

    Returns None for a 0-d array whose value cannot be read without running a
    computation (a jax tracer, a torch tensor under compilation): such values
    are checked by shape only.
    """
    if isinstance(value, numbers.Real):
        return float(value)
    if callable(getattr(value, "detach", None)):  # a torch tensor autograd records
        value = value.detach()
    try:
        return float(value)
    except Exception:  # noqa: BLE001 - tracers raise framework-specific errors
        return None


def _same(a: Any, b: Any) -> bool:
    """``a`` is ``b``, or both are the same plain type and equal (1, 1.0 and True differ;
    an array never equals a plain value)."""
    plain = (bool, int, float, str, type(None))
    return a is b or (type(a) in plain and type(a) is type(b) and a == b)


@dataclass(frozen=True)
class Alias:
    """A framework's spelling of a value: in ``framework``, this argument given
    ``value`` means the canonical settings ``means`` ((name, value) pairs: this
    argument's canonical value, or other arguments' values, which it then must not
    contradict). Build one with :func:`alias`."""

    framework: str
    value: Any
    means: tuple[tuple[str, Any], ...]


_FRAMEWORK_NAMES = {"keras": "Keras"}


def alias(framework: str, value: Any, **means: Any) -> Alias:
    """``alias("torch", None, lr_scale="spectral")``: torch's None is 'spectral'."""
    return Alias(framework, value, tuple(means.items()))


@dataclass(frozen=True)
class Hyper:
    """One argument of a rule.

    kind: ``"real"`` (number or 0-d array), ``"int"``, ``"bool"``, ``"choice"``,
    ``"triples"`` (one triple of finite numbers, or a non-empty sequence of them:
    Muon's Newton-Schulz coefficients, one triple per iteration).
    allowed: an :class:`Interval` for real/int, a tuple of strings for choice.
    schedule: the value may also be a callable ``count -> value``.
    """

    name: str
    default: Any
    kind: str = "real"
    allowed: Any = NONNEG
    doc: str = ""
    torch: str | None = None
    keras: str | None = None
    optax: str | None = None
    runtime: bool = False
    schedule: bool = False
    optional: bool = False  # None is allowed too (e.g. state_dtype: the params' dtype)
    aliases: tuple[Alias, ...] = ()  # frameworks' spellings of values

    def alias(self, framework: str | None, value: Any) -> Alias | None:
        """The alias ``value`` is in ``framework`` (None: not an alias there)."""
        return next((a for a in self.aliases
                     if a.framework == framework and _same(a.value, value)), None)

    def spelled_value(self, framework: str | None, value: Any) -> Any:
        """``framework``'s spelling of this argument's canonical ``value``: the first
        alias meaning exactly it, else ``value`` itself."""
        return next((a.value for a in self.aliases if a.framework == framework
                     and a.means == ((self.name, value),)), value)

    def spelling(self, framework: str | None) -> str:
        """This argument's name in ``framework`` (None: the canonical name)."""
        if framework is None or framework == "polyopt":
            return self.name
        own = getattr(self, framework)
        return own if own is not None else self.name

    def allowed_text(self, framework: str | None = None) -> str:
        """What this argument may be; in ``framework``, with that framework's aliases."""
        own = [a for a in self.aliases if a.framework == framework]
        if own:
            said = ", ".join(f"{a.value!r} ({', '.join(f'{k}={v!r}' for k, v in a.means)})"
                             for a in own)
            who = _FRAMEWORK_NAMES.get(framework, framework)
            return f"{replace(self, aliases=()).allowed_text()}, or {who}'s {said}"
        if self.optional:
            return replace(self, optional=False).allowed_text() + " or None"
        if self.kind == "bool":
            return "True or False"
        if self.kind == "triples":
            return "a triple of finite numbers (a, b, c) or a non-empty sequence of them"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.allowed)
        kind = "an integer" if self.kind == "int" else "a number"
        if self.kind == "real" and self.schedule:
            kind = "a number or a schedule (callable)"
        return f"{kind} in {self.allowed}"

    def check(self, value: Any, owner: str, framework: str | None = None) -> Any:
        """Return ``value`` if allowed, else raise TypeError/ValueError naming it."""
        name = self.spelling(framework)

        def fail(exc: type[Exception]) -> Exception:
            return exc(f"{owner}: {name} must be {self.allowed_text(framework)}, "
                       f"got {name}={value!r}")

        if self.optional and value is None:
            return None
        if self.kind == "bool":
            if not _is_bool(value):
                raise fail(TypeError)
            return bool(value)
        if self.kind == "triples":
            return _triples(value, fail)
        if self.kind == "choice":
            if not isinstance(value, str) or (self.optional and value == "None"):
                raise fail(TypeError)
            if value not in self.allowed:
                raise fail(ValueError)
            return value
        if self.kind == "int":
            if value == math.inf and math.inf in self.allowed:  # "no limit"
                return value
            if _is_bool(value) or not isinstance(value, numbers.Integral):
                raise fail(TypeError)
            if int(value) not in self.allowed:
                raise fail(ValueError)
            return int(value)
        # real
        if self.schedule and callable(value) and not hasattr(value, "shape"):
            return value
        if _is_bool(value) or isinstance(value, (str, bytes)):
            raise fail(TypeError)
        if isinstance(value, numbers.Real):
            if float(value) not in self.allowed:
                raise fail(ValueError)
            return value
        shape = getattr(value, "shape", _MISSING)
        if shape is _MISSING:
            raise fail(TypeError)
        if tuple(shape) != ():
            raise ValueError(
                f"{owner}: {name} must be a scalar (a number or a 0-d array), "
                f"got an array of shape {tuple(shape)}"
            )
        dtype = str(getattr(value, "dtype", ""))
        if "float" not in dtype and "int" not in dtype:
            raise TypeError(
                f"{owner}: {name} must be a real number, got an array of dtype {dtype}"
            )
        concrete = _scalar_value(value)
        if concrete is not None and concrete not in self.allowed:
            raise fail(ValueError)
        return value


def _triples(value: Any, fail: Callable[[type], Exception]) -> tuple:
    """One triple of finite numbers as a tuple of 3 floats, or a non-empty sequence of
    triples (a list, a tuple, an (n, 3) array) as a tuple of such tuples."""
    if isinstance(value, (str, bytes)):  # not one of the names a framework's aliases give
        raise fail(ValueError)
    if _is_bool(value):
        raise fail(TypeError)
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):  # ragged, or not numbers
        raise fail(TypeError) from None
    if array.ndim not in (1, 2) or array.shape[-1] != 3 or not array.size or not bool(
            np.all(np.isfinite(array))):
        raise fail(ValueError)
    rows = tuple(tuple(float(v) for v in row) for row in np.atleast_2d(array))
    return rows[0] if array.ndim == 1 else rows


# --------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class Spec:
    """The arguments of one rule, in signature order."""

    name: str
    hypers: tuple[Hyper, ...]
    doc: str = ""
    native: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [h.name for h in self.hypers]
        if len(set(names)) != len(names):
            raise ValueError(f"spec {self.name}: duplicate hyperparameter names {names}")

    def __getitem__(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(f"{self.name} has no hyperparameter {name!r}")

    def __contains__(self, name: str) -> bool:
        return any(h.name == name for h in self.hypers)

    def __iter__(self):
        return iter(self.hypers)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hypers]

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hypers}

    def with_defaults(self, name: str | None = None, **defaults: Any) -> Spec:
        """A copy with other defaults (and optionally another name)."""
        unknown = set(defaults) - set(self.names)
        if unknown:
            raise KeyError(f"{self.name} has no hyperparameters {sorted(unknown)}")
        hypers = tuple(
            replace(h, default=defaults[h.name]) if h.name in defaults else h
            for h in self.hypers
        )
        return replace(self, name=name or self.name, hypers=hypers)

    def plus(self, name: str, *hypers: Hyper) -> Spec:
        """A new spec: these hyperparameters followed by ``hypers``."""
        return Spec(name, self.hypers + tuple(hypers))

    def validate(self, values: dict[str, Any], framework: str | None = None) -> dict[str, Any]:
        """Check every value; return the complete dict (defaults filled in).

        Raises TypeError/ValueError naming the argument (in ``framework``'s
        spelling), the value and what is allowed. Unknown names raise TypeError.
        """
        unknown = set(values) - set(self.names)
        if unknown:
            spelled = sorted(unknown)
            raise TypeError(
                f"{self.name}: unexpected argument(s) {spelled}; "
                f"allowed: {[h.spelling(framework) for h in self.hypers]}"
            )
        values = self.canonical(values, framework)
        out = {}
        for h in self.hypers:
            value = values.get(h.name, h.default)
            out[h.name] = h.check(value, self.name, framework)
        return out

    def canonical(self, values: dict[str, Any], framework: str | None) -> dict[str, Any]:
        """``values`` (canonical names) with ``framework``'s value aliases replaced by
        what they mean. An alias that sets another argument refuses a different value
        given for it (ValueError naming both); use :meth:`overridden` to let it win
        over a preset's."""
        implied: dict[str, tuple[Any, Hyper, Any]] = {}
        out = dict(values)
        for h in self.hypers:
            a = h.alias(framework, values[h.name]) if h.name in values else None
            if a is None:
                continue
            if h.name not in dict(a.means):
                out.pop(h.name)
            for name, value in a.means:
                implied[name] = (value, h, values[h.name])
        for name, (value, by, raw) in implied.items():
            given = values.get(name, _MISSING)
            if (name != by.name and given is not _MISSING
                    and self[name].alias(framework, given) is None and not _same(given, value)):
                spelled = self[name].spelling(framework)
                raise ValueError(
                    f"{self.name}: {by.spelling(framework)}={raw!r} means {spelled}={value!r}, "
                    f"which contradicts {spelled}={given!r}; give one of them")
            out[name] = value
        return out

    def overridden(self, options: dict[str, Any], given: dict[str, Any],
                   framework: str | None) -> dict[str, Any]:
        """A preset's ``options`` (canonical names) less those that ``given``
        (canonical names, ``framework``'s values) sets through an alias of another
        argument: ``given`` overrides them, as it overrides the options it names."""
        set_by_alias = {name for h in self.hypers if h.name in given
                        for a in [h.alias(framework, given[h.name])] if a is not None
                        for name, _ in a.means if name != h.name}
        return {k: v for k, v in options.items() if k not in set_by_alias}

    def factory(self, fn: Callable) -> Callable:
        """Decorate a rule factory: defaults and checks come from this spec.

        ``fn`` declares the hyperparameters as parameters without defaults (any
        other parameter, e.g. ``inner``, keeps its own). The returned factory
        has a signature with the spec's defaults, validates every argument at
        call time (construction) and then calls ``fn`` with all of them.
        """
        sig = inspect.signature(fn)
        declared = [p.name for p in sig.parameters.values() if p.name in self]
        if declared != self.names:
            raise TypeError(
                f"{fn.__name__}: parameters {declared} do not match spec {self.name} {self.names}"
            )
        params = [
            p.replace(default=self[p.name].default) if p.name in self else p
            for p in sig.parameters.values()
        ]
        new_sig = sig.replace(parameters=params)

        @functools.wraps(fn)
        def make(*args: Any, **kwargs: Any):
            try:
                bound = new_sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.name}: {e}") from None
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            hyper = {k: arguments.pop(k) for k in self.names}
            hyper = self.validate(hyper)
            return fn(**arguments, **hyper)

        make.__signature__ = new_sig  # type: ignore[attr-defined]
        make.spec = self  # type: ignore[attr-defined]
        return make


# shared argument shapes ---------------------------------------------------


def learning_rate(default: float) -> Hyper:
    return Hyper(
        "learning_rate", default, allowed=NONNEG, schedule=True, runtime=True, torch="lr",
        doc="step size; a number, a 0-d array or a schedule count -> value",
    )


def eps(default: float, doc: str = "added to the denominator for numerical stability") -> Hyper:
    return Hyper("eps", default, allowed=NONNEG, keras="epsilon", doc=doc)


def eps_root() -> Hyper:
    return Hyper("eps_root", 0.0, allowed=NONNEG,
                 doc="added to the bias-corrected v inside the sqrt (optax)")


def b1(default: float = 0.9) -> Hyper:
    return Hyper(
        "b1", default, allowed=UNIT_OPEN, runtime=True, torch="betas[0]", keras="beta_1",
        doc="decay of the first moment",
    )


def b2(default: float = 0.999) -> Hyper:
    return Hyper(
        "b2", default, allowed=UNIT_OPEN, torch="betas[1]", keras="beta_2",
        doc="decay of the second moment",
    )


def weight_decay(default: float = 0.0, mode: str = "l2") -> tuple[Hyper, Hyper]:
    return (
        Hyper("weight_decay", default, allowed=NONNEG, doc="weight decay coefficient"),
        Hyper(
            "weight_decay_mode", mode, kind="choice",
            allowed=("l2", "decoupled", "decoupled_unscaled"),
            doc="'l2': add weight_decay*p to the gradient (torch Adam/SGD); "
            "'decoupled': p -= lr*weight_decay*p (torch AdamW, Keras, optax adamw); "
            "'decoupled_unscaled': p -= weight_decay*p (tfa AdamW)",
        ),
    )


#: names a state_dtype may take (None: each param's own dtype)
STATE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def state_dtype() -> Hyper:
    return Hyper(
        "state_dtype", None, kind="choice", allowed=STATE_DTYPES, optional=True,
        optax="mu_dtype",
        doc="dtype the moments are stored in (None: the param's); the math runs in the "
        "param's dtype. optax's mu_dtype applies to mu only, polyopt's to every moment",
    )


def momentum(default: float = 0.0) -> Hyper:
    return Hyper("momentum", default, allowed=UNIT, runtime=True, doc="momentum factor")


def momentum_form(default: str) -> Hyper:
    return Hyper(
        "momentum_form", default, kind="choice", allowed=("buffer", "velocity"),
        doc="'buffer': the buffer sums gradients and lr multiplies it (torch, optax sgd); "
        "'velocity': the buffer sums lr-scaled steps (Keras, optax rmsprop); "
        "they differ only when lr changes",
    )


# --------------------------------------------------------------------------
# the rules' specs

SGD = Spec("sgd", (
    learning_rate(0.01),
    momentum(0.0),
    Hyper("dampening", 0.0, allowed=UNIT, doc="dampening of the gradient in the momentum buffer"),
    Hyper("nesterov", False, kind="bool", doc="Nesterov momentum"),
    *weight_decay(0.0, "l2"),
    momentum_form("buffer"),
    replace(state_dtype(), optax="accumulator_dtype"),  # optax.sgd's spelling
))

ADAGRAD = Spec("adagrad", (
    learning_rate(0.01),
    Hyper("initial_accumulator_value", 0.0, allowed=NONNEG, doc="initial sum of squares"),
    eps(1e-10),
    Hyper(
        "eps_placement", "outside", kind="choice", allowed=("outside", "inside"),
        doc="'outside': g / (sqrt(sum) + eps) (torch); "
        "'inside': g / sqrt(sum + eps) (Keras, optax)",
    ),
    Hyper("lr_decay", 0.0, allowed=NONNEG, doc="lr / (1 + count * lr_decay) (torch)"),
    *weight_decay(0.0, "l2"),
    state_dtype(),
))

RMSPROP = Spec("rmsprop", (
    learning_rate(0.001),
    Hyper("decay", 0.9, allowed=UNIT_OPEN, torch="alpha", keras="rho",
          doc="decay of the mean square"),
    eps(1e-8),
    Hyper(
        "eps_placement", "inside", kind="choice", allowed=("outside", "inside"),
        doc="'inside': g / sqrt(v + eps) (Keras, optax); 'outside': g / (sqrt(v) + eps) (torch)",
    ),
    Hyper("initial_scale", 0.0, allowed=NONNEG, doc="initial mean square (optax)"),
    Hyper("centered", False, kind="bool", doc="divide by the variance instead of the mean square"),
    momentum(0.0),
    Hyper("nesterov", False, kind="bool", doc="Nesterov momentum (optax)"),
    momentum_form("velocity"),
    Hyper("bias_correction", False, kind="bool", doc="bias-correct the mean square (optax)"),
    *weight_decay(0.0, "l2"),
    state_dtype(),
))

ADADELTA = Spec("adadelta", (
    learning_rate(1.0),
    Hyper("rho", 0.95, allowed=UNIT_OPEN, doc="decay of the squared gradients and updates"),
    eps(1e-6),
    *weight_decay(0.0, "l2"),
    state_dtype(),
))

_MOMENTS = (learning_rate(0.001), b1(0.9), b2(0.999), eps(1e-8), eps_root())

_ADAM_CORE = _MOMENTS + (
    Hyper(
        "eps_placement", "outside", kind="choice", allowed=("outside", "hat"),
        doc="'outside': m_hat / (sqrt(v_hat) + eps) (torch, optax); 'hat': Keras's "
        "'epsilon hat', eps on the raw sqrt(v) with lr*sqrt(1-b2^t)/(1-b1^t)",
    ),
    Hyper("amsgrad", False, kind="bool", doc="use the running maximum of v"),
    Hyper(
        "amsgrad_form", "raw", kind="choice", allowed=("raw", "corrected", "uncorrected"),
        doc="'raw': maximum of raw v, then bias-corrected (torch, Keras); "
        "'corrected': maximum of bias-corrected v (optax); 'uncorrected': maximum of "
        "raw v, never bias-corrected (the AMSGrad paper; optax bias_correction_nu=False)",
    ),
)

_FIRST_MOMENT_BIAS_CORRECTION = Hyper(
    "first_moment_bias_correction", True, kind="bool", optax="bias_correction_mu",
    doc="divide m by 1 - b1^t; False: the AMSGrad paper (optax amsgrad bias_correction_mu=False)",
)

ADAM = Spec("adam", _ADAM_CORE + weight_decay(0.0, "l2")
            + (_FIRST_MOMENT_BIAS_CORRECTION, state_dtype()))
ADAMW = Spec("adamw", _ADAM_CORE + weight_decay(0.01, "decoupled")
             + (_FIRST_MOMENT_BIAS_CORRECTION, state_dtype()))
AMSGRAD = ADAM.with_defaults("amsgrad", amsgrad=True)

ADAMAX = Spec("adamax", (
    learning_rate(0.002),
    b1(0.9),
    b2(0.999),
    eps(1e-8),
    Hyper(
        "eps_placement", "inside", kind="choice", allowed=("inside", "outside"),
        doc="'inside': u = max(b2*u, |g| + eps) (torch, optax); 'outside': m / (u + eps) (Keras)",
    ),
    *weight_decay(0.0, "l2"),
    state_dtype(),
))

NADAM = Spec("nadam", (
    learning_rate(0.002),
    b1(0.9),
    b2(0.999),
    eps(1e-8),
    eps_root(),
    Hyper("momentum_decay", 0.004, allowed=NONNEG,
          doc="mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)); Keras uses 1.0"),
    Hyper("momentum_schedule", True, kind="bool",
          doc="True: Dozat's warming momentum schedule (torch, Keras); "
          "False: Adam with constant Nesterov momentum b1 (optax nadam)"),
    *weight_decay(0.0, "l2"),
    state_dtype(),
    Hyper("momentum_product_dtype", None, kind="choice", allowed=("float32",), optional=True,
          doc="dtype the product of the momentum schedule is kept in (None: the params'); "
          "torch.optim.NAdam keeps it in float32"),
))

_RADAM_CORE = _MOMENTS + (
    Hyper(
        "eps_placement", "hat", kind="choice", allowed=("hat", "outside"),
        doc="'hat': eps on the raw sqrt(v) (paper, torch); "
        "'outside': after bias correction (optax, tfa)",
    ),
    Hyper("threshold", 5.0, allowed=Interval(4.0, math.inf, lo_closed=False),
          doc="rectify when rho_t >= threshold, else fall back"),
    Hyper("fallback", "momentum", kind="choice", allowed=("momentum", "none"),
          doc="below the threshold: 'momentum' steps with m_hat (torch, optax, tfa); 'none' skips"),
    Hyper("nesterov", False, kind="bool",
          doc="Nesterov momentum: b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t) (optax)"),
    Hyper("amsgrad", False, kind="bool",
          doc="use the running maximum of raw v, then bias-correct it (tfa RectifiedAdam)"),
    Hyper("total_steps", 0, kind="int", allowed=NONNEG,
          doc="tfa warmup/decay schedule length; 0 disables it"),
    Hyper("warmup_proportion", 0.1, allowed=UNIT,
          doc="tfa: fraction of total_steps spent warming up"),
    Hyper("min_lr", 0.0, allowed=NONNEG, doc="tfa: learning rate reached at total_steps"),
)

RADAM = Spec("radam", _RADAM_CORE + weight_decay(0.0, "l2") + (state_dtype(),))

LION = Spec("lion", (
    learning_rate(1e-4),
    Hyper("b1", 0.9, allowed=UNIT_OPEN, runtime=True, torch="betas[0]", keras="beta_1",
          doc="interpolation between the momentum and the gradient inside the sign"),
    Hyper("b2", 0.99, allowed=UNIT_OPEN, torch="betas[1]", keras="beta_2",
          doc="decay of the momentum"),
    *weight_decay(0.0, "decoupled"),
    state_dtype(),
))

#: how Adafactor splits a tensor's axes between its row and column statistics
FACTORINGS = ("layout", "last_two", "largest_two", "none")

ADAFACTOR = Spec("adafactor", (
    learning_rate(1e-2),
    Hyper("relative_step", True, kind="bool",
          doc="True: the step size is min(learning_rate, 1/sqrt(t)) (the paper's relative "
          "step with learning_rate 1e-2 as its cap; torch, Keras); False: learning_rate (optax)"),
    Hyper("beta2_decay", -0.8, allowed=Interval(-math.inf, 0.0, lo_closed=False, hi_closed=True),
          keras="beta_2_decay",
          doc="second-moment decay 1 - t^beta2_decay (optax decay_rate=0.8 is beta2_decay=-0.8)"),
    Hyper("decay_offset", 0, allowed=NONNEG,
          doc="the decay's t counts from this step (optax, for fine-tuning; a number or a "
          "0-d array, as optax.inject_hyperparams passes it)"),
    Hyper("eps", 1e-30, allowed=NONNEG, optional=True, torch="eps[0]", keras="epsilon_1",
          doc="epsilon_1: added to g^2 ('inside') or a floor ('floor'); None: the machine "
          "epsilon of the params' dtype (torch)"),
    Hyper("eps_placement", "inside", kind="choice", allowed=("inside", "floor"),
          doc="'inside': g^2 + eps in the statistics (the paper, Keras, optax); 'floor': "
          "max(mean row, eps) and max(sqrt(v), eps) (torch)"),
    Hyper("eps2", 1e-3, allowed=NONNEG, torch="eps[1]", keras="epsilon_2",
          doc="epsilon_2: the smallest parameter scale, max(eps2, RMS(p)) (optax: 1e-3, fixed)"),
    Hyper("clipping_threshold", 1.0, allowed=POSITIVE, optional=True, torch="d",
          keras="clip_threshold",
          doc="update clipping: u / max(1, RMS(u) / clipping_threshold); None: no clipping"),
    Hyper("multiply_by_parameter_scale", True, kind="bool",
          doc="scale the step by max(eps2, RMS(p)) (the paper; optax's option)"),
    Hyper("param_scale_after_decay", False, kind="bool",
          doc="the parameter scale reads the param after decoupled weight decay (Keras, which "
          "decays first); False: before it (torch)"),
    Hyper("factoring", "layout", kind="choice", allowed=FACTORINGS,
          doc="which axes the row and column statistics average over: 'layout' (the param's "
          "output vs reduction axes: the same numbers in torch's and Keras's layouts), "
          "'last_two' (torch, Keras: the last two axes, others batch), 'largest_two' (optax), "
          "'none' (the full second moment; optax factored=False)"),
    Hyper("min_dim_size_to_factor", 0, kind="int", allowed=NONNEG,
          doc="factor only when both factored sizes are at least this (optax: 128)"),
    Hyper("momentum", None, allowed=UNIT_OPEN, optional=True,
          doc="decay of an exponential average of the steps (optax); None: no momentum slot"),
    Hyper("momentum_dtype", None, kind="choice", allowed=STATE_DTYPES, optional=True,
          optax="dtype_momentum",
          doc="dtype the momentum is stored in (None: as the statistics, state_dtype else "
          "the param's); the math runs in the param's dtype (optax: float32 by default)"),
    replace(weight_decay(0.0)[0], optax="weight_decay_rate"),
    replace(weight_decay(0.0, "decoupled")[1],
            doc="'decoupled': p -= lr*weight_decay*p, lr the learning rate before the relative "
            "step (torch, Keras); 'decoupled_unscaled': p -= weight_decay*p (optax "
            "weight_decay_rate); 'l2': add weight_decay*p to the gradient"),
    state_dtype(),
))

_TRUST_RATIO = Hyper("trust_ratio", True, kind="bool",
                     doc="scale each tensor's step by its trust ratio; False: the plain step "
                     "(optax's trust_ratio_mask False; a torch param group, e.g. biases)")

LAMB = Spec("lamb", (
    learning_rate(0.001),
    b1(0.9),
    b2(0.999),
    eps(1e-6, "added to sqrt(v_hat) (the paper, optax: 1e-6; Keras 1e-7)"),
    eps_root(),
    Hyper("weight_decay", 0.0, allowed=NONNEG, doc="weight decay coefficient"),
    Hyper("weight_decay_mode", "inside", kind="choice", allowed=("inside", "decoupled"),
          doc="'inside': the Adam step plus weight_decay*p, then the trust ratio (the paper, "
          "optax); 'decoupled': p -= lr*weight_decay*p first, the ratio of the decayed p and "
          "the Adam step alone (Keras)"),
    _TRUST_RATIO,
    Hyper("trust_coefficient", 1.0, allowed=POSITIVE, doc="multiplies the trust ratio"),
    state_dtype(),
))

LARS = Spec("lars", (
    learning_rate(1.0),
    Hyper("momentum", 0.9, allowed=UNIT, runtime=True, doc="momentum factor"),
    Hyper("nesterov", False, kind="bool", doc="Nesterov momentum"),
    momentum_form("velocity"),
    Hyper("weight_decay", 0.0, allowed=NONNEG,
          doc="added to the gradient, inside the trust ratio"),
    _TRUST_RATIO,
    Hyper("trust_coefficient", 0.001, allowed=POSITIVE,
          doc="eta: the local learning rate is eta * ||p|| / (gradient norm)"),
    Hyper("trust_norm", "separate", kind="choice", allowed=("separate", "combined"),
          doc="the ratio's denominator: 'separate' ||g|| + wd*||p|| (the paper, TF's "
          "LARSOptimizer); 'combined' ||g + wd*p|| (optax)"),
    Hyper("eps", 0.0, allowed=NONNEG, keras="epsilon",
          doc="added to the trust ratio's denominator (optax)"),
    state_dtype(),
))

SCHEDULE_FREE_ADAMW = Spec("schedule_free_adamw", (
    learning_rate(0.0025),
    Hyper("b1", 0.9, allowed=Interval(0.0, 1.0, lo_closed=False), runtime=True,
          torch="betas[0]", keras="beta_1",
          doc="interpolation y = (1 - b1) z + b1 x (> 0: the evaluation point x is "
          "recovered as (y - (1 - b1) z) / b1)"),
    b2(0.999),
    eps(1e-8, "added to sqrt(v_hat), outside the root"),
    Hyper("warmup_steps", 0, kind="int", allowed=NONNEG,
          doc="linear warmup: lr * min(t / warmup_steps, 1) at step t = 1, 2, ...; 0: none"),
    Hyper("warmup_lag", False, kind="bool",
          doc="True: the z step uses the warmed-up (and scheduled) lr of count t - 1 and the "
          "averaging weight that of t, so the first step leaves z as it is "
          "(optax.contrib: its inner scale_by_learning_rate counts from 0, schedule_free "
          "from 1); False: both use step t (the reference, Keras)"),
    Hyper("r", 0.0, allowed=NONNEG,
          doc="polynomial averaging weight t**r (the reference; optax and Keras have none)"),
    Hyper("weight_lr_power", 2.0, allowed=NONNEG,
          doc="averaging weight max_lr**weight_lr_power (reference, optax: 2); Keras "
          "averages with 1/t, which is 0"),
    Hyper("weight_decay", 0.0, allowed=NONNEG, doc="weight decay coefficient"),
    Hyper("weight_decay_mode", "gradient", kind="choice", allowed=("gradient", "variable"),
          doc="'gradient': weight_decay * y is added to the normalized gradient, which "
          "steps z and y with the warmed-up lr (the reference, optax); 'variable': "
          "y -= lr * weight_decay * y before the step, lr without warmup (Keras's "
          "weight_decay on its variables)"),
    state_dtype(),
))

ADOPT = Spec("adopt", (
    learning_rate(0.001),
    b1(0.9),
    b2(0.9999),
    eps(1e-6, "the denominator is max(sqrt(v), eps)"),
    Hyper("use_clipping", True, kind="bool",
          doc="clip the normalized gradient to [-c_t, c_t] (the paper's stable variant; "
          "optax, reference)"),
    Hyper("clip_exponent", 0.25, allowed=NONNEG,
          doc="c_t = t ** clip_exponent at step t (the first update is t = 1; "
          "optax's clip_value_fn=lambda t: t ** 0.25)"),
    Hyper("nesterov", False, kind="bool", doc="Nesterov momentum (optax)"),
    *weight_decay(0.0, "l2"),
    state_dtype(),
))

#: optax.contrib.muon's named Newton-Schulz coefficients (optax/contrib/_muon.py, 0.2.8):
#: 'standard', the default triple, and 'dion' (Ahn et al., 2025), one triple per iteration
MUON_STANDARD_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_DION_TABLE = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                   (3.7418, -5.5913, 2.3037), (2.8769, -3.1427, 1.2046),
                   (2.8366, -3.0525, 1.2012))

#: optax.contrib.muon's preconditionings (what scales X before Newton-Schulz)
MUON_PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")

MUON = Spec("muon", (
    learning_rate(0.02),
    Hyper("momentum", 0.95, allowed=UNIT_OPEN, optax="beta",
          doc="decay of the momentum buffer"),
    Hyper("nesterov", True, kind="bool", doc="orthogonalize the Nesterov look-ahead"),
    Hyper("momentum_form", "ema", kind="choice", allowed=("ema", "sum", "ema_debiased"),
          doc="'ema': B = mu B + (1 - mu) G (the reference, torch); 'sum': B = mu B + G "
          "(Keras; the matrix times 1/(1 - mu), seen only by eps); 'ema_debiased': 'ema' "
          "divided by 1 - mu^t (optax)"),
    Hyper("ns_steps", 5, kind="int", allowed=Interval(1, math.inf),
          doc="Newton-Schulz iterations"),
    Hyper("ns_a", 3.4445, allowed=Interval(-math.inf, math.inf), torch="ns_coefficients[0]",
          keras="muon_a", doc="the quintic's a (X <- a X + (b A + c A^2) X)"),
    Hyper("ns_b", -4.7750, allowed=Interval(-math.inf, math.inf), torch="ns_coefficients[1]",
          keras="muon_b", doc="the quintic's b"),
    Hyper("ns_c", 2.0315, allowed=Interval(-math.inf, math.inf), torch="ns_coefficients[2]",
          keras="muon_c", doc="the quintic's c"),
    Hyper("ns_table", None, kind="triples", optional=True, optax="ns_coeffs",
          aliases=(alias("optax", "standard", ns_table=MUON_STANDARD_COEFFICIENTS),
                   alias("optax", "dion", ns_table=MUON_DION_TABLE)),
          doc="Newton-Schulz coefficients per iteration (optax's ns_coeffs): None (ns_a, "
          "ns_b, ns_c in each of ns_steps iterations); one triple (a, b, c) in each of "
          "ns_steps iterations; a table of n <= ns_steps triples, row k in iteration k, n "
          "iterations (optax: ns_steps is then ignored; a longer table is refused). optax's "
          "names: 'standard' (the default triple) and 'dion' (Ahn et al.'s 5 rows)"),
    Hyper("eps", 1e-7, allowed=NONNEG, keras="ns_epsilon",
          doc="of the normalization X / (||X||_F + eps) (optax 1e-8; Keras fixes 1e-7)"),
    Hyper("preconditioning", "frobenius", kind="choice", allowed=MUON_PRECONDITIONINGS,
          doc="how X is scaled before Newton-Schulz (optax's): 'frobenius' X / (||X||_F + "
          "eps) (every native); 'spectral' X / (||X||_2 + eps); 'aol' no normalization, "
          "the first iteration's rows scaled by 1 / sqrt(max(sum_j |A_ij|, 1e-8)) "
          "(Turbo-Muon); 'schatten' no normalization, the first iteration's X by "
          "1 / sqrt(max(||X X^H||_F, 1e-8)) (optax takes X X^T there, NaN for complex X)"),
    Hyper("eps_placement", "add", kind="choice", allowed=("add", "clamp"),
          doc="'add': ||X|| + eps (the reference, Keras, optax); 'clamp': max(||X||, eps) "
          "(torch)"),
    Hyper("lr_scale", "spectral", kind="choice",
          allowed=("spectral", "rms", "none", "spectral_last_two"),
          torch="adjust_lr_fn",
          aliases=(alias("torch", None, lr_scale="spectral"),
                   alias("torch", "original", lr_scale="spectral"),
                   alias("torch", "match_rms_adamw", lr_scale="rms")),
          doc="the step's factor from the matrix (rows = outputs, cols = inputs): "
          "'spectral' sqrt(max(1, rows/cols)) (the reference, torch adjust_lr_fn=None or "
          "'original', optax); 'rms' rms_scale*sqrt(max(rows, cols)) (torch "
          "'match_rms_adamw', Keras rms_rate, optax consistent_rms); 'none' (Keras "
          "rms_rate=None); 'spectral_last_two' sqrt(max(1, shape[-2]/shape[-1])) of the "
          "param as stored (the reference: a conv kernel (out, in, kh, kw) gets kh/kw)"),
    Hyper("rms_scale", 0.2, allowed=POSITIVE, keras="rms_rate",
          aliases=(alias("keras", None, lr_scale="none"),),
          doc="the factor of lr_scale='rms' (Keras: rms_rate=None is lr_scale='none')"),
    Hyper("adaptive", False, kind="bool",
          doc="scale the orthogonalized matrix by <B, X> (optax adaptive)"),
    Hyper("iteration_dtype", None, kind="choice", allowed=("bfloat16", "float32"),
          optional=True,
          doc="dtype of the Newton-Schulz iteration (None: the param's; the reference and "
          "torch iterate in bfloat16)"),
    Hyper("weight_decay", 0.0, allowed=NONNEG,
          doc="decoupled: p -= lr*weight_decay*p on the Muon params (lr without lr_scale)"),
    Hyper("muon_params", "matrices", kind="choice", allowed=("matrices", "2d", "all", "none"),
          doc="which params take the Muon step, the others AdamW: 'matrices' (2+ axes, "
          "through the layout), '2d' (exactly 2: Keras, optax), 'all' (torch.optim.Muon: "
          "0-d and 1-D params refused), 'none'"),
    Hyper("adam_learning_rate", 3e-4, allowed=NONNEG, schedule=True, optional=True,
          doc="learning rate of the Adam params (the reference's 3e-4; None: learning_rate, "
          "optax and Keras)"),
    Hyper("adam_lr_ratio", 1.0, allowed=NONNEG,
          doc="the Adam step's learning rate is adam_learning_rate times this, its weight "
          "decay's is not (Keras)"),
    Hyper("adam_b1", 0.9, allowed=UNIT_OPEN, keras="adam_beta_1", doc="Adam's b1"),
    Hyper("adam_b2", 0.95, allowed=UNIT_OPEN, keras="adam_beta_2",
          doc="Adam's b2 (the reference's 0.95; Keras, optax 0.999)"),
    Hyper("adam_eps", 1e-10, allowed=NONNEG, keras="epsilon",
          doc="Adam's eps (the reference's 1e-10; Keras 1e-7, optax its eps)"),
    Hyper("adam_eps_root", 0.0, allowed=NONNEG, doc="Adam's eps_root (optax)"),
    Hyper("adam_eps_placement", "outside", kind="choice", allowed=("outside", "hat"),
          doc="Adam's eps_placement ('hat': Keras)"),
    Hyper("adam_weight_decay", 0.0, allowed=NONNEG,
          doc="decoupled decay of the Adam params, times their learning rate"),
    Hyper("adam_nesterov", False, kind="bool",
          doc="Nesterov Adam (optax's Adam part follows its nesterov)"),
    state_dtype(),
))

LOOKAHEAD = Spec("lookahead", (
    Hyper("sync_period", 6, kind="int", allowed=Interval(1, math.inf), torch="k",
          doc="fast steps between synchronisations"),
    Hyper("slow_step_size", 0.5, allowed=UNIT, torch="alpha",
          doc="slow += slow_step_size * (fast - slow) at each synchronisation"),
    Hyper("reset_state", False, kind="bool",
          doc="re-initialise the inner rule's state after each synchronisation (optax)"),
))

_GC = Hyper("gradient_centralization", True, kind="bool",
            doc="subtract the mean of each gradient with ndim > 1 over all axes but axis 0 "
            "(lessw2020 Ranger)")

RANGER = RADAM.with_defaults(
    "ranger", b1=0.95, eps=1e-5, weight_decay_mode="decoupled",
).plus("ranger", *LOOKAHEAD.hypers, _GC)

SAM = Spec("sam", (
    Hyper("rho", 0.05, allowed=NONNEG, doc="radius of the ascent step"),
    Hyper("eps", 1e-12, allowed=NONNEG,
          doc="added to the gradient norm (davda54: 1e-12; optax.contrib.sam: 0)"),
    Hyper("adaptive", False, kind="bool", doc="ASAM: scale the ascent by |p|"),
))

CLIP_BY_GLOBAL_NORM = Spec("clip_by_global_norm", (
    Hyper("max_norm", 1.0, allowed=NONNEG, doc="largest global norm let through"),
    Hyper("eps", 0.0, allowed=NONNEG,
          doc="scale = max_norm / max(norm + eps, max_norm) (torch clip_grad_norm_: 1e-6)"),
))

CENTRALIZE = Spec("centralize", (
    Hyper("keep_axis", None, kind="int", allowed=Interval(-64, 64), optional=True,
          doc="the output axis, not averaged over; None: each param's layout (the adapter's "
          "default or the user's), else a fixed axis (0 in torch layouts, -1 in Keras layouts)"),
    Hyper("min_ndim", 2, kind="int", allowed=Interval(1, math.inf),
          doc="centralize only gradients with at least this many axes"),
))

ADD_DECAYED_WEIGHTS = Spec("add_decayed_weights", (
    Hyper("weight_decay", 0.0, allowed=NONNEG, doc="g + weight_decay * p (coupled L2)"),
))

DECOUPLED_WEIGHT_DECAY = Spec("decoupled_weight_decay", (
    Hyper("weight_decay", 0.0, allowed=NONNEG, doc="u - learning_rate * weight_decay * p"),
    learning_rate(1.0),
))

APPLY_IF_FINITE = Spec("apply_if_finite", (
    Hyper("max_consecutive_errors", math.inf, kind="int",
          allowed=Interval(0, math.inf, hi_closed=True),
          doc="after more consecutive non-finite steps than this, apply them anyway "
          "(optax); inf: never"),
))

SPECS: dict[str, Spec] = {
    s.name: s for s in (SGD, ADAGRAD, RMSPROP, ADADELTA, ADAM, ADAMW, AMSGRAD, ADAMAX, NADAM,
                        RADAM, LION, ADAFACTOR, LAMB, LARS, SCHEDULE_FREE_ADAMW, ADOPT, MUON,
                        LOOKAHEAD, RANGER, SAM, CLIP_BY_GLOBAL_NORM, CENTRALIZE,
                        ADD_DECAYED_WEIGHTS, DECOUPLED_WEIGHT_DECAY, APPLY_IF_FINITE)
}


def spec(name: str) -> Spec:
    """The spec of rule ``name``."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; known: {sorted(SPECS)}") from None


def describe(name: str) -> str:
    """A markdown table of a rule's arguments, defaults and allowed values."""
    s = spec(name)
    rows = ["| argument | default | allowed | torch | Keras | optax |", "|---|---|---|---|---|---|"]
    for h in s.hypers:
        rows.append(
            f"| `{h.name}` | `{h.default!r}` | {h.allowed_text()} | `{h.spelling('torch')}` "
            f"| `{h.spelling('keras')}` | `{h.spelling('optax')}` |"
        )
    return "\n".join(rows)


def defaults_table(names: list[str] | None = None) -> str:
    """A markdown table: each rule with its arguments and defaults (docs/rules.md's)."""
    rows = ["| rule | arguments and defaults |", "|---|---|"]
    for name in names or list(SPECS):
        args = ", ".join(f"`{h.name}={h.default!r}`" for h in spec(name).hypers)
        rows.append(f"| `{name}` | {args} |")
    return "\n".join(rows)
