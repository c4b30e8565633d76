"""State files and native optax state import for polyopt.optax.

- :func:`export_state` / :func:`import_state`: a polyopt.optax
  transformation's state as a framework-neutral :mod:`polyopt.interop` file
  (``.npz`` + JSON header), to resume in torch
  (``polyopt.torch`` optimizers' ``import_state``), in another JAX process, or
  later in Keras. Params are named by their pytree key paths joined with
  ``"."`` (``{"dense": {"kernel": ...}}`` -> ``"dense.kernel"``, torch's
  ``named_parameters()`` spelling), so a torch module and a JAX pytree with
  the same names and shapes exchange states.
- :func:`save_checkpoint` / :func:`load_checkpoint`: any pytree (params,
  optimizer state, both) as plain ``np.savez`` of its leaves plus its
  treedef's text; loading checks it against a template (``opt.init(params)``)
  and resumes bitwise.
- :func:`import_native_state`: the state of a native ``optax.adam`` (its
  ``ScaleByAdamState``, also inside ``optax.chain``) as the state of
  ``polyopt.optax.adam``, to migrate mid-training.

Example (numpy doctests do not run here; see the README)::

    state = opt.init(params)
    ...
    polyopt.optax.interop.export_state("adam.npz", opt, state, params)
    state = polyopt.optax.interop.import_state("adam.npz", opt, params)
"""

from __future__ import annotations

import os
import zipfile
from typing import IO, Any

import jax
import numpy as np
import optax

from polyopt import files, interop
from polyopt.interop import StateFileError
from polyopt.optax import _tree

__all__ = ["export_state", "import_state", "import_native_state", "param_names",
           "save_checkpoint", "load_checkpoint", "StateFileError"]

File = str | os.PathLike | IO[bytes]


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_names(params: Any) -> list[str]:
    """The leaves' key paths joined with ``"."``: ``"dense.kernel"``, ``"layers.0.bias"``."""
    return [".".join(_key(k) for k in path) or "param"
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _info(owner: str, opt: Any) -> tuple[Any, str, dict]:
    init = getattr(opt, "init", None)
    rule, name = getattr(init, "polyopt_rule", None), getattr(init, "polyopt_name", None)
    if rule is None or name is None:
        raise TypeError(f"{owner}: opt must be a transformation made by a polyopt.optax "
                        f"factory (adam, sgd, ...), got {opt!r:.200}")
    return rule, name, init.polyopt_values


def export_state(file: File, opt: Any, state: Any, params: Any, names: list[str] | None = None,
                 hyperparameters: dict | None = None) -> None:
    """Write ``state`` (of ``opt``, for ``params``) to ``file``.

    Args:
      file: a path or binary file object.
      opt: the polyopt.optax transformation the state belongs to.
      state: its state (``opt.init``/``opt.update`` output).
      params: the params (a pytree; shapes and dtypes are read).
      names: one name per leaf (default :func:`param_names`).
      hyperparameters: extra run-time values for the header (e.g. the current
        lr of a schedule); the construction values are stored anyway.
    """
    owner = "polyopt.optax.interop.export_state"
    rule, name, values = _info(owner, opt)
    leaves, treedef = _tree.flatten(owner, params, "params")
    core = _tree.to_core(owner, state, jax.eval_shape(rule.init, leaves), treedef)
    runtime = {h for h in values if h in _RUNTIME}
    interop.save_state(
        file, core, algorithm=name, params=leaves,
        names=param_names(params) if names is None else names,
        options={k: v for k, v in values.items() if k not in runtime},
        hyperparameters={**{k: values[k] for k in runtime}, **(hyperparameters or {})},
        framework="jax")


def import_state(file: File, opt: Any, params: Any, names: list[str] | None = None) -> Any:
    """The state in ``file`` as a state of ``opt`` for ``params`` (dtypes of ``params``).

    Raises:
      StateFileError: unreadable file, another algorithm, params missing, extra
        or reshaped, or other options (e.g. amsgrad).
    """
    owner = "polyopt.optax.interop.import_state"
    rule, name, _ = _info(owner, opt)
    leaves, treedef = _tree.flatten(owner, params, "params")
    loaded = interop.load_state(file, rule.init(leaves), algorithm=name, params=leaves,
                                names=param_names(params) if names is None else names)
    return _tree.to_tree(loaded.state, treedef)


def import_native_state(opt: Any, native_state: Any, params: Any) -> Any:
    """The state of ``polyopt.optax.adam`` continuing a native ``optax.adam`` run.

    ``native_state`` is ``optax.adam(...).init``/``update``'s state (or any
    state holding exactly one ``optax.ScaleByAdamState``, such as a chain's);
    its count and moments become ``opt``'s. Build ``opt`` with the native's
    hyperparameters (``polyopt.native.PRESETS["optax.adam"]``: polyopt's
    defaults are optax's).

    Raises:
      ValueError: no or several ScaleByAdamState, opt is not adam/adamw without
        amsgrad, or the moments do not match ``params``.
    """
    owner = "polyopt.optax.interop.import_native_state"
    rule, name, values = _info(owner, opt)
    if name not in ("adam", "adamw") or values.get("amsgrad"):
        raise ValueError(f"{owner}: opt must be polyopt.optax.adam or adamw without amsgrad "
                         f"(optax.adam keeps no max of v), got {name}"
                         f"{' with amsgrad' if values.get('amsgrad') else ''}")
    found = [s for s in jax.tree_util.tree_leaves(
        native_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"{owner}: native_state must hold exactly one optax.ScaleByAdamState "
                         f"(optax.adam's state), found {len(found)}")
    native = found[0]
    leaves, treedef = _tree.flatten(owner, params, "params")
    template = opt.init(params)
    state = template._replace(count=jax.numpy.asarray(native.count, template.count.dtype),
                              first_moment=native.mu, second_moment=native.nu)
    _tree.to_core(owner, state, jax.eval_shape(rule.init, leaves), treedef, "native_state")
    return state


_TREEDEF = "__treedef__"


def save_checkpoint(file: File, tree: Any) -> None:
    """Write a pytree's leaves (``np.savez``, no pickle) and its treedef's text to ``file``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays[_TREEDEF] = np.frombuffer(str(treedef).encode(), dtype=np.uint8)
    files.write_to(file, np.savez, **arrays)


def load_checkpoint(file: File, like: Any) -> Any:
    """The pytree saved by :func:`save_checkpoint`, checked against ``like``.

    ``like`` is a tree of the same structure (e.g. ``opt.init(params)``, or
    ``(params, opt.init(params))``): the structure, every leaf's shape and
    dtype must match; the values are the file's (bitwise).

    Raises:
      StateFileError: unreadable, truncated or corrupt file, or one that does
        not match ``like`` (naming the leaf). Nothing is returned in part.
    """
    label = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "<file object>"
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StateFileError(f"{label}: not a readable checkpoint ({exc})") from exc
    leaves, treedef = jax.tree_util.tree_flatten(like)
    saved = arrays.pop(_TREEDEF, None)
    if saved is None:
        raise StateFileError(f"{label}: no {_TREEDEF} entry: not a polyopt.optax checkpoint")
    if saved.tobytes().decode(errors="replace") != str(treedef):
        raise StateFileError(f"{label}: the checkpoint's tree structure differs from like's: "
                             f"{saved.tobytes().decode(errors='replace')[:300]} vs "
                             f"{str(treedef)[:300]}")
    if len(arrays) != len(leaves):
        raise StateFileError(f"{label}: {len(arrays)} leaves, like has {len(leaves)}")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    out = []
    for i, (leaf, path) in enumerate(zip(leaves, paths)):
        value = arrays.get(f"leaf_{i}")
        want = (tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        if value is None or (value.shape, value.dtype) != want:
            got = None if value is None else (value.shape, value.dtype)
            raise StateFileError(f"{label}: leaf {path} is {got} in the checkpoint, like has "
                                 f"{want}")
        out.append(jax.numpy.asarray(value))
    return treedef.unflatten(out)


def _runtime_names() -> set[str]:
    from polyopt import hyper
    return {h.name for spec in vars(hyper).values() if isinstance(spec, hyper.Spec)
            for h in spec if h.runtime}


_RUNTIME = _runtime_names()
