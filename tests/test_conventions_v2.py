"""The contract-v2 optimizers that torch has no native of: polyopt.torch against
optax's native, side by side in float64 on tests/_v2_problem.py's params
(eager and compiled paths), 200 steps, 1e-10 relative."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import polyopt.torch as pt
from tests import _v2_problem as problem


def _optax(opt, dtype, with_state=False):
    params = [jnp.asarray(p) for p in problem.initial(dtype)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for target in problem.targets(dtype):
        grads = [(p - t) * problem.scale(i) for i, (p, t) in enumerate(zip(params, target))]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    final = [np.asarray(p) for p in params]
    return (final, params, state) if with_state else final


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


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_adopt_matches_optax_adopt(compiled):
    want = _optax(optax.contrib.adopt(3e-3, b1=0.8, nesterov=True), "float64")
    got, opt = _torch(lambda p: pt.ADOPT(p, lr=3e-3, betas=(0.8, 0.9999), nesterov=True,
                                         compiled=compiled), "float64")
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch ADOPT ({path}) vs optax.contrib.adopt", got, want, "float64")
    assert set(opt.state[opt.param_groups[0]["params"][0]]) == {"step", "exp_avg", "exp_avg_sq"}


# optax.contrib.schedule_free_adamw's warmup schedule computes in float32 (see
# tests/test_optax_parity_v2.py): values float32 holds exactly keep it exact.
SF_OPTIONS = {"learning_rate": 2.0 ** -8, "warmup_steps": 8, "b1": 0.95, "weight_decay": 0.05}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_schedule_free_matches_optax_at_train_and_eval_points(compiled):
    want, want_tree, want_state = _optax(
        optax.contrib.schedule_free_adamw(**SF_OPTIONS), "float64", with_state=True)
    want_x = [np.asarray(x) for x in
              optax.contrib.schedule_free_eval_params(want_state, want_tree)]
    got, opt = _torch(lambda p: pt.ScheduleFreeAdamW(
        p, lr=SF_OPTIONS["learning_rate"], betas=(0.95, 0.999), warmup_steps=8,
        warmup_lag=True, weight_decay=0.05, compiled=compiled), "float64")
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch ScheduleFreeAdamW ({path}) vs optax (train point y)",
                          got, want, "float64")
    params = opt.param_groups[0]["params"]
    opt.eval()
    got_x = [p.detach().numpy().copy() for p in params]
    problem.assert_parity(f"torch ScheduleFreeAdamW ({path}) vs optax (eval point x)",
                          got_x, want_x, "float64")
    assert problem.max_rel(want_x, want) > 1e-3
    opt.train()
    assert problem.max_rel([p.detach().numpy() for p in params], got) <= 1e-14
    assert set(opt.state[params[0]]) == {"step", "z", "exp_avg_sq", "b1", "weight_sum", "max_lr"}


def _sf_step(opt, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.step()


def test_schedule_free_eval_train_modes_and_state_dict_round_trip():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = pt.ScheduleFreeAdamW(params, lr=0.05)
    assert opt.param_groups[0]["train_mode"] is True
    opt.eval()  # before any step: nothing to move (x = y = z)
    opt.train()
    for seed in range(5):
        _sf_step(opt, params, seed)
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    assert not torch.allclose(x[0], y[0])
    opt.eval()  # idempotent
    assert all(torch.equal(p, xi) for p, xi in zip(params, x))
    with pytest.raises(RuntimeError, match=r"group 0 is in eval mode .* optimizer\.train\(\)"):
        _sf_step(opt, params, 99)
    assert all(torch.equal(p, xi) for p, xi in zip(params, x))  # nothing changed
    # a checkpoint taken in eval mode: the params are x and the optimizer says so
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["train_mode"] is False
    opt.train()
    for p, yi in zip(params, y):
        torch.testing.assert_close(p.detach(), yi, rtol=1e-14, atol=1e-14)
    _sf_step(opt, params, 5)
    expected = [p.detach().clone() for p in params]

    fresh = [torch.nn.Parameter(s.clone()) for s in saved_params]
    other = pt.ScheduleFreeAdamW(fresh, lr=0.05)
    other.load_state_dict(saved)
    assert other.param_groups[0]["train_mode"] is False
    with pytest.raises(RuntimeError, match="eval mode"):
        _sf_step(other, fresh, 5)
    other.train()
    _sf_step(other, fresh, 5)
    for p, e in zip(fresh, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-13)

    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["train_mode"] = "yes"
    with pytest.raises(TypeError, match="train_mode must be True or False, got train_mode='yes'"):
        other.load_state_dict(bad)
    assert other.param_groups[0]["train_mode"] is True
