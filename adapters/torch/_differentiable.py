"""The step of ``differentiable=True``: recorded by autograd, as torch.optim's.

torch.optim's differentiable step runs with grad enabled and uses only ops
that keep the graph valid across steps, so that a loss after several steps
can be differentiated into the params, the grads, the state and tensor
hyperparameters (lr, betas, weight_decay) of the steps before. The rule is
already out of place (it returns new arrays); what the adapter must not do
is change in place a tensor that the recorded graph saved:

- the rule computes from a clone of each param (a param it reads, weight
  decay with a tensor weight_decay, is saved by the graph), and the param
  is then set, in place as torch.optim does, to the clone plus the update;
- the state's tensors are replaced by the rule's new ones (never written
  into), so the graph's saved moments stay valid, and ``optimizer.state[p]``
  holds the new, recorded, tensors;
- 0-d floating state (NAdam's mu_product) is replaced too, one tensor per
  param; counts are not differentiable and are written in place.

The per-tensor path only: the chunked eager step writes the state in place.
"""

from __future__ import annotations

from typing import Any

from polyopt.rules import _state
from polyopt.torch._common import compute_dtype


def apply(update, params: list, grads: list, state: Any) -> Any:
    """One recorded rule update on ``params`` (changed in place); returns the new state."""
    work = [p.clone() if p.dtype == compute_dtype(p.dtype) else p.float() for p in params]
    grads = [g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work)]
    updates, new_state = update(grads, state, work)
    for p, w, u in zip(params, work, updates):
        p.copy_(w + u)
    return new_state


def write(layout, states: list, new: Any, recorded: bool = True) -> None:
    """Put the new state in each param's entry: slots replaced, counts written in
    place; the other 0-d state replaced by a copy when ``recorded`` (never writing
    into a tensor autograd recorded), else written in place."""
    leaves = _state.by_path(new)
    for path, key in layout.slots:
        arrays = leaves[path]
        if len(arrays) == len(states):
            for st, a in zip(states, arrays):
                st[key] = a
    for path, key, is_count in layout.scalars:
        value = leaves[path]
        for st in states:
            if is_count or not recorded:
                st[key].copy_(value)
            else:
                st[key] = value.to(dtype=st[key].dtype, copy=True)
