"""tf.distribute.MirroredStrategy with two logical CPU devices (TensorFlow backend).

TensorFlow's logical devices must be configured before it initialises, so the
training runs in a child process. Two replicas with the global batch split
between them must train like one device with the same global batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest

from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
import keras
import polyopt.keras as pk

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 6)).astype(np.float32)
y = np.tanh(x @ rng.normal(size=(6, 2))).astype(np.float32)
makers = {
    "Adam": lambda: pk.Adam(learning_rate=0.01),
    "Nadam": lambda: pk.Nadam(learning_rate=0.01),
    "Lookahead": lambda: pk.Lookahead(pk.RAdam(learning_rate=0.01), sync_period=3),
    "SGD": lambda: pk.SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.01),
}

def train(name, strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=makers[name](), loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return [w.tolist() for w in model.get_weights()], int(model.optimizer.iterations.numpy())

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = {"replicas": mirrored.num_replicas_in_sync}
for name in payload:
    result[name] = {"one": train(name, tf.distribute.get_strategy()),
                    "two": train(name, mirrored)}
"""

NAMES = ["Adam", "Nadam", "Lookahead", "SGD"]


@pytest.mark.parametrize("name", NAMES)
def test_per_variable_path_matches_whole_list(name):
    """What tf.distribute uses on every replica (update_step once per variable, scalar
    state written by the last call) gives the numbers of the whole-list update.
    Runs on every backend (nox selects this module by collecting it on JAX)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    import polyopt.keras as pk

    makers = {"Adam": lambda: pk.Adam(learning_rate=0.01),
              "Nadam": lambda: pk.Nadam(learning_rate=0.01),
              "Lookahead": lambda: pk.Lookahead(pk.RAdam(learning_rate=0.01), sync_period=3),
              "SGD": lambda: pk.SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.01)}
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2,), (2, 2)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(8)]
    results = []
    for per_variable in (False, True):
        opt = makers[name]()
        if per_variable:  # Keras' own loop: update_step(grad, var) for each variable
            opt._backend_update_step = lambda g, v, lr, opt=opt: \
                BaseOptimizer._backend_update_step(opt, g, v, lr)
        variables = [keras.Variable(a) for a in start]
        for g in grads:
            opt.apply_gradients(zip([keras.ops.convert_to_tensor(a) for a in g], variables))
        results.append([keras.ops.convert_to_numpy(v) for v in variables])
    for a, b, s in zip(*results, start):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        assert np.max(np.abs(a - s)) > 1e-3


if keras.backend.backend() == "tensorflow":

    @pytest.fixture(scope="module")
    def runs():
        env = {"KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        return run_python(SCRIPT, NAMES, env=env, timeout=600)

    @pytest.mark.parametrize("name", NAMES)
    def test_mirrored_strategy_matches_one_device(runs, name):
        assert runs["replicas"] == 2
        (one, steps_one), (two, steps_two) = runs[name]["one"], runs[name]["two"]
        assert steps_one == steps_two == 16
        for a, b in zip(one, two):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=2e-5, atol=2e-6)
