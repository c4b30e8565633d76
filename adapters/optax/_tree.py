"""Pytrees <-> the rules' lists of arrays, and the state's layout.

The core rules work on lists of arrays; their states are NamedTuples whose
list fields hold one array per parameter (or are empty). Here params,
updates and every such list become pytrees shaped like the params, so an
optax user sees ``state.first_moment`` as a tree like ``params`` (as in
optax's own ``ScaleByAdamState.mu``), and a state that belongs to other
params is refused with the path of what differs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from polyopt import rules
from polyopt.rules import _state

Tree = Any


def _paths(treedef, what: str) -> list[str]:
    """``what`` + the key path of every leaf of ``treedef``."""
    dummy = treedef.unflatten([0] * treedef.num_leaves)
    return [what + jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]


def flatten(owner: str, tree: Tree, what: str) -> tuple[list, Any]:
    """The leaves of ``tree`` as jax arrays of a floating dtype (real or complex: the
    rule refuses complex params if it does not step them), and its treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for i, leaf in enumerate(leaves):
        try:
            array = jnp.asarray(leaf)
        except TypeError:
            raise TypeError(f"{owner}: {_paths(treedef, what)[i]} must be an array, "
                            f"got {type(leaf).__name__}") from None
        if not jnp.issubdtype(array.dtype, jnp.inexact):
            raise TypeError(f"{owner}: {_paths(treedef, what)[i]} must have a real or complex "
                            f"floating dtype, got {array.dtype}")
        out.append(array)
    return out, treedef


def describe_difference(treedef, expected, what: str, expected_what: str) -> str:
    """What differs between two tree structures, by leaf path."""
    got, want = _paths(treedef, ""), _paths(expected, "")
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    parts = []
    if missing:
        parts.append(f"{what} lacks {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    if extra:
        parts.append(f"{what} has {', '.join(extra[:5])} not in {expected_what}"
                     + (" ..." if len(extra) > 5 else ""))
    if not parts:  # same paths, other containers (e.g. a tuple for a list)
        parts.append(f"{what} is {treedef}, {expected_what} is {expected}")
    return f"{what} has {treedef.num_leaves} leaves, {expected_what} {expected.num_leaves}: " + (
        "; ".join(parts))


def check_like(owner: str, leaves: list, treedef, ref_leaves: list, ref_treedef,
               what: str, ref_what: str) -> None:
    """Same structure, shapes and dtypes as the reference tree, or a ValueError naming it."""
    if treedef != ref_treedef:
        raise ValueError(f"{owner}: {what} and {ref_what} differ: "
                         + describe_difference(treedef, ref_treedef, what, ref_what))
    paths = None
    for i, (a, r) in enumerate(zip(leaves, ref_leaves)):
        if a.shape != r.shape or a.dtype != r.dtype:
            paths = paths or _paths(ref_treedef, "")
            raise ValueError(
                f"{owner}: {what}{paths[i]} has shape {a.shape} and dtype {a.dtype}, "
                f"{ref_what}{paths[i]} has shape {r.shape} and dtype {r.dtype}")


# --------------------------------------------------------------------------
# state layout: the core walker (polyopt.rules._state) with pytrees in the slots


def to_tree(state: Any, treedef, slot: Any = None) -> Any:
    """A core state with every per-parameter list made a tree shaped like the params
    (or, if given, replaced by ``slot``)."""
    leaves = []
    for entry in _state.entries(state):
        if entry.kind == "slot":
            leaves.append(treedef.unflatten(entry.value) if slot is None else slot)
        else:
            leaves.append(entry.value)
    return _state.rebuild(state, leaves)


def layout_without_arrays(rule: Any, tree: Any) -> Any:
    """The state ``rule.init`` would give, for a params tree without array leaves
    (an empty tree, or optax.tree_utils.tree_map_params's placeholder): ``tree``
    in every per-parameter slot, so that tree_map_params finds the slots."""
    return to_tree(rule.init([jnp.zeros((), jnp.float32)]), None, slot=tree)


def to_core(owner: str, state: Any, template: Any, treedef, path: str = "state") -> Any:
    """The core state from ``to_tree``'s layout, checked against ``template``
    (``jax.eval_shape`` of the rule's init on these params) by the core walker."""
    leaves = []
    for entry, value in _state.pair(owner, state, template, root=path):
        where = _state.path_text(entry.path, path)
        if entry.kind == "empty":
            leaves.append([])
        elif entry.kind == "slot":
            arrays, got = jax.tree_util.tree_flatten(value)
            if got != treedef:
                raise ValueError(f"{owner}: {where} does not match the params: "
                                 + describe_difference(got, treedef, where, "params"))
            for leaf, want, leaf_path in zip(arrays, entry.value, _paths(treedef, where)):
                if getattr(leaf, "shape", None) != want.shape or leaf.dtype != want.dtype:
                    raise ValueError(
                        f"{owner}: {leaf_path} has shape {getattr(leaf, 'shape', None)} and "
                        f"dtype {getattr(leaf, 'dtype', None)}, the params need {want.shape} "
                        f"and {want.dtype}")
            leaves.append(arrays)
        elif entry.kind == "array":
            if value.shape != entry.value.shape:
                raise ValueError(f"{owner}: {where} has shape {value.shape}, expected "
                                 f"{entry.value.shape}; was the state made by this "
                                 f"transformation's init, for these params?")
            leaves.append(value)
        else:
            leaves.append(value)
    return _state.rebuild(template, leaves)


# --------------------------------------------------------------------------
# params sharded over several devices


def _sharded(leaves: list) -> bool:
    """Whether some leaf is a concrete array placed on more than one device."""
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
        if sharding is not None and len(sharding.device_set) > 1:
            return True
    return False


def _mesh_of(leaves: list) -> Any:
    for leaf in leaves:
        if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
            return leaf.sharding.mesh
    return None


def _spec_for(kept: tuple | None, param: Any) -> Any:
    """The PartitionSpec of a state array that keeps the axes ``kept`` of ``param``
    (a NamedSharding; Adafactor's statistics keep all axes but the ones they average
    over): the param's spec on those axes; replicated if ``kept`` is None."""
    P = jax.sharding.PartitionSpec
    if kept is None:
        return P()
    spec = tuple(param.sharding.spec) + (None,) * (param.ndim - len(param.sharding.spec))
    return P(*(spec[a] for a in kept))


def _shardings(template: Any, probe: Any, leaves: list) -> Any:
    """``template`` (a core state of ShapeDtypeStructs) with a sharding in place of
    every array: a slot's array like its param's (a param-shaped one exactly, a
    reduced one along the axes it keeps, which ``probe``, the same state for params
    of distinct axis sizes (``_state.probe_shape``), tells), the others replicated."""
    mesh = _mesh_of(leaves)
    replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                  if mesh is not None else leaves[0].sharding)
    probes = _state.entries(probe)
    out = []
    for entry, probed in zip(_state.entries(template), probes, strict=True):
        if entry.kind == "slot":
            slot = []
            for array, probe_array, param in zip(entry.value, probed.value, leaves):
                if tuple(array.shape) == tuple(param.shape):
                    slot.append(param.sharding)
                elif (isinstance(param.sharding, jax.sharding.NamedSharding)
                      and param.sharding.mesh == mesh):
                    kept = _state.kept_axes(tuple(array.shape), tuple(param.shape),
                                            tuple(probe_array.shape))
                    slot.append(jax.sharding.NamedSharding(mesh, _spec_for(kept, param)))
                else:
                    slot.append(replicated)
            out.append(slot)
        elif entry.kind == "array":
            out.append(replicated)
        else:
            out.append(entry.value)
    return _state.rebuild(template, out)


def init_state(rule: Any, leaves: list, layouts: Any) -> Any:
    """``rules.init_of(rule, leaves, layouts)``; for params sharded over several
    devices, jitted with the state's shardings derived from the params' (each slot
    array placed like its param, Adafactor's factored statistics along the axes they
    keep, the step count replicated), so that no device holds more than its share.
    A state with parts of a foreign optax transformation is left to jit's placement."""
    if not _sharded(leaves):
        return rules.init_of(rule, leaves, layouts)

    def init(x):
        return rules.init_of(rule, x, layouts)

    template = jax.eval_shape(init, leaves)
    probe = jax.eval_shape(init, [jax.ShapeDtypeStruct(_state.probe_shape(p.shape), p.dtype)
                                  for p in leaves])
    try:
        shardings = _shardings(template, probe, leaves)
    except (_state.StateError, ValueError):  # a foreign part; a probe of another structure
        return jax.jit(init)(leaves)
    return jax.jit(init, out_shardings=shardings)(leaves)
