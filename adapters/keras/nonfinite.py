"""SkipNonFinite: skip optimizer steps whose gradients hold a NaN or an infinity.

Keras' own policy, which polyopt.keras's optimizers keep by default: a NaN or
inf gradient goes into the step and the variables and moments become NaN
(``keras.optimizers`` do the same; ``model.fit`` does not check; the
``keras.callbacks.TerminateOnNaN`` callback only stops training on a NaN
loss). ``keras.optimizers.LossScaleOptimizer`` skips such steps (and lowers its
loss scale). ``SkipNonFinite(optimizer)`` skips them without loss scaling,
with :func:`polyopt.rules.apply_if_finite`'s semantics and counters (the same
as ``polyopt.torch.SkipNonFinite`` and ``polyopt.optax.apply_if_finite``,
optax's).
"""

from __future__ import annotations

import math
from typing import Any

import keras

from polyopt import hyper, rules
from polyopt.keras._base import RuleOptimizer
from polyopt.keras._optimizers import _Holder, _inner_optimizer
from polyopt.rules import _state


@keras.saving.register_keras_serializable(package="polyopt")
class SkipNonFinite(RuleOptimizer):
    """Skip every step whose gradients (over all variables) are not all finite.

    ``SkipNonFinite(Adam(...), max_consecutive_errors=math.inf)``: a step with
    a NaN or inf gradient leaves the variables and the inner optimizer's state
    untouched (so they never become NaN from it) and is counted. After more
    than ``max_consecutive_errors`` non-finite steps in a row the steps are
    taken anyway (optax's ``apply_if_finite``), so that a diverged run shows.
    Works eagerly, in ``tf.function``/``jit`` and in ``model.fit`` with
    ``jit_compile=True`` (the decision is a ``where``, no Python branch).

    Args:
      optimizer: the inner polyopt.keras optimizer (any, also a Lookahead).
        Its hyperparameters and learning rate are used; its base-class
        options (clipnorm, ...) must be left unset: give them to this wrapper.
      max_consecutive_errors: an integer >= 0 or ``math.inf`` (default).
      learning_rate: None (default): the inner optimizer's; else replaces it.
      clipnorm, ...: keras.optimizers.Optimizer's options.

    Attributes ``total_notfinite`` (non-finite steps, never reset),
    ``notfinite_count`` (consecutive ones) and ``last_finite`` read the
    counters, which are optimizer variables: ``model.save`` and checkpoints
    keep them. ``optimizer.iterations`` counts every step, the inner rule's
    own count (in the state) only the applied ones.
    """

    spec = hyper.APPLY_IF_FINITE

    def __init__(self, optimizer: Any, max_consecutive_errors: float = math.inf,
                 learning_rate: Any = None, **base: Any) -> None:
        optimizer, learning_rate = _inner_optimizer(SkipNonFinite, optimizer, learning_rate)
        self._setup({"max_consecutive_errors": max_consecutive_errors}, base,
                    learning_rate=learning_rate)
        self._inner = _Holder(optimizer)

    def make_rule(self, learning_rate: Any, **overrides: Any) -> rules.Rule:
        inner = self._inner.optimizer.make_rule(learning_rate, **overrides)
        return rules.apply_if_finite(inner, **self._hypers)

    def _weight_decay(self) -> Any:
        return self._inner.optimizer._weight_decay()

    def _counter(self, name: str) -> Any:
        if not self.built:
            return 0
        for entry, (kind, *index) in zip(_state.entries(self._template), self._where):
            if kind == "global" and entry.path == (name,):
                return keras.ops.convert_to_numpy(self._global_variables[index[0]])
        raise AttributeError(name)

    @property
    def total_notfinite(self) -> int:
        return int(self._counter("total_notfinite"))

    @property
    def notfinite_count(self) -> int:
        return int(self._counter("notfinite_count"))

    @property
    def last_finite(self) -> bool:
        return bool(self._counter("last_finite")) if self.built else True

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["optimizer"] = keras.saving.serialize_keras_object(self._inner.optimizer)
        return config
