"""A learning rate that changes every step does not retrace the compiled step (issue 8).

The step runs compiled the way each backend's trainer runs it: TensorFlow
``tf.function`` (plain and ``jit_compile=True``) around ``apply_gradients``;
JAX ``jax.jit`` around ``stateless_apply``; torch eagerly (nothing is traced,
so only the numbers are checked). The learning rate changes every step by
assignment (``optimizer.learning_rate = ...``, what Keras callbacks do), by a
Keras ``LearningRateSchedule`` and by a ``polyopt.schedules`` schedule; the
step is traced once and every step uses that step's rate.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt import hyper, schedules

BACKEND = keras.backend.backend()
MODES = {"tensorflow": ["tf.function", "jit_compile"], "jax": ["jax.jit"],
         "torch": ["eager"]}[BACKEND]
RATES = [0.1, 0.05, 0.2, 0.01, 0.3]


def _compiled_step(opt, variables, grads, mode):
    """(step(), traces): one optimizer step as the backend's trainer compiles it, and a
    list that grows by one each time the step is traced."""
    traces = []
    if mode in ("tf.function", "jit_compile"):
        import tensorflow as tf

        def apply():
            traces.append(1)
            opt.apply_gradients(zip(grads, variables))

        return tf.function(apply, jit_compile=mode == "jit_compile"), traces
    if mode == "jax.jit":
        import jax

        @jax.jit
        def apply(optimizer_values, trainable_values):
            traces.append(1)
            return opt.stateless_apply(optimizer_values, grads, trainable_values)

        def step():
            new_trainable, new_optimizer = apply([v.value for v in opt.variables],
                                                 [v.value for v in variables])
            for v, value in zip(variables, new_trainable):
                v.assign(value)
            for v, value in zip(opt.variables, new_optimizer):
                v.assign(value)

        return step, traces
    return (lambda: opt.apply_gradients(zip(grads, variables))), traces


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["assigned", "keras schedule", "polyopt schedule"])
def test_changing_learning_rate_traces_the_step_once(how, mode):
    if how == "assigned":
        learning_rate, rates = RATES[0], RATES
    elif how == "keras schedule":
        learning_rate = keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.5)
        rates = [0.1 * 0.5 ** t for t in range(len(RATES))]
    else:
        learning_rate = schedules.exponential_decay(0.1, 1, 0.5)
        rates = [0.1 * 0.5 ** t for t in range(len(RATES))]
    opt = pk.SGD(learning_rate=learning_rate)
    variables = [keras.Variable(np.zeros((3, 2), np.float32)),
                 keras.Variable(np.zeros(2, np.float32))]
    opt.build(variables)
    grads = [keras.ops.ones((3, 2)), keras.ops.ones((2,))]
    step, traces = _compiled_step(opt, variables, grads, mode)
    for t, rate in enumerate(rates):
        if how == "assigned":
            opt.learning_rate = rate
        step()
        for v in variables:  # plain SGD, gradient 1: params = -(sum of the rates so far)
            np.testing.assert_allclose(keras.ops.convert_to_numpy(v), -sum(rates[:t + 1]),
                                       rtol=1e-6)
    assert len(traces) == (0 if mode == "eager" else 1), f"{mode} traced {len(traces)} times"


@pytest.mark.parametrize("mode", MODES)
def test_ranger_compiled_gives_the_numbers_of_lookahead_over_radam(mode):
    """polyopt.keras.Ranger asks for RAdam's direction once (rules.ranger's
    ``read_twice``, where XLA compiles the step): compiled, without gradient
    centralization, it gives the numbers of Lookahead over RAdam with Ranger's
    defaults bit for bit (8 steps, one synchronisation), and under ``jit_compile``
    XLA runs one loop fewer per kernel (m, v, the direction, the slow weights, the
    params: RAdam's two quotients are not kept apart)."""
    radam = {h.spelling("keras"): hyper.RANGER[h.name].default for h in hyper.RADAM}
    results, loops = [], []
    for opt in (pk.Ranger(learning_rate=0.01, gradient_centralization=False),
                pk.Lookahead(pk.RAdam(**{**radam, "learning_rate": 0.01}))):
        rng = np.random.default_rng(0)
        variables = [keras.Variable(rng.normal(size=(3, 3, 2, 4)).astype(np.float32)),
                     keras.Variable(rng.normal(size=4).astype(np.float32))]
        opt.build(variables)
        grads = [keras.ops.convert_to_tensor(rng.normal(size=s).astype(np.float32))
                 for s in ((3, 3, 2, 4), (4,))]
        step, _ = _compiled_step(opt, variables, grads, mode)
        for _ in range(8):
            step()
        results.append([keras.ops.convert_to_numpy(v) for v in [*variables, *opt.variables]])
        if mode == "jit_compile":
            program = step.experimental_get_compiler_ir()(stage="optimized_hlo")
            entry = program[program.index("\nENTRY"):]
            loops.append(sum(" fusion(" in line and "= f32[3,3,2,4]" in line
                             for line in entry.splitlines()))
    assert len(results[0]) == len(results[1])
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    if mode == "jit_compile":
        assert loops == [5, 6]
