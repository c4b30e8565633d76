"""SAMModel: SAM in model.fit on this Keras backend, against a numpy reference.

The reference is independent of polyopt and Keras: a dense layer y = x W + b
with mean squared error, whose gradient is written out by hand; each step
takes g at w, e = rho g / (||g|| + eps) (ASAM: T^2 g / (||T g|| + eps),
T = |w|), g' at w + e, then SGD w -= lr g' (the davda54/sam procedure).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import polyopt.keras as pk

N, DIN, DOUT, LR, STEPS = 32, 5, 2, 0.1, 6


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIN))
    y = rng.normal(size=(N, DOUT))
    w = rng.normal(size=(DIN, DOUT)) * 0.5
    b = rng.normal(size=DOUT) * 0.1
    return x, y, w, b


def _grad(x, y, w, b):
    residual = x @ w + b - y
    scale = 2.0 / residual.size  # d mean(r^2) / d r
    return scale * x.T @ residual, scale * residual.sum(axis=0)


def reference(rho, eps, adaptive):
    x, y, w, b = _problem()
    for _ in range(STEPS):
        gw, gb = _grad(x, y, w, b)
        if adaptive:
            norm = np.sqrt(np.sum((np.abs(w) * gw) ** 2) + np.sum((np.abs(b) * gb) ** 2))
            ew, eb = rho * w * w * gw / (norm + eps), rho * b * b * gb / (norm + eps)
        else:
            norm = np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2))
            ew, eb = rho * gw / (norm + eps), rho * gb / (norm + eps)
        gw2, gb2 = _grad(x, y, w + ew, b + eb)
        w, b = w - LR * gw2, b - LR * gb2
    return w, b


@pytest.mark.parametrize(("rho", "adaptive"), [(0.05, False), (0.5, False), (1.0, True)])
def test_sam_model_fit_matches_the_reference(rho, adaptive):
    x, y, w0, b0 = _problem()
    dense = keras.layers.Dense(DOUT)
    inner = keras.Sequential([keras.Input((DIN,)), dense])
    dense.set_weights([w0.astype(np.float32), b0.astype(np.float32)])
    model = pk.SAMModel(inner, rho=rho, adaptive=adaptive)
    model.compile(optimizer=pk.SGD(learning_rate=LR), loss="mse")
    history = model.fit(x.astype(np.float32), y.astype(np.float32), batch_size=N,
                        epochs=STEPS, shuffle=False, verbose=0)
    w, b = reference(rho, 1e-12, adaptive)
    got_w, got_b = (np.array(a) for a in dense.get_weights())
    np.testing.assert_allclose(got_w, w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got_b, b, rtol=2e-5, atol=2e-6)
    # SAM really differs from plain SGD here
    plain_w, _ = reference(0.0, 1e-12, False)
    assert np.max(np.abs(plain_w - w)) > 1e-4
    # the loss reported is the loss at w (first pass), before the step
    first = np.mean((x @ w0 + b0 - y) ** 2)
    assert history.history["loss"][0] == pytest.approx(first, rel=1e-5)


def test_sam_model_defaults_and_checks():
    inner = keras.Sequential([keras.Input((DIN,)), keras.layers.Dense(DOUT)])
    model = pk.SAMModel(inner)
    assert (model.rho, model.eps, model.adaptive) == (0.05, 1e-12, False)
    with pytest.raises(ValueError, match=r"sam: rho must be a number in \[0, inf\), got rho=-1"):
        pk.SAMModel(inner, rho=-1.0)
    config = model.get_config()
    again = pk.SAMModel.from_config(config)
    assert again.rho == 0.05


def test_sam_model_trains_with_an_adaptive_optimizer_and_metrics():
    x, y, _, _ = _problem()
    inner = keras.Sequential([keras.Input((DIN,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(DOUT)])
    model = pk.SAMModel(inner, rho=0.05)
    model.compile(optimizer=pk.Adam(learning_rate=0.01), loss="mse", metrics=["mae"])
    history = model.fit(x.astype(np.float32), y.astype(np.float32), batch_size=8, epochs=3,
                        verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "mae" in history.history
    assert model.predict(x[:4].astype(np.float32), verbose=0).shape == (4, DOUT)
