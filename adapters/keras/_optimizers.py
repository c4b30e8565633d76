"""The optimizer classes: one line of glue each (a spec; a rule from polyopt.rules)."""

from __future__ import annotations

from typing import Any

import keras

from polyopt import hyper, native, rules
from polyopt.keras._base import BASE_OPTIONS, RuleOptimizer

_register = keras.saving.register_keras_serializable(package="polyopt")


def _differences(spec: hyper.Spec, keras_native: str) -> str:
    """Where polyopt's defaults differ from the native Keras optimizer (from PRESETS)."""
    _, options = native.PRESETS[keras_native]
    return ", ".join(f"{spec[k].spelling('keras')}={spec[k].default!r} (Keras: {v!r})"
                     for k, v in options.items() if spec[k].default != v)


def _doc(summary: str, spec: hyper.Spec, keras_native: str | None, notes: str = "") -> str:
    rows = "\n".join(
        f"      {h.spelling('keras')}={h.default!r}: {h.allowed_text()}. {h.doc}" for h in spec)
    native = ""
    if keras_native:
        native = (f"\n\n    Defaults are polyopt's (the same in every adapter); they differ from "
                  f"``{keras_native}`` in: {_differences(spec, keras_native) or 'nothing'}. "
                  f"Pass those values (``polyopt.native.PRESETS['{keras_native}']``) for "
                  f"Keras's numbers.")
    return (f"{summary}\n\n    Runs ``polyopt.rules.{spec.name}``.{native}{notes}\n\n    Args:\n"
            f"{rows}\n      clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,\n"
            f"      ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps,\n"
            f"      name: keras.optimizers.Optimizer's options.\n")


@_register
class SGD(RuleOptimizer):
    spec = hyper.SGD


@_register
class Adagrad(RuleOptimizer):
    spec = hyper.ADAGRAD


@_register
class RMSprop(RuleOptimizer):
    spec = hyper.RMSPROP


@_register
class Adadelta(RuleOptimizer):
    spec = hyper.ADADELTA


@_register
class Adam(RuleOptimizer):
    spec = hyper.ADAM


@_register
class AdamW(RuleOptimizer):
    spec = hyper.ADAMW
    weight_decay_required = True


@_register
class Adamax(RuleOptimizer):
    spec = hyper.ADAMAX


@_register
class Nadam(RuleOptimizer):
    spec = hyper.NADAM


@_register
class RAdam(RuleOptimizer):
    spec = hyper.RADAM


@_register
class Lion(RuleOptimizer):
    spec = hyper.LION


_KERAS_NATIVE = {SGD: "keras.optimizers.SGD", Adagrad: "keras.optimizers.Adagrad",
                 RMSprop: "keras.optimizers.RMSprop", Adadelta: "keras.optimizers.Adadelta",
                 Adam: "keras.optimizers.Adam", AdamW: "keras.optimizers.AdamW",
                 Adamax: "keras.optimizers.Adamax", Nadam: "keras.optimizers.Nadam",
                 Lion: "keras.optimizers.Lion"}
for _cls, _native in _KERAS_NATIVE.items():
    _cls.__doc__ = _doc(f"{_cls.__name__} as a Keras 3 optimizer.", _cls.spec, _native)
RAdam.__doc__ = _doc(
    "RAdam (Rectified Adam) as a Keras 3 optimizer; tensorflow-addons' RectifiedAdam options "
    "``total_steps``, ``warmup_proportion``, ``min_lr`` and ``amsgrad`` included.",
    RAdam.spec, None,
    "\n\n    tfa.optimizers.RectifiedAdam's numbers: ``RAdam(epsilon=1e-7, "
    "eps_placement='outside', threshold=5.0)`` (tfa rectifies when sma_t >= 5).")


@_register
class Ranger(RuleOptimizer):
    spec = hyper.RANGER


Ranger.__doc__ = _doc(
    "Ranger (Lookahead over RAdam with gradient centralization) as a Keras 3 optimizer.",
    Ranger.spec, None,
    "\n\n    Gradient centralization averages over each kernel's reduction axes from its "
    "layout: Keras's by default (the last axis, ``out``, of (in, out) and (kh, kw, in, out) "
    "is kept), or ``layouts={variable.path: polyopt.rules.Layout(...)}``; the same layer "
    "gets the same numbers as in torch, whose layout keeps axis 0.")


class _Holder:
    """Keeps the inner optimizer out of Keras' saving walk (it has no state of its own)."""

    __slots__ = ("optimizer",)

    def __init__(self, optimizer: RuleOptimizer) -> None:
        self.optimizer = optimizer


def _inner_optimizer(wrapper: type, optimizer: Any, learning_rate: Any) -> tuple[Any, Any]:
    """The inner optimizer of a wrapper (Lookahead, SkipNonFinite), checked, and the
    learning rate the wrapper runs with (the inner one's unless given)."""
    owner = wrapper.__name__
    if isinstance(optimizer, dict):
        optimizer = keras.saving.deserialize_keras_object(optimizer)
    if not isinstance(optimizer, RuleOptimizer) or isinstance(optimizer, wrapper):
        raise TypeError(
            f"{owner}: optimizer must be a polyopt.keras optimizer (not a {owner}), "
            f"got optimizer={optimizer!r}")
    changed = [k for k, v in BASE_OPTIONS.items() if k != "name" and getattr(optimizer, k) != v]
    if changed:
        raise ValueError(
            f"{owner}: set {', '.join(changed)} on the {owner}, not on its inner "
            f"optimizer (got {', '.join(f'{k}={getattr(optimizer, k)!r}' for k in changed)})")
    if learning_rate is None:
        learning_rate = optimizer._learning_rate
        if isinstance(learning_rate, keras.Variable):
            learning_rate = float(keras.ops.convert_to_numpy(learning_rate))
    return optimizer, learning_rate


@_register
class Lookahead(RuleOptimizer):
    """Lookahead around any polyopt.keras optimizer.

    ``Lookahead(RAdam(), sync_period=6, slow_step_size=0.5)`` replaces
    tensorflow-addons' ``tfa.optimizers.Lookahead(tfa.optimizers.RectifiedAdam(),
    sync_period=6, slow_step_size=0.5)`` (tfa does not run on Keras 3).

    Args:
      optimizer: the inner ("fast") optimizer, a polyopt.keras optimizer (or its
        serialized config). Its hyperparameters and learning rate are used; its
        base-class options (clipnorm, ...) must be left unset: give them to the
        Lookahead.
      sync_period=6, slow_step_size=0.5, reset_state=False: see
        ``polyopt.rules.lookahead``.
      learning_rate: None (default): the inner optimizer's; else replaces it.
      clipnorm, ...: keras.optimizers.Optimizer's options.

    The learning rate lives in this optimizer (``Lookahead.learning_rate``,
    which callbacks such as ReduceLROnPlateau change); the state of both
    rules (slow weights, the inner moments) lives in this optimizer's variables.
    """

    spec = hyper.LOOKAHEAD

    def __init__(self, optimizer: Any, sync_period: int = 6, slow_step_size: float = 0.5,
                 reset_state: bool = False, learning_rate: Any = None, **base: Any) -> None:
        optimizer, learning_rate = _inner_optimizer(Lookahead, optimizer, learning_rate)
        optimizer.spec["learning_rate"].check(learning_rate, "Lookahead", "keras")
        self._setup({"sync_period": sync_period, "slow_step_size": slow_step_size,
                     "reset_state": reset_state}, base, learning_rate=learning_rate)
        self._inner = _Holder(optimizer)

    def make_rule(self, learning_rate: Any, **overrides: Any) -> rules.Rule:
        inner = self._inner.optimizer.make_rule(learning_rate, **overrides)
        return rules.lookahead(inner, **self._hypers)

    def _weight_decay(self) -> Any:
        return self._inner.optimizer._weight_decay()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["optimizer"] = keras.saving.serialize_keras_object(self._inner.optimizer)
        return config
