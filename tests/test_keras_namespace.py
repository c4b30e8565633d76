"""The core rules on the Keras backend's own arrays, eagerly and compiled.

On the TensorFlow backend the rules run through polyopt.keras's own Array API
namespace (TensorFlow has no array_api_compat support), eagerly and inside
``tf.function(jit_compile=True)``; on the JAX and torch backends through
array_api_compat (compiled with jax.jit on JAX). Every case of
tests/registry.py must give numpy's float64 numbers to 1e-12.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import polyopt.keras  # noqa: F401 - registers the TensorFlow namespace
from polyopt import rules
from polyopt._namespace import namespace
from tests.registry import CASES, Case

# apply_if_finite is no registry case (adapters expose it as an option); its
# isfinite/all run here on every backend, with a NaN step in the problem
GUARDED = Case("apply_if_finite", {"max_consecutive_errors": 1}, inner=("adam", {}))

BACKEND = keras.backend.backend()
SHAPES = [(4, 3), (3,), (2, 3, 2), ()]
STEPS = 12


def _problem(dtype="float64", poison=False):
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    if poison:  # a NaN step for apply_if_finite to skip
        grads[3][1][0] = np.nan
    return params, grads


def _numpy_run(rule, poison=False):
    params, grads = _problem(poison=poison)
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return params


def _compile(fn):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    raise AssertionError(f"no compiled runs on {BACKEND}")


def _backend_run(rule, compiled: bool, poison=False):
    params, grads = _problem(poison=poison)
    params = [keras.ops.convert_to_tensor(p) for p in params]
    state = rule.init(params)

    def step(params, state, grads):
        updates, state = rule.update(grads, state, params)
        return [p + u for p, u in zip(params, updates)], state

    step = _compile(step) if compiled else step
    for g in grads:
        params, state = step(params, state, [keras.ops.convert_to_tensor(a) for a in g])
    return [keras.ops.convert_to_numpy(p) for p in params]


# Compiled: every case under XLA on TensorFlow (the namespace is ours); on JAX a
# few (tests/test_jax_rules_jit.py runs every rule under jax.jit already); torch
# eager only (torch.compile of every case would dominate the test time).
_COMPILED = {"tensorflow": CASES + [GUARDED], "jax": CASES[:: len(CASES) // 4] + [GUARDED],
             "torch": []}[BACKEND]
RUNS = [(c, False) for c in CASES + [GUARDED]] + [(c, True) for c in _COMPILED]


@pytest.mark.parametrize(("case", "compiled"), RUNS,
                         ids=[f"{c}-{'compiled' if j else 'eager'}" for c, j in RUNS])
def test_rule_on_backend_arrays_matches_numpy(case, compiled):
    poison = case is GUARDED
    reference = _numpy_run(case.build(), poison)
    got = _backend_run(case.build(), compiled, poison)
    # Muon's 'spectral' norm under XLA: its SVD (not LAPACK's) gives the largest
    # singular value a few ulps otherwise, which five quintics carry: measured 2.2e-11
    # (tensorflow, compiled)
    rtol = 1e-10 if compiled and case.options.get("preconditioning") == "spectral" else 1e-12
    for r, g in zip(reference, got):
        assert g.dtype == np.float64
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-15)


def test_float32_stays_float32_and_learning_rate_tensor():
    rule = rules.adam(learning_rate=keras.ops.convert_to_tensor(np.float64(0.1)))
    p = [keras.ops.convert_to_tensor(np.ones(3, dtype=np.float32))]
    updates, state = rule.update(p, rule.init(p), p)
    assert keras.ops.convert_to_numpy(updates[0]).dtype == np.float32
    assert keras.ops.convert_to_numpy(state.second_moment[0]).dtype == np.float32
    np.testing.assert_allclose(keras.ops.convert_to_numpy(updates[0]), -0.1, rtol=1e-6)


def test_the_backend_arrays_get_the_expected_namespace():
    xp = namespace(keras.ops.convert_to_tensor(np.zeros(2)))
    if BACKEND == "tensorflow":
        from polyopt.keras import _tf_namespace

        assert xp is _tf_namespace.namespace
    else:
        assert xp.__name__.startswith(("array_api_compat", "jax"))


if BACKEND == "tensorflow":
    import tensorflow as tf

    from polyopt.keras import _tf_namespace

    XP = _tf_namespace.namespace

    def test_tf_namespace_has_exactly_the_core_subset():
        assert _tf_namespace.NAMES == rules.ARRAY_API_SUBSET
        assert set(vars(XP)) - {"__name__"} == set(rules.ARRAY_API_SUBSET)

    def test_tf_namespace_functions_follow_the_array_api():
        x = tf.constant([[1.0, -2.0], [3.0, 4.0]], dtype=tf.float64)
        np.testing.assert_array_equal(XP.mean(x, axis=(0,), keepdims=True), [[2.0, 1.0]])
        assert XP.sum(x).numpy() == 6.0
        assert XP.asarray(0.1, dtype=XP.astype(x, tf.float64).dtype).numpy() == 0.1  # exact
        assert XP.asarray(0.1).dtype == tf.float32
        assert XP.full_like(x, 0.1).numpy()[0, 0] == 0.1
        assert XP.zeros((), dtype=XP.int32).dtype == tf.int32
        assert XP.ones((2,)).dtype == tf.float32
        np.testing.assert_array_equal(XP.where(x > 0, x, 0.0), [[1.0, 0.0], [3.0, 4.0]])
        np.testing.assert_array_equal(XP.maximum(x, 0.0), [[1.0, 0.0], [3.0, 4.0]])
        np.testing.assert_array_equal(XP.minimum(x, 0.0), [[0.0, -2.0], [0.0, 0.0]])
        assert XP.pow(x, 2.0).numpy()[0, 1] == 4.0
        assert XP.floor(tf.constant(2.5)).numpy() == 2.0
        assert XP.abs(x).numpy()[0, 1] == 2.0
        assert XP.expm1(tf.constant(1e-20, tf.float64)).numpy() == 1e-20
        assert XP.cos(tf.constant(0.0)).numpy() == 1.0
        assert XP.sqrt(tf.constant(4.0)).numpy() == 2.0
        np.testing.assert_array_equal(XP.isfinite(tf.constant([1.0, np.inf, np.nan])),
                                      [True, False, False])
        assert XP.all(XP.isfinite(x)).numpy() and not XP.all(x > 0).numpy()
        assert XP.isdtype(tf.float64, "real floating") and not XP.isdtype(tf.int32, "real floating")
        assert XP.isdtype(tf.int32, "integral") and XP.isdtype(tf.float32, ("integral", "numeric"))
        assert XP.result_type(tf.constant(1.0), x) == tf.float64
        assert XP.astype(tf.constant(3), XP.float32).dtype == tf.float32
        with pytest.raises(TypeError, match="no Array API promotion"):
            XP.result_type(tf.constant(1), tf.constant(1.0))
        with pytest.raises(ValueError, match="unknown kind"):
            XP.isdtype(tf.float32, "real")
        copied = XP.asarray(tf.Variable([1.0]), copy=True)
        assert isinstance(copied, tf.Tensor)

    def test_tf_namespace_under_xla():
        @tf.function(jit_compile=True)
        def f(x):
            m = XP.mean(x, axis=(1,), keepdims=True)
            return XP.where(x > m, XP.sqrt(XP.abs(x)), XP.full_like(x, 0.5)) + XP.sum(x)

        x = tf.constant([[1.0, 4.0], [9.0, 16.0]], dtype=tf.float64)
        np.testing.assert_allclose(f(x).numpy(), [[30.5, 32.0], [30.5, 34.0]])
