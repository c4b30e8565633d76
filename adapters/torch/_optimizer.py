"""RuleOptimizer: a polyopt rule as a ``torch.optim.Optimizer``.

The math is the rule's (``polyopt.rules``); this module only moves tensors:
it reads a param group's hyperparameters (torch spellings, generated from the
rule's :class:`polyopt.hyper.Spec`), rebuilds the rule's state NamedTuple from
``self.state[p]`` (torch's names: ``step``, ``exp_avg``, ...), calls
``rule.update`` on the list of params that have a gradient, and writes the
results back (params in place, state entries replaced).
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import re
from collections import defaultdict
from typing import Any

import array_api_compat.torch as _xp
import torch

from polyopt import native, rules
from polyopt._namespace import deferred_centering
from polyopt.hyper import Spec
from polyopt.rules import _state
from polyopt.torch import _differentiable, _eager, _flat, _sharded
from polyopt.torch._common import (
    _apply,
    _is_zero,
    _Layout,
    as_count,
    compute_dtype,
    step_dtype,
    working,
)

# Torch tensors go straight to array_api_compat's torch namespace: the same
# namespace array_namespace() returns, found without its introspection (which
# costs microseconds per call and is slow to trace under torch.compile).
rules.register_namespace(lambda a: isinstance(a, torch.Tensor), _xp)

_INDEXED = re.compile(r"(\w+)\[(\d+)\]")


# --------------------------------------------------------------------------
# torch argument names from the spec


class _Arg:
    """One torch constructor argument: a hyperparameter, or a tuple of them (betas)."""

    def __init__(self, name: str, hypers: list) -> None:
        self.name = name
        self.hypers = hypers  # [(index or None, Hyper)]

    @property
    def default(self) -> Any:
        """The default as torch spells it (a value alias: torch's value)."""
        if self.hypers[0][0] is None:
            h = self.hypers[0][1]
            return h.spelled_value("torch", h.default)
        return tuple(h.default for _, h in sorted(self.hypers, key=lambda ih: ih[0]))


def torch_args(spec: Spec) -> list[_Arg]:
    """The spec's arguments in torch spelling, ``betas[0]``/``betas[1]`` grouped as ``betas``."""
    args: dict[str, _Arg] = {}
    for h in spec:
        spelled = h.spelling("torch")
        m = _INDEXED.fullmatch(spelled)
        name, index = (m[1], int(m[2])) if m else (spelled, None)
        if name in args:
            if index is None or args[name].hypers[0][0] is None:
                raise TypeError(f"spec {spec.name}: torch spelling {name!r} is used twice")
            args[name].hypers.append((index, h))
        else:
            args[name] = _Arg(name, [(index, h)])
    for arg in args.values():
        if arg.hypers[0][0] is not None:
            indices = sorted(i for i, _ in arg.hypers)
            if indices != list(range(len(indices))):
                raise TypeError(f"spec {spec.name}: {arg.name} has indices {indices}")
    return list(args.values())


_GRAD = operator.attrgetter("grad")
_MISSING = object()
_PLAIN = (float, int, bool, str, type(None))


def _transformed(transform, params: list, grads: list, own: tuple | None) -> list:
    """The grads after a rule's per-tensor prefix (:attr:`polyopt.rules.Rule.prefix`),
    computed as the rule computes them (16-bit ones in float32)."""
    work, work_grads = working(params, grads)
    return transform(work_grads, work, layouts=None if own is None else list(own))


def _value_key(raw: tuple) -> tuple | None:
    """A key equal for two tuples of group values only when every value is of
    the same type and equal (so 1, 1.0 and True differ), or None when a value
    is not a plain number/string or a tuple of them (a tensor may change in
    place)."""
    key = []
    for v in raw:
        if type(v) in _PLAIN:
            key.append((type(v), v))
        elif type(v) in (tuple, list) and all(type(x) in _PLAIN for x in v):
            key.append((type(v), tuple((type(x), x) for x in v)))
        else:
            return None
    return tuple(key)


# --------------------------------------------------------------------------
# torch.optim's own flags, accepted with torch's meaning

#: torch.optim's arguments beside the hyperparameters, with their defaults. Kept
#: in every param group, as torch.optim keeps them. maximize: step along the
#: gradient (the rule sees -grad; p.grad is left alone). foreach, fused: torch's
#: choices of implementation, which give the same numbers; polyopt has its own
#: (compiled=), so they change nothing but are checked as torch checks them.
#: differentiable: the step runs with autograd on (params that are not leaves,
#: as torch.optim needs too). capturable: only False (not capturable in a CUDA graph).
TORCH_FLAGS = {"maximize": False, "foreach": None, "fused": None, "differentiable": False,
               "capturable": False}


def _weight_decay_mode(owner: str, decoupled: Any, given: Any) -> str:
    """torch's decoupled_weight_decay=True/False as weight_decay_mode."""
    if not isinstance(decoupled, bool):
        raise TypeError(f"{owner}: decoupled_weight_decay must be None, True or False, "
                        f"got decoupled_weight_decay={decoupled!r}")
    mode = "decoupled" if decoupled else "l2"
    if given is not None and given != mode:
        raise ValueError(f"{owner}: decoupled_weight_decay={decoupled} contradicts "
                         f"weight_decay_mode={given!r}; give one of them")
    return mode


def _check_flags(owner: str, flags: dict, compiled: bool) -> None:
    for name in ("maximize", "differentiable", "capturable"):
        if not isinstance(flags[name], bool):
            raise TypeError(f"{owner}: {name} must be True or False, "
                            f"got {name}={flags[name]!r}")
    for name in ("foreach", "fused"):
        if flags[name] is not None and not isinstance(flags[name], bool):
            raise TypeError(f"{owner}: {name} must be None, True or False, "
                            f"got {name}={flags[name]!r}")
    if flags["fused"] and flags["foreach"]:  # torch's error type and words
        raise RuntimeError(f"{owner}: `fused` and `foreach` cannot be `True` together.")
    if flags["fused"] and flags["differentiable"]:
        raise RuntimeError(f"{owner}: `fused` does not support `differentiable`")
    if flags["capturable"]:
        raise ValueError(f"{owner}: capturable=True is not supported (polyopt's step is not "
                         f"CUDA-graph capturable); allowed: capturable=False")
    if flags["differentiable"] and compiled:  # a step autograd records is never compiled
        raise ValueError(f"{owner}: differentiable=True is not supported with "
                         f"compiled=True; use compiled=False")


# --------------------------------------------------------------------------
# the optimizer


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running a polyopt rule.

    Subclasses set ``spec`` (a :class:`polyopt.hyper.Spec`) and ``factory``
    (the rule factory in :mod:`polyopt.rules`); the constructor's arguments
    (torch spellings), their defaults and their checks come from the spec.

    ``compiled=True`` is the fast path (:mod:`polyopt.torch._flat`): params
    of one dtype (not 16-bit, not 0-d) form a ``FlatBucket`` whose params,
    grads and state slots are views of flat buffers (``state_dict`` keeps
    torch's per-parameter format), stepped by one compiled kernel: elementwise
    rules (:meth:`elementwise`) run once on the flat tensors, per-tensor rules
    (Ranger's centralization, Adafactor, trust ratios) on the per-parameter
    views. Other params (16-bit or 0-d) run one torch.compile graph per
    bucket. Hyperparameters that schedulers change are 0-d tensor inputs: a
    changing lr never recompiles. The default eager path runs the same rule
    op by op: an elementwise rule on cache-sized pieces of the params
    (:mod:`polyopt.torch._eager`), any other per tensor.
    """

    spec: Spec
    factory: Any
    #: state path (dotted) -> state key, where TORCH_STATE_NAMES is not enough
    state_names: dict = {}
    #: complex params are stepped as torch.optim steps them: as their real view
    #: (torch.view_as_real), the state kept complex like the param. False (or a
    #: rule that uses layouts) refuses them at the step, as torch.optim.Adafactor.
    complex_params: bool = True
    _args: list[_Arg] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" not in cls.__dict__:
            return
        cls._args = torch_args(cls.spec)
        names = {a.name for a in cls._args}
        clash = names & {"params", "compiled"}
        if clash:
            raise TypeError(f"{cls.__name__}: spec argument(s) {sorted(clash)} clash")
        parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                      inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for i, arg in enumerate(cls._args):
            kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if i == 0 and arg.name == "lr"
                    else inspect.Parameter.KEYWORD_ONLY)
            parameters.append(inspect.Parameter(arg.name, kind, default=arg.default))
        parameters.append(inspect.Parameter("compiled", inspect.Parameter.KEYWORD_ONLY,
                                            default=False))
        parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                       for name, default in TORCH_FLAGS.items()]
        if "weight_decay_mode" in cls.spec:  # torch's spelling of the two modes
            parameters.append(inspect.Parameter(
                "decoupled_weight_decay", inspect.Parameter.KEYWORD_ONLY, default=None))
        cls._signature = inspect.Signature(parameters)

        def __init__(self, params, *args, **kwargs):
            RuleOptimizer.__init__(self, params, *args, **kwargs)

        __init__.__signature__ = cls._signature
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__
        cls.__doc__ = (cls.__doc__ or "") + _arguments_doc(cls)

    def __init__(self, params, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        owner = f"polyopt.torch.{cls.__name__}"
        try:
            bound = cls._signature.bind(self, params, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{owner}: {e}") from None
        bound.apply_defaults()
        compiled = bound.arguments["compiled"]
        if not isinstance(compiled, bool):
            raise TypeError(f"{owner}: compiled must be True or False, got compiled={compiled!r}")
        defaults = {a.name: bound.arguments[a.name] for a in cls._args}
        decoupled = bound.arguments.get("decoupled_weight_decay")
        if decoupled is not None:
            defaults["weight_decay_mode"] = _weight_decay_mode(
                owner, decoupled, kwargs.get("weight_decay_mode"))
        values = self._values(defaults)  # checks every argument before anything exists
        self._torch_check(owner, values)
        flags = {name: bound.arguments[name] for name in TORCH_FLAGS}
        _check_flags(owner, flags, compiled)
        defaults.update(flags)  # per group, as torch.optim keeps them
        self.compiled = compiled
        self._reset_caches()
        super().__init__(params, defaults)

    def _torch_check(self, owner: str, values: dict) -> None:
        """Checks of torch.optim's own that go beyond the spec (a subclass's)."""

    def _reset_caches(self) -> None:
        self._layouts: dict = {}
        self._buckets: dict = {}  # param ids -> their _flat.FlatBucket
        self._group_checks: dict = {}  # group index -> (value key, checked values)
        self._steady: dict = {}  # group index -> (params, their grads) after a flat step
        self._eager_kept: dict = {}  # the eager replay's schedules (_eager.step)
        self._derived: dict = {}  # id(values) -> (values, {"structure"/"rule": ...})

    @classmethod
    def elementwise(cls, values: dict) -> bool:
        """Whether the rule with these (canonical) values treats every element
        alone: no per-tensor reductions or shapes, so that one call on the
        concatenation of all tensors gives each tensor's numbers (the
        capability the rule declares, ``Rule.elementwise``)."""
        return cls.factory(**values).elementwise

    def _param_layouts(self, values: dict, group: dict, params: list) -> tuple | None:
        """The layout of each param for a rule that uses layouts (None otherwise):
        the group's ``"layout"`` (a :class:`polyopt.rules.Layout` for every
        tensor of 2 or more axes, or a callable ``shape -> Layout``), else
        torch's (output axis 0: Linear (out, in), Conv (out, in, kh, kw))."""
        if not self._rule(values).uses_layout:
            return None
        given = group.get("layout")
        if isinstance(given, rules.Layout):
            given = [given if p.ndim >= 2 else None for p in params]
        return tuple(_state.layouts_for(
            f"polyopt.torch.{type(self).__name__}", params, given, _state.out_first,
            names=[f"param of shape {tuple(p.shape)}" for p in params]))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "compiled": self.compiled}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compiled", False)
        self._reset_caches()  # load_state_dict comes here: new state entries

    # -- hyperparameters ---------------------------------------------------

    def _values(self, group: dict, where: str = "") -> dict:
        """The rule's arguments (canonical names) from a group (torch names), checked."""
        values = {}
        for arg in self._args:
            if arg.name not in group:
                raise ValueError(f"{self.spec.name}: param group{where} has no {arg.name!r}")
            value = group[arg.name]
            if arg.hypers[0][0] is None:
                values[arg.hypers[0][1].name] = value
                continue
            if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")
                    or len(value) != len(arg.hypers)):
                raise TypeError(
                    f"{self.spec.name}: {arg.name} must be a tuple of {len(arg.hypers)} "
                    f"numbers, got {arg.name}={value!r}")
            tensors = [isinstance(v, torch.Tensor) for v in value]
            if any(tensors) and not all(tensors):  # torch's error type and words
                raise ValueError(f"{self.spec.name}: {arg.name} must be either both floats or "
                                 f"both Tensors, got {arg.name}={value!r}")
            for index, h in arg.hypers:
                values[h.name] = value[index]
        for name in ("state_dtype", "momentum_dtype"):  # torch.bfloat16 -> "bfloat16"
            if isinstance(values.get(name), torch.dtype):
                values[name] = str(values[name]).rsplit(".", 1)[-1]
        for h in self.spec:
            if h.runtime and callable(values[h.name]) and not hasattr(values[h.name], "shape"):
                raise TypeError(
                    f"{self.spec.name}: {h.spelling('torch')} must be a number or a 0-d tensor, "
                    f"got a callable; change it with a torch.optim.lr_scheduler")
        try:
            return self.spec.validate(values, framework="torch")
        except (TypeError, ValueError) as e:
            if not where:
                raise
            raise type(e)(f"{e} (param group{where})") from None

    def _structure(self, values: dict) -> tuple:
        """What the rule's shape of computation depends on: every value except the
        runtime ones, and whether each runtime one (but lr) is zero (kept with
        the values dict, which ``_group_values`` returns again while a group
        is unchanged)."""
        return self._derive(values, "structure", self._structure_of)

    def _derive(self, values: dict, what: str, make) -> Any:
        """``make(values)``, kept with the values dict: ``_group_values`` returns
        the same dict again while a group is unchanged."""
        last = self._derived.get(id(values))
        if last is None or last[0] is not values:
            if len(self._derived) >= 2 * len(self.param_groups):
                self._derived.clear()
            last = self._derived[id(values)] = (values, {})
        if what not in last[1]:
            last[1][what] = make(values)
        return last[1][what]

    def _structure_of(self, values: dict) -> tuple:
        key = []
        for h in self.spec:
            v = values[h.name]
            if h.runtime:
                if h.name != "learning_rate":
                    key.append((h.name, _is_zero(v)))
            else:
                key.append((h.name, float(v.detach()) if isinstance(v, torch.Tensor) else v))
        return tuple(key)

    def _layout(self, values: dict) -> _Layout:
        key = self._structure(values)
        layout = self._layouts.get(key)
        if layout is None:
            rule = type(self).factory(**values)
            layout = _Layout(rule.init([torch.zeros(1, 1)]), type(self).state_names,
                             rule.init([torch.zeros(1, 1, dtype=torch.float64)]))
            self._layouts[key] = layout
        return layout

    # -- param groups --------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index = len(self.param_groups)
        params = param_group.get("params")
        if params is None:
            raise ValueError(f"{self.spec.name}: param group {index} has no 'params'")
        if not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)
        tensors = [params] if isinstance(params, torch.Tensor) else params
        for j, p in enumerate(tensors):
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"{self.spec.name}: param group {index}, params[{j}] has dtype {p.dtype}: "
                    f"non-floating parameters are not supported (real or complex floating "
                    f"dtypes only)")
        values = self._values({**self.defaults, **param_group}, f" {index}")
        rule, owner = type(self).factory(**values), f"polyopt.torch.{type(self).__name__}"
        tensors = [p[1] if isinstance(p, tuple) else p for p in tensors]
        _sharded.check(owner, rule, tensors, f" {index}")
        if self.compiled:
            _flat.check_local(owner, rule, tensors, f" {index}")
        super().add_param_group(param_group)

    # -- step ------------------------------------------------------------------

    def _group_values(self, index: int, group: dict) -> dict:
        """``_values`` of a group, checked again only where a value changed: a
        scheduler changing lr costs one check of lr (the returned dict is shared:
        read only)."""
        raw = tuple(group.get(a.name, _MISSING) for a in self._args)
        key = _value_key(raw)
        last = self._group_checks.get(index)
        if key is None or last is None or len(key) != len(last[0]):
            values = self._values(group, f" {index}")
        elif key == last[0]:
            return last[1]
        else:
            values = dict(last[1])
            for arg, now, before in zip(self._args, key, last[0]):
                if now == before:
                    continue
                (position, h), = arg.hypers if len(arg.hypers) == 1 else ((None, None),)
                if position is not None or h is None or not h.runtime:
                    values = self._values(group, f" {index}")
                    break
                try:
                    values[h.name] = h.check(group[arg.name], self.spec.name, "torch")
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{e} (param group {index})") from None
        if key is not None:
            self._group_checks[index] = (key, values)
        return values

    def _plan(self, index: int, group: dict):
        values = self._group_values(index, group)
        steady = self._steady.get(index)
        if steady is not None:
            # the params and grads of the last (flat) step, unchanged: each grad
            # is a view of the flat grad buffer, checked when it was made
            params, grads = steady
            now = group["params"]
            if (len(now) == len(params) and all(map(operator.is_, now, params))
                    and all(map(operator.is_, map(_GRAD, params), grads))):
                return values, params, grads
            del self._steady[index]
        params, grads = [], []
        maximize = group.get("maximize", False)
        if maximize:
            _check_flags(f"polyopt.torch.{type(self).__name__} (param group {index})",
                         {**TORCH_FLAGS, "maximize": maximize}, self.compiled)
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"polyopt.torch.{type(self).__name__} does not support sparse gradients "
                    f"(param group {index}, params[{j}])")
            if g.shape != p.shape or g.dtype != p.dtype:
                raise ValueError(
                    f"{self.spec.name}: param group {index}, params[{j}] has shape "
                    f"{tuple(p.shape)} and dtype {p.dtype} but its grad has shape "
                    f"{tuple(g.shape)} and dtype {g.dtype}")
            if p.is_complex():
                self._check_complex(values, index, j)
            params.append(p)
            grads.append(-g if maximize else g)  # p.grad itself stays as it was
        return values, params, grads

    def _check_complex(self, values: dict, index: int, j: int) -> None:
        """A complex param is stepped as its real view, or refused before any change."""
        name = type(self).__name__
        if not type(self).complex_params or self._rule(values).uses_layout:
            # torch.optim.Adafactor's words and type (RuntimeError at the step)
            raise RuntimeError(f"{name} does not support complex parameters "
                               f"(param group {index}, params[{j}])")
        state_dtype = values.get("state_dtype")
        if state_dtype is not None and state_dtype not in _COMPLEX_OF:
            raise TypeError(
                f"polyopt.torch.{name}: state_dtype={state_dtype!r} cannot hold the state of "
                f"a complex param (param group {index}, params[{j}]): there is no complex "
                f"{state_dtype}; give 'float32', 'float64' or None")

    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # differentiable=True: the step is recorded by autograd, as torch.optim's
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            # every group is checked before any is changed
            plans = [self._plan(i, g) for i, g in enumerate(self.param_groups)]
            layouts = [self._param_layouts(values, group, params) if params else None
                       for (values, params, _), group in zip(plans, self.param_groups)]
            owner = f"polyopt.torch.{type(self).__name__}"
            for index, (values, params, _) in enumerate(plans):  # DTensors: handled, or refused
                rule = self._rule(values)
                if (params and (self.compiled or not rule.elementwise)
                        and _flat.distributed(params)):
                    group = self.param_groups[index]["params"]
                    _sharded.check(owner, rule, group, f" {index}")
                    if self.compiled:
                        _flat.check_local(owner, rule, group, f" {index}")
            for index, (values, params, grads) in enumerate(plans):
                if params:
                    bucket = self._step_group(values, params, grads, layouts[index])
                    if bucket is not None and index not in self._steady:
                        self._note_steady(index, params, bucket)
            _eager.forget_unused(self._eager_kept)
        return loss

    def _note_steady(self, index: int, params: list, bucket: _flat.FlatBucket) -> None:
        """Remember a group whose every param (``params``, the flat ``bucket``'s)
        now has a grad view of one flat buffer (holding the views keeps no
        memory alive)."""
        group = self.param_groups[index]["params"]
        built = bucket.flat
        if (built is not None and len(group) == len(params)
                and all(map(operator.is_, map(_GRAD, params), built.grad_views))):
            self._steady[index] = (list(params), list(built.grad_views))

    def _step_group(self, values: dict, params: list, grads: list,
                    layouts: tuple | None = None,
                    real_views: bool = False) -> _flat.FlatBucket | None:
        """One step of a group's params; ``real_views``: complex params' real
        views with their state for this step only (:meth:`_step_real_view`),
        stepped by the eager path. Returns the flat bucket that stepped all
        of them, if one did."""
        if not real_views and any(map(torch.Tensor.is_complex, params)):
            self._step_real_view(values, params, grads, layouts)
            return None
        layout = self._layout(values)
        if self.compiled and not real_views:
            # the steady state of the flat path: the same params as the last
            # step, their state still the views of its flat buffers (so their
            # counts are equal): no bucketing, no lookups per param
            bucket = self._buckets.get(tuple(map(id, params)))
            if bucket is not None and bucket.intact(layout):
                bucket.step(self, values, layout, params, grads, bucket.states, True, layouts)
                return bucket
        all_states = [self.state[p] for p in params]
        self._init_missing(values, layout, params, layouts, all_states)
        flats = None if self.compiled else _eager.flat_scalars(self._eager_kept, params,
                                                                  all_states)
        for members in _buckets(layout, all_states, flats):
            if len(members) == len(params):  # one bucket (the steady state)
                ps, gs, states = params, grads, all_states
            else:
                ps = [params[i] for i in members]
                gs = [grads[i] for i in members]
                states = [all_states[i] for i in members]
            own = None if layouts is None else tuple(layouts[i] for i in members)
            rule = self._rule(values)
            if (not self.compiled and not self.defaults["differentiable"]
                    and self._replay(rule, layout, ps, gs, states, own, not real_views)):
                continue
            if (self.compiled and not real_views and not self.defaults["differentiable"]
                    and _flat.distributed(ps)
                    and self._local_rest(rule, values, layout, ps, gs, states, own)):
                continue
            if not self.defaults["differentiable"] and _sharded.applies(rule, ps):
                _sharded.step(self, values, layout, ps, gs, states, own,
                              self.compiled and not real_views)
                continue
            if self.compiled and not real_views and _flat.distributed(ps):  # checked in step()
                _flat.local_step(self, values, layout, ps, gs, states, own)
                continue
            if self.compiled and not real_views and _flat.flat_eligible(ps):
                bucket = self._bucket(ps)
                bucket.step(self, values, layout, ps, gs, states, layouts=own)
                if ps is params:
                    return bucket
                continue
            if self.defaults["differentiable"]:  # recorded by autograd (never compiled)
                update = rule.update
                if own is not None:
                    update = functools.partial(update, layouts=list(own))
                _differentiable.write(layout, states, _differentiable.apply(
                    update, ps, gs, self._tree(layout, states)))
                continue
            tree = self._tree(layout, states)
            if self.compiled and not real_views:
                fn = _flat.compiled_step(self, values, ps, states, own)
                new, scalars = fn(ps, gs, tree)
                for p, value in zip([p for p in ps if p.ndim == 0], scalars):
                    p.copy_(value)
            else:
                update = rule.update
                if own is not None:
                    update = functools.partial(update, layouts=list(own))
                new = _apply(update, ps, gs, tree)
            _differentiable.write(layout, states, new, recorded=False)
        return None

    def _replay(self, rule, layout: _Layout, params: list, grads: list, states: list,
                own: tuple | None, keep: bool = True) -> bool:
        """The eager default's replayed step (polyopt.torch._eager) of a bucket:
        an elementwise rule, or the rest of a rule with a per-tensor prefix
        after its transform (run on each grad, DTensors too: then the rest is
        replayed on the local shards); False when no part of it replays
        (nothing changed). ``keep``: the states are the optimizer's own (not
        a step's temporary views), so the replay's schedules are kept."""
        parts = _eager.parts(rule)
        if parts is None:
            return False
        transform, rest = parts
        centers = None
        if transform is not None and keep and not _flat.distributed(params):
            # gradient centralization's subtraction left to the replay, which
            # centers each grad where it reads it (none written out whole)
            with deferred_centering({}) as centers:
                transformed = _transformed(transform, params, grads, own)
            if not set(centers) <= set(map(id, transformed)):  # computed with
                centers, transformed = None, _transformed(transform, params, grads, own)
            grads = transformed
        elif transform is not None:
            grads = _transformed(transform, params, grads, own)
        return _eager.step(_apply, rest.update, layout, params, grads, states,
                           self._scalars(layout, states),
                           kept=self._eager_kept if keep else None, centers=centers)

    def _local_rest(self, rule, values: dict, layout: _Layout, params: list, grads: list,
                    states: list, own: tuple | None) -> bool:
        """``compiled=True`` on DTensor params of a rule with a per-tensor
        prefix: the transform on the DTensor grads, then the compiled rest on
        the local shards; False (nothing changed) when the rule has no such
        prefix (:func:`_eager.parts`), a param is not one the local step takes
        or a transformed grad is not laid out as its param (then the params
        are gathered)."""
        parts = _eager.parts(rule)
        if parts is None or parts[0] is None or not _flat.local_params(params):
            return False
        grads = _transformed(parts[0], params, grads, own)
        if any(g.placements != p.placements for g, p in zip(grads, params)):
            return False
        _flat.local_step(self, values, layout, params, grads, states, own, rest=True)
        return True

    def _bucket(self, params: list) -> _flat.FlatBucket:
        """The flat bucket of exactly these params (buckets that share a param
        with them are dropped: their params regrouped)."""
        ids = tuple(map(id, params))
        bucket = self._buckets.get(ids)
        if bucket is None:
            for other in [k for k in self._buckets if set(k) & set(ids)]:
                del self._buckets[other]
            bucket = self._buckets[ids] = _flat.FlatBucket()
        return bucket

    def _step_real_view(self, values: dict, params: list, grads: list,
                        layouts: tuple | None) -> None:
        """torch.optim's convention for complex params: each is stepped as its real
        view (``torch.view_as_real``: a trailing axis of its real and imaginary
        parts), so every moment is per component (Adam's v holds re(g)^2 and
        im(g)^2, not |g|^2 as optax's); its state stays complex and shaped like the
        param, as torch.optim keeps it. The group runs the eager per-tensor path
        (not the flat compiled one). The state is read and written through real
        views of the complex tensors, kept under the view for this step only."""
        views, view_grads, pairs = [], [], []
        for p, g in zip(params, grads):
            if not p.is_complex():
                views.append(p)
                view_grads.append(g)
                continue
            v = torch.view_as_real(p)
            if p in self.state:
                self.state[v] = {k: torch.view_as_real(t) if _complex_tensor(t) else t
                                 for k, t in self.state[p].items()}
            pairs.append((p, v))
            views.append(v)
            view_grads.append(torch.view_as_real(g))
        try:
            self._step_group(values, views, view_grads, layouts, real_views=True)
        finally:
            for p, v in pairs:
                if v in self.state:
                    self.state[p] = {k: _as_complex(t, p) for k, t in self.state.pop(v).items()}

    def _rule(self, values: dict):
        """The rule of these values (kept with them, :meth:`_derive`)."""
        return self._derive(values, "rule", lambda v: type(self).factory(**v))

    def _init_missing(self, values: dict, layout: _Layout, params: list,
                      layouts: tuple | None, states: list) -> None:
        """Lazy state initialisation, as torch.optim does at a param's first step
        (``states``: the params' state dicts)."""
        needed = layout.initial | {k for _, k, _ in layout.scalars}
        fresh = [i for i, st in enumerate(states) if not needed <= st.keys()]
        if not fresh:
            return
        rule = type(self).factory(**values)
        work = [params[i].detach().to(compute_dtype(params[i].dtype)) for i in fresh]
        init = _state.by_path(rules.init_of(
            rule, work, None if layouts is None else [layouts[i] for i in fresh]))
        for k, i in enumerate(fresh):
            st = states[i]
            for path, key in layout.slots:
                if key not in st and init[path]:
                    st[key] = init[path][k]
            for path, key, is_count in layout.scalars:
                if key not in st:
                    value = init[path]
                    st[key] = value.to(step_dtype() if is_count else value.dtype, copy=True)

    def _tree(self, layout: _Layout, states: list) -> Any:
        values = self._scalars(layout, states)
        first = states[0]
        for path, key in layout.slots:
            values[path] = [st[key] for st in states] if key in first else []
        return _state.rebuild_from(layout.template, values)

    @staticmethod
    def _scalars(layout: _Layout, states: list) -> dict:
        """{path: value} of a bucket's 0-d state as the rule reads it (counts as int32)."""
        first = states[0]
        return {path: as_count(first[key]) if is_count else first[key]
                for path, key, is_count in layout.scalars}

    def export_state(self, file, names=None) -> None:
        """Write the state to a framework-neutral file (:mod:`polyopt.torch.interop`)."""
        from polyopt.torch import interop
        interop.export_state(self, file, names)

    def import_state(self, file, names=None) -> dict:
        """Load a framework-neutral state file (:mod:`polyopt.torch.interop`)."""
        from polyopt.torch import interop
        return interop.import_state(self, file, names)

    def import_native_state(self, state_dict: dict) -> None:
        """Load a torch.optim state_dict (:mod:`polyopt.torch.interop`)."""
        from polyopt.torch import interop
        interop.import_native_state(self, state_dict)

    # -- state_dict ------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict; everything is checked first, so on error nothing changes."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups = self._checked(state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _slot_shapes(self, values: dict, group: dict, p: torch.Tensor, layout: _Layout) -> dict:
        """{state key: shape} of the slots a fresh init gives ``p`` (the rule's
        slot descriptions with the param's layout: Adafactor's row and column
        statistics are not param-shaped)."""
        rule = self._rule(values)
        if p.is_complex():  # stepped as its real view; the state is complex, like p
            like = [torch.view_as_real(torch.zeros(p.shape, dtype=p.dtype))]
        else:
            like = [torch.zeros(p.shape, dtype=compute_dtype(p.dtype))]
        layouts = self._param_layouts(values, group, like)
        init = _state.by_path(rules.init_of(rule, like, None if layouts is None
                                            else list(layouts)))
        cut = 1 if p.is_complex() else 0
        return {key: tuple(init[path][0].shape)[:init[path][0].ndim - cut]
                for path, key in layout.slots if init[path]}

    def _checked(self, state_dict: dict):
        name = f"polyopt.torch.{type(self).__name__}.load_state_dict"
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"{name}: the state_dict has no {key!r} entry")
        saved_groups = copy.deepcopy(list(state_dict["param_groups"]))
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the state_dict has {len(saved_groups)} param groups, "
                f"the optimizer has {len(self.param_groups)}")
        id_map, groups, layouts, group_values, param_groups = {}, [], {}, {}, {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}: param group {i} has {len(saved['params'])} params in the "
                    f"state_dict and {len(group['params'])} in the optimizer")
            for k, v in self.defaults.items():
                saved.setdefault(k, v)
            try:
                values = self._values(saved, f" {i}")
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            layout = self._layout(values)
            for saved_id, p in zip(saved["params"], group["params"]):
                id_map[saved_id] = p
                layouts[saved_id] = layout
                group_values[saved_id] = values
                param_groups[saved_id] = group
            groups.append({**saved, "params": group["params"],
                           **({"param_names": group["param_names"]}
                              if "param_names" in group and "param_names" not in saved else {})})
        state: defaultdict = defaultdict(dict)
        for saved_id, entries in state_dict["state"].items():
            if saved_id not in id_map:
                raise ValueError(
                    f"{name}: the state_dict has state for param {saved_id!r}, "
                    f"which is in none of its param groups")
            p, layout = id_map[saved_id], layouts[saved_id]
            slot_keys = {k for _, k in layout.slots}
            shapes = self._slot_shapes(group_values[saved_id], param_groups[saved_id], p,
                                       layout)
            unknown = set(entries) - layout.keys
            if unknown:
                raise ValueError(
                    f"{name}: state of param {saved_id} has unknown key(s) {sorted(unknown)}; "
                    f"{self.spec.name} keeps {sorted(layout.keys)}")
            converted = {}
            for key, value in entries.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(
                        f"{name}: state of param {saved_id}: {key} must be a tensor, "
                        f"got {type(value).__name__}")
                want = shapes.get(key, tuple(p.shape)) if key in slot_keys else ()
                if tuple(value.shape) != want:
                    raise ValueError(
                        f"{name}: state of param {saved_id}: {key} has shape "
                        f"{tuple(value.shape)}, expected {want}")
                if key in slot_keys:
                    dtype = _slot_dtype(layout, key, p)
                elif any(k == key and c for _, k, c in layout.scalars):
                    dtype = step_dtype()
                else:
                    dtype = value.dtype
                converted[key] = value.to(dtype=dtype, device=p.device, copy=True)
            state[p] = converted
        return state, groups



def _buckets(layout: _Layout, states: list, flats: dict | None = None) -> list:
    """The positions of ``states`` by equal counts and present slots: one rule
    call steps a bucket. The counts are read in one transfer: from the flat
    tensor whose views they are (``flats``: key -> it, :func:`_eager.flat_scalars`),
    or stacked."""
    values = []
    for _, key, _ in layout.scalars:
        if flats is not None and key in flats:
            values.append(flats[key].tolist())
            continue
        tensors = [st[key] for st in states]
        try:
            values.append(torch.stack(tensors).tolist())
        except (RuntimeError, TypeError):  # devices or shapes that do not stack
            values.append([float(t) for t in tensors])
    first = states[0].keys()
    if (all(v.count(v[0]) == len(v) for v in values)
            and all(st.keys() == first for st in states)):
        return [range(len(states))]  # the steady state: one bucket
    buckets: dict = defaultdict(list)
    for i, st in enumerate(states):
        buckets[(tuple(v[i] for v in values),
                 tuple(key in st for _, key in layout.slots))].append(i)
    return list(buckets.values())

def _slot_dtype(layout: _Layout, key: str, p: torch.Tensor) -> torch.dtype:
    """The dtype a param's state entry ``key`` is kept in: a dtype the rule fixes
    (state_dtype, Adafactor's momentum_dtype; its complex dtype of that precision
    for a complex param), else the dtype the param's math runs in."""
    fixed = layout.fixed_dtypes.get(key)
    if fixed is None:
        return compute_dtype(p.dtype)
    if p.is_complex():
        return getattr(torch, _COMPLEX_OF[str(fixed).rsplit(".", 1)[-1]])
    return fixed


#: a complex param's state in a state_dtype's precision (torch has no complex bfloat16)
_COMPLEX_OF = {"float32": "complex64", "float64": "complex128"}


def _complex_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_complex()


def _as_complex(t: Any, p: torch.Tensor) -> Any:
    """A slot computed on ``p``'s real view (shape ``p.shape + (2,)``) as the complex
    tensor torch.optim keeps; other entries (the 0-d step) as they are."""
    if (isinstance(t, torch.Tensor) and not t.is_complex()
            and tuple(t.shape) == (*p.shape, 2)):
        return torch.view_as_complex(t if t.stride(-1) == 1 else t.contiguous())
    return t


def _arguments_doc(cls) -> str:
    lines = ["", "", "    Arguments (torch spelling, default; generated from the spec "
             f"``polyopt.hyper.{cls.spec.name.upper()}``):", ""]
    for arg in cls._args:
        docs = "; ".join(f"{h.doc}, {h.allowed_text('torch')}" for _, h in arg.hypers)
        lines.append(f"      {arg.name}={arg.default!r}: {docs}")
    lines.append("      compiled=False: the fast path (flat buffers, torch.compile)")
    lines.append("      maximize=False, foreach=None, fused=None, differentiable=False, "
                 "capturable=False: torch.optim's flags (see TORCH_FLAGS)")
    differs = torch_differences(cls)
    if differs and differs[1]:
        lines += ["", f"    torch.optim.{differs[0]} reproduced: pass " + ", ".join(
            f"{k}={v!r}" for k, v in differs[1].items())]
    return "\n".join(lines) + "\n"


def torch_differences(cls) -> tuple[str, dict] | None:
    """(torch.optim name, the torch-spelled arguments whose polyopt default differs)."""
    key = f"torch.optim.{cls.__name__}"
    if key not in native.PRESETS or native.PRESETS[key][0] != cls.spec.name:
        return None
    return cls.__name__, spelled(cls, native.PRESETS[key][1])


def spelled(cls, options: dict) -> dict:
    """Canonical rule options -> torch constructor arguments of ``cls``."""
    out: dict = {}
    for arg in cls._args:
        if arg.hypers[0][0] is None:
            h = arg.hypers[0][1]
            if h.name in options:
                out[arg.name] = h.spelled_value("torch", options[h.name])
        elif any(h.name in options for _, h in arg.hypers):
            out[arg.name] = tuple(options.get(h.name, h.default)
                                  for _, h in sorted(arg.hypers, key=lambda ih: ih[0]))
    unknown = set(options) - {h.name for a in cls._args for _, h in a.hypers}
    if unknown:
        raise TypeError(f"{cls.__name__}: no arguments {sorted(unknown)}")
    return out


__all__ = ["RuleOptimizer", "compute_dtype", "step_dtype", "torch_args", "spelled"]
