"""The eager default runs an elementwise rule on cache-sized pieces
(polyopt.torch._eager): small tensors grouped into one rule call, large ones
split into 1-d views. Its numbers are the one-call step's, bit for bit: each
optimizer is run twice side by side, once with pieces of 8 elements (every
tensor below but the 0-d one is split or grouped, two pieces a call) and
once with pieces larger than all params together (one rule call on the whole tensors, the per-tensor
arithmetic), and params and state must be equal after every step. The
parity of the eager path with torch.optim itself is tests/test_torch_parity.py's.
"""

from __future__ import annotations

import pytest
import torch

import polyopt.torch as pt
from polyopt.torch import _eager
from polyopt.torch.optimizers import OPTIMIZERS

SHAPES = [(6, 5), (40,), (3,), (), (4, 3, 2, 2)]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float16]
EXTRA = {"sgd": {"momentum": 0.9, "nesterov": True}}


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in zip(SHAPES, DTYPES):
        params.append(torch.randn(shape, generator=gen).to(dtype).requires_grad_())
    # a non-contiguous param (a transposed view's layout): goes whole into a call
    params.append(torch.randn(7, 9, generator=gen).t().contiguous().t().requires_grad_())
    return params


def run(make, chunk: int, monkeypatch, steps: int = 6) -> list:
    monkeypatch.setattr(_eager, "CHUNK", chunk)
    monkeypatch.setattr(_eager, "CALL", 2 * chunk)
    params = make_params()
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    snapshots = []
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if t == 3:  # a scheduler's change
            opt.param_groups[0]["lr"] *= 0.5
        opt.step()
        snapshots.append(([p.detach().clone() for p in params],
                          [{k: v.clone() for k, v in opt.state[p].items()} for p in params]))
    return snapshots


def assert_bitwise(a, b, where: str) -> None:
    for t, ((pa, sa), (pb, sb)) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            assert torch.equal(x, y), f"{where}: step {t}, param {i} differs"
        for i, (x, y) in enumerate(zip(sa, sb)):
            assert x.keys() == y.keys(), f"{where}: step {t}, state keys of param {i}"
            for k in x:
                assert torch.equal(x[k], y[k]), f"{where}: step {t}, state {k} of param {i}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pieces_give_the_one_call_numbers_bitwise(name, monkeypatch):
    cls = OPTIMIZERS[name]

    def make(params):
        return cls(params, **EXTRA.get(name, {}))

    pieces = run(make, 8, monkeypatch)
    whole = run(make, 1 << 40, monkeypatch)
    assert_bitwise(pieces, whole, name)
    # the params moved (a step that does nothing would pass the comparison)
    assert not torch.equal(pieces[-1][0][0], make_params()[0].detach())


def test_a_slot_started_at_run_time_and_presets(monkeypatch):
    """SGD's momentum buffers start when momentum is set on a running optimizer;
    torch.optim.Adam's and RMSprop's presets (amsgrad, centered) too."""
    def sgd(params):
        opt = pt.SGD(params, lr=0.1)
        original = opt.step

        def step():
            if "momentum_buffer" not in opt.state.get(params[0], {}) and opt.state:
                opt.param_groups[0]["momentum"] = 0.9
            return original()
        opt.step = step
        return opt

    makers = {
        "sgd momentum at run time": sgd,
        "adam amsgrad": lambda ps: pt.preset("torch.optim.Adam(amsgrad=True)", ps),
        "rmsprop centered": lambda ps: pt.preset("torch.optim.RMSprop", ps, centered=True,
                                                 momentum=0.5),
    }
    for where, make in makers.items():
        pieces = run(make, 8, monkeypatch)
        whole = run(make, 1 << 40, monkeypatch)
        assert_bitwise(pieces, whole, where)
        assert "momentum_buffer" in dict(pieces[-1][1][0]) or where != "sgd momentum at run time"


def test_the_pieces_of_a_step():
    """Tensors of more than CHUNK elements are cut into views of CHUNK elements,
    consecutive pieces share a call up to CALL elements, tensors without a flat
    view go whole."""
    params = [torch.zeros(3), torch.zeros(4), torch.zeros(20), torch.zeros(5, 4).t(),
              torch.zeros(2)]
    grads = [torch.zeros_like(p) for p in params]
    calls = _eager._pieces(params, grads, [], 8, 12)
    assert calls == [
        [(0, None), (1, None)],
        [(2, slice(0, 8))], [(2, slice(8, 16)), (2, slice(16, 20))],
        [(3, None)],
        [(4, None)],
    ]
