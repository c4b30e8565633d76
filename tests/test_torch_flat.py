"""The flat fast path of ``compiled=True`` (elementwise rules run once on the
concatenation of a bucket's tensors, state kept as one flat tensor per slot).

- Which rules may run flat is explicit (``RuleOptimizer.elementwise``) and
  checked here on the rule itself: per-tensor and concatenated runs give the
  same numbers bitwise (eager, no compilation), and Ranger's gradient
  centralization, which does not, is excluded.
- One compiled optimizer (float64 Adam with L2 weight decay) gives the eager
  per-tensor numbers (1e-12 relative: inductor fuses and reorders the same
  operations, so the paths are not bitwise equal) while its state stays in
  torch's per-parameter format, params lose their grads for a step, grads
  are zeroed with set_to_none=False, and a param's data is replaced.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo.utils

import polyopt.torch as pt
from polyopt.torch import _flat
from tests.test_torch_parity import GRADS, PARAMS, max_rel_diff

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

CLASSES = {name: cls for name, cls in pt.OPTIMIZERS.items()}


def _values(cls, **overrides):
    opt = cls([torch.zeros(1, requires_grad=True)], **overrides)
    return opt._values(opt.param_groups[0])


@pytest.mark.parametrize("name", CLASSES)
def test_elementwise_rules_give_the_per_tensor_numbers_on_the_concatenation(name):
    cls = CLASSES[name]
    values = _values(cls)
    rule = cls.factory(**values)
    params = [torch.tensor(p) for p in PARAMS]
    flat = [torch.cat([p.reshape(-1) for p in params])]
    state, flat_state = rule.init(params), rule.init(flat)
    for t in range(6):
        grads = [torch.tensor(g) for g in GRADS[t]]
        updates, state = rule.update(grads, state, params)
        params = [p + u for p, u in zip(params, updates)]
        flat_updates, flat_state = rule.update([torch.cat([g.reshape(-1) for g in grads])],
                                               flat_state, flat)
        flat = [flat[0] + flat_updates[0]]
    same = bool((torch.cat([p.reshape(-1) for p in params]) == flat[0]).all())
    assert cls.elementwise(values) == same


def test_ranger_is_elementwise_only_without_gradient_centralization():
    assert not pt.Ranger.elementwise(_values(pt.Ranger))
    assert pt.Ranger.elementwise(_values(pt.Ranger, gradient_centralization=False))


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))


def graphs() -> int:
    """Graphs compiled so far in this process (through dynamo or straight to
    inductor, every compilation goes through AOTAutograd)."""
    return torch._dynamo.utils.counters["aot_autograd"]["total"]


def _run(compiled, steps=range(10), state=None):
    """float64 Adam with L2 decay under LambdaLR (lr changes every step); param 1
    has no grad at step 3; grads alternate between fresh tensors and in-place
    accumulation (zero_grad(set_to_none=False)); at step 6 param 0's data is
    replaced. Returns (params, optimizer, state saved after step 5, graphs
    compiled after the first step)."""
    params = [torch.tensor(p, requires_grad=True) for p in PARAMS[:3]]  # 0-d: no flat path
    opt = pt.Adam(params, lr=0.01, weight_decay=0.01, compiled=compiled)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t))
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    saved, after_first = None, None
    for t in steps:
        for i, (p, g) in enumerate(zip(params, GRADS[t])):
            if t == 3 and i == 1:
                p.grad = None
            elif p.grad is not None and t % 2:
                p.grad.zero_().add_(torch.tensor(g))
            else:
                p.grad = torch.tensor(g)
        if compiled and t == 6:
            with torch.no_grad():
                params[0].data = params[0].data.clone()  # the flat params are re-made
        opt.step()
        sched.step()
        after_first = graphs() if after_first is None else after_first
        if t == 5:
            saved = copy.deepcopy({"params": [p.detach() for p in params],
                                   "opt": opt.state_dict(), "sched": sched.state_dict()})
    return params, opt, saved, after_first


def test_flat_path_gives_the_eager_numbers_and_keeps_torch_state(inductor_cache):
    eager, eager_opt, _, _ = _run(False)
    fast, fast_opt, saved, after_first = _run(True)
    # one compilation per bucket structure: the full group, then (param 1 missed
    # a step, so its count differs) params 0 and 2, and param 1 alone; never
    # one for the changing lr
    compiled = graphs()
    assert max_rel_diff([p.detach().numpy() for p in fast],
                        [p.detach().numpy() for p in eager]) <= 1e-12
    assert max_rel_diff([p.detach().numpy() for p in eager], PARAMS[:3]) > 1e-2
    state, expected = fast_opt.state_dict(), eager_opt.state_dict()
    assert state["state"].keys() == expected["state"].keys()
    for i, p in enumerate(fast):
        st, ref = state["state"][i], expected["state"][i]
        assert st.keys() == ref.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert st["exp_avg"].shape == p.shape and st["step"].shape == ()
        assert st["step"].item() == ref["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(st[key], ref[key], rtol=1e-12, atol=0)
    # the flat path ran: the params, and each slot's state, are views of one buffer
    assert fast[0].untyped_storage().data_ptr() == fast[2].untyped_storage().data_ptr()
    storages = {fast_opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in fast}
    assert len(storages) == 2  # buckets {0, 2} and {1}
    # resumed from the state_dict after step 5: bitwise the uninterrupted run,
    # with the compiled steps reused
    resumed, _, _, _ = _run(True, range(6, 10), saved)
    assert all((a == b).all() for a, b in zip(resumed, fast))
    assert graphs() == compiled
    assert after_first is not None and compiled > after_first  # the later buckets compiled


def test_flat_path_under_grad_scaler_with_grads_accumulated_in_place(inductor_cache):
    """float32 Adam, GradScaler, zero_grad(set_to_none=False): backward
    accumulates into the flat grad buffer's views (no gather after the first
    step), a step with an inf is skipped, and the run is torch.optim.Adam's."""

    def train(make, inject_inf):
        params = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in PARAMS[:3]]
        opt = make(params)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
        pointers = set()
        for t in range(10):
            opt.zero_grad(set_to_none=False)
            loss = sum((p * torch.tensor(g, dtype=torch.float32)).sum()
                       for p, g in zip(params, GRADS[t]))
            scaler.scale(loss).backward()
            if t >= 2 and params[0].grad is not None:
                pointers.add(params[0].grad.data_ptr())
            if inject_inf and t == 4:
                params[0].grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in params]
            scaler.step(opt)
            if inject_inf and t == 4:
                assert all((a == b).all() for a, b in zip(before, params))
            scaler.update()
        return params, opt, scaler, pointers

    ours, opt, _, pointers = train(lambda ps: pt.Adam(ps, lr=0.01, compiled=True), False)
    assert len(pointers) == 1  # the same flat grad buffer at every step
    theirs, _, _, _ = train(lambda ps: torch.optim.Adam(ps, lr=0.01), False)
    assert max_rel_diff([p.detach().numpy() for p in ours],
                        [p.detach().numpy() for p in theirs]) <= 1e-6
    skipped, opt, scaler, _ = train(lambda ps: pt.Adam(ps, lr=0.01, compiled=True), True)
    assert scaler.get_scale() == 512.0
    assert int(opt.state[skipped[0]]["step"]) == 9


def test_fresh_grads_are_read_where_they_are_and_kept_grads_are_gathered_once(inductor_cache):
    """A training loop with zero_grad() (set_to_none, the default) brings fresh
    grads at every step: the compiled step reads them where autograd put them
    (per param, no gather into the flat grad buffer) and leaves each ``.grad``
    the tensor autograd made. Then zero_grad(set_to_none=False): the grads
    come back as the same tensors, are gathered once and become views of the
    flat grad buffer, which autograd then accumulates into. Throughout, the
    numbers are torch.optim.Adam's, run beside it (float64, 1e-12 relative)."""

    def train(make):
        params = [torch.tensor(p, requires_grad=True) for p in PARAMS[:3]]
        opt = make(params)
        made, kept = [], []
        for t in range(10):
            opt.zero_grad(set_to_none=t < 6)
            sum((p * torch.tensor(g)).sum() for p, g in zip(params, GRADS[t])).backward()
            grads = [p.grad for p in params]
            opt.step()
            made.append(all(p.grad is g for p, g in zip(params, grads)))
            kept.append([p.grad.untyped_storage().data_ptr() for p in params])
        return params, opt, made, kept

    ours, opt, made, kept = train(lambda ps: pt.Adam(ps, lr=0.01, weight_decay=0.01,
                                                     compiled=True))
    theirs, _, _, _ = train(lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01,
                                                        foreach=False))
    assert max_rel_diff([p.detach().numpy() for p in ours],
                        [p.detach().numpy() for p in theirs]) <= 1e-12
    assert max_rel_diff([p.detach().numpy() for p in ours], PARAMS[:3]) > 1e-2
    flat = opt._buckets[tuple(map(id, ours))].flat
    assert all(p.untyped_storage().data_ptr() == flat.flat_p.data_ptr() for p in ours)
    # fresh grads at steps 0-5
    assert made[:6] == [True] * 6
    assert all(ptr != flat.flat_g.data_ptr() for step in kept[:6] for ptr in step)
    # step 6 brings step 5's grads back (zeroed, accumulated in place): gathered
    # once, re-homed; autograd accumulates into the flat buffer's views after it
    assert made[6:] == [False, True, True, True]
    assert all(ptr == flat.flat_g.data_ptr() for step in kept[6:] for ptr in step)
    kinds = {key[0] for key in _flat._COMPILED_STEPS if key[1] is pt.Adam}
    assert {"views", "flat"} <= kinds


@pytest.mark.parametrize("name", ["Adam", "Ranger"])
def test_compiled_step_reads_grads_of_any_strides_as_torch_does(inductor_cache, name):
    """Fresh grads contiguous, transposed (non-contiguous: gathered), with an odd
    stride on a size-1 axis (contiguous), then kept: the compiled kernels
    (which skip inductor's stride asserts for inputs they checked) give the
    numbers of torch.optim.Adam run beside them, and of the eager default
    for Ranger (float64, 1e-12 relative)."""
    rng = torch.Generator().manual_seed(5)
    values = [torch.randn(4, 3, generator=rng, dtype=torch.float64),
              torch.randn(3, 1, generator=rng, dtype=torch.float64)]
    grads = [[torch.randn(v.shape, generator=rng, dtype=torch.float64) for v in values]
             for _ in range(8)]

    def laid_out(g: torch.Tensor, t: int) -> torch.Tensor:
        if t % 3 == 1:  # the same values, transposed storage
            return g.t().contiguous().t() if g.shape[1] > 1 else g.clone()
        if t % 3 == 2 and g.shape[1] == 1:  # stride 5 on the size-1 axis
            return torch.empty_strided(g.shape, (1, 5), dtype=g.dtype).copy_(g)
        return g.clone()

    def train(make):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = make(params)
        for t, step in enumerate(grads):
            if t < 6 or params[0].grad is None:
                for p, g in zip(params, step):
                    p.grad = laid_out(g, t)
            else:  # kept: written in place
                for p, g in zip(params, step):
                    p.grad.copy_(g)
            opt.step()
        return [p.detach().numpy() for p in params]

    if name == "Adam":
        reference = train(lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=False))
        ours = train(lambda ps: pt.Adam(ps, lr=0.05, compiled=True))
    else:
        reference = train(lambda ps: pt.Ranger(ps, lr=0.05))
        ours = train(lambda ps: pt.Ranger(ps, lr=0.05, compiled=True))
    assert max_rel_diff(ours, reference) <= 1e-12
    assert max_rel_diff(ours, [v.numpy() for v in values]) > 1e-3


def test_flat_path_starts_momentum_buffers_when_momentum_becomes_non_zero(inductor_cache):
    """SGD built with momentum 0 keeps no buffer; when a scheduler (here: by
    hand) makes momentum non-zero the rule starts one, which the flat path
    receives from the compiled step and keeps as a flat buffer (float32: the
    eager numbers to 1e-6 relative)."""

    def run(compiled):
        params = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in PARAMS[:3]]
        opt = pt.SGD(params, lr=0.05, momentum=0.0, compiled=compiled)
        for t in range(8):
            if t == 3:
                opt.param_groups[0]["momentum"] = 0.9
            for p, g in zip(params, GRADS[t]):
                p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
        return params, opt

    eager, _ = run(False)
    fast, opt = run(True)
    assert max_rel_diff([p.detach().numpy() for p in fast],
                        [p.detach().numpy() for p in eager]) <= 1e-6
    buffers = [opt.state[p]["momentum_buffer"] for p in fast]
    assert [b.shape for b in buffers] == [p.shape for p in fast]
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1


def test_flat_steady_state_still_checks_every_edit_of_a_group(inductor_cache):
    """The steady state reuses the last step's checks while nothing changed; an
    edit of any value is checked again before anything moves: a bad lr or
    betas set between steps raises naming it, and params and state stay as
    they were; a good edit then steps with the new value."""
    params = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in PARAMS[:3]]
    opt = pt.Adam(params, lr=0.01, compiled=True)
    for t in range(4):
        for p, g in zip(params, GRADS[t]):
            if p.grad is None:
                p.grad = torch.tensor(g, dtype=torch.float32)
            else:  # written in place (as zero_grad(set_to_none=False) and a backward)
                p.grad.copy_(torch.tensor(g, dtype=torch.float32))
        opt.step()
    assert 0 in opt._steady  # the last steps took the steady path
    group = opt.param_groups[0]
    snapshot = copy.deepcopy(([p.detach() for p in params], opt.state_dict()))
    for key, bad, message in (("lr", -1.0, "lr must be a number"),
                              ("lr", True, "lr must be a number"),
                              ("betas", (0.9, 1.5), "betas"),
                              ("eps", -1e-8, "eps must be")):
        good = group[key]
        group[key] = bad
        with pytest.raises((TypeError, ValueError), match=message) as info:
            opt.step()
        assert "param group 0" in str(info.value)
        group[key] = good
        assert all((p == q).all() for p, q in zip(params, snapshot[0]))
        state = opt.state_dict()["state"]
        assert all(int(state[i]["step"]) == 4 for i in state)
        for i in state:
            assert (state[i]["exp_avg"] == snapshot[1]["state"][i]["exp_avg"]).all()
    group["lr"] = 0.0  # a valid edit: lr 0 leaves the params where they are
    opt.step()
    assert all((p == q).all() for p, q in zip(params, snapshot[0]))
    assert int(opt.state_dict()["state"][0]["step"]) == 5


def test_ranger_runs_flat_with_per_tensor_views_for_gradient_centralization(inductor_cache):
    """Ranger centralizes each gradient around its own mean, so its flat step
    takes the per-parameter views of the flat buffers instead of their
    concatenation: float64, 14 steps (two Lookahead syncs), the eager numbers
    to 1e-12, its state one flat buffer per slot; and centralization did act
    (without it the run ends elsewhere)."""

    def run(compiled, **options):
        params = [torch.tensor(p, requires_grad=True) for p in PARAMS[:3]]
        opt = pt.Ranger(params, lr=0.05, compiled=compiled, **options)
        for t in range(14):
            for p, g in zip(params, GRADS[t]):
                p.grad = torch.tensor(g)
            opt.step()
        return [p.detach().numpy() for p in params], opt

    eager, _ = run(False)
    fast, opt = run(True)
    assert max_rel_diff(fast, eager) <= 1e-12
    for key in ("slow_buffer", "exp_avg", "exp_avg_sq"):
        storages = {opt.state[p][key].untyped_storage().data_ptr()
                    for p in opt.param_groups[0]["params"]}
        assert len(storages) == 1
    plain, _ = run(False, gradient_centralization=False)
    assert max_rel_diff(plain, eager) > 1e-3


@pytest.mark.parametrize("name", ["Adafactor", "Lamb", "Lars"])
def test_per_tensor_rules_run_flat_on_per_param_views(inductor_cache, name):
    """Adafactor (factored statistics, per-tensor RMS) and Lamb/Lars (per-tensor
    trust-ratio norms) are not elementwise: compiled=True runs them in one
    compiled step on the per-parameter views of the bucket's flat buffers.
    float64, 8 steps: the eager numbers to 1e-12, every param in a flat
    bucket whose state entries are views of its buffers."""

    def run(compiled):
        params = [torch.tensor(p, requires_grad=True) for p in PARAMS[:3]]
        opt = getattr(pt, name)(params, lr=0.01, compiled=compiled)
        for t in range(8):
            for p, g in zip(params, GRADS[t]):
                p.grad = torch.tensor(g)
            opt.step()
        return params, opt

    eager, eager_opt = run(False)
    fast, opt = run(True)
    assert not eager_opt.elementwise(eager_opt._values(eager_opt.param_groups[0]))
    assert max_rel_diff([p.detach().numpy() for p in fast],
                        [p.detach().numpy() for p in eager]) <= 1e-12
    # it moved (Lars: lr times its trust coefficient 0.001 of the param norm)
    assert max_rel_diff([p.detach().numpy() for p in eager], PARAMS[:3]) > 1e-4
    covered = set()
    for ids, bucket in opt._buckets.items():
        covered |= set(ids)
        for key, (buffer, views) in bucket.buffers.items():
            assert all(st[key] is v for st, v in zip(bucket.states, views))
            assert {v.untyped_storage().data_ptr() for v in views} == {
                buffer.untyped_storage().data_ptr()}
    assert covered == set(map(id, fast))


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh grads", "kept grads"])
def test_the_step_counts_its_change_of_each_param_as_torch_optim_does(fresh):
    """Autograd refuses a backward through a graph that saved a param the
    step changed since (the param's version counter), as after
    torch.optim.Adam's step. The compiled step writes the params through
    views of a flat buffer (``p.data``: a version counter of its own) and
    counts the change on the params themselves: with fresh grads (the
    per-param kernel) and kept ones (the flat kernel)."""
    x = torch.randn(3, 4, requires_grad=True)
    outcomes = []
    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1),
                 lambda ps: pt.preset("torch.optim.Adam", ps, lr=0.1, compiled=True)):
        params = [torch.randn(4, 2, requires_grad=True), torch.randn(2, requires_grad=True)]
        opt = make(params)
        for t in range(4):
            if fresh or t == 0:
                for p in params:
                    p.grad = torch.randn_like(p)
            if t == 3:
                versions = [p._version for p in params]
                loss = (x @ params[0] + params[1]).square().sum()  # saves both params
            opt.step()
        assert all(p._version > v for p, v in zip(params, versions))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        outcomes.append([p._version - v for p, v in zip(params, versions)])
    assert outcomes[1] == outcomes[0]
