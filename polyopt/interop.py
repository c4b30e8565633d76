"""Framework-neutral optimizer state files: save in one framework, resume in another.

A rule's state is a NamedTuple of 0-d arrays (the step count, NAdam's
momentum product) and lists of arrays shaped like the params (moments, slow
weights), nested for wrappers (Lookahead's ``inner``, a chain's tuple). Every
adapter can hand its state over in that form, so one file format serves all
of them:

- an ``.npz`` archive (numpy only, no pickle) with one entry per array, keyed
  by its path in the state: ``count``, ``first_moment/<param name>``,
  ``inner/second_moment/<param name>``, ...;
- a JSON header (entry ``__polyopt__``): format version, polyopt version,
  algorithm, options, current hyperparameters, and the params' names, shapes
  and dtypes in order.

Per-parameter entries are matched by parameter name and shape when loading,
so the params may come in another order (a torch ``named_parameters()`` list
against a Keras variable list sorted differently), and a missing, extra or
reshaped parameter is a clear error, never a silent partial load.

Examples:
  >>> import io, numpy as np
  >>> from polyopt import interop, rules
  >>> rule = rules.adam(learning_rate=0.1)
  >>> params = [np.ones((2, 2)), np.zeros(3)]
  >>> state = rule.init(params)
  >>> updates, state = rule.update([np.ones((2, 2)), np.ones(3)], state, params)
  >>> buffer = io.BytesIO()
  >>> interop.save_state(buffer, state, algorithm="adam", params=params, names=["w", "b"])
  >>> _ = buffer.seek(0)
  >>> # resume with the params in the other order: matched by name
  >>> loaded = interop.load_state(buffer, rule.init([np.zeros(3), np.ones((2, 2))]),
  ...                             algorithm="adam", names=["b", "w"],
  ...                             params=[np.zeros(3), np.ones((2, 2))])
  >>> int(loaded.state.count), loaded.state.first_moment[0].round(6).tolist()
  (1, [0.1, 0.1, 0.1])
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from typing import IO, Any, NamedTuple

import numpy as np

from polyopt import _namespace, files
from polyopt.rules import _state

__all__ = ["FORMAT", "LoadedState", "StateFileError", "load_state", "read_header", "save_state"]

FORMAT = "polyopt-state/1"
_HEADER = "__polyopt__"
_PARAM = "*"  # path element standing for "one entry per parameter"


class StateFileError(ValueError):
    """A state file that cannot be read, or does not fit the optimizer it is loaded into."""


class LoadedState(NamedTuple):
    state: Any  # the rule's state, arrays in the template's namespace and dtypes
    header: dict  # algorithm, options, hyperparameters, params (names, shapes, dtypes), ...


# --------------------------------------------------------------------------
# flattening a state


def _flatten(tree: Any, path: tuple, out: dict, n_params: int) -> None:
    """Paths -> leaves, from the core walker (:mod:`polyopt.rules._state`): a slot's
    arrays are keyed ``path + (_PARAM, i)`` (named later), an empty slot
    ``path + (_PARAM,)`` with no array."""
    try:
        leaves = _state.entries(tree, n_params, owner="state file")
    except _state.StateError as exc:
        raise StateFileError(str(exc)) from None
    for entry in leaves:
        where = path + tuple(str(p) for p in entry.path)
        if entry.kind == "slot":
            for i, leaf in enumerate(entry.value):
                if not _state.is_array(leaf):
                    raise StateFileError(f"state field {'/'.join(where)}[{i}] is not an "
                                         f"array: {type(leaf).__name__}")
                out[where + (_PARAM, i)] = leaf
        elif entry.kind == "empty":
            out[where + (_PARAM,)] = None  # an empty slot: part of the layout, no entry
        else:
            out[where] = entry.value


def _rebuild(template: Any, path: tuple, take) -> Any:
    """``template`` with every array replaced by ``take(path, template's array)``."""
    leaves = []
    for entry in _state.entries(template):
        where = path + tuple(str(p) for p in entry.path)
        if entry.kind == "slot":
            leaves.append([take(where + (_PARAM, i), leaf) for i, leaf in enumerate(entry.value)])
        elif entry.kind == "empty":
            leaves.append([])
        else:
            leaves.append(take(where, entry.value))
    return _state.rebuild(template, leaves)


def _layout(flat: dict) -> list[str]:
    """The state's structure as strings: ``slot/*`` per-parameter, ``slot/[]``
    an empty slot (e.g. amsgrad off), ``count`` a single array."""
    def name(path: tuple, leaf: Any) -> str:
        if _PARAM not in path:
            return "/".join(path)
        head = "/".join(path[: path.index(_PARAM)])
        return f"{head}/[]" if leaf is None else f"{head}/*"

    return sorted({name(path, leaf) for path, leaf in flat.items()})


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch: leave autograd and the device; numpy has no bfloat16
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if _state.is_array(value) and getattr(value, "ndim", None) == 0:
        return _to_numpy(value).item()
    config = getattr(value, "config", None)  # polyopt.schedules.Schedule
    if isinstance(config, dict) and hasattr(value, "name"):
        return {"schedule": value.name, "config": _jsonable(config)}
    return {"unserializable": repr(value)}


# --------------------------------------------------------------------------
# saving


def save_state(file: str | os.PathLike | IO[bytes], state: Any, *, algorithm: str, params: list,
               names: list[str] | None = None, options: dict | None = None,
               hyperparameters: dict | None = None, framework: str | None = None) -> None:
    """Write ``state`` (any namespace) to ``file`` as a framework-neutral ``.npz``.

    Args:
      file: a path or a binary file object.
      state: the rule's state (``rule.init`` / ``rule.update`` output).
      algorithm: the rule's name (``"adam"``, ``"lookahead[radam]"``, ...):
        checked again when loading.
      params: the params the state belongs to (only shapes and dtypes are read).
      names: one unique name per param (default ``"0"``, ``"1"``, ...).
      options: the rule's construction options, stored for the record.
      hyperparameters: current run-time values (learning rate after a
        scheduler, ...), stored for the record.
      framework: where the state comes from, stored for the record.
    """
    from polyopt import __version__

    names = _check_names(names, len(params))
    flat: dict = {}
    _flatten(state, (), flat, len(params))
    arrays = {}
    for path, leaf in flat.items():
        if leaf is None:
            continue
        key = "/".join(names[p] if i > 0 and path[i - 1] == _PARAM else p
                       for i, p in enumerate(path) if p != _PARAM)
        arrays[key] = _to_numpy(leaf)
    header = {
        "format": FORMAT,
        "polyopt": __version__,
        "algorithm": algorithm,
        "framework": framework,
        "options": _jsonable(options or {}),
        "hyperparameters": _jsonable(hyperparameters or {}),
        "layout": _layout(flat),
        "params": [{"name": n, "shape": list(_shape(p)), "dtype": _dtype_name(p)}
                   for n, p in zip(names, params)],
    }
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    files.write_to(file, np.savez, **arrays)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


_dtype_name = _state.dtype_name


def _check_names(names: list[str] | None, n: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise StateFileError(f"names: {len(names)} names for {n} params")
    bad = [x for x in names if not isinstance(x, str) or not x or "/" in x]
    if bad:
        raise StateFileError(f"names must be non-empty strings without '/', got {bad[:3]!r}")
    if len(set(names)) != n:
        dupes = sorted({x for x in names if names.count(x) > 1})
        raise StateFileError(f"names must be unique, got duplicates {dupes[:5]!r}")
    return names


# --------------------------------------------------------------------------
# loading


def _open(file: str | os.PathLike | IO[bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    label = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "<file object>"
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise StateFileError(f"{label}: not a readable polyopt state file ({exc})") from exc
    if _HEADER not in arrays:
        raise StateFileError(f"{label}: no {_HEADER} header: not a polyopt state file")
    try:
        header = json.loads(arrays.pop(_HEADER).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{label}: corrupt header ({exc})") from exc
    if header.get("format") != FORMAT:
        raise StateFileError(f"{label}: format {header.get('format')!r}, expected {FORMAT!r}")
    return header, arrays


def read_header(file: str | os.PathLike | IO[bytes]) -> dict:
    """The JSON header of a state file (algorithm, options, params, ...)."""
    return _open(file)[0]


def load_state(file: str | os.PathLike | IO[bytes], template: Any, *, algorithm: str,
               params: list, names: list[str] | None = None) -> LoadedState:
    """Read a state file into the layout, namespace and dtypes of ``template``.

    Args:
      file: a path or binary file object written by :func:`save_state`.
      template: a state of the same rule for the target params, e.g.
        ``rule.init(params)``; its arrays give the namespace and dtypes of the
        result (values are converted to the template's dtypes; arrays are
        made on the namespace's default device: adapters copy them into
        their own storage).
      algorithm: must equal the file's algorithm.
      params: the target params (shapes are checked against the file's).
      names: the target params' names (default ``"0"``, ``"1"``, ...); entries
        are matched by name, so the order may differ from the saved one.

    Raises:
      StateFileError: unreadable or truncated file, another algorithm, params
        missing, extra or with other shapes, or a state layout that differs
        (e.g. saved with amsgrad, loaded without). Nothing is returned in part.
    """
    if isinstance(file, (str, os.PathLike)) and not os.path.exists(file):
        raise StateFileError(f"{os.fspath(file)}: no such state file")
    header, arrays = _open(file)
    if header["algorithm"] != algorithm:
        raise StateFileError(f"state file holds a {header['algorithm']!r} state, "
                             f"cannot load it into {algorithm!r}")
    names = _check_names(names, len(params))
    saved = {p["name"]: p for p in header["params"]}
    missing = [n for n in names if n not in saved]
    extra = [n for n in saved if n not in set(names)]
    if missing or extra:
        raise StateFileError(f"params do not match the state file: missing from the file "
                             f"{missing[:5]!r}, only in the file {extra[:5]!r}")
    reshaped = [f"{n}: file {tuple(saved[n]['shape'])}, params {_shape(p)}"
                for n, p in zip(names, params) if tuple(saved[n]["shape"]) != _shape(p)]
    if reshaped:
        raise StateFileError("params have other shapes than in the state file: "
                             + "; ".join(reshaped[:5]))

    flat: dict = {}
    _flatten(template, (), flat, len(params))
    if _layout(flat) != header["layout"]:
        only_file = sorted(set(header["layout"]) - set(_layout(flat)))
        only_template = sorted(set(_layout(flat)) - set(header["layout"]))
        raise StateFileError(f"the state layouts differ (other options?): only in the file "
                             f"{only_file!r}, only in the optimizer {only_template!r}")

    def key(path: tuple) -> str:
        return "/".join(names[p] if i > 0 and path[i - 1] == _PARAM else p
                        for i, p in enumerate(path) if p != _PARAM)

    def take(path: tuple, leaf: Any) -> Any:
        value = arrays.get(key(path))
        if value is None:
            raise StateFileError(f"state file has no entry {key(path)!r}")
        if value.shape != _shape(leaf):
            raise StateFileError(f"state entry {key(path)!r} has shape {value.shape}, "
                                 f"expected {_shape(leaf)}")
        xp = _namespace.namespace(leaf)
        return xp.astype(xp.asarray(value), leaf.dtype)

    return LoadedState(_rebuild(template, (), take), header)
