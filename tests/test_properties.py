"""Property tests (hypothesis): random shapes, dtypes and hyperparameters.

For every case of the registry:

- the same rule gives the same numbers in every array namespace under test;
- a zero gradient with zero weight decay leaves the params exactly unchanged;
- finite gradients over 35 orders of magnitude give finite updates and state.

tests/test_rules_namespaces.py checks the registry's fixed problems; these
tests search the space around them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyopt import hyper
from tests.registry import CASES, Case

SAM_CASES = [
    Case("sam", {"rho": 0.05}, inner=("sgd", {"learning_rate": 0.05, "momentum": 0.9})),
    Case("sam", {"rho": 0.1, "adaptive": True}, inner=("adam", {})),
]
GUARDED = [Case("apply_if_finite", {}, inner=("rmsprop", {"centered": True, "momentum": 0.5}))]
ALL = CASES + SAM_CASES + GUARDED

SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)

# Ranges for the hyperparameters a case already uses; kept inside every
# rule's allowed range (Schedule-Free's b1 is > 0).
_DRAWN = {
    "learning_rate": st.floats(1e-4, 0.5),
    "b1": st.floats(0.01, 0.99),
    "b2": st.floats(0.5, 0.9999),
    "eps": st.floats(1e-10, 1e-3),
    "decay": st.floats(0.5, 0.999),
    "rho": st.floats(0.5, 0.99),
}


def _with_drawn(case: Case, data: st.DataObject) -> Case:
    """The case with its real hyperparameters redrawn (the inner rule's for wrappers)."""
    name, options = case.inner if case.inner else (case.rule, case.options)
    spec = hyper.spec(name)
    options = dict(options)
    for key, strategy in _DRAWN.items():
        if key in spec and not (key == "rho" and name == "sam"):
            options[key] = data.draw(strategy, label=f"{name}.{key}")
    if case.inner:
        return dataclasses.replace(case, inner=(name, options))
    return dataclasses.replace(case, options=options)


def _without_decay(case: Case) -> Case:
    """The case with weight decay off (the inner rule's for wrappers)."""
    name, options = case.inner if case.inner else (case.rule, case.options)
    for h in hyper.spec(name):  # weight_decay, and Muon's adam_weight_decay
        if h.name.endswith("weight_decay"):
            options = {**options, h.name: 0.0}
    if case.inner:
        return dataclasses.replace(case, inner=(name, options))
    return dataclasses.replace(case, options=options)


def _run(rule, params, grads):
    """Run the rule over the grads (SAM: perturb, then update); final params, state."""
    state = rule.init(params)
    for g in grads:
        if hasattr(rule, "perturb"):
            perturbed = rule.perturb(params, g)
            assert len(perturbed) == len(params)
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return params, state


def _leaves(tree) -> list:
    """The arrays of a state (NamedTuples and lists, nested for wrappers)."""
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _problem(shape_list, seed, dtype, scale=1.0, steps=4):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(dtype) for s in shape_list]
    grads = [[(scale * rng.normal(size=s)).astype(dtype) for s in shape_list]
             for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("case", ALL, ids=str)
@SETTINGS
@given(shape_list=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "float64"]),
       data=st.data())
def test_same_numbers_in_every_namespace(case, array_namespaces, to_namespace, to_numpy,
                                         shape_list, seed, dtype, data):
    case = _with_drawn(case, data)
    params, grads = _problem(shape_list, seed, dtype)
    reference, _ = _run(case.build(), params, grads)
    rtol = 1e-11 if dtype == "float64" else 2e-5
    for name in array_namespaces:
        got, state = _run(case.build(), [to_namespace(name, p) for p in params],
                          [[to_namespace(name, a) for a in g] for g in grads])
        for r, g, p in zip(reference, got, params):
            g = to_numpy(g)
            assert g.dtype == np.dtype(dtype), (name, g.dtype)
            # relative to the size of the step taken, so tiny moves are judged fairly
            scale = max(float(np.max(np.abs(r - p), initial=0.0)), 1e-30)
            np.testing.assert_allclose(g, r, rtol=0, atol=rtol * scale + 1e-300, err_msg=name)


@pytest.mark.parametrize("case", ALL, ids=str)
@SETTINGS
@given(shape_list=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "float64"]),
       data=st.data())
def test_zero_gradient_without_decay_leaves_params_unchanged(case, shape_list, seed, dtype, data):
    case = _without_decay(_with_drawn(case, data))
    params, grads = _problem(shape_list, seed, dtype, scale=0.0, steps=7)
    got, _ = _run(case.build(), params, grads)
    for g, p in zip(got, params):
        np.testing.assert_array_equal(g, p)


@pytest.mark.parametrize("case", ALL, ids=str)
@SETTINGS
@given(shape_list=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "float64"]),
       log_scale=st.floats(-20.0, 15.0), data=st.data())
def test_finite_gradients_give_finite_updates(case, shape_list, seed, dtype, log_scale, data):
    case = _with_drawn(case, data)
    params, grads = _problem(shape_list, seed, dtype, scale=10.0 ** log_scale, steps=5)
    got, state = _run(case.build(), params, grads)
    for g in got:
        assert np.all(np.isfinite(g)), (case, log_scale)
    for leaf in _leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf))), (case, log_scale)
