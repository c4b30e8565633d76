"""Complex params: polyopt.optax against optax's own optimizers, side by side.

optax runs these optimizers on complex leaves directly: the first moment is
complex, the second moment is |g|^2 (``numerics.abs_sq``), kept in the param's
complex dtype with a zero imaginary part. polyopt's rules compute the same
(``_base.abs_sq``, the real part of the stored statistic) and keep the same
dtypes. Each case runs 8 steps from the same complex params and grads
(complex128 under x64, complex64), comparing the params after every step and
the moments at the end. The polyopt options come from ``polyopt.native.PRESETS``.

Measured (max relative difference of the params over the 8 steps; the same
problem with float64 params in brackets): complex128 0 to 1.7e-15 (2.2e-15),
RAdam 3.2e-14 (2.8e-14: polyopt computes rho_t without optax's cancellation),
Adafactor 5.7e-9 (3.2e-9: optax computes its decay schedule in float32 even
under x64); complex64 up to 2.2e-7.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt import native

CASES = [
    ("optax.sgd", {"learning_rate": 0.1, "momentum": 0.9}),
    ("optax.sgd", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("optax.adam", {"learning_rate": 0.1}),
    ("optax.adam", {"learning_rate": 0.1, "eps_root": 1e-8, "b1": 0.8}),
    ("optax.adamw", {"learning_rate": 0.1, "weight_decay": 0.1}),
    ("optax.amsgrad", {"learning_rate": 0.1}),
    ("optax.adamax", {"learning_rate": 0.1}),
    ("optax.nadam", {"learning_rate": 0.1}),
    ("optax.radam", {"learning_rate": 0.1}),
    ("optax.rmsprop", {"learning_rate": 0.1}),
    ("optax.rmsprop", {"learning_rate": 0.1, "momentum": 0.9, "centered": True}),
    ("optax.adagrad", {"learning_rate": 0.1}),
    ("optax.adafactor", {"learning_rate": 0.1}),
    ("optax.adafactor", {"learning_rate": 0.1, "min_dim_size_to_factor": 2}),
    ("optax.lamb", {"learning_rate": 0.1}),
    ("optax.lars", {"learning_rate": 0.1}),
]
TOLERANCE = {"complex128": 1e-13, "complex64": 1e-6}
ADAFACTOR_COMPLEX128 = 1e-7  # optax's float32 decay schedule, as for float64 params
STEPS = 8


def _polyopt(name: str, kwargs: dict):
    rule, options = native.PRESETS[name]
    factory = getattr(po, rule)
    spelled = {factory.spec[k].spelling("optax"): v for k, v in options.items()}
    return factory(**{**spelled, **kwargs})


def _native(name: str, kwargs: dict):
    module = optax
    for part in name.split(".")[1:]:
        module = getattr(module, part)
    return module(**kwargs)


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)

    def c(*shape):
        return jnp.asarray((rng.standard_normal(shape)
                            + 1j * rng.standard_normal(shape)).astype(dtype))

    params = {"w": c(4, 3), "b": c(3), "s": c()}
    grads = [{"w": c(4, 3), "b": c(3), "s": c()} for _ in range(STEPS)]
    return params, grads


def _run(opt, params, grads):
    state = opt.init(params)
    trail = []
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        trail.append(params)
    return trail, state


def _relative(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in
                                                     enumerate(CASES)])
def test_complex_params_give_optax_numbers(name, kwargs, dtype):
    params, grads = _problem(np.dtype(dtype))
    theirs, their_state = _run(_native(name, kwargs), params, grads)
    ours, our_state = _run(_polyopt(name, kwargs), params, grads)
    tolerance = TOLERANCE[dtype]
    if name == "optax.adafactor" and dtype == "complex128":
        tolerance = ADAFACTOR_COMPLEX128
    worst = 0.0
    for step, (t, o) in enumerate(zip(theirs, ours)):
        for key in t:
            assert o[key].dtype == t[key].dtype == np.dtype(dtype)
            worst = max(worst, _relative(t[key], o[key]))
            assert worst <= tolerance, (step, key, worst)
    # the state: complex leaves shaped like optax's (moments kept complex, as optax)
    their_leaves = [x for x in jax.tree.leaves(their_state) if x.ndim or x.dtype != jnp.int32]
    our_leaves = [x for x in jax.tree.leaves(our_state)
                  if x.ndim or jnp.issubdtype(x.dtype, jnp.complexfloating)]
    complex_dtypes = {str(x.dtype) for x in their_leaves if jnp.iscomplexobj(x)}
    assert complex_dtypes == {dtype}
    assert {str(x.dtype) for x in our_leaves if jnp.iscomplexobj(x)} == {dtype}


def _second_moments(state):
    """(optax's nu, polyopt's second_moment) of an adam state, found by name."""
    def find(tree, name):
        if hasattr(tree, name):
            return getattr(tree, name)
        for child in (tree if isinstance(tree, tuple) else ()):
            found = find(child, name)
            if found is not None:
                return found
        return None
    return find(state, "nu"), find(state, "second_moment")


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
def test_the_second_moment_is_abs_squared_in_a_complex_slot_as_optax_keeps_it(dtype):
    params, grads = _problem(np.dtype(dtype), seed=1)
    _, their_state = _run(optax.adam(0.1), params, grads)
    _, our_state = _run(_polyopt("optax.adam", {"learning_rate": 0.1}), params, grads)
    nu, _ = _second_moments(their_state)
    _, ours = _second_moments(our_state)
    for key in nu:
        assert nu[key].dtype == ours[key].dtype == np.dtype(dtype)
        assert float(jnp.max(jnp.abs(ours[key].imag))) == 0.0
        assert _relative(nu[key], ours[key]) <= TOLERANCE[dtype]


def test_the_optax_alias_problem_converges_with_complex_params():
    """optax's own alias test: the complex parabola, conjugated grads, 10000 steps."""
    final = jnp.array([1.0, -1.0, 1.0], dtype=jnp.complex64) * (1 + 1j)

    def objective(p):
        d = p - final
        return jnp.sum((d.conj() * d).real)

    opt = _polyopt("optax.adam", {"learning_rate": 0.1})

    @jax.jit
    def step(p, s):
        g = jax.grad(objective)(p).conj()
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    params = jnp.array([-1.0, 10.0, 1.0], dtype=jnp.complex64)
    state = opt.init(params)
    for _ in range(3000):
        params, state = step(params, state)
    np.testing.assert_allclose(np.asarray(params), np.asarray(final), atol=3e-2)


@pytest.mark.parametrize("rule", ["adadelta", "lion", "adopt"])
def test_rules_optax_does_not_run_on_complex_params_refuse_them(rule):
    params = {"z": jnp.ones(3, dtype=jnp.complex64)}
    with pytest.raises(TypeError, match=rf"{rule}.init: params\[0\] must have a real floating "
                                        rf"dtype, got complex64: {rule} does not support"):
        getattr(po, rule)(learning_rate=0.1).init(params)


@pytest.mark.parametrize("state_dtype, stored", [("float32", "complex64"),
                                                 ("float64", "complex128")])
def test_mu_dtype_names_the_precision_of_a_complex_state(state_dtype, stored):
    params = {"z": jnp.ones(3, dtype=jnp.complex128)}
    opt = po.adam(0.1, mu_dtype=state_dtype)
    state = opt.init(params)
    assert state.first_moment["z"].dtype == state.second_moment["z"].dtype == np.dtype(stored)
    updates, state = opt.update({"z": jnp.full(3, 1 - 2j, dtype=jnp.complex128)}, state, params)
    assert updates["z"].dtype == np.dtype("complex128")
    assert state.first_moment["z"].dtype == np.dtype(stored)


def test_a_16_bit_mu_dtype_has_no_complex_dtype_and_is_refused():
    params = {"z": jnp.ones(3, dtype=jnp.complex64)}
    with pytest.raises(TypeError, match=r"state_dtype='bfloat16' cannot hold the state of a "
                                        r"complex param"):
        po.adam(0.1, mu_dtype="bfloat16").init(params)
