"""polyopt.optax against optax's own Lion and Adafactor, side by side, 200 steps, on params that
exercise per-tensor rules (tests/_v2_problem.py: a 160x128 matrix, a vector, a
4-D conv kernel, a scalar). float64 (x64) max relative difference <= 1e-10,
float32 <= 1e-5. The polyopt options come from ``polyopt.native.PRESETS``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt import native
from tests import _v2_problem as problem

CASES = [
    ("optax.lion", lambda: po.lion(**{**native.PRESETS["optax.lion"][1],
                                      "learning_rate": 3e-3}),
     lambda: optax.lion(3e-3)),
    ("optax.lion b1=0.95 weight_decay=0.1",
     lambda: po.lion(**{**native.PRESETS["optax.lion"][1], "learning_rate": 3e-3, "b1": 0.95,
                        "weight_decay": 0.1}),
     lambda: optax.lion(3e-3, b1=0.95, weight_decay=0.1)),
]


def _run(opt, dtype):
    params = {str(i): jnp.asarray(p) for i, p in enumerate(problem.initial(dtype))}
    targets = jnp.asarray(np.stack([np.concatenate([t.reshape(-1) for t in step])
                                    for step in problem.targets(dtype)]))
    sizes = [int(np.prod(s)) for s in problem.SHAPES]

    def body(carry, target):
        p, s = carry
        parts = jnp.split(target, np.cumsum(sizes)[:-1])
        grads = {k: (p[k] - parts[i].reshape(problem.SHAPES[i])) * problem.scale(i)
                 for i, k in enumerate(sorted(p, key=int))}
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), targets))(params)
    return [np.asarray(params[str(i)]) for i in range(len(problem.SHAPES))]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_optax_for_200_steps(case, dtype):
    _, ours, theirs = case
    problem.assert_parity(case[0], _run(ours(), dtype), _run(theirs(), dtype), dtype)


def test_lion_state_is_one_moment_and_mu_dtype_is_optax_spelling():
    params = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    state = po.lion(1e-3, mu_dtype=jnp.bfloat16).init(params)
    # the momentum in bfloat16 and the count
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 1024 * 1024 * 2 + 4
    native_state = optax.lion(1e-3, mu_dtype=jnp.bfloat16).init(params)
    assert native_state[0].mu["w"].dtype == state.momentum["w"].dtype


def _adafactor(**options):
    return po.adafactor(**{**native.PRESETS["optax.adafactor"][1], **options})


ADAFACTOR_CASES = [
    ("optax.adafactor", lambda dtype: _adafactor(learning_rate=1e-2),
     lambda dtype: optax.adafactor(1e-2)),
    # optax's momentum accumulator is float32 by default (dtype_momentum); float64
    # runs give it float64 (polyopt keeps it in the params' dtype, or state_dtype)
    ("optax.adafactor momentum=0.9 weight_decay_rate=0.01",
     lambda dtype: _adafactor(learning_rate=1e-2, momentum=0.9, weight_decay_rate=0.01),
     lambda dtype: optax.adafactor(1e-2, momentum=0.9, weight_decay_rate=0.01,
                                   dtype_momentum=jnp.dtype(dtype))),
    # the conv kernel factored too (its two largest axes, 16 and 8), no clipping, no
    # parameter scale. (decay_offset is not compared: from a fresh state optax's
    # t = count - offset + 1 <= 0 makes its statistics NaN for good.)
    ("optax.adafactor min_dim_size_to_factor=8 no clipping no scale decay_rate=0.7",
     lambda dtype: _adafactor(learning_rate=1e-2, min_dim_size_to_factor=8,
                              clipping_threshold=None, multiply_by_parameter_scale=False,
                              beta2_decay=-0.7),
     lambda dtype: optax.adafactor(1e-2, min_dim_size_to_factor=8, clipping_threshold=None,
                                   multiply_by_parameter_scale=False, decay_rate=0.7)),
    ("optax.adafactor factored=False eps=1e-20",
     lambda dtype: _adafactor(learning_rate=1e-2, factoring="none", eps=1e-20),
     lambda dtype: optax.adafactor(1e-2, factored=False, eps=1e-20)),
]

#: optax.adafactor computes its decay schedule 1 - t^-decay_rate in float32
#: (optax/_src/factorized.py, _decay_rate_pow: t = jnp.array(i + 1, jnp.float32)),
#: also in float64 runs. Measured after 200 steps: 2.3e-8, 1.1e-8, 1.4e-7,
#: 2.3e-8 for the four cases; the same transformations with that schedule in
#: float64 (test_adafactor_float64_differs_only_by_optax_float32_schedule) agree
#: to 3.4e-16 .. 8.2e-16.
OPTAX_FLOAT32_SCHEDULE = 5e-7


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_adafactor_matches_optax_for_200_steps(case, dtype):
    label, ours, theirs = case
    got, want = _run(ours(dtype), dtype), _run(theirs(dtype), dtype)
    if dtype == "float32":
        problem.assert_parity(label, got, want, dtype)
        return
    worst = problem.max_rel(got, want)
    print(f"\nPARITY {label} | float64 (optax's float32 schedule) | {worst:.2g}")
    assert 1e-10 < worst <= OPTAX_FLOAT32_SCHEDULE
    assert problem.max_rel(problem.initial(dtype), want) > 1e-2


def _float64_schedule(i, exponent=0.8):
    return 1.0 - jnp.asarray(i + 1, jnp.float64) ** (-exponent)


@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_adafactor_float64_differs_only_by_optax_float32_schedule(case, monkeypatch):
    """optax.adafactor with its decay schedule evaluated in float64 (its
    ``decay_rate_fn`` default replaced; everything else optax's): 1e-10."""
    from optax._src import factorized

    defaults = factorized.scale_by_factored_rms.__defaults__
    assert defaults[-1] is factorized._decay_rate_pow
    monkeypatch.setattr(factorized.scale_by_factored_rms, "__defaults__",
                        (*defaults[:-1], _float64_schedule))
    label, ours, theirs = case
    problem.assert_parity(f"{label} (float64 schedule)", _run(ours("float64"), "float64"),
                          _run(theirs("float64"), "float64"), "float64")


def test_adafactor_state_is_two_vectors_for_a_matrix():
    params = {"w": jnp.zeros((1024, 1024), jnp.float32), "b": jnp.zeros((1024,), jnp.float32)}
    state = po.adafactor(1e-2).init(params)
    # v_row and v_col of w, v of b, the (0,)-shaped placeholders, the int32 count
    assert state.v_row["w"].shape == (1024,) and state.v_col["w"].shape == (1024,)
    assert state.v["w"].shape == (0,) and state.v["b"].shape == (1024,)
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 8192 + 4096 + 4
    only_w = po.adafactor(1e-2).init({"w": params["w"]})
    assert sum(x.nbytes for x in jax.tree.leaves(only_w)) - 4 == 8 * 1024  # 8 KiB
    native_state = optax.adafactor(1e-2).init({"w": params["w"]})
    native_bytes = sum(x.nbytes for x in jax.tree.leaves(native_state))
    assert native_bytes < 9 * 1024  # optax's: the same vectors and (1,) placeholders
