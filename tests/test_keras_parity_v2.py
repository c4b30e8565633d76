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
]
DYADIC = {"learning_rate": 2.0 ** -8, "beta_1": 0.875, "beta_2": 1 - 2.0 ** -7}
# Lion with weight decay in float32 is compared in float64 only: Keras decays the
# variable in a separate assign before the step (p - p*wd*lr, rounded, then the
# step), polyopt adds one update; the ulp this moves flips sign(c) where c is
# near 0, and a flip moves an element by 2*lr. Measured after 200 steps:
# 2.1e-5 (jax, tensorflow backends), 4.7e-3 (torch backend, whose decay
# factor is float32 as well); float64: 1.7e-15.
RUNS = [(case, dtype) for case in CASES for dtype in ("float64", "float32")
        if not (case[0] == "Lion-weight_decay" and dtype == "float32")]


def _run(opt, dtype):
    variables = [keras.Variable(p, dtype=dtype) for p in problem.initial(dtype)]
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
