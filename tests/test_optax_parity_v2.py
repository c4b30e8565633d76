"""polyopt.optax against optax's own Lion, side by side, 200 steps, on params that
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
