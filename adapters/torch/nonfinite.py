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
#: the prefix of its entries in each param group of its state_dict
_PREFIX = "skip_nonfinite_"


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
    the base optimizer's with them in each param group (``skip_nonfinite_count``,
    ..., ``skip_nonfinite_max_consecutive_errors``: kept by torch's distributed
    checkpoint). ``state`` is the base optimizer's.
    Schedulers: attach them to the base optimizer (or to this wrapper; they
    share ``param_groups``).
    """

    _own_state = False

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
        """The base optimizer's, with the counters and ``max_consecutive_errors``
        in each param group as ``skip_nonfinite_<name>`` (torch.distributed.checkpoint's
        ``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``)."""
        state_dict = self.base_optimizer.state_dict()
        own = {_PREFIX + k: getattr(self._counters, k).item() for k in _FIELDS}
        own[_PREFIX + "max_consecutive_errors"] = self.max_consecutive_errors
        for group in state_dict["param_groups"]:
            group.update(own)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """The base optimizer's state and the counters; all checked before any change."""
        name = "polyopt.torch.SkipNonFinite.load_state_dict"
        keys = [_PREFIX + k for k in (*_FIELDS, "max_consecutive_errors")]
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not groups or any(
                not isinstance(g, dict) or not set(keys) <= g.keys() for g in groups):
            raise ValueError(f"{name}: the state_dict's param groups have no {keys} "
                             "(was it saved by a SkipNonFinite?)")
        own = {k: groups[0][k] for k in keys}
        if any({k: g[k] for k in keys} != own for g in groups):
            raise ValueError(f"{name}: the param groups' {keys} differ")
        values = hyper.APPLY_IF_FINITE.validate(
            {"max_consecutive_errors": own[_PREFIX + "max_consecutive_errors"]},
            framework="torch")
        counters = {}
        for k in _FIELDS:
            value, current = own[_PREFIX + k], getattr(self._counters, k)
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                value = value.item()
            if not isinstance(value, int):  # bool is an int
                raise ValueError(f"{name}: {_PREFIX}{k} must be an integer or a 0-d "
                                 f"tensor, got {value!r:.100}")
            counters[k] = torch.tensor(value, dtype=current.dtype, device=current.device)
        self._load_base({**state_dict, "param_groups": [
            {k: v for k, v in g.items() if k not in keys} for g in groups]})
        self.max_consecutive_errors = values["max_consecutive_errors"]
        self._counters = self._counters._replace(**counters)
