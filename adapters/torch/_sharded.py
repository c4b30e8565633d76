"""Per-tensor rules on sharded DTensor params (FSDP2's ``fully_shard``, tensor
parallelism): each param gathered whole, stepped as one process, its shard
written back.

A rule that is not elementwise (``Rule.elementwise`` False: Muon's
Newton-Schulz, Adafactor's factored and RMS statistics, LAMB's and LARS's
trust ratios, Ranger's gradient centralization) needs the whole tensor,
which a rank's shard is not. For a bucket holding a DTensor param,
:func:`step`

- gathers the params, their grads and every state slot that is a DTensor
  (``full_tensor()``: an all-gather over the mesh), the other state entries
  (0-d counts, Adafactor's factored statistics, the ``(0,)`` placeholders
  of Muon's two parts) being plain tensors, the same on every rank;
- runs the rule on those full tensors: the same code and the same numbers
  as one process (eager: the per-tensor step; ``compiled=True``: the
  compiled per-tensor step of :mod:`polyopt.torch._flat`);
- writes back each rank's own part: the param's local tensor in place, each
  param-shaped slot as a DTensor laid out as its param (its local part of
  the new full slot), the other slots whole.

Gathering everything rather than all-reducing partial sums keeps the rule
opaque (nothing here knows which reductions a rule makes) and gives the
numbers of one process bit for bit; the cost, measured in
docs/distributed.md, is an all-gather of the params, grads and param-shaped
state per step.

The gather path handles params whose placements are all ``Shard`` or
``Replicate`` (even or uneven shards, empty ones, any mesh); other
placements (``Partial``, strided shards) are refused when the optimizer is
built (:func:`check`).
"""

from __future__ import annotations

import functools
import sys

import torch

from polyopt.torch import _differentiable, _flat
from polyopt.torch._common import _apply, _Layout, views_of


def _dtensor_module():
    return sys.modules.get("torch.distributed.tensor")  # none exists before its import


def applies(rule, params: list) -> bool:
    """Whether this bucket takes the gathered step: a per-tensor rule and a
    DTensor param (a replicated one is its own whole: gathered without a
    collective)."""
    module = _dtensor_module()
    return (module is not None and not rule.elementwise
            and any(isinstance(p, module.DTensor) for p in params))


def check(owner: str, rule, params: list, where: str = "") -> None:
    """A per-tensor rule's DTensor params must be laid out with placements the
    gather path can write back: ``Shard`` (even or uneven) or ``Replicate``."""
    module = _dtensor_module()
    if module is None or rule.elementwise:
        return
    allowed = (module.Shard, module.Replicate)
    for j, p in enumerate(params):
        if not isinstance(p, module.DTensor):
            continue
        bad = [pl for pl in p.placements if type(pl) not in allowed]
        if bad:
            raise ValueError(
                f"{owner}: param group{where}, params[{j}] (shape {tuple(p.shape)}) is a "
                f"DTensor with placements {tuple(p.placements)}: with these options the rule "
                f"is per-tensor, and polyopt gathers a sharded param to step it, which "
                f"takes placements Shard(dim) and Replicate() only, not {bad[0]!r}")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (an all-gather), a plain tensor as it is."""
    if not isinstance(t, _dtensor_module().DTensor):
        return t
    full = t.full_tensor()
    wait = getattr(full, "wait", None)  # an AsyncCollectiveTensor: its plain result
    return wait() if wait is not None else full


def _part(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's part of ``full`` (shaped like the DTensor ``p``), a view."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                          p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def step(opt, values: dict, layout: _Layout, params: list, grads: list, states: list,
         layouts: tuple | None, compiled: bool) -> None:
    """One step of a bucket of ``opt`` (a RuleOptimizer) on the whole tensors
    (see the module's docstring); ``compiled``: the compiled per-tensor step."""
    module = _dtensor_module()
    full_params = [_full(p) for p in params]
    full_grads = [_full(g) for g in grads]
    slot_keys = [k for _, k in layout.slots]
    full_states = [{k: _full(v) if k in slot_keys else v for k, v in st.items()}
                   for st in states]
    if compiled:
        _compiled(opt, values, layout, full_params, full_grads, full_states, layouts)
    else:
        update = opt._rule(values).update
        if layouts is not None:
            update = functools.partial(update, layouts=list(layouts))
        new = _apply(update, full_params, full_grads, opt._tree(layout, full_states))
        _differentiable.write(layout, full_states, new, recorded=False)
    for p, full, st, full_st in zip(params, full_params, states, full_states):
        if not isinstance(p, module.DTensor):
            for k in slot_keys:
                if k in full_st:
                    st[k] = full_st[k]
            continue
        p.to_local().copy_(_part(full, p))
        # the DTensor's own version counter too, as its in-place ops count it
        # (autograd refuses a backward through a graph that saved it)
        torch.autograd.graph.increment_version(p)
        for k in slot_keys:
            if k not in full_st:
                continue
            value = full_st[k]
            if tuple(value.shape) == tuple(p.shape):  # param-shaped: sharded as p
                value = module.DTensor.from_local(
                    _part(value, p).clone(memory_format=torch.contiguous_format),
                    p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride())
            st[k] = value


def _compiled(opt, values: dict, layout: _Layout, params: list, grads: list, states: list,
              layouts: tuple | None) -> None:
    """The compiled per-tensor step of one process on the gathered tensors:
    params and present slots updated in place, started slots and the 0-d state
    written into ``states``."""
    if not _flat.flat_eligible(params):  # 16-bit or 0-d: one torch.compile graph
        fn = _flat.compiled_step(opt, values, params, states, layouts)
        new, scalars = fn(params, grads, opt._tree(layout, states))
        for p, value in zip([p for p in params if p.ndim == 0], scalars):
            p.copy_(value)
        _differentiable.write(layout, states, new, recorded=False)
        return
    present = tuple(k for _, k in layout.slots if k in states[0])
    tensors = [*params, *grads, *[st[k] for k in present for st in states]]
    structure = ("gathered", type(opt), opt._structure(values), present,
                 tuple((tuple(p.shape), p.dtype, p.device) for p in params), layouts)
    scalars = [states[0][k] for _, k, _ in layout.scalars]
    fresh, news, out = _flat._run_compiled(opt, values, layout, present, structure,
                                           len(params), layouts, tensors, scalars)
    for key, buffer in zip(fresh, news):  # slots the rule started: flat, one view per param
        for st, view in zip(states, views_of(buffer, [p.shape for p in params])):
            st[key] = view
    for (_, key, _), value in zip(layout.scalars, out):
        for st in states:
            st[key].copy_(value)
