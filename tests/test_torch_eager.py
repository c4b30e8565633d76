"""The eager default replays an elementwise rule's recorded operations on
cache-sized pieces of the params (polyopt.torch._eager): tensors larger than a
piece split into 1-d views, results in reused buffers, new state written in
place, small tensors replayed together (gathered into one piece), and each
product by a 0-d value that an addition reads contracted into it (one fused
multiply-add, one rounding instead of two). Its numbers do not depend on the
pieces, bit for bit: each optimizer is run side by side replayed with pieces
of 8 elements (tensors split, three small ones gathered, 16-bit and float64
params, a non-contiguous param that goes whole) and with pieces larger than
all params; and they are the per-tensor step's (the replay switched off: one
rule call on the whole tensors) but for those roundings. The parity of the
eager path with torch.optim itself is tests/test_torch_parity.py's.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import polyopt.torch as pt
from polyopt.torch import _eager
from polyopt.torch.optimizers import OPTIMIZERS

SHAPES = [(6, 5), (40,), (3,), (), (4, 3, 2, 2), (2,), (5,), (3,)]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float16,
          torch.float32, torch.float32, torch.float16]
EXTRA = {"sgd": {"momentum": 0.9, "nesterov": True}}
ELIGIBLE = _eager.eligible


@pytest.fixture(autouse=True)
def _own_recordings(monkeypatch):
    """Each test starts with no kept recordings: the tests that count
    recordings would otherwise see the cache of _KEPT entries emptied by the
    tests run before them."""
    monkeypatch.setattr(_eager, "_PLANS", {})


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in zip(SHAPES, DTYPES):
        params.append(torch.randn(shape, generator=gen).to(dtype).requires_grad_())
    # a non-contiguous param (a transposed view's layout): goes whole into a call
    params.append(torch.randn(7, 9, generator=gen).t().contiguous().t().requires_grad_())
    return params


def run(make, chunk: int | None, monkeypatch, steps: int = 6) -> list:
    """Snapshots of params and state after each step; ``chunk`` None: the
    per-tensor step (no replay)."""
    if chunk is None:
        monkeypatch.setattr(_eager, "eligible", lambda rule: False)
    else:
        monkeypatch.setattr(_eager, "eligible", ELIGIBLE)
        monkeypatch.setattr(_eager, "CHUNK", chunk)
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


#: How far the replay may be from the per-tensor step, in units of the
#: dtype's eps times the tensor's largest magnitude: the contracted products'
#: roundings carried through the steps (measured: at most 5.5 in 6 steps,
#: SGD with Nesterov momentum; 0.9-3.2 for the others).
ROUNDINGS = 16


def _pairs(a, b, where: str):
    """(step, what, tensor of a, tensor of b) over two runs' snapshots: every
    param and state entry, the state keys checked equal."""
    for t, ((pa, sa), (pb, sb)) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            yield t, f"param {i}", x, y
        for i, (x, y) in enumerate(zip(sa, sb)):
            assert x.keys() == y.keys(), f"{where}: step {t}, state keys of param {i}"
            for k in x:
                yield t, f"state {k} of param {i}", x[k], y[k]


def assert_within_roundings(a, b, where: str) -> None:
    for t, what, x, y in _pairs(a, b, where):
        if not y.is_floating_point():
            assert torch.equal(x, y), f"{where}: step {t}, {what} differs"
            continue
        if not y.numel():
            continue
        scale = ROUNDINGS * torch.finfo(y.dtype).eps * max(y.abs().max().item(), 1e-30)
        diff = (x.double() - y.double()).abs().max().item()
        assert x.dtype == y.dtype and diff <= scale, (
            f"{where}: step {t}, {what} differs by {diff:.3g} (allowed {scale:.3g})")


def assert_bitwise(a, b, where: str) -> None:
    for t, what, x, y in _pairs(a, b, where):
        assert torch.equal(x, y), f"{where}: step {t}, {what} differs"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pieces_give_the_same_numbers_and_the_per_tensor_steps(name, monkeypatch):
    cls = OPTIMIZERS[name]

    def make(params):
        return cls(params, **EXTRA.get(name, {}))

    whole = run(make, None, monkeypatch)
    replayed = []
    step = _eager.step
    monkeypatch.setattr(_eager, "step", lambda *a, **k: replayed.append(step(*a, **k))
                        or replayed[-1])
    pieces = run(make, 8, monkeypatch)
    # every elementwise rule is replayed, and the elementwise rest of a rule
    # with a per-tensor prefix (Ranger); the others run per tensor
    if _eager.parts(cls.factory()):
        assert replayed and all(replayed)
        assert_bitwise(pieces, run(make, 1 << 40, monkeypatch), name)
        assert_within_roundings(pieces, whole, name)
    else:
        assert not replayed
        assert_bitwise(pieces, whole, name)
    # the params moved (a step that does nothing would pass the comparison)
    assert not torch.equal(pieces[-1][0][0], make_params()[0].detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_product_added_after_it_is_one_fused_multiply_add(dtype, monkeypatch):
    """SGD with momentum, ``m * 0.9 + g`` and ``p + (-lr) * m``, replayed as
    ``torch.add(g, m, alpha=0.9)`` and ``p.add_(m, alpha=-lr)``: torch's
    kernels round those once (a fused multiply-add), in pieces, gathered and
    whole alike, and that is what the replay gives, bit for bit."""
    monkeypatch.setattr(_eager, "CHUNK", 64)
    gen = torch.Generator().manual_seed(3)
    shapes = [(20, 10), (7,), (5,), (300,)]  # split, gathered, gathered, split
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    p, m = [x.detach().clone() for x in params], [None] * len(params)
    opt = pt.SGD(params, lr=0.01, momentum=0.9)
    twice = []  # the same steps with two roundings each
    for _ in range(3):
        for x in params:
            x.grad = torch.randn(x.shape, generator=gen, dtype=dtype)
        opt.step()
        for i, x in enumerate(params):
            g = x.grad
            old = m[i] if m[i] is not None else torch.zeros_like(g)
            twice.append(p[i] + (old * 0.9 + g) * -0.01)
            m[i] = torch.add(g, old, alpha=0.9)
            p[i] = torch.add(p[i], m[i], alpha=-0.01)
    for i, x in enumerate(params):
        assert torch.equal(opt.state[x]["momentum_buffer"], m[i]), i
        assert torch.equal(x.detach(), p[i]), i
    # the test sees the contraction: two roundings give other numbers
    assert not all(torch.equal(a, b) for a, b in zip(twice[-len(p):], p))


def _s(like: torch.Tensor, value: float = 0.25) -> torch.Tensor:
    """A 0-d constant of ``like``'s dtype (as the rules' Python numbers are recorded)."""
    return torch.tensor(value, dtype=like.dtype)


#: name -> (the rule's operations on x, y, z, e; the one operation they become:
#: function, argument variables, keyword arguments)
_CONTRACTIONS = {
    "y + x * s": (lambda x, y, z, e: torch.add(y, torch.mul(x, _s(x))),
                  torch.add, [1, 0], {"alpha": 0.25}),
    "x * s + y": (lambda x, y, z, e: torch.add(torch.mul(_s(x), x), y),
                  torch.add, [1, 0], {"alpha": 0.25}),
    "y - x * s": (lambda x, y, z, e: torch.sub(y, torch.mul(x, _s(x))),
                  torch.sub, [1, 0], {"alpha": 0.25}),
    "y + (x * s) * z": (lambda x, y, z, e: torch.add(y, torch.mul(z, torch.mul(x, _s(x)))),
                        torch.addcmul, [1, 0, 2], {"value": 0.25}),
    "y + x * z": (lambda x, y, z, e: torch.add(y, torch.mul(x, z)),
                  torch.addcmul, [1, 0, 2], {}),
    "y + s * (e - y)": (lambda x, y, z, e: torch.add(y, torch.mul(torch.sub(e, y), _s(x))),
                        torch.lerp, [1, 3, 0.25], {}),
    "y + (x * s) / z": (lambda x, y, z, e: torch.add(torch.div(torch.mul(x, _s(x)), z), y),
                        torch.addcdiv, [1, 0, 2], {"value": 0.25}),
    "y.add_(x * s)": (lambda x, y, z, e: y.add_(torch.mul(x, _s(x))),
                      torch.Tensor.add_, [1, 0], {"alpha": 0.25}),
    "y.add_((x * s) / z)": (lambda x, y, z, e: y.add_(torch.div(torch.mul(x, _s(x)), z)),
                            torch.Tensor.addcdiv_, [1, 0, 2], {"value": 0.25}),
}


def _recorded(body, dtype=torch.float32) -> tuple:
    """(the ops ``body`` records on four piece stand-ins x, y, z, e, and those
    ops contracted); ``body`` returns the outputs."""
    rec = _eager._Recorder([torch.zeros(1, dtype=dtype) for _ in range(4)], 4)
    with rec:
        results = body(*rec.tensors[:4])
    outputs = [rec.index[id(r)] for r in results]
    return rec.ops, _eager._contracted(rec, rec.ops, outputs)


@pytest.mark.parametrize("name", _CONTRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sum_of_a_product_is_one_operation(name, dtype):
    """Each pattern of ``_eager._contracted`` becomes the one torch operation
    that rounds it once (or, ``addcdiv``, as its operations do)."""
    body, func, args, kwargs = _CONTRACTIONS[name]
    _, contracted = _recorded(lambda *v: [body(*v)], dtype)
    (f, a, kw, _, _), = contracted
    assert f is func and [x.index if isinstance(x, _eager._Ref) else x for x in a] == args
    assert kw == kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fused_operations_round_as_the_contraction_says(dtype):
    """What the contraction relies on, measured on torch's kernels over a
    vectorised body and a scalar tail (4,099 elements): ``add(alpha=)``,
    ``addcmul`` and ``lerp`` (weight < 0.5) are one fused multiply-add,
    ``addcdiv`` is its three roundings. The exact result is taken in float64
    (float32) or with fractions (float64)."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(0)
    x, y, z, e = (torch.randn(4099, generator=gen, dtype=dtype) for _ in range(4))
    s = float(_s(x, 0.1))  # the number a recorded 0.1 holds

    def fma(a, b, c):  # the exactly rounded a * b + c
        exact = [Fraction(float(u)) * Fraction(float(v)) + Fraction(float(w))
                 for u, v, w in zip(a.tolist(), b.tolist(), c.tolist())]
        return torch.tensor([float(q) for q in exact], dtype=torch.float64).to(dtype)

    sx = torch.full_like(x, s)
    assert torch.equal(torch.add(y, x, alpha=s), fma(x, sx, y))
    assert torch.equal(torch.addcmul(y, x, z, value=s), fma(x * s, z, y))
    assert torch.equal(torch.addcmul(y, x, z), fma(x, z, y))
    assert torch.equal(torch.lerp(y, e, s), fma(e - y, sx, y))
    assert torch.equal(torch.addcdiv(y, x, z, value=s), y + (x * s) / z)
    # and a fused multiply-add is not the two roundings
    assert not torch.equal(fma(x, z, y), y + x * z)


def test_a_product_is_contracted_only_into_its_one_reader_as_it_was():
    """A product joins the addition after it only when that addition is its
    only reader, no factor is written in place in between, the dtype is
    float32 or float64, and (``lerp``) torch's kernel takes the weight's
    fused branch (below 0.5)."""
    refused = {
        "a factor written in between": lambda x, y, z, e: [
            torch.add(y, (torch.mul(x, _s(x)), x.add_(1))[0])],
        "a second reader": lambda x, y, z, e: [
            torch.add(y, t := torch.mul(x, _s(x))), torch.sqrt(t)],
        "a quotient read twice": lambda x, y, z, e: [
            torch.add(y, q := torch.div(torch.mul(x, _s(x)), z)), torch.sqrt(q)],
        "a divisor written in between": lambda x, y, z, e: [
            torch.add(y, (torch.div(torch.mul(x, _s(x)), z), z.add_(1))[0])],
    }
    for case, body in refused.items():
        ops, contracted = _recorded(body)
        assert contracted == ops, case
    ops, contracted = _recorded(lambda *v: [_CONTRACTIONS["y + x * s"][0](*v)], torch.float16)
    assert contracted == ops
    # a product plus a quotient (AdamW's u + (-lr wd) p): the quotient joins
    # the sum (addcdiv), one pass fewer than the product joining it
    ops, contracted = _recorded(lambda x, y, z, e: [
        torch.add(torch.div(torch.mul(x, _s(x)), z), torch.mul(y, _s(y, -0.5)))])
    assert [f for f, *_ in contracted] == [torch.mul, torch.addcdiv]
    # lerp's weight 0.75 (its kernel's other branch): the product alone joins the sum
    ops, contracted = _recorded(
        lambda x, y, z, e: [torch.add(y, torch.mul(torch.sub(e, y), _s(x, 0.75)))])
    assert [f for f, *_ in contracted] == [torch.sub, torch.add]


def test_a_result_nothing_reads_is_not_replayed():
    """``_eager._live``: an operation whose result nothing reads (a rule's
    ``count == 0`` only another branch used) and that writes nothing is left
    out of the replay; one writing in place (``x.add_``), or with ``out=``,
    stays, as do the operations it reads."""
    ops, _ = _recorded(lambda x, y, z, e: [
        torch.mul(x, 2.0), torch.eq(y, 0), y.add_(torch.sqrt(z)),
        torch.exp(e, out=torch.empty(1))][:1])
    kept = _eager._live(ops, [ops[0][3]])
    assert [f for f, *_ in kept] == [torch.mul, torch.sqrt, torch.Tensor.add_, torch.exp]
    assert [f for f, *_ in ops] == [torch.mul, torch.eq, torch.sqrt, torch.Tensor.add_,
                                    torch.exp]
    # a dunder method is no in-place one: SGD's 0-d part drops count == 0
    ops, _ = _recorded(lambda x, y, z, e: [x + 1, x == 0][:1])
    assert [f.__name__ for f, *_ in ops] == ["add", "__eq__"]
    assert [f.__name__ for f, *_ in _eager._live(ops, [ops[0][3]])] == ["add"]


def test_adam_moments_are_torch_optims_bit_for_bit(monkeypatch):
    """polyopt.torch.Adam's eager step computes m and v as torch.optim.Adam
    does (``lerp_``; ``mul_`` and ``addcmul_``), so its state equals
    torch.optim.Adam's bit for bit after steps on the same grads, in pieces,
    gathered and whole; the params agree to float32 roundings (the bias
    corrections are computed otherwise)."""
    monkeypatch.setattr(_eager, "CHUNK", 64)
    gen = torch.Generator().manual_seed(5)
    shapes = [(20, 10), (7,), (5,), (300,)]  # split, gathered, gathered, split
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opts = pt.Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01, foreach=False)
    m = [torch.zeros_like(p) for p in ours]
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
        m = [0.9 * old + 0.1 * p.grad for old, p in zip(m, ours)]  # rounded twice
    for a, b in zip(ours, theirs):
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[a][slot], opts[1].state[b][slot]), slot
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the test sees the formulation: b1 m + (1 - b1) g gives other numbers
    assert not all(torch.equal(opts[0].state[a]["exp_avg"], old) for a, old in zip(ours, m))


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
        whole = run(make, None, monkeypatch)
        assert_within_roundings(pieces, whole, where)
        assert "momentum_buffer" in dict(pieces[-1][1][0]) or where != "sgd momentum at run time"


def _kept(opt) -> list:
    """The (signature, groups, flat 0-d state) an optimizer keeps per bucket
    (not the buckets in use)."""
    return [v for k, v in opt._eager_kept.items() if k is not None]


def _schedules(opt) -> list:
    """The eager schedules an optimizer keeps (one per bucket, dtypes and
    variant of the program)."""
    return [schedule for _, groups, _ in _kept(opt)
            for group in groups for schedule in group[3].values()]


def test_the_schedule_of_a_bucket(monkeypatch):
    """A member larger than a piece is cut into 1-d views of at most CHUNK
    elements (params and state in step), small contiguous ones are gathered
    (one left alone in its group goes as it is), one of at most CHUNK
    elements goes as it is (non-contiguous too, with buffers of its shape), a
    larger non-contiguous one whole."""
    monkeypatch.setattr(_eager, "CHUNK", 8)
    a = torch.arange(20.0).reshape(4, 5).requires_grad_()
    b = torch.randn(3, requires_grad=True)
    c = torch.randn(9, 7).t().requires_grad_()  # 63 elements, not contiguous
    d = torch.randn(3, 2).t().requires_grad_()  # 6 elements, not contiguous
    e = torch.randn(2, requires_grad=True)
    f = torch.randn(5, requires_grad=True)  # b and e fill a piece with 5: f alone
    opt = pt.Adam([a, b, c, d, e, f], lr=0.1)
    for _ in range(2):
        for p in (a, b, c, d, e, f):
            p.grad = torch.ones_like(p)
        opt.step()
    (schedule,) = _schedules(opt)
    kinds = {}
    for task in schedule.tasks:
        kinds.setdefault(task[0], []).append(task)
    assert sorted(kinds) == ["gathered", "one", "pieces", "whole"]
    runs = kinds["pieces"][0][2]
    assert [ins[0].numel() for ins, *_ in runs] == [8, 8, 4]
    assert runs[1][0][0].data_ptr() == a.view(-1)[8:].data_ptr()  # views, not copies
    assert runs[1][0][1].data_ptr() == opt.state[a]["exp_avg"].view(-1)[8:].data_ptr()
    assert [t[1] for t in kinds["gathered"]] == [[1, 4]] and kinds["whole"][0][1] == 2
    assert [t[1] for t in kinds["one"]] == [3, 5] and kinds["one"][0][4][0].shape == d.shape
    assert kinds["one"][1][2][0] is f  # alone: f itself, not a gathered copy


def test_the_schedule_is_kept_while_params_and_state_are_the_same(monkeypatch):
    """Made at the step after the state starts, kept for the steps after; a
    loaded state (new tensors) or a param's new memory (``p.data = ...``) makes
    a new one, and the numbers stay the per-tensor step's."""
    made = []
    original = _eager._Schedule.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    def steps(replayed: bool) -> list:
        monkeypatch.setattr(_eager, "eligible", ELIGIBLE if replayed else lambda rule: False)
        monkeypatch.setattr(_eager._Schedule, "__init__", spy)
        made.clear()
        params = make_params()
        opt = pt.Adam(params, lr=0.01)
        gen = torch.Generator().manual_seed(1)
        counts = []
        for t in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if t == 3:
                opt.load_state_dict(opt.state_dict())
            if t == 5:
                params[0].data = params[0].data.clone()
            opt.step()
            counts.append(len(made))
        return counts, [p.detach().clone() for p in params], [
            {k: v.clone() for k, v in opt.state[p].items()} for p in params]

    counts, params, states = steps(True)
    # 3 dtypes: 3 schedules at the first step, kept at steps 2-3, new at 4 and 6
    assert counts == [3, 3, 3, 6, 6, 9, 9]
    _, whole_params, whole_states = steps(False)
    assert_within_roundings([(params, states)], [(whole_params, whole_states)],
                            "kept schedules")


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_small_members_state_and_the_counts_live_in_flat_tensors(monkeypatch):
    """From the step after the state starts, the slots of the small members
    (gathered into one piece) are consecutive views of one flat tensor per
    slot, which the replay reads and writes where it is, and the members'
    counts are 0-d views of one flat tensor. The state still saves and
    loads (torch.save), and an entry that the user replaces, or changes in
    place, is what the next step reads: the numbers stay the per-tensor
    step's at every step."""
    shapes = [(3,), (5,), (2, 2), (300,), (5000,)]  # four gathered, one alone

    def steps(replayed: bool) -> list:
        monkeypatch.setattr(_eager, "eligible", ELIGIBLE if replayed else lambda rule: False)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = pt.Adam(params, lr=0.01)
        snapshots = []
        for t in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if t == 3:  # replaced: a new tensor, not a view of the flat one
                opt.state[params[1]]["exp_avg"] = torch.full((5,), 0.25)
            if t == 4:  # changed in place: this member's count differs from the others'
                opt.state[params[0]]["step"].fill_(1.0)
            if t == 5:  # and equal to theirs again
                opt.state[params[0]]["step"].copy_(opt.state[params[1]]["step"])
            if t == 6:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt.load_state_dict(torch.load(buffer))
            opt.step()
            if replayed and t in (2, 7):
                for key in ("exp_avg", "exp_avg_sq"):
                    small = [opt.state[p][key] for p in params[:4]]
                    assert len(_storages(small)) == 1, (t, key)
                    assert [v.data_ptr() - small[0].data_ptr() for v in small] == [
                        4 * k for k in (0, 3, 8, 12)], (t, key)
                    assert opt.state[params[4]][key].untyped_storage().nbytes() == 4 * 5000
                steps_ = [opt.state[p]["step"] for p in params]
                assert len(_storages(steps_)) == 1 and all(v.ndim == 0 for v in steps_)
            snapshots.append(([p.detach().clone() for p in params],
                              [{k: v.clone() for k, v in opt.state[p].items()}
                               for p in params]))
        return snapshots

    replayed, whole = steps(True), steps(False)
    assert_within_roundings(replayed, whole, "flat state")
    assert [st["step"].item() for st in replayed[4][1][:2]] == [2.0, 5.0]


def test_adam_is_replayed_with_its_state_written_in_place(monkeypatch):
    """torch.optim.Adam's preset: one recording kept across steps (a program
    for the pieces, one for the 0-d part), each moment updated in place in its
    state tensor (m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(...); no copies),
    one scratch buffer."""
    programs = []
    original = _eager._Program.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        programs.append(self)

    monkeypatch.setattr(_eager._Program, "__init__", spy)
    params = [torch.randn(50, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = pt.preset("torch.optim.Adam", params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(programs) == 2
    opt.step()
    assert len(programs) == 2
    pieces, scalars = programs
    assert pieces.copies == [] and pieces.direct_inputs == [] and pieces.chained == [0, 1]
    assert pieces.buffers == [torch.float32]
    assert scalars.buffers == [] and pieces.dynamic  # the bias corrections, once a step


def _reading(base: type, read) -> type:
    """A subclass of the polyopt.torch class ``base`` whose rule first calls
    ``read(grads, state)`` (Python reading values a recording may not give)."""
    def factory(**values):
        rule = base.factory(**values)

        def update(grads, state, params):
            read(grads, state)
            return rule.update(grads, state, params)
        return rule._replace(update=update)

    return type(f"Reading{base.__name__}", (base,), {"factory": staticmethod(factory)})


def test_a_rule_that_cannot_be_replayed_runs_per_tensor(monkeypatch):
    """Python control flow on a param's values: the step is not replayed, the
    per-tensor step runs (and gives its numbers)."""
    # bool() of a param's values: a value the stand-ins cannot give
    branchy = _reading(pt.SGD, lambda grads, state: bool((grads[0] > 0).all()))
    results = []
    original = _eager.step
    monkeypatch.setattr(_eager, "step", lambda *a, **k: results.append(original(*a, **k))
                        or results[-1])

    def make(params):
        return branchy(params, momentum=0.9)

    pieces = run(make, 8, monkeypatch)
    assert results and not any(results)
    whole = run(make, None, monkeypatch)
    assert_bitwise(pieces, whole, "branchy")


def test_a_recording_serves_the_steps_until_a_hyperparameter_changes(monkeypatch):
    """One recording (its 0-d part, the bias corrections, replayed each step)
    serves the steps while the hyperparameters are unchanged; lr set by a
    scheduler or a tensor lr changed in place gives the new numbers: those
    of the per-tensor step."""
    recorded = []
    record = _eager._record
    monkeypatch.setattr(_eager, "_record", lambda *a: recorded.append(a[-1]) or record(*a))

    class Scheduled(pt.Adam):
        def step(self, closure=None):
            loss = super().step(closure)
            self.scheduler.step()
            return loss

    def scheduled(params):
        opt = Scheduled(params, lr=0.01)
        opt.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return opt

    def tensor_lr(params):
        opt = pt.Adam(params, lr=torch.tensor(0.01))
        original = opt.step
        steps = []

        def step():
            original()
            steps.append(1)
            opt.param_groups[0]["lr"].fill_(0.01 / (1 + len(steps)))
        opt.step = step
        return opt

    for where, make, values in (("scheduled", scheduled, 4), ("tensor lr", tensor_lr, 6)):
        recorded.clear()
        pieces = run(make, 8, monkeypatch)
        # a recording per value of lr (the scheduler's 0.01, 0.005, and
        # run()'s halving at step 3, 0.0025, 0.00125) and per dtype of the
        # params (3); a tensor lr at every step (it may change in place)
        assert recorded == [True] * (3 * values), where
        assert_within_roundings(pieces, run(make, None, monkeypatch), where)


def test_a_rule_reading_its_count_in_python_is_recorded_at_every_step(monkeypatch):
    """A 0-d part that a replay cannot repeat (Python reads the count) is
    recorded at every step with the count as a constant: the same numbers."""
    counting = _reading(pt.Adam, lambda grads, state: float(state.count))  # in Python
    recorded = []
    record = _eager._record
    monkeypatch.setattr(_eager, "_record", lambda *a: recorded.append(a[-1]) or record(*a))
    pieces = run(counting, 8, monkeypatch)
    # per dtype (3): the kept recording refused once per lr (2), then one a step (6)
    assert recorded.count(True) == 3 * 2 and recorded.count(False) == 3 * 6
    assert_within_roundings(pieces, run(counting, None, monkeypatch), "counting")


def test_another_thread_makes_its_own_schedule(monkeypatch):
    """Scratch buffers are per thread, so a kept schedule (which holds views of
    them) serves only the thread that made it: a step from another thread
    makes a new one."""
    import threading

    made = []
    original = _eager._Schedule.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(threading.get_ident())

    monkeypatch.setattr(_eager._Schedule, "__init__", spy)
    params = [torch.randn(30, requires_grad=True)]
    params[0].grad = torch.ones(30)
    opt = pt.Adam(params)
    opt.step()
    opt.step()
    worker = threading.Thread(target=opt.step)
    worker.start()
    worker.join()
    assert len(made) == 2 and made[0] == threading.get_ident() and made[1] != made[0]


def test_a_0d_switch_replays_the_operand_it_chooses(monkeypatch):
    """``where(c, x, y)`` on a 0-d boolean of the 0-d part (Lookahead's sync,
    RAdam's rectification) runs a variant of the program per value: the chosen
    operand itself, without the operations only the other one needs. Ranger
    between synchronisations leaves the slow weights alone and runs RAdam's
    operations only; the numbers are the per-tensor step's."""
    programs = []
    original = _eager._Program.__init__

    def spy(self, rec, ops, *args, **kwargs):
        original(self, rec, ops, *args, **kwargs)
        programs.append((self, len(ops)))

    monkeypatch.setattr(_eager._Program, "__init__", spy)
    params = [torch.randn(40, 3, requires_grad=True)]
    opt = pt.Ranger(params)
    for t in range(1, 8):
        params[0].grad = torch.randn_like(params[0])
        slow = opt.state[params[0]].get("slow_buffer")
        before = None if slow is None else slow.clone()
        opt.step()
        if before is not None and t % 6:  # not a sync step: the slow weights as they were
            assert torch.equal(opt.state[params[0]]["slow_buffer"], before)
    (_, groups, _), = _kept(opt)
    plan = groups[0][2]
    # (rectified, sync): not at steps 1-5 (rho_t <= 5), both at 6, rectified at 7
    assert list(plan.variants) == [(False, False), (True, True), (True, False)]
    general = next(n for p, n in programs if p is plan.program)
    ops = {flags: next(n for p, n in programs if p is v) for flags, v in plan.variants.items()}
    assert ops[(False, False)] < ops[(True, False)] < ops[(True, True)] < general

    monkeypatch.setattr(_eager._Program, "__init__", original)
    pieces = run(pt.Ranger, 8, monkeypatch, steps=13)
    assert_within_roundings(pieces, run(pt.Ranger, None, monkeypatch, steps=13), "Ranger")


@pytest.mark.parametrize("chunk", [None, 4096], ids=["whole", "pieces"])
def test_centralization_is_left_to_the_replay(monkeypatch, chunk):
    """Ranger's gradient centralization (its per-tensor prefix) computes the
    means only; the replay subtracts, for a tensor replayed as it is into a
    buffer of the piece size right before it reads it, for the others
    (gathered small ones; with pieces of 4096 elements, the larger ones)
    into a buffer kept for each, the same at every step. The numbers are
    those of the centered grads computed whole (``g - mean``) bit for bit,
    and ``p.grad`` stays as it was. A prefix that computes with a deferred
    result is run again without deferral (simulated: ``centered(...) * 1``)."""
    from polyopt import _namespace
    from polyopt.torch import _optimizer

    if chunk is not None:
        monkeypatch.setattr(_eager, "CHUNK", chunk)
    deferred = _optimizer.deferred_centering

    def steps(mode: str) -> tuple:
        monkeypatch.setattr(_optimizer, "deferred_centering",
                            deferred if mode != "whole" else contextlib.nullcontext)
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_()
                  for s in [(6, 3, 3, 3), (8, 6), (8,), (70, 70), (50, 20, 5)]]
        opt = pt.Ranger(params, lr=0.01)
        pointers = []
        for _ in range(7):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
            (_, groups, _), = _kept(opt)
            pointers.append({i: b.data_ptr() for i, b in groups[0][4].items()})
        return [p.detach().clone() for p in params], pointers

    whole, none = steps("whole")
    assert all(p == {} for p in none)
    deferred_run, pointers = steps("deferred")
    assert all(torch.equal(a, b) for a, b in zip(deferred_run, whole))
    assert all(p == pointers[-1] for p in pointers[1:])  # the same buffers at every step
    # centered by the replay: the small (6, 3, 3, 3) and (8, 6) ones, gathered
    # (members 0 and 1), and the two larger ones (3 and 4); not the vector (2)
    assert set(pointers[-1]) == {0, 1, 3, 4}
    scratch = _eager._scratch([torch.float32], 1, torch.device("cpu"), "centered")[0]
    piece = {i for i, ptr in pointers[-1].items() if ptr == scratch.data_ptr()}
    assert piece == ({3, 4} if chunk is None else set())  # replayed as they are

    original = _namespace.TorchFused.centered
    monkeypatch.setattr(_namespace.TorchFused, "centered",
                        staticmethod(lambda xp, x, axes: original(xp, x, axes) * 1))
    computed_with, _ = steps("deferred")
    assert all(torch.equal(a, b) for a, b in zip(computed_with, whole))


def test_centered_defers_its_work_to_the_caller_within_the_block():
    """Within deferred_centering torch's ``centered`` returns a new view of its
    operand, its values unchanged, and records how to center it; that writes
    into the caller's buffer the values ``centered`` returns outside the block."""
    from polyopt import _namespace

    x = torch.randn(4, 5, 3)
    xp = _namespace.namespace(x)
    kernels = _namespace.fused(xp)
    with _namespace.deferred_centering({}) as pending:
        view = kernels.centered(xp, x, (1, 2))
    (key, (kept, center)), = pending.items()
    assert key == id(view) and kept is view and view is not x
    assert torch.equal(view, x) and view.data_ptr() == x.data_ptr()
    out = torch.empty(4, 5, 3)
    assert center(out) is out
    alone = kernels.centered(xp, x, (1, 2))
    assert torch.equal(out, alone)
    assert torch.equal(alone, x - x.mean(dim=(1, 2), keepdim=True))


def test_a_switch_to_an_operand_changed_in_place_is_kept(monkeypatch):
    """A chosen operand that the step changes in place (the param, by
    ``p.add_``) is not taken as it is: the state would see the new param."""
    def factory(**values):
        rule = pt.Adam.factory(**values)

        def update(grads, state, params):
            updates, new = rule.update(grads, state, params)
            odd = (state.count % 2) == 1
            moments = [torch.where(odd, p, m) for p, m in zip(params, new.first_moment)]
            return updates, new._replace(first_moment=moments)
        return rule._replace(update=update)

    cls = type("Odd", (pt.Adam,), {"factory": staticmethod(factory)})
    replayed = []
    step = _eager.step
    monkeypatch.setattr(_eager, "step", lambda *a, **k: replayed.append(step(*a, **k))
                        or replayed[-1])
    pieces = run(cls, 8, monkeypatch)
    assert replayed and all(replayed)
    assert_within_roundings(pieces, run(cls, None, monkeypatch), "where(odd, p, m)")
