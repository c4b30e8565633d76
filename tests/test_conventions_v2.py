"""The contract-v2 optimizers that torch has no native of: polyopt.torch against
optax's native, side by side in float64 on tests/_v2_problem.py's params
(eager and compiled paths), 200 steps, 1e-10 relative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import polyopt.torch as pt
from tests import _v2_problem as problem


def _optax(opt, dtype):
    params = [jnp.asarray(p) for p in problem.initial(dtype)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for target in problem.targets(dtype):
        grads = [(p - t) * problem.scale(i) for i, (p, t) in enumerate(zip(params, target))]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


def _torch(make, dtype):
    params = [torch.nn.Parameter(torch.tensor(p)) for p in problem.initial(dtype)]
    opt = make(params)
    for target in problem.targets(dtype):
        for i, (p, t) in enumerate(zip(params, target)):
            p.grad = (p.detach() - torch.tensor(t)) * problem.scale(i)
        opt.step()
    return [p.detach().numpy() for p in params], opt


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_lion_matches_optax_lion(compiled):
    want = _optax(optax.lion(3e-3, b1=0.95, weight_decay=0.1), "float64")
    got, opt = _torch(lambda p: pt.Lion(p, lr=3e-3, betas=(0.95, 0.99), weight_decay=0.1,
                                        compiled=compiled), "float64")
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch Lion ({path}) vs optax.lion", got, want, "float64")
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"step", "momentum_buffer"}
