"""Keras-TF optimizer step time: polyopt.keras.Adam against keras.optimizers.Adam.

    KERAS_BACKEND=tensorflow python benchmarks/keras_step.py [--repeats 5] [--steps 20]

A ~2.5M-parameter model in 60 variables (30 dense kernels 288x288 and their
biases); random gradients fixed in advance; each optimizer's apply_gradients
timed eagerly, inside tf.function, and inside tf.function(jit_compile=True).
Warm-up first, then interleaved repeats; prints the median time per step and
the ratio polyopt / native. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import polyopt.keras as pk  # noqa: E402
from polyopt import native  # noqa: E402

WIDTH, LAYERS = 288, 30


def _variables(rng):
    out = []
    for _ in range(LAYERS):
        out.append(keras.Variable(rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) * 0.05))
        out.append(keras.Variable(np.zeros(WIDTH, np.float32)))
    return out


def _stepper(opt, variables, grads):
    def step():
        opt.apply_gradients(zip(grads, variables))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("run with KERAS_BACKEND=tensorflow")
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in _variables(rng)]
    n_params = sum(int(np.prod(g.shape)) for g in grads)
    _, preset = native.PRESETS["keras.optimizers.Adam"]
    ours_args = {pk.Adam.spec[k].spelling("keras"): v for k, v in preset.items()}

    makers = {"native": lambda: keras.optimizers.Adam(), "polyopt": lambda: pk.Adam(**ours_args)}
    modes = {"eager": None, "tf.function": False, "jit_compile": True}
    runners = {}
    for name, make in makers.items():
        for mode, jit in modes.items():
            opt, variables = make(), _variables(rng)
            opt.build(variables)

            step = _stepper(opt, variables, grads)
            fn = step if jit is None else tf.function(step, jit_compile=jit)
            for _ in range(3):  # warm-up (tracing, compilation)
                fn()
            runners[(name, mode)] = fn

    times = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, fn in runners.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[key].append((time.perf_counter() - start) / args.steps)

    print(f"Keras {keras.__version__}, TensorFlow {tf.__version__}: {n_params:,} parameters in "
          f"{len(grads)} variables; median of {args.repeats} x {args.steps} steps")
    print(f"{'mode':<12} {'native ms':>10} {'polyopt ms':>11} {'ratio':>7}")
    for mode in modes:
        a = statistics.median(times[("native", mode)]) * 1e3
        b = statistics.median(times[("polyopt", mode)]) * 1e3
        print(f"{mode:<12} {a:>10.2f} {b:>11.2f} {b / a:>7.2f}")


if __name__ == "__main__":
    main()
