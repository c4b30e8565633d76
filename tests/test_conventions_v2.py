"""The contract-v2 optimizers that torch has no native of: polyopt.torch against
optax's native, side by side on tests/_v2_problem.py's params (eager and
compiled paths), 200 steps, 1e-10 relative in float64, 1e-5 in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import polyopt.torch as pt
from tests import _v2_problem as problem


def _optax(opt, dtype, zero=False):
    params = [jnp.asarray(p) for p in problem.initial(dtype, zero)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for target in problem.targets(dtype):
        grads = [(p - t) * problem.scale(i) for i, (p, t) in enumerate(zip(params, target))]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(p) for p in params]


def _torch(make, dtype, zero=False):
    params = [torch.nn.Parameter(torch.tensor(p)) for p in problem.initial(dtype, zero)]
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


PATHS = [(False, "float64"), (False, "float32"), (True, "float64"), (True, "float32")]
PATH_IDS = [f"{'compiled' if c else 'eager'}-{d}" for c, d in PATHS]


@pytest.mark.parametrize(("compiled", "dtype"), PATHS, ids=PATH_IDS)
def test_torch_lamb_matches_optax_lamb(compiled, dtype):
    """The vector starts at 0 (trust ratio 1 there); torch's spelling of optax.lamb:
    lr, betas, eps, weight_decay (optax's defaults are polyopt's)."""
    want = _optax(optax.lamb(3e-3, b1=0.95, weight_decay=0.1), dtype, zero=True)
    got, opt = _torch(lambda p: pt.Lamb(p, lr=3e-3, betas=(0.95, 0.999), weight_decay=0.1,
                                        compiled=compiled), dtype, zero=True)
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch Lamb ({path}) vs optax.lamb", got, want, dtype)
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize(("compiled", "dtype"), PATHS, ids=PATH_IDS)
def test_torch_lars_param_groups_match_optax_lars_masks(compiled, dtype):
    """optax's weight_decay_mask and trust_ratio_mask as a torch param group: the
    vector (starting at 0) and the scalar without decay and trust ratio."""
    mask = [True, False, True, False]
    want = _optax(optax.lars(0.5, weight_decay=0.01, nesterov=True, weight_decay_mask=mask,
                             trust_ratio_mask=mask), dtype, zero=True)

    def make(params):
        return pt.Lars([{"params": [params[0], params[2]]},
                        {"params": [params[1], params[3]], "weight_decay": 0.0,
                         "trust_ratio": False}],
                       lr=0.5, weight_decay=0.01, nesterov=True, trust_norm="combined",
                       compiled=compiled)

    got, opt = _torch(make, dtype, zero=True)
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch Lars ({path}) vs optax.lars masks", got, want, dtype)
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"step", "momentum_buffer"}


def test_trust_ratio_rules_declare_per_tensor_math():
    """Capabilities are attributes: per-tensor (not elementwise) with the trust
    ratio, elementwise without it; no layouts either way."""
    from polyopt import rules

    for factory in (rules.lamb, rules.lars):
        assert not factory().elementwise and not factory().uses_layout
        assert factory(trust_ratio=False).elementwise
    assert not pt.Lamb.elementwise(pt.Lamb.spec.defaults())
    assert pt.Lars.elementwise({**pt.Lars.spec.defaults(), "trust_ratio": False})
