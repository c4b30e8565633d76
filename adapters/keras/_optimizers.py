"""The optimizer classes: one line of glue each (a spec; a rule from polyopt.rules)."""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any

import keras
from keras import ops

from polyopt import hyper, native, rules
from polyopt.keras._base import (
    _BACKEND,
    BASE_OPTIONS,
    RuleOptimizer,
    _generated_init,
    _read,
    hyper_is_zero,
    step_count,
)

_register = keras.saving.register_keras_serializable(package="polyopt")


def _differences(spec: hyper.Spec, keras_native: str) -> str:
    """Where polyopt's defaults differ from the native Keras optimizer (from PRESETS)."""
    _, options = native.PRESETS[keras_native]
    return ", ".join(f"{spec[k].spelling('keras')}={spec[k].default!r} (Keras: {v!r})"
                     for k, v in options.items() if spec[k].default != v)


def _doc(summary: str, spec: hyper.Spec, keras_native: str | None, notes: str = "") -> str:
    rows = "\n".join(
        f"      {h.spelling('keras')}={h.default!r}: {h.allowed_text('keras')}. {h.doc}"
        for h in spec)
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


@_register
class Adafactor(RuleOptimizer):
    spec = hyper.ADAFACTOR


class _TrustRatioOptimizer(RuleOptimizer):
    """A rule with per-tensor trust ratios; ``exclude_from_trust_ratio`` does for the
    trust ratio what Keras's ``exclude_from_weight_decay`` does for the decay (optax's
    ``trust_ratio_mask``): the variables it names are stepped with ``trust_ratio=False``."""

    def exclude_from_trust_ratio(self, var_list=None, var_names=None) -> None:
        """Step these variables without the trust ratio: ``var_list`` (variables) and
        every variable whose name contains one of ``var_names``. Call before build()."""
        if self.built:
            raise ValueError(f"{self.spec.name}: exclude_from_trust_ratio() must be called "
                             f"before the optimizer is built")
        self._trust_excluded = {self._var_key(v) for v in var_list or ()}
        self._trust_excluded_names = tuple(var_names or ())

    def _use_trust_ratio(self, variable) -> bool:
        if self._var_key(variable) in getattr(self, "_trust_excluded", ()):
            return False
        return not any(n in variable.name for n in getattr(self, "_trust_excluded_names", ()))

    def _groups(self, variables) -> list[tuple[list[int], dict]]:
        if not self._hypers["trust_ratio"]:
            return super()._groups(variables)
        out = []
        for group, overrides in super()._groups(variables):
            kept = [k for k in group if self._use_trust_ratio(variables[k])]
            left = [k for k in group if k not in kept]
            out += [(g, o) for g, o in ((kept, overrides),
                                        (left, {**overrides, "trust_ratio": False})) if g]
        return out


@_register
class Lamb(_TrustRatioOptimizer):
    spec = hyper.LAMB


@_register
class Lars(_TrustRatioOptimizer):
    spec = hyper.LARS


@_register
class ScheduleFreeAdamW(RuleOptimizer):
    spec = hyper.SCHEDULE_FREE_ADAMW

    @contextlib.contextmanager
    def evaluation_point(self):
        """Within the block the trainable variables hold the evaluation point x =
        (y - (1 - b1) z) / b1; on exit (also on error) they get their training
        values y back, bit for bit. ``model.fit`` and ``model.evaluate`` use the
        variables as they are, y, as ``keras.optimizers.ScheduleFreeAdamW``'s do::

            with optimizer.evaluation_point():
                model.evaluate(x_test, y_test)
        """
        if not self.built:  # no step yet: x = y
            yield
            return
        variables = list(self._trainable_variables)
        indices = list(range(len(variables)))
        globals_ = [_read(v) for v in self._global_variables]
        state = self._rebuild(self._template, indices, step_count(self.iterations), globals_)
        train = [ops.copy(_read(v)) for v in variables]
        for v, x in zip(variables, rules.schedule_free_eval_params(train, state)):
            v.assign(x)
        try:
            yield
        finally:
            for v, y in zip(variables, train):
                v.assign(y)


@_register
class ADOPT(RuleOptimizer):
    spec = hyper.ADOPT


@_register
class Muon(RuleOptimizer):
    spec = hyper.MUON

    def __init__(self, *args: Any, exclude_layers: Any = None, exclude_embeddings: bool = False,
                 **kwargs: Any) -> None:
        if not isinstance(exclude_embeddings, bool):
            raise TypeError(f"muon: exclude_embeddings must be True or False, got "
                            f"exclude_embeddings={exclude_embeddings!r}")
        patterns = [] if exclude_layers is None else exclude_layers
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
            raise TypeError(f"muon: exclude_layers must be a list of regular expressions "
                            f"(searched in each variable's path), got "
                            f"exclude_layers={exclude_layers!r}")
        for p in patterns:
            try:
                re.compile(p)
            except (TypeError, re.error) as e:
                raise ValueError(f"muon: exclude_layers holds {p!r}, which is not a regular "
                                 f"expression ({e}); each is searched in the variables' "
                                 f"paths") from None
        _MUON_INIT(self, *args, **kwargs)
        self.exclude_layers = tuple(patterns)
        self.exclude_embeddings = exclude_embeddings

    def excluded(self, variable) -> bool:
        """Whether ``variable`` takes the Adam step whatever its shape, as
        keras.optimizers.Muon decides: its path holds 'embedding' (any case) with
        ``exclude_embeddings``, or one of ``exclude_layers`` matches it (re.search)."""
        if self.exclude_embeddings and "embedding" in variable.path.lower():
            return True
        return any(re.search(p, variable.path) for p in self.exclude_layers)

    def build(self, variables):
        if not self.built and variables:
            paths = [v.path for v in variables]
            for p in self.exclude_layers:
                if not any(re.search(p, path) for path in paths):
                    raise ValueError(f"muon: exclude_layers holds {p!r}, which matches no "
                                     f"variable's path (the paths: {paths[:10]})")
        super().build(variables)

    def _param_layouts(self, rule: Any, variables: list) -> list | None:
        layouts = super()._param_layouts(rule, variables)
        return [rules.NOT_A_MATRIX if self.excluded(v) else layout
                for v, layout in zip(variables, layouts)]

    def _weight_decay(self) -> Any:
        decay = self._hypers["weight_decay"]
        return self._hypers["adam_weight_decay"] if hyper_is_zero(decay) else decay

    def _groups(self, variables) -> list[tuple[list[int], dict]]:
        # exclude_from_weight_decay: neither decay (keras.optimizers.Muon's)
        return [(group, {**overrides, "adam_weight_decay": 0.0} if overrides else overrides)
                for group, overrides in super()._groups(variables)]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(exclude_layers=list(self.exclude_layers),
                      exclude_embeddings=self.exclude_embeddings)
        return config


_MUON_INIT = _generated_init(hyper.MUON)
Muon.__init__.__signature__ = inspect.signature(_MUON_INIT).replace(parameters=[
    *inspect.signature(_MUON_INIT).parameters.values(),
    inspect.Parameter("exclude_layers", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("exclude_embeddings", inspect.Parameter.KEYWORD_ONLY, default=False)])


_KERAS_NATIVE = {SGD: "keras.optimizers.SGD", Adagrad: "keras.optimizers.Adagrad",
                 RMSprop: "keras.optimizers.RMSprop", Adadelta: "keras.optimizers.Adadelta",
                 Adam: "keras.optimizers.Adam", AdamW: "keras.optimizers.AdamW",
                 Adamax: "keras.optimizers.Adamax", Nadam: "keras.optimizers.Nadam",
                 Lion: "keras.optimizers.Lion", Adafactor: "keras.optimizers.Adafactor",
                 Lamb: "keras.optimizers.Lamb", Muon: "keras.optimizers.Muon"}
for _cls, _native in _KERAS_NATIVE.items():
    _cls.__doc__ = _doc(f"{_cls.__name__} as a Keras 3 optimizer.", _cls.spec, _native)
Adafactor.__doc__ += (
    "\n    State per variable: ``v_row`` and ``v_col`` for a factored kernel (its\n"
    "    output and reduction axes' means of g^2 from its layout, Keras's by default),\n"
    "    ``v`` for the others: keras.optimizers.Adafactor keeps a full-size velocity for\n"
    "    every variable besides its factors.\n")
Muon.__doc__ += (
    "\n    Which variables take the Muon step (keras.optimizers.Muon's choice): 2-D ones with\n"
    "    the preset's ``muon_params='2d'``, except those ``exclude_layers`` (regular\n"
    "    expressions, ``re.search`` in the variable's path) or ``exclude_embeddings``\n"
    "    ('embedding' in the lower-cased path; default False, Keras's True) name: they get\n"
    "    the layout ``polyopt.rules.NOT_A_MATRIX`` and the Adam step. ``adam_lr_ratio``\n"
    "    multiplies the Adam step's learning rate, not its weight decay's (Keras's).\n")
Lamb.__doc__ += ("\n    ``exclude_from_weight_decay`` and ``exclude_from_trust_ratio`` leave "
                  "variables (e.g. biases) out of the decay and the trust ratio.\n")
Lars.__doc__ = _doc(
    "LARS as a Keras 3 optimizer (Keras has no native LARS).", Lars.spec, None,
    "\n\n    ``exclude_from_weight_decay`` and ``exclude_from_trust_ratio`` leave "
    "variables (e.g. biases) out of the decay and the trust ratio, as optax.lars's masks.")
ScheduleFreeAdamW.__doc__ = _doc(
    "Schedule-Free AdamW as a Keras 3 optimizer.", ScheduleFreeAdamW.spec,
    "keras.optimizers.ScheduleFreeAdamW",
    "\n\n    The variables hold the training point y, so ``model.fit`` and ``model.evaluate``"
    "\n    evaluate at y, as Keras's does; ``with optimizer.evaluation_point():`` puts the"
    "\n    averaged point x in them for the block. Keras's weight_decay shrinks y before"
    "\n    the step: ``weight_decay_mode='variable'``.")
ADOPT.__doc__ = _doc("ADOPT as a Keras 3 optimizer (Keras has none).", ADOPT.spec, None)
RAdam.__doc__ = _doc(
    "RAdam (Rectified Adam) as a Keras 3 optimizer; tensorflow-addons' RectifiedAdam options "
    "``total_steps``, ``warmup_proportion``, ``min_lr`` and ``amsgrad`` included.",
    RAdam.spec, None,
    "\n\n    tfa.optimizers.RectifiedAdam's numbers: ``RAdam(epsilon=1e-7, "
    "eps_placement='outside', threshold=5.0)`` (tfa rectifies when sma_t >= 5).")


@_register
class Ranger(RuleOptimizer):
    spec = hyper.RANGER

    def make_rule(self, learning_rate: Any, **overrides: Any) -> rules.Rule:
        # XLA compiles the step on tensorflow (jit_compile) and jax: RAdam's direction
        # computed once for Lookahead's two loops (rules.ranger's read_twice)
        return rules.ranger(learning_rate=learning_rate, **{**self._hypers, **overrides},
                            read_twice=_BACKEND != "torch")


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
