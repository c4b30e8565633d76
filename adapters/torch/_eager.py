"""The eager default step of an elementwise rule: the rule, op by op, on
cache-sized pieces of the params.

A rule is a sequence of array operations, each one pass over its operands.
Run on whole tensors, every pass streams the tensor through memory (about 15
passes for Adam, against torch's 7 fused ones in its for-loop). Run on
pieces of at most :data:`CHUNK` elements, a piece's temporaries stay in the
CPU's cache, and only the params, grads and state cross memory once per
step. For a rule that declares itself ``elementwise`` (``Rule.elementwise``:
every element is treated alone) the numbers of one element do not depend on
which piece it is in, so this is the per-tensor step's arithmetic exactly,
op for op (docs/performance.md has the measurements that chose it).

Tensors of more than :data:`CHUNK` elements are split into 1-d views;
consecutive pieces share one rule call up to :data:`CALL` elements. The
params are updated in place, each state tensor is written in place
(``copy_`` into its views), and the 0-d state (counts) once, after every
piece has read the old value. Tensors that cannot be viewed flat
(non-contiguous, or a tensor subclass such as DTensor) go whole.
"""

from __future__ import annotations

from typing import Any

import torch

from polyopt.rules import _state

#: Elements per piece. 64k float32 (256 KiB per operand) keeps a step's
#: few live temporaries inside a 1-2 MiB L2 cache; larger pieces spill to L3,
#: smaller ones pay the rule's Python cost (~0.2 ms a call) too often
#: (measured: docs/performance.md).
CHUNK = 1 << 16
#: Elements per rule call (several pieces): the rule's scalar work (bias
#: corrections, counts: ~0.2 ms of 0-d tensor ops) is done once per call.
CALL = 1 << 18

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a 1-d view, or None when it has none (non-contiguous, a subclass)."""
    if type(t) not in _PLAIN or not t.is_contiguous():
        return None
    return t.view(-1)


def _pieces(params: list, grads: list, slots: list, chunk: int, call: int) -> list[list[tuple]]:
    """The rule calls of one step: lists of (param index, slice or None).

    Tensors of more than ``chunk`` elements are cut into 1-d views of
    ``chunk`` elements (where they have flat views); consecutive pieces share
    a call up to ``call`` elements. ``slots``: the present state lists (one
    tensor per param each). None as the slice means the whole tensor, as it is.
    """
    calls: list[list[tuple]] = []
    current: list[tuple] = []
    size = 0

    def add(item: tuple, n: int) -> None:
        nonlocal current, size
        if current and size + n > call:
            calls.append(current)
            current, size = [], 0
        current.append(item)
        size += n

    for i, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if (n > chunk and _flat_view(p) is not None and _flat_view(g) is not None
                and all(_flat_view(s[i]) is not None for s in slots)):
            for start in range(0, n, chunk):
                add((i, slice(start, min(n, start + chunk))), min(chunk, n - start))
        else:
            add((i, None), n)
    if current:
        calls.append(current)
    return calls


def _take(t: torch.Tensor, where: slice | None) -> torch.Tensor:
    return t if where is None else t.view(-1)[where]


def step(apply, update, layout, params: list, grads: list, states: list,
         scalars: dict, chunk: int | None = None, call: int | None = None) -> None:
    """One step of an elementwise rule on a bucket (same counts, same present slots).

    ``apply(update, params, grads, state)``: the adapter's one-call step (16-bit
    params computed in float32, params updated in place; returns the new state).
    ``scalars``: {path: value} of the bucket's 0-d state, as the rule reads it.
    ``chunk``, ``call``: elements per piece and per call (default :data:`CHUNK`,
    :data:`CALL`).
    """
    chunk = CHUNK if chunk is None else chunk
    call = CALL if call is None else call
    present = [(path, key) for path, key in layout.slots if key in states[0]]
    lists = {path: [st[key] for st in states] for path, key in present}
    new_scalars = None
    for pieces in _pieces(params, grads, list(lists.values()), chunk, call):
        leaves = {path: [] for path, _ in layout.slots}
        for path, tensors in lists.items():
            leaves[path] = [_take(tensors[i], where) for i, where in pieces]
        leaves.update(scalars)
        tree = _state.rebuild_from(layout.template, leaves)
        ps = [_take(params[i], where) for i, where in pieces]
        gs = [_take(grads[i], where) for i, where in pieces]
        new = _state.by_path(apply(update, ps, gs, tree))
        for path, key in layout.slots:
            arrays = new[path]
            if len(arrays) != len(pieces):
                continue
            for (i, where), value in zip(pieces, arrays):
                st = states[i]
                if key not in st:  # a slot the rule started (momentum set at run time)
                    st[key] = value.new_empty(params[i].shape)
                _take(st[key], where).copy_(value)
        new_scalars = new
    for path, key, _ in layout.scalars:
        value = new_scalars[path]
        for st in states:
            st[key].copy_(value)


def eligible(rule: Any) -> bool:
    """Whether the chunked step gives this rule's numbers: it declares itself
    elementwise and takes no per-tensor layouts."""
    return bool(rule.elementwise) and not rule.uses_layout
