"""polyopt.optax: state files, native optax.adam import, checkpoints, non-finite gradients."""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax
from polyopt.interop import StateFileError, read_header
from polyopt.optax import interop

N = 5


def _problem():
    rng = np.random.default_rng(1)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3))),
                        "bias": jnp.asarray(rng.normal(size=3))}}
    x, y = jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 3)))

    def loss(p):
        return jnp.mean((x @ p["dense"]["kernel"] + p["dense"]["bias"] - y) ** 2)
    return params, jax.grad(loss)


def _run(opt, params, state, grad, steps):
    for _ in range(steps):
        updates, state = opt.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("opt", [
    polyopt.optax.adam(0.05), polyopt.optax.amsgrad(0.05), polyopt.optax.nadam(0.05),
    polyopt.optax.sgd(0.05, momentum=0.9), polyopt.optax.ranger(0.05, sync_period=3),
    polyopt.optax.apply_if_finite(polyopt.optax.adam(0.05)),
], ids=["adam", "amsgrad", "nadam", "sgd", "ranger", "apply_if_finite"])
def test_state_file_round_trip_is_bitwise(opt):
    params, grad = _problem()
    params, state = _run(opt, params, opt.init(params), grad, N)
    buffer = io.BytesIO()
    interop.export_state(buffer, opt, state, params)
    buffer.seek(0)
    header = read_header(buffer)
    assert [p["name"] for p in header["params"]] == ["dense.bias", "dense.kernel"]
    buffer.seek(0)
    restored = interop.import_state(buffer, opt, params)
    assert _equal(_run(opt, params, state, grad, N), _run(opt, params, restored, grad, N))


@pytest.mark.parametrize("make, match", [
    (lambda p: (polyopt.optax.sgd(0.05, momentum=0.9), p), "into 'sgd'"),
    (lambda p: (polyopt.optax.amsgrad(0.05), p), "into 'amsgrad'"),
    (lambda p: (polyopt.optax.adam(0.05), {"dense": {"kernel": p["dense"]["kernel"]}}),
     "only in the file"),
    (lambda p: (polyopt.optax.adam(0.05), {**p, "extra": jnp.zeros(2)}), "missing from the file"),
    (lambda p: (polyopt.optax.adam(0.05), {"dense": {"kernel": jnp.zeros((3, 4)),
                                                     "bias": p["dense"]["bias"]}}),
     "other shapes"),
], ids=["other-algorithm", "other-variant", "missing-param", "extra-param", "reshaped"])
def test_mismatched_state_file_is_refused(make, match):
    params, grad = _problem()
    opt = polyopt.optax.adam(0.05)
    params, state = _run(opt, params, opt.init(params), grad, 2)
    buffer = io.BytesIO()
    interop.export_state(buffer, opt, state, params)
    buffer.seek(0)
    target, target_params = make(params)
    with pytest.raises(StateFileError, match=match):
        interop.import_state(buffer, target, target_params)


@pytest.mark.parametrize("chained", [False, True])
def test_native_optax_adam_state_continues_like_optax(chained):
    params, grad = _problem()
    native = optax.adam(0.05, b1=0.8)
    ours = polyopt.optax.adam(0.05, b1=0.8)
    if chained:
        native = optax.chain(optax.clip_by_global_norm(1.0), native)
        ours = optax.chain(optax.clip_by_global_norm(1.0), ours)
    params, native_state = _run(native, params, native.init(params), grad, N)
    expected, _ = _run(native, params, native_state, grad, N)
    adam_state = interop.import_native_state(polyopt.optax.adam(0.05, b1=0.8), native_state,
                                             params)
    state = (native_state[0], adam_state) if chained else adam_state
    got, _ = _run(ours, params, state, grad, N)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) <= 1e-10


@pytest.mark.parametrize("opt, native, match", [
    (polyopt.optax.amsgrad(0.05), optax.adam(0.05), "without amsgrad"),
    (polyopt.optax.adam(0.05), optax.sgd(0.05, momentum=0.9), "found 0"),
    (polyopt.optax.sgd(0.05), optax.adam(0.05), "polyopt.optax.adam or adamw"),
], ids=["amsgrad", "not-adam-native", "not-adam-target"])
def test_native_optax_mismatch_is_refused(opt, native, match):
    params, _ = _problem()
    with pytest.raises(ValueError, match=match):
        interop.import_native_state(opt, native.init(params), params)


def test_checkpoint_resumes_bitwise_and_refuses_corrupt_files(tmp_path):
    params, grad = _problem()
    opt = polyopt.optax.ranger(0.05, sync_period=3)
    params, state = _run(opt, params, opt.init(params), grad, 4)
    path = tmp_path / "ckpt.npz"
    interop.save_checkpoint(path, (params, state))
    p2, s2 = interop.load_checkpoint(path, (params, opt.init(params)))
    assert _equal(_run(opt, params, state, grad, N), _run(opt, p2, s2, grad, N))
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="not a readable checkpoint"):
        interop.load_checkpoint(tmp_path / "cut.npz", (params, state))
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(StateFileError, match="not a readable checkpoint"):
        interop.load_checkpoint(tmp_path / "junk.npz", (params, state))
    with pytest.raises(StateFileError, match="tree structure differs"):
        interop.load_checkpoint(path, (params, polyopt.optax.adam().init(params)))
    with pytest.raises(StateFileError, match="leaf"):
        interop.load_checkpoint(path, jax.tree.map(lambda a: a.astype(jnp.float32),
                                                   (params, state)))


def test_nonfinite_gradients_propagate_by_default_and_are_skipped_on_request():
    params, grad = _problem()
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grad(params))
    plain = polyopt.optax.adam(0.05)
    updates, state = plain.update(bad, plain.init(params), params)
    assert bool(jnp.isnan(updates["dense"]["bias"][0]))  # optax's policy: it propagates
    opt = polyopt.optax.apply_if_finite(polyopt.optax.adam(0.05), max_consecutive_errors=2)
    state = opt.init(params)
    params, state = _run(opt, params, state, grad, 2)
    before = state.inner
    step = jax.jit(opt.update)
    for i in range(2):
        updates, state = step(bad, state, params)
        assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
        assert _equal(state.inner, before)
        assert int(state.total_notfinite) == i + 1 and not bool(state.last_finite)
    updates, state = step(bad, state, params)  # a third in a row: applied (max 2)
    assert int(state.total_notfinite) == 3
    assert bool(jnp.isnan(updates["dense"]["bias"][0]))
    assert math.isinf(polyopt.optax.apply_if_finite.__defaults__[0])
