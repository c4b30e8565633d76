"""Real training: the MNIST MLP (784-128-10) for one epoch of mnist-small
(8000 images, batches of 64) with every polyopt.torch optimizer; each must
reach a sensible test accuracy (87 %) on the 2000 held-out images.

The data are the MNIST subset shipped with the repository (examples/data),
read through examples.data (tests/_mnist.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import polyopt.torch as pt
from tests._mnist import mnist as mnist_arrays


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine torch's two spinning
    threads make each small step up to 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist():
    def load(split):
        images, labels = mnist_arrays(split)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    train, test = load("train"), load("test")
    assert train[0].shape == (8000, 784) and test[0].shape == (2000, 784)
    return train, test


def mlp() -> torch.nn.Module:
    rng = np.random.default_rng(0)  # the same initial weights for every optimizer
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    with torch.no_grad():
        for p in model.parameters():
            bound = 1 / np.sqrt(p.shape[-1] if p.ndim > 1 else 128)
            p.copy_(torch.from_numpy(rng.uniform(-bound, bound, p.shape).astype(np.float32)))
    return model


OPTIMIZERS = {
    "SGD": lambda ps: pt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "Adagrad": lambda ps: pt.Adagrad(ps, lr=0.05),
    "RMSprop": lambda ps: pt.RMSprop(ps, lr=1e-3, centered=True),
    "Adadelta": lambda ps: pt.Adadelta(ps),
    "Adam": lambda ps: pt.Adam(ps, lr=1e-3),
    "AdamW": lambda ps: pt.AdamW(ps, lr=1e-3, amsgrad=True),
    "Adamax": lambda ps: pt.Adamax(ps),
    "NAdam": lambda ps: pt.NAdam(ps),
    "RAdam": lambda ps: pt.RAdam(ps, lr=1e-2),
    "Ranger": lambda ps: pt.Ranger(ps, lr=2e-2),
    "Lookahead(Adam)": lambda ps: pt.Lookahead(pt.Adam(ps, lr=2e-3), k=5),
    "SAM(SGD)": lambda ps: pt.SAM(ps, pt.SGD, rho=0.05, lr=0.05, momentum=0.9),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_epoch_of_mnist_reaches_a_sensible_accuracy(mnist, name):
    (x, y), (x_test, y_test) = mnist
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    order = np.random.default_rng(1).permutation(len(x))
    losses = []
    for start in range(0, len(x), 64):
        batch = order[start:start + 64]

        def closure(batch=batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    assert accuracy >= 0.87, f"{name}: test accuracy {accuracy:.3f}"
