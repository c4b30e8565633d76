"""polyopt.optax as an optax citizen: pytrees and state, the optax wrappers
(chain, inject_hyperparams, MultiSteps, contrib.reduce_on_plateau), jit with
donation, checkpointing, errors, lookahead's and SAM's protocols, sharding.

Numbers are compared with the real optax run side by side (float64, x64).
"""

from __future__ import annotations

import re
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt import rules
from tests._native import run_python
from tests.registry import ERRORS


def _params(dtype="float64"):
    rng = np.random.default_rng(1)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), dtype),
                  "bias": jnp.asarray(rng.normal(size=(2,)), dtype)},
        "scale": jnp.asarray(1.5, dtype),
    }


def _loss(params, x):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.sum(h ** 2) * params["scale"] ** 2 + 0.1 * params["scale"] ** 2


def _batches(n, dtype="float64"):
    rng = np.random.default_rng(2)
    return [jnp.asarray(rng.normal(size=(4, 3)), dtype) for _ in range(n)]


def _run(opt, params, steps=12, extra=None, jit=True):
    """params after ``steps`` updates; extra(loss) -> extra args of update."""
    state = opt.init(params)

    def step(params, state, x):
        loss, grads = jax.value_and_grad(_loss)(params, x)
        kwargs = extra(loss) if extra else {}
        updates, state = opt.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    for x in _batches(steps):
        params, state = step(params, state, x)
    return params, state


def _assert_close(got, want, rtol=1e-12):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-14)


# --------------------------------------------------------------------------
# pytrees and state


class Pair(NamedTuple):
    left: jax.Array
    right: list


@pytest.mark.parametrize("make_params", [
    lambda: _params(),
    lambda: (jnp.ones(3), [jnp.zeros((2, 2)), {"x": jnp.asarray(0.5)}]),
    lambda: Pair(jnp.ones(2), [jnp.arange(3.0)]),
    lambda: jnp.ones((2, 3)),
], ids=["nested dict", "tuple/list/dict", "NamedTuple", "single array"])
def test_any_pytree_gives_optax_numbers(make_params):
    params = make_params()
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
    ours, native = po.adam(0.1), optax.adam(0.1)
    state, native_state = ours.init(params), native.init(params)
    for _ in range(3):
        updates, state = jax.jit(ours.update)(grads, state, params)
        want, native_state = native.update(grads, native_state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        _assert_close(updates, want)
    # the per-parameter slots are trees shaped like the params, as optax's mu/nu
    assert jax.tree.structure(state.first_moment) == jax.tree.structure(params)
    _assert_close(state.second_moment, native_state[0].nu)


def test_state_is_a_pytree_for_tree_util_and_optax_tree_utils():
    params = _params()
    opt = po.adam(0.01, amsgrad=True)
    state = opt.init(params)
    leaves, treedef = jax.tree.flatten(state)
    assert len(leaves) == 1 + 3 * 3  # count, m, v, max of v for three leaves
    assert jax.tree.unflatten(treedef, leaves) == state
    assert int(optax.tree_utils.tree_get(state, "count")) == 0
    moment = optax.tree_utils.tree_get(state, "first_moment")
    assert jax.tree.structure(moment) == jax.tree.structure(params)
    zeroed = optax.tree_utils.tree_set(state, count=jnp.asarray(5, jnp.int32))
    assert int(zeroed.count) == 5
    doubled = jax.tree.map(lambda x: x * 2, state)
    assert type(doubled) is type(state)


def test_checkpoint_round_trip_through_np_savez(tmp_path):
    params = _params()
    opt = po.nadam(0.01)
    params, state = _run(opt, params, steps=4)
    np.savez(tmp_path / "state.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
    with np.load(tmp_path / "state.npz") as saved:
        leaves = [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files))]
    restored = jax.tree.unflatten(jax.tree.structure(opt.init(params)), leaves)
    x = _batches(1)[0]
    grads = jax.grad(_loss)(params, x)
    _assert_close(opt.update(grads, restored, params), opt.update(grads, state, params), 0)


def test_jit_with_donated_params_and_state():
    params = _params()
    opt = po.adamw(0.01)
    state = opt.init(params)
    native = optax.adamw(0.01, weight_decay=0.01)
    native_params = jax.tree.map(jnp.copy, params)
    native_state = native.init(native_params)

    def step(opt):
        def run(params, state, x):
            grads = jax.grad(_loss)(params, x)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state
        return jax.jit(run, donate_argnums=(0, 1))

    ours_step, native_step = step(opt), step(native)
    for x in _batches(5):
        old_leaf = params["dense"]["kernel"]
        params, state = ours_step(params, state, x)
        native_params, native_state = native_step(native_params, native_state, x)
        assert old_leaf.is_deleted()  # the buffer was donated and reused
    _assert_close(params, native_params)


def test_ranger_is_compiled_with_one_temporary_per_param():
    """polyopt.optax.ranger asks for RAdam's direction once (rules.ranger's
    ``read_twice``): jitted, its step keeps one temporary per param for Lookahead's two
    loops, not RAdam's two quotients (twice the params' bytes; tests/test_jax_rules_jit.py
    compares the two and their numbers)."""
    params = {"conv": jnp.ones((3, 3, 8, 16)), "dense": jnp.ones((32, 10)),
              "bias": jnp.ones(10)}
    opt = po.ranger(1e-3)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt.init(params), params).compile()
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.25 * param_bytes


def test_float32_params_keep_float32_state_under_x64():
    params = _params("float32")
    for opt in (po.adam(0.01), po.nadam(0.01), po.sgd(0.1, momentum=0.9), po.ranger()):
        new, state = _run(opt, params, steps=2)
        for leaf in jax.tree.leaves(new):
            assert leaf.dtype == jnp.float32
        assert {str(x.dtype) for x in jax.tree.leaves(state)} <= {"float32", "int32"}


def test_empty_params_tree():
    opt = po.adam()
    state = opt.init({})
    assert state.first_moment == {} and state.max_second_moment == []
    updates, new_state = opt.update({}, state, {})
    assert updates == {} and new_state is state


@pytest.mark.parametrize("opt, slot", [(po.adam(amsgrad=True), "max_second_moment"),
                                       (po.ranger(), "slow"), (po.sgd(momentum=0.9), "momentum")],
                         ids=["adam", "ranger", "sgd"])
def test_optax_tree_map_params_finds_the_param_slots(opt, slot):
    """How optax users build shardings for the state from the params' ones."""
    params = _params()
    state = opt.init(params)
    specs = jax.tree.map(lambda p: f"spec{p.shape}", params)
    mapped = optax.tree_utils.tree_map_params(opt, lambda _, spec: spec, state, specs,
                                              transform_non_params=lambda _: None)
    assert getattr(mapped, slot) == specs
    assert mapped.count is None
    assert set(jax.tree.leaves(mapped)) == set(jax.tree.leaves(specs))


def test_same_numbers_as_the_core_rule_on_the_leaves():
    """No math in the adapter: ranger's updates are the core rule's, leaf by leaf."""
    params = _params()
    grads = jax.tree.map(lambda p: jnp.cos(p), params)
    opt = po.ranger(learning_rate=0.1, sync_period=2)
    rule = rules.lookahead(rules.chain(rules.centralize(keep_axis=-1),
                                       rules.radam(learning_rate=0.1, b1=0.95, eps=1e-5,
                                                   weight_decay_mode="decoupled")),
                           sync_period=2)
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    core_state = rule.init(leaves)
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        core_updates, core_state = rule.update([np.asarray(g) for g in jax.tree.leaves(grads)],
                                               core_state, leaves)
        _assert_close(jax.tree.leaves(updates), core_updates, 1e-14)
        params = optax.apply_updates(params, updates)
        leaves = [p + u for p, u in zip(leaves, core_updates)]
    _assert_close(jax.tree.leaves(state.slow), core_state.slow, 1e-14)


# --------------------------------------------------------------------------
# optax's wrappers


def test_chain_with_optax_transforms():
    params = _params()
    ours = optax.chain(optax.clip_by_global_norm(0.5), po.adam(0.05),
                       optax.add_decayed_weights(1e-3))
    native = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(0.05),
                         optax.add_decayed_weights(1e-3))
    _assert_close(_run(ours, params)[0], _run(native, params)[0])


def test_multi_transform_and_masked_subtrees():
    params = _params()
    labels = {"dense": {"kernel": "decay", "bias": "plain"}, "scale": "plain"}
    mask = {"dense": {"kernel": True, "bias": False}, "scale": False}
    others = jax.tree.map(lambda m: not m, mask)

    def both(adamw, sgd):
        return (optax.multi_transform({"decay": adamw(0.05), "plain": sgd(0.01)}, labels),
                optax.chain(optax.masked(adamw(0.05), mask), optax.masked(sgd(0.01), others)))

    ours = both(lambda lr: po.adamw(lr, weight_decay=1e-4), po.sgd)
    for mine, native in zip(ours, both(optax.adamw, optax.sgd)):
        _assert_close(_run(mine, params, steps=4)[0], _run(native, params, steps=4)[0])


def test_multi_steps_accumulates_like_optax():
    params = _params()
    ours = optax.MultiSteps(po.sgd(0.1, momentum=0.9), every_k_schedule=3)
    native = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=3)
    got, state = _run(ours, params, steps=9)
    _assert_close(got, _run(native, params, steps=9)[0])
    assert int(state.inner_opt_state.count) == 3


def test_reduce_on_plateau_scales_the_updates():
    params = _params()
    plateau = dict(factor=0.5, patience=1, accumulation_size=1)
    ours = optax.chain(po.adam(0.1), optax.contrib.reduce_on_plateau(**plateau))
    native = optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau(**plateau))
    got, state = _run(ours, params, steps=15, extra=lambda loss: {"value": loss})
    want, native_state = _run(native, params, steps=15, extra=lambda loss: {"value": loss})
    _assert_close(got, want)
    assert float(state[1].scale) < 1.0  # the plateau did reduce the step
    assert float(state[1].scale) == float(native_state[1].scale)


@pytest.mark.parametrize("factory, kwargs", [
    (po.sgd, {"momentum": 0.9}), (po.adagrad, {}), (po.rmsprop, {"centered": True}),
    (po.adadelta, {}), (po.adam, {}), (po.adamw, {}), (po.amsgrad, {}), (po.adamax, {}),
    (po.nadam, {}), (po.radam, {}),
], ids=lambda v: getattr(v, "__name__", ""))
def test_inject_hyperparams_keeps_them_runtime(factory, kwargs):
    params = _params()
    static = ("total_steps",) if factory is po.radam else ()
    opt = optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.05, **kwargs)
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)
        updates, state = opt.update(jax.grad(_loss)(params, x), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    x = _batches(1)[0]
    for lr in (0.05, 0.01, 0.002):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        # the same as a transformation made with these (array) hyperparameters
        expected, _ = factory(**{**kwargs, **state.hyperparams}).update(
            jax.grad(_loss)(params, x), state.inner_state, params)
        new_params, state = step(params, state, x)
        _assert_close(new_params, optax.apply_updates(params, expected), 1e-12)
        params = new_params
    assert len(traces) == 1  # a new learning rate did not recompile


def test_polyopt_plateau_controller_drives_an_injected_learning_rate():
    """polyopt.schedules.reduce_on_plateau runs on the host once per epoch; its
    learning rate goes into the injected hyperparameters, without recompiling."""
    from polyopt import schedules

    params = _params()
    opt = optax.inject_hyperparams(po.sgd)(learning_rate=0.05, momentum=0.9)
    plateau = schedules.reduce_on_plateau(factor=0.5, patience=1, min_delta=0.0)
    control = plateau.init(0.05)
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)
        loss, grads = jax.value_and_grad(_loss)(params, x)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    for epoch_loss in [3.0, 2.0, 2.5, 2.6, 1.0]:  # the monitored metric, once per epoch
        params, state, _ = step(params, state, _batches(1)[0])
        control = plateau.update(control, epoch_loss)
        # the injected value's own dtype (a weakly typed array would retrace once)
        state.hyperparams["learning_rate"] = jnp.asarray(control.learning_rate, jnp.float64)
    assert control.num_reductions == 2
    assert float(state.hyperparams["learning_rate"]) == 0.0125
    assert len(traces) == 1


def test_inject_hyperparams_schedule_matches_optax():
    params = _params()
    schedule = optax.exponential_decay(0.1, 3, 0.5)
    ours = optax.inject_hyperparams(po.adam)(learning_rate=schedule, b1=0.8)
    native = optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=0.8)
    _assert_close(_run(ours, params)[0], _run(native, params)[0])


def test_inject_hyperparams_keeps_structural_defaults_static():
    # The signature shows None for momentum and the integer options (their
    # defaults), so inject_hyperparams leaves them static: the jitted update
    # works and the state has the structure of a plain call (no momentum buffer).
    params = _params()
    for factory, options in ((po.radam, {}), (po.rmsprop, {}), (po.sgd, {}),
                             (po.ranger, {})):
        opt = optax.inject_hyperparams(factory)(learning_rate=0.01, **options)
        plain = factory(learning_rate=0.01, **options)
        state, plain_state = jax.jit(opt.init)(params), jax.jit(plain.init)(params)
        assert (jax.tree.structure(state.inner_state) == jax.tree.structure(plain_state))
        updates, new = jax.jit(opt.update)(params, state, params)
        plain_updates, plain_new = jax.jit(plain.update)(params, plain_state, params)
        _assert_close(updates, plain_updates)
        assert jax.tree.structure(new.inner_state) == jax.tree.structure(plain_new)


def test_inject_hyperparams_structural_integer_needs_static_args():
    params = _params()
    opt = optax.inject_hyperparams(po.radam)(learning_rate=0.01, total_steps=100)
    state = opt.init(params)  # concrete there: total_steps is read as an int
    with pytest.raises(TypeError, match=re.escape(
            "radam: total_steps must be a Python int, got a traced array") + ".*"
            + re.escape("static_args=('total_steps',)")):
        jax.jit(opt.update)(params, state, params)
    static = optax.inject_hyperparams(po.radam, static_args=("total_steps", "warmup_proportion"))(
        learning_rate=0.01, total_steps=100)
    updates, _ = jax.jit(static.update)(params, static.init(params), params)
    plain = po.radam(0.01, total_steps=100)
    _assert_close(updates, plain.update(params, plain.init(params), params)[0])


# --------------------------------------------------------------------------
# errors


_OURS = {"sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax", "nadam",
         "radam", "ranger"}


@pytest.mark.parametrize("case", [e for e in ERRORS if e.rule in _OURS], ids=str)
def test_bad_hyperparameters_fail_at_construction(case):
    with pytest.raises(case.exception, match=case.match):
        getattr(po, case.rule)(**case.options)


def test_errors_use_optax_spellings():
    with pytest.raises(TypeError, match=r"adam: bias_correction_mu must be True or False, "
                                        r"got bias_correction_mu='yes'"):
        po.adam(bias_correction_mu="yes")
    with pytest.raises(TypeError, match=r"adam: .*first_moment_bias_correction"):
        po.adam(first_moment_bias_correction=False)
    with pytest.raises(ValueError, match=r"lookahead: sync_period must be an integer in "
                                         r"\[1, inf\), got sync_period=0"):
        po.lookahead(po.sgd(), sync_period=0)
    with pytest.raises(ValueError, match=r"sam: rho must be a number in \[0, inf\)"):
        po.sam(optax.sgd(0.1), rho=-1.0)
    with pytest.raises(ValueError, match=r"sam: sync_period must be an integer in \[2, inf\)"):
        po.sam(optax.sgd(0.1), sync_period=1)


def test_state_for_other_params_is_refused_naming_the_difference():
    params = _params()
    opt = po.adam(0.01)
    state = opt.init(params)
    renamed = {"dense": {"kernel": params["dense"]["kernel"], "b": params["dense"]["bias"]},
               "scale": params["scale"]}
    grads = jax.tree.map(jnp.ones_like, renamed)
    with pytest.raises(ValueError, match=r"adam.update: state.first_moment does not match "
                                         r"the params: .*lacks \['dense'\]\['b'\].*"
                                         r"has \['dense'\]\['bias'\] not in params"):
        opt.update(grads, state, renamed)
    fewer = {"dense": params["dense"]}
    with pytest.raises(ValueError, match=r"state.first_moment has 3 leaves, params 2"):
        opt.update(jax.tree.map(jnp.ones_like, fewer), state, fewer)
    reshaped = {**params, "scale": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"state.first_moment\['scale'\] has shape \(\) and "
                                         r"dtype float64, the params need \(3,\)"):
        opt.update(jax.tree.map(jnp.ones_like, reshaped), state, reshaped)
    with pytest.raises(ValueError, match=r"adam.update: state is a SGDState, expected a "
                                         r"AdamState"):
        opt.update(jax.tree.map(jnp.ones_like, params), po.sgd().init(params), params)
    with pytest.raises(ValueError, match=r"updates and params differ: .*lacks \['scale'\]"):
        opt.update(fewer, state, params)
    with pytest.raises(ValueError, match=r"updates\['scale'\] has shape \(\) and dtype "
                                         r"float32, params\['scale'\] has shape \(\) and "
                                         r"dtype float64"):
        opt.update({**params, "scale": jnp.asarray(1.0, jnp.float32)}, state, params)
    with pytest.raises(TypeError, match=r"adam.init: params\['n'\] must have a real or complex "
                                        r"floating dtype, got int"):
        opt.init({"n": jnp.arange(3)})


def test_params_needed_but_missing():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    po.adam(0.1).update(grads, po.adam(0.1).init(params))  # no weight decay: params unused
    for opt in (po.adamw(), po.sgd(weight_decay=0.1), po.ranger()):
        with pytest.raises(ValueError, match=r"\.update: params is None, but .*"
                                             r"call update\(updates, state, params\)"):
            opt.update(grads, opt.init(params))
    with pytest.raises(TypeError, match=r"lookahead.update: params must be "
                                        r"optax.LookaheadParams\(fast, slow\)"):
        opt = po.lookahead(po.sgd())
        opt.update(grads, opt.init(params), params)


# --------------------------------------------------------------------------
# lookahead and SAM protocols


def test_lookahead_reset_state_matches_optax():
    params = optax.LookaheadParams.init_synced(_params())
    ours = po.lookahead(po.adam(0.05), sync_period=3, slow_step_size=0.3, reset_state=True)
    native = optax.lookahead(optax.adam(0.05), sync_period=3, slow_step_size=0.3,
                             reset_state=True)

    def run(opt):
        p, s = params, opt.init(params)
        for x in _batches(10):
            updates, s = jax.jit(opt.update)(jax.grad(_loss)(p.fast, x), s, p)
            p = optax.apply_updates(p, updates)
        return p

    _assert_close(run(ours), run(native))
    # any optax transformation as the inner one, as optax.lookahead takes it
    for reset_state in (False, True):
        for inner in (optax.adam(0.05), optax.chain(optax.clip(0.5), optax.sgd(0.1, 0.9))):
            ours = po.lookahead(inner, sync_period=3, slow_step_size=0.3,
                                reset_state=reset_state)
            native = optax.lookahead(inner, sync_period=3, slow_step_size=0.3,
                                     reset_state=reset_state)
            _assert_close(run(ours), run(native))
    with pytest.raises(TypeError, match=r"lookahead: inner must be an optax "
                                        r"GradientTransformation, got 3"):
        po.lookahead(3)


def _compilations(opt, params) -> int:
    """How many times a jitted training step compiles over three steps."""
    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(lambda q: _loss(q, _batches(1)[0]))(p), s, p)
        return optax.apply_updates(p, updates), s

    s = opt.init(params)
    before = step._cache_size()
    for _ in range(3):
        params, s = step(params, s)
    return step._cache_size() - before


def test_a_jitted_step_compiles_once_like_optax():
    # The state of uncommitted params is uncommitted (as optax's): a committed
    # step count would make the first step's outputs committed and the second
    # call compile the same step again.
    params = jax.tree.map(jnp.asarray, _params())
    for ours, native in ((po.adam(0.1), optax.adam(0.1)),
                         (po.sgd(0.1, 0.9), optax.sgd(0.1, 0.9))):
        assert _compilations(native, params) == 1
        assert _compilations(ours, params) == 1


def test_update_takes_extra_args_like_optax():
    params = _params()
    for opt in (po.adam(0.1), po.sgd(0.1), po.lookahead(po.adam(0.1)),
                po.apply_if_finite(po.adam(0.1))):
        assert isinstance(opt, optax.GradientTransformationExtraArgs)
        p = optax.LookaheadParams.init_synced(params) if opt.init.__qualname__.startswith(
            "lookahead") else params
        grads = p.fast if isinstance(p, optax.LookaheadParams) else p
        updates, _ = jax.jit(opt.update)(grads, opt.init(p), p, unexpected_extra_arg=1)
        want, _ = opt.update(grads, opt.init(p), p)
        _assert_close(updates, want)


def test_state_dtype_has_optax_spellings():
    params = jnp.zeros(3, jnp.float32)
    state = po.sgd(0.1, 0.9, accumulator_dtype="bfloat16").init(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.ndim} == {jnp.dtype("bfloat16")}
    with pytest.raises(TypeError, match="unexpected"):
        po.sgd(0.1, 0.9, mu_dtype="bfloat16")


@pytest.mark.parametrize("sync_period", [2, 3])
def test_sam_opaque_mode_matches_optax(sync_period):
    params = _params()
    x = _batches(1)[0]

    def grad_fn(p, i):
        return jax.grad(_loss)(p, x * (1 + i))

    ours = po.sam(po.sgd(0.1, momentum=0.9), rho=0.1, eps=0.0, sync_period=sync_period,
                  opaque_mode=True)
    native = optax.contrib.sam(optax.sgd(0.1, momentum=0.9),
                               optax.chain(optax.contrib.normalize(), optax.sgd(0.1)),
                               sync_period=sync_period, opaque_mode=True)
    got, want = params, params
    state, native_state = ours.init(params), native.init(params)
    for _ in range(4):
        u, state = ours.update(jax.grad(_loss)(got, x), state, got, grad_fn=grad_fn)
        got = optax.apply_updates(got, u)
        u, native_state = native.update(jax.grad(_loss)(want, x), native_state, want,
                                        grad_fn=grad_fn)
        want = optax.apply_updates(want, u)
    _assert_close(got, want)
    with pytest.raises(ValueError, match=r"opaque_mode=True needs grad_fn"):
        ours.update(jax.grad(_loss)(got, x), state, got)


def test_sam_step_runs_both_gradients_in_one_jitted_call():
    params = _params()
    inner = optax.adam(0.05)
    step = po.sam_step(_loss, po.sam(inner, rho=0.05, eps=0.0))
    native = optax.contrib.sam(inner, optax.chain(optax.contrib.normalize(), optax.sgd(0.05)))
    native_update = jax.jit(native.update)
    state = po.sam(inner, rho=0.05, eps=0.0).init(params)
    want, native_state = params, native.init(params)
    got = jax.tree.map(jnp.copy, params)
    for x in _batches(6):
        loss_before = _loss(got, x)
        got, state, loss = step(got, state, x)
        np.testing.assert_allclose(float(loss), float(loss_before), rtol=1e-14)
        for _ in range(2):  # optax: two update calls, each with the gradient at the params
            u, native_state = native_update(jax.grad(_loss)(want, x), native_state, want)
            want = optax.apply_updates(want, u)
    _assert_close(got, want)
    assert step._cache_size() == 1
    with pytest.raises(TypeError, match=r"sam_step: optimizer must be made by polyopt.optax.sam"):
        po.sam_step(_loss, optax.adam(0.1))


def test_sam_step_with_aux_and_adaptive():
    params = _params()
    opt = po.sam(po.sgd(0.1), rho=0.5, adaptive=True)
    step = po.sam_step(lambda p, x: (_loss(p, x), {"n": x.shape[0]}), opt, has_aux=True,
                       donate=False)
    x = _batches(1)[0]
    new, _, (loss, aux) = step(params, opt.init(params), x)
    assert aux["n"] == 4
    core = rules.sam(rules.sgd(learning_rate=0.1), rho=0.5, adaptive=True)
    leaves = [np.asarray(p) for p in jax.tree.leaves(params)]
    grads = [np.asarray(g) for g in jax.tree.leaves(jax.grad(_loss)(params, x))]
    point = jax.tree.unflatten(jax.tree.structure(params), core.perturb(leaves, grads))
    second = [np.asarray(g) for g in jax.tree.leaves(jax.grad(_loss)(point, x))]
    updates, _ = core.update(second, core.init(leaves), leaves)
    _assert_close(jax.tree.leaves(new), [p + u for p, u in zip(leaves, updates)], 1e-13)


# --------------------------------------------------------------------------
# sharding and imports (child processes: XLA_FLAGS must be set before jax starts)


_SHARDING_SCRIPT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import polyopt.optax as po

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(8, 6))), "b": jnp.asarray(rng.normal(size=(6,)))}
specs = {"w": P("data", None), "b": P(None)}
sharded = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs)
out = {}
for name, opt in [("adamw", po.adamw(0.1)), ("ranger", po.ranger(0.1, sync_period=2)),
                  ("sgd", po.sgd(0.1, momentum=0.9, nesterov=True))]:
    def step(p, s, opt=opt):
        updates, s = opt.update(jax.tree.map(lambda x: jnp.sin(x) * x, p), s, p)
        return optax.apply_updates(p, updates), s
    step = jax.jit(step)
    runs = []
    for p in (params, sharded):
        s = opt.init(p)
        for _ in range(4):
            p, s = step(p, s)
        runs.append(p)
    out[name] = {
        "diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                    zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]))),
        "sharded": len(runs[1]["w"].sharding.device_set),
        "moved": float(jnp.max(jnp.abs(runs[0]["w"] - params["w"]))),
    }
result = out
"""


def test_sharded_params_give_the_unsharded_updates():
    result = run_python(_SHARDING_SCRIPT, env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    for name, r in result.items():
        assert r["sharded"] == 2, name  # the result stays sharded over both devices
        assert r["moved"] > 1e-2, name
        assert r["diff"] <= 1e-14, (name, r)


def test_import_brings_no_other_framework():
    result = run_python(textwrap.dedent("""
        import sys, polyopt.optax
        result = sorted(m for m in ("torch", "tensorflow", "keras") if m in sys.modules)
    """))
    assert result == []


def test_adadelta_default_descends_where_optax_default_ascends():
    params = _params()
    x = _batches(1)[0]
    start = float(_loss(params, x))

    def final_loss(opt):
        p, s = params, opt.init(params)
        for _ in range(20):
            updates, s = opt.update(jax.grad(_loss)(p, x), s, p)
            p = optax.apply_updates(p, updates)
        return float(_loss(p, x))

    assert final_loss(po.adadelta()) < start
    assert final_loss(optax.adadelta()) > start  # learning_rate=None: no -lr, uphill


_NO_X64_SCRIPT = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import polyopt.optax as po
from polyopt import schedules

assert not jax.config.jax_enable_x64
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
loss = lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
pairs = {
    "adam+one_cycle": (po.adam(schedules.one_cycle(30, 0.05, convention="optax")),
                       optax.adam(optax.cosine_onecycle_schedule(30, 0.05))),
    "nadam": (po.nadam(0.01, momentum_schedule=False), optax.nadam(0.01)),
    "radam": (po.radam(0.01, eps_placement="outside"), optax.radam(0.01)),
    "sgd": (po.sgd(0.05, momentum=0.9, nesterov=True), optax.sgd(0.05, 0.9, nesterov=True)),
}

def run(opt):
    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s
    p, s = params, opt.init(params)
    for _ in range(30):
        p, s = step(p, s)
    return p

def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(y)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

result = {}
for name, (ours, native) in pairs.items():
    mine, theirs = run(ours), run(native)
    with jax.enable_x64(True):  # optax again, its scalar math in float64 (params float32)
        theirs_x64 = run(native)
    result[name] = {"dtypes": sorted({str(a.dtype) for a in jax.tree.leaves(mine)}),
                    "diff": diff(mine, theirs), "diff_x64": diff(mine, theirs_x64)}
"""


def test_without_x64():
    """jax's default mode (float32 everywhere, int32 counts), in a fresh process.

    optax.radam computes rho_t = rho_inf - 2 t b2^t / (1 - b2^t) in float32
    there, which cancels (rho_inf ~ 2000, rho_5 ~ 5): its params end 2e-4
    from its own x64 run; polyopt's (float32, cancellation-free) stay at
    rounding level from optax's x64 run."""
    result = run_python(_NO_X64_SCRIPT, env={"JAX_ENABLE_X64": "0"})
    for name, r in result.items():
        assert r["dtypes"] == ["float32"], name
        assert r["diff_x64"] <= 1e-5, (name, r)
        if name != "radam":
            assert r["diff"] <= 1e-5, (name, r)
    assert result["radam"]["diff"] > 1e-5  # optax's float32 rho_t, see above
