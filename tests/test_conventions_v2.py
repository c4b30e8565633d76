"""The contract-v2 optimizers in torch: polyopt.torch against torch.optim's
native where there is one (Adafactor), else optax's, side by side on
tests/_v2_problem.py's params (eager and compiled paths), 200 steps, float64
1e-10 and float32 1e-5 relative."""

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


def _optax(opt, dtype, zero=False, with_state=False):
    params = [jnp.asarray(p) for p in problem.initial(dtype, zero)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for target in problem.targets(dtype):
        grads = [(p - t) * problem.scale(i) for i, (p, t) in enumerate(zip(params, target))]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    final = [np.asarray(p) for p in params]
    return (final, params, state) if with_state else final


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


ADAFACTOR_CASES = [
    ("defaults", {}, {}),
    ("lr=0.05 weight_decay=0.1", {"lr": 0.05, "weight_decay": 0.1},
     {"lr": 0.05, "weight_decay": 0.1}),
    # torch's maximize steps along +grad: polyopt minimizes everywhere, so the
    # polyopt side gets the negated gradient (the negated loss)
    ("eps=(1e-20, 1e-2) d=2 beta2_decay=-0.6 maximize",
     {"eps": (1e-20, 1e-2), "d": 2.0, "beta2_decay": -0.6, "maximize": True},
     {"eps": (1e-20, 1e-2), "d": 2.0, "beta2_decay": -0.6}),
]


def _torch_signed(make, dtype, sign):
    params = [torch.nn.Parameter(torch.tensor(p)) for p in problem.initial(dtype)]
    opt = make(params)
    for target in problem.targets(dtype):
        for i, (p, t) in enumerate(zip(params, target)):
            p.grad = (p.detach() - torch.tensor(t)) * (sign * problem.scale(i))
        opt.step()
    return [p.detach().numpy() for p in params], opt


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_torch_adafactor_matches_torch_optim(case, compiled, dtype):
    label, native_args, ours = case
    sign = -1.0 if native_args.get("maximize") else 1.0
    want, _ = _torch_signed(lambda p: torch.optim.Adafactor(p, **native_args), dtype, sign)
    got, opt = _torch_signed(lambda p: pt.preset("torch.optim.Adafactor", p, **ours,
                                                 compiled=compiled), dtype, 1.0)
    path = "compiled" if compiled else "eager"
    problem.assert_parity(f"torch Adafactor {label} ({path}) vs torch.optim.Adafactor", got,
                          want, dtype)
    # torch's state keys; a factored matrix keeps a row and a column vector
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "step": (), "row_var": (160,), "col_var": (128,), "variance": (0,)}


def test_torch_adafactor_factors_by_layout_as_optax_does_in_flax_layout():
    """The default factoring (rows: output axes, columns: reduction axes) gives the
    same numbers for torch's (out, in) / (out, in, kh, kw) params as for
    polyopt.optax's on their transposes in Flax's (in, out) / (kh, kw, in, out)."""
    dtype = "float64"
    got, _ = _torch_signed(lambda p: pt.Adafactor(p, lr=0.05, weight_decay=0.1), dtype, 1.0)
    perms = [(1, 0), (0,), (2, 3, 1, 0), ()]
    import polyopt.optax as po

    opt = po.adafactor(0.05, weight_decay_rate=0.1)
    params = [jnp.asarray(np.transpose(p, perm)) for p, perm in zip(problem.initial(dtype), perms)]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for target in problem.targets(dtype):
        grads = [(p - np.transpose(t, perm)) * problem.scale(i)
                 for i, (p, t, perm) in enumerate(zip(params, target, perms))]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    flax = [np.transpose(np.asarray(p), np.argsort(perm)) for p, perm in zip(params, perms)]
    problem.assert_parity("torch Adafactor (out, in) vs optax (in, out), factoring='layout'",
                          got, flax, dtype)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_adafactor_state_of_a_matrix_is_two_vectors(compiled):
    """A (1024, 1024) float32 weight: 8 KiB of statistics in the state_dict, as
    torch.optim.Adafactor's (1024, 1) and (1, 1024); not a 4 MiB matrix."""
    def state_bytes(opt):
        state = opt.state_dict()["state"][0]
        return {k: v.numel() * v.element_size() for k, v in state.items()}

    sizes = {}
    for name, make in (("polyopt", lambda p: pt.Adafactor(p, compiled=compiled)),
                       ("torch", lambda p: torch.optim.Adafactor(p))):
        weight = torch.nn.Parameter(torch.zeros(1024, 1024))
        opt = make([weight])
        weight.grad = torch.ones(1024, 1024)
        opt.step()
        sizes[name] = state_bytes(opt)
    assert sizes["polyopt"] == {"step": 4, "row_var": 4096, "col_var": 4096, "variance": 0}
    assert sizes["torch"] == {"step": 4, "row_var": 4096, "col_var": 4096}


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
