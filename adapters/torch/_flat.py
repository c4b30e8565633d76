"""The compiled path of polyopt.torch (``compiled=True``).

Params of one dtype and device (not 16-bit, not 0-d) with the same counts and
slots form a :class:`FlatBucket`: their ``.data`` become views of one flat
buffer, their grads views of another when the same grads come back at the
next step (fresh grads are read where they are, :meth:`FlatBucket.grads_of`),
and each state slot one flat tensor whose views are the per-parameter state
entries (``self.state[p][key]``, so ``state_dict`` keeps torch's format).
The bucket's step is traced once per structure (:func:`_flat_step`: on the
flat buffers, or on their per-param views), split into its 0-d part and the
elementwise kernel, and given to inductor (:func:`_compile_flat`). Other
params (16-bit or 0-d) run one ``torch.compile`` graph per bucket
(:func:`compiled_step`).
"""

from __future__ import annotations

import functools
import itertools
import operator
import sys
import types
import weakref
from typing import Any, NamedTuple

import torch
import torch._inductor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.split_module import split_module

from polyopt import rules
from polyopt.rules import _state
from polyopt.torch._common import (
    _LOW_PRECISION,
    _apply,
    _is_zero,
    _Layout,
    as_count,
    entries_are,
    views_of,
)

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


def _compile_flat(step, example: list, contiguous: bool = False):
    """make_fx (fake tensors: nothing runs) of ``step``, its 0-d part split off
    (one small compiled graph), the rest one compiled elementwise kernel.

    Both parts go to inductor directly (``torch._inductor.compile``), not
    through dynamo: the graphs are already captured, and the caller keys them
    by every shape, dtype and device, so dynamo's guards would only add their
    cost to every step. Each part's example inputs are recorded by running
    the split graph once on copies of ``example``. Returns the split graph's
    forward. ``contiguous``: every input will be contiguous (the caller
    checked), as its shape, dtype and device are (the caller's key):
    inductor's per-input size and stride asserts, ~1 us each at every step,
    are left out.
    """
    gm = make_fx(step, tracing_mode="fake")(*example)
    # the rule's argument checks read 0-d hyperparameters (``.item()``) without
    # using the result: dead code, which inductor cannot run on fake tensors
    gm.graph.eliminate_dead_code()
    part = _scalar_partition(gm)
    _merge_scalars(gm, part)
    gm.recompile()
    split = split_module(gm, None, part)
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
        object.__setattr__(split, name, torch._inductor.compile(
            child, recorded[name], options={"size_asserts": not contiguous}))
    # its generated forward, without nn.Module's call (hooks, which it has
    # none of): measured 35-60 us less a step for 179 inputs, cold caches
    return split.forward


def _merge_scalars(gm: torch.fx.GraphModule, part) -> None:
    """Merge equal 0-d computations of the 0-d part (``part`` 0): a per-tensor
    step computes its 0-d values (a learning rate cast to the param's dtype)
    once per tensor, and each would be one more output of the 0-d graph and
    one more input of the kernel."""
    seen: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or part(node) != 0:
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None or schema.is_mutable:
            continue
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        try:
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
        else:
            seen[key] = node


def compiled_step(opt, values: dict, params: list, states: list,
                  layouts: tuple | None = None):
    """The ``torch.compile`` step of one bucket of ``opt``'s params that cannot
    be flat (16-bit or 0-d params): ``fn(params, grads, state tree) ->
    (new state, new 0-d params)``, compiled once per structure; its runtime
    hyperparameters are filled from ``values``."""
    structure = (opt._structure(values),
                 tuple((tuple(p.shape), p.dtype, p.device) for p in params),
                 tuple(sorted(states[0].keys())), layouts)
    structure = (type(opt), *structure)
    entry = _COMPILED_STEPS.get(structure)
    if entry is None:
        device = params[0].device
        inputs = {}
        rule_values = dict(values)
        for h in opt.spec:
            if h.runtime and not (h.name != "learning_rate" and _is_zero(values[h.name])):
                # filled before the rule is built: its checks read the value
                inputs[h.name] = torch.zeros((), dtype=torch.float64, device=device)
                inputs[h.name].fill_(values[h.name])
                rule_values[h.name] = inputs[h.name]
        rule = type(opt).factory(**rule_values)
        update = rule.update
        if layouts is not None:
            update = functools.partial(update, layouts=list(layouts))
        entry = (_compile(update), inputs)
        _COMPILED_STEPS[structure] = entry
    fn, inputs = entry
    for name, tensor in inputs.items():
        tensor.fill_(values[name])
    return fn


# --------------------------------------------------------------------------
# the flat buckets


def flat_eligible(params: list) -> bool:
    """Whether these params can share flat buffers: one dtype (not 16-bit) and
    device, none 0-d."""
    first = params[0]
    return (first.dtype not in _LOW_PRECISION
            and all(p.ndim > 0 and p.dtype == first.dtype and p.device == first.device
                    for p in params))


class FlatParams(NamedTuple):
    """A bucket's params and grads as views of two flat buffers."""

    flat_p: torch.Tensor
    flat_g: torch.Tensor
    pointers: tuple  # data pointers of the param views
    grad_views: list
    shapes: tuple  # (shape, dtype, device) of each param


class FlatBucket:
    """One bucket of the flat path: its params (``flat``: the params as views
    of a flat buffer, made at its first step, and a flat grad buffer whose
    views become the grads that come back; ``seen``: the last step's grads
    read per param), its state
    (``buffers``: state key -> (flat buffer, per-param views), the views being
    the entries of the per-param state dicts ``states``), and its step
    (:meth:`step`: the compiled step of the bucket's structure, shared by
    every bucket and optimizer of the same structure)."""

    def __init__(self) -> None:
        self.flat: FlatParams | None = None
        self.buffers: dict = {}
        self.states: list | None = None
        self.seen: list = []  # weak references to the grads of the last step, if read per param

    def intact(self, layout: _Layout) -> bool:
        """Whether the state entries of the bucket's params are still the views
        of its buffers (nothing replaced or loaded them since its last step)."""
        states = self.states
        if states is None:
            return False
        keys = [k for _, k in layout.slots if k in states[0]] + [k for _, k, _ in layout.scalars]
        if not layout.initial <= set(keys):
            return False
        for key in keys:
            built = self.buffers.get(key)
            if built is None or not entries_are(states, key, built[1]):
                return False
        return True

    def state_buffers(self, layout: _Layout, states: list) -> dict:
        """{state key: flat buffer}: every per-param state entry (slots, and the
        0-d counts) becomes a view of one flat tensor per key, so that
        ``self.state`` (and state_dict) stays per-parameter. Rebuilt when an
        entry is no longer the view (first step, load_state_dict)."""
        first = states[0]
        keys = [k for _, k in layout.slots if k in first] + [k for _, k, _ in layout.scalars]
        for key in keys:
            built = self.buffers.get(key)
            if built is None or any(st[key] is not v for st, v in zip(states, built[1])):
                buffer = torch.cat([st[key].reshape(-1) for st in states])
                self._setviews_of(key, buffer, states, [st[key].shape for st in states])
        self.states = states
        return {key: self.buffers[key][0] for key in keys}

    def _setviews_of(self, key: str, buffer: torch.Tensor, states: list, shapes: list) -> None:
        """``st[key]`` = the views of ``buffer`` with ``shapes``, one per state."""
        views = views_of(buffer, shapes)
        for st, v in zip(states, views):
            st[key] = v
        self.buffers[key] = (buffer, views)

    def flat_params(self, params: list) -> FlatParams:
        """The bucket's params as views of one flat buffer (their ``.data``, as
        apex's and FSDP's flat parameters; re-made if something replaced a
        param's data), with a flat grad buffer of the same layout."""
        built = self.flat
        if built is None or tuple(map(torch.Tensor.data_ptr, params)) != built.pointers:
            flat_p = torch.cat([p.detach().reshape(-1) for p in params])
            shapes = [p.shape for p in params]
            views = views_of(flat_p, shapes)
            for p, v in zip(params, views):
                p.data = v
            flat_g = flat_p.new_empty(flat_p.shape)
            grad_views = views_of(flat_g, shapes)
            pointer = torch.Tensor.data_ptr
            built = self.flat = FlatParams(
                flat_p, flat_g, tuple(map(pointer, views)), grad_views,
                tuple((tuple(p.shape), p.dtype, p.device) for p in params))
        return built

    def grads_of(self, params: list, grads: list) -> list | None:
        """The grads as the step reads them: None when they are (now) the views
        of the flat grad buffer, else the grads as they are.

        Grads that come back from one step to the next (the same tensors: set
        once, or accumulated in place after ``zero_grad(set_to_none=False)``)
        are gathered once into the flat grad buffer, whose views then become
        each param's ``.grad``: autograd accumulates straight into it, and the
        elementwise step reads one flat tensor. Fresh grads at every step (a
        backward after ``zero_grad()``, set_to_none=True, the default) are read
        where they are, per param: gathering them would cost one more pass
        over the grads at every step (measured, Adam: 1.38-1.65x torch's fused
        step with the gather). Non-contiguous grads are gathered."""
        built = self.flat
        if all(map(operator.is_, grads, built.grad_views)):
            return None
        seen = self.seen  # weak: a fresh grad is freed by the next zero_grad()
        again = len(seen) == len(grads) and all(r() is g for r, g in zip(seen, grads))
        if again or not all(map(torch.Tensor.is_contiguous, grads)):
            torch.cat([g.reshape(-1) for g in grads], out=built.flat_g)
            for p, v in zip(params, built.grad_views):
                p.grad = v
            self.seen = []
            return None
        self.seen = list(map(weakref.ref, grads))
        return grads

    def step(self, opt, values: dict, layout: _Layout, params: list, grads: list,
             states: list, intact: bool = False, layouts: tuple | None = None) -> None:
        """One compiled step of the bucket for ``opt`` (a RuleOptimizer) with
        these (checked) values; ``intact``: :meth:`intact` already said so.

        An elementwise rule on grads in the flat grad buffer runs once on the
        flat buffers (``torch.cat`` of many inputs inside the compiled graph
        is fused into its loop as a chain of index tests per element, measured
        3x slower: hence the buffers). Otherwise (fresh grads, or a per-tensor
        rule such as Ranger's gradient centralization) the step takes the
        per-parameter views of the flat buffers and the grads per param."""
        if intact:
            buffers = {k: v[0] for k, v in self.buffers.items()}
        else:
            buffers = self.state_buffers(layout, states)
        present = tuple(k for _, k in layout.slots if k in states[0])
        built = self.flat_params(params)
        fresh_grads = self.grads_of(params, grads)
        # each param keeps its own version counter (``p.data = view`` does not
        # share the buffer's): the step counts its in-place change on the
        # params, as torch.optim's does, so that autograd refuses a backward
        # through a graph that saved a param the step then changed
        if opt._rule(values).elementwise and fresh_grads is None:
            kind, count = "flat", 1
            tensors = [built.flat_p, built.flat_g, *[buffers[k] for k in present]]
        else:  # the params themselves (views of the flat buffer): the kernel counts them
            kind, count = "views", len(params)
            tensors = [*params, *(built.grad_views if fresh_grads is None else fresh_grads),
                       *[v for k in present for v in self.buffers[k][1]]]
        structure = (kind, type(opt), opt._structure(values), present, built.shapes, layouts)
        scalars = [buffers[k][0] for _, k, _ in layout.scalars]
        # contiguous: the views of the flat buffers, and fresh grads (checked)
        fresh, news, out = _run_compiled(opt, values, layout, present, structure, count,
                                         layouts, tensors, scalars, contiguous=True)
        if kind == "flat":  # the kernel counted it on the flat buffer only
            torch.autograd.graph.increment_version(params)
        # slots the rule started (momentum that became non-zero) come back flat
        for key, buffer in zip(fresh, news):
            self._setviews_of(key, buffer, states, [p.shape for p in params])
        for (_, key, _), value in zip(layout.scalars, out):
            buffers[key].copy_(value)


def _run_compiled(opt, values: dict, layout: _Layout, present: tuple, structure: tuple,
                  count: int, layouts: tuple | None, tensors: list, scalars: list,
                  factory=None, contiguous: bool = False) -> tuple:
    """Run the compiled step of ``structure`` (traced and compiled at its first
    use, :func:`_flat_step` with ``count`` tensors per operand) on ``tensors``
    (params, grads, present slots) and the 0-d state ``scalars``, with the
    runtime hyperparameters of ``values``; ``factory`` makes the rule from
    them (default: the optimizer's); ``contiguous``: ``tensors`` are, at every
    call with this ``structure``. Returns (keys of the slots the rule
    created, those slots flat, the new 0-d state)."""
    entry = _COMPILED_STEPS.get(structure)
    if entry is None:
        names = [h.name for h in opt.spec
                 if h.runtime and not (h.name != "learning_rate" and _is_zero(values[h.name]))]
        inputs = [torch.zeros((), dtype=torch.float64, device=tensors[0].device)
                  for _ in names]
        for name, tensor in zip(names, inputs):
            tensor.fill_(values[name])
        step = _flat_step(factory or type(opt).factory, values, names, layout, present, count,
                          layouts)
        # the counts go in as stored (float, torch's "step"); the graph casts them
        entry = (_compile_flat(step, [*tensors, *scalars, *inputs], contiguous), names, inputs,
                 step.created, [None] * len(names))
        _COMPILED_STEPS[structure] = entry
    fn, names, inputs, fresh, filled = entry
    for i, name in enumerate(names):
        value = values[name]
        if type(value) is not float or filled[i] != value:  # a float seen last: set
            inputs[i].fill_(value)
            filled[i] = value if type(value) is float else None
    out = fn(*tensors, *scalars, *inputs)
    return fresh, out[:len(fresh)], out[len(fresh):]


# --------------------------------------------------------------------------
# DTensor params (FSDP2's fully_shard, tensor parallelism): the local shards


def distributed(params: list) -> bool:
    """Whether any of these params is a DTensor (FSDP2's sharded params)."""
    module = sys.modules.get("torch.distributed.tensor")  # none exists before its import
    return module is not None and any(map(isinstance, params, itertools.repeat(module.DTensor)))


def check_local(owner: str, rule, params: list, where: str = "") -> None:
    """The compiled path runs an elementwise rule on each DTensor param's local
    tensor (exact: every element alone), which needs 32- or 64-bit params of
    at least one axis: others are refused, naming the param and its
    placements. A per-tensor rule's DTensor params are gathered whole
    instead (:mod:`polyopt.torch._sharded`)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not rule.elementwise:
        return
    for j, p in enumerate(params):
        if not isinstance(p, module.DTensor):
            continue
        if p.dtype in _LOW_PRECISION or p.ndim == 0:
            raise ValueError(f"{owner}: compiled=True runs DTensor params of 32 or 64 bits "
                             f"and at least one axis; param group{where}, params[{j}] (shape "
                             f"{tuple(p.shape)}, a DTensor with placements "
                             f"{tuple(p.placements)}) has dtype {p.dtype}; "
                             f"use compiled=False (the eager path steps them)")


def local_params(params: list) -> bool:
    """Whether :func:`local_step` takes this bucket as it is: every param a
    DTensor of 32 or 64 bits and one axis or more."""
    module = sys.modules["torch.distributed.tensor"]
    return all(isinstance(p, module.DTensor) and p.dtype not in _LOW_PRECISION
               and p.ndim > 0 for p in params)


def local_step(opt, values: dict, layout: _Layout, params: list, grads: list,
               states: list, layouts: tuple | None = None, rest: bool = False) -> None:
    """One compiled step of a bucket of DTensor params on their local tensors
    (``to_local()``: views of the shards, updated in place, as the state
    DTensors' local tensors are). The params' storage stays FSDP's (no flat
    buffers: FSDP2 all-gathers from it); the step takes each param's local
    view, as the flat path's per-tensor step does. ``rest``: the step of the
    rule's elementwise rest (:attr:`polyopt.rules.Rule.prefix`; ``grads``
    are then its transform's)."""
    present = tuple(k for _, k in layout.slots if k in states[0])
    local = [p.to_local() for p in params]
    tensors = [*local, *[g.to_local() for g in grads],
               *[st[k].to_local() for k in present for st in states]]
    structure = ("local-rest" if rest else "local", type(opt), opt._structure(values),
                 present, tuple((tuple(t.shape), t.dtype, t.device) for t in local), layouts)
    scalars = [states[0][k] for _, k, _ in layout.scalars]
    factory = None
    if rest:
        def factory(**v):
            return type(opt).factory(**v).prefix[1]
    fresh, news, out = _run_compiled(opt, values, layout, present, structure, len(params),
                                     layouts, tensors, scalars, factory)
    # the kernel counted its change on the local tensors; the DTensors keep
    # counters of their own, which torch.optim's DTensor ops move
    torch.autograd.graph.increment_version(params)
    module = sys.modules["torch.distributed.tensor"]
    for key, buffer in zip(fresh, news):  # a slot the rule started: one DTensor per param
        for st, p, view in zip(states, params, views_of(buffer, [t.shape for t in local])):
            st[key] = module.DTensor.from_local(view, p.device_mesh, p.placements,
                                                run_check=False, shape=p.shape,
                                                stride=p.stride())
    for (_, key, _), value in zip(layout.scalars, out):
        for st in states:
            st[key].copy_(value)
