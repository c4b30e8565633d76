"""What the torch adapter's paths share: the dtypes the math and the counts
use, the rule state's torch keys (:class:`_Layout`), and one rule update on
a list of params (:func:`_apply`)."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from typing import Any

import torch

from polyopt.rules import COUNT_LIMIT, _state

#: rule state field -> torch.optim's name for it (so state_dict() reads like torch's)
TORCH_STATE_NAMES = {
    "count": "step",
    "first_moment": "exp_avg",
    "second_moment": "exp_avg_sq",
    "max_second_moment": "max_exp_avg_sq",
    "momentum": "momentum_buffer",
    "sum_of_squares": "sum",
    "mean_square": "square_avg",
    "mean_grad": "grad_avg",
    "mean_square_grad": "square_avg",
    "mean_square_delta": "acc_delta",
    "infinity_norm": "exp_inf",
    "momentum_product": "mu_product",
    "slow": "slow_buffer",
}

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math and the state use: float32 for 16-bit params."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def step_dtype() -> torch.dtype:
    """torch.optim's dtype for ``state['step']`` (float32, float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def as_count(step: torch.Tensor) -> torch.Tensor:
    """torch's float ``state['step']`` as the rule's int32 count, saturating at
    2**31 - 1 (a float32 or float64 step beyond it would wrap in a plain cast)."""
    return step.to(torch.float64).clamp(max=COUNT_LIMIT).to(torch.int32)


# --------------------------------------------------------------------------
# a rule's state NamedTuple <-> per-parameter torch entries (the core walker's paths)


class _Layout:
    """The shape of a rule's state (from the core walker, :mod:`polyopt.rules._state`):
    which leaves are per-parameter lists, which are scalars (counts), and the
    torch state key of each."""

    def __init__(self, template: Any, names: dict | None = None,
                 float64_template: Any = None) -> None:
        """``float64_template``: the same state for a float64 param (``template``'s is
        float32): a slot whose dtype is the same in both is stored in that dtype
        whatever the param's (state_dtype, Adafactor's momentum_dtype)."""
        self.template = template
        fixed = {}
        if float64_template is not None:
            for a, b in zip(_state.entries(template), _state.entries(float64_template)):
                if a.kind == "slot" and a.value[0].dtype == b.value[0].dtype:
                    fixed[a.path] = a.value[0].dtype
        #: torch key -> the dtype a slot is stored in whatever the param's
        self.fixed_dtypes: dict[str, torch.dtype] = {}
        self.slots: list[tuple[tuple, str]] = []  # (path, key): one tensor per param
        self.scalars: list[tuple[tuple, str, bool]] = []  # (path, key, is_count)
        used = set()
        initial = set()
        for entry in _state.entries(template):
            path = entry.path
            dotted = ".".join(str(p) for p in path)
            key = (names or {}).get(dotted) or TORCH_STATE_NAMES.get(str(path[-1]))
            if key is None or key in used:
                key = dotted
            used.add(key)
            if entry.kind == "none":
                continue
            if entry.kind == "array":
                self.scalars.append((path, key, not entry.value.is_floating_point()))
            else:
                self.slots.append((path, key))
                if entry.kind == "slot":
                    initial.add(key)
                if path in fixed:
                    self.fixed_dtypes[key] = fixed[path]
        self.keys = {key for _, key in self.slots} | {key for _, key, _ in self.scalars}
        # slots a fresh init fills (the others start empty: momentum 0, no amsgrad)
        self.initial = initial


# --------------------------------------------------------------------------
# the step on one list of params (eager, or under torch.compile)


def working(params: list, grads: list) -> tuple[list, list]:
    """The params and grads a rule computes with: 16-bit ones in float32."""
    work = [p if p.dtype not in _LOW_PRECISION else p.float() for p in params]
    return work, [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)]


def _apply(update, params: list, grads: list, state: Any, scalars_in_place: bool = True) -> Any:
    """One rule update: 16-bit params are computed in float32 and cast back.

    With ``scalars_in_place=False`` (under torch.compile) 0-d params are not
    changed but their new values returned: ``(new_state, new_scalars)``.
    Inductor (torch 2.13, CPU) drops in-place changes of 0-d input tensors.
    """
    work, grads = working(params, grads)
    updates, new_state = update(grads, state, work)
    scalars = []
    for p, w, u in zip(params, work, updates):
        if p.ndim == 0 and not scalars_in_place:
            scalars.append((w + u).to(p.dtype))
        elif w is p:
            p.add_(u)
        else:
            p.copy_(w + u)
    return new_state if scalars_in_place else (new_state, scalars)


def _is_zero(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    return isinstance(value, numbers.Number) and value == 0


def views_of(buffer: torch.Tensor, shapes: list) -> list:
    """Consecutive views of ``buffer`` with these shapes."""
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(buffer[offset:offset + n].view(shape))
        offset += n
    return views


def entries_are(states: list, key: str, tensors) -> bool:
    """Whether each state dict's entry ``key`` is still the tensor at its position."""
    return all(map(operator.is_, map(dict.get, states, itertools.repeat(key)), tensors))
