"""polyopt.torch follows the torch.optim.Optimizer protocol.

Signatures and defaults from the spec; per-group hyperparameters and
add_param_group; params without a gradient skipped; state_dict in torch's
format (loadable by torch.optim.Adam itself) and a bitwise-identical resume;
load_state_dict and constructor errors that name what is wrong and change
nothing; GradScaler (skipped steps on inf); float16/bfloat16 params with
float32 state.
"""

from __future__ import annotations

import copy
import inspect
import io
import subprocess
import sys

import numpy as np
import pytest
import torch

import polyopt.torch as pt
from polyopt import hyper, rules
from polyopt.torch._optimizer import TORCH_FLAGS
from tests.test_torch_parity import GRADS, PARAMS, max_rel_diff

CLASSES = [pt.SGD, pt.Adagrad, pt.RMSprop, pt.Adadelta, pt.Adam, pt.AdamW, pt.Adamax, pt.NAdam,
           pt.RAdam, pt.Ranger, pt.Muon]
# options that give every class its full state (momentum buffers, amsgrad, ...)
FULL = {
    pt.SGD: {"momentum": 0.9, "dampening": 0.1},
    pt.Adagrad: {"lr_decay": 0.01},
    pt.RMSprop: {"momentum": 0.9, "centered": True},
    pt.Adadelta: {},
    pt.Adam: {"amsgrad": True},
    pt.AdamW: {},
    pt.Adamax: {},
    pt.NAdam: {},
    pt.RAdam: {},
    pt.Ranger: {"k": 3, "reset_state": True},
    pt.Muon: {"weight_decay": 0.1, "adam_weight_decay": 0.05, "adam_lr_ratio": 0.5},
}


def make_params(dtype=torch.float64):
    return [torch.tensor(p, dtype=dtype, requires_grad=True) for p in PARAMS]


def set_grads(params, t, skip=()):
    for i, (p, g) in enumerate(zip(params, GRADS[t])):
        p.grad = None if i in skip else torch.tensor(g, dtype=p.dtype)


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)})


def same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys()
            and all(sa[k].keys() == sb[k].keys()
                    and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa))


# --------------------------------------------------------------------------
# signatures and defaults


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_is_the_spec_in_torch_spelling(cls):
    sig = inspect.signature(cls)
    names = list(sig.parameters)
    flags = list(TORCH_FLAGS) + (["decoupled_weight_decay"] if "weight_decay_mode" in cls.spec
                                 else [])
    assert names[0] == "params" and names[-len(flags) - 1:] == ["compiled", *flags]
    expected = []
    for h in cls.spec:
        name = h.spelling("torch").split("[")[0]
        if name not in expected:
            expected.append(name)
    assert names[1:-len(flags) - 1] == expected
    opt = cls(make_params())
    for h in cls.spec:  # the core's defaults, in the group under torch's name
        spelled = h.spelling("torch")
        if "[" in spelled:
            base, index = spelled[:-1].split("[")
            assert opt.defaults[base][int(index)] == h.default
        else:  # a value alias: torch's spelling of the default (Muon's adjust_lr_fn=None)
            assert opt.defaults[spelled] == h.spelled_value("torch", h.default)
            assert h.alias("torch", opt.defaults[spelled]) is None or dict(
                h.alias("torch", opt.defaults[spelled]).means)[h.name] == h.default
    assert pt.Adam in CLASSES and inspect.signature(pt.Adam).parameters["betas"].default == (
        0.9, 0.999)


def test_wrapper_arguments_are_the_spec_torch_spellings():
    la = inspect.signature(pt.Lookahead).parameters
    assert la["k"].default == hyper.LOOKAHEAD["sync_period"].default
    assert la["alpha"].default == hyper.LOOKAHEAD["slow_step_size"].default
    assert hyper.LOOKAHEAD["sync_period"].spelling("torch") == "k"
    assert hyper.LOOKAHEAD["slow_step_size"].spelling("torch") == "alpha"
    sam = inspect.signature(pt.SAM).parameters
    assert sam["rho"].default == hyper.SAM["rho"].default
    assert sam["adaptive"].default == hyper.SAM["adaptive"].default


def test_documented_differences_from_torch_optim():
    assert "torch.optim.RMSprop reproduced: pass lr=0.01, alpha=0.99" in pt.RMSprop.__doc__
    assert "torch.optim.SGD reproduced: pass lr=0.001" in pt.SGD.__doc__
    assert "torch.optim.Adam reproduced" not in pt.Adam.__doc__  # same defaults


def test_onecycle_momentum_keys_exist():
    assert "momentum" in pt.SGD(make_params()).defaults
    assert "momentum" in pt.RMSprop(make_params()).defaults
    for cls in (pt.Adam, pt.AdamW, pt.Adamax, pt.NAdam, pt.RAdam, pt.Ranger):
        assert "betas" in cls(make_params()).defaults


def test_lr_positional_the_rest_keyword_only():
    opt = pt.SGD(make_params(), 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError, match="polyopt.torch.Adam: too many positional"):
        pt.Adam(make_params(), 1e-3, (0.9, 0.99))


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("cls, kwargs, exc, message", [
    (pt.Adam, {"lr": -1.0}, ValueError, r"adam: lr must be .*\[0, inf\), got lr=-1.0"),
    (pt.Adam, {"betas": (1.0, 0.999)}, ValueError,
     r"adam: betas\[0\] must be a number in \[0, 1\), got betas\[0\]=1.0"),
    (pt.Adam, {"betas": (0.9, 1.5)}, ValueError, r"betas\[1\]=1.5"),
    (pt.Adam, {"betas": 0.9}, TypeError, r"adam: betas must be a tuple of 2 numbers"),
    (pt.Adam, {"eps": float("nan")}, ValueError, r"eps=nan"),
    (pt.Adam, {"amsgrad": "yes"}, TypeError, r"amsgrad must be True or False"),
    (pt.SGD, {"momentum": 1.5}, ValueError, r"sgd: momentum must be a number in \[0, 1\]"),
    (pt.SGD, {"nesterov": 1}, TypeError, r"nesterov=1"),
    (pt.RMSprop, {"alpha": 1.0}, ValueError, r"rmsprop: alpha must be a number in \[0, 1\)"),
    (pt.Adadelta, {"rho": -0.1}, ValueError, r"adadelta: rho"),
    (pt.Ranger, {"k": 0}, ValueError, r"ranger: k must be an integer in \[1, inf\)"),
    (pt.Adam, {"learning_rate": 0.1}, TypeError, r"polyopt.torch.Adam: .*learning_rate"),
    (pt.Adam, {"compiled": "yes"}, TypeError, r"compiled must be True or False"),
    (pt.SGD, {"lr": lambda t: 0.1}, TypeError, r"lr must be a number or a 0-d tensor"),
])
def test_bad_arguments_are_refused_at_construction(cls, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        cls(make_params(), **kwargs)


def test_bad_param_group_is_refused_and_nothing_is_added():
    params = make_params()
    opt = pt.Adam(params[:2])
    with pytest.raises(ValueError, match=r"betas\[0\]=-0.5 \(param group 1\)"):
        opt.add_param_group({"params": params[2:], "betas": (-0.5, 0.9)})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        opt.add_param_group({"params": params[:1]})


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.int64: non-floating"):
        pt.Adam([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.int64)])


def test_sparse_grads_are_refused_before_anything_changes():
    params = make_params()
    opt = pt.Adam(params)
    set_grads(params, 0)
    params[1].grad = params[1].grad.to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"Adam does not support sparse gradients.*params\[1\]"):
        opt.step()
    assert same(before, snapshot(opt, params))


def test_bad_lr_set_by_hand_fails_at_step_and_changes_nothing():
    params = make_params()
    opt = pt.SGD(params, momentum=0.9)
    set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["lr"] = -0.1
    set_grads(params, 1)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"lr=-0.1"):
        opt.step()
    assert same(before, snapshot(opt, params))


# --------------------------------------------------------------------------
# groups, skipped params, closures


def test_per_group_hyperparameters_and_add_param_group_match_torch():
    def train(make):
        params = make_params()
        opt = make([{"params": params[:2]}, {"params": params[2:3], "lr": 0.003,
                                              "betas": (0.8, 0.99), "weight_decay": 0.1}])
        for t in range(60):
            set_grads(params, t, skip=(3,) if t < 30 else ())
            if t == 30:
                opt.add_param_group({"params": params[3:], "lr": 0.02})
            opt.step()
        return [p.detach().numpy() for p in params]

    native = train(lambda g: torch.optim.Adam(g, lr=0.01))
    ours = train(lambda g: pt.Adam(g, lr=0.01))
    assert max_rel_diff(ours, native) <= 1e-12
    assert max_rel_diff(native, PARAMS) > 1e-2


def test_params_without_grad_are_skipped_like_torch():
    """A param skipped at some steps keeps its own step count (torch's per-param
    'step'): polyopt runs it in a separate bucket and matches torch.optim."""
    def train(make):
        params = make_params()
        opt = make(params)
        for t in range(40):
            set_grads(params, t, skip=(0,) if t % 3 == 0 else (2,) if t % 5 == 0 else ())
            opt.step()
        return [p.detach().numpy() for p in params], opt

    for native_cls, cls in ((torch.optim.NAdam, pt.NAdam), (torch.optim.SGD, pt.SGD)):
        kw = {"lr": 0.01} if cls is pt.NAdam else {"lr": 0.05, "momentum": 0.9}
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            native, _ = train(lambda ps, c=native_cls, kw=kw: c(ps, **kw))
            ours, opt = train(lambda ps, c=cls, kw=kw: c(ps, **kw))
        finally:
            torch.set_default_dtype(old)
        assert max_rel_diff(ours, native) <= 1e-12
    steps = [int(opt.state[p]["step"]) for p in opt.param_groups[0]["params"]]
    assert steps == [26, 40, 35, 40]  # skipped 14 and 5 times


def test_a_param_that_never_gets_a_grad_is_untouched():
    params = make_params()
    opt = pt.Adam(params)
    for t in range(3):
        set_grads(params, t, skip=(1,))
        opt.step()
    assert torch.equal(params[1], torch.tensor(PARAMS[1]))
    assert params[1] not in opt.state


def test_step_closure_returns_the_loss_with_grad_enabled():
    params = make_params()
    opt = pt.SGD(params, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(sum(float((p * p).sum()) for p in map(torch.tensor,
                                                                              PARAMS)))
    assert torch.allclose(params[0], torch.tensor(PARAMS[0]) * 0.8)


# --------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_state_dict_resume_is_bitwise_identical(cls):
    def train(opt, params, steps):
        for t in steps:
            set_grads(params, t, skip=(2,) if t % 4 == 0 else ())
            opt.step()

    params = make_params()
    opt = cls(params, **FULL[cls])
    train(opt, params, range(50))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    train(opt, params, range(50, 100))

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = cls(resumed, **FULL[cls])
    opt2.load_state_dict(saved["opt"])
    train(opt2, resumed, range(50, 100))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert same(snapshot(opt, params), snapshot(opt2, resumed))


def test_state_dict_is_torch_format_and_torch_adam_continues_from_it():
    params = make_params()
    opt = pt.Adam(params, lr=0.01, amsgrad=True)
    for t in range(20):
        set_grads(params, t)
        opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and float(sd["state"][0]["step"]) == 20
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)

    theirs = [p.detach().clone().requires_grad_() for p in params]
    native = torch.optim.Adam(theirs, lr=0.01, amsgrad=True)
    native.load_state_dict(copy.deepcopy(sd))
    for t in range(20, 40):
        set_grads(params, t)
        set_grads(theirs, t)
        opt.step()
        native.step()
    assert max_rel_diff([p.detach().numpy() for p in params],
                        [p.detach().numpy() for p in theirs]) <= 1e-12


def _trained(cls=pt.Adam, **kw):
    params = make_params()
    opt = cls(params, **kw)
    for t in range(5):
        set_grads(params, t)
        opt.step()
    return opt, params


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
     r"state_dict has 2 param groups, the optimizer has 1"),
    (lambda sd: sd["param_groups"][0]["params"].pop(),
     r"param group 0 has 3 params in the state_dict and 4 in the optimizer"),
    (lambda sd: sd["state"][1].__setitem__("exp_avg", torch.zeros(4)),
     r"state of param 1: exp_avg has shape \(4,\), expected \(3,\)"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(5, 3)),
     r"state of param 0 has unknown key\(s\) \['momentum_buffer'\]"),
    (lambda sd: sd["state"][0].__setitem__("step", torch.zeros(2)),
     r"state of param 0: step has shape \(2,\), expected \(\)"),
    (lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9, 2.0)),
     r"betas\[1\]=2.0"),
    (lambda sd: sd.pop("param_groups"), r"no 'param_groups' entry"),
    (lambda sd: sd["state"].__setitem__(7, {}), r"state for param 7"),
])
def test_bad_state_dict_is_refused_and_changes_nothing(edit, message):
    opt, params = _trained()
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)

    def groups():
        return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                for g in opt.param_groups]

    before = snapshot(opt, params), groups()
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(sd)
    assert same(before[0], snapshot(opt, params)) and groups() == before[1]


# --------------------------------------------------------------------------
# GradScaler and 16-bit params


def test_grad_scaler_unscales_and_skips_steps_with_inf():
    def train(cls, params, inject_inf):
        opt = cls(params, lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
        for t in range(10):
            opt.zero_grad()
            loss = sum((p * torch.tensor(g, dtype=p.dtype)).sum()
                       for p, g in zip(params, GRADS[t]))
            scaler.scale(loss).backward()
            if inject_inf and t == 4:
                params[0].grad[0, 0] = float("inf")
                before = snapshot(opt, params)
            scaler.step(opt)
            if inject_inf and t == 4:
                assert same(before, snapshot(opt, params))  # skipped: nothing changed
            scaler.update()
        return scaler, opt

    ps = make_params(torch.float32)
    scaler, opt = train(pt.Adam, ps, inject_inf=True)
    assert scaler.get_scale() == 512.0
    assert int(opt.state[ps[0]]["step"]) == 9
    # with finite grads the scaled run is the unscaled torch.optim run
    ours = make_params(torch.float32)
    train(pt.Adam, ours, inject_inf=False)
    theirs = make_params(torch.float32)
    train(torch.optim.Adam, theirs, inject_inf=False)
    assert max_rel_diff([p.detach().numpy() for p in ours],
                        [p.detach().numpy() for p in theirs]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls, kw", [(pt.Adam, {"lr": 0.01}),
                                     (pt.SGD, {"lr": 0.05, "momentum": 0.9})],
                         ids=["Adam", "SGD"])
def test_16bit_params_keep_float32_state(cls, kw, dtype):
    """State in float32, math in float32, the new value rounded to the param's
    dtype: the reference is torch.optim on float32 params that are rounded to
    ``dtype`` after every step (its state stays float32)."""
    ours = make_params(dtype)
    opt = cls(ours, **kw)
    ref = make_params(torch.float32)
    with torch.no_grad():
        for r, p in zip(ref, ours):
            r.copy_(p.float())
    native = getattr(torch.optim, cls.__name__)(ref, **kw)
    for t in range(30):
        set_grads(ours, t)
        for r, p in zip(ref, ours):
            r.grad = p.grad.float()
        opt.step()
        native.step()
        with torch.no_grad():
            for r in ref:
                r.copy_(r.to(dtype).float())
    for p in ours:
        assert p.dtype == dtype
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
    ulp = torch.finfo(dtype).eps
    diffs = [float(((p.float() - r) / r.abs().clamp(min=0.1)).abs().max().detach())
             for p, r in zip(ours, ref)]
    assert max(diffs) <= 2 * ulp, diffs
    exact = sum(int(torch.equal(p.float(), r)) for p, r in zip(ours, ref))
    assert exact >= 2  # mostly bit-identical: differences come from rare rounding ties


def test_import_polyopt_torch_imports_no_other_framework():
    code = ("import sys, polyopt.torch; "
            "print(sorted(m for m in ('tensorflow', 'jax', 'keras', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                         env={"PYTHONPATH": ".", "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_rules_still_accept_torch_arrays_through_the_registered_namespace():
    rule = rules.sgd(learning_rate=0.5)
    params = [torch.ones(2, dtype=torch.float64)]
    updates, _ = rule.update([torch.ones(2, dtype=torch.float64)], rule.init(params), params)
    assert np.allclose(updates[0].numpy(), -0.5)


def test_pickle_and_deepcopy_keep_the_optimizer_working():
    import pickle

    params = make_params()
    opt = pt.Adam(params, lr=0.01, compiled=False)
    set_grads(params, 0)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.compiled is False and len(clone.state) == 4
        clone_params = clone.param_groups[0]["params"]
        for p, g in zip(clone_params, GRADS[1]):
            p.grad = torch.tensor(g)
        clone.step()
        assert int(clone.state[clone_params[0]]["step"]) == 2


def test_step_hooks_and_repr_are_torchs():
    params = make_params()
    opt = pt.Adam(params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    set_grads(params, 0)
    opt.step()
    assert calls == ["pre", "post"]
    assert "betas: (0.9, 0.999)" in repr(opt)


# --------------------------------------------------------------------------
# torch.optim's own flags (maximize, foreach, fused, differentiable,
# decoupled_weight_decay) and torch's own argument checks


def _run_native_and_ours(native_cls, ours, steps=4, dtype=torch.float64, **kwargs):
    results = []
    for make in (lambda p: native_cls(p, **kwargs), lambda p: ours(p, **kwargs)):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(5, 3, dtype=dtype))
        optimizer = make([param])
        for _ in range(steps):
            optimizer.zero_grad()
            (param ** 2).sum().backward()
            grad = param.grad.clone()
            optimizer.step()
            assert torch.equal(param.grad, grad)  # maximize leaves p.grad alone
        results.append(param.detach())
    return results


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", {"lr": 0.1, "maximize": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "maximize": True, "foreach": False}),
    ("RMSprop", {"maximize": True, "foreach": True}),
    ("Adagrad", {"fused": True}),
    ("NAdam", {"lr": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RAdam", {"lr": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RAdam", {"lr": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": False}),
])
def test_torch_flags_have_torch_meaning(name, kwargs):
    native, ours = _run_native_and_ours(
        getattr(torch.optim, name), lambda p, **kw: pt.preset(f"torch.optim.{name}", p, **kw),
        **kwargs)
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", {"lr": 0.1, "maximize": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "maximize": True}),
])
def test_maximize_on_the_compiled_path_is_torchs(name, kwargs):
    """``compiled=True`` steps with the negated grads (fresh tensors at every
    step: read where they are, p.grad left alone), as torch's fused
    optimizers take ``maximize``."""
    native, ours = _run_native_and_ours(
        getattr(torch.optim, name),
        lambda p, **kw: pt.preset(f"torch.optim.{name}", p, **kw, compiled=True),
        fused=True, **kwargs)
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    assert not torch.allclose(ours, torch.randn(5, 3, dtype=torch.float64))  # it moved


def test_differentiable_step_is_recorded_by_autograd_as_torchs():
    grads = []
    for cls in (torch.optim.SGD, pt.SGD):
        leaf = torch.linspace(-1, 1, 6, dtype=torch.float64).requires_grad_()
        param = leaf.clone()  # torch.optim's differentiable step needs a non-leaf too
        optimizer = cls([param], lr=0.1, momentum=0.9, differentiable=True)
        for i in range(3):
            param.grad = torch.full((6,), 0.5 + i, dtype=torch.float64) * param.detach()
            optimizer.step()
        grads.append(torch.autograd.grad((param ** 2).sum(), leaf)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, exception, match", [
    (lambda p: pt.Adam(p, foreach=True, fused=True), RuntimeError,
     "`fused` and `foreach` cannot be `True` together"),
    (lambda p: pt.Adam(p, fused=True, differentiable=True), RuntimeError,
     "`fused` does not support `differentiable`"),
    (lambda p: pt.Adam(p, betas=(0.9, torch.tensor(0.99))), ValueError,
     "betas must be either both floats or both Tensors"),
    (lambda p: pt.SGD(p, nesterov=True), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    (lambda p: pt.SGD(p, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    (lambda p: pt.Adam(p, differentiable=True, compiled=True), ValueError,
     "differentiable=True is not supported with compiled=True"),
    (lambda p: pt.Adam(p, capturable=True), ValueError, "capturable=True is not supported"),
    (lambda p: pt.Adam(p, maximize=1), TypeError, "maximize must be True or False"),
    (lambda p: pt.NAdam(p, decoupled_weight_decay=True, weight_decay_mode="l2"), ValueError,
     "decoupled_weight_decay=True contradicts weight_decay_mode='l2'"),
])
def test_torch_flag_errors_are_torchs(make, exception, match):
    with pytest.raises(exception, match=match):
        make([torch.nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adafactor_momentum_dtype_survives_load_state_dict(dtype, compiled):
    """Each slot keeps its storage dtype through state_dict/load_state_dict: the
    momentum its momentum_dtype (torch.bfloat16 accepted), the statistics the
    params' (or state_dtype), whatever the params' dtype."""
    w = torch.nn.Parameter(torch.linspace(-1, 1, 12, dtype=dtype).reshape(4, 3))
    for options, momentum, statistics in (
            ({"momentum_dtype": torch.bfloat16}, torch.bfloat16, dtype),
            ({"momentum_dtype": "float64", "state_dtype": "float16"}, torch.float64,
             torch.float16)):
        opt = pt.Adafactor([w], momentum=0.9, compiled=compiled, **options)
        for _ in range(2):
            w.grad = torch.ones_like(w)
            opt.step()
        saved = opt.state_dict()
        other = pt.Adafactor([w], momentum=0.9, compiled=compiled, **options)
        other.load_state_dict(saved)
        for state in (opt.state[w], other.state[w]):
            assert state["momentum_buffer"].dtype == momentum
            assert state["row_var"].dtype == state["col_var"].dtype == statistics
        assert torch.equal(other.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])
