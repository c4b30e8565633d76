"""State files and native state import for the polyopt.keras optimizers.

- :func:`export_state` / :func:`import_state` (also the optimizers' methods
  ``opt.export_state(file, model)`` / ``opt.import_state(file, model)``): the
  optimizer's state as a framework-neutral :mod:`polyopt.interop` file
  (``.npz`` + JSON header), to resume in torch (``polyopt.torch`` optimizers'
  ``import_state``), in JAX (``polyopt.optax.interop.import_state``) or in
  another Keras process, on any Keras backend.
- :func:`import_native_state`: the state of a native ``keras.optimizers.Adam``
  (``iterations`` and its momentums/velocities) loaded into
  ``polyopt.keras.Adam``, to migrate mid-training.

Names. Entries are matched by parameter name and shape. By default a
variable is named by its Keras path relative to the model, with ``"/"``
replaced by ``"."`` (``"sequential/dense/kernel"`` -> ``"dense.kernel"``; the
file format forbids ``"/"``; a plain list of variables keeps the full path),
which is the spelling polyopt.optax gives a pytree ``{"dense": {"kernel": ...}}``
and torch gives a submodule's parameter (``dense.weight``). Keras and torch
layers name and lay out their weights differently (a Dense ``kernel`` is
``(in, out)``, a torch Linear ``weight`` ``(out, in)``), so between Keras and
torch pass ``names=`` explicitly and variables of the same shapes.

The step count is Keras' ``optimizer.iterations``; the learning rate and the
other hyperparameters are the optimizer's own (the header keeps the saved
ones for the record). Every check (algorithm, options, names, shapes) runs
before anything is assigned: on error the optimizer is unchanged.
"""

from __future__ import annotations

import os
from typing import IO, Any

import keras
import numpy as np

from polyopt import interop
from polyopt.interop import StateFileError
from polyopt.keras._base import _numpy_dtype, step_count
from polyopt.rules import _state

__all__ = ["export_state", "import_state", "import_native_state", "algorithm",
           "variable_names", "StateFileError"]

File = str | os.PathLike | IO[bytes]


def variable_names(variables: list, model: Any = None) -> list[str]:
    """Keras variable paths with ``"/"`` replaced by ``"."``, relative to ``model``
    if given (``"sequential/dense/kernel"`` -> ``"dense.kernel"``: Keras numbers
    model names per process, ``sequential_1``, ...)."""
    prefix = f"{model.name}/" if model is not None else ""
    return [(v.path[len(prefix):] if prefix and v.path.startswith(prefix) else v.path)
            .replace("/", ".") for v in variables]


def algorithm(opt: Any) -> str:
    """The rule's name in state files: ``"adam"``, ``"lookahead[radam]"``, ..."""
    inner = getattr(opt, "_inner", None)
    if inner is not None:
        return f"{opt.spec.name}[{algorithm(inner.optimizer)}]"
    return opt.spec.name


def _variables(owner: str, opt: Any, variables_or_model: Any, names: Any) -> tuple[list, list]:
    model = None
    if isinstance(variables_or_model, keras.Model) or hasattr(variables_or_model,
                                                              "trainable_variables"):
        model = variables_or_model
        variables = list(variables_or_model.trainable_variables)
    elif isinstance(variables_or_model, (list, tuple)):
        variables = list(variables_or_model)
    else:
        raise TypeError(f"{owner}: variables_or_model must be a Keras model or a list of "
                        f"variables, got {type(variables_or_model).__name__}")
    bad = [i for i, v in enumerate(variables) if not isinstance(v, keras.Variable)]
    if bad:
        raise TypeError(f"{owner}: variables_or_model[{bad[0]}] is not a keras.Variable: "
                        f"{type(variables[bad[0]]).__name__}")
    names = variable_names(variables, model) if names is None else list(names)
    return variables, names


def _indices(owner: str, opt: Any, variables: list) -> list[int]:
    """Positions of ``variables`` among the optimizer's; all of them, each once."""
    indices = []
    for v in variables:
        try:
            indices.append(opt._get_variable_index(v))
        except (KeyError, ValueError):
            raise StateFileError(f"{owner}: variable {v.path!r} is not one the optimizer "
                                 f"was built with") from None
    n = len(opt._trainable_variables)
    if sorted(indices) != list(range(n)):
        raise StateFileError(f"{owner}: {len(variables)} variables given, the optimizer was "
                             f"built with {n}: give all of them, each once")
    return indices


def _split(opt: Any) -> tuple[dict, dict]:
    """(options, run-time hyperparameters) for the header."""
    values = dict(opt.hyperparameters)
    inner = getattr(opt, "_inner", None)
    if inner is not None:
        values = {**inner.optimizer.hyperparameters, **values}
    runtime = {"learning_rate": float(np.asarray(keras.ops.convert_to_numpy(
        opt.learning_rate)))}
    return values, runtime


def _template(opt: Any, variables: list) -> Any:
    zeros = [np.zeros(tuple(v.shape), dtype=_numpy_dtype(v.dtype)) for v in variables]
    return opt.make_rule(0.0).init(zeros)


def export_state(opt: Any, file: File, variables_or_model: Any, names: Any = None) -> None:
    """Write ``opt``'s state for ``variables_or_model`` to ``file``.

    Args:
      opt: a built polyopt.keras optimizer (it has taken a step or was built
        with ``opt.build(variables)``).
      file: a path or binary file object.
      variables_or_model: a Keras model (its ``trainable_variables``) or the
        list of variables the optimizer was built with, in any order.
      names: one name per variable (default :func:`variable_names`, relative to the model).

    Raises:
      StateFileError: the optimizer is not built, or the variables or names do
        not fit it.
    """
    owner = f"polyopt.keras.{type(opt).__name__}.export_state"
    if not opt.built:
        raise StateFileError(f"{owner}: the optimizer is not built yet (no step taken): "
                             f"call opt.build(model.trainable_variables) first")
    variables, names = _variables(owner, opt, variables_or_model, names)
    indices = _indices(owner, opt, variables)
    globals_ = [np.asarray(keras.ops.convert_to_numpy(v)) for v in opt._global_variables]
    count = np.asarray(keras.ops.convert_to_numpy(step_count(opt.iterations)))
    state = opt._rebuild(opt._template, indices, count, globals_)
    state = _numpy(state)
    options, runtime = _split(opt)
    interop.save_state(file, state, algorithm=algorithm(opt), params=variables, names=names,
                       options=options, hyperparameters=runtime,
                       framework=f"keras-{keras.backend.backend()}")


def _numpy(state: Any) -> Any:
    return _state.map_arrays(lambda a: np.asarray(keras.ops.convert_to_numpy(a)), state)


def import_state(opt: Any, file: File, variables_or_model: Any, names: Any = None) -> dict:
    """Load a state file (from any adapter) into ``opt``; returns the file's header.

    Builds ``opt`` on the variables if it is not built yet. The optimizer's
    learning rate and hyperparameters are kept (the header's
    ``hyperparameters`` hold the saved ones).

    Raises:
      StateFileError: unreadable file, another algorithm, variables missing,
        extra or reshaped, other options (e.g. amsgrad). ``opt`` is then
        unchanged (if it was not built, it stays unbuilt).
    """
    owner = f"polyopt.keras.{type(opt).__name__}.import_state"
    variables, names = _variables(owner, opt, variables_or_model, names)
    loaded = interop.load_state(file, _template(opt, variables), algorithm=algorithm(opt),
                                params=variables, names=names)
    if not opt.built:
        opt.build(variables)
    indices = _indices(owner, opt, variables)
    _assign(opt, loaded.state, indices)
    return loaded.header


def _assign(opt: Any, state: Any, indices: list[int]) -> None:
    """Assign a state (lists in the order of ``indices``) to the optimizer's variables."""
    opt.iterations.assign(int(np.asarray(state.count)))
    opt._write(state, indices, write_globals=True)


# --------------------------------------------------------------------------
# native keras.optimizers.Adam


def import_native_state(opt: Any, native: Any, variables_or_model: Any,
                        native_variables: list | None = None) -> None:
    """Load a native ``keras.optimizers.Adam``'s state into ``polyopt.keras.Adam``.

    ``native`` is the built native optimizer, ``variables_or_model`` the
    variables (or model) ``opt`` trains (built on them if needed), and
    ``native_variables`` the native's variables in the same order (default:
    the same variables, the usual case of switching optimizers mid-run). Build
    ``opt`` with the native's hyperparameters under
    ``polyopt.native.PRESETS["keras.optimizers.Adam"]``'s options
    (``epsilon=1e-7``, ``eps_placement="hat"``, ...), which reproduce Keras.

    Raises:
      ValueError: ``opt`` is not a polyopt.keras.Adam/AdamW, ``native`` is not
        a built keras.optimizers.Adam, amsgrad differs, or the variables are
        not the native's. ``opt`` is then unchanged.
    """
    owner = f"polyopt.keras.{type(opt).__name__}.import_native_state"
    if getattr(opt, "spec", None) is None or opt.spec.name not in ("adam", "adamw"):
        raise ValueError(f"{owner}: opt must be polyopt.keras.Adam or AdamW, got "
                         f"{type(opt).__name__}")
    if not isinstance(native, keras.optimizers.Adam) or isinstance(native, type(opt)):
        raise ValueError(f"{owner}: native must be a keras.optimizers.Adam (or AdamW), got "
                         f"{type(native).__name__}")
    if not native.built:
        raise ValueError(f"{owner}: the native optimizer is not built (no step taken yet)")
    mine = bool(opt.hyperparameters.get("amsgrad", False))
    if bool(native.amsgrad) != mine:
        raise ValueError(f"{owner}: the native optimizer has amsgrad={native.amsgrad!r}, this "
                         f"one amsgrad={mine!r}: the max of v would be missing or left over")
    variables, _ = _variables(owner, opt, variables_or_model, None)
    theirs = variables if native_variables is None else list(native_variables)
    if len(theirs) != len(variables) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(theirs, variables)):
        raise ValueError(f"{owner}: native_variables must have the shapes of the variables, "
                         f"got {[tuple(a.shape) for a in theirs]} for "
                         f"{[tuple(b.shape) for b in variables]}")
    try:
        positions = [native._get_variable_index(v) for v in theirs]
    except (KeyError, ValueError):
        raise ValueError(f"{owner}: the native optimizer was not built with these "
                         f"variables") from None
    if sorted(positions) != list(range(len(native._trainable_variables))):
        raise ValueError(f"{owner}: {len(variables)} variables given, the native optimizer "
                         f"has {len(native._trainable_variables)}")

    def read(v: Any, like: Any) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(v)).astype(_numpy_dtype(like.dtype))

    template = _template(opt, variables)
    state = template._replace(
        count=np.asarray(keras.ops.convert_to_numpy(step_count(native.iterations))),
        first_moment=[read(native._momentums[j], v) for j, v in zip(positions, variables)],
        second_moment=[read(native._velocities[j], v) for j, v in zip(positions, variables)])
    if mine:
        state = state._replace(max_second_moment=[read(native._velocity_hats[j], v)
                                                  for j, v in zip(positions, variables)])
    if not opt.built:
        opt.build(variables)
    _assign(opt, state, _indices(owner, opt, variables))
