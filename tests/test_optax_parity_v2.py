"""polyopt.optax against optax's own Lion, Adafactor, LAMB, LARS, ADOPT and
Schedule-Free AdamW, side by side, 200 steps, on params that exercise per-tensor
rules (tests/_v2_problem.py: a 160x128 matrix, a vector, a 4-D conv kernel, a scalar).
float64 (x64) max
relative difference <= 1e-10, float32 <= 1e-5. The polyopt options come from
``polyopt.native.PRESETS``. Schedule-Free is compared at the train point (the
params y) and at the eval point (``schedule_free_eval_params``).

optax.contrib.schedule_free_adamw with warmup_steps builds its learning rate
with optax.warmup_constant_schedule, which computes in float32 even under
x64 (3e-3 becomes 0.003000000026, and every warmup value is rounded): with
learning_rate=3e-3, warmup_steps=10 the float64 runs differ by 3.0e-9
(measured). The float64 warmup case uses values float32 holds exactly
(learning_rate 2**-8, warmup_steps 8), where the schedule is exact."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt import native
from tests import _v2_problem as problem

CASES = [
    ("optax.lion", lambda: po.lion(**{**native.PRESETS["optax.lion"][1],
                                      "learning_rate": 3e-3}),
     lambda: optax.lion(3e-3)),
    ("optax.lion b1=0.95 weight_decay=0.1",
     lambda: po.lion(**{**native.PRESETS["optax.lion"][1], "learning_rate": 3e-3, "b1": 0.95,
                        "weight_decay": 0.1}),
     lambda: optax.lion(3e-3, b1=0.95, weight_decay=0.1)),
    ("optax.contrib.adopt",
     lambda: po.adopt(**{**native.PRESETS["optax.contrib.adopt"][1], "learning_rate": 3e-3}),
     lambda: optax.contrib.adopt(3e-3)),
    ("optax.contrib.adopt b1=0.8 b2=0.99 nesterov clip t**0.5",
     lambda: po.adopt(**{**native.PRESETS["optax.contrib.adopt"][1], "learning_rate": 3e-3,
                         "b1": 0.8, "b2": 0.99, "nesterov": True, "clip_exponent": 0.5}),
     lambda: optax.contrib.adopt(3e-3, b1=0.8, b2=0.99, nesterov=True,
                                 clip_value_fn=lambda t: t ** 0.5)),
    ("optax.contrib.adopt use_clipping=False",
     lambda: po.adopt(**{**native.PRESETS["optax.contrib.adopt"][1], "learning_rate": 3e-3,
                         "use_clipping": False}),
     lambda: optax.contrib.adopt(3e-3, use_clipping=False)),
]

SF = "optax.contrib.schedule_free_adamw"
SF_CASES = [
    ("defaults", {"learning_rate": 3e-3}),
    ("b1=0.95 weight_decay=0.05", {"learning_rate": 3e-3, "b1": 0.95, "weight_decay": 0.05}),
    ("warmup_steps=8 weight_decay=0.05 b2=0.99",
     {"learning_rate": 2.0 ** -8, "warmup_steps": 8, "weight_decay": 0.05, "b2": 0.99}),
    ("weight_lr_power=1 eps=1e-6", {"learning_rate": 3e-3, "weight_lr_power": 1.0,
                                    "eps": 1e-6}),
]


def _jitted_steps(opt, state, params, grads, steps):
    """The params after ``steps`` jitted updates with the same grads, as numpy."""
    import jax
    import optax

    update = jax.jit(opt.update)
    for _ in range(steps):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return [np.asarray(x) for x in params]


def _matrices(params):
    """optax's mask form: True for the tensors of 2+ axes (decay and trust ratio
    off for the vector and the scalar, as usual for biases and norms)."""
    return {k: v.ndim > 1 for k, v in params.items()}


def _preset(key, factory, **options):
    return lambda: factory(**{**native.PRESETS[key][1], **options})


# (label, polyopt, native, the vector starts at 0: trust ratios special-case norm 0)
TRUST = [
    ("optax.lamb", _preset("optax.lamb", po.lamb, learning_rate=3e-3),
     lambda: optax.lamb(3e-3), False),
    ("optax.lamb weight_decay=0.1 zero-norm",
     _preset("optax.lamb", po.lamb, learning_rate=3e-3, weight_decay=0.1),
     lambda: optax.lamb(3e-3, weight_decay=0.1), True),
    ("optax.lamb b1=0.95 eps_root=1e-8 weight_decay=0.1 mask zero-norm",
     _preset("optax.lamb", po.lamb, learning_rate=3e-3, b1=0.95, eps_root=1e-8,
             weight_decay=0.1, mask=_matrices),
     lambda: optax.lamb(3e-3, b1=0.95, eps_root=1e-8, weight_decay=0.1, mask=_matrices), True),
    ("optax.lars", _preset("optax.lars", po.lars, learning_rate=0.5),
     lambda: optax.lars(0.5), False),
    ("optax.lars weight_decay=0.01 nesterov zero-norm",
     _preset("optax.lars", po.lars, learning_rate=0.5, weight_decay=0.01, nesterov=True),
     lambda: optax.lars(0.5, weight_decay=0.01, nesterov=True), True),
    ("optax.lars masks trust_coefficient=0.01 eps=1e-3 momentum=0.8 zero-norm",
     _preset("optax.lars", po.lars, learning_rate=0.1, weight_decay=0.01,
             trust_coefficient=0.01, eps=1e-3, momentum=0.8,
             weight_decay_mask=_matrices, trust_ratio_mask={"0": True, "1": False, "2": True,
                                                            "3": False}),
     lambda: optax.lars(0.1, weight_decay=0.01, trust_coefficient=0.01, eps=1e-3, momentum=0.8,
                        weight_decay_mask=_matrices,
                        trust_ratio_mask={"0": True, "1": False, "2": True, "3": False}),
     True),
]


def _run(opt, dtype, zero=False, with_state=False):
    params = {str(i): jnp.asarray(p) for i, p in enumerate(problem.initial(dtype, zero))}
    targets = jnp.asarray(np.stack([np.concatenate([t.reshape(-1) for t in step])
                                    for step in problem.targets(dtype)]))
    sizes = [int(np.prod(s)) for s in problem.SHAPES]

    def body(carry, target):
        p, s = carry
        parts = jnp.split(target, np.cumsum(sizes)[:-1])
        grads = {k: (p[k] - parts[i].reshape(problem.SHAPES[i])) * problem.scale(i)
                 for i, k in enumerate(sorted(p, key=int))}
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, state), _ = jax.jit(
        lambda p: jax.lax.scan(body, (p, opt.init(p)), targets))(params)
    final = [np.asarray(params[str(i)]) for i in range(len(problem.SHAPES))]
    return (final, params, state) if with_state else final


def _as_list(tree):
    return [np.asarray(tree[str(i)]) for i in range(len(problem.SHAPES))]


# ADOPT without clipping is compared in float64 only: its first steps divide by the
# square root of one squared gradient, and elements with a small first gradient
# take steps of up to 1/eps; float32 rounding grows through them. Measured after
# 200 steps: optax's own float32 run is 4.0e-4 from its float64 run, polyopt's
# float32 run 3.8e-5 from optax's float32 run (float64: 0).
RUNS = [(case, dtype) for case in CASES for dtype in ("float64", "float32")
        if not (case[0] == "optax.contrib.adopt use_clipping=False" and dtype == "float32")]


@pytest.mark.parametrize(("case", "dtype"), RUNS, ids=[f"{c[0]}-{d}" for c, d in RUNS])
def test_matches_optax_for_200_steps(case, dtype):
    _, ours, theirs = case
    problem.assert_parity(case[0], _run(ours(), dtype), _run(theirs(), dtype), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", TRUST, ids=[c[0] for c in TRUST])
def test_trust_ratio_rules_match_optax_for_200_steps(case, dtype):
    label, ours, theirs, zero = case
    got, want = _run(ours(), dtype, zero), _run(theirs(), dtype, zero)
    problem.assert_parity(label, got, want, dtype)
    if zero:  # the vector left 0 with the unscaled step, as the native's
        assert np.all(np.isfinite(got[1])) and np.max(np.abs(want[1])) > 1e-3


def test_lars_paper_norm_differs_from_optax():
    """polyopt's default denominator ||g|| + wd ||p|| (the paper) is not optax's
    ||g + wd p||: with weight decay the two runs part."""
    paper = _run(po.lars(0.5, weight_decay=0.01), "float64")
    assert problem.max_rel(paper, _run(optax.lars(0.5, weight_decay=0.01), "float64")) > 1e-3


def test_lion_state_is_one_moment_and_mu_dtype_is_optax_spelling():
    params = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    state = po.lion(1e-3, mu_dtype=jnp.bfloat16).init(params)
    # the momentum in bfloat16 and the count
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 1024 * 1024 * 2 + 4
    native_state = optax.lion(1e-3, mu_dtype=jnp.bfloat16).init(params)
    assert native_state[0].mu["w"].dtype == state.momentum["w"].dtype


#: the optax.adafactor preset in optax's spellings
ADAFACTOR_PRESET = {po.adafactor.spec[k].spelling("optax"): v
                    for k, v in native.PRESETS["optax.adafactor"][1].items()}


def _adafactor(**options):
    return po.adafactor(**{**ADAFACTOR_PRESET, **options})


ADAFACTOR_CASES = [
    ("optax.adafactor", lambda dtype: _adafactor(learning_rate=1e-2),
     lambda dtype: optax.adafactor(1e-2)),
    # optax's default learning_rate=None scales by nothing: the preset's 1.0
    ("optax.adafactor() learning_rate=None", lambda dtype: _adafactor(),
     lambda dtype: optax.adafactor()),
    # optax's momentum is stored in float32 by default (dtype_momentum), float64
    # runs too: the preset's momentum_dtype="float32"; the step uses the momentum
    # before it is rounded to float32, in both
    ("optax.adafactor momentum=0.9 weight_decay_rate=0.01",
     lambda dtype: _adafactor(learning_rate=1e-2, momentum=0.9, weight_decay_rate=0.01),
     lambda dtype: optax.adafactor(1e-2, momentum=0.9, weight_decay_rate=0.01)),
    ("optax.adafactor momentum=0.9 dtype_momentum=the params' dtype",
     lambda dtype: _adafactor(learning_rate=1e-2, momentum=0.9,
                              dtype_momentum=jnp.dtype(dtype)),
     lambda dtype: optax.adafactor(1e-2, momentum=0.9, dtype_momentum=jnp.dtype(dtype))),
    # the conv kernel factored too (its two largest axes, 16 and 8), no clipping, no
    # parameter scale. (decay_offset is not compared: from a fresh state optax's
    # t = count - offset + 1 <= 0 makes its statistics NaN for good.)
    # optax's spelling decay_rate=0.7 (beta2_decay=-0.7)
    ("optax.adafactor min_dim_size_to_factor=8 no clipping no scale decay_rate=0.7",
     lambda dtype: _adafactor(learning_rate=1e-2, min_dim_size_to_factor=8,
                              clipping_threshold=None, multiply_by_parameter_scale=False,
                              decay_rate=0.7),
     lambda dtype: optax.adafactor(1e-2, min_dim_size_to_factor=8, clipping_threshold=None,
                                   multiply_by_parameter_scale=False, decay_rate=0.7)),
    ("optax.adafactor factored=False eps=1e-20",
     lambda dtype: _adafactor(learning_rate=1e-2, factoring="none", eps=1e-20),
     lambda dtype: optax.adafactor(1e-2, factored=False, eps=1e-20)),
]

#: optax.adafactor computes its decay schedule 1 - t^-decay_rate in float32
#: (optax/_src/factorized.py, _decay_rate_pow: t = jnp.array(i + 1, jnp.float32)),
#: also in float64 runs. Measured after 200 steps: 2.3e-8, 1.1e-8, 1.4e-7,
#: 2.3e-8 for the four cases; the same transformations with that schedule in
#: float64 (test_adafactor_float64_differs_only_by_optax_float32_schedule) agree
#: to 3.4e-16 .. 8.2e-16.
OPTAX_FLOAT32_SCHEDULE = 5e-7


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_adafactor_matches_optax_for_200_steps(case, dtype):
    label, ours, theirs = case
    got, want = _run(ours(dtype), dtype), _run(theirs(dtype), dtype)
    if dtype == "float32":
        problem.assert_parity(label, got, want, dtype)
        return
    worst = problem.max_rel(got, want)
    print(f"\nPARITY {label} | float64 (optax's float32 schedule) | {worst:.2g}")
    assert 1e-10 < worst <= OPTAX_FLOAT32_SCHEDULE
    assert problem.max_rel(problem.initial(dtype), want) > 1e-2


def _float64_schedule(i, exponent=0.8):
    return 1.0 - jnp.asarray(i + 1, jnp.float64) ** (-exponent)


@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_adafactor_float64_differs_only_by_optax_float32_schedule(case, monkeypatch):
    """optax.adafactor with its decay schedule evaluated in float64 (its
    ``decay_rate_fn`` default replaced; everything else optax's): 1e-10."""
    from optax._src import factorized

    defaults = factorized.scale_by_factored_rms.__defaults__
    assert defaults[-1] is factorized._decay_rate_pow
    monkeypatch.setattr(factorized.scale_by_factored_rms, "__defaults__",
                        (*defaults[:-1], _float64_schedule))
    label, ours, theirs = case
    # optax's default momentum storage is float32 in float64 runs too: both round the
    # same float64 momentum to float32 each step, and where the float64 math differs
    # in its last bits the rounding can differ by one float32 ulp. Measured: 1.1e-7
    # (the case with dtype_momentum the params' dtype: 4.1e-16).
    float32_momentum = label == "optax.adafactor momentum=0.9 weight_decay_rate=0.01"
    problem.assert_parity(f"{label} (float64 schedule)", _run(ours("float64"), "float64"),
                          _run(theirs("float64"), "float64"), "float64",
                          tolerance=1e-6 if float32_momentum else None)


def test_adafactor_decay_rate_under_inject_hyperparams_matches_optax():
    """optax's decay_rate, traced by optax.inject_hyperparams, steps as optax's."""
    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
    out = []
    for factory, options in ((po.adafactor, ADAFACTOR_PRESET),
                             (optax.adafactor, {})):
        opt = optax.inject_hyperparams(factory, static_args=("min_dim_size_to_factor",))(
            **{**options, "learning_rate": 0.1, "decay_rate": 0.5})
        state = opt.init(params)
        assert float(state.hyperparams["decay_rate"]) == 0.5  # injected: an array
        out.append(_jitted_steps(opt, state, params, grads, 3))
    assert problem.max_rel(out[0], out[1]) <= 1e-6  # float32 runs
    assert problem.max_rel(out[1], [np.asarray(x) for x in params]) > 1e-2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("dtype_momentum", [jnp.float32, jnp.float64, jnp.bfloat16, None])
def test_adafactor_momentum_is_stored_in_dtype_momentum_as_optax(dtype, dtype_momentum):
    """The momentum's storage dtype and bytes are optax's for every dtype_momentum
    (None: the params' dtype, in both); the statistics keep the params' dtype."""
    ours = _adafactor(learning_rate=1e-2, momentum=0.9, dtype_momentum=dtype_momentum)
    theirs = optax.adafactor(1e-2, momentum=0.9, dtype_momentum=dtype_momentum)
    got, _, state = _run(ours, dtype, with_state=True)
    want, _, native_state = _run(theirs, dtype, with_state=True)
    ema = next(s for s in native_state if hasattr(s, "ema")).ema
    assert [x.dtype for x in jax.tree.leaves(state.momentum)] == [
        x.dtype for x in jax.tree.leaves(ema)]
    assert sum(x.nbytes for x in jax.tree.leaves(state.momentum)) == sum(
        x.nbytes for x in jax.tree.leaves(ema))
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(state.v_row))
    if dtype_momentum is jnp.bfloat16:
        # optax multiplies the stored bfloat16 momentum by its decay in bfloat16 (a
        # Python float times a bfloat16 array stays bfloat16) before adding the new
        # step in the params' dtype; polyopt converts the momentum to the params'
        # dtype first (as for every state_dtype). Measured after 200 steps: 1.1e-2
        # (float64 params), 8.7e-3 (float32); optax's chain with that product taken
        # in the params' dtype instead: 3.3e-6, 1.5e-4.
        problem.assert_parity("adafactor dtype_momentum=bfloat16", got, want, dtype,
                              tolerance=2e-2)
    elif dtype == "float32":
        problem.assert_parity(f"adafactor dtype_momentum={dtype_momentum}", got, want, dtype)
    else:
        assert problem.max_rel(got, want) <= OPTAX_FLOAT32_SCHEDULE


def test_adafactor_dtype_momentum_under_inject_hyperparams():
    """optax.inject_hyperparams takes optax's default dtype_momentum=jnp.float32 (a
    callable) for a schedule and passes its value, an array: without momentum it
    stores nothing (ignored, as optax does); with momentum polyopt says to make it
    static (optax fails there: the array is unhashable), and static it steps as optax."""
    params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
    signature = inspect.signature(optax.adafactor)

    def as_optax(**kwargs):
        """polyopt.optax.adafactor behind optax's signature: the arguments that are
        not optax's defaults on top of the preset (as the conformance suite does)."""
        given = {k: v for k, v in kwargs.items()
                 if not (v is signature.parameters[k].default or (
                     isinstance(v, (int, float)) and v == signature.parameters[k].default))}
        return po.adafactor(**{**ADAFACTOR_PRESET, **given})

    as_optax.__signature__ = signature
    out = []
    for factory, static in ((as_optax, ("min_dim_size_to_factor",)),
                            (optax.adafactor, ("min_dim_size_to_factor",)),
                            (as_optax, ("min_dim_size_to_factor", "dtype_momentum")),
                            (optax.adafactor, ("min_dim_size_to_factor", "dtype_momentum"))):
        momentum = 0.9 if "dtype_momentum" in static else None
        opt = optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.1,
                                                                    momentum=momentum)
        state = opt.init(params)
        out.append(_jitted_steps(opt, state, params, grads, 3))
    assert problem.max_rel(out[0], out[1]) <= 1e-6  # float32 runs
    assert problem.max_rel(out[2], out[3]) <= 1e-6
    assert problem.max_rel(out[1], [np.asarray(x) for x in params]) > 1e-2
    with pytest.raises(TypeError, match=r"adafactor: dtype_momentum must be one of 'float32'"
                                        r".*got dtype_momentum=Array.*static_args="):
        optax.inject_hyperparams(as_optax, static_args=("min_dim_size_to_factor",))(
            learning_rate=0.1, momentum=0.9).init(params)


def test_adafactor_dtype_momentum_is_checked_in_optax_spelling():
    with pytest.raises(ValueError, match=r"adafactor: dtype_momentum must be one of 'float32', "
                                         r"'float64', 'bfloat16', 'float16' or None, got "
                                         r"dtype_momentum='int8'"):
        po.adafactor(1e-2, momentum=0.9, dtype_momentum="int8")


def test_adafactor_decay_rate_is_checked():
    with pytest.raises(ValueError, match=r"adafactor: decay_rate must be a number in "
                                         r"\[0, inf\) or None, got decay_rate=-0.8"):
        po.adafactor(1e-2, decay_rate=-0.8)
    with pytest.raises(TypeError, match=r"adafactor: give beta2_decay or optax's decay_rate, "
                                        r"not both; got beta2_decay=-0.5 and decay_rate=0.8"):
        po.adafactor(1e-2, beta2_decay=-0.5, decay_rate=0.8)
    with pytest.raises(TypeError, match=r"adafactor: .*unexpected keyword argument 'decay'"):
        po.adafactor(1e-2, decay=0.8)


def test_every_factory_carries_its_spec():
    """Each factory names its spec (the masked ones, lamb and lars, too): wrappers read
    the optax spellings from it."""
    from polyopt import hyper

    for name in ("sgd", "adam", "lion", "adafactor", "lamb", "lars", "schedule_free_adamw",
                 "adopt", "muon"):
        assert getattr(po, name).spec is hyper.spec(name), name


def test_adafactor_state_is_two_vectors_for_a_matrix():
    params = {"w": jnp.zeros((1024, 1024), jnp.float32), "b": jnp.zeros((1024,), jnp.float32)}
    state = po.adafactor(1e-2).init(params)
    # v_row and v_col of w, v of b, the (0,)-shaped placeholders, the int32 count
    assert state.v_row["w"].shape == (1024,) and state.v_col["w"].shape == (1024,)
    assert state.v["w"].shape == (0,) and state.v["b"].shape == (1024,)
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 8192 + 4096 + 4
    only_w = po.adafactor(1e-2).init({"w": params["w"]})
    assert sum(x.nbytes for x in jax.tree.leaves(only_w)) - 4 == 8 * 1024  # 8 KiB
    native_state = optax.adafactor(1e-2).init({"w": params["w"]})
    native_bytes = sum(x.nbytes for x in jax.tree.leaves(native_state))
    assert native_bytes < 9 * 1024  # optax's: the same vectors and (1,) placeholders


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_zero_param_and_zero_gradient_match_optax(name):
    """A tensor at 0 and one whose gradient is always 0: both natives step them
    with the ratio 1 (no 0/0); polyopt gives the same numbers, all finite."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(6, 5))), "zero": jnp.zeros(4),
              "still": jnp.ones(3)}
    grads = [{"w": jnp.asarray(rng.normal(size=(6, 5))), "zero": jnp.asarray(rng.normal(size=4)),
              "still": jnp.zeros(3)} for _ in range(20)]
    ours = getattr(po, name)(**{**native.PRESETS[f"optax.{name}"][1], "learning_rate": 0.1})
    theirs = getattr(optax, name)(0.1)
    out = []
    for opt in (ours, theirs):
        p, state = params, opt.init(params)
        for g in grads:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        out.append([np.asarray(p[k]) for k in sorted(p)])
    assert all(np.all(np.isfinite(x)) for x in out[0])
    assert problem.max_rel(out[0], out[1]) <= 1e-12
    assert np.max(np.abs(out[1][2])) > 1e-3  # "zero" moved


def test_masks_are_checked():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    opt = po.lars(0.1, trust_ratio_mask={"w": True, "b": "no"})
    with pytest.raises(TypeError, match=r"lars.update: trust_ratio_mask must hold Python bools"):
        opt.update(grads, opt.init(params), params)
    opt = po.lamb(0.1, weight_decay=0.1, mask={"w": True})
    with pytest.raises(ValueError, match=r"lamb.update: mask must be a bool or a tree like"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(TypeError, match=r"lars: weight_decay_mask must be a bool, a tree of "
                                        r"bools or a callable params -> tree, got "
                                        r"weight_decay_mask=None"):
        po.lars(0.1, weight_decay_mask=None)


def test_lookahead_around_a_masked_lars_is_optax_lookahead_around_optax_lars():
    """polyopt.optax.lookahead wraps any transformation, the masked ones included."""
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4))), "b": jnp.zeros(4)}
    mask = {"w": True, "b": False}
    out = []
    for tx in (po.lookahead(po.lars(0.1, trust_norm="combined", weight_decay=0.01,
                                    trust_ratio_mask=mask, weight_decay_mask=mask),
                            sync_period=3, slow_step_size=0.5),
               optax.lookahead(optax.lars(0.1, weight_decay=0.01, trust_ratio_mask=mask,
                                          weight_decay_mask=mask),
                               sync_period=3, slow_step_size=0.5)):
        p = optax.LookaheadParams.init_synced(params)
        state = tx.init(p)
        for i in range(7):
            updates, state = tx.update(jax.tree.map(lambda x, i=i: jnp.sin(x + i), p.fast),
                                       state, p)
            p = optax.apply_updates(p, updates)
        out.append([np.asarray(x) for x in jax.tree.leaves(p)])
    assert problem.max_rel(out[0], out[1]) <= 1e-10
    assert problem.max_rel(out[1], [np.asarray(x) for x in jax.tree.leaves(
        optax.LookaheadParams.init_synced(params))]) > 1e-3


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", SF_CASES, ids=[c[0] for c in SF_CASES])
def test_schedule_free_matches_optax_at_train_and_eval_points(case, dtype):
    label, options = case
    ours = po.schedule_free_adamw(**{**native.PRESETS[SF][1], **options})
    got, got_tree, got_state = _run(ours, dtype, with_state=True)
    want, want_tree, want_state = _run(optax.contrib.schedule_free_adamw(**options), dtype,
                                       with_state=True)
    problem.assert_parity(f"{SF} {label} (train point y)", got, want, dtype)
    want_x = _as_list(optax.contrib.schedule_free_eval_params(want_state, want_tree))
    got_x = _as_list(po.schedule_free_eval_params(got_state, got_tree))
    problem.assert_parity(f"{SF} {label} (eval point x)", got_x, want_x, dtype)
    # the eval point is another point than the train point
    assert problem.max_rel(want_x, want) > 100 * problem.TOLERANCE[dtype]
    # optax's own eval function reads polyopt's state (z and b1 are its fields)
    native_x = _as_list(optax.contrib.schedule_free_eval_params(got_state, got_tree))
    assert problem.max_rel(native_x, got_x) <= problem.TOLERANCE[dtype]


def test_schedule_free_eval_params_finds_the_state_in_a_chain():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), po.schedule_free_adamw(0.1))
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    x = po.schedule_free_eval_params(state, params)
    direct = optax.contrib.schedule_free_eval_params(state[1], params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), x, direct))
    with pytest.raises(ValueError, match="no Schedule-Free state"):
        po.schedule_free_eval_params(optax.adam(1e-3).init(params), params)
