"""polyopt.torch against torch's own optimizer database (the conformance suite "torch").

``torch.testing._internal.common_optimizers.optim_db`` (shipped in the torch
wheel) lists, for every torch.optim optimizer, the constructor inputs its
own tests run (``optim_inputs_func``, with the foreach/fused/differentiable
flags its ``supported_impls`` allow) and the inputs that must fail
(``optim_error_inputs_func``). For every native with a preset in
polyopt.native.PRESETS, ``polyopt.torch.preset(native, ...)`` is driven
through each of them, with torch's checks: the same numbers as the native
for each input (float64 and float32, torch.testing.assert_close's
tolerances), the same exception type for each error input, the state_dict
round trip, param groups, the closure's loss, complex params where the
native supports them. Natives without a preset are skipped and counted.
Run by ``python -m conformance torch``; the expected failures are listed in
conformance/expected/torch.toml.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import polyopt.torch
from conformance import _record
from polyopt.native import PRESETS

STEPS = 5


def _key(info) -> str:
    return f"torch.optim.{info.name}"


def _inputs(kind: str):
    cases = []
    for info in optim_db:
        if kind == "error":
            made = (info.optim_error_inputs_func("cpu", torch.float64)
                    if info.optim_error_inputs_func else [])
            descs = [e.optimizer_error_input.desc for e in made]
        else:
            made = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float64, info)
            descs = [i.desc for i in made]
        cases += [pytest.param(info, i, id=f"{info.name}-{i}-{d.replace(' ', '_')}")
                  for i, d in enumerate(descs)]
    return cases


def _polyopt(info, params, kwargs):
    key = _key(info)
    if key not in PRESETS:
        _record.no_preset(key)
    _record.used(key)
    return polyopt.torch.preset(key, params, **kwargs)


def _model(dtype, seed=0, differentiable=False):
    """Two params; with ``differentiable``, clones of leaves (torch.optim's
    differentiable step changes them in place under autograd, which leaves refuse),
    returned with the leaves."""
    generator = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(4, 3, generator=generator, dtype=dtype),
              torch.randn(3, generator=generator, dtype=dtype)]
    if not differentiable:
        return [torch.nn.Parameter(p) for p in leaves], None
    leaves = [p.requires_grad_() for p in leaves]
    return [p.clone() for p in leaves], leaves


def _loss(params, step):
    weight, bias = params
    x = torch.linspace(-1, 1, 8, dtype=weight.dtype).reshape(2, 4) * (1 + 0.1 * step)
    return ((x @ weight + bias).tanh() ** 2).sum() + (weight ** 2).sum() * 0.01


def _train(make, params, steps=STEPS, groups=None):
    optimizer = make(groups if groups is not None else params)
    losses = []
    for step in range(steps):
        def closure(step=step):
            optimizer.zero_grad()
            loss = _loss(params, step)
            if params[0].is_leaf:
                loss.backward()
            else:  # the grads alone, as torch's differentiable tests give them
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g.detach()
            return loss.detach()
        losses.append(optimizer.step(closure))
    return optimizer, torch.stack(losses)  # in the params' dtype, for its tolerances


def _fresh_kwargs(optim_input):
    return copy.deepcopy(optim_input.kwargs)


def _outcome(make, params):
    """(losses, None) or (None, the exception) of a short training run."""
    try:
        return _train(make, params)[1], None
    except Exception as e:  # compared with the other run's
        return None, e


def _refused_as_the_native(make_native, make_ours) -> bool:
    """Whether the native refuses these params at construction (torch.optim.Muon
    takes 2-D params only); then polyopt must refuse them with the same type."""
    try:
        make_native()
    except Exception as e:  # the refusal polyopt's must match
        with pytest.raises(type(e)):
            make_ours()
        return True
    return False


@pytest.mark.parametrize("info, index", _inputs("input"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_same_numbers_as_the_native(info, index, dtype):
    optim_input = _get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", dtype, info)[index]
    differentiable = bool(optim_input.kwargs.get("differentiable"))
    ours, our_leaves = _model(dtype, differentiable=differentiable)
    native, native_leaves = _model(dtype, differentiable=differentiable)
    our_losses, our_error = _outcome(
        lambda p: _polyopt(info, p, _fresh_kwargs(optim_input)), ours)
    native_losses, native_error = _outcome(
        lambda p: info.optim_cls(p, **_fresh_kwargs(optim_input)), native)
    if native_error is not None:  # the same refusal
        assert type(our_error) is type(native_error), (native_error, our_error)
        return
    if our_error is not None:
        raise our_error
    torch.testing.assert_close(our_losses, native_losses)
    for a, b in zip(ours, native):
        torch.testing.assert_close(a.detach(), b.detach())
    if differentiable:  # the steps' derivatives too
        our_derivatives = torch.autograd.grad(sum(p.sum() for p in ours), our_leaves)
        try:
            native_derivatives = torch.autograd.grad(sum(p.sum() for p in native),
                                                     native_leaves)
        except RuntimeError as e:  # nothing to compare with
            raise AssertionError(
                f"the native's differentiable step cannot be differentiated through "
                f"{STEPS} steps (polyopt's can): {e}") from e
        for a, b in zip(our_derivatives, native_derivatives):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("info, index", _inputs("input"))
def test_state_dict_round_trip(info, index):
    optim_input = _get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float64, info)[index]
    differentiable = bool(optim_input.kwargs.get("differentiable"))
    params, _ = _model(torch.float64, differentiable=differentiable)
    if _refused_as_the_native(lambda: info.optim_cls(params, **_fresh_kwargs(optim_input)),
                              lambda: _polyopt(info, params, _fresh_kwargs(optim_input))):
        return
    optimizer, _ = _train(lambda p: _polyopt(info, p, _fresh_kwargs(optim_input)), params, 2)
    state_dict = optimizer.state_dict()  # (a differentiable run's state is in autograd's graph)
    saved = {"state": {k: {n: v.detach().clone() if isinstance(v, torch.Tensor) else v
                           for n, v in entry.items()} for k, entry in state_dict["state"].items()},
             "param_groups": copy.deepcopy(state_dict["param_groups"])}
    twin = [p.detach().clone().requires_grad_() for p in params]
    if params[0].is_leaf:
        twin = [torch.nn.Parameter(p.detach()) for p in twin]
    else:
        twin = [p.clone() for p in twin]
    restored = _polyopt(info, twin, _fresh_kwargs(optim_input))
    restored.load_state_dict(saved)
    for opt, ps in ((optimizer, params), (restored, twin)):
        for step in range(2, 4):
            opt.zero_grad()
            for p, g in zip(ps, torch.autograd.grad(_loss(ps, step), ps)):
                p.grad = g.detach()
            opt.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in optim_db])
def test_param_groups(info):
    if not info.supports_param_groups:
        pytest.skip(f"{info.name} does not support param groups")
    defaults = info.optim_inputs_func("cpu")[0].kwargs

    def groups(params):
        return [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.003,
                                          "weight_decay": 0.1}]

    (ours, _), (native, _) = _model(torch.float64), _model(torch.float64)

    def make_ours(_=None):
        return _polyopt(info, groups(ours), copy.deepcopy(defaults))

    def make_native(_=None):
        return info.optim_cls(groups(native), **copy.deepcopy(defaults))

    if _refused_as_the_native(make_native, make_ours):
        return
    _train(make_ours, ours)
    _train(make_native, native)
    for a, b in zip(ours, native):
        torch.testing.assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in optim_db])
def test_complex_params(info):
    if not info.supports_complex:
        pytest.skip(f"{info.name} does not support complex params")
    results = []
    for make in (lambda p: _polyopt(info, p, {}), lambda p: info.optim_cls(p)):
        generator = torch.Generator().manual_seed(1)
        param = torch.nn.Parameter(torch.randn(5, dtype=torch.complex128, generator=generator))
        optimizer = make([param])
        for _ in range(STEPS):
            optimizer.zero_grad()
            (param.abs() ** 2).sum().backward()
            optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("info, index", _inputs("error"))
def test_error_inputs_raise_the_natives_error_type(info, index):
    error_input = info.optim_error_inputs_func("cpu", torch.float64)[index]
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64))]
    expected = error_input.error_type

    def act():
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            _polyopt(info, params, copy.deepcopy(optim_input.kwargs))
        else:
            optimizer = _polyopt(info, params, copy.deepcopy(optim_input.kwargs))
            optimizer.step()

    if issubclass(expected, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            act()
        assert any(issubclass(w.category, expected) for w in caught), (
            f"no {expected.__name__}: {optim_input.desc}")
    else:
        with pytest.raises(expected):
            act()
