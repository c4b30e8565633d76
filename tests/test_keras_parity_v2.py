"""polyopt.keras against keras.optimizers' Lion, Adafactor, Lamb and ScheduleFreeAdamW,
side by side on this Keras backend, 200 steps on tests/_v2_problem.py's params
(a 160x128 matrix, a vector, a 4-D conv kernel, a scalar). float64 <= 1e-10 with
hyperparameters float32
represents exactly (Keras rounds some float64 hyperparameters through
float32: tests/test_keras_parity.py's docstring), float32 <= 1e-5 with
Keras's defaults. polyopt's options come from ``polyopt.native.PRESETS``."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt import native
from tests import _v2_problem as problem
from tests._native import run_keras

CASES = [
    ("Lion", pk.Lion, keras.optimizers.Lion, "keras.optimizers.Lion", {}, {}),
    ("Lion-weight_decay", pk.Lion, keras.optimizers.Lion, "keras.optimizers.Lion",
     {"weight_decay": 2.0 ** -4}, {"weight_decay": 0.05}),
    ("Lamb", pk.Lamb, keras.optimizers.Lamb, "keras.optimizers.Lamb", {}, {}),
    ("Lamb-weight_decay", pk.Lamb, keras.optimizers.Lamb, "keras.optimizers.Lamb",
     {"weight_decay": 2.0 ** -4}, {"weight_decay": 0.05}),
    ("ScheduleFreeAdamW", pk.ScheduleFreeAdamW, keras.optimizers.ScheduleFreeAdamW,
     "keras.optimizers.ScheduleFreeAdamW", {}, {}),
    ("ScheduleFreeAdamW-warmup-weight_decay", pk.ScheduleFreeAdamW,
     keras.optimizers.ScheduleFreeAdamW, "keras.optimizers.ScheduleFreeAdamW",
     {"warmup_steps": 8, "weight_decay": 2.0 ** -4, "epsilon": 2.0 ** -20},
     {"warmup_steps": 10, "weight_decay": 0.05}),
]
DYADIC = {"learning_rate": 2.0 ** -8, "beta_1": 0.875, "beta_2": 1 - 2.0 ** -7}
# Lion with weight decay in float32 is compared in float64 only: Keras decays the
# variable in a separate assign before the step (p - p*wd*lr, rounded, then the
# step), polyopt adds one update; the ulp this moves flips sign(c) where c is
# near 0, and a flip moves an element by 2*lr. Measured after 200 steps:
# 2.1e-5 (jax, tensorflow backends), 4.7e-3 (torch backend, whose decay
# factor is float32 as well); float64: 1.7e-15.
# Lamb from a zero-norm tensor in float32: 3e-5, not 1e-5. Keras computes the
# bias correction 1 - beta_2**t in float32, with beta_2 = 0.999 rounded to
# 0.99900001: at t = 1 that is 1.3e-5 relative off, 6.4e-6 after the sqrt
# (polyopt computes it in double, as optax). Elsewhere the trust ratio
# ||p|| / ||r|| divides that factor out; on a tensor of norm 0 the ratio is 1
# and the first step keeps it: after one step every element of the vector that
# starts at 0 differs by 2.0e-8 on a step of 3e-3. Measured after 200 steps:
# 7.0e-6 (jax), 6.9e-6 (tensorflow), 1.1e-5 (torch backend, whose param
# roundings differ by an ulp on a third of the elements each step); float64:
# 4.5e-16 (jax, tensorflow), 1.3e-13 (torch backend: epsilon=1e-7 goes
# through float32 there; with a dyadic epsilon 3.4e-16).
ZERO_NORM_FLOAT32 = 3e-5
RUNS = [(case, dtype) for case in CASES for dtype in ("float64", "float32")
        if not (case[0] == "Lion-weight_decay" and dtype == "float32")]


def _run(opt, dtype, zero=False, exclude=False, with_variables=False):
    variables = [keras.Variable(p, dtype=dtype) for p in problem.initial(dtype, zero)]
    if exclude:  # the vector and the scalar, as biases usually are
        opt.exclude_from_weight_decay(var_list=[variables[1], variables[3]])
    for target in problem.targets(dtype):
        grads = [keras.ops.convert_to_tensor((keras.ops.convert_to_numpy(v) - t)
                                             * problem.scale(i), dtype=dtype)
                 for i, (v, t) in enumerate(zip(variables, target))]
        opt.apply_gradients(zip(grads, variables))
    final = [keras.ops.convert_to_numpy(v) for v in variables]
    return (final, variables) if with_variables else final


@pytest.mark.parametrize(("case", "dtype"), RUNS, ids=[f"{c[0]}-{d}" for c, d in RUNS])
def test_matches_keras_for_200_steps(case, dtype):
    _, ours_cls, native_cls, key, exact, ordinary = case
    options = {**DYADIC, **exact} if dtype == "float64" else {"learning_rate": 3e-3, **ordinary}
    rule_options = dict(native.PRESETS[key][1])
    spelled = {ours_cls.spec[k].spelling("keras"): v for k, v in rule_options.items()}
    ours, theirs = ours_cls(**{**spelled, **options}), native_cls(**options)
    got, variables = _run(ours, dtype, with_variables=True)
    want = _run(theirs, dtype)
    backend = keras.backend.backend()
    if native_cls is keras.optimizers.ScheduleFreeAdamW:
        # the eval point: Keras has no function for it; x = (y - (1 - b1) z) / b1 from
        # its z (the "momentum" variables), against polyopt's evaluation_point()
        b1 = options.get("beta_1", 0.9)
        want_x = [(y - (1 - b1) * keras.ops.convert_to_numpy(z)) / b1
                  for y, z in zip(want, theirs._momentums)]
        if backend != "jax":
            # see SF_ALIASING: the native as written runs on the jax backend (a child
            # process); here it differs from itself there by the measured amount
            here = problem.max_rel(want, _native_sf_on_jax(options, dtype)[0])
            print(f"\nNATIVE keras-{backend} vs keras-jax {case[0]} | {dtype} | {here:.2g}")
            assert 1e-2 < here < 1e-1
            want, want_x = _native_sf_on_jax(options, dtype)
        problem.assert_parity(f"keras-{backend} {case[0]}", got, want, dtype)
        with ours.evaluation_point():
            got_x = [keras.ops.convert_to_numpy(v) for v in variables]
        problem.assert_parity(f"keras-{keras.backend.backend()} {case[0]} (eval point x)",
                              got_x, want_x, dtype)
        assert problem.max_rel(want_x, want) > 1e-3
        restored = [keras.ops.convert_to_numpy(v) for v in variables]
        assert all(np.array_equal(a, b) for a, b in zip(restored, got))
    else:
        problem.assert_parity(f"keras-{backend} {case[0]}", got, want, dtype)


# keras.optimizers.ScheduleFreeAdamW (Keras 3.15) keeps ``momentum_old =
# momentum.value`` before ``assign_sub(momentum, ...)`` to recover x_old from the
# old z. On the tensorflow backend ``.value`` is the tf.Variable and on the torch
# backend the tensor that the assign updates in place, so x_old is computed from
# the NEW z there: x gains (1 - b1)/b1 * lr * d every step. On the jax backend
# (immutable arrays) the native computes the algorithm as written, which polyopt
# reproduces to 1e-14. Measured after 200 steps, native tensorflow/torch backend
# against native jax backend: 4.7e-2 (float64), 2.8e-2 (float32). On those two
# backends polyopt is compared with the native run on jax in a child process.
SF_ALIASING = "Keras's momentum_old aliases the updated z on the tensorflow and torch backends"

_NATIVE_SF_SCRIPT = """
import keras
dtype, options = payload["dtype"], payload["options"]
variables = [keras.Variable(np.asarray(p, dtype), dtype=dtype) for p in payload["initial"]]
opt = keras.optimizers.ScheduleFreeAdamW(**options)
for step in payload["targets"]:
    grads = [keras.ops.convert_to_tensor((keras.ops.convert_to_numpy(v) - np.asarray(t, dtype))
                                         * s, dtype=dtype)
             for v, t, s in zip(variables, step, payload["scales"])]
    opt.apply_gradients(zip(grads, variables))
b1 = options.get("beta_1", 0.9)
ys = [keras.ops.convert_to_numpy(v) for v in variables]
xs = [(y - (1 - b1) * keras.ops.convert_to_numpy(z)) / b1 for y, z in zip(ys, opt._momentums)]
result = {"y": ys, "x": xs}
"""
_NATIVE_SF_CACHE: dict = {}


def _native_sf_on_jax(options: dict, dtype: str) -> tuple[list, list]:
    """keras.optimizers.ScheduleFreeAdamW on the jax backend, in a child process."""
    key = (tuple(sorted(options.items())), dtype)
    if key not in _NATIVE_SF_CACHE:
        payload = {"dtype": dtype, "options": options,
                   "initial": [p.tolist() for p in problem.initial(dtype)],
                   "targets": [[t.tolist() for t in step] for step in problem.targets(dtype)],
                   "scales": [problem.scale(i) for i in range(len(problem.SHAPES))]}
        out = run_keras(_NATIVE_SF_SCRIPT, payload, backend="jax")
        _NATIVE_SF_CACHE[key] = tuple([np.asarray(a, dtype).reshape(s)
                                       for a, s in zip(out[k], problem.SHAPES)]
                                      for k in ("y", "x"))
    return _NATIVE_SF_CACHE[key]


def test_lion_keeps_one_moment_per_variable():
    opt = pk.Lion(learning_rate=1e-3)
    variables = [keras.Variable(np.zeros((1024, 1024), "float32"))]
    opt.build(variables)
    slots = [v for v in opt.variables if tuple(v.shape) == (1024, 1024)]
    assert len(slots) == 1 and opt.get_config()["beta_2"] == 0.99


ADAFACTOR_CASES = [
    ("defaults", {}),
    ("weight_decay", {"weight_decay": 2.0 ** -3}),
    ("epsilon_1 clip_threshold epsilon_2", {"epsilon_1": 2.0 ** -60, "clip_threshold": 2.0,
                                            "epsilon_2": 2.0 ** -6}),
]
#: float64 with float32-exact hyperparameters (beta_2_decay too: on the jax and
#: torch backends Keras converts the Python float to a float32 tensor).
ADAFACTOR_EXACT = {"learning_rate": 2.0 ** -4, "beta_2_decay": -0.75}
#: On the jax and torch backends Keras 3's ops.mean reduces float64 in float32
#: (keras/src/backend/{jax,torch}/numpy.py: compute_dtype = result_type(x.dtype,
#: "float32"), which keras.src.backend.common.dtypes makes float32), and
#: keras.optimizers.Adafactor takes every statistic and RMS with ops.mean.
#: Measured after 200 steps in float64: 2.1e-7 (jax), 4.3e-8 (torch); the
#: tensorflow backend reduces in float64 and agrees to 1e-10 (measured 2e-15).
KERAS_MEAN_IN_FLOAT32 = 1e-6


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ADAFACTOR_CASES, ids=[c[0] for c in ADAFACTOR_CASES])
def test_adafactor_matches_keras_for_200_steps(case, dtype):
    label, options = case
    options = {**(ADAFACTOR_EXACT if dtype == "float64" else {"learning_rate": 3e-3}),
               **options}
    rule_options = native.PRESETS["keras.optimizers.Adafactor"][1]
    spelled = {pk.Adafactor.spec[k].spelling("keras"): v for k, v in rule_options.items()}
    got = _run(pk.Adafactor(**{**spelled, **options}), dtype)
    want = _run(keras.optimizers.Adafactor(**options), dtype)
    backend = keras.backend.backend()
    title = f"keras-{backend} Adafactor {label}"
    if dtype == "float32" or backend == "tensorflow":
        problem.assert_parity(title, got, want, dtype)
        return
    worst = problem.max_rel(got, want)
    print(f"\nPARITY {title} | float64 (Keras's float32 mean) | {worst:.2g}")
    assert 1e-10 < worst <= KERAS_MEAN_IN_FLOAT32
    assert problem.max_rel(problem.initial(dtype), want) > 1e-2


def test_adafactor_relative_step_false_still_caps_the_step_in_keras():
    """keras.optimizers.Adafactor(relative_step=False) takes min(learning_rate,
    1/sqrt(t)) all the same (rho_t in its update_step): its preset is polyopt's
    relative_step=True. With learning_rate 0.5 the cap binds from step 5 on."""
    key = "keras.optimizers.Adafactor(relative_step=False)"
    spelled = {pk.Adafactor.spec[k].spelling("keras"): v
               for k, v in native.PRESETS[key][1].items()}
    options = {"learning_rate": 0.5}
    want = _run(keras.optimizers.Adafactor(relative_step=False, **options), "float32")
    got = _run(pk.Adafactor(**{**spelled, **options}), "float32")
    problem.assert_parity(f"keras-{keras.backend.backend()} {key}", got, want, "float32")
    uncapped = _run(pk.Adafactor(**{**spelled, **options, "relative_step": False}), "float32")
    assert problem.max_rel(uncapped, want) > 1e-2


def test_adafactor_keeps_two_vectors_per_matrix():
    variables = [keras.Variable(np.zeros((1024, 1024), "float32"))]
    opt = pk.Adafactor()
    opt.build(variables)
    slots = [v for v in opt.variables if v.path not in {opt.iterations.path,
                                                        opt._learning_rate.path}]
    assert sorted(tuple(v.shape) for v in slots) == [(0,), (1024,), (1024,)]
    assert sum(int(np.prod(v.shape)) * 4 for v in slots) == 8 * 1024  # 8 KiB
    native_opt = keras.optimizers.Adafactor()
    native_opt.build(variables)
    # Keras's own keeps a full-size velocity besides its two factors
    assert max(int(np.prod(v.shape)) for v in native_opt.variables) == 1024 * 1024


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("exclude", [False, True], ids=["all-decayed", "excluded"])
def test_lamb_from_zero_norm_with_excluded_variables(exclude, dtype):
    """The vector starts at 0 (Keras's ratio is 1 there, polyopt's too), with
    weight decay, and with the vector and the scalar excluded from it."""
    key = "keras.optimizers.Lamb"
    spelled = {pk.Lamb.spec[k].spelling("keras"): v for k, v in native.PRESETS[key][1].items()}
    options = ({**DYADIC, "weight_decay": 2.0 ** -4} if dtype == "float64"
               else {"learning_rate": 3e-3, "weight_decay": 0.05})
    got = _run(pk.Lamb(**{**spelled, **options}), dtype, zero=True, exclude=exclude)
    want = _run(keras.optimizers.Lamb(**options), dtype, zero=True, exclude=exclude)
    problem.assert_parity(f"keras-{keras.backend.backend()} Lamb zero-norm exclude={exclude}",
                          got, want, dtype, ZERO_NORM_FLOAT32 if dtype == "float32" else None)
    assert np.max(np.abs(want[1])) > 1e-3  # the vector left 0


_OPTAX_LARS = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, optax
from tests import _v2_problem as problem
mask = [True, False, True, False]
opt = optax.lars(0.5, weight_decay=0.01, nesterov=True, weight_decay_mask=mask,
                 trust_ratio_mask=mask)
params = [jnp.asarray(p) for p in problem.initial("float64", zero=True)]
state = opt.init(params)
for target in problem.targets("float64"):
    grads = [(p - t) * problem.scale(i) for i, (p, t) in enumerate(zip(params, target))]
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
result = [np.asarray(p) for p in params]
"""


def test_lars_matches_optax_lars_with_its_masks():
    """Keras has no LARS: polyopt.keras.Lars against optax.lars (run in a child
    process), the masks as exclude_from_weight_decay / exclude_from_trust_ratio."""
    from tests._native import run_python

    want = [np.asarray(p) for p in run_python(_OPTAX_LARS)]
    variables = [keras.Variable(p, dtype="float64") for p in problem.initial("float64", True)]
    opt = pk.Lars(learning_rate=0.5, weight_decay=0.01, nesterov=True,
                  **native.PRESETS["optax.lars"][1])
    opt.exclude_from_weight_decay(var_list=[variables[1], variables[3]])
    opt.exclude_from_trust_ratio(var_list=[variables[1], variables[3]])
    for target in problem.targets("float64"):
        grads = [keras.ops.convert_to_tensor((keras.ops.convert_to_numpy(v) - t)
                                             * problem.scale(i), dtype="float64")
                 for i, (v, t) in enumerate(zip(variables, target))]
        opt.apply_gradients(zip(grads, variables))
    got = [keras.ops.convert_to_numpy(v) for v in variables]
    problem.assert_parity(f"keras-{keras.backend.backend()} Lars vs optax.lars", got, want,
                          "float64")


def _sf_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(2)])


def test_schedule_free_fit_and_evaluate_use_the_points_keras_uses():
    """model.fit (its training and validation losses) and model.evaluate run at the
    variables, the training point y, with polyopt's optimizer as with Keras's;
    evaluation_point() evaluates at Keras's x and gives y back exactly."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    theirs, ours = _sf_model(), _sf_model()
    ours.set_weights(theirs.get_weights())
    theirs.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01,
                                                                warmup_steps=4), loss="mse")
    preset = native.PRESETS["keras.optimizers.ScheduleFreeAdamW"][1]
    ours.compile(optimizer=pk.ScheduleFreeAdamW(learning_rate=0.01, warmup_steps=4, **preset),
                 loss="mse")
    fit = {"batch_size": 16, "epochs": 3, "shuffle": False, "validation_data": (x, y),
           "verbose": 0}
    want, got = theirs.fit(x, y, **fit).history, ours.fit(x, y, **fit).history
    want_loss, got_loss = theirs.evaluate(x, y, verbose=0), ours.evaluate(x, y, verbose=0)
    # both evaluate where they train: at the variables, y (the last validation of fit
    # ran at the same variables as evaluate)
    np.testing.assert_allclose(got_loss, got["val_loss"][-1], rtol=1e-6)
    np.testing.assert_allclose(want_loss, want["val_loss"][-1], rtol=1e-6)
    train_weights = ours.get_weights()
    if keras.backend.backend() == "jax":
        # the same numbers as Keras's (on tensorflow and torch Keras's own numbers
        # differ from its jax ones: SF_ALIASING, compared in the test above)
        for key in ("loss", "val_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for a, b in zip(train_weights, theirs.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    with ours.optimizer.evaluation_point():
        got_x_loss = ours.evaluate(x, y, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(ours.get_weights(), train_weights))
    # Keras's own x, from its z ("momentum") variables, put in its model by hand
    opt = theirs.optimizer
    ys = [keras.ops.convert_to_numpy(v) for v in opt._trainable_variables]
    for v, y_value, z in zip(opt._trainable_variables, ys, opt._momentums):
        v.assign((y_value - 0.1 * keras.ops.convert_to_numpy(z)) / 0.9)
    want_x_loss = theirs.evaluate(x, y, verbose=0)
    assert abs(got_x_loss - got_loss) > 1e-3 * abs(got_loss)
    if keras.backend.backend() == "jax":
        assert abs(want_x_loss - want_loss) > 1e-3 * abs(want_loss)
        np.testing.assert_allclose(got_x_loss, want_x_loss, rtol=1e-5)


# keras.optimizers.Muon: the 160x128 matrix takes the Muon step, the vector, the 4-D
# conv kernel and the scalar Keras's Adam ('epsilon hat'); weight decay times the
# learning rate on both. Dyadic learning rate, momentum and Adam betas (Keras rounds
# float64 hyperparameters through float32: tests/test_keras_parity.py's docstring, and
# MUON_BETA_GAP below). rms_rate=None is given to both as it is (hyper.MUON's Keras
# alias: lr_scale='none', overriding the preset's 'rms').
MUON_DYADIC = {"learning_rate": 2.0 ** -8, "adam_beta_1": 0.875, "adam_beta_2": 1 - 2.0 ** -10}
MUON_CASES = [
    ("defaults", {**MUON_DYADIC, "momentum": 0.9375}),
    ("weight_decay-no-nesterov-rms_rate=None", {
        **MUON_DYADIC, "momentum": 0.875, "nesterov": False, "rms_rate": None,
        "weight_decay": 2.0 ** -4, "adam_weight_decay": 2.0 ** -5}),
]


def _muon_pair(options: dict):
    """polyopt.keras.Muon with the Keras preset and ``options`` (Keras spellings, which
    override the preset's, aliases included; Keras's exclude_embeddings=True unless
    given), and keras.optimizers.Muon(**options)."""
    mine = {"exclude_embeddings": True, **options}
    names = {h.spelling("keras"): h.name for h in pk.Muon.spec}
    kept = pk.Muon.spec.overridden(native.PRESETS["keras.optimizers.Muon"][1],
                                   {names[k]: v for k, v in options.items() if k in names},
                                   "keras")
    spelled = {pk.Muon.spec[k].spelling("keras"): v for k, v in kept.items()}
    return pk.Muon(**{**spelled, **mine}), keras.optimizers.Muon(**options)


# float64 with rms_rate: Keras's lr_adjust takes sqrt(max(rows, cols)) of Python ints,
# in float32 (relative 1e-8 on each step); on tensorflow the native's float64 step then
# fails (a float32 scale times a float64 tensor): asserted below. Measured after 200
# steps: defaults 4.0e-9 (jax), 7.6e-9 (torch backend); rms_rate=None 4.0e-10 (jax),
# 2.4e-9 (torch), 2.9e-15 (tensorflow). float32: 2.1e-6.
MUON_FLOAT64 = {"jax": 1e-8, "torch": 2e-8, "tensorflow": 1e-12}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", MUON_CASES, ids=[c[0] for c in MUON_CASES])
def test_muon_matches_keras_for_200_steps(case, dtype):
    _, options = case
    ours, theirs = _muon_pair(options)
    assert ours.hyperparameters["lr_scale"] == ("none" if "rms_rate" in options else "rms")
    got = _run(ours, dtype)
    backend = keras.backend.backend()
    if backend == "tensorflow" and dtype == "float64" and options.get("rms_rate", 0.2):
        with pytest.raises(Exception, match=r"expected to be a double tensor but is a float"):
            _run(theirs, dtype)
        return
    want = _run(theirs, dtype)
    problem.assert_parity(f"keras-{backend} Muon {case[0]}", got, want, dtype,
                          MUON_FLOAT64[backend] if dtype == "float64" else None)
    assert problem.max_rel(want, problem.initial(dtype)) > 1e-2


#: keras.optimizers.Muon's Adam bias correction on tensorflow: ``ops.power(ops.cast(
#: self.adam_beta_2, variable.dtype), local_step)`` (keras/src/optimizers/muon.py,
#: _adamw_update_step), and Keras's tensorflow ``cast`` is ``tf.cast(x, dtype)``
#: (keras/src/backend/tensorflow/core.py), which makes a Python float a float32 tensor
#: first: 0.999 becomes 0.99900001287, so 1 - beta_2**t is 1.3e-5 relative off at t = 1
#: and the step 6.4e-6 (after the sqrt); the moments themselves use 1 - 0.999 exactly.
#: jax and torch cast the Python float straight to float64. Measured in float64 after 200
#: steps with Keras's adam_beta_1=0.9, adam_beta_2=0.999 and rms_rate=None: 5.1e-6
#: (tensorflow), 4.6e-10 (jax), 1.9e-8 (torch backend); with dyadic betas (MUON_CASES)
#: tensorflow agrees to 2.9e-15.
MUON_BETA_GAP = {"jax": 1e-8, "torch": 5e-8, "tensorflow": 1e-5}


def test_muon_float64_with_kerass_betas_differs_on_tensorflow_by_its_cast_only():
    backend = keras.backend.backend()
    cast = float(keras.ops.convert_to_numpy(keras.ops.cast(0.999, "float64")))
    assert cast == (float(np.float32(0.999)) if backend == "tensorflow" else 0.999)
    options = {"learning_rate": 2.0 ** -8, "momentum": 0.9375, "rms_rate": None}
    ours, theirs = _muon_pair(options)
    worst = problem.max_rel(_run(ours, "float64"), _run(theirs, "float64"))
    print(f"\nPARITY keras-{backend} Muon Keras's betas | float64 | {worst:.2g}")
    assert worst <= MUON_BETA_GAP[backend]
    if backend == "tensorflow":
        assert worst > 1e-6


# keras.optimizers.Muon's per-variable choice on a model: the Embedding table, the Conv2D
# kernel (4-D) and the biases take its Adam; the hidden Dense kernel Muon; the head
# Dense kernel Adam with exclude_layers=["head"], Muon without. polyopt.keras.Muon makes
# the same choice from exclude_layers / exclude_embeddings (the excluded variables get
# the layout NOT_A_MATRIX). Gradients pull each variable toward per-step targets.
HYBRID_CASES = [
    ("exclude-head-embeddings-ratio", {"exclude_layers": ["head"], "adam_lr_ratio": 0.5,
                                       "weight_decay": 2.0 ** -4,
                                       "adam_weight_decay": 2.0 ** -5}),
    ("embeddings-by-muon", {"exclude_embeddings": False}),
]


def _hybrid_model(dtype):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.Conv2D(4, 3, name="conv", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(24, name="hidden", dtype=dtype),
        keras.layers.Dense(5, name="head", dtype=dtype),
    ])
    embedding = keras.layers.Embedding(20, 12, name="embedding", dtype=dtype)
    embedding.build((None,))
    return [*model.trainable_variables, *embedding.trainable_variables]


def _run_hybrid(opt, dtype, steps=100):
    variables = _hybrid_model(dtype)
    rng = np.random.default_rng(21)
    for _ in range(steps):
        grads = [keras.ops.convert_to_tensor(
            keras.ops.convert_to_numpy(v) - rng.normal(size=tuple(v.shape)), dtype=dtype)
            for v in variables]
        opt.apply_gradients(zip(grads, variables))
    return [v.path for v in variables], [keras.ops.convert_to_numpy(v) for v in variables]


#: measured after 100 steps: float32 6.7e-6 (all three backends); float64, with rms_rate
#: None (its scale is float32) and dyadic Adam betas (MUON_BETA_GAP; with 0.9/0.999
#: tensorflow was 5.9e-6), exclude-head / embeddings-by-muon: 1.8e-8 / 5.1e-8 (jax),
#: 5.6e-9 / 1.6e-8 (torch), 2.7e-15 / 7.9e-11 (tensorflow). The Adam variables agree to
#: 2e-15; on jax and torch the Muon kernels (24x12, 24x5, 20x12) carry the 1e-8 (the
#: same matrices on tensorflow agree to 1e-10: not isolated yet).
HYBRID_FLOAT64 = {"jax": 1e-7, "torch": 1e-7, "tensorflow": 1e-9}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", HYBRID_CASES, ids=[c[0] for c in HYBRID_CASES])
def test_muon_chooses_each_variable_as_keras_does(case, dtype):
    _, options = case
    backend = keras.backend.backend()
    base = {"learning_rate": 2.0 ** -8, "momentum": 0.9375}
    if dtype == "float64":  # Keras's rms_rate scale is float32 (above), its betas too (TF)
        base.update(rms_rate=None, adam_beta_1=0.875, adam_beta_2=1 - 2.0 ** -10)
    ours, native_opt = _muon_pair({**base, **options})
    paths, got = _run_hybrid(ours, dtype)
    _, want = _run_hybrid(native_opt, dtype)
    start = _run_hybrid(keras.optimizers.SGD(0.0), dtype, steps=1)[1]
    worst = problem.max_rel(got, want)
    print(f"\nPARITY keras-{backend} Muon hybrid {case[0]} | {dtype} | {worst:.2g}")
    assert worst <= (HYBRID_FLOAT64[backend] if dtype == "float64" else 1e-5)
    assert problem.max_rel(want, start) > 1e-2
    # the choice is Keras's: its Adam variables (with a velocity) are ours with an Adam
    # state, the others have our Muon momentum
    native_opt = keras.optimizers.Muon(**base, **options)
    native_opt.build(_hybrid_model(dtype))
    theirs = [v is not None for v in native_opt.adam_velocities]
    template = ours._template
    assert [m.shape == (0,) for m in template.momentum] == theirs
    assert [m.shape != (0,) for m in template.adam.first_moment] == theirs
    assert 0 < sum(theirs) < len(theirs)


def test_muon_rms_rate_none_is_lr_scale_none_and_round_trips():
    """Keras's rms_rate=None (no shape scale) is hyper.MUON's Keras alias for
    lr_scale='none'; the config keeps the canonical value, which builds it again."""
    opt = pk.Muon(rms_rate=None)
    assert opt.hyperparameters["lr_scale"] == "none"
    assert opt.hyperparameters["rms_scale"] == pk.Muon.spec["rms_scale"].default
    again = pk.Muon.from_config(opt.get_config())
    assert again.hyperparameters == opt.hyperparameters
    assert pk.Muon(rms_rate=None, lr_scale="none").hyperparameters == opt.hyperparameters
    with pytest.raises(ValueError, match=r"muon: rms_rate=None means lr_scale='none', which "
                                         r"contradicts lr_scale='rms'; give one of them"):
        pk.Muon(rms_rate=None, lr_scale="rms")
    with pytest.raises(TypeError, match=r"muon: rms_rate must be a number in \(0, inf\), or "
                                        r"Keras's None \(lr_scale='none'\), got rms_rate='0.2'"):
        pk.Muon(rms_rate="0.2")


def test_muon_refuses_excludes_that_do_not_fit():
    with pytest.raises(TypeError, match=r"muon: exclude_layers must be a list of regular "
                                        r"expressions .*got exclude_layers='head'"):
        pk.Muon(exclude_layers="head")
    with pytest.raises(ValueError, match=r"muon: exclude_layers holds '\(head', which is not a "
                                         r"regular expression"):
        pk.Muon(exclude_layers=["(head"])
    with pytest.raises(TypeError, match=r"muon: exclude_embeddings must be True or False, got "
                                        r"exclude_embeddings='yes'"):
        pk.Muon(exclude_embeddings="yes")
    opt = pk.Muon(exclude_layers=["haed"])
    with pytest.raises(ValueError, match=r"muon: exclude_layers holds 'haed', which matches no "
                                         r"variable's path \(the paths: \['sequential"):
        opt.build(_hybrid_model("float32"))
    assert not opt.built
    again = pk.Muon.from_config(pk.Muon(exclude_layers=["head"], adam_lr_ratio=0.1,
                                        exclude_embeddings=True).get_config())
    assert (again.exclude_layers, again.exclude_embeddings) == (("head",), True)
    assert again.hyperparameters["adam_lr_ratio"] == 0.1


def test_muon_optax_options_and_batch_axes_round_trip_and_step():
    """The rule's optax options (preconditioning, the coefficient table) and a layout
    with batch axes survive get_config through JSON (as model.save writes it), and the
    rebuilt optimizer steps a 3-D variable as the rule does: one matrix per index of
    its batch axis, the 'spectral' norm from this backend's namespace."""
    import json

    from polyopt import hyper, rules

    rng = np.random.default_rng(0)
    var = keras.Variable(rng.normal(size=(4, 3, 5)), name="stack", dtype="float64")
    layout = rules.Layout((0,), (2,), (1,))
    opt = pk.Muon(learning_rate=0.01, preconditioning="spectral",
                  ns_table=hyper.MUON_DION_TABLE[:3], layouts={var.path: layout})
    config = json.loads(json.dumps(opt.get_config()))
    assert config["layouts"] == {var.path: [[0], [2], [1]]}
    again = pk.Muon.from_config(config)
    assert again.hyperparameters == opt.hyperparameters
    assert opt.hyperparameters["ns_table"] == hyper.MUON_DION_TABLE[:3]
    grad = rng.normal(size=(4, 3, 5))
    start = np.array(keras.ops.convert_to_numpy(var))
    again.apply_gradients([(keras.ops.convert_to_tensor(grad), var)])
    rule = rules.muon(learning_rate=0.01, **opt.hyperparameters)
    want, _ = rule.update([grad], rule.init([start], layouts=[layout]), [start],
                          layouts=[layout])
    step = keras.ops.convert_to_numpy(var) - start
    # Keras keeps the learning rate in float32: 0.01 is 0.0099999998 there (2.2e-8)
    np.testing.assert_allclose(step, want[0], rtol=0, atol=1e-7 * np.max(np.abs(want[0])))
    whole, _ = rule.update([grad], rule.init([start]), [start])  # (4, 15): another step
    assert np.max(np.abs(whole[0] - want[0])) > 1e-3
