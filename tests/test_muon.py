"""Muon (polyopt.rules.muon): its presets side by side with the real natives, the
layouts, and the refusals.

torch.optim.Muon runs Newton-Schulz in bfloat16 (torch/optim/_muon.py:55,
``grad.bfloat16()``). Its algorithm is checked exactly in float64 with that cast
turned into a copy (``torch.Tensor.bfloat16`` patched for the run: the native's
own code, every other line as shipped), and as shipped in float32 against the
preset's bfloat16 iteration, where on torch arrays the rule runs torch's kernels
(lerp, the bfloat16 norm, addmm): the momentum is torch's bit for bit, the params
differ in the step's last roundings. optax.contrib.muon and
keras.optimizers.Muon compute in the params' dtype: float64 to 1e-10.
"""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import pytest
import torch

from polyopt import hyper, native, rules
from polyopt.rules._state import Layout, out_first, out_last

STEPS = 200
TORCH_SHAPES = [(6, 4), (3, 5), (5, 5)]


def _problem(shapes, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
    return params, grads


def _run(rule, params, grads, to=np.asarray, layouts=None):
    params = [to(p) for p in params]
    state = rules.init_of(rule, params, layouts)
    for g in grads:
        updates, state = rules.update_of(rule, [to(x) for x in g], state, params, layouts)
        params = [p + u for p, u in zip(params, updates)]
    return params


def _relative(got, expected, start) -> float:
    """The largest difference over the largest movement of the native's params."""
    out = 0.0
    for g, e, s in zip(got, expected, start):
        wide = np.complex128 if np.iscomplexobj(g) or np.iscomplexobj(e) else np.float64
        g, e = np.asarray(g, dtype=wide), np.asarray(e, dtype=wide)
        if e.size:
            out = max(out, float(np.max(np.abs(g - e)) / np.max(np.abs(e - s))))
    return out


def _torch_native(kwargs, dtype, without_bfloat16):
    params0, grads = _problem(TORCH_SHAPES)
    params = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in params0]
    optimizer = torch.optim.Muon(params, **kwargs)
    patch = (mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone())
             if without_bfloat16 else mock.MagicMock())
    with patch:
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi, dtype=dtype)
            optimizer.step()
    return [p.detach().numpy() for p in params]


TORCH_KEYS = [k for k in native.PRESETS if k.startswith("torch.optim.Muon")]
#: torch.optim.Muon in float32 (its Newton-Schulz in bfloat16) against the preset (its
#: iteration in bfloat16 too, in torch's kernels), as a fraction of the largest movement
#: over 200 steps: measured 1.3e-4 (None, 'original') and 1.7e-4 ('match_rms_adamw'),
#: the step's last roundings (1.05e-2 and 7.3e-3 with b A + c A A and a X + B X as
#: three operations each: bfloat16 keeps 8 bits). The preset iterating in float32 is
#: far (8.4e-3, 5.9e-3).
TORCH_BFLOAT16_BOUND = 1e-3


@pytest.mark.parametrize("key", TORCH_KEYS)
def test_torch_muon_preset_float64_without_its_bfloat16_cast(key):
    kwargs = eval(f"dict{key[len('torch.optim.Muon'):] or '()'}")  # noqa: S307 - our table
    params0, grads = _problem(TORCH_SHAPES)
    expected = _torch_native(kwargs, torch.float64, without_bfloat16=True)
    rule = native.preset(key, iteration_dtype=None)
    got = _run(rule, params0, grads, to=torch.tensor)
    assert _relative([g.numpy() for g in got], expected, params0) <= 1e-10


@pytest.mark.parametrize("key", TORCH_KEYS)
def test_torch_muon_preset_float32_as_shipped(key):
    kwargs = eval(f"dict{key[len('torch.optim.Muon'):] or '()'}")  # noqa: S307 - our table
    params0, grads = _problem(TORCH_SHAPES)
    expected = _torch_native(kwargs, torch.float32, without_bfloat16=False)
    start = [p.astype(np.float32) for p in params0]
    got = _run(native.preset(key), start, [[x.astype(np.float32) for x in g] for g in grads],
               to=torch.tensor)
    worst = _relative([g.numpy() for g in got], expected, start)
    assert worst <= TORCH_BFLOAT16_BOUND
    # the float32 iteration is as far from the native: its bfloat16 shows
    plain = _run(native.preset(key, iteration_dtype=None), start,
                 [[x.astype(np.float32) for x in g] for g in grads], to=torch.tensor)
    assert _relative([g.numpy() for g in plain], expected, start) > 1e-3


@pytest.mark.parametrize("nesterov", [True, False])
def test_polyopt_torch_muon_runs_torch_optim_muons_kernels(nesterov):
    """On torch arrays the rule runs torch.optim.Muon's kernels (the momentum's lerp, the
    bfloat16 norm, addmm in the iteration): after steps on the same grads its momentum
    buffers are torch's bit for bit, and the params differ only in the step's own
    roundings (torch: p (1 - lr wd) + (-lr s) O; the rule: p + ((-lr s) O - lr wd p)),
    one float32 rounding of |p| per step at most (measured: half of that)."""
    import polyopt.torch as pt

    gen = torch.Generator().manual_seed(0)
    shapes, steps = [(48, 24), (24, 48), (32, 32)], 4  # tall (transposed), wide, square
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    theirs = [p.clone().requires_grad_() for p in start]
    mine = [p.clone().requires_grad_() for p in start]
    native_opt = torch.optim.Muon(theirs, lr=0.02, nesterov=nesterov)
    polyopt_opt = pt.preset("torch.optim.Muon", mine, lr=0.02, nesterov=nesterov)
    for g in grads:
        for a, b, gi in zip(theirs, mine, g):
            a.grad, b.grad = gi.clone(), gi.clone()
        native_opt.step()
        polyopt_opt.step()
    for a, b, p0 in zip(theirs, mine, start):
        assert torch.equal(polyopt_opt.state[b]["momentum_buffer"],
                           native_opt.state[a]["momentum_buffer"])
        moved = float((a - p0).abs().max())
        worst = float((a - b).abs().max())
        assert worst <= steps * torch.finfo(torch.float32).eps * float(a.abs().max())
        assert worst < 1e-3 * moved


def test_fused_operations_are_torchs_kernels_on_torch_and_the_same_algebra_elsewhere():
    """polyopt._namespace.fused: torch's namespace gets its kernels, every other one
    (numpy, a registered namespace that is no module and not hashable, as Keras's
    TensorFlow one) the operations as written; both compute the same numbers up to
    rounding (float64), so a kernel with its arguments in another order fails here."""
    import types

    import array_api_compat.numpy as xnp
    import array_api_compat.torch as xt

    from polyopt._namespace import Fused, TorchFused, fused

    assert fused(xt) is TorchFused
    assert fused(xnp) is Fused
    assert fused(types.SimpleNamespace(__name__="torch")) is Fused
    rng = np.random.default_rng(0)
    y, a, b = (rng.normal(size=(5, 5)) for _ in range(3))
    stack = [rng.normal(size=(2, 5, 5)) for _ in range(3)]
    cases = [("lerp", (y, a, 0.05, 0.95), {}), ("lerp", (a, y, 0.95, 0.05), {}),
             ("matmul_add", (y, a, b, -4.775), {"alpha": 2.0315}),
             ("matmul_add", (y, a, b, 3.4445), {}),
             ("matmul_add", (*stack, 3.4445), {"alpha": -0.5}),
             ("minus", (y, 0.01, a), {}), ("row_major", (a.T,), {})]
    for name, args, kwargs in cases:
        expected = getattr(Fused, name)(xnp, *args, **kwargs)
        got = getattr(TorchFused, name)(xt, *[torch.tensor(x) if isinstance(x, np.ndarray)
                                               else x for x in args], **kwargs)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-13, err_msg=name)
    assert TorchFused.row_major(xt, torch.tensor(a).T).is_contiguous()
    low = torch.tensor(stack[0]).bfloat16()
    for keepdims, x in [(False, low[0]), (True, low)]:
        expected = Fused.bfloat16_norm(xt, x, keepdims)
        got = TorchFused.bfloat16_norm(xt, x, keepdims)
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert torch.equal(got, expected.bfloat16())


def test_reference_preset_is_torch_muon_with_the_references_defaults():
    """The reference (KellerJordan/Muon muon.py) adds eps to the norm where torch clamps
    it: with a norm far above eps the two coincide; the presets differ in that and in
    the reference's defaults (lr 0.02, no weight decay)."""
    params0, grads = _problem(TORCH_SHAPES)
    expected = _torch_native({"lr": 0.02, "weight_decay": 0.0}, torch.float64, True)
    same = _run(native.preset("reference:muon", iteration_dtype=None, eps_placement="clamp"),
                params0, grads, to=torch.tensor)
    assert _relative([g.numpy() for g in same], expected, params0) <= 1e-10
    # eps 1e-7 added to a norm of order 1: a relative 1e-7 per step (measured 1.8e-7)
    got = _run(native.preset("reference:muon", iteration_dtype=None), params0, grads,
               to=torch.tensor)
    assert 1e-8 < _relative([g.numpy() for g in got], expected, params0) <= 1e-6


REFERENCE_SHAPES = [(8, 3, 3, 2), (6, 4), (3, 5), (5,), ()]


def _reference_run(params0, grads, lr, weight_decay, adam_lr):
    """Keller Jordan's muon.py (PyPI muon-optimizer 0.1.0), its bfloat16 cast made a copy
    for the run. The matrices and vectors: SingleDeviceMuonWithAuxAdam as shipped (a
    use_muon group and an Adam group). The conv kernel: 0.1.0's step adds the (out,
    in*kh*kw) update to the 4-D param, which torch refuses (GitHub's muon.py reshapes it
    since), so its step is driven here through the module's own muon_update (the view,
    Newton-Schulz and the scale), then decayed and added reshaped as GitHub's step does."""
    import muon

    params = [torch.nn.Parameter(torch.tensor(p)) for p in params0]
    kernel, rest = params[0], params[1:]
    groups = [dict(params=[p for p in rest if p.ndim == 2], use_muon=True, lr=lr,
                   weight_decay=weight_decay),
              dict(params=[p for p in rest if p.ndim < 2], use_muon=False, lr=adam_lr,
                   weight_decay=weight_decay)]
    optimizer = muon.SingleDeviceMuonWithAuxAdam(groups)
    buffer = torch.zeros_like(kernel)
    with mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone()), \
            torch.no_grad():
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi)
            optimizer.step()
            update = muon.muon_update(kernel.grad, buffer, beta=0.95)
            kernel.mul_(1 - lr * weight_decay)
            kernel.add_(update.reshape(kernel.shape), alpha=-lr)
    return [p.detach().numpy() for p in params]


def test_reference_preset_is_the_reference_on_a_conv_kernel():
    """The reference views a conv kernel (out, in, kh, kw) as (out, in*kh*kw) for
    Newton-Schulz but scales by max(1, grad.size(-2) / grad.size(-1)) ** 0.5 of the
    gradient as stored (muon.py, muon_update): kh/kw, here 3/2, not out/(in*kh*kw)
    (lr_scale='spectral_last_two'). Side by side with the reference in float64."""
    import polyopt.torch as pt

    params0, grads = _problem(REFERENCE_SHAPES, steps=50)
    expected = _reference_run(params0, grads, lr=0.02, weight_decay=0.01, adam_lr=3e-4)
    assert np.max(np.abs(expected[0] - params0[0])) > 0.1

    def ours(**overrides):
        params = [torch.nn.Parameter(torch.tensor(p)) for p in params0]
        optimizer = pt.preset("reference:muon", params, iteration_dtype=None,
                              weight_decay=0.01, adam_weight_decay=0.01, **overrides)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi)
            optimizer.step()
        return [p.detach().numpy() for p in params]

    assert _relative(ours(), expected, params0) <= 1e-10
    # the scale of the (out, in*kh*kw) matrix, 1 here, is another step for the kernel
    assert _relative(ours(adjust_lr_fn="spectral")[:1], expected[:1], params0[:1]) > 1e-2


def test_a_conv_kernel_gets_the_same_update_in_torch_and_keras_layouts():
    rng = np.random.default_rng(3)
    torch_kernel = rng.normal(size=(8, 3, 3, 2))  # (out, in, kh, kw)
    grads = [rng.normal(size=torch_kernel.shape) for _ in range(20)]
    to_keras = (2, 3, 1, 0)  # (kh, kw, in, out)
    rule = rules.muon(learning_rate=0.05, weight_decay=0.01)
    got_torch = _run(rule, [torch_kernel], [[g] for g in grads], layouts=out_first)[0]
    got_keras = _run(rule, [np.transpose(torch_kernel, to_keras)],
                     [[np.transpose(g, to_keras)] for g in grads], layouts=out_last)[0]
    np.testing.assert_allclose(np.transpose(got_keras, (3, 2, 0, 1)), got_torch,
                               rtol=0, atol=1e-13)
    assert np.max(np.abs(got_torch - torch_kernel)) > 0.1
    # the layout matters: read as (kh, kw, in) x out the same numbers give another update
    other = _run(rule, [np.transpose(torch_kernel, to_keras)],
                 [[np.transpose(g, to_keras)] for g in grads], layouts=out_first)[0]
    assert np.max(np.abs(np.transpose(other, (3, 2, 0, 1)) - got_torch)) > 1e-3


def test_hybrid_steps_vectors_with_the_adam_rule():
    params0, grads = _problem([(4, 3), (3,), ()], steps=10)
    rule = rules.muon(learning_rate=0.02, adam_learning_rate=0.01, adam_weight_decay=0.1)
    got = _run(rule, params0, grads)
    adam = rules.adamw(learning_rate=0.01, b2=0.95, eps=1e-10, weight_decay=0.1)
    want = _run(adam, params0[1:], [g[1:] for g in grads])
    for g, w in zip(got[1:], want):
        np.testing.assert_array_equal(g, w)
    state = rule.init(params0)
    assert [m.shape for m in state.momentum] == [(4, 3), (0,), (0,)]
    assert [m.shape for m in state.adam.first_moment] == [(0,), (3,), ()]


@pytest.mark.parametrize("shapes", [[(4, 3), (3,), (5, 2)], [(4, 3), (5, 2)]],
                         ids=["hybrid", "matrices-only"])
def test_the_adam_part_passes_a_muon_params_placeholders_through(shapes):
    """A Muon param's (0,)-shaped Adam slots come back as they went in (the Adam
    part steps its own params only, not a placeholder per Muon param), and the
    Adam part's count still advances when every param is a matrix."""
    params, grads = _problem(shapes, steps=1)
    rule = rules.muon(learning_rate=0.02)
    state = rule.init(params)
    _, new = rule.update(grads[0], state, params)
    muon = [len(s) == 2 for s in shapes]
    for slot in ("first_moment", "second_moment"):
        for is_muon, old, now in zip(muon, getattr(state.adam, slot), getattr(new.adam, slot)):
            assert (now is old) == is_muon and now.shape == old.shape
    assert int(new.adam.count) == int(state.adam.count) + 1 == int(new.count)


def test_muon_params_all_refuses_a_vector_naming_it():
    rule = rules.muon(muon_params="all")
    params = [np.zeros((3, 2)), np.zeros(4)]
    with pytest.raises(ValueError, match=r"muon.init: params\[1\] has shape \(4,\): Muon "
                                         r"orthogonalizes matrices"):
        rule.init(params)
    with pytest.raises(ValueError, match=r"params\[0\] has shape \(\): Muon"):
        rule.init([np.zeros(())])


def test_a_layout_that_does_not_fit_is_refused_naming_the_tensor():
    rule = rules.muon()
    params = [np.zeros((3, 2, 2))]
    with pytest.raises(ValueError, match=r"muon.init: layout \(\(0,\), \(1,\)\) does not fit "
                                         r"params\[0\] of shape \(3, 2, 2\)"):
        rule.init(params, layouts=[Layout((0,), (1,))])
    state = rule.init(params)
    before = [np.copy(m) for m in state.momentum]
    with pytest.raises(ValueError, match=r"muon.update: layout .* params\[0\] of shape"):
        rule.update([np.ones((3, 2, 2))], state, params, layouts=[Layout((0,), (1,))])
    np.testing.assert_array_equal(state.momentum[0], before[0])


def test_bfloat16_iteration_is_refused_by_numpy_naming_it():
    rule = rules.muon(iteration_dtype="bfloat16")
    params = [np.zeros((3, 2))]
    with pytest.raises(TypeError, match=r"bfloat16"):
        rule.update([np.ones((3, 2))], rule.init(params), params)


def test_polyopt_torch_muon_is_torch_optim_muon_and_takes_vectors_in_its_adam_part():
    params0, grads = _problem(TORCH_SHAPES)
    expected = _torch_native({"adjust_lr_fn": "match_rms_adamw"}, torch.float64, True)
    params = [torch.tensor(p, requires_grad=True) for p in params0]
    import polyopt.torch as pt

    optimizer = pt.Muon(params, lr=1e-3, weight_decay=0.1, eps_placement="clamp",
                        adjust_lr_fn="match_rms_adamw", muon_params="all")
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = torch.tensor(gi)
        optimizer.step()
    assert _relative([p.detach().numpy() for p in params], expected, params0) <= 1e-10
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(3,\): with "
                                         r"muon_params='all'"):
        pt.Muon([torch.zeros(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True)],
                muon_params="all")
    bias = torch.zeros(3, requires_grad=True)
    hybrid = pt.Muon([{"params": [torch.zeros(3, 2, requires_grad=True)]},
                      {"params": [bias], "muon_params": "none", "adam_learning_rate": 0.1}])
    bias.grad = torch.ones(3)
    hybrid.step()
    assert set(hybrid.state[bias]) >= {"exp_avg", "exp_avg_sq"}
    assert torch.all(bias < 0)


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "unset"])
def test_polyopt_torch_muon_takes_torchs_adjust_lr_fn(adjust_lr_fn):
    """torch's spelling of lr_scale (hyper.MUON's value aliases): the same numbers as
    torch.optim.Muon given the same adjust_lr_fn, and the param group holds what
    torch's holds."""
    import polyopt.torch as pt

    given = {} if adjust_lr_fn == "unset" else {"adjust_lr_fn": adjust_lr_fn}
    params0, grads = _problem(TORCH_SHAPES)
    expected = _torch_native(given, torch.float64, True)
    params = [torch.tensor(p, requires_grad=True) for p in params0]
    optimizer = pt.preset("torch.optim.Muon", params, iteration_dtype=None, **given)
    native_group = torch.optim.Muon([torch.zeros(2, 2)], **given).param_groups[0]
    ours = optimizer.state_dict()["param_groups"][0]
    assert ours["adjust_lr_fn"] == native_group["adjust_lr_fn"]
    assert {k: ours[k] for k in native_group if k != "params"} == {
        k: v for k, v in native_group.items() if k != "params"}
    scale = "rms" if adjust_lr_fn == "match_rms_adamw" else "spectral"
    assert optimizer._values(optimizer.param_groups[0])["lr_scale"] == scale
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = torch.tensor(gi)
        optimizer.step()
    assert _relative([p.detach().numpy() for p in params], expected, params0) <= 1e-10


def test_polyopt_torch_muon_refuses_an_adjust_lr_fn_torch_refuses():
    import polyopt.torch as pt

    params = [torch.zeros(2, 2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Adjust learning rate function arbitrary"):
        torch.optim.Muon(params, adjust_lr_fn="arbitrary")
    with pytest.raises(ValueError, match=r"muon: adjust_lr_fn must be one of 'spectral', "
                       r"'rms', 'none', 'spectral_last_two', or torch's None "
                       r"\(lr_scale='spectral'\), 'original' \(lr_scale='spectral'\), "
                       r"'match_rms_adamw' \(lr_scale='rms'\), "
                       r"got adjust_lr_fn='arbitrary'"):
        pt.Muon(params, adjust_lr_fn="arbitrary")
    optimizer = pt.Muon(params)
    with pytest.raises(ValueError, match=r"got adjust_lr_fn='Original' \(param group 1\)"):
        optimizer.add_param_group({"params": [torch.zeros(3, 2, requires_grad=True)],
                                   "adjust_lr_fn": "Original"})
    assert len(optimizer.param_groups) == 1
    # polyopt's own values are torch-spelled too: 'none' has no torch spelling
    assert pt.Muon(params, adjust_lr_fn="none")._values(
        pt.Muon(params, adjust_lr_fn="none").param_groups[0])["lr_scale"] == "none"


@pytest.mark.needs("jax")  # optax
def test_polyopt_optax_muon_is_optax_contrib_muon():
    import optax

    import polyopt.optax as po

    shapes = [(6, 4), (3,), (3, 5), (5, 5), ()]
    params0, grads = _problem(shapes)
    # x64 is on (tests/conftest.py)

    options = native.PRESETS["optax.contrib.muon"][1]
    spelled = {po.muon.spec[k].spelling("optax"): v for k, v in options.items()}
    for extra, mine in (({}, {}), ({"nesterov": False, "weight_decay": 0.1,
                                    "adam_weight_decay": 0.05, "consistent_rms": 0.3},
                                   {"nesterov": False, "adam_nesterov": False,
                                    "weight_decay": 0.1, "adam_weight_decay": 0.05,
                                    "lr_scale": "rms", "rms_scale": 0.3})):
        want = _run_optax(optax.contrib.muon(0.01, **extra), params0, grads)
        got = _run_optax(po.muon(learning_rate=0.01, **{**spelled, **mine}), params0, grads)
        assert want[0].dtype == np.float64
        assert _relative(got, want, params0) <= 1e-10
        assert max(float(np.max(np.abs(w - p))) for w, p in zip(want, params0)) > 1e-3


def _optax_spelled_preset() -> dict:
    import polyopt.optax as po

    options = native.PRESETS["optax.contrib.muon"][1]
    return {po.muon.spec[k].spelling("optax"): v for k, v in options.items()}


def _polyopt_for_optax(options: dict, **common):
    """polyopt.optax.muon for ``optax.contrib.muon(0.01, **common, **options)``:
    the preset, optax's ``consistent_rms`` as ``lr_scale='rms'`` with that
    ``rms_scale``, and ``nesterov=False`` for the Adam part too (optax's adamw
    takes muon's nesterov)."""
    import polyopt.optax as po

    mine = {k: v for k, v in options.items() if k != "consistent_rms"}
    if "consistent_rms" in options:
        mine.update(lr_scale="rms", rms_scale=options["consistent_rms"])
    mine.update(native.linked("optax.contrib.muon", mine))  # nesterov: the Adam's too
    return po.muon(learning_rate=0.01, **common, **{**_optax_spelled_preset(), **mine})


#: optax.contrib.muon's own arguments, each combined with every preconditioning
#: eps=1e-3: optax's Adam of the non-2-D leaves takes it too (native.LINKED)
OPTAX_OPTIONS = [{}, {"nesterov": False, "adaptive": True},
                 {"weight_decay": 0.1, "consistent_rms": 0.2, "ns_steps": 3, "eps": 1e-3}]


def test_a_preset_argument_the_native_shares_sets_both():
    """optax.contrib.muon's eps and nesterov are its Adam's too: given to the
    preset (polyopt.native.preset, polyopt.torch.preset), they set polyopt's
    adam_eps and adam_nesterov, unless those are given themselves."""
    import polyopt.torch as pt

    values = native.PRESETS["optax.contrib.muon"][1]
    assert values["adam_eps"] == 1e-8 and values["adam_nesterov"] is True
    assert native.linked("optax.contrib.muon", {"eps": 1e-3, "nesterov": False}) == {
        "adam_eps": 1e-3, "adam_nesterov": False}
    assert native.linked("optax.contrib.muon", {"eps": 1e-3, "adam_eps": 1e-5}) == {}
    assert native.linked("optax.adam", {"eps": 1e-3}) == {}
    params = [np.ones((3, 2)), np.ones(3)]
    grads = [np.full((3, 2), 0.5), np.full(3, 1e-3)]

    def step(rule):
        return rule.update(grads, rule.init(params), params)[0]

    linked = step(native.preset("optax.contrib.muon", eps=1e-3, nesterov=False))
    spelled_out = step(native.preset("optax.contrib.muon", eps=1e-3, nesterov=False,
                                     adam_eps=1e-3, adam_nesterov=False))
    unlinked = step(native.preset("optax.contrib.muon", eps=1e-3, nesterov=False,
                                  adam_eps=1e-8, adam_nesterov=True))
    assert all(np.array_equal(a, b) for a, b in zip(linked, spelled_out))
    assert not np.array_equal(linked[1], unlinked[1])  # the 1-D leaf: the Adam's step
    ps = [torch.zeros(3, 2, requires_grad=True)]
    opt = pt.preset("optax.contrib.muon", ps, eps=1e-3, nesterov=False)
    got = opt._values(opt.param_groups[0])
    assert (got["adam_eps"], got["adam_nesterov"]) == (1e-3, False)
    opt = pt.preset("optax.contrib.muon", ps, eps=1e-3, adam_eps=1e-5)
    assert opt._values(opt.param_groups[0])["adam_eps"] == 1e-5


@pytest.mark.needs("jax")  # optax
@pytest.mark.parametrize("options", OPTAX_OPTIONS, ids=str)
@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol", "schatten"])
def test_polyopt_optax_muon_preconditioning_is_optax_contrib_muons(preconditioning, options):
    """optax.contrib.muon's four preconditionings side by side in float64, on wide,
    tall and square matrices (AOL's row scaling is not invariant under transposition:
    a square matrix is scaled as optax's (inputs, outputs); measured 3.8e-2 apart as
    (outputs, inputs))."""
    from optax import contrib

    shapes = [(6, 4), (3,), (3, 5), (5, 5), ()]
    params0, grads = _problem(shapes, steps=50)
    want = _run_optax(contrib.muon(0.01, preconditioning=preconditioning, **options),
                      params0, grads)
    got = _run_optax(_polyopt_for_optax(options, preconditioning=preconditioning),
                     params0, grads)
    worst = _relative(got, want, params0)
    print(f"\nPARITY optax.contrib.muon {preconditioning} {options} | float64 | {worst:.2g}")
    assert worst <= 1e-10
    assert max(float(np.max(np.abs(w - p))) for w, p in zip(want, params0)) > 1e-3
    if preconditioning != "frobenius":  # the option changes the numbers
        plain = _run_optax(_polyopt_for_optax(options), params0, grads)
        assert _relative(plain, want, params0) > 1e-6


@pytest.mark.needs("jax")  # optax
@pytest.mark.parametrize("ns_coeffs, ns_steps", [
    ("dion", 5), ("standard", 3), ((2.0, -1.5, 0.5), 4),
    (((3.0, -3.2, 1.2), (2.0, -1.5, 0.5)), 5), (np.asarray(hyper.MUON_DION_TABLE[:4]), 4)],
    ids=["dion", "standard", "triple", "two-of-five", "array"])
@pytest.mark.parametrize("preconditioning", ["frobenius", "aol"])
def test_polyopt_optax_muon_takes_optax_ns_coeffs(ns_coeffs, ns_steps, preconditioning):
    """optax's ns_coeffs (hyper.MUON's ns_table, optax-spelled, with optax's names
    'standard' and 'dion' as value aliases): one triple for ns_steps iterations, a
    table of n <= ns_steps triples for n iterations, side by side in float64."""
    from optax import contrib

    import polyopt.optax as po

    params0, grads = _problem([(6, 4), (3,), (3, 5), (5, 5)], steps=50)
    kw = dict(ns_coeffs=ns_coeffs, ns_steps=ns_steps, preconditioning=preconditioning)
    want = _run_optax(contrib.muon(0.01, **kw), params0, grads)
    got = _run_optax(po.muon(learning_rate=0.01, **{**_optax_spelled_preset(), **kw}),
                     params0, grads)
    worst = _relative(got, want, params0)
    print(f"\nPARITY optax.contrib.muon ns_coeffs={str(ns_coeffs)[:20]} | float64 | {worst:.2g}")
    assert worst <= 1e-10
    default = _run_optax(contrib.muon(0.01, preconditioning=preconditioning), params0, grads)
    if not isinstance(ns_coeffs, str) or ns_coeffs != "standard":  # the table is used
        assert _relative(got, default, params0) > 1e-6


def test_ns_table_in_the_rule_is_optax_ns_coeffs_and_refusals_name_optax_spelling():
    import polyopt.optax as po

    params0, grads = _problem([(6, 4), (5, 5)], steps=20)
    dion = _run(rules.muon(ns_table=hyper.MUON_DION_TABLE), params0, grads)
    ours = _run(rules.muon(ns_table=[list(row) for row in hyper.MUON_DION_TABLE]),
                params0, grads)
    assert _relative(ours, dion, params0) == 0.0
    triple = _run(rules.muon(ns_table=(2.0, -1.5, 0.5), ns_steps=4), params0, grads)
    same = _run(rules.muon(ns_a=2.0, ns_b=-1.5, ns_c=0.5, ns_steps=4), params0, grads)
    assert _relative(triple, same, params0) == 0.0
    # a table of 2 rows runs 2 iterations whatever ns_steps (>= 2), as optax's
    two = ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))
    assert _relative(_run(rules.muon(ns_table=two, ns_steps=2), params0, grads),
                     _run(rules.muon(ns_table=two, ns_steps=7), params0, grads), params0) == 0.0
    with pytest.raises(ValueError, match=r"muon: ns_coeffs must be a triple of finite numbers "
                                         r"\(a, b, c\) or a non-empty sequence of them or None, "
                                         r"or optax's 'standard' .*'dion' .*got "
                                         r"ns_coeffs='muon'"):
        po.muon(learning_rate=0.01, ns_coeffs="muon")
    with pytest.raises(ValueError, match=r"holds 5 triples, more than ns_steps=3"):
        po.muon(learning_rate=0.01, ns_coeffs="dion", ns_steps=3)
    with pytest.raises(ValueError, match=r"got ns_table='dion'"):
        rules.muon(ns_table="dion")  # optax's name, in optax's spelling only


def _complex_problem(dtype, steps=50):
    rng = np.random.default_rng(5)

    def c(shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)

    shapes = [(6, 4), (3,), (3, 5), (5, 5), ()]
    return [c(s) for s in shapes], [[c(s) for s in shapes] for _ in range(steps)]


#: complex64 against optax in complex64 over 50 steps, as a fraction of the largest
#: movement: measured up to 3.7e-6 (float32 rounding of two orders of the same
#: products, carried by Newton-Schulz); complex128: ~5e-15
COMPLEX_BOUNDS = {np.complex128: 1e-10, np.complex64: 5e-5}


@pytest.mark.needs("jax")  # optax
@pytest.mark.parametrize("dtype", [np.complex128, np.complex64], ids=["complex128", "complex64"])
@pytest.mark.parametrize("options", [{}, {"adaptive": True, "nesterov": False},
                                     {"weight_decay": 0.1, "consistent_rms": 0.2}], ids=str)
@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol"])
def test_polyopt_optax_muon_steps_complex_params_as_optax_contrib_muon(preconditioning, options,
                                                                        dtype):
    """Complex matrices: Newton-Schulz with X X^H and the adaptive scale <B, O> with B
    conjugated, side by side with optax.contrib.muon; the vectors and the scalar take
    the complex Adam part."""
    from optax import contrib

    params0, grads = _complex_problem(dtype)
    want = _run_optax(contrib.muon(0.01, preconditioning=preconditioning, **options),
                      params0, grads)
    got = _run_optax(_polyopt_for_optax(options, preconditioning=preconditioning),
                     params0, grads)
    assert [g.dtype for g in got] == [dtype] * len(params0)
    matrices = [0, 2, 3]
    worst = _relative([got[i] for i in matrices], [want[i] for i in matrices],
                      [params0[i] for i in matrices])
    print(f"\nPARITY optax.contrib.muon complex {preconditioning} {options} | "
          f"{np.dtype(dtype).name} | {worst:.2g}")
    assert worst <= COMPLEX_BOUNDS[dtype]
    assert _relative(got, want, params0) <= COMPLEX_BOUNDS[dtype]
    assert max(float(np.max(np.abs(w.imag - p.imag))) for w, p in zip(want, params0)) > 1e-3


@pytest.mark.needs("jax")  # optax
def test_complex_schatten_conjugates_where_optax_takes_nan():
    """optax 0.2.8's 'schatten' first iteration takes A = X X^T, unconjugated: for a
    complex X it is near 0, its scale 1/sqrt(||A||_F) blows X up and the update is NaN
    (asserted here: the native's state). polyopt takes X X^H: with zero imaginary
    parts that is the real X X^T, and the numbers are optax's real ones."""
    from optax import contrib

    import polyopt.optax as po

    params0, grads = _complex_problem(np.complex128, steps=5)
    native_steps = _run_optax(contrib.muon(0.01, preconditioning="schatten"), params0, grads)
    assert not np.all(np.isfinite(native_steps[0]))
    kw = {**_optax_spelled_preset(), "preconditioning": "schatten"}
    ours = _run_optax(po.muon(learning_rate=0.01, **kw), params0, grads)
    assert all(np.all(np.isfinite(p)) for p in ours)
    assert np.max(np.abs(ours[0] - params0[0])) > 1e-3
    real_params = [p.real for p in params0]
    real_grads = [[x.real for x in g] for g in grads]
    want = _run_optax(contrib.muon(0.01, preconditioning="schatten"), real_params, real_grads)
    got = _run_optax(po.muon(learning_rate=0.01, **kw),
                     [p.astype(np.complex128) for p in real_params],
                     [[x.astype(np.complex128) for x in g] for g in real_grads])
    assert _relative(got, want, real_params) <= 1e-10
    assert all(np.all(g.imag == 0) for g in got)


def test_complex_refusals_follow_the_natives():
    """torch.optim.Muon refuses complex params (RuntimeError at the step), and so does
    polyopt.torch.Muon, with the same words; the rule refuses an iteration dtype with
    no complex counterpart at init, naming the param."""
    import polyopt.torch as pt

    for make in (torch.optim.Muon, pt.Muon):
        p = torch.zeros(3, 2, dtype=torch.complex128, requires_grad=True)
        optimizer = make([p])
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
            optimizer.step()
        assert torch.all(p == 0)
    params = [np.zeros((3, 2), dtype=np.complex128)]
    with pytest.raises(TypeError, match=r"muon.init: params\[0\] is complex \(complex128\): "
                                        r"iteration_dtype='bfloat16' has no complex dtype"):
        rules.muon(iteration_dtype="bfloat16").init(params)
    rule = rules.muon(iteration_dtype="float32", learning_rate=0.1)
    updates, _ = rule.update([np.ones((3, 2), dtype=np.complex128)], rule.init(params), params)
    assert updates[0].dtype == np.complex128 and np.all(np.isfinite(updates[0]))


def test_muon_agrees_across_namespaces(array_namespaces, to_namespace, to_numpy):
    shapes = [(4, 3), (3,), (2, 3, 2), ()]
    params0, grads = _problem(shapes, steps=12)

    def run(name):
        rule = rules.muon(learning_rate=0.05, weight_decay=0.01, momentum_form="ema_debiased",
                          adaptive=True, adam_learning_rate=0.01)
        params = [to_namespace(name, p) for p in params0]
        state = rule.init(params)
        for g in grads:
            updates, state = rule.update([to_namespace(name, x) for x in g], state, params)
            params = [p + u for p, u in zip(params, updates)]
        return [to_numpy(p) for p in params]

    reference = run("numpy")
    for name in array_namespaces:
        for r, g in zip(reference, run(name)):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15, err_msg=name)
    assert max(float(np.max(np.abs(r - p))) for r, p in zip(reference, params0)) > 1e-3


def _optax_tree_problem(steps=STEPS):
    rng = np.random.default_rng(7)
    shapes = {"conv": {"kernel": (3, 3, 4, 8), "bias": (8,)},
              "dense": {"kernel": (12, 6), "bias": (6,)},
              "cube": (4, 5, 6), "embed": (10, 4), "scale": ()}
    import jax

    params = jax.tree.map(lambda s: rng.normal(size=s), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    grads = [jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params)
             for _ in range(steps)]
    return params, grads


def _run_optax(transform, params0, grads):
    import jax
    import optax

    params = jax.tree.map(jax.numpy.asarray, params0)
    state = transform.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = transform.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, jax.tree.map(jax.numpy.asarray, g))
    return [np.asarray(p) for p in jax.tree.leaves(params)]


@pytest.mark.needs("jax")  # optax
def test_polyopt_optax_muon_takes_optax_dimension_numbers_and_weight_decay_mask():
    """optax.contrib.muon side by side on a pytree of a conv kernel (every axis named),
    a 3-D leaf (two reduction axes), a Dense kernel, an embedding given None (Adam),
    vectors and a scalar (Adam); a callable dimension-numbers tree; weight_decay_mask."""
    import jax
    from optax import contrib

    import polyopt.optax as po

    params0, grads = _optax_tree_problem()
    dims = {"conv": {"kernel": contrib.MuonDimensionNumbers((0, 1, 2), 3), "bias": None},
            "dense": {"kernel": contrib.MuonDimensionNumbers(), "bias": None},
            "cube": contrib.MuonDimensionNumbers((2, 0), 1), "embed": None, "scale": None}
    mask = {"conv": False, "dense": True, "cube": True, "embed": True, "scale": True}
    options = native.PRESETS["optax.contrib.muon"][1]
    spelled = {po.muon.spec[k].spelling("optax"): v for k, v in options.items()}
    start = [np.asarray(p) for p in jax.tree.leaves(params0)]
    for extra, mine in (
            ({"muon_weight_dimension_numbers": dims}, {}),
            ({"muon_weight_dimension_numbers": lambda p: dims, "weight_decay": 0.1,
              "weight_decay_mask": mask, "adam_weight_decay": 0.05, "nesterov": False,
              "consistent_rms": 0.2},
             {"adam_nesterov": False, "lr_scale": "rms", "rms_scale": 0.2}),
            ({"weight_decay": 0.1, "weight_decay_mask": lambda p: jax.tree.map(
                lambda x: x.ndim == 2, p)}, {})):
        want = _run_optax(contrib.muon(0.01, **extra), params0, grads)
        ours = {k: v for k, v in extra.items() if k not in ("consistent_rms",)}
        got = _run_optax(po.muon(learning_rate=0.01, **{**spelled, **ours, **mine}),
                         params0, grads)
        worst = _relative(got, want, start)
        print(f"\nPARITY optax.contrib.muon {sorted(extra)} | float64 | {worst:.2g}")
        assert worst <= 1e-10
        assert max(float(np.max(np.abs(w - s))) for w, s in zip(want, start)) > 1e-2
    # the conv kernel and the cube took the Muon step: they move otherwise under Adam
    adam_all = _run_optax(po.muon(learning_rate=0.01, **{**spelled, "muon_weight_dimension_numbers":
                                                         jax.tree.map(lambda _: None, params0)}),
                          params0, grads)
    assert _relative(adam_all, want, start) > 1e-2


@pytest.mark.needs("jax")  # optax
@pytest.mark.parametrize("options", [{}, {"adaptive": True, "nesterov": False},
                                     {"consistent_rms": 0.2, "ns_coeffs": "dion"}], ids=str)
@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol", "schatten"])
def test_optax_dimension_numbers_with_batch_axes_are_optax_contrib_muons(preconditioning,
                                                                        options):
    """MuonDimensionNumbers that leave axes unnamed: optax orthogonalizes one matrix per
    index of those batch axes (vmap); polyopt's Layout(reduction, output, batch_axes).
    Side by side in float64: one and two batch axes, a batch axis between the others,
    square matrices (AOL's orientation), a Dense kernel and an Adam leaf beside them."""
    import jax
    from optax import contrib

    D = contrib.MuonDimensionNumbers
    rng = np.random.default_rng(11)
    shapes = {"a": (2, 3, 4), "b": (2, 3, 4, 5), "c": (3, 4, 10), "square": (4, 3, 4),
              "dense": (6, 5), "bias": (5,)}
    dims = {"a": D(0, 2), "b": D(2, 3), "c": D(2, (0,)), "square": D(0, -1), "dense": D(),
            "bias": None}
    params0 = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(50)]
    start = jax.tree.leaves(params0)
    kw = dict(preconditioning=preconditioning, muon_weight_dimension_numbers=dims)
    want = _run_optax(contrib.muon(0.01, **kw, **options), params0, grads)
    got = _run_optax(_polyopt_for_optax(options, **kw), params0, grads)
    worst = _relative(got, want, start)
    print(f"\nPARITY optax.contrib.muon batch axes {preconditioning} {options} | float64 | "
          f"{worst:.2g}")
    assert worst <= 1e-10
    assert min(float(np.max(np.abs(w - s))) for w, s in zip(want, start)) > 1e-3


def test_batch_axes_orthogonalize_each_matrix_alone():
    """rules.muon with Layout(reduction, output, batch_axes) steps a stack as the same
    matrices stepped one by one (each its own Newton-Schulz, norm and shape scale);
    Adafactor keeps its row and column statistics per matrix; a layout must name every
    axis once."""
    rng = np.random.default_rng(12)
    stack = rng.normal(size=(5, 3, 4))  # (in, batch, out)
    grads = [[rng.normal(size=stack.shape)] for _ in range(20)]
    layout = [Layout((0,), (2,), (1,))]
    rule = rules.muon(learning_rate=0.05, weight_decay=0.01, lr_scale="rms",
                      preconditioning="aol")
    got = _run(rule, [stack], grads, layouts=layout)[0]
    for b in range(3):
        alone = _run(rule, [stack[:, b]], [[g[0][:, b]] for g in grads],
                     layouts=[Layout((0,), (1,))])[0]
        np.testing.assert_allclose(got[:, b], alone, rtol=0, atol=1e-14)
    assert np.max(np.abs(got - stack)) > 0.1
    # the stack read as one (in*batch... ) matrix is another step
    whole = _run(rule, [stack], grads, layouts=[Layout((0, 1), (2,))])[0]
    assert np.max(np.abs(whole - got)) > 1e-3
    state = rules.adafactor(factoring="layout").init([stack], layouts=layout)
    assert [tuple(v.shape) for v in (state.v_row[0], state.v_col[0])] == [(3, 4), (5, 3)]
    for bad in (Layout((0,), (2,), (2,)), Layout((0,), (2,))):
        shown = re.escape(repr(tuple(bad) if bad.batch_axes else tuple(bad[:2])))
        with pytest.raises(ValueError, match=rf"muon.init: layout {shown} does not fit "
                                             r"params\[0\] of shape \(5, 3, 4\): its reduction "
                                             r"and output axes \(and batch axes\) must split"):
            rule.init([stack], layouts=[bad])


def test_polyopt_torch_muon_steps_a_conv_kernel_and_adam_groups_as_torch_muon_and_adamw():
    """torch.optim.Muon refuses a conv kernel; polyopt.torch.Muon steps it as the matrix
    (out, in*kh*kw) of torch's layout, which is torch.optim.Muon on the kernel viewed as
    that matrix. A param group with muon_params='none' (or the layout NOT_A_MATRIX) is
    torch.optim.AdamW: the hybrid side by side with the two natives, float64 (bfloat16
    cast patched out as above)."""
    import polyopt.torch as pt

    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters"):
        torch.optim.Muon([torch.zeros(4, 2, 3, 3, requires_grad=True)])
    rng = np.random.default_rng(4)
    shapes = [(6, 5), (4, 2, 3, 3), (7,), (9, 3)]  # matrix, conv kernel, bias, embedding
    start = [rng.normal(size=s) for s in shapes]
    grads = [[rng.normal(size=s) for s in shapes] for _ in range(100)]
    muon_kw = {"lr": 0.01, "weight_decay": 0.1}
    adam_kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.05}

    def natives():
        ps = [torch.tensor(p.reshape(p.shape[0], -1) if p.ndim > 2 else p, requires_grad=True)
              for p in start]
        muon = torch.optim.Muon(ps[:2], **muon_kw)
        adam = torch.optim.AdamW(ps[2:], **adam_kw)
        with mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone()):
            for g in grads:
                for p, gi in zip(ps, g):
                    p.grad = torch.tensor(gi.reshape(p.shape))
                muon.step()
                adam.step()
        return [p.detach().numpy().reshape(s) for p, s in zip(ps, shapes)]

    def ours(adam_group):
        ps = [torch.tensor(p, requires_grad=True) for p in start]
        optimizer = pt.Muon([{"params": ps[:2]}, {"params": ps[2:], **adam_group}],
                            lr=0.01, weight_decay=0.1, eps_placement="clamp",
                            muon_params="all", adam_learning_rate=3e-3, adam_b2=0.95,
                            adam_eps=1e-10, adam_weight_decay=0.05)
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = torch.tensor(gi)
            optimizer.step()
        assert [tuple(optimizer.state[p]["momentum_buffer"].shape) for p in ps] == [
            shapes[0], shapes[1], (0,), (0,)]
        return [p.detach().numpy() for p in ps]

    want = natives()
    for group in ({"muon_params": "none"},
                  {"muon_params": "matrices", "layout": rules.NOT_A_MATRIX}):
        got = ours(group)
        worst = _relative(got, want, start)
        print(f"\nPARITY torch.optim.Muon+AdamW hybrid {group} | float64 | {worst:.2g}")
        assert worst <= 1e-10
    assert max(float(np.max(np.abs(w - s))) for w, s in zip(want, start)) > 1e-2


def test_dimension_numbers_and_masks_that_do_not_fit_are_refused_naming_the_leaf():
    import jax
    from optax import contrib

    import polyopt.optax as po

    params = {"w": jax.numpy.zeros((3, 4, 5)), "b": jax.numpy.zeros(5)}
    D = contrib.MuonDimensionNumbers
    cases = [
        ({"w": D((0, 1), 2), "b": D()}, r"muon.init: muon_weight_dimension_numbers gives "
                                        r"params\['b'\] of shape \(5,\) .*give it None"),
        ({"w": D((0, 1), 1), "b": None}, r"muon.init: layout \(\(0, 1\), \(1,\)\) does not fit "
                                         r"params\['w'\] of shape \(3, 4, 5\)"),
        ({"w": D((0, 1), 5), "b": None}, r"does not fit params\['w'\] of shape \(3, 4, 5\)"),
        ({"w": D((0, 1), 2)}, r"muon.init: muon_weight_dimension_numbers must be a tree like "
                              r"\(or a prefix of\) the params"),
        ({"w": "0,1", "b": None}, r"must hold optax.contrib.MuonDimensionNumbers or None, "
                                  r"got '0,1'"),
    ]
    for dims, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            po.muon(muon_weight_dimension_numbers=dims).init(params)
    good = po.muon(muon_weight_dimension_numbers={"w": D((0, 1), 2), "b": None},
                   weight_decay=0.1, weight_decay_mask={"w": True})
    state = good.init(params)
    before = jax.tree.map(np.asarray, state)
    grads = jax.tree.map(jax.numpy.ones_like, params)
    with pytest.raises(ValueError, match=r"muon.update: weight_decay_mask must be a bool or a "
                                         r"tree like \(or a prefix of\) the params"):
        good.update(grads, state, params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    with pytest.raises(TypeError, match=r"muon: weight_decay_mask must be a bool"):
        po.muon(weight_decay_mask={})
    with pytest.raises(ValueError, match=r"muon: muon_weight_dimension_numbers decides which "
                                         r"leaves .* got muon_params='none'"):
        po.muon(muon_params="none", muon_weight_dimension_numbers={"w": None})
    with pytest.raises(TypeError, match=r"layouts or muon_weight_dimension_numbers, not both"):
        po.muon(layouts=rules.Layout((0,), (1,)), muon_weight_dimension_numbers={"w": None})


def test_torch_muon_all_refuses_a_group_that_is_not_a_matrix_at_construction():
    import polyopt.torch as pt

    with pytest.raises(ValueError, match=r"param group 0, params\[0\] has shape \(3, 2\) and "
                                         r"the group's layout NOT_A_MATRIX: with "
                                         r"muon_params='all'"):
        pt.Muon([{"params": [torch.zeros(3, 2, requires_grad=True)],
                  "layout": rules.NOT_A_MATRIX}], muon_params="all")


@pytest.mark.needs("jax")  # optax
def test_optax_muon_with_dimension_numbers_under_inject_hyperparams_and_chain():
    """The per-leaf choice survives optax's wrappers: inject_hyperparams (every number
    traced, adam_lr_ratio too) and chain give the plain transformation's numbers."""
    import jax
    import optax
    from optax import contrib

    import polyopt.optax as po

    params0, grads = _optax_tree_problem(steps=8)
    dims = {"conv": {"kernel": contrib.MuonDimensionNumbers((0, 1, 2), 3), "bias": None},
            "dense": {"kernel": contrib.MuonDimensionNumbers(), "bias": None},
            "cube": contrib.MuonDimensionNumbers((2, 0), 1), "embed": None, "scale": None}
    kw = dict(learning_rate=0.01, weight_decay=0.1, adam_lr_ratio=0.5, adam_weight_decay=0.05,
              muon_weight_dimension_numbers=dims,
              weight_decay_mask={"conv": False, "dense": True, "cube": True, "embed": True,
                                 "scale": True})  # a callable would be a schedule there
    plain = _run_optax(po.muon(**kw), params0, grads)
    injected = _run_optax(optax.inject_hyperparams(po.muon)(**kw), params0, grads)
    chained = _run_optax(optax.chain(optax.identity(), po.muon(**kw)), params0, grads)
    start = [np.asarray(p) for p in jax.tree.leaves(params0)]
    assert _relative(injected, plain, start) <= 1e-12
    assert _relative(chained, plain, start) == 0.0
