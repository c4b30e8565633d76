"""Every row of the conventions table (docs/conventions.md) (polyopt.native.PRESETS) is true.

Each native optimizer runs with its default arguments beside the polyopt
preset, in float64, for 120 steps of random gradients on a few tensors.
optax needs a learning rate: 0.01 on both sides. Keras runs in a child
process on the jax backend with floatx float64 (so its learning-rate
variable is exact; Adafactor on tensorflow: KERAS_ON_TENSORFLOW). A native
that computes part of a float64 run in float32 has its measured bound and
reason in FLOAT32_INSIDE. The detailed option-by-option parity lives in the other
test_conventions_* modules; this one keeps the table honest.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
import torch

from polyopt import native
from tests._native import run_keras

STEPS = 120
SHAPES = [(4, 3), (3,), (2, 2, 2)]
OPTAX_LR = 0.01


def _problem():
    rng = np.random.default_rng(7)
    params = [rng.normal(size=s) for s in SHAPES]
    scales = [1.0, 1e-2, 1e-4]
    grads = [[rng.normal(size=s) * scales[i % 3] for i, s in enumerate(SHAPES)]
             for _ in range(STEPS)]
    return params, grads


def _parse(key: str) -> tuple[str, str, dict]:
    match = re.fullmatch(r"(\w+(?:\.\w+)*)\.(\w+)(?:\((.*)\))?", key)
    module, name, args = match.groups()
    return module, name, eval(f"dict({args or ''})")  # noqa: S307 - our own table


def _polyopt(key: str, **overrides) -> list[np.ndarray]:
    params, grads = _problem()
    rule = native.preset(key, **overrides)
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return params


def _relative(got, expected) -> float:
    return max(float(np.max(np.abs(g - e)) / np.max(np.abs(e))) for g, e in zip(got, expected))


def _moved(final) -> float:
    start, _ = _problem()
    return _relative(final, start)


#: presets whose native computes part of a float64 run in float32, with the
#: largest relative difference measured on this problem and the reason.
FLOAT32_INSIDE = {
    # optax.adafactor's decay schedule 1 - t^-0.8 is computed in float32
    # (optax/_src/factorized.py: t = jnp.array(i + 1, jnp.float32)); with it
    # patched to float64 the two agree to 5e-16 (tests/test_optax_parity_v2.py).
    "optax.adafactor": 5e-8,  # measured 8.8e-9
}
#: Keras presets run on the tensorflow backend: on jax and torch, Keras 3's
#: ops.mean reduces float64 in float32 (result_type(float64, "float32") is
#: float32 in keras.src.backend.common.dtypes), which Adafactor's statistics
#: and RMS go through (measured 2e-7 on the jax backend; 1e-15 on tensorflow).
KERAS_ON_TENSORFLOW = {k for k in native.PRESETS if k.startswith("keras.optimizers.Adafactor")}

#: Muon's presets run on their own problem in tests/test_muon.py (torch.optim.Muon takes
#: 2-D params only and iterates in bfloat16; Keras's and optax's need their layouts)
MUON = {k for k in native.PRESETS if native.PRESETS[k][0] == "muon"}
TORCH = [k for k in native.PRESETS if k.startswith("torch.") and k not in MUON]
OPTAX = [k for k in native.PRESETS if k.startswith("optax.") and k not in MUON]
KERAS = [k for k in native.PRESETS if k.startswith("keras.") and k not in MUON]


def test_the_table_covers_the_three_frameworks():
    assert len(TORCH) >= 10 and len(OPTAX) >= 10 and len(KERAS) >= 9
    assert len(TORCH) + len(OPTAX) + len(KERAS) + len(MUON) == len(native.PRESETS)
    assert len(MUON) == 6


@pytest.mark.parametrize("key", TORCH)
def test_torch_preset(key):
    _, name, kwargs = _parse(key)
    params0, grads = _problem()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch NAdam keeps mu_product in this dtype
    try:
        params = [torch.tensor(p, requires_grad=True) for p in params0]
        optimizer = getattr(torch.optim, name)(params, **kwargs)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = torch.tensor(gi)
            optimizer.step()
    finally:
        torch.set_default_dtype(previous)
    expected = [p.detach().numpy() for p in params]
    assert _moved(expected) > 1e-4
    assert _relative(_polyopt(key), expected) <= 1e-10


@pytest.mark.parametrize("key", OPTAX)
def test_optax_preset(key):
    module, name, kwargs = _parse(key)
    params0, grads = _problem()
    namespace = optax.contrib if module == "optax.contrib" else optax
    transform = getattr(namespace, name)(learning_rate=OPTAX_LR, **kwargs)

    @jax.jit
    def step(params, state, g):
        updates, state = transform.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = [jax.numpy.asarray(p) for p in params0]
    state = transform.init(params)
    for g in grads:
        params, state = step(params, state, [jax.numpy.asarray(x) for x in g])
    expected = [np.asarray(p) for p in params]
    assert expected[0].dtype == np.float64
    assert _moved(expected) > 1e-4
    worst = _relative(_polyopt(key, learning_rate=OPTAX_LR), expected)
    assert worst <= FLOAT32_INSIDE.get(key, 1e-10)
    if key in FLOAT32_INSIDE:  # the float32 part shows: the bound is not loose
        assert worst > 1e-10


_KERAS_SCRIPT = """
import keras
keras.config.set_floatx("float64")
out = {}
for key, name, kwargs in payload["cases"]:
    variables = [keras.Variable(np.asarray(p), dtype="float64") for p in payload["params"]]
    optimizer = getattr(keras.optimizers, name)(**kwargs)
    for g in payload["grads"]:
        optimizer.apply_gradients(
            [(keras.ops.convert_to_tensor(np.asarray(x)), v) for x, v in zip(g, variables)])
    out[key] = [np.asarray(v) for v in variables]
result = out
"""


@pytest.fixture(scope="module")
def keras_results():
    params, grads = _problem()
    out = {}
    for backend, keys in (("jax", [k for k in KERAS if k not in KERAS_ON_TENSORFLOW]),
                          ("tensorflow", sorted(KERAS_ON_TENSORFLOW))):
        cases = [(key, *_parse(key)[1:]) for key in keys]
        payload = {"cases": cases, "params": [p.tolist() for p in params],
                   "grads": [[x.tolist() for x in g] for g in grads]}
        out.update(run_keras(_KERAS_SCRIPT, payload, backend=backend))
    return out


@pytest.mark.parametrize("key", KERAS)
def test_keras_preset(key, keras_results):
    expected = [np.asarray(p) for p in keras_results[key]]
    assert _moved(expected) > 1e-6  # Keras's default lr is 1e-3 (Adadelta: tiny steps)
    assert _relative(_polyopt(key), expected) <= 1e-10
