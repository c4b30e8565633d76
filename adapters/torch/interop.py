"""State files and native state import for the torch optimizers.

- :func:`export_state` / :func:`import_state`: the optimizer's state as a
  framework-neutral :mod:`polyopt.interop` file (``.npz`` + JSON header), to
  resume in JAX (``polyopt.optax.interop.import_state``), in another torch
  process, or later in Keras. Params are named by a module's
  ``named_parameters()`` (pass the module) or by position (``"0"``, ``"1"``,
  ...); the header keeps the current hyperparameters (an lr changed by a
  scheduler) and the options.
- :func:`import_native_state`: the ``state_dict()`` of a native
  ``torch.optim.Adam``/``AdamW``/``SGD`` loaded into the matching polyopt
  optimizer, to migrate mid-training.

Both go through the optimizer's public ``state_dict``/``load_state_dict``:
everything is checked first, and on any error the optimizer is unchanged.
The ``RuleOptimizer`` methods of the same names call these functions.
"""

from __future__ import annotations

import os
from typing import IO, Any

import torch

from polyopt import interop
from polyopt.interop import StateFileError
from polyopt.rules import _state
from polyopt.torch._common import _Layout, as_count, compute_dtype

__all__ = ["export_state", "import_state", "import_native_state", "StateFileError"]

File = str | os.PathLike | IO[bytes]


def _params_and_names(opt, names) -> tuple[list, list[str] | None]:
    params = [p for g in opt.param_groups for p in g["params"]]
    if names is None:
        return params, None
    if isinstance(names, torch.nn.Module):
        by_id = {id(p): n for n, p in names.named_parameters()}
        unnamed = [i for i, p in enumerate(params) if id(p) not in by_id]
        if unnamed:
            raise StateFileError(f"names: params {unnamed[:5]} of the optimizer are not "
                                 f"parameters of the given module")
        return params, [by_id[id(p)] for p in params]
    return params, list(names)


def _rule(opt) -> tuple[Any, dict, _Layout, list[dict]]:
    """The rule of the optimizer's groups (all must share one structure)."""
    groups = [opt._values(g, f" {i}") for i, g in enumerate(opt.param_groups)]
    if len({opt._structure(v) for v in groups}) > 1:
        raise StateFileError(
            f"{opt.spec.name}: the param groups differ in options other than run-time "
            f"hyperparameters; a state file holds one rule's state")
    values = groups[0]
    layout = _Layout(type(opt).factory(**values).init([torch.zeros(1)]), type(opt).state_names)
    return type(opt).factory(**values), values, layout, groups


def _split(opt, values: dict) -> tuple[dict, dict]:
    """(options, run-time hyperparameters) in canonical names."""
    runtime = {h.name for h in opt.spec if h.runtime}
    return ({k: v for k, v in values.items() if k not in runtime},
            {k: v for k, v in values.items() if k in runtime})


def export_state(opt, file: File, names=None) -> None:
    """Write ``opt``'s state to ``file`` (a path or binary file object).

    Args:
      opt: a polyopt.torch optimizer (one rule: its groups may differ in run-time
        hyperparameters such as lr, not in options such as amsgrad).
      file: where to write the ``.npz``.
      names: a ``torch.nn.Module`` (names from ``named_parameters()``), a list of
        one name per param (in param-group order), or None (``"0"``, ``"1"``, ...).

    Raises:
      StateFileError: some params have state and others not (never stepped), the
        params' step counts differ, or the names do not fit.
    """
    params, names = _params_and_names(opt, names)
    rule, values, layout, groups = _rule(opt)
    saved = opt.state_dict()["state"]
    have = [i for i in range(len(params)) if saved.get(i)]
    if not have:
        state = rule.init([p.detach().to(compute_dtype(p.dtype)) for p in params])
    else:
        if len(have) != len(params):
            missing = sorted(set(range(len(params))) - set(have))
            raise StateFileError(f"{opt.spec.name}: params {missing[:5]} have no state yet "
                                 f"(no gradient so far), the others have: cannot export one "
                                 f"state for all")
        leaves = {}
        for path, key in layout.slots:
            present = [key in saved[i] for i in range(len(params))]
            if any(present) and not all(present):
                raise StateFileError(f"{opt.spec.name}: only some params have {key!r}")
            leaves[path] = [saved[i][key] for i in range(len(params))] if all(present) else []
        for path, key, is_count in layout.scalars:
            values_of = {float(saved[i][key]) for i in range(len(params))}
            if len(values_of) != 1:
                raise StateFileError(f"{opt.spec.name}: the params' {key!r} differ "
                                     f"({sorted(values_of)[:5]}); a state file holds one")
            value = saved[0][key]
            leaves[path] = as_count(value) if is_count else value
        state = _state.rebuild_from(layout.template, leaves)
    options, hyperparameters = _split(opt, values)
    if len(groups) > 1:
        hyperparameters["param_groups"] = [_split(opt, v)[1] for v in groups]
    interop.save_state(file, state, algorithm=opt.spec.name, params=params, names=names,
                       options=options, hyperparameters=hyperparameters, framework="torch")


def import_state(opt, file: File, names=None) -> dict:
    """Load a state file (from any adapter) into ``opt``; returns the file's header.

    The hyperparameters of ``opt``'s param groups are kept (the header's
    ``hyperparameters`` hold the saved ones: set ``group["lr"]`` from them to
    continue a schedule).

    Raises:
      StateFileError: unreadable file, another algorithm, params missing, extra
        or reshaped, other options (e.g. amsgrad). ``opt`` is then unchanged.
    """
    params, names = _params_and_names(opt, names)
    rule, values, layout, _ = _rule(opt)
    template = rule.init([torch.zeros(p.shape, dtype=compute_dtype(p.dtype)) for p in params])
    loaded = interop.load_state(file, template, algorithm=opt.spec.name, params=params,
                                names=names)
    leaves = _state.by_path(loaded.state)
    state: dict = {}
    for i in range(len(params)):
        entries = {}
        for path, key in layout.slots:
            if leaves[path]:
                entries[key] = leaves[path][i]
        for path, key, _ in layout.scalars:
            entries[key] = leaves[path]
        state[i] = entries
    _load(opt, state)
    return loaded.header


def _load(opt, state: dict) -> None:
    current = opt.state_dict()
    try:
        opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    except (TypeError, ValueError) as e:
        raise StateFileError(str(e)) from None


# --------------------------------------------------------------------------
# native torch.optim state

#: native group flags that must agree with the polyopt optimizer's
_FLAGS = ("amsgrad", "nesterov")


def import_native_state(opt, state_dict: dict) -> None:
    """Load a native ``torch.optim`` optimizer's ``state_dict()`` into ``opt``.

    For ``torch.optim.Adam``/``AdamW`` into ``polyopt.torch.Adam``/``AdamW``
    and ``torch.optim.SGD`` into ``polyopt.torch.SGD`` (the state keys are
    torch's: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    ``momentum_buffer``). Build ``opt`` with the same params (same groups,
    same order) and the native's hyperparameters (``polyopt.torch.preset``
    gives torch.optim's defaults); the hyperparameters of ``opt`` are kept.
    torch.optim.SGD counts no steps: a param with state gets ``step`` 1 (the
    count only decides whether the momentum buffer starts from the gradient,
    which a buffer that exists already did).

    Raises:
      ValueError: the groups or params differ, a native flag (amsgrad, nesterov)
        differs, ``maximize=True``, or the native state lacks (momentum 0 in
        the native) or has extra (amsgrad) entries. ``opt`` is then unchanged.
    """
    name = f"polyopt.torch.{type(opt).__name__}.import_native_state"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{name}: state_dict must be a torch optimizer's state_dict() "
                         f"with 'state' and 'param_groups'")
    native_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in native_groups] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError(f"{name}: the native optimizer has param groups of sizes "
                         f"{[len(g['params']) for g in native_groups]}, this one "
                         f"{[len(g['params']) for g in opt.param_groups]}")
    index = {}
    for i, (native, group) in enumerate(zip(native_groups, opt.param_groups)):
        if native.get("maximize", False):
            raise ValueError(f"{name}: param group {i} has maximize=True; polyopt minimizes")
        for flag in _FLAGS:
            if flag in native and flag in group and bool(native[flag]) != bool(group[flag]):
                raise ValueError(f"{name}: param group {i}: the native optimizer has "
                                 f"{flag}={native[flag]!r}, this one {flag}={group[flag]!r}")
        if "momentum" in native and "momentum" in group and (
                (native["momentum"] == 0) != (group["momentum"] == 0)):
            raise ValueError(f"{name}: param group {i}: the native optimizer has momentum="
                             f"{native['momentum']!r}, this one momentum={group['momentum']!r}: "
                             f"the momentum_buffer would be missing or left over")
        for pid in native["params"]:
            index[pid] = (i, len(index))
    layout = _rule(opt)[2]
    slot_keys = {key for _, key in layout.slots}
    required = layout.initial | {key for _, key, _ in layout.scalars}
    state = {}
    for pid, entries in state_dict["state"].items():
        if pid not in index:
            raise ValueError(f"{name}: the native state has param {pid!r}, in none of its groups")
        entries = {k: v for k, v in entries.items() if v is not None}
        if "step" not in entries:  # torch.optim.SGD: a param with state took a step
            entries["step"] = torch.tensor(1.0)
        extra = sorted(set(entries) - slot_keys - {k for _, k, _ in layout.scalars})
        missing = sorted(required - set(entries))
        if extra or missing:
            raise ValueError(
                f"{name}: the native state of param {pid} does not fit {opt.spec.name} with "
                f"these options: native only {extra}, missing in the native {missing} "
                f"(amsgrad or momentum differ?)")
        state[index[pid][1]] = entries
    current = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})
