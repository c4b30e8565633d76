"""Lookahead and SAM around any torch optimizer (polyopt's or torch.optim's).

Both wrap a base optimizer object and share its ``param_groups`` (so lr
schedulers, ``add_param_group`` and ``zero_grad`` on the wrapper act on the
base) and its ``defaults``. The math is the core's: Lookahead's
synchronisation is :func:`polyopt.rules.lookahead` (the base optimizer's step,
already applied to the params, is its inner rule), SAM's ascent is
:func:`polyopt.rules.sam`'s ``perturb``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from polyopt import hyper, rules
from polyopt.torch._common import _apply, as_count, compute_dtype, step_dtype


def _applied_update(grads, state, params):
    """The inner rule of the wrappers: the base optimizer has already moved the
    params, so its update, seen from here, is zero."""
    return [torch.zeros_like(p) for p in params], state


#: the base optimizer's step (already applied), as a polyopt rule
BASE_STEP = rules.Rule(init=lambda params: None, update=_applied_update)


class _Wrapper(torch.optim.Optimizer):
    """A torch optimizer around ``base_optimizer``, sharing its param groups
    (and its ``state``, unless the wrapper keeps per-param state of its own:
    torch.distributed.checkpoint runs a zero-gradient step of an optimizer
    whose ``state`` is empty, to create it)."""

    #: whether ``state`` is the wrapper's own (else the base optimizer's)
    _own_state = True

    def __init__(self, base_optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"polyopt.torch.{type(self).__name__}: base_optimizer must be a "
                f"torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.base_optimizer = base_optimizer
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        if not self._own_state:
            self.state = base_optimizer.state

    def __getstate__(self) -> dict:  # torch's keeps only defaults, state and param_groups
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None and any(g is param_group for g in base.param_groups):
            self.param_groups.append(param_group)  # Optimizer.__init__ re-adding base groups
        else:
            self.base_optimizer.add_param_group(param_group)

    def _load_base(self, state_dict: dict) -> None:
        """Load the base optimizer's state_dict; its load replaces its param
        groups (and state), which the wrapper shares."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        if not self._own_state:
            self.state = self.base_optimizer.state

    def _params_with_grad(self) -> list:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _index_map(self, state_dict: dict, name: str) -> dict:
        """saved param index -> param, as torch's load_state_dict pairs them."""
        saved = state_dict.get("param_groups")
        if saved is None or len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError(
                f"{name}: the state_dict's param groups do not match the optimizer's "
                f"({[len(g['params']) for g in self.param_groups]} params per group)")
        return {i: p for s, g in zip(saved, self.param_groups)
                for i, p in zip(s["params"], g["params"])}


#: the prefix of Lookahead's entries in its state_dict
_LOOKAHEAD = "lookahead_"
_LOOKAHEAD_ARGS = {h.spelling("torch"): h for h in hyper.LOOKAHEAD if h.name != "reset_state"}


class Lookahead(_Wrapper):
    r"""Lookahead (Zhang et al., 2019) around any torch optimizer.

    ``Lookahead(base_optimizer, k=6, alpha=0.5)``: ``step()`` runs the base
    optimizer's step (the fast weights), then every ``k`` steps moves the slow
    weights toward the fast ones, ``slow += alpha * (fast - slow)``, and
    restarts the fast weights there (:func:`polyopt.rules.lookahead`). The
    slow weights start at the params' values before the first step.

    Args:
      base_optimizer: a polyopt.torch optimizer or any torch.optim optimizer.
      k: synchronisation period (the spec's ``sync_period``; default 6).
      alpha: slow step size in [0, 1] (``slow_step_size``; default 0.5).

    State: per param ``step`` (fast steps taken) and ``slow_buffer`` (float32
    for 16-bit params), separate from the base optimizer's state;
    ``state_dict()`` is the base optimizer's with them as ``lookahead_step``
    and ``lookahead_slow_buffer`` in each param's entry and ``lookahead_k``,
    ``lookahead_alpha`` in each param group's (so torch.distributed.checkpoint's
    ``get_optimizer_state_dict`` keeps and reshards them). Params without a gradient in a step are
    skipped, as the base optimizer skips them.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer,
                 k: int = _LOOKAHEAD_ARGS["k"].default,
                 alpha: float = _LOOKAHEAD_ARGS["alpha"].default) -> None:
        values = hyper.LOOKAHEAD.validate({"sync_period": k, "slow_step_size": alpha},
                                          framework="torch")
        self.k, self.alpha = values["sync_period"], values["slow_step_size"]
        super().__init__(base_optimizer)

    def _rule(self):
        return rules.lookahead(BASE_STEP, sync_period=self.k, slow_step_size=self.alpha)

    def step(self, closure=None):
        """The base optimizer's step, then Lookahead's (``closure`` runs first, once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params_with_grad()
        with torch.no_grad():
            for p in params:  # the slow weights start where the fast ones do
                st = self.state[p]
                if "slow_buffer" not in st:
                    st["step"] = torch.zeros((), dtype=step_dtype())
                    st["slow_buffer"] = p.detach().to(compute_dtype(p.dtype), copy=True)
        self.base_optimizer.step()
        with torch.no_grad():
            buckets: dict = defaultdict(list)
            for p in params:
                buckets[float(self.state[p]["step"])].append(p)
            rule = self._rule()
            for members in buckets.values():
                states = [self.state[p] for p in members]
                count = as_count(states[0]["step"])
                state = rules.LookaheadState(count, [st["slow_buffer"] for st in states], None)
                grads = [p.grad for p in members]
                new = _apply(rule.update, members, grads, state)
                for st, slow in zip(states, new.slow):
                    st["slow_buffer"] = slow
                    st["step"].copy_(new.count)
        return loss

    def state_dict(self) -> dict:
        """The base optimizer's, with Lookahead's state in its entries, as torch's
        distributed checkpoint keeps them (``get_optimizer_state_dict``
        keeps only ``state`` and ``param_groups``): each param's
        ``lookahead_step`` and ``lookahead_slow_buffer`` beside the base's state
        and ``lookahead_k``, ``lookahead_alpha`` in each param group."""
        state_dict = self.base_optimizer.state_dict()
        state = state_dict["state"] = dict(state_dict["state"])
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            saved.update(lookahead_k=self.k, lookahead_alpha=self.alpha)
            for i, p in zip(saved["params"], group["params"]):
                if p in self.state:
                    state[i] = {**state.get(i, {}),
                                **{_LOOKAHEAD + k: v for k, v in self.state[p].items()}}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state and Lookahead's; all checked before any change."""
        name = "polyopt.torch.Lookahead.load_state_dict"
        groups = state_dict.get("param_groups")
        keys = {f"{_LOOKAHEAD}k", f"{_LOOKAHEAD}alpha"}
        if not isinstance(groups, list) or not groups or any(
                not isinstance(g, dict) or not keys <= g.keys() for g in groups):
            raise ValueError(f"{name}: the state_dict's param groups have no 'lookahead_k' "
                             "and 'lookahead_alpha' (was it saved by a Lookahead?)")
        if len({(g["lookahead_k"], g["lookahead_alpha"]) for g in groups}) != 1:
            raise ValueError(f"{name}: the param groups' lookahead_k and lookahead_alpha "
                             "differ; Lookahead has one k and one alpha")
        values = hyper.LOOKAHEAD.validate(
            {"sync_period": groups[0]["lookahead_k"],
             "slow_step_size": groups[0]["lookahead_alpha"]}, framework="torch")
        index = self._index_map(state_dict, name)
        state: defaultdict = defaultdict(dict)
        base_state = {}
        for i, entries in state_dict.get("state", {}).items():
            own = {k[len(_LOOKAHEAD):]: v for k, v in entries.items()
                   if k.startswith(_LOOKAHEAD)}
            base_state[i] = {k: v for k, v in entries.items() if not k.startswith(_LOOKAHEAD)}
            if not own:
                continue
            if i not in index:
                raise ValueError(f"{name}: lookahead state for param {i!r}, which is in "
                                 "none of the param groups")
            p = index[i]
            if set(own) != {"step", "slow_buffer"}:
                raise ValueError(f"{name}: lookahead state of param {i} has keys "
                                 f"{sorted(_LOOKAHEAD + k for k in own)}, expected "
                                 "['lookahead_slow_buffer', 'lookahead_step']")
            if tuple(own["slow_buffer"].shape) != tuple(p.shape) or own["step"].ndim:
                raise ValueError(
                    f"{name}: lookahead state of param {i}: lookahead_slow_buffer has shape "
                    f"{tuple(own['slow_buffer'].shape)} (param: {tuple(p.shape)}), "
                    f"lookahead_step has shape {tuple(own['step'].shape)} (expected ())")
            state[p] = {
                "step": own["step"].to(dtype=step_dtype(), device=p.device, copy=True),
                "slow_buffer": own["slow_buffer"].to(
                    dtype=compute_dtype(p.dtype), device=p.device, copy=True),
            }
        self._load_base({**state_dict, "state": {i: e for i, e in base_state.items() if e},
                         "param_groups": [{k: v for k, v in g.items() if k not in keys}
                                          for g in groups]})
        self.k, self.alpha = values["sync_period"], values["slow_step_size"]
        self.state = state


_SAM_ARGS = {h.spelling("torch"): h for h in hyper.SAM if h.name != "eps"}


class SAM(_Wrapper):
    r"""Sharpness-aware minimization (Foret et al., 2021), as davda54/sam.

    ``SAM(params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False,
    **base_kwargs)`` builds ``base_optimizer(params, **base_kwargs)`` (a
    class, polyopt's or torch.optim's). Each step takes two gradients:

    - ``step(closure)`` does both passes: ``closure`` (which computes the loss
      and calls ``backward``) runs at w, then at w + e(w), and the base
      optimizer steps from w with the second gradient. Returns the first loss.
      Gradients are zeroed before each pass.
    - ``first_step(zero_grad)`` moves the params to w + e(w) (the gradient at w
      must be in ``.grad``), ``second_step(zero_grad)`` restores w and runs
      the base optimizer's step, for loops that drive the passes themselves.

    e(w) = rho * g / (||g|| + 1e-12), or rho * w^2 g / (||w g|| + 1e-12) with
    ``adaptive=True`` (ASAM), one norm over all params with a gradient:
    :func:`polyopt.rules.sam`'s ``perturb``.

    Differences from davda54/sam: ``rho`` and ``adaptive`` belong to the
    optimizer, not to each param group (its single global norm needs one
    rho); ``state`` and ``state_dict()`` are the base optimizer's (the
    latter plus a ``"sam"`` entry), davda54's hold none of it; its ``step(closure)``
    expects the first backward done by the caller.
    """

    _own_state = False

    def __init__(self, params, base_optimizer: type, rho: float = _SAM_ARGS["rho"].default,
                 adaptive: bool = _SAM_ARGS["adaptive"].default, **kwargs: Any) -> None:
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "polyopt.torch.SAM: base_optimizer must be a torch optimizer class "
                f"(e.g. torch.optim.SGD), got {base_optimizer!r}")
        values = hyper.SAM.validate({"rho": rho, "adaptive": adaptive}, framework="torch")
        self.rho, self.adaptive = values["rho"], values["adaptive"]
        self._saved: dict = {}
        super().__init__(base_optimizer(params, **kwargs))

    def _rule(self):
        return rules.sam(BASE_STEP, rho=self.rho, adaptive=self.adaptive)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + e(w), keeping w."""
        if self._saved:
            raise RuntimeError("polyopt.torch.SAM.first_step: called twice without second_step")
        params = self._params_with_grad()
        if params:
            work = [p.detach().to(compute_dtype(p.dtype)) for p in params]
            grads = [p.grad.to(w.dtype) for p, w in zip(params, work)]
            perturbed = self._rule().perturb(work, grads)
            for p, new in zip(params, perturbed):
                self._saved[p] = p.detach().clone()
                p.copy_(new)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w, then the base optimizer's step with the gradient taken at w + e(w)."""
        for p, old in self._saved.items():
            p.copy_(old)
        self._saved = {}
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError(
                "polyopt.torch.SAM.step needs a closure (it evaluates the loss twice); "
                "or call first_step() and second_step() around your own passes")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        state_dict = self.base_optimizer.state_dict()
        state_dict["sam"] = {"rho": self.rho, "adaptive": self.adaptive}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        name = "polyopt.torch.SAM.load_state_dict"
        own = state_dict.get("sam")
        if not isinstance(own, dict) or not {"rho", "adaptive"} <= own.keys():
            raise ValueError(f"{name}: the state_dict has no 'sam' entry with 'rho' and "
                             "'adaptive' (was it saved by a SAM?)")
        values = hyper.SAM.validate({"rho": own["rho"], "adaptive": own["adaptive"]},
                                    framework="torch")
        self._load_base({k: v for k, v in state_dict.items() if k != "sam"})
        self.rho, self.adaptive = values["rho"], values["adaptive"]
