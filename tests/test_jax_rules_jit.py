"""Every rule traces and compiles under jax.jit, with hyperparameters passed in as
traced 0-d arrays (what optax.inject_hyperparams does), and gives the eager numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyopt import hyper, rules
from tests.registry import CASES

SHAPES = [(4, 3), (3,), ()]
STEPS = 8


def _problem():
    rng = np.random.default_rng(3)
    return ([rng.normal(size=s) for s in SHAPES],
            [[rng.normal(size=s) for s in SHAPES] for _ in range(STEPS)])


def _eager(case):
    params, grads = _problem()
    rule = case.build()
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return params


@pytest.mark.parametrize("case", [c for c in CASES if c.inner is None], ids=str)
def test_rule_under_jit_with_traced_hyperparameters(case):
    spec = hyper.spec(case.rule)
    options = {**spec.defaults(), **case.options}
    runtime = {h.name: options[h.name] for h in spec if h.runtime}

    @jax.jit
    def step(params, state, grads, hyperparameters):
        rule = getattr(rules, case.rule)(**{**case.options, **hyperparameters})
        updates, state = rule.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    params0, grads = _problem()
    params = [jnp.asarray(p) for p in params0]
    hyperparameters = {k: jnp.asarray(float(v)) for k, v in runtime.items()}
    # init with Python numbers, update with traced arrays: rules whose state
    # depends on momentum being 0 (sgd, rmsprop) must start their buffers
    state = case.build().init(params)
    for g in grads:
        params, state = step(params, state, [jnp.asarray(x) for x in g], hyperparameters)
    for got, expected in zip(params, _eager(case)):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-15)


def test_changing_a_traced_learning_rate_does_not_recompile():
    traces = []

    @jax.jit
    def step(params, state, grads, learning_rate):
        traces.append(1)
        rule = rules.adam(learning_rate=learning_rate)
        updates, state = rule.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    params = [jnp.ones(3)]
    state = rules.adam().init(params)
    for lr in (0.1, 0.01, 0.001):
        params, state = step(params, state, [jnp.ones(3)], jnp.asarray(lr))
    assert len(traces) == 1


@pytest.mark.parametrize("inner", ["radam", "ranger"])
def test_lookahead_compiled_with_donated_state_copies_nothing(inner):
    """Lookahead writes the slow weights and the params in place: XLA copies no param
    and no slow weight first (the formulation before issue 18 read s and the inner
    update in both outputs' loops, and XLA copied both arrays of every param: 25
    passes over the params per step for Ranger instead of 21; 18 since the test
    below)."""
    shapes = [(16, 8, 3, 3), (32, 16), (16,)]
    rule = (rules.ranger() if inner == "ranger"
            else rules.lookahead(rules.radam(), sync_period=6, slow_step_size=0.5))
    params = [jnp.full(s, 0.5, jnp.float32) for s in shapes]
    grads = [jnp.full(s, 1e-3, jnp.float32) for s in shapes]

    def step(params, state, grads):
        updates, state = rule.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, rule.init(params), grads).compile().as_text()
    copied = [line.strip() for line in compiled.splitlines()
              if " copy(" in line and any(f"f32[{','.join(map(str, s))}]" in line
                                          for s in shapes)]
    assert copied == []
    # the step still ran the lookahead: the slow weights are outputs the program writes
    assert compiled.count("select") > 0


def test_ranger_compiled_keeps_one_temporary_per_param_and_the_same_numbers():
    """Lookahead's two loops (slow weights, params) both read the inner update. Over
    plain RAdam (and in rules.ranger() by default), XLA keeps RAdam's two quotients
    (m / (1 - b1^t) and sqrt(1 - b2^t) / (sqrt(v) + eps)) in two temporaries per
    param; ``ranger(read_twice=True)`` divides RAdam's direction by a runtime 1, so
    XLA keeps that one quotient instead: half the temporary memory, 18 passes over
    the params per step instead of 21. The compiled numbers are the same bit for bit
    (8 steps, one synchronisation)."""
    shapes = [(16, 8, 3, 3), (32, 16), (16,)]
    param_bytes = 4 * sum(int(np.prod(s)) for s in shapes)
    radam = {h.name: hyper.RANGER[h.name].default for h in hyper.RADAM}
    plain = rules.lookahead(rules.chain(rules.centralize(), rules.radam(**radam)),
                            sync_period=6, slow_step_size=0.5)
    rng = np.random.default_rng(0)
    start = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    results = []
    for rule in (rules.ranger(read_twice=True), rules.ranger(), plain):
        def step(params, state, grads, rule=rule):
            updates, state = rule.update(grads, state, params)
            return [p + u for p, u in zip(params, updates)], state

        compiled = jax.jit(step, donate_argnums=(0, 1))
        params, state = [p + 0 for p in start], rule.init(start)
        temporary = compiled.lower(params, state, params).compile().memory_analysis()
        results.append((temporary.temp_size_in_bytes, []))
        for i in range(8):
            params, state = compiled(params, state, [jnp.cos(p * (i + 1)) for p in params])
        results[-1][1].extend(np.asarray(a) for a in [*params, *state.slow])
    (once_temp, once_values), (default_temp, default_values), (plain_temp, plain_values) = (
        results)
    assert once_temp <= 1.25 * param_bytes < 2 * param_bytes <= min(default_temp, plain_temp)
    assert all(np.array_equal(a, b) for a, b in zip(once_values, plain_values))
    assert all(np.array_equal(a, b) for a, b in zip(default_values, plain_values))
    with pytest.raises(TypeError, match=r"ranger: read_twice must be True or False, "
                                        r"got read_twice=1"):
        rules.ranger(read_twice=1)
