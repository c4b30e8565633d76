"""The one state walker: a rule's state described, built, checked, flattened, restored.

A rule's state is a NamedTuple (for wrappers: NamedTuples and tuples of
them). Its leaves are of three kinds:

- a *slot*: a ``list`` with one array per parameter, described by a
  :class:`Slot` (its shape as a function of the parameter's shape and
  :class:`Layout`, its dtype policy, its initial value);
- an *empty slot*: ``[]``, a slot the rule's options switch off (AMSGrad's
  maximum without ``amsgrad``, momentum 0);
- an *array*: one array for all parameters (the step count, NAdam's
  momentum product).

Every adapter and :mod:`polyopt.interop` use the functions here, never their
own traversal: :func:`entries` flattens a state to ``(path, kind, value)``,
:func:`rebuild` restores one from a template and new leaves, :func:`pair`
walks a state against a template and refuses a foreign one with the path
of the offending leaf, :func:`check` also compares shapes and dtypes,
:func:`build` makes the slots of ``init`` from their :class:`Slot`
descriptions, :func:`select` picks between two states leaf by leaf.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from polyopt._namespace import namespace

__all__ = [
    "PARAM", "ROWS", "COLS", "SCALAR", "NONE", "STATE_DTYPES",
    "Layout", "NOT_A_MATRIX", "Slot", "Entry", "StateError",
    "out_first", "out_last", "layouts_for", "matrix_axes", "slot_shape", "build",
    "entries", "rebuild", "pair", "check", "check_leaf", "select", "path_text", "nbytes",
    "dtype_name", "is_array", "by_path", "rebuild_from", "map_arrays",
    "storage_dtype", "to_compute", "to_storage", "subset", "merge", "probe_shape", "kept_axes",
]

# --------------------------------------------------------------------------
# descriptions

PARAM = "param"  # shaped like the parameter
ROWS = "rows"  # one value per output index: the parameter with its reduction axes reduced
COLS = "cols"  # one value per input index: the parameter with its output axes reduced
SCALAR = "scalar"  # one 0-d array per parameter
NONE = "none"  # no array: the slot is switched off (an empty list)

#: dtype names a user may give as ``state_dtype`` (None: the parameter's dtype)
STATE_DTYPES = (None, "float32", "float64", "bfloat16", "float16")


class StateError(ValueError):
    """A state that does not belong to this rule or these params (names the leaf)."""


class Layout(NamedTuple):
    """Which axes of a parameter are its input (reduced over) and its output.

    torch's Linear weight (out, in) is ``Layout((1,), (0,))``, its Conv2d
    weight (out, in, kh, kw) ``Layout((1, 2, 3), (0,))``; Keras's and Flax's
    Dense kernel (in, out) is ``Layout((0,), (1,))`` and Conv kernel
    (kh, kw, in, out) ``Layout((0, 1, 2), (3,))``. A per-tensor rule sees the
    parameter as the matrix (output axes, reduction axes): the same layer
    gives the same matrix, up to a permutation of columns, in every framework.

    ``batch_axes`` (default none) make the parameter a stack of matrices, one
    per index of those axes (optax's MuonDimensionNumbers leave them unnamed and
    vmap over them): Muon orthogonalizes each matrix alone, Adafactor keeps a row
    and a column statistic per matrix, ``centralize`` averages each row alone.
    Every axis is named once, as a reduction, output or batch axis.
    """

    reduction_axes: tuple
    output_axes: tuple
    batch_axes: tuple = ()


#: The layout that says a tensor is not a matrix, whatever its axes: a per-tensor rule
#: treats it as it treats a 0-d or 1-D tensor (one row; :func:`layouts_for` keeps it: it
#: stays itself, so a checked list can be checked again): Muon steps it by its Adam,
#: Adafactor keeps its full second moment, ``centralize`` averages over all its axes.
NOT_A_MATRIX = Layout((), ())


def out_first(shape: Sequence[int]) -> Layout | None:
    """torch's default: axis 0 is the output, the others the input (None below 2-D)."""
    n = len(shape)
    return None if n < 2 else Layout(tuple(range(1, n)), (0,))


def out_last(shape: Sequence[int]) -> Layout | None:
    """Keras's and Flax's default: the last axis is the output (None below 2-D)."""
    n = len(shape)
    return None if n < 2 else Layout(tuple(range(n - 1)), (n - 1,))


def layouts_for(owner: str, params: Sequence[Any], layouts: Any,
                default: Callable = out_first, names: Sequence[str] | None = None) -> list:
    """One checked :class:`Layout` (or None for 0-d and 1-D params) per param.

    ``layouts`` is None (``default`` for every param), a list with one entry
    per param (None entries take the default), or a callable
    ``shape -> Layout``. :data:`NOT_A_MATRIX` stays (the tensor is not a
    matrix; None for a 0-d or 1-D one). A layout that does not fit its tensor (an axis out of range,
    repeated, or missing) is refused naming the tensor and shape.

    The checked layouts of the last shapes and layouts seen are kept
    (``_CHECKED``, 64 at most; not unhashable layouts, nor refusals): a step
    checks the same ones again (59 conv, norm and dense params: 95 us a
    call, 2 calls a step of Ranger's).
    """
    if layouts is None:
        layouts = [None] * len(params)
    elif callable(layouts) and not isinstance(layouts, Layout):
        layouts = [layouts(tuple(p.shape)) for p in params]
    else:
        layouts = list(layouts)
        if len(layouts) != len(params):
            raise ValueError(f"{owner}: layouts holds {len(layouts)} entries for "
                             f"{len(params)} params")
    shapes = tuple(tuple(p.shape) for p in params)
    key = (owner, shapes, tuple(layouts), default, None if names is None else tuple(names))
    try:
        hash(key)
    except TypeError:  # a layout given as lists, a shape of unknown size
        return _layouts_of(*key)
    kept = _CHECKED.get(key)
    if kept is None:
        if len(_CHECKED) >= 64:
            _CHECKED.clear()
        kept = _CHECKED[key] = tuple(_layouts_of(*key))
    return list(kept)


#: (owner, shapes, layouts, default, names) -> the checked layouts (at most 64 kept).
_CHECKED: dict = {}


def _layouts_of(owner: str, shapes: Sequence, layouts: Sequence, default: Callable,
                names: Sequence[str] | None) -> list:
    """:func:`layouts_for` of these shapes, one layout or None each."""
    out = []
    for i, (dims, layout) in enumerate(zip(shapes, layouts)):
        shape = tuple(int(d) for d in dims)
        if layout is None:
            out.append(default(shape))
            continue
        if is_not_a_matrix(layout):
            out.append(NOT_A_MATRIX if len(shape) >= 2 else None)
            continue
        name = names[i] if names is not None else f"params[{i}]"
        try:
            if len(layout) not in (2, 3):
                raise ValueError
            groups = [tuple(int(a) for a in group) for group in layout]
            reduction, output, batch = (tuple(a % len(shape) for a in group)
                                        for group in (*groups, ())[:3])
        except (TypeError, IndexError, ZeroDivisionError, ValueError):
            raise ValueError(f"{owner}: layout {layout!r} does not fit {name} of shape "
                             f"{shape}: give Layout(reduction_axes, output_axes, "
                             f"batch_axes=()), tuples of axes") from None
        axes = [a for group in groups for a in group]
        if (sorted(reduction + output + batch) != list(range(len(shape))) or not reduction
                or not output or any(not -len(shape) <= a < len(shape) for a in axes)):
            shown = tuple(groups) if batch else tuple(groups[:2])
            raise ValueError(f"{owner}: layout {shown!r} does not fit {name} of shape "
                             f"{shape}: its reduction and output axes (and batch axes) must "
                             f"split the {len(shape)} axes, each once")
        out.append(Layout(reduction, output, batch))
    return out


def is_not_a_matrix(layout: Any) -> bool:
    """Whether a layout is :data:`NOT_A_MATRIX` (None, for 0-d and 1-D tensors, is not)."""
    try:
        return len(layout) in (2, 3) and not len(layout[0]) and not len(layout[1])
    except TypeError:
        return False


def matrix_axes(layout: Layout | None, ndim: int) -> tuple[tuple, tuple]:
    """(output axes, reduction axes) of a tensor (its batch axes are neither); a 1-D
    tensor, or one whose layout is :data:`NOT_A_MATRIX`, is one row."""
    if layout is None or is_not_a_matrix(layout):
        return (), tuple(range(ndim))
    return tuple(layout.output_axes), tuple(layout.reduction_axes)


class Slot(NamedTuple):
    """One state array per parameter, described once.

    shape: :data:`PARAM`, :data:`ROWS`, :data:`COLS`, :data:`SCALAR`,
      :data:`NONE`, or a function ``(shape, layout) -> shape`` (None: no array).
    dtype: ``"param"`` (the parameter's), ``"state"`` (the user's
      ``state_dtype``, else the parameter's), or a dtype name of
      :data:`STATE_DTYPES` (that dtype whatever the params': Adafactor's
      momentum with ``momentum_dtype``); for a complex parameter the complex
      dtype of that precision, see :func:`storage_dtype`.
    init: the initial value, a number, or ``"param"`` (a copy of the parameter).
    """

    name: str
    shape: Any = PARAM
    dtype: str = "state"
    init: Any = 0.0


def slot_shape(slot: Slot, shape: Sequence[int], layout: Layout | None) -> tuple | None:
    """The shape of ``slot``'s array for a parameter of ``shape`` (None: no array)."""
    shape = tuple(int(d) for d in shape)
    kind = slot.shape
    if callable(kind):
        out = kind(shape, layout)
        return None if out is None else tuple(int(d) for d in out)
    if kind == PARAM:
        return shape
    if kind == SCALAR:
        return ()
    if kind == NONE:
        return None
    output, reduction = matrix_axes(layout, len(shape))
    batch = () if layout is None else tuple(layout.batch_axes)
    keep = (*batch, *(output if kind == ROWS else reduction))
    return tuple(shape[a] for a in sorted(keep))


def probe_shape(shape: Sequence[int]) -> tuple:
    """``shape`` with its axes made distinct in size, each as small as that allows:
    in the order of a stable sort by size, an axis not larger than the one before
    it gets that one's size + 1. The order of the sizes is kept (ties broken by
    position) and no axis shrinks, so a rule that decides by size (Adafactor's
    factoring) decides alike for the probe, and a state array made for the probe
    tells by its sizes which axes of the param it keeps (:func:`kept_axes`)."""
    out = [int(d) for d in shape]
    last = None
    for a in sorted(range(len(out)), key=lambda a: (out[a], a)):
        if last is not None and out[a] <= last:
            out[a] = last + 1
        last = out[a]
    return tuple(out)


def kept_axes(shape: Sequence[int], param_shape: Sequence[int],
              probe: Sequence[int]) -> tuple | None:
    """Which axes of its param (of ``param_shape``) a state array of ``shape``
    keeps, in order, read off ``probe``: the shape of the same state array made for
    a param of ``probe_shape(param_shape)``. None if it is not such an array (a
    placeholder, a different factoring): ``()`` for a 0-d one. Adafactor's factored
    statistics of a (kh, kw, in, out) kernel keep (3,) and (0, 1, 2) under Keras's
    layout; where the param is sharded, they are sharded along those axes."""
    probe_param = probe_shape(param_shape)
    axes = tuple(probe_param.index(d) if d in probe_param else None for d in probe)
    if len(shape) != len(probe) or None in axes or list(axes) != sorted(set(axes)):
        return None
    if tuple(int(param_shape[a]) for a in axes) != tuple(int(d) for d in shape):
        return None
    return axes


def device_of(x: Any) -> Any:
    """The device new arrays made for ``x`` go on (None: the default device).

    A JAX array that is not committed to a device (``jnp.zeros(3)``) gives
    None, so the state made for it is not committed either: jax.jit keys its
    cache on commitment, and a committed state would make the first step's
    outputs committed and compile the same step a second time. A JAX tracer
    has no device: None as well.
    """
    try:
        if getattr(x, "committed", True) is False:
            return None
        return getattr(x, "device", None)
    except Exception:  # a tracer refuses both with JAX's own error types
        return None


#: the complex dtype of each state_dtype's precision (complex params keep their
#: moments complex, as optax does; a real state_dtype names the precision)
_COMPLEX_OF = {"float32": "complex64", "float64": "complex128"}


def storage_dtype(xp, slot: Slot, param: Any, state_dtype: str | None) -> Any:
    """The dtype ``slot`` is stored in, next to ``param``.

    A complex param's slots are complex (optax keeps even the second moment
    |g|^2 in the param's complex dtype): a ``state_dtype`` or a slot's dtype
    name gives their precision, ``"float32"`` stores them as complex64 and
    ``"float64"`` as complex128; bfloat16 and float16 have no complex dtype and
    are refused.
    """
    if slot.dtype == "param" or (slot.dtype == "state" and state_dtype is None):
        return param.dtype
    name, what = ((state_dtype, f"state_dtype={state_dtype!r}") if slot.dtype == "state"
                  else (slot.dtype, f"the {slot.name} slot's dtype {slot.dtype!r}"))
    if xp.isdtype(param.dtype, "complex floating"):
        if name not in _COMPLEX_OF:
            raise TypeError(
                f"{what} cannot hold the state of a complex param (dtype {param.dtype}): "
                f"there is no complex {name}; give 'float32' (complex64 state), 'float64' "
                f"(complex128) or None")
        name = _COMPLEX_OF[name]
    return _named_dtype(xp, name, what)


def _named_dtype(xp, name: str, what: str | None = None) -> Any:
    dtype = getattr(xp, name, None)
    if dtype is None:
        raise TypeError(f"{what or name}: the arrays' namespace has no {name} "
                        f"(numpy and array_api_strict have no bfloat16)")
    return dtype


def build(owner: str, slots: Sequence[Slot], params: Sequence[Any], layouts: Sequence = (),
          state_dtype: str | None = None) -> list[list]:
    """The initial arrays of each slot, one per parameter (an empty list for NONE).

    ``layouts``: one :class:`Layout` or None per param (default: none).
    """
    xp = namespace(*params)
    layouts = list(layouts) or [None] * len(params)
    out = []
    for slot in slots:
        arrays = []
        for p, layout in zip(params, layouts):
            shape = slot_shape(slot, p.shape, layout)
            if shape is None:
                continue
            dtype = storage_dtype(xp, slot, p, state_dtype)
            if isinstance(slot.init, str):  # "param": a copy
                arrays.append(xp.astype(xp.asarray(p, copy=True), dtype))
            elif shape == tuple(p.shape):
                full = xp.full_like(p, slot.init)
                arrays.append(full if dtype == p.dtype else xp.astype(full, dtype))
            else:
                zeros = xp.zeros(shape, dtype=dtype, device=device_of(p))
                arrays.append(xp.full_like(zeros, slot.init))
        if arrays and len(arrays) != len(params):
            raise ValueError(f"{owner}: slot {slot.name} has an array for some params only")
        out.append(arrays)
    return out


def to_compute(xp, arrays: list, like: Sequence[Any]) -> list:
    """Stored slot arrays in the dtype of the math (their param's or grad's)."""
    return [a if a.dtype == g.dtype else xp.astype(a, g.dtype) for a, g in zip(arrays, like)]


def to_storage(xp, arrays: list, stored: Sequence[Any]) -> list:
    """New slot arrays back in the dtypes they were stored in."""
    return [a if a.dtype == s.dtype else xp.astype(a, s.dtype) for a, s in zip(arrays, stored)]


# --------------------------------------------------------------------------
# the walker


class Entry(NamedTuple):
    """One leaf of a state: its path (field names, tuple indices), its kind
    (``"slot"``, ``"empty"``, ``"array"``, or ``"none"`` for a None placeholder)
    and its value (a list for slots)."""

    path: tuple
    kind: str
    value: Any


def is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _children(tree: tuple) -> list:
    names = getattr(tree, "_fields", None) or range(len(tree))
    return list(zip(names, tree))


def path_text(path: tuple, root: str = "state") -> str:
    """``state.inner[0].first_moment`` for ("inner", 0, "first_moment")."""
    out = root
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def entries(state: Any, n_params: int | None = None, owner: str = "state") -> list[Entry]:
    """The leaves of a state, depth first. With ``n_params`` every slot must hold
    that many arrays."""
    out: list[Entry] = []

    def walk(tree: Any, path: tuple) -> None:
        if isinstance(tree, list):
            if not tree:
                out.append(Entry(path, "empty", tree))
                return
            if n_params is not None and len(tree) != n_params:
                raise StateError(f"{owner}: {path_text(path)} holds {len(tree)} arrays for "
                                 f"{n_params} params")
            out.append(Entry(path, "slot", tree))
        elif isinstance(tree, tuple):
            for name, child in _children(tree):
                walk(child, (*path, name))
        elif is_array(tree):
            out.append(Entry(path, "array", tree))
        elif tree is None:  # a part an adapter keeps elsewhere (e.g. a wrapped optimizer's)
            out.append(Entry(path, "none", None))
        else:
            raise StateError(f"{owner}: {path_text(path)} is not an array, a list or a "
                             f"tuple: {type(tree).__name__}")

    walk(state, ())
    return out


def rebuild(template: Any, leaves: Sequence[Any]) -> Any:
    """``template`` with its leaves (in :func:`entries` order) replaced by ``leaves``."""
    it = iter(leaves)

    def walk(tree: Any) -> Any:
        if isinstance(tree, tuple):
            children = [walk(child) for _, child in _children(tree)]
            return type(tree)(*children) if hasattr(tree, "_fields") else tuple(children)
        return next(it)

    out = walk(template)
    if next(it, _END) is not _END:
        raise ValueError("rebuild: more leaves than the template has")
    return out


_END = object()


def pair(owner: str, state: Any, template: Any, root: str = "state") -> list[tuple[Entry, Any]]:
    """Walk ``state`` along ``template``: (template entry, the state's value there).

    The containers must match (the same NamedTuple types, tuples of the same
    length, an empty slot where the template has one); the values at slots
    and arrays are returned unchecked (an adapter may hold them in its own
    form, e.g. optax's pytrees). Raises :class:`StateError` naming the path.
    """
    out: list[tuple[Entry, Any]] = []

    def fail(path: tuple, message: str) -> StateError:
        return StateError(f"{owner}: {path_text(path, root)} {message}; was the state made by "
                          f"this rule's init, for these params?")

    def walk(value: Any, tree: Any, path: tuple) -> None:
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            if type(value) is not type(tree):
                raise fail(path, f"is a {type(value).__name__}, expected a "
                                 f"{type(tree).__name__}")
            for (name, child), item in zip(_children(tree), value):
                walk(item, child, (*path, name))
        elif isinstance(tree, tuple):
            if not isinstance(value, tuple) or hasattr(value, "_fields") or len(value) != len(
                    tree):
                got = type(value).__name__ + (f" of length {len(value)}"
                                              if isinstance(value, tuple) else "")
                raise fail(path, f"must be a tuple of {len(tree)}, got a {got}")
            for (name, child), item in zip(_children(tree), value):
                walk(item, child, (*path, name))
        elif isinstance(tree, list):
            if not tree:
                if not isinstance(value, (list, tuple)) or len(value):
                    raise fail(path, "must be empty (these options keep no such slot)")
                out.append((Entry(path, "empty", tree), value))
            else:
                if isinstance(value, list) and not value:
                    raise fail(path, "is empty, expected one array per parameter")
                out.append((Entry(path, "slot", tree), value))
        elif tree is None:
            out.append((Entry(path, "none", None), value))
        else:
            if not is_array(value):
                raise fail(path, f"must be an array, got {type(value).__name__}")
            out.append((Entry(path, "array", tree), value))

    walk(state, template, ())
    return out


def dtype_name(x: Any) -> str:
    """'float32' for numpy, jax, TensorFlow (``.name``) and torch (``torch.float32``)."""
    dtype = x.dtype
    return getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]


def _shape(x: Any) -> tuple:
    return tuple(int(d) for d in x.shape)


def check_leaf(owner: str, value: Any, want: Any, where: str) -> None:
    """``value`` has ``want``'s shape and dtype, or a :class:`StateError` naming ``where``."""
    if not is_array(value):
        raise StateError(f"{owner}: {where} must be an array, got {type(value).__name__}")
    if _shape(value) != _shape(want) or dtype_name(value) != dtype_name(want):
        raise StateError(f"{owner}: {where} has shape {_shape(value)} and dtype "
                         f"{dtype_name(value)}, expected {_shape(want)} and {dtype_name(want)}; "
                         f"was the state made by this rule's init, for these params?")


def check(owner: str, state: Any, template: Any, root: str = "state") -> None:
    """``state`` has ``template``'s structure, and every array its shape and dtype."""
    for entry, value in pair(owner, state, template, root):
        where = path_text(entry.path, root)
        if entry.kind == "slot":
            if not isinstance(value, (list, tuple)) or len(value) != len(entry.value):
                got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
                raise StateError(f"{owner}: {where} holds {got} arrays for "
                                 f"{len(entry.value)} params")
            for i, (v, w) in enumerate(zip(value, entry.value)):
                check_leaf(owner, v, w, f"{where}[{i}]")
        elif entry.kind == "array":
            check_leaf(owner, value, entry.value, where)


def select(xp, condition: Any, new: Any, old: Any) -> Any:
    """``new`` where ``condition`` else ``old``, leaf by leaf (``new`` must have
    ``old``'s structure)."""
    leaves = []
    for entry, value in pair("select", new, old):
        if entry.kind == "slot":
            leaves.append([xp.where(condition, n, o) for n, o in zip(value, entry.value)])
        elif entry.kind == "array":
            leaves.append(xp.where(condition, value, entry.value))
        else:
            leaves.append(entry.value)
    return rebuild(old, leaves)


def nbytes(state: Any) -> int:
    """The bytes of every array of a state."""
    total = 0
    for entry in entries(state):
        arrays = entry.value if entry.kind == "slot" else [entry.value] if entry.kind == (
            "array") else []
        for a in arrays:
            total += math.prod(_shape(a)) * _itemsize(a)
    return total


def _itemsize(a: Any) -> int:
    size = getattr(a.dtype, "itemsize", None)
    if size is None:
        size = getattr(a, "itemsize", None) or a.element_size()
    return int(size)


def by_path(state: Any) -> dict:
    """{path: leaf} of a state (a slot's leaf is its list)."""
    return {entry.path: entry.value for entry in entries(state)}


def rebuild_from(template: Any, values: dict) -> Any:
    """``template`` with the leaf at each path taken from ``values`` ({path: leaf})."""
    return rebuild(template, [values[entry.path] for entry in entries(template)])


def map_arrays(fn: Callable, state: Any) -> Any:
    """``state`` with ``fn`` applied to every array (in slots and alone)."""
    leaves = []
    for entry in entries(state):
        if entry.kind == "slot":
            leaves.append([fn(a) for a in entry.value])
        elif entry.kind == "array":
            leaves.append(fn(entry.value))
        else:
            leaves.append(entry.value)
    return rebuild(state, leaves)


def subset(state: Any, indices: Sequence[int]) -> Any:
    """The state of the params at ``indices``: each slot's arrays at those
    positions, every other leaf (counts) as it is."""
    return rebuild(state, [[entry.value[i] for i in indices] if entry.kind == "slot"
                           else entry.value for entry in entries(state)])


def merge(parts: Sequence[tuple[Sequence[int], Any]], n_params: int) -> Any:
    """One state from the states of groups of params: ``parts`` holds
    ``(indices, state of the params at indices)`` covering every param once;
    leaves other than slots (counts) are the first part's."""
    columns = [entries(state) for _, state in parts]
    leaves = []
    for k, first in enumerate(columns[0]):
        if first.kind != "slot":
            leaves.append(first.value)
            continue
        arrays: list = [None] * n_params
        for (indices, _), column in zip(parts, columns):
            for i, a in zip(indices, column[k].value):
                arrays[i] = a
        leaves.append(arrays)
    return rebuild(parts[0][1], leaves)
