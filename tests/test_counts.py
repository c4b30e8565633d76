"""The step count never wraps: at 2**31 - 1 it saturates (optax's safe_int32_increment).

An int32 count that wrapped to -2**31 would make t negative: b ** t overflows,
the bias corrections and every schedule freeze or turn NaN. Each rule steps
from a count just below the limit, in every array namespace under test; the
adapters test the same through their own storage (test_*_checkpoints.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import rules
from tests.conftest import to_namespace, to_numpy

LIMIT = 2**31 - 1


def test_the_limit_is_int32s_largest():
    assert rules.COUNT_LIMIT == np.iinfo(np.int32).max


def _near_limit(state, xp_name, below: int):
    return state._replace(count=to_namespace(xp_name, np.asarray(LIMIT - below, np.int32)))


def test_adam_at_the_limit_keeps_stepping_as_fully_bias_corrected(xp_name):
    rule = rules.adam(learning_rate=0.1)
    params = [to_namespace(xp_name, np.array([1.0, -2.0, 3.0]))]
    grads = [to_namespace(xp_name, np.array([0.5, -1.0, 2.0]))]
    state = _near_limit(rule.init(params), xp_name, 2)
    counts, moves = [], []
    m, v = np.zeros(3), np.zeros(3)
    for _ in range(4):
        updates, state = rule.update(grads, state, params)
        counts.append(int(to_numpy(state.count)))
        g = to_numpy(grads[0])
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        # 0.9 ** t and 0.999 ** t are 0 in float64 at t ~ 2**31: no correction left
        np.testing.assert_allclose(to_numpy(updates[0]), -0.1 * m / (np.sqrt(v) + 1e-8),
                                   rtol=1e-14)
        moves.append(to_numpy(updates[0]))
    assert counts == [LIMIT - 1, LIMIT, LIMIT, LIMIT]
    assert str(state.count.dtype).endswith("int32")
    assert all(np.all(np.isfinite(u)) and np.all(u != 0) for u in moves)


@pytest.mark.parametrize("make", [
    lambda: rules.sgd(0.1, momentum=0.9), lambda: rules.adagrad(0.1), lambda: rules.rmsprop(0.1),
    lambda: rules.adadelta(), lambda: rules.adamw(0.1), lambda: rules.adamax(0.1),
    lambda: rules.nadam(0.1), lambda: rules.radam(0.1), lambda: rules.amsgrad(0.1),
    lambda: rules.apply_if_finite(rules.adam(0.1)),
], ids=["sgd", "adagrad", "rmsprop", "adadelta", "adamw", "adamax", "nadam", "radam", "amsgrad",
        "apply_if_finite"])
def test_every_count_saturates_and_updates_stay_finite(make, xp_name):
    rule = make()
    params = [to_namespace(xp_name, np.array([[1.0, -2.0], [0.5, 3.0]]))]
    grads = [to_namespace(xp_name, np.array([[0.5, -1.0], [0.25, 2.0]]))]
    state = _near_limit(rule.init(params), xp_name, 1)
    for _ in range(3):
        updates, state = rule.update(grads, state, params)
        assert int(to_numpy(state.count)) == LIMIT
        assert np.all(np.isfinite(to_numpy(updates[0]))) and np.any(to_numpy(updates[0]) != 0)


def test_a_schedule_sees_the_saturated_count_not_a_negative_one(xp_name):
    seen = []

    def schedule(count):
        seen.append(int(to_numpy(count)))
        return 0.1

    rule = rules.sgd(schedule)
    params = [to_namespace(xp_name, np.ones(2))]
    state = _near_limit(rule.init(params), xp_name, 1)
    for _ in range(3):
        _, state = rule.update([to_namespace(xp_name, np.ones(2))], state, params)
    assert seen == [LIMIT - 1, LIMIT, LIMIT]
