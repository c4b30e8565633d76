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
import itertools
import math
import numbers
import operator
import re
import types
from collections import defaultdict
from typing import Any, NamedTuple

import array_api_compat.torch as _xp
import torch
import torch._inductor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.split_module import split_module

from polyopt import native, rules
from polyopt.hyper import Spec
from polyopt.rules import COUNT_LIMIT, _state
from polyopt.torch import _eager

# Torch tensors go straight to array_api_compat's torch namespace: the same
# namespace array_namespace() returns, found without its introspection (which
# costs microseconds per call and is slow to trace under torch.compile).
rules.register_namespace(lambda a: isinstance(a, torch.Tensor), _xp)

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

_INDEXED = re.compile(r"(\w+)\[(\d+)\]")
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
# torch argument names from the spec


class _Arg:
    """One torch constructor argument: a hyperparameter, or a tuple of them (betas)."""

    def __init__(self, name: str, hypers: list) -> None:
        self.name = name
        self.hypers = hypers  # [(index or None, Hyper)]

    @property
    def default(self) -> Any:
        if self.hypers[0][0] is None:
            return self.hypers[0][1].default
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


class _FlatParams(NamedTuple):
    """A bucket's params and grads as views of two flat buffers (``__params__``
    of its flat entry)."""

    flat_p: torch.Tensor
    flat_g: torch.Tensor
    pointers: tuple  # data pointers of the param views
    grad_views: list
    grad_pointers: tuple
    shapes: tuple  # (shape, dtype, device) of each param
    views: list  # the params' .data


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


def _is_zero(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    return isinstance(value, numbers.Number) and value == 0


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
    for name in ("maximize", "differentiable"):
        if flags[name] and compiled:
            raise ValueError(f"{owner}: {name}=True is not supported with compiled=True "
                             f"yet; use compiled=False")


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


def _apply(update, params: list, grads: list, state: Any, scalars_in_place: bool = True) -> Any:
    """One rule update: 16-bit params are computed in float32 and cast back.

    With ``scalars_in_place=False`` (under torch.compile) 0-d params are not
    changed but their new values returned: ``(new_state, new_scalars)``.
    Inductor (torch 2.13, CPU) drops in-place changes of 0-d input tensors.
    """
    work = [p if p.dtype not in _LOW_PRECISION else p.float() for p in params]
    grads = [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)]
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


_compiled_count = itertools.count()

#: (optimizer class, structure) -> (compiled step, its runtime hyperparameter
#: tensors). Shared by all optimizers of a class: a second optimizer with the
#: same structure (a resumed run) does not compile again.
_COMPILED_STEPS: dict = {}


def _compile(update) -> Any:
    """torch.compile of one bucket's per-tensor step (``update``: a rule's
    update). Each compiled step gets its own code object, so that dynamo's
    per-code recompile limit counts one entry per (rule, structure) instead of
    sharing 8 between all of them."""
    def step(params, grads, state):
        return _apply(update, params, grads, state, scalars_in_place=False)

    code = step.__code__.replace(co_name=f"polyopt_step_{next(_compiled_count)}")
    fn = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
    return torch.compile(fn, fullgraph=True, dynamic=False)


# --------------------------------------------------------------------------
# the flat fast path: one rule call on the concatenation of a bucket's tensors


def _flat_step(factory, values: dict, hyper_names: list, layout: _Layout, present: tuple,
               count: int = 1, layouts: tuple | None = None):
    """The step of one bucket on flat state, as a function of positional
    tensors: ``(*params, *grads, *each present slot, *scalars, *hypers)``,
    ``count`` tensors each for the params, the grads and every slot.

    ``count`` 1: the rule runs once on the concatenations (flat buffers); valid
    only for elementwise rules (the rule's ``elementwise``), whose
    numbers do not depend on how the tensors are split. Otherwise the inputs
    are the per-parameter views of the flat buffers (so per-tensor reductions,
    gradient centralization, see their own tensor). The params and the slots
    are updated in place. Returns ``(*slots the rule created, *new scalars)``,
    each created slot flat; after tracing, ``step.created`` names them.
    """
    slot_paths = [path for path, key in layout.slots if key in present]

    def step(*args):
        groups = [list(args[i * count:(i + 1) * count]) for i in range(2 + len(slot_paths))]
        (params, grads), slots = groups[:2], groups[2:]
        rest = args[len(groups) * count:]
        scalars, hypers = rest[:len(layout.scalars)], rest[len(layout.scalars):]
        rule = factory(**{**values, **dict(zip(hyper_names, hypers))})
        leaves = {path: [] for path, _ in layout.slots}
        leaves.update(zip(slot_paths, slots))
        for (path, _, is_count), value in zip(layout.scalars, scalars):
            leaves[path] = as_count(value) if is_count else value
        updates, new = rules.update_of(rule, grads, _state.rebuild_from(layout.template, leaves),
                                       params, None if layouts is None else list(layouts))
        for p, u in zip(params, updates):
            p.add_(u)
        out = _state.by_path(new)
        created = []
        step.created = []
        for path, key in layout.slots:
            if len(out[path]) == count:
                if path in slot_paths:
                    for old, value in zip(slots[slot_paths.index(path)], out[path]):
                        old.copy_(value)
                else:
                    created.append(torch.cat([a.reshape(-1) for a in out[path]]))
                    step.created.append(key)
        return (*created, *[out[path] for path, _, _ in layout.scalars])

    return step


def _scalar_partition(gm: torch.fx.GraphModule):
    """Partition of a traced step: 0 for the 0-d computations that depend on 0-d
    inputs only (bias corrections, the step count, learning rates), 1 for the rest.

    Inductor inlines 0-d computations into the elementwise loop that uses them,
    so each vector of 16 floats would evaluate ``expm1``/``pow`` again (measured:
    2.7x slower than torch's fused Adam); computed apart, they are loaded once.
    """
    part = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        scalar = isinstance(val, torch.Tensor) and val.ndim == 0
        if node.op == "placeholder":
            part[node] = 0 if scalar else 1
        elif node.op == "output":
            continue
        else:
            inputs = [a for a in node.all_input_nodes]
            part[node] = 0 if scalar and all(part[a] == 0 for a in inputs) else 1
    return lambda node: part[node]


def _compile_flat(step, example: list):
    """make_fx (fake tensors: nothing runs) of ``step``, its 0-d part split off
    (one small compiled graph), the rest one compiled elementwise kernel.

    Both parts go to inductor directly (``torch._inductor.compile``), not
    through dynamo: the graphs are already captured, and the caller keys them
    by every shape, dtype and device, so dynamo's guards would only add their
    cost to every step. Each part's example inputs are recorded by running
    the split graph once on copies of ``example``.
    """
    gm = make_fx(step, tracing_mode="fake")(*example)
    # the rule's argument checks read 0-d hyperparameters (``.item()``) without
    # using the result: dead code, which inductor cannot run on fake tensors
    gm.graph.eliminate_dead_code()
    gm.recompile()
    split = split_module(gm, None, _scalar_partition(gm))
    children = dict(split.named_children())
    recorded: dict = {}
    for name, child in children.items():
        def record(*args, name=name, child=child):
            recorded[name] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            return child(*args)

        del split._modules[name]  # the generated code calls self.<name>(...)
        object.__setattr__(split, name, record)
    split(*[a.clone() for a in example])
    for name, child in children.items():
        object.__setattr__(split, name, torch._inductor.compile(child, recorded[name]))
    return split


# --------------------------------------------------------------------------
# the optimizer


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running a polyopt rule.

    Subclasses set ``spec`` (a :class:`polyopt.hyper.Spec`) and ``factory``
    (the rule factory in :mod:`polyopt.rules`); the constructor's arguments
    (torch spellings), their defaults and their checks come from the spec.

    ``compiled=True`` is the fast path. For groups of same-dtype, non-16-bit,
    non-0-d params the state is flat: the params' ``.data`` become views of
    one flat buffer (as apex's/FSDP's flat parameters), the grads are
    gathered into one flat buffer whose views become the params' ``.grad``,
    and each state slot is one flat tensor whose views are
    ``self.state[p][...]`` (so ``state_dict`` keeps torch's per-parameter
    format). Elementwise rules (:meth:`elementwise`: all but Ranger with
    gradient centralization) run ONCE on the flat tensors; Ranger's per-tensor
    means run on their per-parameter views, in the same compiled step. The
    traced step goes straight to inductor (no dynamo guards per call) as two
    graphs: the 0-d part (bias corrections, counts) and the elementwise
    kernel. Other groups (16-bit or 0-d params) run one torch.compile graph
    per bucket of params. Hyperparameters that schedulers change are 0-d
    tensor inputs: a changing lr never recompiles. Compiling takes a few
    seconds (flat path) to a minute (per-bucket graphs) on a CPU, once per
    structure. The
    default eager path runs the same rule op by op: an elementwise rule on
    cache-sized pieces of the params (:mod:`polyopt.torch._eager`), any other
    per tensor.
    """

    spec: Spec
    factory: Any
    #: state path (dotted) -> state key, where TORCH_STATE_NAMES is not enough
    state_names: dict = {}
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
        self._flats: dict = {}  # bucket's param ids -> {state key: (buffer, views)}
        self._group_checks: dict = {}  # group index -> (value key, checked values)
        self._steady: dict = {}  # group index -> (params, their grads) after a flat step
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
                key.append((h.name, float(v) if isinstance(v, torch.Tensor) else v))
        return tuple(key)

    def _layout(self, values: dict) -> _Layout:
        key = self._structure(values)
        layout = self._layouts.get(key)
        if layout is None:
            rule = type(self).factory(**values)
            layout = _Layout(rule.init([torch.zeros(1)]), type(self).state_names,
                             rule.init([torch.zeros(1, dtype=torch.float64)]))
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
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                kind = "complex" if p.is_complex() else "non-floating"
                raise TypeError(
                    f"{self.spec.name}: param group {index}, params[{j}] has dtype {p.dtype}: "
                    f"{kind} parameters are not supported (real floating dtypes only)")
        self._values({**self.defaults, **param_group}, f" {index}")
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
            params.append(p)
            grads.append(-g if maximize else g)  # p.grad itself stays as it was
        return values, params, grads

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
            for index, (values, params, grads) in enumerate(plans):
                if params:
                    self._step_group(values, params, grads, layouts[index])
                    self._note_steady(index, params)
        return loss

    def _note_steady(self, index: int, params: list) -> None:
        """Remember a group whose every param now has a grad view of one flat
        buffer (holding the views keeps no memory alive)."""
        if not self.compiled or index in self._steady:
            return
        group = self.param_groups[index]["params"]
        built = self._flats.get(tuple(map(id, params)), {}).get("__params__")
        if (built is not None and len(group) == len(params)
                and all(map(operator.is_, map(_GRAD, params), built.grad_views))):
            self._steady[index] = (list(params), list(built.grad_views))

    def _step_group(self, values: dict, params: list, grads: list,
                    layouts: tuple | None = None) -> None:
        layout = self._layout(values)
        if self.compiled:
            # the steady state of the flat path: the same params as the last
            # step, their state still the views of its flat buffers (so their
            # counts are equal): no bucketing, no lookups per param
            entry = self._flats.get(tuple(map(id, params)))
            if entry is not None and self._intact(entry, layout):
                self._step_flat(values, layout, params, grads, entry["__states__"], entry,
                                layouts)
                return
        where = {id(p): i for i, p in enumerate(params)}
        self._init_missing(values, layout, params, layouts)
        buckets: dict = defaultdict(list)
        for p, g in zip(params, grads):
            st = self.state[p]
            key = (tuple(float(st[k]) for _, k, _ in layout.scalars),
                   tuple(k in st for _, k in layout.slots))
            buckets[key].append((p, g))
        for members in buckets.values():
            ps = [p for p, _ in members]
            gs = [g for _, g in members]
            states = [self.state[p] for p in ps]
            own = None if layouts is None else tuple(layouts[where[id(p)]] for p in ps)
            if self.compiled and self._flat_eligible(ps):
                self._step_flat(values, layout, ps, gs, states, layouts=own)
                continue
            rule = self._rule(values)
            if not self.compiled and _eager.eligible(rule):
                _eager.step(_apply, rule.update, layout, ps, gs, states,
                            self._scalars(layout, states))
                continue
            tree = self._tree(layout, states)
            if self.compiled:
                fn = self._compiled_step(values, ps, states, own)
                new, scalars = fn(ps, gs, tree)
                for p, value in zip([p for p in ps if p.ndim == 0], scalars):
                    p.copy_(value)
            else:
                update = rule.update
                if own is not None:
                    update = functools.partial(update, layouts=list(own))
                new = _apply(update, ps, gs, tree)
            self._write(layout, states, new)

    def _rule(self, values: dict):
        """The rule of these values (kept with them, :meth:`_derive`)."""
        return self._derive(values, "rule", lambda v: type(self).factory(**v))

    def _init_missing(self, values: dict, layout: _Layout, params: list,
                      layouts: tuple | None = None) -> None:
        """Lazy state initialisation, as torch.optim does at a param's first step."""
        fresh = [i for i, p in enumerate(params)
                 if not (layout.initial | {k for _, k, _ in layout.scalars})
                 <= self.state[p].keys()]
        if not fresh:
            return
        rule = type(self).factory(**values)
        work = [params[i].detach().to(compute_dtype(params[i].dtype)) for i in fresh]
        init = _state.by_path(rules.init_of(
            rule, work, None if layouts is None else [layouts[i] for i in fresh]))
        fresh = [params[i] for i in fresh]
        for i, p in enumerate(fresh):
            st = self.state[p]
            for path, key in layout.slots:
                if key not in st and init[path]:
                    st[key] = init[path][i]
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

    def _write(self, layout: _Layout, states: list, new: Any) -> None:
        leaves = _state.by_path(new)
        for path, key in layout.slots:
            arrays = leaves[path]
            if len(arrays) == len(states):
                for st, a in zip(states, arrays):
                    st[key] = a
        for path, key, _ in layout.scalars:
            value = leaves[path]
            for st in states:
                st[key].copy_(value)

    def _flat_eligible(self, params: list) -> bool:
        first = params[0]
        return (first.dtype not in _LOW_PRECISION
                and all(p.ndim > 0 and p.dtype == first.dtype and p.device == first.device
                        for p in params))

    @staticmethod
    def _intact(entry: dict, layout: _Layout) -> bool:
        states = entry.get("__states__")
        if states is None:
            return False
        keys = [k for _, k in layout.slots if k in states[0]] + [k for _, k, _ in layout.scalars]
        if not layout.initial <= set(keys):
            return False
        for key in keys:
            built = entry.get(key)
            if built is None or not all(map(operator.is_, map(dict.get, states,
                                                                itertools.repeat(key)), built[1])):
                return False
        return True

    def _flat_buffers(self, layout: _Layout, params: list, states: list) -> dict:
        """{state key: flat buffer} for a bucket: every per-param state entry
        (slots, and the 0-d counts) becomes a view of one flat tensor per key, so
        that ``self.state`` (and state_dict) stays per-parameter. Rebuilt when an
        entry is no longer the view (first step, load_state_dict)."""
        ids = tuple(map(id, params))
        entry = self._flats.get(ids)
        if entry is None:
            for other in [k for k in self._flats if set(k) & set(ids)]:
                del self._flats[other]
            entry = self._flats[ids] = {}
        first = states[0]
        keys = [k for _, k in layout.slots if k in first] + [k for _, k, _ in layout.scalars]
        for key in keys:
            built = entry.get(key)
            if built is None or any(st[key] is not v for st, v in zip(states, built[1])):
                buffer = torch.cat([st[key].reshape(-1) for st in states])
                self._set_views(entry, key, buffer, states, [st[key].shape for st in states])
        entry["__states__"] = states
        return {key: entry[key][0] for key in keys}

    def _flat_params(self, entry: dict, params: list, grads: list) -> tuple:
        """The bucket's params and grads as two flat tensors, without copies in
        the steady state: the params' ``.data`` are views of one flat buffer
        (as apex's and FSDP's flat parameters; re-made if something replaced a
        param's data), and the grads are gathered into a flat grad buffer
        whose views then become the ``.grad`` of each param, so that autograd
        accumulates straight into it while grads are zeroed with
        ``zero_grad(set_to_none=False)``; fresh grads (set_to_none=True, the
        default) cost one ``torch.cat``. ``entry``: the bucket's flat entry."""
        built = entry.get("__params__")
        pointers = tuple(map(torch.Tensor.data_ptr, params))
        if built is None or pointers != built.pointers:
            flat_p = torch.cat([p.detach().reshape(-1) for p in params])
            views = self._views(flat_p, params)
            for p, v in zip(params, views):
                p.data = v
            flat_g = flat_p.new_empty(flat_p.shape)
            grad_views = self._views(flat_g, params)
            pointer = torch.Tensor.data_ptr
            shapes = tuple((tuple(p.shape), p.dtype, p.device) for p in params)
            built = entry["__params__"] = _FlatParams(
                flat_p, flat_g, tuple(map(pointer, views)), grad_views,
                tuple(map(pointer, grad_views)), shapes, views)
        if tuple(map(torch.Tensor.data_ptr, grads)) != built.grad_pointers:
            torch.cat([g.reshape(-1) for g in grads], out=built.flat_g)
            for p, v in zip(params, built.grad_views):
                p.grad = v
        return built.flat_p, built.flat_g

    @staticmethod
    def _views(buffer: torch.Tensor, params: list) -> list:
        views, offset = [], 0
        for p in params:
            views.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    @staticmethod
    def _set_views(entry: dict, key: str, buffer: torch.Tensor, states: list,
                   shapes: list) -> None:
        """``st[key]`` = the views of ``buffer`` with ``shapes``, one per state."""
        views, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(buffer[offset:offset + n].view(shape))
            offset += n
        for st, v in zip(states, views):
            st[key] = v
        entry[key] = (buffer, views)

    def _step_flat(self, values: dict, layout: _Layout, params: list, grads: list,
                   states: list, intact: dict | None = None,
                   layouts: tuple | None = None) -> None:
        """One compiled flat step of a bucket; ``intact``: its flat entry, already
        checked (:meth:`_intact`)."""
        if intact is None:
            buffers = self._flat_buffers(layout, params, states)
        else:
            buffers = {k: v[0] for k, v in intact.items() if not k.startswith("__")}
        present = tuple(k for _, k in layout.slots if k in states[0])
        # params and grads are read into flat tensors (one torch.cat each, outside
        # the compiled graph: inductor fuses a cat of many inputs into its loop
        # as a chain of index tests per element, measured 3x slower)
        flats = intact if intact is not None else self._flats[tuple(map(id, params))]
        flat_p, flat_g = self._flat_params(flats, params, grads)
        built = flats["__params__"]
        structure = ("flat", type(self), self._structure(values), present, built.shapes,
                     layouts)
        entry = _COMPILED_STEPS.get(structure)
        scalars = [buffers[k][0] for _, k, _ in layout.scalars]
        elementwise = self._rule(values).elementwise
        if elementwise:
            tensors = [flat_p, flat_g, *[buffers[k] for k in present]]
        else:  # the per-parameter views of the flat buffers
            tensors = [*built.views, *built.grad_views,
                       *[v for k in present for v in flats[k][1]]]
        if entry is None:
            names = [h.name for h in self.spec
                     if h.runtime and not (h.name != "learning_rate" and _is_zero(values[h.name]))]
            inputs = [torch.zeros((), dtype=torch.float64, device=params[0].device)
                      for _ in names]
            for name, tensor in zip(names, inputs):
                tensor.fill_(values[name])
            step = _flat_step(type(self).factory, values, names, layout, present,
                              1 if elementwise else len(params), layouts)
            # the counts go in as stored (float, torch's "step"); the graph casts them
            entry = (_compile_flat(step, [*tensors, *scalars, *inputs]), names, inputs,
                     step.created, [None] * len(names))
            _COMPILED_STEPS[structure] = entry
        fn, names, inputs, fresh, filled = entry
        for i, name in enumerate(names):
            value = values[name]
            if type(value) is not float or filled[i] != value:  # a float seen last: set
                inputs[i].fill_(value)
                filled[i] = value if type(value) is float else None
        out = fn(*tensors, *scalars, *inputs)
        # slots the rule started (momentum that became non-zero) come back flat
        news = out[:len(fresh)]
        for key, buffer in zip(fresh, news):
            self._set_views(flats, key, buffer, states, [p.shape for p in params])
        for (_, key, _), value in zip(layout.scalars, out[len(news):]):
            buffers[key].copy_(value)

    def _compiled_step(self, values: dict, params: list, states: list,
                       layouts: tuple | None = None):
        structure = (self._structure(values),
                     tuple((tuple(p.shape), p.dtype, p.device) for p in params),
                     tuple(sorted(states[0].keys())), layouts)
        structure = (type(self), *structure)
        entry = _COMPILED_STEPS.get(structure)
        if entry is None:
            device = params[0].device
            inputs = {}
            rule_values = dict(values)
            for h in self.spec:
                if h.runtime and not (h.name != "learning_rate" and _is_zero(values[h.name])):
                    # filled before the rule is built: its checks read the value
                    inputs[h.name] = torch.zeros((), dtype=torch.float64, device=device)
                    inputs[h.name].fill_(values[h.name])
                    rule_values[h.name] = inputs[h.name]
            rule = type(self).factory(**rule_values)
            update = rule.update
            if layouts is not None:
                update = functools.partial(update, layouts=list(layouts))
            entry = (_compile(update), inputs)
            _COMPILED_STEPS[structure] = entry
        fn, inputs = entry
        for name, tensor in inputs.items():
            tensor.fill_(values[name])
        return fn

    # -- state files and native state (polyopt.torch.interop) --------------------

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
        like = [torch.zeros(p.shape, dtype=compute_dtype(p.dtype))]
        layouts = self._param_layouts(values, group, like)
        init = _state.by_path(rules.init_of(rule, like, None if layouts is None
                                            else list(layouts)))
        return {key: tuple(init[path][0].shape) for path, key in layout.slots if init[path]}

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
                    dtype = layout.fixed_dtypes.get(key) or compute_dtype(p.dtype)
                elif any(k == key and c for _, k, c in layout.scalars):
                    dtype = step_dtype()
                else:
                    dtype = value.dtype
                converted[key] = value.to(dtype=dtype, device=p.device, copy=True)
            state[p] = converted
        return state, groups


def _arguments_doc(cls) -> str:
    lines = ["", "", "    Arguments (torch spelling, default; generated from the spec "
             f"``polyopt.hyper.{cls.spec.name.upper()}``):", ""]
    for arg in cls._args:
        docs = "; ".join(f"{h.doc}, {h.allowed_text()}" for _, h in arg.hypers)
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
                out[arg.name] = options[h.name]
        elif any(h.name in options for _, h in arg.hypers):
            out[arg.name] = tuple(options.get(h.name, h.default)
                                  for _, h in sorted(arg.hypers, key=lambda ih: ih[0]))
    unknown = set(options) - {h.name for a in cls._args for _, h in a.hypers}
    if unknown:
        raise TypeError(f"{cls.__name__}: no arguments {sorted(unknown)}")
    return out


__all__ = ["RuleOptimizer", "compute_dtype", "step_dtype", "torch_args", "spelled"]
