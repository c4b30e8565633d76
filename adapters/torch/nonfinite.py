"""SkipNonFinite: skip optimizer steps whose gradients hold a NaN or an infinity.

torch's own policy, which polyopt.torch's optimizers keep by default: a NaN
or inf gradient goes into the step and the params and moments become NaN
(torch.optim does the same); ``torch.amp.GradScaler`` skips such steps (and
lowers its loss scale). ``SkipNonFinite(optimizer)`` skips them without loss
scaling, for any torch optimizer, with :func:`polyopt.rules.apply_if_finite`'s
semantics and counters (optax.apply_if_finite's).
"""

from __future__ import annotations

import math

import torch

from polyopt import hyper, rules
from polyopt.torch.wrappers import _Wrapper

_FIELDS = ("count", "notfinite_count", "last_finite", "total_notfinite")


def _apply_flag(grads, state, params):
    """Inner rule whose update is 1: apply_if_finite zeroes it when it skips."""
    return [torch.ones_like(p) for p in params], state


_FLAG = rules.Rule(init=lambda params: None, update=_apply_flag)


class SkipNonFinite(_Wrapper):
    r"""Skip every step whose gradients (over all param groups) are not all finite.

    ``SkipNonFinite(base_optimizer, max_consecutive_errors=math.inf)``: before
    each step the gradients of all params are checked (one device sync, as
    GradScaler); a step with a NaN or inf is skipped entirely (params and the
    base optimizer's state untouched, so they never become NaN from it) and
    counted. After more than ``max_consecutive_errors`` non-finite steps in a
    row the steps are taken anyway (optax's ``apply_if_finite``), so that a
    diverged run shows. The decision and the counters are
    :func:`polyopt.rules.apply_if_finite`'s.

    Attributes: ``total_notfinite`` (skipped or non-finite steps, never reset),
    ``notfinite_count`` (consecutive ones), ``last_finite``. ``state_dict()`` is
    the base optimizer's with a ``"skip_nonfinite"`` entry holding them.
    Schedulers: attach them to the base optimizer (or to this wrapper; they
    share ``param_groups``).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer,
                 max_consecutive_errors: float = math.inf) -> None:
        values = hyper.APPLY_IF_FINITE.validate(
            {"max_consecutive_errors": max_consecutive_errors}, framework="torch")
        self.max_consecutive_errors = values["max_consecutive_errors"]
        super().__init__(base_optimizer)
        self._counters = self._rule().init([torch.zeros(())])._replace(inner=None)

    def _rule(self):
        return rules.apply_if_finite(_FLAG, self.max_consecutive_errors)

    @property
    def total_notfinite(self) -> int:
        return int(self._counters.total_notfinite)

    @property
    def notfinite_count(self) -> int:
        return int(self._counters.notfinite_count)

    @property
    def last_finite(self) -> bool:
        return bool(self._counters.last_finite)

    def step(self, closure=None):
        """The base optimizer's step if all gradients are finite (``closure`` runs first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            grads = [p.grad for p in self._params_with_grad()]
            flag = torch.zeros((), dtype=torch.float64)
            updates, counters = self._rule().update([flag, *grads], self._counters,
                                                    [flag, *grads])
            apply = bool(updates[0])
        self._counters = counters
        if apply:
            self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict:
        state_dict = self.base_optimizer.state_dict()
        state_dict["skip_nonfinite"] = {
            **{k: getattr(self._counters, k).clone() for k in _FIELDS},
            "max_consecutive_errors": self.max_consecutive_errors}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """The base optimizer's state and the counters; all checked before any change."""
        name = "polyopt.torch.SkipNonFinite.load_state_dict"
        own = state_dict.get("skip_nonfinite")
        if not isinstance(own, dict) or not {*_FIELDS, "max_consecutive_errors"} <= own.keys():
            raise ValueError(f"{name}: the state_dict has no 'skip_nonfinite' entry with "
                             f"{[*_FIELDS, 'max_consecutive_errors']}")
        values = hyper.APPLY_IF_FINITE.validate(
            {"max_consecutive_errors": own["max_consecutive_errors"]}, framework="torch")
        for k in _FIELDS:
            if not isinstance(own[k], torch.Tensor) or own[k].ndim:
                raise ValueError(f"{name}: skip_nonfinite[{k!r}] must be a 0-d tensor, "
                                 f"got {own[k]!r:.100}")
        counters = self._counters._replace(**{k: own[k].clone() for k in _FIELDS})
        self.base_optimizer.load_state_dict(
            {k: v for k, v in state_dict.items() if k != "skip_nonfinite"})
        self.max_consecutive_errors = values["max_consecutive_errors"]
        self._counters = counters
