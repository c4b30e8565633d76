"""The three models in plain JAX (NHWC), on the neutral layout of init.py as it is.

Parameters are a dict ``name -> array`` in init.layout order (a pytree that
optax and jax.grad take as it is); batch-norm moving statistics a second dict
(``state``). ``apply(name, params, state, x, train)`` returns ``(logits,
new_state)``; ``state`` is unchanged unless ``train`` (ResNet-20 only).

float64 needs ``jax.config.update("jax_enable_x64", True)`` before any array
is made (without it jax silently computes in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from examples.models import init


def _dense(params, layer, x):
    return x @ params[f"{layer}/kernel"] + params[f"{layer}/bias"]


def _conv(params, layer, x, stride=1, padding="SAME"):
    y = lax.conv_general_dilated(x, params[f"{layer}/kernel"], (stride, stride), padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bias = params.get(f"{layer}/bias")
    return y if bias is None else y + bias


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _batch_norm(params, state, new_state, layer, x, train):
    gamma, beta = params[f"{layer}/gamma"], params[f"{layer}/beta"]
    mean_name, var_name = f"{layer}/moving_mean", f"{layer}/moving_variance"
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        m = init.BN_MOMENTUM
        new_state[mean_name] = state[mean_name] * m + lax.stop_gradient(mean) * (1 - m)
        new_state[var_name] = state[var_name] * m + lax.stop_gradient(var) * (1 - m)
    else:
        mean, var = state[mean_name], state[var_name]
    return (x - mean) * lax.rsqrt(var + init.BN_EPS) * gamma + beta


def _mlp(params, state, x, train):
    x = x.reshape(x.shape[0], -1)
    return _dense(params, "dense2", jax.nn.relu(_dense(params, "dense1", x))), state


def _cnn(params, state, x, train):
    x = _max_pool(jax.nn.relu(_conv(params, "conv1", x, padding="VALID")))
    x = _max_pool(jax.nn.relu(_conv(params, "conv2", x, padding="VALID")))
    return _dense(params, "dense", x.reshape(x.shape[0], -1)), state


def _resnet20(params, state, x, train):
    new_state = dict(state)

    def bn(layer, y):
        return _batch_norm(params, state, new_state, layer, y, train)

    x = jax.nn.relu(bn("bn0", _conv(params, "conv0", x)))
    for name, cin, filters, stride in init.resnet_blocks():
        out = jax.nn.relu(bn(f"{name}_bn1", _conv(params, f"{name}_conv1", x, stride)))
        out = bn(f"{name}_bn2", _conv(params, f"{name}_conv2", out))
        shortcut = x
        pad = (filters - cin) // 2
        if stride != 1 or pad:
            shortcut = jnp.pad(x[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
        x = jax.nn.relu(out + shortcut)
    return _dense(params, "dense", jnp.mean(x, axis=(1, 2))), new_state


APPLY = {"mlp": _mlp, "cnn": _cnn, "resnet20": _resnet20}


def apply(name: str, params: dict, state: dict, x, train: bool = False):
    """(logits, new_state) of model ``name`` on the NHWC batch ``x``."""
    return APPLY[name](params, state, x, train)


def loss_fn(logits, labels):
    """Mean softmax cross-entropy from logits (integer labels)."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def build(name: str, seed: int = 0, dtype: str = "float32") -> tuple[dict, dict]:
    """(params, state) of model ``name`` in ``dtype``, from init.init_params(seed)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 in JAX needs jax.config.update('jax_enable_x64', True)")
    params = {k: jnp.asarray(v) for k, v in init.init_params(name, seed, np.dtype(dtype)).items()}
    state = {k: jnp.asarray(v) for k, v in init.init_state(name, np.dtype(dtype)).items()}
    return params, state


def to_neutral(params: dict) -> dict[str, np.ndarray]:
    """numpy copies of ``params`` (already in the neutral layout)."""
    return {k: np.asarray(v) for k, v in params.items()}
