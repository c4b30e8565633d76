"""The three models of examples/models agree across torch, Keras (TensorFlow backend)
and JAX in float64: logits, loss, gradient of the loss, batch-norm statistics.

Framework-free: each framework runs in its own child process (tests/_native.py),
all from the same numpy initial weights (examples/models/init.py) and the same
batch of real images; results come back as .npz files. Agreement in float64
is what makes float64 training agree step by step.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from examples import data
from examples.models import init
from polyopt.consistency import weights_checksum
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"mlp": 16, "cnn": 8, "resnet20": 6}
TOLERANCE = 1e-12

_COMMON = """
import numpy as np
from examples.models import init
from polyopt.consistency import weights_checksum
inputs = np.load(payload["inputs"])
out = {}
def save(model, key, value):
    out[f"{model}|{key}"] = np.asarray(value, dtype=np.float64)
def save_all(model, prefix, values):
    for name, value in values.items():
        save(model, f"{prefix}|{name}", value)
"""

TORCH = _COMMON + """
import torch
from examples.models import torch_models as tm
torch.set_num_threads(1)
counts = {}
for name in payload["models"]:
    model = tm.build(name, dtype="float64")
    counts[name] = [sum(p.numel() for p in model.parameters()), len(list(model.parameters()))]
    x, y = tm.to_input(inputs[name + "_x"]), torch.from_numpy(inputs[name + "_y"])
    model.eval()
    with torch.no_grad():
        save(name, "logits_eval_init", model(x))
    model.train()
    logits = model(x)
    loss = tm.loss_fn(logits, y)
    loss.backward()
    save(name, "logits", logits.detach())
    save(name, "loss", loss.detach())
    save_all(name, "grad", tm.gradients(model, name))
    save_all(name, "state", tm.to_neutral(model, name, state=True))
    model.eval()
    with torch.no_grad():
        save(name, "logits_eval", model(x))
    save_all(name, "params", tm.to_neutral(model, name))
np.savez(payload["out"], **out)
result = counts
"""

KERAS_TF = _COMMON + """
import keras, tensorflow as tf
from examples.models import keras_models as km
counts = {}
for name in payload["models"]:
    model = km.build(name, dtype="float64")
    counts[name] = [sum(int(np.prod(v.shape)) for v in model.trainable_weights),
                    len(model.trainable_weights)]
    x, y = tf.constant(inputs[name + "_x"]), tf.constant(inputs[name + "_y"])
    save(name, "logits_eval_init", model(x, training=False))
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = km.loss_fn("float64")(y, logits)
    grads = tape.gradient(loss, km.parameters(model, name))
    save(name, "logits", logits)
    save(name, "loss", loss)
    save_all(name, "grad", {p.name: g.numpy() for p, g in zip(init.layout(name), grads)})
    save_all(name, "state", km.to_neutral(model, name, state=True))
    save(name, "logits_eval", model(x, training=False))
    save_all(name, "params", km.to_neutral(model, name))
np.savez(payload["out"], **out)
result = counts
"""

# Keras on another backend (jax): the same forward pass (Keras must not depend on TF)
KERAS_OTHER = _COMMON + """
import jax
from examples.models import keras_models as km
for name in payload["models"]:
    model = km.build(name, dtype="float64")
    x = inputs[name + "_x"]
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    call = jax.jit(model.stateless_call, static_argnames="training")
    save(name, "logits_eval_init", call(trainable, fixed, x, training=False)[0])
    logits, moved = call(trainable, fixed, x, training=True)
    save(name, "logits", logits)
    for variable, value in zip(model.non_trainable_variables, moved):
        variable.assign(value)
    save_all(name, "state", km.to_neutral(model, name, state=True))
    save(name, "logits_eval", call(trainable, moved, x, training=False)[0])
np.savez(payload["out"], **out)
result = None
"""

JAX = _COMMON + """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from examples.models import jax_models as jm
counts = {}
for name in payload["models"]:
    params, state = jm.build(name, dtype="float64")
    counts[name] = [sum(v.size for v in params.values()), len(params)]
    x, y = jnp.asarray(inputs[name + "_x"]), jnp.asarray(inputs[name + "_y"])
    evaluate = jax.jit(lambda p, s: jm.apply(name, p, s, x, train=False)[0])
    save(name, "logits_eval_init", evaluate(params, state))
    def objective(p):
        logits, new_state = jm.apply(name, p, state, x, train=True)
        return jm.loss_fn(logits, y), (logits, new_state)
    (loss, (logits, new_state)), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True))(params)
    save(name, "logits", logits)
    save(name, "loss", loss)
    save_all(name, "grad", jm.to_neutral(grads))
    save_all(name, "state", jm.to_neutral(new_state))
    save(name, "logits_eval", evaluate(params, new_state))
    save_all(name, "params", jm.to_neutral(params))
np.savez(payload["out"], **out)
result = counts
"""


def _inputs() -> dict[str, np.ndarray]:
    mnist, cifar = data.load_mnist(), data.load_cifar10()
    out = {}
    for name in init.MODELS:
        source = mnist if name == "mlp" else cifar
        n = BATCH[name]
        out[f"{name}_x"] = source.train_images[:n].astype(np.float64) / 255.0
        out[f"{name}_y"] = source.train_labels[:n]
    return out


@functools.cache
def _results(tmp: str) -> dict[str, tuple[dict, object]]:
    tmp_path = Path(tmp)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **_inputs())
    env = {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = {
        "torch": lambda p: run_python(TORCH, p, env=env),
        "jax": lambda p: run_python(JAX, p, env=env),
        "keras-tf": lambda p: run_python(KERAS_TF, p, env={**env, "KERAS_BACKEND": "tensorflow"}),
        "keras-jax": lambda p: run_python(
            KERAS_OTHER, p, env={**env, "KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "1"}),
    }

    def run(framework):
        out = tmp_path / f"{framework}.npz"
        counts = runs[framework]({"inputs": str(inputs), "out": str(out),
                                  "models": list(init.MODELS)})
        with np.load(out) as arrays:
            return {k: arrays[k] for k in arrays.files}, counts

    with ThreadPoolExecutor(2) as pool:  # two child processes at a time
        return dict(zip(runs, pool.map(run, runs)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("models")))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b))), 1e-300)
    return float(np.max(np.abs(a - b))) / scale


def _by_model(arrays: dict, model: str) -> dict[str, np.ndarray]:
    return {k.split("|", 1)[1]: v for k, v in arrays.items() if k.startswith(model + "|")}


@pytest.mark.parametrize("model", init.MODELS)
@pytest.mark.parametrize("framework", ["keras-tf", "jax"])
def test_float64_forward_loss_and_gradient_agree_with_torch(results, model, framework):
    reference = _by_model(results["torch"][0], model)
    other = _by_model(results[framework][0], model)
    assert sorted(other) == sorted(reference)
    grads = [k for k in reference if k.startswith("grad|")]
    assert len(grads) == len(init.layout(model))
    worst = {key: _relative(other[key], reference[key]) for key in reference}
    bad = {k: v for k, v in worst.items() if not v <= TOLERANCE}
    assert not bad, f"{framework} vs torch, {model}: {bad}"
    # the comparison is not vacuous: the gradient is not zero, the loss is a real loss
    assert 0.5 < float(reference["loss"]) < 5
    assert all(np.max(np.abs(reference[k])) > 0 for k in grads)


# Keras 3.15 on a non-TensorFlow backend computes ops.mean and ops.moments of float64
# input in float32 (keras/src/backend/common/dtypes.py: result_type("float64",
# "float32") is "float32" unless the backend is tensorflow), so batch norm and global
# average pooling, i.e. ResNet-20, agree only to float32 precision there.
KERAS_JAX_TOLERANCE = {"mlp": TOLERANCE, "cnn": TOLERANCE, "resnet20": 1e-6}


@pytest.mark.parametrize("model", init.MODELS)
def test_keras_on_jax_backend_gives_the_same_forward_pass(results, model):
    reference = _by_model(results["keras-tf"][0], model)
    other = _by_model(results["keras-jax"][0], model)
    assert sorted(other) == sorted(k for k in reference if "grad|" not in k
                                   and "params|" not in k and k != "loss")
    for key, value in other.items():
        assert _relative(value, reference[key]) <= KERAS_JAX_TOLERANCE[model], key


@pytest.mark.parametrize("framework", ["torch", "keras-tf", "jax"])
def test_parameter_counts(results, framework):
    counts = results[framework][1]
    for model in init.MODELS:
        assert counts[model] == [init.PARAM_COUNTS[model], len(init.layout(model))], model
    assert init.PARAM_COUNTS["cnn"] == 42_442  # the Ranger post's CNN


def test_every_framework_starts_from_the_neutral_weights(results):
    for framework in ("torch", "keras-tf", "jax"):
        arrays = results[framework][0]
        for model in init.MODELS:
            params = {k.split("|")[2]: v for k, v in arrays.items()
                      if k.startswith(f"{model}|params|")}
            expected = init.init_params(model)
            assert list(params) == list(expected) or sorted(params) == sorted(expected)
            for name, value in expected.items():
                np.testing.assert_array_equal(params[name], value, err_msg=f"{framework} {name}")


def test_batch_norm_statistics_move_in_training(results):
    reference = _by_model(results["torch"][0], "resnet20")
    init_state = init.init_state("resnet20")
    moved = [k for k in reference if k.startswith("state|")
             and not np.allclose(reference[k], init_state[k.split("|")[1]])]
    assert len(moved) == len(init_state)
    # train-mode (batch statistics) and eval-mode outputs differ: BN really is in the model
    assert _relative(reference["logits"], reference["logits_eval_init"]) > 1e-3


def test_flatten_order_conversion_matters():
    """The torch converter permutes the dense kernel's rows (NHWC -> NCHW flatten):
    a plain transpose would read the features in the wrong order."""
    h, w, c = 6, 6, 64
    rng = np.random.default_rng(0)
    feature_map = rng.normal(size=(2, h, w, c))
    kernel = init.init_params("cnn")["dense/kernel"]
    neutral = feature_map.reshape(2, -1) @ kernel  # NHWC flatten, as Keras and JAX
    nchw = feature_map.transpose(0, 3, 1, 2).reshape(2, -1)  # torch's flatten
    permuted = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    np.testing.assert_allclose(nchw @ permuted, neutral, rtol=0, atol=1e-13)
    assert np.max(np.abs(nchw @ kernel - neutral)) > 0.1


def test_init_is_seeded_and_glorot():
    a, b = init.init_params("cnn", seed=3), init.init_params("cnn", seed=3)
    c = init.init_params("cnn", seed=4)
    assert weights_checksum(a) == weights_checksum(b) != weights_checksum(c)
    kernel = a["conv2/kernel"]
    limit = np.sqrt(6 / (9 * 32 + 9 * 64))
    assert kernel.min() >= -limit and kernel.max() <= limit and kernel.std() > limit / 2
    assert not np.any(a["conv1/bias"])
    f32 = init.init_params("cnn", seed=3, dtype=np.float32)
    assert f32["conv1/kernel"].dtype == np.float32
    np.testing.assert_array_equal(f32["conv1/kernel"], a["conv1/kernel"].astype(np.float32))
    assert {m: sum(p.size for p in init.init_params(m).values()) for m in init.MODELS} == \
        init.PARAM_COUNTS
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        init.layout("vgg")
