"""polyopt.keras against keras.optimizers' Lion and Adafactor, side by side on this Keras backend,
200 steps on tests/_v2_problem.py's params (a 160x128 matrix, a vector, a 4-D
conv kernel, a scalar). float64 <= 1e-10 with hyperparameters float32
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

CASES = [
    ("Lion", pk.Lion, keras.optimizers.Lion, "keras.optimizers.Lion", {}, {}),
    ("Lion-weight_decay", pk.Lion, keras.optimizers.Lion, "keras.optimizers.Lion",
     {"weight_decay": 2.0 ** -4}, {"weight_decay": 0.05}),
    ("Lamb", pk.Lamb, keras.optimizers.Lamb, "keras.optimizers.Lamb", {}, {}),
    ("Lamb-weight_decay", pk.Lamb, keras.optimizers.Lamb, "keras.optimizers.Lamb",
     {"weight_decay": 2.0 ** -4}, {"weight_decay": 0.05}),
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


def _run(opt, dtype, zero=False, exclude=False):
    variables = [keras.Variable(p, dtype=dtype) for p in problem.initial(dtype, zero)]
    if exclude:  # the vector and the scalar, as biases usually are
        opt.exclude_from_weight_decay(var_list=[variables[1], variables[3]])
    for target in problem.targets(dtype):
        grads = [keras.ops.convert_to_tensor((keras.ops.convert_to_numpy(v) - t)
                                             * problem.scale(i), dtype=dtype)
                 for i, (v, t) in enumerate(zip(variables, target))]
        opt.apply_gradients(zip(grads, variables))
    return [keras.ops.convert_to_numpy(v) for v in variables]


@pytest.mark.parametrize(("case", "dtype"), RUNS, ids=[f"{c[0]}-{d}" for c, d in RUNS])
def test_matches_keras_for_200_steps(case, dtype):
    _, ours_cls, native_cls, key, exact, ordinary = case
    options = {**DYADIC, **exact} if dtype == "float64" else {"learning_rate": 3e-3, **ordinary}
    rule_options = dict(native.PRESETS[key][1])
    spelled = {ours_cls.spec[k].spelling("keras"): v for k, v in rule_options.items()}
    got = _run(ours_cls(**{**spelled, **options}), dtype)
    want = _run(native_cls(**options), dtype)
    problem.assert_parity(f"keras-{keras.backend.backend()} {case[0]}", got, want, dtype)


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
