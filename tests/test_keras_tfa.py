"""RAdam and Lookahead against the numbers published in tensorflow-addons' own tests.

tensorflow-addons does not run on Keras 3, so its expected values are copied:

- tensorflow/addons, tensorflow_addons/optimizers/tests/rectified_adam_test.py
  (commit 043eb7f7fff19f7670cdeb8851071add01ab3853): run_dense_sample and
  run_sparse_sample, RectifiedAdam(lr=1e-3, ...) and
  Lookahead(RectifiedAdam(lr=1e-3, beta_1=0.95), sync_period=6, slow_step_size=0.45).
  tfa asserts them with atol=2e-4; polyopt.keras matches them to ATOL.
- tensorflow_addons/optimizers/tests/lookahead_test.py
  (commit 2a8d073ed4d49bba74276a6259a4c7f73f0fb395): test_dense_exact_ratio,
  after k = sync_period steps the weights are val + (fast - val) * alpha.

The sparse samples (IndexedSlices touching one entry per variable) are run
with dense gradients that are zero elsewhere: RAdam's step of an entry whose
gradient and moments are 0 is 0, so the untouched entries stay put as in tfa.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import polyopt.keras as pk

# tfa.optimizers.RectifiedAdam's conventions: eps 1e-7 after bias correction,
# rectify when sma_t >= 5, weight decay multiplied by the (scheduled) lr.
TFA = {"epsilon": 1e-7, "eps_placement": "outside", "threshold": 5.0,
       "weight_decay_mode": "decoupled"}
ATOL = 2e-6  # the published values have 6 decimals

DENSE_GRADS = ([0.1, 0.2], [0.03, 0.04])
SPARSE_GRADS = ([0.1, 0.0], [0.0, 0.04])


def _run(optimizer, iterations, grads):
    variables = [keras.Variable(np.array([1.0, 2.0], np.float32)),
                 keras.Variable(np.array([3.0, 4.0], np.float32))]
    tensors = [keras.ops.convert_to_tensor(np.array(g, np.float32)) for g in grads]
    for _ in range(iterations):
        optimizer.apply_gradients(zip(tensors, variables))
    return [keras.ops.convert_to_numpy(v) for v in variables]


CASES = [
    ("dense", lambda: pk.RAdam(learning_rate=1e-3, **TFA), 100, DENSE_GRADS,
     [[0.985769, 1.985269], [2.986119, 3.986068]]),
    ("dense-amsgrad", lambda: pk.RAdam(learning_rate=1e-3, amsgrad=True, **TFA), 100,
     DENSE_GRADS, [[0.985769, 1.985269], [2.986119, 3.986068]]),
    ("dense-weight_decay", lambda: pk.RAdam(learning_rate=1e-3, weight_decay=0.01, **TFA), 100,
     DENSE_GRADS, [[0.984775, 1.983276], [2.983125, 3.982076]]),
    ("dense-warmup", lambda: pk.RAdam(learning_rate=1e-3, total_steps=100,
                                      warmup_proportion=0.1, min_lr=1e-5, **TFA), 100,
     DENSE_GRADS, [[0.994062, 1.993912], [2.994167, 3.994152]]),
    ("dense-lookahead", lambda: pk.Lookahead(pk.RAdam(learning_rate=1e-3, beta_1=0.95, **TFA),
                                             sync_period=6, slow_step_size=0.45), 100,
     DENSE_GRADS, [[0.993126, 1.992901], [2.993283, 3.993261]]),
    ("sparse", lambda: pk.RAdam(learning_rate=1e-3, **TFA), 200, SPARSE_GRADS,
     [[0.959333, 2.0], [3.0, 3.959632]]),
    ("sparse-amsgrad", lambda: pk.RAdam(learning_rate=1e-3, amsgrad=True, **TFA), 200,
     SPARSE_GRADS, [[0.959333, 2.0], [3.0, 3.959632]]),
    ("sparse-warmup", lambda: pk.RAdam(learning_rate=1e-3, total_steps=200,
                                       warmup_proportion=0.1, min_lr=1e-5, **TFA), 200,
     SPARSE_GRADS, [[0.982629, 2.0], [3.0, 3.982674]]),
    ("sparse-lookahead", lambda: pk.Lookahead(pk.RAdam(learning_rate=1e-3, beta_1=0.95, **TFA),
                                              sync_period=6, slow_step_size=0.45), 150,
     SPARSE_GRADS, [[0.988156, 2.0], [3.0, 3.988291]]),
]


@pytest.mark.parametrize(("name", "make", "iterations", "grads", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_matches_tensorflow_addons_published_values(name, make, iterations, grads, expected):
    got = _run(make(), iterations, grads)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("k", [5, 10])
@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_lookahead_exact_ratio(k, alpha):
    """tfa's test_dense_exact_ratio: after sync_period steps, val + (fast - val) * alpha."""
    rng = np.random.default_rng(0x2019)
    vals = [rng.random(2).astype(np.float32) for _ in range(2)]
    grads = [rng.standard_normal(2).astype(np.float32) for _ in range(2)]

    def run(optimizer):
        variables = [keras.Variable(v) for v in vals]
        for _ in range(k):
            optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads],
                                          variables))
        return [keras.ops.convert_to_numpy(v) for v in variables]

    fast = run(pk.Adam())
    slow = run(pk.Lookahead(pk.Adam(), sync_period=k, slow_step_size=alpha))
    for val, quick, got in zip(vals, fast, slow):
        np.testing.assert_allclose(got, val + (quick - val) * alpha, rtol=1e-6, atol=1e-6)
        assert np.max(np.abs(quick - val)) > 1e-3


def test_lookahead_learning_rate_is_settable_and_from_the_inner_optimizer():
    """tfa's test_model_dynamic_lr: the Lookahead's lr starts as the inner one and can be set."""
    opt = pk.Lookahead(pk.Adam(learning_rate=1e-3), sync_period=10, slow_step_size=0.4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(opt.learning_rate), 1e-3)
    opt.learning_rate = 1e-4
    np.testing.assert_allclose(keras.ops.convert_to_numpy(opt.learning_rate), 1e-4)
