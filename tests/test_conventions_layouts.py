"""Layouts and state_dtype in the torch and optax adapters.

The same layers in torch's layouts (Linear (out, in), Conv2d (out, in, kh, kw))
and Flax's ((in, out), (kh, kw, in, out)) get the same numbers from a rule
with per-tensor math (Ranger's gradient centralization), because each
adapter passes its framework's layout; overrides reach the rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import polyopt.optax as po
import polyopt.torch as pt
from polyopt import rules

STEPS = 30
TORCH_SHAPES = [(16, 12), (16,), (8, 3, 3, 3)]
TO_FLAX = [(1, 0), (0,), (2, 3, 1, 0)]  # torch axes -> Flax axes


def _problem():
    rng = np.random.default_rng(3)
    params = [rng.normal(size=s) for s in TORCH_SHAPES]
    grads = [[rng.normal(size=s) for s in TORCH_SHAPES] for _ in range(STEPS)]
    return params, grads


def test_ranger_gives_the_same_numbers_in_torch_and_flax_layouts():
    params, grads = _problem()
    tensors = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = pt.Ranger(tensors, lr=1e-2)
    flax = {str(i): jnp.asarray(np.transpose(p, axes)) for i, (p, axes)
            in enumerate(zip(params, TO_FLAX))}
    tx = po.ranger(1e-2)
    state = tx.init(flax)
    for g in grads:
        for t, gi in zip(tensors, g):
            t.grad = torch.tensor(gi)
        opt.step()
        gf = {str(i): jnp.asarray(np.transpose(gi, axes)) for i, (gi, axes)
              in enumerate(zip(g, TO_FLAX))}
        updates, state = tx.update(gf, state, flax)
        flax = jax.tree.map(lambda p, u: p + u, flax, updates)
    for i, (t, axes) in enumerate(zip(tensors, TO_FLAX)):
        want = np.transpose(t.detach().numpy(), axes)
        err = np.max(np.abs(np.asarray(flax[str(i)]) - want)) / np.max(np.abs(want))
        assert err < 1e-12, (i, err)
    moved = np.max(np.abs(tensors[0].detach().numpy() - params[0]))
    assert moved > 1e-2


def test_a_layout_override_reaches_the_rule_and_a_bad_one_is_refused():
    params, grads = _problem()
    kernel = params[0]
    # the torch weight declared with Flax's layout (output last) centralizes the other axis
    t = torch.nn.Parameter(torch.tensor(kernel))
    opt = pt.SGD([t], lr=1.0)  # elementwise: layouts are not asked for
    assert opt._param_layouts(opt._group_values(0, opt.param_groups[0]), opt.param_groups[0],
                              [t]) is None
    tx = po.ranger(1e-2, layouts={"w": rules.Layout((1,), (0,))})  # torch's, in optax
    flat = po.ranger(1e-2)
    a = tx.update({"w": jnp.asarray(grads[0][0])}, tx.init({"w": jnp.asarray(kernel)}),
                  {"w": jnp.asarray(kernel)})[0]["w"]
    b = flat.update({"w": jnp.asarray(grads[0][0].T)}, flat.init({"w": jnp.asarray(kernel.T)}),
                    {"w": jnp.asarray(kernel.T)})[0]["w"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b).T, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match=r"layout \(\(0,\), \(0,\)\) does not fit "
                                         r"params\['w'\] of shape \(16, 12\)"):
        po.ranger(1e-2, layouts={"w": rules.Layout((0,), (0,))}).init({"w": jnp.asarray(kernel)})
    with pytest.raises(ValueError, match=r"adam: layouts were given, but this rule does not "
                                         r"use layouts"):
        po.adam(1e-2, layouts={"w": rules.Layout((1,), (0,))})
    bad = torch.nn.Parameter(torch.tensor(kernel))
    ranger = pt.Ranger([{"params": [bad], "layout": rules.Layout((0,), (0,))}], lr=1e-2)
    bad.grad = torch.tensor(grads[0][0])
    with pytest.raises(ValueError, match=r"does not fit param of shape \(16, 12\)"):
        ranger.step()
    assert not ranger.state[bad] and np.array_equal(bad.detach().numpy(), kernel)


def test_state_dtype_bfloat16_in_torch_and_optax():
    w = torch.nn.Parameter(torch.zeros(1024, 1024))
    opt = pt.Adam([w], lr=1e-3, state_dtype=torch.bfloat16)
    w.grad = torch.ones_like(w)
    opt.step()
    slots = [v for k, v in opt.state[w].items() if k != "step"]
    assert {v.dtype for v in slots} == {torch.bfloat16}
    assert sum(v.numel() * v.element_size() for v in slots) == 2 * 1024 * 1024 * 2  # 4 MiB
    tx = po.adam(1e-3, mu_dtype=jnp.bfloat16)
    params = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    state = tx.init(params)
    assert state.first_moment["w"].dtype == jnp.bfloat16
    updates, state = tx.update({"w": jnp.ones((1024, 1024), jnp.float32)}, state, params)
    assert updates["w"].dtype == jnp.float32 and state.second_moment["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3, rtol=1e-5)
    np.testing.assert_allclose(w.detach().numpy(), -1e-3, rtol=1e-5)
