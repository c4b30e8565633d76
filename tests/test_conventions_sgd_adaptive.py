"""sgd, adagrad, rmsprop and adadelta reproduce every native convention.

Each case runs a real native optimizer (torch.optim, optax inside jax.jit,
Keras 3 on the JAX backend in a child process) side by side with the polyopt
call that docs/conventions.md's table names for it, from the same initial weights and
on the same 200 random gradients, and compares the weights after steps 1, 2,
10, 50 and 200. Nothing here is computed with polyopt's own code on the
native side.

Distance: for every checkpoint and tensor, max|polyopt - native| divided by
max|native| of that tensor; the worst over all of them. Tolerances: 1e-10 in
float64 (measured: <= ~1e-14), 1e-5 in float32.

Measured facts pinned by the tests below:

* Keras 3 on the JAX backend (x64 on, floatx float64) keeps Python-float
  hyperparameters exact in float64: ``ops.cast(0.9, "float64")`` is
  ``jnp.asarray(0.9, float64)``, and ``ops.multiply(0.9, v)`` converts 0.9
  with ``jnp.asarray`` too. So, unlike the TensorFlow backend (docs/keras.md),
  the comparison passes *exact* hyperparameters to polyopt; the
  float32-rounded ones miss by 1e-9 .. 1e-7 (``test_keras_jax_backend_*``).
  Keras keeps its learning rate in a variable of dtype ``floatx()``: the child
  sets floatx to the run's dtype, else the float64 run would use a
  float32-rounded learning rate.
  For comparison, measured once by hand on the TensorFlow backend (floatx
  float64, 50 steps; not run here: it needs its own process and ~10 s): only
  the values that pass through ``ops.cast(python_float, "float64")`` are
  float32-rounded there (SGD ``momentum``, ``weight_decay``, Adagrad's
  ``initial_accumulator_value`` via its Constant initializer); Python floats
  that meet a float64 tensor in ``ops.multiply``/``ops.add`` (RMSprop ``rho``,
  ``momentum``, ``epsilon``; Adadelta ``rho``, ``epsilon``; Adagrad
  ``epsilon``) stay exact. Rounding exactly those gives 0 .. 9e-16; rounding
  all of them misses by up to 5e-7.
* optax.adadelta's default ``learning_rate=None`` skips
  ``scale_by_learning_rate``: its update is ``+delta``, it climbs the loss.
  polyopt's adadelta descends with learning_rate 1.0 and refuses negative
  rates, so that convention is deliberately not reachable.
* The momentum conventions ('buffer': torch SGD/RMSprop, optax sgd;
  'velocity': Keras SGD/RMSprop, optax rmsprop) agree at constant lr and
  differ by 0.1 .. 1 (relative) once the lr changes every step; each matches
  its own framework only.

Run this file as a script to print the table of measured distances.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
# Per-tensor gradient scales: small gradients make eps placement visible.
GRAD_SCALES = (1.0, 0.05, 3.0, 0.01)
STEPS = 200
CHECKPOINTS = (1, 2, 10, 50, 200)
DTYPES = ("float64", "float32")
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _make_data():
    rng = np.random.default_rng(20240917)
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [
        [scale * rng.standard_normal(s) for s, scale in zip(SHAPES, GRAD_SCALES)]
        for _ in range(STEPS)
    ]
    return params, grads


PARAMS0, GRADS = _make_data()
_PARAMS = {d: [np.asarray(p, d) for p in PARAMS0] for d in DTYPES}
_GRADS = {d: [[np.asarray(g, d) for g in step] for step in GRADS] for d in DTYPES}

# A learning rate that changes at every step (Python floats: torch LambdaLR
# computes base_lr * factor, the same product as below).
BASE_LR = 0.05
FACTORS = [(1.0 + 0.6 * math.sin(0.37 * t)) / (1.0 + 0.01 * t) for t in range(STEPS + 1)]
LAMBDA_LRS = [BASE_LR * f for f in FACTORS]
# torch ExponentialLR multiplies group["lr"] by gamma at every scheduler step.
EXP_LR0, EXP_GAMMA = 0.01, 0.98
EXP_LRS = [EXP_LR0]
for _ in range(STEPS):
    EXP_LRS.append(EXP_LRS[-1] * EXP_GAMMA)


def lambda_schedule(count):
    return LAMBDA_LRS[int(count)]


def exp_schedule(count):
    return EXP_LRS[int(count)]


# --------------------------------------------------------------------------
# runners


def run_polyopt(rule_name: str, options: dict, dtype: str) -> list[list[np.ndarray]]:
    rule = getattr(rules, rule_name)(**options)
    params = list(_PARAMS[dtype])
    state = rule.init(params)
    snaps = []
    for t, grads in enumerate(_GRADS[dtype], start=1):
        updates, state = rule.update(grads, state, params)
        for u, p in zip(updates, params):  # no silent promotion, no reshaping
            assert u.dtype == p.dtype and u.shape == p.shape, (u.dtype, p.dtype, u.shape)
        params = [np.asarray(p + u) for p, u in zip(params, updates)]
        if t in CHECKPOINTS:
            snaps.append(params)
    return snaps


def run_torch(make: Callable, dtype: str, scheduler: Callable | None = None,
              foreach: bool = False) -> tuple[list, list]:
    """Returns the checkpoints and, per step, the hyperparameters torch ran
    that step with (its param group, which a scheduler may change)."""
    params = [torch.tensor(p, requires_grad=True) for p in _PARAMS[dtype]]
    opt = make(params, foreach=foreach)
    sched = scheduler(opt) if scheduler is not None else None
    snaps, groups = [], []
    for t, grads in enumerate(_GRADS[dtype], start=1):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        groups.append({k: v for k, v in opt.param_groups[0].items() if k != "params"})
        opt.step()
        if sched is not None:
            sched.step()
        if t in CHECKPOINTS:
            snaps.append([p.detach().numpy().copy() for p in params])
    return snaps, groups


def run_optax(transformations: list, dtype: str) -> list[list]:
    """Run several optax transformations side by side, all in ONE jitted step
    (one compilation per dtype instead of one per case)."""
    params = [[jnp.asarray(p) for p in _PARAMS[dtype]] for _ in transformations]
    states = [tx.init(p) for tx, p in zip(transformations, params)]

    @jax.jit
    def step(params, states, grads):
        new_params, new_states = [], []
        for tx, p, s in zip(transformations, params, states):
            updates, s = tx.update(grads, s, p)
            new_params.append(optax.apply_updates(p, updates))
            new_states.append(s)
        return new_params, new_states

    snaps = [[] for _ in transformations]
    for t, grads in enumerate(_GRADS[dtype], start=1):
        params, states = step(params, states, [jnp.asarray(g) for g in grads])
        if t in CHECKPOINTS:
            for out, p in zip(snaps, params):
                out.append([np.asarray(x) for x in p])
    for p in params:
        assert [x.dtype for x in p] == [x.dtype for x in _PARAMS[dtype]]
    return snaps


_KERAS_SCRIPT = r"""
import jax
import jax.numpy as jnp
import keras

checkpoints = set(payload["checkpoints"])
result = {}
for dtype in ("float64", "float32"):
    keras.config.set_floatx(dtype)  # the learning-rate variable has dtype floatx()
    cases = [c for c in payload["cases"] if c["dtype"] == dtype]
    opts, trains, states, lr_slots = [], [], [], []
    for case in cases:
        variables = [keras.Variable(np.asarray(p, dtype), dtype=dtype) for p in payload["params"]]
        opt = getattr(keras.optimizers, case["optimizer"])(**case["kwargs"])
        opt.build(variables)
        slot = [i for i, v in enumerate(opt.variables) if v is opt._learning_rate]
        assert len(slot) == 1
        lr_slots.append(slot[0] if case["lrs"] is not None else None)
        opts.append(opt)
        trains.append([v.value for v in variables])
        states.append([v.value for v in opt.variables])

    # every optimizer of this dtype in ONE jitted step (Keras's own jax
    # trainer also jits stateless_apply); a per-step learning rate goes into
    # the learning-rate variable, as `optimizer.learning_rate = lr` does.
    @jax.jit
    def step(states, grads, trains, lrs):
        new_states, new_trains = [], []
        for opt, state, train, slot, lr in zip(opts, states, trains, lr_slots, lrs):
            if slot is not None:
                state = list(state)
                state[slot] = lr
            train, state = opt.stateless_apply(state, grads, train)
            new_states.append(state)
            new_trains.append(train)
        return new_states, new_trains

    snaps = [[] for _ in cases]
    for t, grads in enumerate(payload["grads"], start=1):
        lrs = [jnp.asarray(c["lrs"][t - 1] if c["lrs"] is not None else 0.0, dtype)
               for c in cases]
        grads = [jnp.asarray(np.asarray(g, dtype)) for g in grads]
        states, trains = step(states, grads, trains, lrs)
        if t in checkpoints:
            for out, train in zip(snaps, trains):
                out.append([np.asarray(x) for x in train])
    for case, out, train in zip(cases, snaps, trains):
        assert all(str(x.dtype) == dtype for x in train)
        result[case["id"]] = out
result["__frameworks__"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow"))
"""


# --------------------------------------------------------------------------
# distances


def max_rel_diff(ours, native) -> float:
    assert len(ours) == len(native) == len(CHECKPOINTS)
    worst = 0.0
    for snap_a, snap_b in zip(ours, native):
        assert len(snap_a) == len(snap_b) == len(SHAPES)
        for a, b, shape in zip(snap_a, snap_b, SHAPES):
            a = np.asarray(a, np.float64)
            b = np.asarray(b, np.float64)
            assert a.shape == b.shape == shape
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                return math.inf
            scale = max(float(np.max(np.abs(b))), 1e-300)
            worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def moved(native) -> float:
    """How far the native run went from the start (relative), so that a
    comparison of two runs that did nothing cannot pass."""
    return max(
        float(np.max(np.abs(np.asarray(p, np.float64) - p0))) / float(np.max(np.abs(p0)))
        for p, p0 in zip(native[-1], PARAMS0)
    )


def f32(options: dict) -> dict:
    """Every float hyperparameter rounded to float32 (the recipe of docs/keras.md for Keras;
    see the module docstring for what each backend really rounds)."""
    return {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in options.items()}


# --------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class Parity:
    id: str
    rule: str
    options: dict
    native: Any  # torch: factory(params, foreach); optax: transformation; keras: (name, kwargs)
    scheduler: Any = None  # torch only
    lrs: Any = None  # keras only: learning rate per step
    expected_lrs: Any = None  # torch only: the lr the scheduler must produce
    wrong: dict = field(default_factory=dict)  # an option that must NOT match
    min_move: float = 1e-2  # the native run must move the weights at least this much

    def __str__(self) -> str:
        return self.id


T = torch.optim
TORCH = [
    Parity("SGD(lr=.05)", "sgd", {"learning_rate": 0.05},
           lambda ps, **kw: T.SGD(ps, lr=0.05, **kw)),
    Parity("SGD(lr=.05, momentum=.9)", "sgd", {"learning_rate": 0.05, "momentum": 0.9},
           lambda ps, **kw: T.SGD(ps, lr=0.05, momentum=0.9, **kw)),
    Parity("SGD(lr=.05, momentum=.9, nesterov)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
           lambda ps, **kw: T.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, **kw),
           wrong={"nesterov": False}),
    Parity("SGD(lr=.05, momentum=.9, dampening=.3)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.3},
           lambda ps, **kw: T.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3, **kw),
           wrong={"dampening": 0.0}),
    Parity("SGD(lr=.05, momentum=.9, weight_decay=.01)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.01},
           lambda ps, **kw: T.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, **kw),
           wrong={"weight_decay_mode": "decoupled"}),
    Parity("SGD(lr=.05, weight_decay=.01, nesterov, dampening=0)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.5, "nesterov": True, "weight_decay": 0.01},
           lambda ps, **kw: T.SGD(ps, lr=0.05, momentum=0.5, nesterov=True,
                                  weight_decay=0.01, **kw)),
    Parity("SGD(momentum=.9) + LambdaLR", "sgd",
           {"learning_rate": lambda_schedule, "momentum": 0.9},
           lambda ps, **kw: T.SGD(ps, lr=BASE_LR, momentum=0.9, **kw),
           scheduler=lambda opt: T.lr_scheduler.LambdaLR(opt, lambda t: FACTORS[t]),
           expected_lrs=LAMBDA_LRS[:STEPS],
           wrong={"momentum_form": "velocity"}),
    Parity("Adagrad(lr=.1)", "adagrad", {"learning_rate": 0.1},
           lambda ps, **kw: T.Adagrad(ps, lr=0.1, **kw),
           wrong={"eps_placement": "inside"}),
    Parity("Adagrad(lr=.1, lr_decay=.01, initial_accumulator_value=.1, eps=1e-6, "
           "weight_decay=.01)", "adagrad",
           {"learning_rate": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1,
            "eps": 1e-6, "weight_decay": 0.01},
           lambda ps, **kw: T.Adagrad(ps, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1,
                                      eps=1e-6, weight_decay=0.01, **kw),
           wrong={"lr_decay": 0.0}),
    Parity("Adagrad(lr_decay=.01) + ExponentialLR", "adagrad",
           {"learning_rate": exp_schedule, "lr_decay": 0.01},
           lambda ps, **kw: T.Adagrad(ps, lr=EXP_LR0, lr_decay=0.01, **kw),
           scheduler=lambda opt: T.lr_scheduler.ExponentialLR(opt, EXP_GAMMA),
           expected_lrs=EXP_LRS[:STEPS]),
    Parity("RMSprop(lr=.01)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.99, "eps_placement": "outside"},
           lambda ps, **kw: T.RMSprop(ps, lr=0.01, **kw),
           wrong={"eps_placement": "inside"}),
    Parity("RMSprop(lr=.01, centered)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.99, "eps_placement": "outside", "centered": True},
           lambda ps, **kw: T.RMSprop(ps, lr=0.01, centered=True, **kw),
           wrong={"centered": False}),
    Parity("RMSprop(lr=.01, momentum=.9)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.99, "eps_placement": "outside", "momentum": 0.9,
            "momentum_form": "buffer"},
           lambda ps, **kw: T.RMSprop(ps, lr=0.01, momentum=0.9, **kw)),
    Parity("RMSprop(lr=.01, alpha=.9, eps=1e-6, centered, momentum=.9)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-6, "eps_placement": "outside",
            "centered": True, "momentum": 0.9, "momentum_form": "buffer"},
           lambda ps, **kw: T.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-6, centered=True,
                                      momentum=0.9, **kw)),
    Parity("RMSprop(lr=.01, weight_decay=.01)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.99, "eps_placement": "outside",
            "weight_decay": 0.01},
           lambda ps, **kw: T.RMSprop(ps, lr=0.01, weight_decay=0.01, **kw),
           wrong={"weight_decay_mode": "decoupled"}),
    Parity("RMSprop(momentum=.9) + ExponentialLR", "rmsprop",
           {"learning_rate": exp_schedule, "decay": 0.99, "eps_placement": "outside",
            "momentum": 0.9, "momentum_form": "buffer"},
           lambda ps, **kw: T.RMSprop(ps, lr=EXP_LR0, momentum=0.9, **kw),
           scheduler=lambda opt: T.lr_scheduler.ExponentialLR(opt, EXP_GAMMA),
           expected_lrs=EXP_LRS[:STEPS],
           wrong={"momentum_form": "velocity"}),
    Parity("Adadelta()", "adadelta", {"rho": 0.9, "eps": 1e-6},
           lambda ps, **kw: T.Adadelta(ps, **kw),
           wrong={"rho": 0.95}),
    Parity("Adadelta(lr=.5, rho=.95, eps=1e-5, weight_decay=.01)", "adadelta",
           {"learning_rate": 0.5, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.01},
           lambda ps, **kw: T.Adadelta(ps, lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.01, **kw),
           wrong={"weight_decay_mode": "decoupled"}),
]


def _optax_lambda_schedule(count):
    return jnp.asarray(LAMBDA_LRS)[count]


OPTAX = [
    Parity("sgd(.05)", "sgd", {"learning_rate": 0.05}, optax.sgd(0.05)),
    Parity("sgd(.05, momentum=.9)", "sgd", {"learning_rate": 0.05, "momentum": 0.9},
           optax.sgd(0.05, momentum=0.9)),
    Parity("sgd(.05, momentum=.9, nesterov)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
           optax.sgd(0.05, momentum=0.9, nesterov=True)),
    Parity("sgd(schedule, momentum=.9)", "sgd",
           {"learning_rate": lambda_schedule, "momentum": 0.9},
           optax.sgd(_optax_lambda_schedule, momentum=0.9),
           wrong={"momentum_form": "velocity"}),
    Parity("adagrad(.1)", "adagrad",
           {"learning_rate": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-7,
            "eps_placement": "inside"},
           optax.adagrad(0.1),
           wrong={"eps_placement": "outside"}),
    Parity("adagrad(.1, initial_accumulator_value=0, eps=1e-3)", "adagrad",
           {"learning_rate": 0.1, "initial_accumulator_value": 0.0, "eps": 1e-3,
            "eps_placement": "inside"},
           optax.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-3)),
    Parity("rmsprop(.01)", "rmsprop", {"learning_rate": 0.01}, optax.rmsprop(0.01),
           wrong={"eps_placement": "outside"}),
    Parity("rmsprop(.01, centered)", "rmsprop", {"learning_rate": 0.01, "centered": True},
           optax.rmsprop(0.01, centered=True)),
    Parity("rmsprop(.01, eps_in_sqrt=False)", "rmsprop",
           {"learning_rate": 0.01, "eps_placement": "outside"},
           optax.rmsprop(0.01, eps_in_sqrt=False)),
    Parity("rmsprop(.01, momentum=.9)", "rmsprop", {"learning_rate": 0.01, "momentum": 0.9},
           optax.rmsprop(0.01, momentum=0.9)),
    Parity("rmsprop(.01, momentum=.9, nesterov)", "rmsprop",
           {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True},
           optax.rmsprop(0.01, momentum=0.9, nesterov=True),
           wrong={"nesterov": False}),
    Parity("rmsprop(.01, initial_scale=.1)", "rmsprop",
           {"learning_rate": 0.01, "initial_scale": 0.1},
           optax.rmsprop(0.01, initial_scale=0.1),
           wrong={"initial_scale": 0.0}),
    Parity("rmsprop(.01, bias_correction)", "rmsprop",
           {"learning_rate": 0.01, "bias_correction": True},
           optax.rmsprop(0.01, bias_correction=True),
           wrong={"bias_correction": False}),
    Parity("rmsprop(.01, all options)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.95, "eps": 1e-6, "eps_placement": "outside",
            "initial_scale": 0.1, "centered": True, "momentum": 0.8, "nesterov": True,
            "bias_correction": True},
           optax.rmsprop(0.01, decay=0.95, eps=1e-6, eps_in_sqrt=False, initial_scale=0.1,
                         centered=True, momentum=0.8, nesterov=True, bias_correction=True)),
    Parity("rmsprop(schedule, momentum=.9)", "rmsprop",
           {"learning_rate": lambda_schedule, "momentum": 0.9},
           optax.rmsprop(_optax_lambda_schedule, momentum=0.9),
           wrong={"momentum_form": "buffer"}),
    Parity("adadelta(1.0)", "adadelta", {"learning_rate": 1.0, "rho": 0.9, "eps": 1e-6},
           optax.adadelta(1.0),
           wrong={"rho": 0.95}),
    Parity("adadelta(.5, weight_decay=.01)", "adadelta",
           {"learning_rate": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01},
           optax.adadelta(0.5, weight_decay=0.01),
           wrong={"weight_decay_mode": "decoupled"}),
]

KERAS = [
    Parity("SGD(.05)", "sgd", {"learning_rate": 0.05}, ("SGD", {"learning_rate": 0.05})),
    Parity("SGD(.05, momentum=.9)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "momentum_form": "velocity"},
           ("SGD", {"learning_rate": 0.05, "momentum": 0.9})),
    Parity("SGD(.05, momentum=.9, nesterov)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True,
            "momentum_form": "velocity"},
           ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
           wrong={"nesterov": False}),
    Parity("SGD(.05, momentum=.9, weight_decay=.01)", "sgd",
           {"learning_rate": 0.05, "momentum": 0.9, "momentum_form": "velocity",
            "weight_decay": 0.01, "weight_decay_mode": "decoupled"},
           ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
           wrong={"weight_decay_mode": "l2"}),
    Parity("SGD(momentum=.9), lr set every step", "sgd",
           {"learning_rate": lambda_schedule, "momentum": 0.9, "momentum_form": "velocity"},
           ("SGD", {"learning_rate": BASE_LR, "momentum": 0.9}), lrs=LAMBDA_LRS[:STEPS],
           wrong={"momentum_form": "buffer"}),
    Parity("Adagrad(.1)", "adagrad",
           {"learning_rate": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-7,
            "eps_placement": "inside"},
           ("Adagrad", {"learning_rate": 0.1}),
           wrong={"eps_placement": "outside"}),
    Parity("Adagrad(.1, weight_decay=.01)", "adagrad",
           {"learning_rate": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-7,
            "eps_placement": "inside", "weight_decay": 0.01, "weight_decay_mode": "decoupled"},
           ("Adagrad", {"learning_rate": 0.1, "weight_decay": 0.01}),
           wrong={"weight_decay_mode": "decoupled_unscaled"}),
    Parity("RMSprop(.01)", "rmsprop", {"learning_rate": 0.01, "eps": 1e-7},
           ("RMSprop", {"learning_rate": 0.01}),
           wrong={"eps_placement": "outside"}),
    Parity("RMSprop(.01, centered)", "rmsprop",
           {"learning_rate": 0.01, "eps": 1e-7, "centered": True},
           ("RMSprop", {"learning_rate": 0.01, "centered": True})),
    Parity("RMSprop(.01, momentum=.9)", "rmsprop",
           {"learning_rate": 0.01, "eps": 1e-7, "momentum": 0.9},
           ("RMSprop", {"learning_rate": 0.01, "momentum": 0.9})),
    Parity("RMSprop(.01, rho=.95, centered, momentum=.9, weight_decay=.01)", "rmsprop",
           {"learning_rate": 0.01, "decay": 0.95, "eps": 1e-7, "centered": True,
            "momentum": 0.9, "weight_decay": 0.01, "weight_decay_mode": "decoupled"},
           ("RMSprop", {"learning_rate": 0.01, "rho": 0.95, "centered": True, "momentum": 0.9,
                        "weight_decay": 0.01})),
    Parity("RMSprop(momentum=.9, weight_decay=.01), lr set every step", "rmsprop",
           {"learning_rate": lambda_schedule, "eps": 1e-7, "momentum": 0.9,
            "weight_decay": 0.01, "weight_decay_mode": "decoupled"},
           ("RMSprop", {"learning_rate": BASE_LR, "momentum": 0.9, "weight_decay": 0.01}),
           lrs=LAMBDA_LRS[:STEPS],
           wrong={"momentum_form": "buffer"}),
    Parity("Adadelta(1.0)", "adadelta", {"learning_rate": 1.0, "rho": 0.95, "eps": 1e-7},
           ("Adadelta", {"learning_rate": 1.0}),
           wrong={"eps": 1e-6}),
    Parity("Adadelta()", "adadelta", {"learning_rate": 0.001, "rho": 0.95, "eps": 1e-7},
           ("Adadelta", {}), min_move=5e-5),  # Keras's default lr 1e-3 barely moves
]


# --------------------------------------------------------------------------
# native results, computed once per module


@functools.cache
def torch_result(case_id: str, dtype: str, foreach: bool = False):
    case = next(c for c in TORCH if c.id == case_id)
    return run_torch(case.native, dtype, case.scheduler, foreach)


@functools.cache
def _optax_results(dtype: str) -> dict:
    return dict(zip([c.id for c in OPTAX], run_optax([c.native for c in OPTAX], dtype)))


def optax_result(case_id: str, dtype: str):
    return _optax_results(dtype)[case_id]


@functools.cache
def polyopt_result(rule: str, options_key: tuple, dtype: str):
    return run_polyopt(rule, dict(options_key), dtype)


def ours(case: Parity, dtype: str, **override) -> list:
    options = {**case.options, **override}
    return polyopt_result(case.rule, tuple(options.items()), dtype)


@pytest.fixture(scope="module", autouse=True)
def _keras_child(request):
    """Start the Keras child process with this module's first test, in a
    thread, so that it runs while the torch and optax cases run here (only
    if a selected test needs it)."""
    wanted = any(
        "keras_results" in getattr(item, "fixturenames", ()) or "keras:" in item.name
        for item in request.session.items if getattr(item, "module", None) is request.module)
    if not wanted:
        yield None
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(_keras_results)


@pytest.fixture(scope="module")
def keras_results(_keras_child):
    """Every Keras case, both dtypes, from ONE child process (no torch there)."""
    return _keras_child.result() if _keras_child is not None else _keras_results()


@functools.cache
def _keras_results():
    cases = [
        {"id": f"{c.id}|{dtype}", "optimizer": c.native[0], "kwargs": c.native[1],
         "dtype": dtype, "lrs": c.lrs}
        for c in KERAS for dtype in DTYPES
    ]
    payload = {"params": [p.tolist() for p in PARAMS0],
               "grads": [[g.tolist() for g in step] for step in GRADS],
               "checkpoints": list(CHECKPOINTS), "cases": cases}
    return run_keras(_KERAS_SCRIPT, payload, backend="jax", float64=True)


# --------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TORCH, ids=str)
def test_matches_torch(case, dtype):
    native, groups = torch_result(case.id, dtype)
    lrs = [group["lr"] for group in groups]
    if case.expected_lrs is not None:
        assert lrs == case.expected_lrs  # the schedule drives exactly these rates
        assert len(set(lrs)) > STEPS // 2
    assert moved(native) > case.min_move
    assert max_rel_diff(ours(case, dtype), native) <= TOLERANCE[dtype]


@pytest.mark.parametrize("case", TORCH, ids=str)
def test_matches_torch_foreach(case):
    """torch's fast multi-tensor path follows the same conventions."""
    native, _ = torch_result(case.id, "float64", foreach=True)
    assert max_rel_diff(ours(case, "float64"), native) <= TOLERANCE["float64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OPTAX, ids=str)
def test_matches_optax(case, dtype):
    native = optax_result(case.id, dtype)
    assert moved(native) > case.min_move
    assert max_rel_diff(ours(case, dtype), native) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERAS, ids=str)
def test_matches_keras(case, dtype, keras_results):
    native = keras_results[f"{case.id}|{dtype}"]
    assert moved(native) > case.min_move
    assert max_rel_diff(ours(case, dtype), native) <= TOLERANCE[dtype]


def test_keras_child_never_imported_torch_or_tensorflow(keras_results):
    assert keras_results["__frameworks__"] == []


@pytest.mark.parametrize("case_id", [
    "SGD(.05, momentum=.9)",
    "RMSprop(.01, rho=.95, centered, momentum=.9, weight_decay=.01)",
    "Adadelta(1.0)",
])
def test_keras_jax_backend_keeps_float64_hyperparameters_exact(case_id, keras_results):
    """Measured: on the JAX backend, exact hyperparameters match Keras to
    ~1e-15; float32-rounded ones (needed on the TF backend) miss by >= 1e-9."""
    case = next(c for c in KERAS if c.id == case_id)
    native = keras_results[f"{case.id}|float64"]
    exact = max_rel_diff(ours(case, "float64"), native)
    rounded = max_rel_diff(
        polyopt_result(case.rule, tuple(f32(case.options).items()), "float64"), native)
    assert exact <= 1e-12
    assert rounded > 1e-9


# every native family has a polyopt option that matters: flipping it breaks parity


def _wrong_cases():
    for framework, table in (("torch", TORCH), ("optax", OPTAX), ("keras", KERAS)):
        for case in table:
            if case.wrong:
                yield pytest.param(framework, case, id=f"{framework}:{case.id}")


@pytest.mark.parametrize(("framework", "case"), list(_wrong_cases()))
def test_a_wrong_option_is_detected(framework, case, request):
    if framework == "torch":
        native = torch_result(case.id, "float64")[0]
    elif framework == "optax":
        native = optax_result(case.id, "float64")
    else:
        native = request.getfixturevalue("keras_results")[f"{case.id}|float64"]
    assert max_rel_diff(ours(case, "float64", **case.wrong), native) > 100 * TOLERANCE["float64"]


# --------------------------------------------------------------------------
# the momentum conventions


@pytest.mark.parametrize("rule", ["sgd", "rmsprop"])
def test_buffer_and_velocity_agree_at_constant_lr_and_differ_when_lr_changes(rule):
    base = {"momentum": 0.9}
    if rule == "rmsprop":
        base.update(decay=0.99, eps_placement="outside")

    def run(learning_rate, form):
        options = {**base, "learning_rate": learning_rate, "momentum_form": form}
        return polyopt_result(rule, tuple(options.items()), "float64")

    assert max_rel_diff(run(0.01, "buffer"), run(0.01, "velocity")) <= 1e-12
    assert max_rel_diff(run(lambda_schedule, "buffer"), run(lambda_schedule, "velocity")) > 1e-3


def test_each_momentum_form_matches_its_framework_when_lr_changes(keras_results):
    """torch (LambdaLR) is 'buffer'; Keras (lr variable set every step) is
    'velocity'; the same lr sequence drives both, and each form matches only
    its own framework."""
    torch_sgd = torch_result("SGD(momentum=.9) + LambdaLR", "float64")[0]
    keras_sgd = keras_results["SGD(momentum=.9), lr set every step|float64"]
    options = {"learning_rate": lambda_schedule, "momentum": 0.9}
    buffer = polyopt_result("sgd", tuple({**options, "momentum_form": "buffer"}.items()),
                            "float64")
    velocity = polyopt_result("sgd", tuple({**options, "momentum_form": "velocity"}.items()),
                              "float64")
    tol = TOLERANCE["float64"]
    assert max_rel_diff(buffer, torch_sgd) <= tol
    assert max_rel_diff(velocity, keras_sgd) <= tol
    assert max_rel_diff(buffer, keras_sgd) > 1e-3
    assert max_rel_diff(velocity, torch_sgd) > 1e-3
    # and optax: sgd traces gradients (buffer), rmsprop traces lr-scaled steps (velocity)
    optax_sgd = optax_result("sgd(schedule, momentum=.9)", "float64")
    assert max_rel_diff(buffer, optax_sgd) <= tol
    assert max_rel_diff(velocity, optax_sgd) > 1e-3


ONECYCLE = {
    "sgd": (lambda ps: T.SGD(ps, lr=0.05, momentum=0.9), {}),
    "rmsprop": (lambda ps: T.RMSprop(ps, lr=0.01, momentum=0.9),
                {"decay": 0.99, "eps_placement": "outside", "momentum_form": "buffer"}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", sorted(ONECYCLE))
def test_torch_onecycle_cycles_lr_and_momentum(rule, dtype):
    """OneCycleLR changes group["lr"] and group["momentum"] at every step.
    polyopt gets both as that step's hyperparameters (a rule made per step,
    as an adapter reading param_groups does) and keeps its state."""
    make, options = ONECYCLE[rule]
    native, groups = run_torch(
        lambda ps, foreach: make(ps), dtype,
        lambda opt: T.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS + 1,
                                              base_momentum=0.8, max_momentum=0.95))
    assert len({group["momentum"] for group in groups}) > STEPS // 2  # momentum really cycles
    params = list(_PARAMS[dtype])
    state, snaps = None, []
    for t, (grads, group) in enumerate(zip(_GRADS[dtype], groups), start=1):
        rule_t = getattr(rules, rule)(learning_rate=group["lr"], momentum=group["momentum"],
                                      **options)
        state = rule_t.init(params) if state is None else state
        updates, state = rule_t.update(grads, state, params)
        params = [np.asarray(p + u) for p, u in zip(params, updates)]
        if t in CHECKPOINTS:
            snaps.append(params)
    assert moved(native) > 1e-2
    assert max_rel_diff(snaps, native) <= TOLERANCE[dtype]


# --------------------------------------------------------------------------
# optax.adadelta's learning_rate=None


def test_optax_adadelta_default_learning_rate_ascends_and_polyopt_does_not():
    # optax.adadelta() skips scale_by_learning_rate: update = +delta.
    rho, eps = 0.9, 1e-6
    tx = optax.adadelta()
    params = [jnp.asarray(p) for p in _PARAMS["float64"]]
    grads = [jnp.asarray(g) for g in _GRADS["float64"][0]]
    native_updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    rule = rules.adadelta(rho=rho, eps=eps)  # polyopt default learning_rate 1.0
    assert rules.adadelta.spec["learning_rate"].default == 1.0
    our_updates, _ = rule.update(_GRADS["float64"][0], rule.init(_PARAMS["float64"]),
                                 _PARAMS["float64"])
    for n, o, g in zip(native_updates, our_updates, _GRADS["float64"][0]):
        n = np.asarray(n)
        assert np.all(n * g >= 0) and np.any(n * g > 0)   # optax: along +g, uphill
        assert np.all(o * g <= 0) and np.any(o * g < 0)   # polyopt: downhill
        np.testing.assert_allclose(o, -n, rtol=1e-14, atol=0)
    # the ascending convention is not reachable: negative rates are refused
    with pytest.raises(ValueError,
                       match=r"adadelta: learning_rate must be .*got learning_rate=-1.0"):
        rules.adadelta(learning_rate=-1.0)


# --------------------------------------------------------------------------


def _table() -> list[tuple[str, str, str, float, float]]:
    rows = []
    keras = _keras_results()
    for framework, table in (("torch.optim", TORCH), ("optax", OPTAX), ("keras", KERAS)):
        for case in table:
            diffs = []
            for dtype in DTYPES:
                if framework == "torch.optim":
                    native = torch_result(case.id, dtype)[0]
                elif framework == "optax":
                    native = optax_result(case.id, dtype)
                else:
                    native = keras[f"{case.id}|{dtype}"]
                diffs.append(max_rel_diff(ours(case, dtype), native))
            call = ", ".join(f"{k}={getattr(v, '__name__', v)!r}".replace("'", "")
                             for k, v in case.options.items())
            rows.append((framework, case.id, f"{case.rule}({call})", *diffs))
    return rows


if __name__ == "__main__":
    print("| native | polyopt | float64 | float32 |\n|---|---|---|---|")
    for framework, native, call, d64, d32 in _table():
        print(f"| {framework} `{native}` | `{call}` | {d64:.1e} | {d32:.1e} |")
    keras = _keras_results()
    for case in KERAS:
        native = keras[f"{case.id}|float64"]
        rounded = polyopt_result(case.rule, tuple(f32(case.options).items()), "float64")
        print(f"keras f64 {case.id}: exact {max_rel_diff(ours(case, 'float64'), native):.1e}, "
              f"float32-rounded hyperparameters {max_rel_diff(rounded, native):.1e}")
