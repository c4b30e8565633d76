"""The fast path (``compiled=True``: one torch.compile graph per param group)
gives the eager path's numbers, never recompiles when a scheduler changes lr
or momentum, and resumes bitwise from a state_dict.

Kept to two compilations (each takes 10-40 s on a 2-core CPU): Adam with
AMSGrad under LambdaLR in float64, SGD with Nesterov momentum under
OneCycleLR (lr and momentum cycle) in float32. Tolerances: float64 1e-12
relative, float32 1e-6 relative after 40 steps (inductor fuses and reorders
the same operations, so the two paths are not bitwise equal).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch._dynamo.utils

import polyopt.torch as pt
from tests.test_torch_parity import FACTORS, GRADS, PARAMS, max_rel_diff


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    """Compiled kernels go to pytest's temporary directory unless a cache is set
    (nox sets one inside .nox)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    del os.environ["TORCHINDUCTOR_CACHE_DIR"]


STEPS = 40
# torch's own compile machinery warns about its deprecated torch.jit internals
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def train(make, make_sched, dtype, steps=range(STEPS), state=None):
    params = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in PARAMS]
    opt = make(params)
    sched = make_sched(opt)
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    saved = None
    for t in steps:
        for p, g in zip(params, GRADS[t]):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        sched.step()
        if t == STEPS // 2 - 1:
            saved = copy.deepcopy({"params": [p.detach() for p in params],
                                   "opt": opt.state_dict(), "sched": sched.state_dict()})
    return [p.detach().double().numpy() for p in params], saved, opt


def graphs() -> int:
    """Graphs compiled so far in this process (through dynamo or straight to
    inductor, every compilation goes through AOTAutograd)."""
    return torch._dynamo.utils.counters["aot_autograd"]["total"]


CASES = {
    "Adam amsgrad + LambdaLR, float64": (
        lambda compiled: lambda ps: pt.Adam(ps, lr=0.01, amsgrad=True, compiled=compiled),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: FACTORS[t]),
        torch.float64, 1e-12),
    "SGD nesterov + OneCycleLR, float32": (
        lambda compiled: lambda ps: pt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                           compiled=compiled),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1),
        torch.float32, 1e-6),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_equals_eager_compiles_once_and_resumes_bitwise(case):
    make, make_sched, dtype, tol = CASES[case]
    eager, _, _ = train(make(False), make_sched, dtype)
    before = graphs()
    train(make(True), make_sched, dtype, range(3))  # compiles (state slots start at step 1)
    compiled = graphs()
    fast, saved, opt = train(make(True), make_sched, dtype)
    assert compiled > before
    assert graphs() == compiled  # lr (and momentum) changed at every step: no recompilation
    assert opt.param_groups[0]["lr"] != opt.defaults["lr"]
    assert max_rel_diff(fast, eager) <= tol
    assert max_rel_diff(eager, PARAMS) > 1e-2

    resumed, _, _ = train(make(True), make_sched, dtype, range(STEPS // 2, STEPS), saved)
    assert graphs() == compiled  # another optimizer reuses the compiled steps
    assert all((a == b).all() for a, b in zip(resumed, fast))


EVERY_CLASS = {
    "Ranger": lambda c: lambda ps: pt.Ranger(ps, lr=0.01, compiled=c),
    "NAdam": lambda c: lambda ps: pt.NAdam(ps, compiled=c),
    "RAdam": lambda c: lambda ps: pt.RAdam(ps, compiled=c),
    "RMSprop centered momentum": lambda c: lambda ps: pt.RMSprop(ps, centered=True,
                                                                 momentum=0.9, compiled=c),
    "Adagrad lr_decay": lambda c: lambda ps: pt.Adagrad(ps, lr_decay=0.01, compiled=c),
    "Adadelta": lambda c: lambda ps: pt.Adadelta(ps, compiled=c),
    "Adamax": lambda c: lambda ps: pt.Adamax(ps, compiled=c),
    "AdamW bfloat16": lambda c: lambda ps: pt.AdamW(ps, compiled=c),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_CLASS)
def test_every_other_class_compiles_to_the_eager_numbers(name):
    """One compilation each (3-30 s): the compiled step of every other class
    (nested Lookahead state, NAdam's mu_product, float32 math for bfloat16
    params) gives the eager numbers (measured: bitwise or 2e-16)."""
    dtype = torch.bfloat16 if "bfloat16" in name else torch.float64
    eager, _, _ = train(EVERY_CLASS[name](False), lambda opt: _NoScheduler(), dtype,
                        range(12))
    fast, _, _ = train(EVERY_CLASS[name](True), lambda opt: _NoScheduler(), dtype, range(12))
    assert max_rel_diff(fast, eager) <= (1e-12 if dtype == torch.float64 else 0.0)
    assert max_rel_diff(eager, PARAMS) > 1e-3


class _NoScheduler:
    def step(self):
        pass


def test_tracing_a_rule_calls_no_cached_function():
    """torch.compile traces the rules (bfloat16 params take the per-tensor
    compiled step, which dynamo traces) to the eager numbers, Muon's matrix
    views included (a generator passed to math.prod stopped dynamo), and
    without a call of an lru_cache-wrapped function, at which dynamo warns
    (once per process: its record is cleared here): the choice of torch's
    kernels (``polyopt._namespace.fused``) that Ranger's and Muon's rules
    make."""
    torch._dynamo.utils.warn_once_cache.clear()
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in [(3, 5), (5,)]]
    grads = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in start]
             for _ in range(3)]
    for make in (lambda ps, c: pt.Ranger(ps, lr=0.1, compiled=c),
                 lambda ps, c: pt.Muon(ps, lr=0.1, compiled=c)):
        runs = []
        for compiled in (False, True):
            params = [p.clone().requires_grad_() for p in start]
            opt = make(params, compiled)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in grads:
                    for p, g in zip(params, step):
                        p.grad = g.clone()
                    opt.step()
            assert not [w for w in caught if "lru_cache" in str(w.message)], [
                str(w.message)[:200] for w in caught]
            runs.append(params)
        for eager, fast, before in zip(*runs, start):
            assert torch.equal(fast, eager)
            assert not torch.equal(fast, before)  # the steps moved it
