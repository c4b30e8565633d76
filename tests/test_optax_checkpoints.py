"""polyopt.optax checkpoints: the step count at the int32 limit, bad files, kill -9.

- the count (int32 in the state pytree) saturates at 2**31 - 1 under jit;
- a truncated, empty or foreign state file or checkpoint is refused naming
  the path (``import_state``, ``load_checkpoint`` return nothing in part);
- examples.resume trains the MNIST MLP in a subprocess and kills it with
  SIGKILL: every restart resumes from the last complete checkpoint, 0 bytes
  are lost, and the final weights are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import polyopt.optax as po
from polyopt.interop import StateFileError
from polyopt.optax import interop
from tests._checkpoints import assert_survived, foreign_npz, run_campaign

LIMIT = 2**31 - 1


def test_count_at_the_int32_limit_saturates_under_jit_and_adam_keeps_stepping():
    opt = po.adam(0.1)
    params = {"w": jnp.array([1.0, -2.0, 3.0], jnp.float64)}
    g = np.array([0.5, -1.0, 2.0])
    grads = {"w": jnp.asarray(g)}
    state = opt.init(params)._replace(count=jnp.asarray(LIMIT - 2, jnp.int32))
    step = jax.jit(opt.update)
    m, v = np.zeros(3), np.zeros(3)
    counts = []
    for _ in range(4):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        counts.append(int(state.count))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * m / (np.sqrt(v) + 1e-8),
                                   rtol=1e-12)
    assert counts == [LIMIT - 1, LIMIT, LIMIT, LIMIT]
    assert state.count.dtype == jnp.int32


def _trained():
    opt = po.adam(0.05)
    params = {"w": jnp.ones((2, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)}
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, updates)
    return opt, params, state


@pytest.mark.parametrize("content, reason, checkpoint_reason", [
    (b"", r"not a readable polyopt state file", r"not a readable checkpoint"),
    (b"PK\x03\x04" + b"\x00" * 40, r"not a readable polyopt state file",
     r"not a readable checkpoint"),
    (foreign_npz(), r"no __polyopt__ header: not a polyopt state file",
     r"no __treedef__ entry: not a polyopt.optax checkpoint"),
], ids=["empty", "truncated-zip", "foreign-npz"])
def test_bad_files_are_refused_with_the_path(tmp_path, content, reason, checkpoint_reason):
    opt, params, state = _trained()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    with pytest.raises(StateFileError, match=rf"{bad}: {reason}"):
        interop.import_state(bad, opt, params)
    with pytest.raises(StateFileError, match=rf"{bad}: {checkpoint_reason}"):
        interop.load_checkpoint(bad, (params, state))
    good = tmp_path / "good.npz"
    interop.save_checkpoint(good, (params, state))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(StateFileError, match=rf"{truncated}: not a readable checkpoint"):
        interop.load_checkpoint(truncated, (params, state))


# --------------------------------------------------------------------------
# kill -9


def test_kill_9_three_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("jax", tmp_path, kills=3, steps=30, seed=1), 3)


@pytest.mark.slow
def test_kill_9_twenty_one_times_resumes_bitwise(tmp_path):
    assert_survived(run_campaign("jax", tmp_path, kills=21, steps=70, seed=2), 21)
