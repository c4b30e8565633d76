"""polyopt.optax against the real optax transforms, side by side inside jax.jit.

Each case runs both optimizers for 200 steps on the same small nested-dict
pytree (a tanh regression, the gradient taken at each optimizer's own
params) in one jitted ``lax.scan``, and compares the params after every
step: float64 (x64) max relative difference <= 1e-10, float32 <= 1e-5. The
polyopt options come from ``polyopt.native.PRESETS`` (``optax.*``); the
numbers printed (``pytest -s``) are the parity table of docs/optax.md.

Schedules: polyopt's one-cycle (optax convention), cosine and exponential
decay give optax's schedule functions' values at every step of a full cycle
(on optax's int32 count, jitted), and drive an optimizer to the same params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt import native, schedules

STEPS = 200
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def preset(key: str, **options: Any) -> dict:
    name, base = native.PRESETS[key]
    return {**base, **options}


def _problem(dtype: str):
    """Params (a nested dict with four leaves) and a smooth loss, one minibatch
    of fixed data per step.

    With one full batch instead, the gradient becomes deterministic and the
    problem ill-conditioned for RMSprop (steps ~ lr * sign(g)): optax against
    itself, started from params scaled by 1 + 1e-14, ends 2e-2 apart after 200
    steps at lr 0.003 (float64), and centered RMSprop's v - mean(g)^2 cancels
    (float32: 1e-4 apart from a one-ulp change). With minibatches both stay
    at rounding level (3e-14 float64, 1.5e-6 float32)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, 8, 5)).astype(dtype)
    y = np.sin(x @ rng.normal(size=5)).astype(dtype)
    params = {
        "hidden": {"kernel": rng.normal(size=(5, 4)).astype(dtype) * 0.5,
                   "bias": np.full(4, 0.1, dtype)},
        "out": {"kernel": rng.normal(size=(4,)).astype(dtype)},
        "offset": np.asarray(0.3, dtype),
    }

    def loss(p, batch):
        xb, yb = batch
        h = jnp.tanh(xb @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] + p["offset"] - yb) ** 2)

    return jax.tree.map(jnp.asarray, params), loss, (jnp.asarray(x), jnp.asarray(y))


def _fast(params):
    return params.fast if isinstance(params, optax.LookaheadParams) else params


def _trajectory(opt, params, loss, batches):
    """Params after each of STEPS updates (gradient at the fast params), jitted."""

    def body(carry, batch):
        p, s = carry
        grads = jax.grad(loss)(_fast(p), batch)
        updates, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    @jax.jit
    def run(p, batches):
        return jax.lax.scan(body, (p, opt.init(p)), batches)[1]

    return run(params, batches)


def max_rel_diff(ours, theirs) -> float:
    """max over steps and leaves of |a - b| / (the leaf's largest |b| over the run),
    b from optax: relative to each leaf's size, so that a scalar leaf passing
    near 0 does not turn a rounding difference into a large ratio."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape and a.shape[0] == STEPS
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


@dataclasses.dataclass(frozen=True)
class Parity:
    id: str
    ours: Callable[[], Any]
    native: Callable[[], Any]
    lookahead: bool = False


_SAM_RHO = 0.05

CASES = [
    Parity("sgd", lambda: po.sgd(**preset("optax.sgd", learning_rate=0.05)),
           lambda: optax.sgd(0.05)),
    Parity("sgd momentum", lambda: po.sgd(**preset("optax.sgd", learning_rate=0.05,
                                                   momentum=0.9)),
           lambda: optax.sgd(0.05, momentum=0.9)),
    Parity("sgd nesterov", lambda: po.sgd(**preset("optax.sgd", learning_rate=0.05,
                                                   momentum=0.9, nesterov=True)),
           lambda: optax.sgd(0.05, momentum=0.9, nesterov=True)),
    Parity("adagrad", lambda: po.adagrad(**preset("optax.adagrad", learning_rate=0.1)),
           lambda: optax.adagrad(0.1)),
    Parity("rmsprop", lambda: po.rmsprop(**preset("optax.rmsprop", learning_rate=0.01)),
           lambda: optax.rmsprop(0.01)),
    Parity("rmsprop centered", lambda: po.rmsprop(**preset("optax.rmsprop", learning_rate=0.01,
                                                           centered=True)),
           lambda: optax.rmsprop(0.01, centered=True)),
    Parity("rmsprop eps_in_sqrt=False",
           lambda: po.rmsprop(**preset("optax.rmsprop", learning_rate=0.01,
                                       eps_placement="outside")),
           lambda: optax.rmsprop(0.01, eps_in_sqrt=False)),
    Parity("adadelta lr=0.5", lambda: po.adadelta(**preset("optax.adadelta", learning_rate=0.5)),
           lambda: optax.adadelta(0.5)),
    Parity("adam", lambda: po.adam(**preset("optax.adam", learning_rate=0.01)),
           lambda: optax.adam(0.01)),
    Parity("adam eps_root", lambda: po.adam(**preset("optax.adam", learning_rate=0.01,
                                                     eps_root=1e-8)),
           lambda: optax.adam(0.01, eps_root=1e-8)),
    Parity("adamw", lambda: po.adamw(**preset("optax.adamw", learning_rate=0.01,
                                              weight_decay=0.05)),
           lambda: optax.adamw(0.01, weight_decay=0.05)),
    Parity("amsgrad", lambda: po.adam(**preset("optax.amsgrad", learning_rate=0.01)),
           lambda: optax.amsgrad(0.01)),
    Parity("adamax", lambda: po.adamax(**preset("optax.adamax", learning_rate=0.01)),
           lambda: optax.adamax(0.01)),
    Parity("nadam", lambda: po.nadam(**preset("optax.nadam", learning_rate=0.01)),
           lambda: optax.nadam(0.01)),
    Parity("radam", lambda: po.radam(**preset("optax.radam", learning_rate=0.01)),
           lambda: optax.radam(0.01)),
    Parity("lookahead(adam)",
           lambda: po.lookahead(po.adam(**preset("optax.adam", learning_rate=0.02)),
                                sync_period=5, slow_step_size=0.5),
           lambda: optax.lookahead(optax.adam(0.02), sync_period=5, slow_step_size=0.5),
           lookahead=True),
    Parity("contrib.sam(sgd momentum)",
           lambda: po.sam(po.sgd(**preset("optax.sgd", learning_rate=0.05, momentum=0.9)),
                          rho=_SAM_RHO, eps=0.0),
           lambda: optax.contrib.sam(optax.sgd(0.05, momentum=0.9),
                                     optax.chain(optax.contrib.normalize(),
                                                 optax.sgd(_SAM_RHO)))),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_optax_for_200_jitted_steps(case, dtype):
    params, loss, batches = _problem(dtype)
    if case.lookahead:
        params = optax.LookaheadParams.init_synced(params)
    ours = _trajectory(case.ours(), params, loss, batches)
    theirs = _trajectory(case.native(), params, loss, batches)
    for leaf in jax.tree.leaves(ours):
        assert leaf.dtype == jnp.dtype(dtype)
    worst = max_rel_diff(ours, theirs)
    print(f"\nPARITY | {case.id} | {dtype} | {worst:.2g}")
    assert worst <= TOLERANCE[dtype]
    # not vacuous: the params moved well beyond the tolerance
    moved = max_rel_diff(jax.tree.map(lambda p: jnp.broadcast_to(p, (STEPS, *p.shape)), params),
                         theirs)
    assert moved > 1e-2


# --------------------------------------------------------------------------
# schedules


SCHEDULES = [
    ("one_cycle cos", lambda: schedules.one_cycle(100, 0.1, convention="optax"),
     lambda: optax.cosine_onecycle_schedule(100, 0.1)),
    ("one_cycle cos pct_start=.25 div=10",
     lambda: schedules.one_cycle(100, 0.1, pct_start=0.25, div_factor=10.0,
                                 final_div_factor=100.0, convention="optax"),
     lambda: optax.cosine_onecycle_schedule(100, 0.1, pct_start=0.25, div_factor=10.0,
                                            final_div_factor=100.0)),
    ("one_cycle linear three-phase",
     lambda: schedules.one_cycle(100, 0.1, anneal="linear", three_phase=True,
                                 convention="optax"),
     lambda: optax.linear_onecycle_schedule(100, 0.1)),
    ("cosine_decay", lambda: schedules.cosine_decay(0.1, 100, alpha=0.05),
     lambda: optax.cosine_decay_schedule(0.1, 100, alpha=0.05)),
    ("cosine_decay exponent=2", lambda: schedules.cosine_decay(0.1, 100, exponent=2.0),
     lambda: optax.cosine_decay_schedule(0.1, 100, exponent=2.0)),
    ("exponential_decay", lambda: schedules.exponential_decay(0.1, 10, 0.8),
     lambda: optax.exponential_decay(0.1, 10, 0.8)),
    ("exponential_decay staircase begin end",
     lambda: schedules.exponential_decay(0.1, 10, 0.5, transition_begin=20, staircase=True,
                                         end_value=0.01),
     lambda: optax.exponential_decay(0.1, 10, 0.5, transition_begin=20, staircase=True,
                                     end_value=0.01)),
]


@pytest.mark.parametrize("name, ours, theirs", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_schedule_values_match_optax_at_every_step(name, ours, theirs):
    """Exact on int64 counts; on int32 counts (optax's own optimizer count) optax
    computes in float32 (exponential_decay even returns float32 under x64), so
    the two agree to float32 rounding only: polyopt keeps float64."""
    for count_dtype, tolerance in ((jnp.int64, 1e-13), (jnp.int32, 1e-6)):
        counts = jnp.arange(120, dtype=count_dtype)  # the full cycle and beyond
        got = np.asarray(jax.jit(jax.vmap(ours()))(counts), np.float64)
        want = np.asarray(jax.jit(jax.vmap(theirs()))(counts), np.float64)
        difference = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        print(f"\nSCHEDULE | {name} | {np.dtype(count_dtype).name} counts | {difference:.2g}")
        assert difference <= tolerance
        assert np.ptp(want) > 1e-3  # the schedule does change over the cycle


@pytest.mark.parametrize("name, ours, theirs", SCHEDULES[::3], ids=[s[0] for s in SCHEDULES[::3]])
def test_schedule_as_learning_rate_matches_optax(name, ours, theirs):
    """A schedule (optax's or polyopt's) as learning_rate is evaluated at the
    counts optax uses: the same params as optax with that schedule."""
    params, loss, batches = _problem("float64")
    for schedule in (theirs(), ours()):  # a polyopt Schedule is a plain callable: optax takes it
        worst = max_rel_diff(_trajectory(po.adam(learning_rate=schedule), params, loss, batches),
                             _trajectory(optax.adam(schedule), params, loss, batches))
        print(f"\nSCHEDULED | {name} | {type(schedule).__name__} | {worst:.2g}")
        assert worst <= 1e-10
