"""polyopt.keras checkpoints: the step count at the int32 limit, bad files, kill -9.

Runs on each Keras backend (one process per backend, see noxfile.py).

- Keras counts ``optimizer.iterations`` in int64 on TensorFlow and in int32
  on JAX and torch (where its own increment wraps to -2**31); past 2**31 - 1
  the rule sees the int32 limit, never a negative count, and the state file
  holds the limit;
- a truncated, empty or foreign state file is refused naming the path, and
  the optimizer's variables are unchanged;
- examples.resume trains the MNIST MLP on this backend in a subprocess and
  kills it with SIGKILL: every restart resumes from the last complete
  checkpoint, 0 bytes are lost, the final weights are bitwise those of an
  uninterrupted run.
"""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt.interop import StateFileError
from tests._checkpoints import BAD_STATE_FILES, assert_survived, run_campaign

LIMIT = 2**31 - 1


def _variable(values) -> keras.Variable:
    return keras.Variable(np.asarray(values, np.float32), dtype="float32")


def _values(opt) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in opt.variables]


def test_iterations_past_the_int32_limit_saturate_and_adam_keeps_stepping():
    """Keras' own counter goes on to 2**31 (int64, TensorFlow) or wraps to -2**31
    (int32, JAX and torch backends); the rule's count stays at the limit."""
    w = _variable([1.0, -2.0, 3.0])
    g = np.array([0.5, -1.0, 2.0], np.float32)
    opt = pk.Adam(learning_rate=0.1)
    opt.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
    opt.iterations.assign(LIMIT - 1)
    m, v = (np.asarray(keras.ops.convert_to_numpy(next(
        x for x in opt.variables if x.path.endswith(slot))), np.float64)
        for slot in ("_first_moment", "_second_moment"))
    for _ in range(3):
        before = np.asarray(keras.ops.convert_to_numpy(w), np.float64)
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        np.testing.assert_allclose(np.asarray(keras.ops.convert_to_numpy(w)),
                                   before - 0.1 * m / (np.sqrt(v) + 1e-8), rtol=1e-5)
    buffer = io.BytesIO()
    opt.export_state(buffer, [w])
    buffer.seek(0)
    with np.load(buffer) as saved:
        assert saved["count"].dtype == np.int32 and int(saved["count"]) == LIMIT


@pytest.mark.parametrize("content, reason", BAD_STATE_FILES)
def test_bad_state_files_are_refused_with_the_path_and_change_nothing(tmp_path, content, reason):
    w = _variable([1.0, -2.0, 3.0])
    opt = pk.Adam(learning_rate=0.1)
    for _ in range(2):
        opt.apply_gradients([(keras.ops.ones((3,)), w)])
    good = tmp_path / "good.npz"
    opt.export_state(good, [w])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-60])
    before = _values(opt)
    for path, why in ((bad, reason), (truncated, "not a readable polyopt state file")):
        with pytest.raises(StateFileError, match=rf"{path}: {why}"):
            opt.import_state(path, [w])
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(opt)))
    fresh = pk.Adam(learning_rate=0.1)
    with pytest.raises(StateFileError, match=rf"{bad}: {reason}"):
        fresh.import_state(bad, [w])
    assert not fresh.built  # an unbuilt optimizer stays unbuilt


# --------------------------------------------------------------------------
# kill -9


def test_kill_9_three_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("keras", tmp_path, kills=3, steps=30, seed=1), 3)


@pytest.mark.slow
def test_kill_9_twenty_one_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("keras", tmp_path, kills=21, steps=70, seed=2), 21)
