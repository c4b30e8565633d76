"""A real training run: the MNIST MLP (784-128-10) in plain JAX, one epoch of
the shipped MNIST subset (8000 training images) with polyopt.optax.adam,
beside native optax.adam from the same numpy-generated weights and batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import polyopt.optax as po
from tests._mnist import mnist


def init_mlp(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def dense(n_in, n_out):  # Glorot uniform, zero bias
        limit = np.sqrt(6 / (n_in + n_out))
        return {"kernel": rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32),
                "bias": np.zeros(n_out, np.float32)}

    return jax.tree.map(jnp.asarray, {"hidden": dense(784, 128), "out": dense(128, 10)})


def logits(params, x):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def loss_fn(params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y))


def train_one_epoch(opt, x_train, y_train, batch_size=100):
    params = init_mlp()
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    order = np.random.default_rng(1).permutation(len(x_train))
    losses = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        params, state, loss = step(params, state, x_train[batch], y_train[batch])
        losses.append(float(loss))
    return params, np.array(losses)


def accuracy(params, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(logits(params, x)), axis=1) == y))


def test_mnist_mlp_one_epoch():
    x_train, y_train = mnist("train")
    x_test, y_test = mnist("test")
    assert x_train.shape == (8000, 784) and y_test.shape == (2000,)
    params, losses = train_one_epoch(po.adam(2e-3), x_train, y_train)
    assert params["hidden"]["kernel"].dtype == jnp.float32
    native_params, native_losses = train_one_epoch(optax.adam(2e-3), x_train, y_train)
    ours, theirs = accuracy(params, x_test, y_test), accuracy(native_params, x_test, y_test)
    print(f"\nMNIST 1 epoch: polyopt.optax.adam {ours:.4f}, optax.adam {theirs:.4f}; "
          f"loss {losses[0]:.3f} -> {losses[-10:].mean():.3f}, max per-step loss diff "
          f"{np.max(np.abs(losses - native_losses) / native_losses):.2g}")
    assert ours >= 0.88
    assert losses[-10:].mean() < 0.5 * losses[0]
    # float32, same weights and batches: the runs stay together for one epoch
    assert np.max(np.abs(losses - native_losses) / native_losses) <= 1e-3
    assert abs(ours - theirs) <= 0.005
