"""Bad input: clear errors at construction, clear errors at update, nothing changed."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from polyopt import hyper, rules
from tests.registry import CASES, ERRORS, WRAPPERS, ErrorCase


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_bad_hyperparameter_raises_at_construction(case: ErrorCase):
    with pytest.raises(case.exception, match=case.match):
        case.build()


def test_error_catalogue_covers_every_rule():
    covered = {e.rule for e in ERRORS}
    assert covered >= set(hyper.SPECS), sorted(set(hyper.SPECS) - covered)


@pytest.mark.parametrize("name", sorted(hyper.SPECS))
def test_every_hyperparameter_rejects_a_wrong_type(name):
    """Each argument of each spec rejects a value of the wrong type, naming itself."""
    spec = hyper.SPECS[name]
    inner = [rules.sgd()] if name in WRAPPERS else []
    factory = getattr(rules, name)
    for h in spec:
        bad = object()
        with pytest.raises(TypeError, match=rf"{name}: {h.name} must be .* got {h.name}="):
            factory(*inner, **{h.name: bad})


@pytest.mark.parametrize("name", sorted(hyper.SPECS))
def test_every_real_hyperparameter_rejects_nan(name):
    spec = hyper.SPECS[name]
    inner = [rules.sgd()] if name in WRAPPERS else []
    factory = getattr(rules, name)
    for h in spec:
        if h.kind != "real":
            continue
        with pytest.raises(ValueError, match=rf"{h.name}=nan"):
            factory(*inner, **{h.name: float("nan")})


@pytest.mark.parametrize("name", sorted(hyper.SPECS))
def test_factory_signature_defaults_come_from_the_spec(name):
    spec = hyper.SPECS[name]
    sig = inspect.signature(getattr(rules, name))
    for h in spec:
        assert sig.parameters[h.name].default == h.default, (name, h.name)


def test_spelling_in_framework_messages():
    with pytest.raises(ValueError, match=r"adam: betas\[0\] must be a number in \[0, 1\), "
                                         r"got betas\[0\]=1.0"):
        hyper.ADAM.validate({"b1": 1.0}, framework="torch")
    with pytest.raises(ValueError, match=r"adam: beta_2 must .* got beta_2=2"):
        hyper.ADAM.validate({"b2": 2}, framework="keras")
    with pytest.raises(ValueError, match=r"rmsprop: alpha must"):
        hyper.RMSPROP.validate({"decay": 1.0}, framework="torch")


def test_zero_d_array_hyperparameters_are_accepted_and_checked():
    rules.adam(learning_rate=np.asarray(0.01), b1=np.asarray(0.9))
    with pytest.raises(ValueError, match=r"learning_rate must be a scalar .* shape \(2,\)"):
        rules.adam(learning_rate=np.asarray([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"b1="):
        rules.adam(b1=np.asarray(1.0))
    with pytest.raises(TypeError, match=r"dtype complex128"):
        rules.adam(learning_rate=np.asarray(0.1 + 0j))


def test_unknown_argument_is_named():
    with pytest.raises(TypeError, match=r"adam: .*betas"):
        rules.adam(betas=(0.9, 0.999))


# ---------------------------------------------------------------- at update


def _setup(case):
    rule = case.build()
    params = [np.ones((3, 2)), np.full(4, 2.0)]
    state = rule.init(params)
    grads = [np.full((3, 2), 0.5), np.full(4, -1.0)]
    updates, state = rule.update(grads, state, params)  # one good step
    return rule, params, grads, state


def _snapshot(tree):
    if isinstance(tree, (list, tuple)):
        return [_snapshot(t) for t in tree]
    if hasattr(tree, "shape"):
        return np.array(tree, copy=True)
    return tree


def _assert_same(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


BAD_UPDATES = [
    ("count", lambda g, p: ([g[0]], p), r"got 1 grads for 2 params"),
    ("shape", lambda g, p: ([g[0], np.ones(5)], p),
     r"grads\[1\] has shape \(5,\) but params\[1\] has shape \(4,\)"),
    ("dtype", lambda g, p: ([g[0], g[1].astype(np.float32)], p),
     r"grads\[1\] has dtype float32 but params\[1\] has dtype float64"),
    ("not-a-list", lambda g, p: (g[0], p), r"grads must be a list of arrays"),
    ("empty", lambda g, p: ([], []), r"grads must not be empty"),
]


@pytest.mark.parametrize("bad", BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_bad_update_raises_and_changes_nothing(case, bad):
    rule, params, grads, state = _setup(case)
    before_state, before_params = _snapshot(list(state)), _snapshot(params)
    bad_grads, bad_params = bad[1](grads, params)
    with pytest.raises((ValueError, TypeError), match=bad[2]):
        rule.update(bad_grads, state, bad_params)
    _assert_same(_snapshot(list(state)), before_state)
    _assert_same(_snapshot(params), before_params)


def test_mixed_namespaces_are_refused():
    array_api_strict = pytest.importorskip("array_api_strict")
    rule = rules.adam()
    params = [np.ones(2), np.ones(3)]
    state = rule.init(params)
    with pytest.raises(TypeError, match=r"one array library"):
        rule.update([np.ones(2), array_api_strict.ones(3, dtype=array_api_strict.float64)],
                    state, params)


def test_state_from_other_params_is_refused():
    rule = rules.adam()
    state = rule.init([np.ones(2), np.ones(3)])
    with pytest.raises(ValueError, match=r"state holds 2 arrays per slot for 1 params"):
        rule.update([np.ones(2)], state, [np.ones(2)])
    state = rule.init([np.ones(2)])
    with pytest.raises(ValueError, match=r"state for params\[0\] has shape \(2,\)"):
        rule.update([np.ones(5)], state, [np.ones(5)])


def test_state_of_another_rule_is_refused():
    params = [np.ones(2)]
    with pytest.raises(TypeError, match=r"adam.update: state must be a AdamState"):
        rules.adam().update(params, rules.sgd().init(params), params)


@pytest.mark.parametrize("bad, match", [
    ([], r"params must not be empty"),
    ("abc", r"params must be a list of arrays"),
    ([np.ones(2, dtype=np.int64)],
     r"params\[0\] must have a real or complex floating dtype, got int64"),
])
def test_bad_params_at_init(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rules.adam().init(bad)


@pytest.mark.parametrize("name", ["adadelta", "lion", "adopt", "schedule_free_adamw"])
def test_complex_params_are_refused_by_rules_optax_does_not_run_on_them(name):
    """optax's alias tests skip complex params for adadelta and lion (its adopt
    fails on them): these rules refuse them at init, naming the param."""
    params = [np.ones(2), np.ones(2, dtype=np.complex128)]
    with pytest.raises(TypeError, match=rf"{name}.init: params\[1\] must have a real floating "
                                        rf"dtype, got complex128: {name} does not support "
                                        r"complex parameters"):
        getattr(rules, name)().init(params)


def test_messages_name_value_and_range():
    """The message form is '<rule>: <arg> must be <allowed>, got <arg>=<value>'."""
    with pytest.raises(ValueError) as info:
        rules.rmsprop(momentum=3.0)
    assert re.fullmatch(r"rmsprop: momentum must be a number in \[0, 1\], got momentum=3.0",
                        str(info.value))


def test_describe_lists_every_argument_with_its_native_spellings():
    table = hyper.describe("adam").splitlines()
    assert len(table) == 2 + len(hyper.ADAM.hypers)
    row = next(line for line in table if line.startswith("| `b1` |"))
    assert "`0.9`" in row and "`betas[0]`" in row and "`beta_1`" in row and "`b1` |" in row
    row = next(line for line in table if line.startswith("| `eps` |"))
    assert "`epsilon`" in row
    with pytest.raises(KeyError, match="no rule named 'adamm'"):
        hyper.describe("adamm")
