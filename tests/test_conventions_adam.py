"""The Adam family reproduces every native convention through its options.

Parity is proved against the real native optimizers, run side by side on the
same problem: torch.optim (Adam, AdamW, Adamax, NAdam, RAdam, and Adam under
OneCycleLR with momentum cycling), optax (adam, adamw, amsgrad with its bias
correction flags, adamax, adamaxw, nadam, nadamw, radam; all in one
``jax.jit``) and Keras 3 (Adam, AdamW, Adamax, Nadam; in one child process on
the JAX backend, because torch and tensorflow must never share a process).
tensorflow-addons' RectifiedAdam cannot run here (it needs Keras 2), so the
expected numbers of its own test file are copied and reproduced.

The problem: four parameters of shapes (5, 3), (3,), (2, 2, 3) and (), 200
steps of random gradients whose scales span 1 .. 1e-5 (so that every eps
placement shows) and shrink over time (so that AMSGrad's maximum and Adamax's
infinity norm hold early values). Polyopt runs on numpy arrays,
``p = p + u``. Final parameters must agree to 1e-10 (float64) and 1e-5
(float32) relative; see ``max_rel_diff``.

Every parity case also names a *near miss*: the same call with one option
switched to a neighbouring convention. It must differ from the native result
by more than the float64 tolerance, which proves that the problem can tell
the conventions apart (so the parity assertion can fail).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from polyopt import rules  # noqa: E402
from tests._native import run_keras  # noqa: E402

SHAPES = ((5, 3), (3,), (2, 2, 3), ())
STEPS = 200
DTYPES = ("float64", "float32")
TOL = {"float64": 1e-10, "float32": 1e-5}


# --------------------------------------------------------------------------
# the problem


@dataclasses.dataclass(frozen=True)
class Problem:
    params: list  # list of float64 arrays
    grads: list  # STEPS lists of float64 arrays

    def cast(self, dtype: str) -> Problem:
        return Problem([p.astype(dtype) for p in self.params],
                       [[g.astype(dtype) for g in step] for step in self.grads])


def _make_problem(seed: int = 20240611) -> Problem:
    rng = np.random.default_rng(seed)
    # |p| in [0.5, 1.5]: far from 0, so that relative differences are meaningful
    params = [np.asarray(rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.5, size=s))
              for s in SHAPES]
    scales = (1.0, 1e-3, 0.1, 1e-5)  # the smallest ones make eps (1e-8, 1e-7) visible
    drifts = [rng.standard_normal(s) for s in SHAPES]  # a mean, so momentum matters
    grads = []
    for t in range(STEPS):
        decay = 0.2 + 1.5 * math.exp(-t / 40)  # shrinking: AMSGrad/Adamax keep early maxima
        grads.append([np.asarray(c * decay * (rng.standard_normal(s) + 0.5 * d))
                      for s, c, d in zip(SHAPES, scales, drifts)])
    return Problem(params, grads)


PROBLEM = _make_problem()


def max_rel_diff(actual, expected) -> float:
    """max |a - e| / max(|e|, 0.1) over all elements (params stay near |p| ~ 1;
    the floor only guards against a parameter that wanders close to 0)."""
    worst = 0.0
    for a, e in zip(actual, expected):
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        assert a.shape == e.shape
        worst = max(worst, float(np.max(np.abs(a - e) / np.maximum(np.abs(e), 0.1))))
    return worst


def run_polyopt(make_rule: Callable[[int], Any], problem: Problem) -> list:
    """Run polyopt on numpy; ``make_rule(step)`` may return a new rule per step
    (new hyperparameters, same state)."""
    params = [p.copy() for p in problem.params]
    state = None
    for k, grads in enumerate(problem.grads):
        rule = make_rule(k)
        if state is None:
            state = rule.init(params)
        updates, state = rule.update(grads, state, params)
        assert all(u.dtype == p.dtype for u, p in zip(updates, params))
        params = [p + u for p, u in zip(params, updates)]
    return params


@dataclasses.dataclass(frozen=True)
class Parity:
    """A native optimizer configuration and the polyopt call that reproduces it."""

    id: str
    native: str  # class / function name in the native framework
    native_options: dict
    rule: str
    options: dict
    near_miss: dict  # overrides of ``options`` that must NOT reproduce the native run
    dtypes: tuple = DTYPES
    native_env: dict = dataclasses.field(default_factory=dict)  # keras: floatx

    def build(self, **overrides) -> Any:
        return getattr(rules, self.rule)(**{**self.options, **overrides})

    def polyopt(self, dtype: str, **overrides) -> list:
        rule = self.build(**overrides)
        return run_polyopt(lambda k: rule, PROBLEM.cast(dtype))

    def __str__(self) -> str:
        return self.id


def _check(case: Parity, native: dict, dtype: str) -> float:
    """Assert parity in ``dtype`` (and the near miss in float64); return the diff.

    float32: polyopt must be within TOL of the native float32 run, unless that
    run is itself further than TOL from the native float64 run (its own
    rounding, e.g. Keras computing 1 - beta_2**t in float32); then polyopt's
    float32 run must be within TOL of the native float64 run instead, i.e.
    closer to the native math than the native float32 run is.
    """
    ours = case.polyopt(dtype)
    diff = max_rel_diff(ours, native[dtype])
    if dtype == "float32" and diff > TOL[dtype] and "float64" in native:
        own = max_rel_diff(native["float32"], native["float64"])
        truth = max_rel_diff(ours, native["float64"])
        assert own > TOL[dtype] and truth <= TOL[dtype], (
            f"{case.id} float32: polyopt differs from native float32 by {diff:.3g}, from "
            f"native float64 by {truth:.3g}; native float32 vs float64: {own:.3g}")
        MEASURED[(case.id, "float32 vs native float64")] = truth
        MEASURED[(case.id, "native float32 vs native float64")] = own
    else:
        assert diff <= TOL[dtype], (
            f"{case.id} {dtype}: polyopt {case.rule}({case.options}) differs from native "
            f"{case.native}({case.native_options}) by {diff:.3g} relative "
            f"(tolerance {TOL[dtype]:g})")
    if dtype == "float64":
        miss = max_rel_diff(case.polyopt(dtype, **case.near_miss), native[dtype])
        assert miss > 100 * TOL[dtype], (
            f"{case.id}: the near miss {case.near_miss} is within {miss:.3g} of the native "
            f"run: the problem cannot tell these conventions apart")
    MEASURED[(case.id, dtype)] = diff
    return diff


MEASURED: dict = {}  # (case id, dtype) -> max rel diff, for the docs' tables


# --------------------------------------------------------------------------
# torch.optim
#
# torch.optim hosts per-parameter scalar state (``step``, NAdam's
# ``mu_product``) in torch.get_default_dtype()'s precision (``_get_scalar_dtype``):
# float32 unless the default dtype is float64. ``step`` is an integer <= 200
# (exact in float32) and is read back with ``.item()``, so it never matters.
# NAdam's ``mu_product *= mu`` however rounds the product to float32 at every
# step although the params are float64, and the coefficients (1 - mu)/(1 -
# mu_product) inherit that rounding: after 200 steps the float64 run is
# 8.4e-10 relative from the exact float64 math at lr=0.01 (5.5e-11 at the
# default lr=0.002), against 6e-15 with a float64 mu_product (measured by
# test_torch_nadam_mu_product_dtype). float64 parity is therefore run under
# torch.set_default_dtype(torch.float64), which makes torch keep its scalar
# state in float64; polyopt keeps mu_product in the params' dtype.

TORCH_CASES = [
    Parity("torch-Adam-defaults", "Adam", {}, "adam", {}, {"eps_placement": "hat"}),
    Parity("torch-Adam", "Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-7},
           "adam", {"learning_rate": 0.01, "b1": 0.8, "b2": 0.99, "eps": 1e-7},
           {"eps_placement": "hat"}),
    Parity("torch-Adam-amsgrad", "Adam", {"lr": 0.01, "amsgrad": True},
           "adam", {"learning_rate": 0.01, "amsgrad": True}, {"amsgrad_form": "corrected"}),
    Parity("torch-Adam-L2", "Adam", {"lr": 0.01, "weight_decay": 0.1},
           "adam", {"learning_rate": 0.01, "weight_decay": 0.1},
           {"weight_decay_mode": "decoupled"}),
    Parity("torch-AdamW-defaults", "AdamW", {}, "adamw", {}, {"weight_decay_mode": "l2"}),
    Parity("torch-AdamW-amsgrad", "AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
           "adamw", {"learning_rate": 0.01, "weight_decay": 0.1, "amsgrad": True},
           {"amsgrad_form": "corrected"}),
    Parity("torch-Adamax-defaults", "Adamax", {}, "adamax", {}, {"eps_placement": "outside"}),
    Parity("torch-Adamax-L2", "Adamax", {"lr": 0.01, "weight_decay": 0.1},
           "adamax", {"learning_rate": 0.01, "weight_decay": 0.1},
           {"weight_decay_mode": "decoupled"}),
    Parity("torch-NAdam-defaults", "NAdam", {}, "nadam", {}, {"momentum_decay": 1.0}),
    Parity("torch-NAdam", "NAdam", {"lr": 0.01, "momentum_decay": 0.01},
           "nadam", {"learning_rate": 0.01, "momentum_decay": 0.01},
           {"momentum_schedule": False}),
    Parity("torch-NAdam-L2", "NAdam", {"lr": 0.01, "weight_decay": 0.1},
           "nadam", {"learning_rate": 0.01, "weight_decay": 0.1},
           {"weight_decay_mode": "decoupled"}),
    Parity("torch-NAdam-decoupled", "NAdam",
           {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
           "nadam", {"learning_rate": 0.01, "weight_decay": 0.1, "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
    Parity("torch-RAdam-defaults", "RAdam", {}, "radam", {}, {"eps_placement": "outside"}),
    Parity("torch-RAdam", "RAdam", {"lr": 0.01, "betas": (0.9, 0.99)},
           "radam", {"learning_rate": 0.01, "b2": 0.99}, {"fallback": "none"}),
    Parity("torch-RAdam-L2", "RAdam", {"lr": 0.01, "weight_decay": 0.1},
           "radam", {"learning_rate": 0.01, "weight_decay": 0.1},
           {"weight_decay_mode": "decoupled"}),
    Parity("torch-RAdam-decoupled", "RAdam",
           {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
           "radam", {"learning_rate": 0.01, "weight_decay": 0.1, "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
]


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def _torch_params(problem: Problem) -> list:
    return [torch.from_numpy(p.copy()).requires_grad_(True) for p in problem.params]


def run_torch(name: str, options: dict, dtype: str, default_dtype=None,
              on_step: Callable | None = None):
    """Run torch.optim.<name> on the problem; return (final params, optimizer)."""
    if default_dtype is None:
        default_dtype = torch.float64 if dtype == "float64" else torch.float32
    problem = PROBLEM.cast(dtype)
    with _default_dtype(default_dtype):
        params = _torch_params(problem)
        optimizer = getattr(torch.optim, name)(params, **options)
        scheduler = on_step(optimizer) if on_step is not None else None
        for grads in problem.grads:
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g.copy())
            optimizer.step()
            if scheduler is not None:
                scheduler()
    return [p.detach().numpy().copy() for p in params], optimizer


_TORCH_RESULTS: dict = {}


def _torch_native(case: Parity) -> dict:
    if case.id not in _TORCH_RESULTS:
        _TORCH_RESULTS[case.id] = {
            dtype: run_torch(case.native, case.native_options, dtype)[0] for dtype in case.dtypes
        }
    return _TORCH_RESULTS[case.id]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_torch(case, dtype):
    _check(case, _torch_native(case), dtype)


def test_torch_nadam_mu_product_dtype():
    """What torch's float32 scalar state costs in float64 (see the note above)."""
    case = TORCH_CASES[[c.id for c in TORCH_CASES].index("torch-NAdam")]
    exact = case.polyopt("float64")
    drift = {}
    for default in (torch.float32, torch.float64):
        native, optimizer = run_torch(case.native, case.native_options, "float64",
                                      default_dtype=default)
        state = optimizer.state[optimizer.param_groups[0]["params"][0]]
        assert state["mu_product"].dtype == default
        drift[default] = max_rel_diff(exact, native)
    # measured: 8.4e-10 with the float32 mu_product, 5.8e-15 with float64
    assert TOL["float64"] < drift[torch.float32] < 1e-7
    assert drift[torch.float64] < 1e-13


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_onecycle_cycles_lr_and_b1(dtype):
    """OneCycleLR with cycle_momentum sets group['lr'] and group['betas'][0] at
    every step. polyopt gets them as 0-d arrays by rebuilding the rule each
    step with the same state: the supported way to change hyperparameters."""
    lrs, b1s = [], []

    def attach(optimizer):
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.05, total_steps=STEPS, pct_start=0.3, cycle_momentum=True,
            base_momentum=0.8, max_momentum=0.95)
        group = optimizer.param_groups[0]

        def record_and_step():
            scheduler.step()
            lrs.append(group["lr"])
            b1s.append(group["betas"][0])

        lrs.append(group["lr"])
        b1s.append(group["betas"][0])
        return record_and_step

    native, _ = run_torch("Adam", {"lr": 0.01, "betas": (0.9, 0.99), "amsgrad": True}, dtype,
                          on_step=attach)
    lrs, b1s = lrs[:STEPS], b1s[:STEPS]  # the values each step ran with
    assert len(set(lrs)) > STEPS // 2 and len(set(b1s)) > STEPS // 2
    assert min(b1s) == pytest.approx(0.8) and max(b1s) == pytest.approx(0.95)

    def make(b1_of_step):
        return lambda k: rules.adam(learning_rate=np.asarray(lrs[k]), b1=b1_of_step(k),
                                    b2=0.99, amsgrad=True)

    problem = PROBLEM.cast(dtype)
    diff = max_rel_diff(run_polyopt(make(lambda k: np.asarray(b1s[k])), problem), native)
    assert diff <= TOL[dtype], diff
    MEASURED[("torch-Adam-amsgrad+OneCycleLR(cycle_momentum)", dtype)] = diff
    if dtype == "float64":  # near miss: b1 not cycled
        miss = max_rel_diff(run_polyopt(make(lambda k: 0.9), problem), native)
        assert miss > 100 * TOL[dtype], miss


# --------------------------------------------------------------------------
# optax (jax x64, inside jax.jit)

_OPTAX_SCHEDULE = optax.exponential_decay(0.01, 10, 0.9)
_OPTAX_SCHEDULE_JIT = jax.jit(_OPTAX_SCHEDULE)

OPTAX_CASES = [
    Parity("optax-adam", "adam", {"learning_rate": 0.01},
           "adam", {"learning_rate": 0.01}, {"eps_placement": "hat"}),
    Parity("optax-adam-eps_root", "adam", {"learning_rate": 0.01, "eps_root": 1e-10},
           "adam", {"learning_rate": 0.01, "eps_root": 1e-10}, {"eps_root": 0.0}),
    Parity("optax-adamw", "adamw", {"learning_rate": 0.01, "weight_decay": 0.1},
           "adamw", {"learning_rate": 0.01, "weight_decay": 0.1},
           {"weight_decay_mode": "decoupled_unscaled"}),
    # optax evaluates schedules on its int32 count, and jax promotes int32 / 10
    # to float32 even with x64 on: exponential_decay(0.01, 10, 0.9) yields
    # float32 values (0.9f ** float32(count / 10)); a float64 re-implementation
    # of the formula ends 1.65e-7 away after 200 steps, and even the schedule
    # itself run eagerly differs from its jitted self by up to 2.8e-7 (XLA's
    # float32 pow). polyopt takes any callable count -> value, so it gets
    # optax's own schedule, jitted and on a jax int32 count as optax runs it:
    # this checks that the schedule is read at the same count and applied to
    # the step and to the decay alike.
    Parity("optax-adamw-schedule", "adamw",
           {"learning_rate": _OPTAX_SCHEDULE, "weight_decay": 1e-4},
           "adamw", {"learning_rate": lambda count: _OPTAX_SCHEDULE_JIT(jnp.asarray(count)),
                     "weight_decay": 1e-4},
           {"learning_rate": lambda count: 0.01 * 0.9 ** (count / 10)}),
    Parity("optax-amsgrad", "amsgrad", {"learning_rate": 0.01},
           "adam", {"learning_rate": 0.01, "amsgrad": True, "amsgrad_form": "corrected"},
           {"amsgrad_form": "raw"}),
    Parity("optax-amsgrad-paper", "amsgrad",
           {"learning_rate": 0.01, "bias_correction_mu": False, "bias_correction_nu": False},
           "adam", {"learning_rate": 0.01, "amsgrad": True, "amsgrad_form": "uncorrected",
                    "first_moment_bias_correction": False},
           {"first_moment_bias_correction": True}),
    Parity("optax-amsgrad-nu-uncorrected", "amsgrad",
           {"learning_rate": 0.01, "bias_correction_nu": False, "eps_root": 1e-10},
           "adam", {"learning_rate": 0.01, "amsgrad": True, "amsgrad_form": "uncorrected",
                    "eps_root": 1e-10},
           {"amsgrad_form": "raw"}),
    Parity("optax-adamax", "adamax", {"learning_rate": 0.01},
           "adamax", {"learning_rate": 0.01}, {"eps_placement": "outside"}),
    Parity("optax-adamaxw", "adamaxw", {"learning_rate": 0.01, "weight_decay": 0.1},
           "adamax", {"learning_rate": 0.01, "weight_decay": 0.1,
                      "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
    Parity("optax-nadam", "nadam", {"learning_rate": 0.01},
           "nadam", {"learning_rate": 0.01, "momentum_schedule": False},
           {"momentum_schedule": True}),
    Parity("optax-nadam-eps_root", "nadam", {"learning_rate": 0.01, "eps_root": 1e-10},
           "nadam", {"learning_rate": 0.01, "momentum_schedule": False, "eps_root": 1e-10},
           {"eps_root": 0.0}),
    Parity("optax-nadamw", "nadamw", {"learning_rate": 0.01, "weight_decay": 0.1},
           "nadam", {"learning_rate": 0.01, "momentum_schedule": False, "weight_decay": 0.1,
                     "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
    Parity("optax-radam", "radam", {"learning_rate": 0.01},
           "radam", {"learning_rate": 0.01, "eps_placement": "outside"}, {"eps_placement": "hat"}),
    Parity("optax-radam-threshold", "radam", {"learning_rate": 0.01, "threshold": 20.0},
           "radam", {"learning_rate": 0.01, "eps_placement": "outside", "threshold": 20.0},
           {"threshold": 5.0}),
]


def run_optax(cases: list, dtype: str) -> list:
    """Run the optax optimizers of ``cases`` side by side in one jitted scan
    (one compilation for all of them); return their final params."""
    problem = PROBLEM.cast(dtype)
    txs = [getattr(optax, c.native)(**c.native_options) for c in cases]
    params = [jnp.asarray(p) for p in problem.params]
    stacked = [jnp.asarray(np.stack([step[i] for step in problem.grads]))
               for i in range(len(SHAPES))]

    @jax.jit
    def train(params, stacked):
        def body(carry, grads):
            out = []
            for tx, (p, state) in zip(txs, carry):
                updates, state = tx.update(grads, state, p)
                out.append((optax.apply_updates(p, updates), state))
            return out, None

        carry, _ = jax.lax.scan(body, [(params, tx.init(params)) for tx in txs], stacked)
        return [p for p, _ in carry]

    out = train(params, stacked)
    assert all(str(o.dtype) == dtype for p in out for o in p)
    return [[np.asarray(o) for o in p] for p in out]


@pytest.fixture(scope="module")
def optax_native():
    runs = {dtype: run_optax(OPTAX_CASES, dtype) for dtype in DTYPES}
    return {c.id: {dtype: runs[dtype][i] for dtype in DTYPES} for i, c in enumerate(OPTAX_CASES)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OPTAX_CASES, ids=str)
def test_optax(case, dtype, optax_native):
    _check(case, optax_native[case.id], dtype)


# --------------------------------------------------------------------------
# Keras 3 (JAX backend, x64, in one child process)
#
# Keras conventions: "epsilon hat" (eps on the raw sqrt(v), lr*sqrt(1-b2^t)/(1-b1^t)),
# eps 1e-7; AMSGrad on raw v; Adamax eps outside the max; Nadam 0.96^t
# (momentum_decay=1.0); weight decay decoupled and times lr, before the step.
#
# Hyperparameter precision, measured on the JAX backend (Keras 3.15): ops.cast
# is convert_to_tensor, so ops.cast(0.9, "float64") is exactly 0.9 (unlike the
# TensorFlow backend, see docs/keras.md): beta_1, beta_2, epsilon, weight_decay and
# Nadam's 0.96 reach float64 variables unrounded. The learning rate however is
# a Keras variable of dtype floatx(): with the default floatx float32, lr=0.01
# becomes 0.009999999776482582 (the "keras-Adam-floatx32" case reproduces that
# run only with the float32-rounded lr; its near miss is the exact lr). All
# other cases run with keras.config.set_floatx("float64").
#
# float32: Keras computes 1 - beta_2**t in the variable's dtype
# (ops.power(ops.cast(beta_2, float32), t)), which rounds 0.999 to 0.99900001
# and biases every step by up to 1.3e-5 relative. At lr=0.01 (Adam amsgrad,
# Adam weight_decay) its float32 run ends 4.0e-5 / 3.5e-5 from its own
# float64 run, while polyopt's float32 run (bias corrections via expm1, as
# accurate as torch's and optax's double-precision ones) ends 4.4e-6 / 3.6e-6
# from it: _check then holds polyopt to the native float64 run instead.

KERAS_CASES = [
    Parity("keras-Adam-defaults", "Adam", {}, "adam", {"eps": 1e-7, "eps_placement": "hat"},
           {"eps_placement": "outside"}),
    Parity("keras-Adam-amsgrad", "Adam", {"learning_rate": 0.01, "amsgrad": True},
           "adam", {"learning_rate": 0.01, "eps": 1e-7, "eps_placement": "hat", "amsgrad": True},
           {"amsgrad_form": "corrected"}),
    Parity("keras-Adam-weight_decay", "Adam", {"learning_rate": 0.01, "weight_decay": 0.1},
           "adam", {"learning_rate": 0.01, "eps": 1e-7, "eps_placement": "hat",
                    "weight_decay": 0.1, "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
    Parity("keras-AdamW-defaults", "AdamW", {},
           "adamw", {"weight_decay": 0.004, "eps": 1e-7, "eps_placement": "hat"},
           {"weight_decay_mode": "decoupled_unscaled"}),
    Parity("keras-AdamW", "AdamW", {"learning_rate": 0.01, "weight_decay": 0.1,
                                    "beta_1": 0.8, "beta_2": 0.99},
           "adamw", {"learning_rate": 0.01, "weight_decay": 0.1, "b1": 0.8, "b2": 0.99,
                     "eps": 1e-7, "eps_placement": "hat"},
           {"eps_placement": "outside"}),
    Parity("keras-Adamax-defaults", "Adamax", {},
           "adamax", {"learning_rate": 0.001, "eps": 1e-7, "eps_placement": "outside"},
           {"eps_placement": "inside"}),
    Parity("keras-Adamax-weight_decay", "Adamax", {"learning_rate": 0.01, "weight_decay": 0.1},
           "adamax", {"learning_rate": 0.01, "eps": 1e-7, "eps_placement": "outside",
                      "weight_decay": 0.1, "weight_decay_mode": "decoupled"},
           {"weight_decay_mode": "l2"}),
    Parity("keras-Nadam-defaults", "Nadam", {},
           "nadam", {"learning_rate": 0.001, "eps": 1e-7, "momentum_decay": 1.0},
           {"momentum_decay": 0.004}),
    Parity("keras-Nadam", "Nadam", {"learning_rate": 0.01, "beta_1": 0.95, "weight_decay": 0.1},
           "nadam", {"learning_rate": 0.01, "b1": 0.95, "eps": 1e-7, "momentum_decay": 1.0,
                     "weight_decay": 0.1, "weight_decay_mode": "decoupled"},
           {"momentum_schedule": False}),
    Parity("keras-Adam-floatx32", "Adam", {"learning_rate": 0.01},
           "adam", {"learning_rate": float(np.float32(0.01)), "eps": 1e-7, "eps_placement": "hat"},
           {"learning_rate": 0.01}, dtypes=("float64",), native_env={"floatx": "float32"}),
]

_KERAS_SCRIPT = """
import sys
import jax
import keras
from keras import ops

assert keras.backend.backend() == "jax"
assert "torch" not in sys.modules and "tensorflow" not in sys.modules

# how hyperparameters reach a float64 variable on this backend
probe = {"cast_0.9": float(ops.cast(0.9, "float64"))}
keras.config.set_floatx("float32")
probe["lr_variable_floatx32"] = float(keras.optimizers.Adam(learning_rate=0.01).learning_rate)

params = [np.asarray(p, dtype=np.float64).reshape(s)
          for p, s in zip(payload["params"], payload["shapes"])]
grads = [[np.asarray(g, dtype=np.float64).reshape(s) for g, s in zip(step, payload["shapes"])]
         for step in payload["grads"]]
result = {"probe": probe, "runs": {}}
# one jitted step per floatx (traced under that floatx) applies every optimizer
for floatx in sorted({case["floatx"] for case in payload["cases"]}):
    keras.config.set_floatx(floatx)
    cases = [case for case in payload["cases"] if case["floatx"] == floatx]
    optimizers, state = [], []
    for case in cases:
        dtype = case["dtype"]
        variables = [keras.Variable(p.astype(dtype), dtype=dtype) for p in params]
        optimizer = getattr(keras.optimizers, case["native"])(**case["options"])
        optimizer.build(variables)
        optimizers.append((optimizer, dtype))
        state.append(([v.value for v in variables], [v.value for v in optimizer.variables]))

    @jax.jit
    def step(state, grads):
        out = []
        for (optimizer, dtype), (trainable, opt_vars) in zip(optimizers, state):
            g = [x.astype(dtype) for x in grads]
            out.append(optimizer.stateless_apply(opt_vars, g, trainable))
        return out

    for g in grads:
        state = step(state, g)
    for case, (trainable, _) in zip(cases, state):
        assert all(str(t.dtype) == case["dtype"] for t in trainable)
        result["runs"][case["id"] + "/" + case["dtype"]] = [
            np.asarray(t, dtype=np.float64).ravel() for t in trainable]
"""


def keras_runs():
    """Run every Keras case in one child process: (probe, {case id: {dtype: params}})."""
    cases = [
        {"id": c.id, "native": c.native, "options": c.native_options, "dtype": d,
         "floatx": c.native_env.get("floatx", "float64")}
        for c in KERAS_CASES for d in c.dtypes
    ]
    payload = {
        "shapes": [list(s) for s in SHAPES],
        "params": [p.ravel().tolist() for p in PROBLEM.params],
        "grads": [[g.ravel().tolist() for g in step] for step in PROBLEM.grads],
        "cases": cases,
    }
    out = run_keras(_KERAS_SCRIPT, payload)
    runs = {}
    for key, flat in out["runs"].items():
        case_id, dtype = key.split("/")
        runs.setdefault(case_id, {})[dtype] = [
            np.asarray(f, dtype=np.float64).reshape(s) for f, s in zip(flat, SHAPES)]
    return out["probe"], runs


@pytest.fixture(scope="module")
def keras_native():
    return keras_runs()


def test_keras_hyperparameter_precision(keras_native):
    probe, _ = keras_native
    assert probe["cast_0.9"] == 0.9  # exact on the JAX backend (TF backend: 0.8999999761581421)
    assert probe["lr_variable_floatx32"] == float(np.float32(0.01)) != 0.01


@pytest.mark.parametrize("case,dtype", [(c, d) for c in KERAS_CASES for d in c.dtypes],
                         ids=lambda x: str(x))
def test_keras(case, dtype, keras_native):
    _check(case, keras_native[1][case.id], dtype)


# --------------------------------------------------------------------------
# tensorflow-addons RectifiedAdam
#
# Expected values copied from tensorflow/addons,
# tensorflow_addons/optimizers/tests/rectified_adam_test.py (HEAD d208d752);
# the optimizer is tensorflow_addons/optimizers/rectified_adam.py: eps 1e-7
# after bias correction ('outside'), rectify when sma_t >= sma_threshold,
# else step with m_hat; weight decay var_t += wd * var, then
# var -= lr_t * var_t with lr_t the warmup/decay-scheduled learning rate
# ('decoupled', times the scheduled lr); lr and wd schedules are evaluated at
# iterations (0-based). tfa's tests use float32 variables and atol 2e-4; its
# values are printed to 6 decimals. polyopt in float64 must agree to 2e-6
# (rounding of the printed values plus tfa's own float32 error), in float32
# to 2e-5.

TFA = {"eps": 1e-7, "eps_placement": "outside"}
TFA_DENSE = ([1.0, 2.0], [3.0, 4.0]), ([0.1, 0.2], [0.03, 0.04])
# tfa's sparse tests update only var_0[0] (grad 0.1) and var_1[1] (grad 0.04);
# the other entries stay put (2.0 and 3.0). The update is elementwise, so the
# touched entries are a dense problem of their own.
TFA_SPARSE = ([1.0], [4.0]), ([0.1], [0.04])


def _tfa_radam(**options):
    return lambda k: rules.radam(**{**TFA, **options})


def _tfa_lookahead(**options):
    rule = rules.lookahead(rules.radam(**{**TFA, **options}), sync_period=6, slow_step_size=0.45)
    return lambda k: rule


def _tfa_schedules():
    # ExponentialDecay(1e-3, 50, 0.5) and InverseTimeDecay(2e-3, 25, 0.25), both at
    # `iterations`; polyopt's weight_decay is a number or 0-d array, so the rule is
    # rebuilt each step with the scheduled value (same state).
    return lambda k: rules.radam(
        learning_rate=lambda count: 1e-3 * 0.5 ** (count / 50),
        weight_decay=np.asarray(2e-3 / (1 + 0.25 * k / 25)), weight_decay_mode="decoupled",
        **TFA)


_WD = {"weight_decay": 0.01, "weight_decay_mode": "decoupled"}
TFA_CASES = [
    # (test name in tfa, problem, iterations, polyopt, expected, near miss)
    ("test_dense_sample", TFA_DENSE, 100, _tfa_radam(learning_rate=1e-3),
     [[0.985769, 1.985269], [2.986119, 3.986068]], _tfa_radam(learning_rate=1e-3, threshold=6.0)),
    ("test_sparse_sample", TFA_SPARSE, 200, _tfa_radam(learning_rate=1e-3),
     [[0.959333], [3.959632]], _tfa_radam(learning_rate=1e-3, fallback="none")),
    ("test_dense_sample_with_amsgrad", TFA_DENSE, 100,  # amsgrad: no effect, grads are fixed
     _tfa_radam(learning_rate=1e-3), [[0.985769, 1.985269], [2.986119, 3.986068]], None),
    ("test_dense_sample_with_weight_decay", TFA_DENSE, 100, _tfa_radam(learning_rate=1e-3, **_WD),
     [[0.984775, 1.983276], [2.983125, 3.982076]],
     _tfa_radam(learning_rate=1e-3, weight_decay=0.01, weight_decay_mode="l2")),
    ("test_sparse_sample_with_weight_decay", TFA_SPARSE, 200,
     _tfa_radam(learning_rate=1e-3, **_WD), [[0.957368], [3.951673]],
     _tfa_radam(learning_rate=1e-3, weight_decay=0.01, weight_decay_mode="decoupled_unscaled")),
    ("test_dense_sample_with_warmup", TFA_DENSE, 100,
     _tfa_radam(learning_rate=1e-3, total_steps=100, warmup_proportion=0.1, min_lr=1e-5),
     [[0.994062, 1.993912], [2.994167, 3.994152]],
     _tfa_radam(learning_rate=1e-3, total_steps=100, warmup_proportion=0.1)),
    ("test_sparse_sample_with_warmup", TFA_SPARSE, 200,
     _tfa_radam(learning_rate=1e-3, total_steps=200, warmup_proportion=0.1, min_lr=1e-5),
     [[0.982629], [3.982674]],
     _tfa_radam(learning_rate=1e-3, total_steps=200, warmup_proportion=0.2, min_lr=1e-5)),
    ("test_dense_sample_with_lookahead", TFA_DENSE, 100,
     _tfa_lookahead(learning_rate=1e-3, b1=0.95), [[0.993126, 1.992901], [2.993283, 3.993261]],
     _tfa_radam(learning_rate=1e-3, b1=0.95)),
    ("test_sparse_sample_with_lookahead", TFA_SPARSE, 150,
     _tfa_lookahead(learning_rate=1e-3, b1=0.95), [[0.988156], [3.988291]],
     _tfa_radam(learning_rate=1e-3, b1=0.95)),
    ("test_schedulers", TFA_DENSE, 100, _tfa_schedules(),
     [[0.993192, 1.992625], [2.993369, 3.993239]],
     _tfa_radam(learning_rate=1e-3, weight_decay=2e-3, weight_decay_mode="decoupled")),
]
TFA_TOL = {"float64": 2e-6, "float32": 2e-5}


def _tfa_run(make_rule, problem, iterations, dtype) -> list:
    (params, grads) = problem
    p = Problem([np.asarray(x, dtype=dtype) for x in params],
                [[np.asarray(g, dtype=dtype) for g in grads]] * iterations)
    return run_polyopt(make_rule, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,problem,iterations,make_rule,expected,near_miss", TFA_CASES,
                         ids=[c[0] for c in TFA_CASES])
def test_tfa_rectified_adam(name, problem, iterations, make_rule, expected, near_miss, dtype):
    out = _tfa_run(make_rule, problem, iterations, dtype)
    diff = max(float(np.max(np.abs(o - np.asarray(e)))) for o, e in zip(out, expected))
    assert diff <= TFA_TOL[dtype], f"{name} {dtype}: off by {diff:.3g}"
    MEASURED[("tfa-" + name, dtype)] = diff
    if near_miss is not None and dtype == "float64":
        miss = _tfa_run(near_miss, problem, iterations, dtype)
        far = max(float(np.max(np.abs(o - np.asarray(e)))) for o, e in zip(miss, expected))
        assert far > 10 * TFA_TOL[dtype], f"{name}: near miss within {far:.3g}"


# --------------------------------------------------------------------------
# a closed form, no native involved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options,factor", [
    ({}, 1.0),
    ({"eps_placement": "hat"}, 1.0),
    ({"amsgrad": True}, 1.0),
    ({"amsgrad": True, "amsgrad_form": "corrected"}, 1.0),
    # the AMSGrad paper, no bias correction: m_1 / sqrt(v_1) = (1 - b1) / sqrt(1 - b2)
    ({"amsgrad": True, "amsgrad_form": "uncorrected", "first_moment_bias_correction": False},
     (1 - 0.8) / math.sqrt(1 - 0.99)),
], ids=str)
def test_adam_first_step_is_minus_lr_sign_g(options, factor, dtype):
    # m_1 = (1-b1) g, v_1 = (1-b2) g^2: m_hat / sqrt(v_hat) = g / |g| exactly
    rng = np.random.default_rng(3)
    lr = 0.03
    grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-4, 3, size=s)).astype(dtype)
             for s in SHAPES]
    params = [np.zeros(s, dtype=dtype) for s in SHAPES]
    rule = rules.adam(learning_rate=lr, b1=0.8, b2=0.99, eps=1e-30, **options)
    updates, _ = rule.update(grads, rule.init(params), params)
    ulp = np.finfo(dtype).eps
    for u, g in zip(updates, grads):
        assert u.dtype == np.dtype(dtype)
        np.testing.assert_allclose(u, -lr * factor * np.sign(g), rtol=8 * ulp, atol=0)


def _run_polyopt(rule, params, grads):
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return params


def _random_problem(steps=60):
    rng = np.random.default_rng(11)
    shapes = [(3, 2), (4,)]
    params = [rng.normal(size=s) for s in shapes]
    scale = lambda t: 1.0 / (1 + t) ** 0.5  # noqa: E731 - shrinking grads: amsgrad's max matters
    grads = [[rng.normal(size=s) * scale(t) for s in shapes] for t in range(steps)]
    return params, grads


def test_radam_nesterov_matches_optax():
    params, grads = _random_problem()
    transform = optax.radam(0.01, nesterov=True)
    state = transform.init([jnp.asarray(p) for p in params])
    native = [jnp.asarray(p) for p in params]
    for g in grads:
        updates, state = transform.update([jnp.asarray(x) for x in g], state, native)
        native = optax.apply_updates(native, updates)
    ours = _run_polyopt(rules.radam(0.01, nesterov=True, eps_placement="outside"), params, grads)
    plain = _run_polyopt(rules.radam(0.01, eps_placement="outside"), params, grads)
    for o, n, p in zip(ours, native, plain):
        np.testing.assert_allclose(o, np.asarray(n), rtol=1e-10, atol=1e-14)
        assert np.max(np.abs(p - np.asarray(n))) > 1e-6  # nesterov really changes the steps


def test_radam_amsgrad_matches_a_transcription_of_tfa():
    """tensorflow-addons RectifiedAdam(amsgrad=True)._resource_apply_dense, in numpy."""
    params, grads = _random_problem()
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    expected = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    vhat = [np.zeros_like(p) for p in params]
    for step, g in enumerate(grads, start=1):
        b1_power, b2_power = b1 ** step, b2 ** step
        sma_inf = 2.0 / (1.0 - b2) - 1.0
        sma_t = sma_inf - 2.0 * step * b2_power / (1.0 - b2_power)
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_corr = m[i] / (1.0 - b1_power)
            vhat[i] = np.maximum(vhat[i], v[i])
            v_corr = np.sqrt(vhat[i] / (1.0 - b2_power))
            r_t = np.sqrt((sma_t - 4.0) / (sma_inf - 4.0) * (sma_t - 2.0) / (sma_inf - 2.0)
                          * sma_inf / sma_t) if sma_t >= 5.0 else 0.0
            var_t = r_t * m_corr / (v_corr + eps) if sma_t >= 5.0 else m_corr
            expected[i] = expected[i] - lr * var_t
    ours = _run_polyopt(rules.radam(lr, eps=eps, eps_placement="outside", amsgrad=True),
                        params, grads)
    plain = _run_polyopt(rules.radam(lr, eps=eps, eps_placement="outside"), params, grads)
    for o, e, p in zip(ours, expected, plain):
        np.testing.assert_allclose(o, e, rtol=1e-10, atol=1e-14)
        assert np.max(np.abs(p - e)) > 1e-8  # the maximum really changes the steps
