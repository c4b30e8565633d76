"""Complex params: polyopt.torch against torch.optim, side by side.

torch.optim steps a complex param as its real view (``torch.view_as_real``:
each moment per real and imaginary component), and keeps its state complex,
shaped like the param. polyopt.torch does the same in the adapter: the rule
runs on the real views, the state is stored complex. Each case: a complex
matrix, a complex vector and a real vector in one group, 6 steps of the same
grads, eager and ``compiled=True`` (complex groups take the eager per-tensor
path), compared with the native's params after every step and its state at
the end. The polyopt options come from ``polyopt.native.PRESETS``.

Measured (max relative difference of the params over 6 steps, eager and
compiled): complex128 3e-19 (Adamax) to 4.6e-16 (SGD, NAdam), complex64 0
(Adamax) to 2.7e-7 (NAdam).
"""

from __future__ import annotations

import io

import pytest
import torch

import polyopt.torch as pt

CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    ("Adagrad", {}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.2}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    ("Adadelta", {}),
    ("Adadelta", {"weight_decay": 0.1}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("AdamW", {"amsgrad": True}),
    ("Adamax", {}),
    ("Adamax", {"weight_decay": 0.1}),
    ("NAdam", {}),
    ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("RAdam", {}),
    ("RAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
]
TOLERANCE = {torch.complex128: 1e-14, torch.complex64: 2e-6}
STEPS = 6


def _preset(name: str, kwargs: dict) -> str:
    return "torch.optim.Adam(amsgrad=True)" if name == "Adam" and kwargs.get("amsgrad") else (
        f"torch.optim.{name}")


def _problem(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    params = [torch.randn(4, 3, dtype=dtype, generator=generator),
              torch.randn(5, dtype=dtype, generator=generator),
              torch.randn(3, dtype=real, generator=generator)]
    grads = [[torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]
             for _ in range(STEPS)]
    return params, grads


def _run(make, params, grads, steps=None):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make(ps)
    trail = []
    for g in grads[:steps]:
        for p, gg in zip(ps, g):
            p.grad = gg.clone()
        opt.step()
        trail.append([p.detach().clone() for p in ps])
    return trail, opt, ps


def _relative(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=str)
@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in
                                                     enumerate(CASES)])
def test_complex_params_give_torch_numbers(name, kwargs, dtype, compiled):
    params, grads = _problem(dtype)
    theirs, native, native_params = _run(
        lambda ps: getattr(torch.optim, name)(ps, **kwargs), params, grads)
    ours, opt, our_params = _run(
        lambda ps: pt.preset(_preset(name, kwargs), ps, compiled=compiled, **kwargs),
        params, grads)
    tolerance = TOLERANCE[dtype]
    for step, (t, o) in enumerate(zip(theirs, ours)):
        for i, (a, b) in enumerate(zip(t, o)):
            assert b.dtype == a.dtype
            assert _relative(a, b) <= tolerance, (step, i, _relative(a, b))
    # the state: torch's keys with torch's complex tensors (polyopt's own 'step' aside)
    for p, q in zip(native_params, our_params):
        theirs_state, ours_state = native.state[p], opt.state[q]
        for key, value in theirs_state.items():
            if value.ndim == 0:
                continue
            mine = ours_state[key]
            assert (mine.dtype, mine.shape) == (value.dtype, value.shape), key
            assert _relative(value, mine) <= 10 * tolerance, key


def test_the_state_dict_of_complex_params_round_trips():
    params, grads = _problem(torch.complex128, seed=2)
    whole, _, _ = _run(lambda ps: pt.Adam(ps, lr=0.1, amsgrad=True), params, grads)
    first, opt, ps = _run(lambda ps: pt.Adam(ps, lr=0.1, amsgrad=True), params, grads, steps=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    again = pt.Adam(resumed, lr=0.1, amsgrad=True)
    again.load_state_dict(torch.load(buffer))
    assert again.state[resumed[0]]["exp_avg_sq"].dtype == torch.complex128
    for g in grads[3:]:
        for p, gg in zip(resumed, g):
            p.grad = gg.clone()
        again.step()
    for a, b in zip(whole[-1], resumed):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


def test_a_torch_optim_state_dict_of_complex_params_loads_and_continues():
    params, grads = _problem(torch.complex128, seed=3)
    whole, _, _ = _run(lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True, momentum=0.5),
                       params, grads)
    _, native, ps = _run(lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True,
                                                        momentum=0.5), params, grads, steps=2)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = pt.preset("torch.optim.RMSprop", resumed, lr=0.01, centered=True, momentum=0.5)
    ours.load_state_dict(native.state_dict())
    for g in grads[2:]:
        for p, gg in zip(resumed, g):
            p.grad = gg.clone()
        ours.step()
    for a, b in zip(whole[-1], resumed):
        assert _relative(a, b.detach()) <= 1e-14


def test_adafactor_refuses_complex_params_at_the_step_as_torch_does():
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    for make in (torch.optim.Adafactor, pt.Adafactor):
        opt = make([p])  # both accept it at construction
        with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
            opt.step()
        assert not opt.state[p]
    torch.testing.assert_close(p.detach(), torch.ones(2, 3, dtype=torch.complex64))


def test_torch_and_optax_step_complex_params_differently():
    """torch's real view keeps Adam's v per component, optax |g|^2: one step of
    g = 3 + 4j from v = 0 is -lr (1 + 1j) in torch and -lr (3 + 4j) / 5 in optax.
    polyopt.torch and the core rule (optax's convention) each give their own."""
    import numpy as np

    from polyopt import rules

    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex128))
    p.grad = torch.full((1,), 3 + 4j, dtype=torch.complex128)
    pt.Adam([p], lr=0.1, eps=0.0).step()
    assert complex(p.detach()[0]) == pytest.approx(-0.1 - 0.1j, abs=1e-15)
    rule = rules.adam(learning_rate=0.1, eps=0.0)
    z = [np.zeros(1, dtype=np.complex128)]
    updates, _ = rule.update([np.full(1, 3 + 4j)], rule.init(z), z)
    assert complex(updates[0][0]) == pytest.approx(-0.1 * (3 + 4j) / 5, abs=1e-15)
