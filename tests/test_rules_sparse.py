"""Rule.sparse is a promise adapters act on (the Keras adapter writes sparse
gradients' entries only): every registry case keeps it, and it is given where
the math allows it."""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import rules
from polyopt.rules import _base, _state
from tests.registry import CASES

SHAPES = [(5, 3), (4,), (6, 2, 2)]


def _run(rule, steps=4, seed=0):
    """Steps with gradients whose rows 1 and 3 are zero (after nonzero first steps,
    so the state is not at its initial value). Returns (updates, state before,
    state after) of the last step."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES]
    state = rules.init_of(rule, params)
    for t in range(steps):
        grads = [rng.normal(size=s) for s in SHAPES]
        if t == steps - 1:
            for g in grads:
                g[[1, 3]] = 0.0
        before = state
        updates, state = rules.update_of(rule, grads, state, params)
        if t < steps - 1:
            params = [p + u for p, u in zip(params, updates)]
    return updates, before, state


@pytest.mark.parametrize("case", [c for c in CASES if c.build().sparse != "dense"], ids=str)
def test_zero_gradient_rows_are_left_as_promised(case):
    rule = case.build()
    updates, before, after = _run(rule)
    for u in updates:
        assert np.all(u[[1, 3]] == 0)
        assert np.any(u[[0, 2]] != 0)
    if rule.sparse == "updates_and_state":
        for old, new in zip(_state.entries(before), _state.entries(after)):
            if old.kind == "slot":
                for a, b in zip(old.value, new.value):
                    np.testing.assert_array_equal(b[[1, 3]], a[[1, 3]])


def test_which_rules_promise_what():
    assert rules.sgd().sparse == rules.adagrad().sparse == "updates_and_state"
    assert rules.rmsprop(centered=True).sparse == rules.adadelta().sparse == "updates"
    # momentum, weight decay, Adam's moments and wrappers move every element
    assert rules.sgd(momentum=0.9).sparse == "dense"
    assert rules.adagrad(weight_decay=0.1).sparse == "dense"
    assert rules.rmsprop(momentum=0.5).sparse == "dense"
    assert rules.adafactor(momentum=0.9).sparse == "dense"
    assert rules.adafactor().sparse == "updates"
    assert rules.adam().sparse == "dense"
    assert rules.lookahead(rules.sgd()).sparse == "dense"
    with pytest.raises(ValueError, match=r"x: sparse must be one of \('dense', 'updates', "
                                         r"'updates_and_state'\), got 'rows'"):
        _base.stateful_rule("x", tuple, (), None, learning_rate=0.1, weight_decay=0.0,
                            weight_decay_mode="l2", sparse="rows")
