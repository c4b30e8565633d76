"""Complex params in the core: the rules optax runs on complex leaves, written once
against the Array API, on numpy and under array_api_strict (and torch and jax
when they are under test). Parity with optax and torch.optim themselves:
tests/test_optax_complex.py and tests/test_torch_complex.py."""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import rules

COMPLEX_RULES = [
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("adam", {"learning_rate": 0.1, "amsgrad": True, "amsgrad_form": "corrected"}),
    ("adamw", {"learning_rate": 0.1}),
    ("adamax", {"learning_rate": 0.1}),
    ("nadam", {"learning_rate": 0.1}),
    ("radam", {"learning_rate": 0.1, "amsgrad": True}),
    ("rmsprop", {"learning_rate": 0.1, "centered": True, "momentum": 0.9}),
    ("adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.1}),
    ("adafactor", {"learning_rate": 0.1, "momentum": 0.9}),
    ("lamb", {"learning_rate": 0.1, "weight_decay": 0.01}),
    ("lars", {"learning_rate": 0.1, "weight_decay": 0.01}),
    ("muon", {"learning_rate": 0.1, "momentum_form": "ema_debiased", "adaptive": True,
              "weight_decay": 0.01, "adam_learning_rate": 0.1}),
    ("muon", {"learning_rate": 0.1, "preconditioning": "spectral", "nesterov": False}),
    ("muon", {"learning_rate": 0.1, "preconditioning": "aol", "state_dtype": "float32"}),
]


def _problem(seed=0):
    rng = np.random.default_rng(seed)

    def c(*shape):
        return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)

    return [c(4, 3), c(3), np.ones(2)], [[c(4, 3), c(3), rng.standard_normal(2)]
                                         for _ in range(4)]


def _run(rule, xp_name, to_namespace, to_numpy):
    params, grads = _problem()
    params = [to_namespace(xp_name, p) for p in params]
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update([to_namespace(xp_name, x) for x in g], state, params)
        params = [p + u for p, u in zip(params, updates)]
    return [to_numpy(p) for p in params], state


@pytest.mark.parametrize("name, options", COMPLEX_RULES, ids=[n for n, _ in COMPLEX_RULES])
def test_complex_rules_give_the_same_numbers_in_every_namespace(name, options, array_namespaces,
                                                                to_namespace, to_numpy):
    rule = getattr(rules, name)(**options)
    reference, state = _run(rule, "numpy", to_namespace, to_numpy)
    assert [p.dtype for p in reference] == [np.complex128, np.complex128, np.float64]
    for xp_name in array_namespaces:
        got, _ = _run(rule, xp_name, to_namespace, to_numpy)
        for r, g in zip(reference, got):
            np.testing.assert_allclose(g, r, rtol=1e-13, atol=1e-15, err_msg=xp_name)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "adafactor"])
def test_real_statistics_of_complex_params_are_kept_complex_with_zero_imaginary_parts(name):
    """optax keeps |g|^2 in the param's complex dtype; so does every slot here."""
    rule = getattr(rules, name)(learning_rate=0.1)
    params, grads = _problem(1)
    state = rule.init(params)
    for g in grads:
        _, state = rule.update(g, state, params)
    field = {"adam": "second_moment", "rmsprop": "mean_square", "adagrad": "sum_of_squares",
             "adafactor": "v_row"}[name]
    arrays = getattr(state, field)
    assert [a.dtype for a in arrays] == [np.complex128, np.complex128, np.float64]
    for a in arrays[:2]:
        assert np.all(a.imag == 0) and np.all(a.real >= 0)


def test_abs_squared_gives_the_real_rule_its_numbers_when_the_imaginary_parts_are_zero():
    """A complex param with zero imaginary parts steps as the real param does."""
    for name, options in COMPLEX_RULES:
        rule = getattr(rules, name)(**options)
        real = [np.linspace(-1.0, 2.0, 12).reshape(4, 3)]
        grads = [np.linspace(0.5, -0.7, 12).reshape(4, 3)]
        ur, _ = rule.update(grads, rule.init(real), real)
        cplx = [real[0].astype(np.complex128)]
        uc, _ = rule.update([grads[0].astype(np.complex128)], rule.init(cplx), cplx)
        # Muon's matrix products: complex BLAS (zgemm) rounds otherwise than real (dgemm),
        # and Newton-Schulz's five quintics carry it: measured 1.2e-13
        rtol = 1e-12 if name == "muon" else 1e-14
        np.testing.assert_allclose(uc[0].real, ur[0], rtol=rtol, atol=1e-17, err_msg=name)
        assert np.all(uc[0].imag == 0), name


def test_a_16_bit_state_dtype_cannot_hold_a_complex_state():
    with pytest.raises(TypeError, match=r"state_dtype='float16' cannot hold the state of a "
                                        r"complex param \(dtype complex128\)"):
        rules.adam(state_dtype="float16").init([np.ones(2, dtype=np.complex128)])


def test_a_real_state_dtype_names_the_precision_of_a_complex_state():
    rule = rules.adam(learning_rate=0.1, state_dtype="float32")
    params = [np.ones(2, dtype=np.complex128)]
    state = rule.init(params)
    assert state.first_moment[0].dtype == state.second_moment[0].dtype == np.complex64
    updates, state = rule.update([np.full(2, 1 - 2j)], state, params)
    assert updates[0].dtype == np.complex128 and state.second_moment[0].dtype == np.complex64
