"""Lookahead, Ranger and SAM in polyopt.torch against independent references.

- Lookahead(base, k, alpha) against the published algorithm, written here:
  every k fast steps slow += alpha * (fast - slow); fast = slow; with a
  torch.optim base and a polyopt base.
- Ranger against Lookahead(torch.optim.RAdam) fed gradients centralized
  here (lessw2020's Ranger), float64.
- SAM against a few-line transcription of davda54/sam, on a small MLP.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import polyopt.torch as pt
from tests.test_torch_parity import GRADS, PARAMS, max_rel_diff


def make_params(dtype=torch.float64):
    return [torch.tensor(p, dtype=dtype, requires_grad=True) for p in PARAMS]


def set_grads(params, t):
    for p, g in zip(params, GRADS[t]):
        p.grad = torch.tensor(g, dtype=p.dtype)


def numpy(params):
    return [p.detach().numpy().copy() for p in params]


# --------------------------------------------------------------------------
# Lookahead


def reference_lookahead(make_base, k, alpha, steps, centralize=False):
    """Zhang et al. 2019, Algorithm 1: the fast weights run the base optimizer;
    every k steps slow <- slow + alpha (fast - slow) and fast <- slow."""
    fast = make_params()
    base = make_base(fast)
    slow = [p.detach().clone() for p in fast]
    for t in range(steps):
        set_grads(fast, t)
        if centralize:  # lessw2020's gradient centralization of every grad with ndim > 1
            for p in fast:
                if p.grad.ndim > 1:
                    p.grad -= p.grad.mean(dim=tuple(range(1, p.grad.ndim)), keepdim=True)
        base.step()
        if (t + 1) % k == 0:
            with torch.no_grad():
                for f, s in zip(fast, slow):
                    s += alpha * (f - s)
                    f.copy_(s)
    return numpy(fast)


def run(make_opt, steps):
    params = make_params()
    opt = make_opt(params)
    for t in range(steps):
        set_grads(params, t)
        opt.step()
    return numpy(params), opt


@pytest.mark.parametrize("base", ["torch.optim.SGD", "polyopt.torch.SGD", "torch.optim.Adam"])
def test_lookahead_is_the_published_algorithm(base):
    def make_base(params):
        kw = {"lr": 0.05, "momentum": 0.9} if "SGD" in base else {"lr": 0.01}
        if base.startswith("polyopt"):
            return pt.preset("torch.optim.SGD", params, **kw)
        return getattr(torch.optim, base.split(".")[-1])(params, **kw)

    expected = reference_lookahead(make_base, k=5, alpha=0.6, steps=103)
    ours, opt = run(lambda ps: pt.Lookahead(make_base(ps), k=5, alpha=0.6), 103)
    assert max_rel_diff(ours, expected) <= 1e-12
    assert max_rel_diff(expected, PARAMS) > 1e-2
    # without the synchronisation the result would be far away
    plain, _ = run(make_base, 103)
    assert max_rel_diff(plain, expected) > 1e-3
    assert int(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 103


@pytest.mark.parametrize("base", [lambda ps: torch.optim.Adam(ps, lr=0.01),
                                  lambda ps: pt.Adam(ps, lr=0.01, amsgrad=True)],
                         ids=["torch.optim.Adam", "polyopt.torch.Adam"])
def test_lookahead_state_dict_resume_is_bitwise_identical(base):
    params = make_params()
    opt = pt.Lookahead(base(params), k=4)
    for t in range(10):
        set_grads(params, t)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    for t in range(10, 30):
        set_grads(params, t)
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer)
    # Lookahead's state beside the base optimizer's, where torch.distributed.checkpoint keeps it
    assert {"lookahead_step", "lookahead_slow_buffer", "exp_avg"} <= set(saved["opt"]["state"][0])
    assert saved["opt"]["param_groups"][0]["lookahead_k"] == 4
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = pt.Lookahead(base(resumed), k=7)
    opt2.load_state_dict(saved["opt"])
    assert opt2.k == 4
    # the base's load replaced its group dicts: the wrapper shares the new ones
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for t in range(10, 30):
        set_grads(resumed, t)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


def test_lookahead_shares_param_groups_with_its_base():
    params = make_params()
    base = torch.optim.SGD(params[:2], lr=0.1, momentum=0.9)
    opt = pt.Lookahead(base)
    assert opt.param_groups is base.param_groups and opt.defaults is base.defaults
    opt.add_param_group({"params": params[2:], "lr": 0.01})
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    assert len(base.param_groups) == 2
    for t in range(5):
        set_grads(params, t)
        opt.step()
        sched.step()
    assert base.param_groups[0]["momentum"] != 0.9  # OneCycleLR cycles the base's momentum


def test_lookahead_errors():
    params = make_params()
    with pytest.raises(ValueError, match=r"lookahead: k must be an integer in \[1, inf\)"):
        pt.Lookahead(torch.optim.SGD(params, lr=0.1), k=0)
    with pytest.raises(ValueError, match=r"alpha=1.5"):
        pt.Lookahead(torch.optim.SGD(params, lr=0.1), alpha=1.5)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        pt.Lookahead(params)
    opt = pt.Lookahead(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="have no 'lookahead_k' and 'lookahead_alpha'"):
        opt.load_state_dict(torch.optim.SGD(params, lr=0.1).state_dict())


# --------------------------------------------------------------------------
# Ranger


@pytest.mark.parametrize("gc", [False, True], ids=["no-gc", "gc"])
def test_ranger_is_lookahead_over_torch_radam(gc):
    expected = reference_lookahead(
        lambda ps: torch.optim.RAdam(ps, lr=0.01, betas=(0.95, 0.999), eps=1e-5),
        k=6, alpha=0.5, steps=200, centralize=gc)
    ours, opt = run(lambda ps: pt.Ranger(ps, lr=0.01, gradient_centralization=gc), 200)
    assert max_rel_diff(ours, expected) <= 1e-10
    assert max_rel_diff(expected, PARAMS) > 1e-2
    keys = set(opt.state[opt.param_groups[0]["params"][0]])
    assert keys == {"step", "slow_buffer", "exp_avg", "exp_avg_sq", "radam_step"} | (
        {"gc_step"} if gc else set())


def test_ranger_gradient_centralization_matters():
    with_gc, _ = run(lambda ps: pt.Ranger(ps, lr=0.01), 50)
    without, _ = run(lambda ps: pt.Ranger(ps, lr=0.01, gradient_centralization=False), 50)
    assert max_rel_diff(with_gc, without) > 1e-4


# --------------------------------------------------------------------------
# SAM


class Davda54SAM(torch.optim.Optimizer):
    """davda54/sam (sam.py), transcribed: the reference."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()


def _problem():
    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model.double(), x, y


def train_sam(make, steps=20, drive="closure"):
    model, x, y = _problem()
    opt = make(model.parameters())

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(steps):
        if drive == "closure":
            losses.append(float(opt.step(closure).detach()))
        else:  # davda54's loop
            opt.zero_grad()
            losses.append(float(closure().detach()))
            opt.first_step()
            opt.zero_grad()
            closure()
            opt.second_step()
    return [p.detach().numpy().copy() for p in model.parameters()], losses


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", ["torch.optim.SGD", "polyopt.torch.SGD"])
def test_sam_matches_davda54(base, adaptive):
    kw = {"lr": 0.1, "momentum": 0.9}
    expected, ref_losses = train_sam(
        lambda ps: Davda54SAM(ps, torch.optim.SGD, rho=0.1, adaptive=adaptive, **kw),
        drive="manual")
    base_cls = torch.optim.SGD if base == "torch.optim.SGD" else pt.SGD

    def make(ps):
        return pt.SAM(ps, base_cls, rho=0.1, adaptive=adaptive, **kw)

    ours, losses = train_sam(make, drive="closure")
    assert max_rel_diff(ours, expected) <= 1e-12
    assert np.allclose(losses, ref_losses, rtol=1e-12, atol=0)
    assert losses[-1] < 0.5 * losses[0]
    ours_manual, _ = train_sam(make, drive="manual")
    assert max_rel_diff(ours_manual, expected) <= 1e-12
    plain, _ = train_sam(lambda ps: torch.optim.SGD(ps, **kw))  # SAM is not plain SGD
    assert max_rel_diff(plain, expected) > 1e-4


def test_sam_state_dict_holds_the_base_state():
    model, x, y = _problem()
    opt = pt.SAM(model.parameters(), pt.Adam, rho=0.2, lr=0.01)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["sam"] == {"rho": 0.2, "adaptive": False} and "exp_avg" in sd["state"][0]
    other = pt.SAM(_problem()[0].parameters(), pt.Adam, lr=0.01)
    other.load_state_dict(sd)
    assert other.param_groups is other.base_optimizer.param_groups
    assert other.state is other.base_optimizer.state  # SAM keeps no per-param state
    assert other.rho == 0.2 and float(other.base_optimizer.state_dict()["state"][0]["step"]) == 3


def test_sam_errors():
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=r"sam: rho must be a number in \[0, inf\), got rho=-1"):
        pt.SAM(model.parameters(), torch.optim.SGD, rho=-1, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer must be a torch optimizer class"):
        pt.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    opt = pt.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_wrappers_deepcopy_and_pickle():
    import pickle

    params = make_params()
    opt = pt.Lookahead(pt.Adam(params, lr=0.01), k=3)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.k == 3 and clone.param_groups is clone.base_optimizer.param_groups
        ps = clone.param_groups[0]["params"]
        set_grads(ps, 4)
        clone.step()
        assert int(clone.state[ps[0]]["step"]) == 5
        assert int(clone.base_optimizer.state[ps[0]]["step"]) == 5
    model, _, _ = _problem()
    sam = copy.deepcopy(pt.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1))
    assert sam.rho == 0.3 and sam.param_groups is sam.base_optimizer.param_groups


# --------------------------------------------------------------------------
# torch.distributed.checkpoint's optimizer state dicts (one process; the
# distributed settings are in tests/test_torch_distributed.py)


@pytest.mark.parametrize("wrap", ["Lookahead", "SkipNonFinite", "SAM"])
def test_wrappers_through_get_and_set_optimizer_state_dict(wrap):
    """get_optimizer_state_dict keeps only 'state' and 'param_groups': the
    wrappers' own state is in them, and it steps no optimizer that has state
    (it runs a zero-gradient step of one whose ``state`` is empty: SAM and
    SkipNonFinite show their base's). SAM's users pass its base optimizer to
    set_optimizer_state_dict, which steps a fresh optimizer without closure."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def make(model):
        if wrap == "SAM":
            return pt.SAM(model.parameters(), pt.Adam, lr=0.01)
        return getattr(pt, wrap)(pt.Adam(model.parameters(), lr=0.01),
                                 **({"k": 2} if wrap == "Lookahead" else {}))

    def train(model, opt, steps):
        for _ in range(steps):
            def closure():
                loss = model(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum()
                loss.backward()
                return loss
            if wrap == "SAM":
                opt.step(closure)
            else:
                opt.zero_grad()
                closure()
                opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = make(model)
    train(model, opt, 3)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert float(saved["state"]["weight"]["step"]) == 3  # no extra step
    resumed_model = copy.deepcopy(model)
    resumed = make(resumed_model)
    set_optimizer_state_dict(resumed_model, resumed.base_optimizer if wrap == "SAM" else resumed,
                             saved)
    if wrap == "Lookahead":
        assert {"lookahead_step", "lookahead_slow_buffer"} <= set(saved["state"]["weight"])
        assert resumed.k == 2 and int(resumed.state[resumed_model.weight]["step"]) == 3
    if wrap == "SkipNonFinite":
        assert saved["param_groups"][0]["skip_nonfinite_count"] == 3
        assert int(resumed._counters.count) == 3
    train(model, opt, 3)
    train(resumed_model, resumed, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
