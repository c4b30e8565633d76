"""Shared pieces of every rule: the Rule pair, argument checks at update time,
scalar handling, and the few bits of math more than one family uses.

Only the documented subset of the Array API standard is used (see
``polyopt/rules/__init__.py``); every function here takes its namespace from
the arrays it is given.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from polyopt._namespace import namespace
from polyopt.rules import _state

Array = Any
Params = Sequence[Array]

#: The Array API names the core (rules and schedules) calls on a namespace,
#: besides operators (+ - * / ** %, comparisons) and the attributes shape,
#: ndim, dtype and device. A namespace providing these runs every rule (the
#: Keras adapter's TensorFlow namespace is tested against this set). Of the
#: ``linalg`` extension only ``linalg.matrix_norm`` is called (Muon's 'spectral'
#: preconditioning, ``ord=2``); ``conj`` serves complex params (Muon's X X^H).
#: The combined operations of ``polyopt._namespace.fused`` are written in this
#: subset (torch's namespace runs its own kernels for them).
ARRAY_API_SUBSET = frozenset({
    "abs", "all", "asarray", "astype", "conj", "cos", "expm1", "finfo", "float32", "floor",
    "full_like", "imag", "int32", "isdtype", "isfinite", "linalg", "matmul", "matrix_transpose",
    "maximum", "mean", "minimum", "ones", "permute_dims", "pow", "real", "reshape",
    "result_type", "sqrt", "sum", "where", "zeros", "zeros_like",
})


class Rule(NamedTuple):
    """An update rule: two pure functions, and what adapters may know about it.

    ``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``,
    where params, grads and updates are lists of arrays of one namespace and
    ``new_params = [p + u for p, u in zip(params, updates)]``.

    The other fields are declared capabilities; adapters read them and never
    a rule's name:

    - ``slots``: the :class:`polyopt.rules._state.Slot` of each per-parameter
      state list, in the state's order (wrappers: their own slots only);
    - ``elementwise``: every element is treated alone, so the rule may run on
      reshaped, concatenated or sharded arrays;
    - ``uses_layout``: per-tensor math over a :class:`~polyopt.rules._state.Layout`;
      ``init`` and ``update`` then take ``layouts=`` (one Layout or None per
      param; default: the core's, output axis first);
    - ``needs_closure``: each step needs the loss re-evaluated (SAM);
    - ``eval_params``: None, or ``eval_params(params, state) -> params`` for a
      rule whose point to evaluate differs from the point it steps (Schedule-Free);
    - ``sparse``: what an element whose gradient is zero gets, for adapters
      given sparse gradients (Keras's ``tf.IndexedSlices`` and JAX ``BCOO``):
      ``"dense"`` (it may still move: momentum, weight decay, Adam's moments),
      ``"updates"`` (a zero update; the state may change everywhere: RMSprop's
      decaying average) or ``"updates_and_state"`` (a zero update and every
      slot unchanged: SGD, AdaGrad). The rule itself always runs on dense arrays;
    - ``prefix``: None, or ``(transform, rest)`` for a rule that is a per-tensor
      gradient transform followed by an elementwise rule: ``transform(grads,
      params, layouts=None) -> grads`` takes each gradient alone and keeps no
      state, ``rest`` is an elementwise Rule with this rule's state, and
      ``rest.update(transform(grads, params), state, params)`` is
      ``update(grads, state, params)`` in the same operations (Ranger's
      gradient centralization, then Lookahead over RAdam). An adapter whose
      fast path takes elementwise rules only runs ``transform`` per tensor and
      ``rest`` on that path.
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[list[Array], Any]]
    slots: tuple = ()
    elementwise: bool = True
    uses_layout: bool = False
    needs_closure: bool = False
    eval_params: Callable | None = None
    sparse: str = "dense"
    prefix: tuple | None = None


#: The values of :attr:`Rule.sparse`, from the weakest promise to the strongest.
SPARSE_LEVELS = ("dense", "updates", "updates_and_state")


def init_of(rule: Any, params: Params, layouts: Any = None) -> Any:
    """``rule.init``, given the layouts if the rule uses them."""
    if layouts is not None and getattr(rule, "uses_layout", False):
        return rule.init(params, layouts=layouts)
    return rule.init(params)


def update_of(rule: Any, grads: Params, state: Any, params: Params, layouts: Any = None):
    """``rule.update``, given the layouts if the rule uses them."""
    if layouts is not None and getattr(rule, "uses_layout", False):
        return rule.update(grads, state, params, layouts=layouts)
    return rule.update(grads, state, params)


#: The largest step count: counts are int32 and saturate here (see :func:`increment`).
COUNT_LIMIT = 2**31 - 1


def zeros_count(xp, like: Array | None = None) -> Array:
    device = None if like is None else _device(like)
    return xp.zeros((), dtype=xp.int32, device=device)


def _device(x: Array):
    return _state.device_of(x)


def check_params(owner: str, params: Params, complex_params: bool = False) -> list[Array]:
    """Check ``params`` for ``init``: a non-empty list of floating arrays (real,
    or also complex for a rule that steps complex params: ``complex_params``)."""
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise TypeError(
            f"{owner}.init: params must be a list of arrays, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError(f"{owner}.init: params must not be empty")
    xp = namespace(*params)
    for i, p in enumerate(params):
        if xp.isdtype(p.dtype, "real floating"):
            continue
        if complex_params and xp.isdtype(p.dtype, "complex floating"):
            continue
        if xp.isdtype(p.dtype, "complex floating"):
            raise TypeError(
                f"{owner}.init: params[{i}] must have a real floating dtype, got {p.dtype}: "
                f"{owner} does not support complex parameters")
        allowed = "a real or complex floating dtype" if complex_params else (
            "a real floating dtype")
        raise TypeError(f"{owner}.init: params[{i}] must have {allowed}, got {p.dtype}")
    return params


def check_update(owner: str, grads: Params, state: Any, params: Params | None,
                 slots: Sequence[Sequence[Array]] = (), method: str = "update",
                 ) -> tuple[Any, list[Array], list[Array]]:
    """Check an update's arguments before anything is computed.

    grads and params must be lists of the same length, shapes and dtypes, from
    one namespace; every list in ``slots`` (state arrays per parameter) must
    match them too. Returns (xp, grads, params). Nothing is changed on error.
    """
    where = f"{owner}.{method}"  # how messages name the call
    for what, seq in (("grads", grads), ("params", params)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(
                f"{where}: {what} must be a list of arrays, got {type(seq).__name__}"
            )
    grads, params = list(grads), list(params)
    if len(grads) != len(params):
        raise ValueError(
            f"{where}: got {len(grads)} grads for {len(params)} params"
        )
    if not grads:
        raise ValueError(f"{where}: grads must not be empty")
    xp = namespace(*grads, *params)
    for i, (g, p) in enumerate(zip(grads, params)):
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"{where}: grads[{i}] has shape {tuple(g.shape)} "
                f"but params[{i}] has shape {tuple(p.shape)}"
            )
        if g.dtype != p.dtype:
            raise TypeError(
                f"{where}: grads[{i}] has dtype {g.dtype} "
                f"but params[{i}] has dtype {p.dtype}"
            )
    for slot in slots:
        if len(slot) and len(slot) != len(params):
            raise ValueError(
                f"{where}: state holds {len(slot)} arrays per slot for "
                f"{len(params)} params; was it made by init() for other params?"
            )
        for i, (s, p) in enumerate(zip(slot, params)):
            if tuple(s.shape) != tuple(p.shape):
                raise ValueError(
                    f"{where}: state for params[{i}] has shape {tuple(s.shape)}, "
                    f"params[{i}] has shape {tuple(p.shape)}"
                )
    return xp, grads, params


def check_state(owner: str, state: Any, state_type: type) -> None:
    if not isinstance(state, state_type):
        raise TypeError(
            f"{owner}.update: state must be a {state_type.__name__} made by {owner}.init, "
            f"got {type(state).__name__}"
        )


# --------------------------------------------------------------------------
# scalars


def is_complex(xp, x: Array) -> bool:
    """Whether ``x`` has a complex floating dtype."""
    return xp.isdtype(x.dtype, "complex floating")


def real_dtype(xp, dtype: Any) -> Any:
    """The real floating dtype of ``dtype``'s precision (complex64 -> float32)."""
    if xp.isdtype(dtype, "complex floating"):
        real = xp.finfo(dtype).dtype
        return getattr(xp, real) if isinstance(real, str) else real  # torch's finfo: a name
    return dtype


def abs_sq(xp, x: Array) -> Array:
    """|x|^2, elementwise and real: x * x for real arrays (the same numbers as
    ever), re(x)^2 + im(x)^2 for complex ones (optax's ``numerics.abs_sq``)."""
    if not is_complex(xp, x):
        return x * x
    re, im = xp.real(x), xp.imag(x)
    return re * re + im * im


def plus_root(x: Array, eps_root: Any) -> Array:
    """``x + eps_root`` for a second moment x (never -0.0: a sum with a square),
    x itself when eps_root is the number 0 (the same values, one pass fewer
    where each operation is a pass: torch's eager step, a plain tf.function)."""
    if isinstance(eps_root, numbers.Number) and eps_root == 0:
        return x
    return x + eps_root


def real_part(xp, x: Array) -> Array:
    """``x`` itself when real; its real part when complex (a real statistic kept
    in a complex slot, as optax keeps its second moments for complex params)."""
    return xp.real(x) if is_complex(xp, x) else x


def is_zero(value: Any) -> bool:
    """True only for a Python/numpy number equal to 0 (an array is never 'zero')."""
    return isinstance(value, numbers.Number) and value == 0


def scalar(xp, value: Any, like: Array) -> Any:
    """``value`` ready to combine with ``like``.

    Python numbers stay Python numbers (weakly typed: they take the array's
    dtype exactly, so float64 runs keep float64 hyperparameters); 0-d arrays
    are cast to ``like``'s (real) dtype so that a float64 learning rate never
    promotes float32 params (a hyperparameter of complex params stays real).
    """
    if isinstance(value, numbers.Number):
        return float(value)
    if hasattr(value, "shape"):
        if not _same_namespace(xp, value):
            value = xp.asarray(value, device=_device(like))
        dtype = real_dtype(xp, like.dtype)
        if value.dtype != dtype:
            value = xp.astype(value, dtype)
        return value
    return value


def _same_namespace(xp, value: Any) -> bool:
    try:
        return namespace(value) is xp
    except TypeError:
        return False


def evaluate(value: Any, count: Array) -> Any:
    """A hyperparameter's value at step ``count``: calls a schedule, else returns it."""
    if callable(value) and not hasattr(value, "shape"):
        return value(count)
    return value


def step_number(xp, count: Array, like: Array) -> Array:
    """t = count + 1 (saturating, see :func:`increment`) as a float array of
    ``like``'s (real) dtype (for b ** t)."""
    return xp.astype(increment(count), real_dtype(xp, like.dtype))


def increment(count: Array) -> Array:
    """count + 1, saturating at :data:`COUNT_LIMIT` (2**31 - 1), as optax's
    ``safe_int32_increment``: an int32 count at the limit stays there instead of
    wrapping to -2**31 (a negative t would freeze bias corrections and schedules)."""
    xp = namespace(count)
    return count + xp.astype(count < COUNT_LIMIT, count.dtype)


# --------------------------------------------------------------------------
# math shared by several families


def add_l2(xp, grads: list[Array], params: list[Array], weight_decay: Any,
           mode: str = "l2") -> list[Array]:
    """g + weight_decay * p (coupled L2) in 'l2' mode; unchanged otherwise or when
    weight_decay is the number 0."""
    if mode != "l2" or is_zero(weight_decay):
        return grads
    return [g + scalar(xp, weight_decay, p) * p for g, p in zip(grads, params)]


def apply_decoupled(xp, updates: list[Array], params: list[Array], weight_decay: Any,
                    learning_rate: Any, mode: str) -> list[Array]:
    """updates - lr * weight_decay * p ('decoupled'), updates - weight_decay * p
    ('decoupled_unscaled'); unchanged in 'l2' mode or when weight_decay is 0."""
    if mode == "l2" or is_zero(weight_decay):
        return updates
    rates = learning_rate if isinstance(learning_rate, list) else [learning_rate] * len(params)
    out = []
    for u, p, lr in zip(updates, params, rates):
        rate = scalar(xp, weight_decay, p)
        if mode == "decoupled":
            rate = scalar(xp, lr, p) * rate
        # u + (-rate) p: u - rate p exactly, with the 0-d factor negated once
        # (polyopt.torch's eager replay runs it with u's quotient as one addcdiv)
        out.append(u + (-rate) * p)
    return out


def stateful_rule(name: str, state_type: type, slots: tuple, step: Callable, *,
                  learning_rate: Any, weight_decay: Any, weight_decay_mode: str,
                  state_dtype: Any = None, scalars: Callable | None = None,
                  uses_layout: bool = False, elementwise: bool = True,
                  complex_params: bool = False, sparse: str = "dense") -> Rule:
    """A Rule from its slots and its per-step math; the checks, the state's dtypes
    and weight decay are done here, once.

    ``state_type`` is a NamedTuple ``(count, *slots, *scalars)``: one list
    field per :class:`~polyopt.rules._state.Slot` of ``slots`` (built by the
    core walker; an empty list for a slot whose shape is NONE), then the
    arrays ``scalars(xp, params)`` returns (``scalars(xp, params, layouts)`` for
    a rule with ``uses_layout``). ``step(xp, grads, params,
    state, lr)`` returns ``(updates, fields, decay_lr)``, where grads already
    carry L2 decay ('l2' mode), the slots of ``state`` are in the grads'
    dtypes (``state_dtype`` storage is converted here, both ways), ``lr`` is
    the learning rate at this step, and ``decay_lr`` (a value or one per
    parameter) multiplies decoupled decay, applied to the updates afterwards.

    With ``uses_layout`` (a per-tensor rule, ``elementwise=False`` then),
    ``init`` and ``update`` take ``layouts=`` (checked by
    :func:`polyopt.rules._state.layouts_for`; default: output axis first), the
    slots are built and checked with them, and ``step`` gets them as a sixth
    argument.

    With ``complex_params`` the rule also steps complex params (as optax
    does: its real statistics, such as |g|^2, are kept in slots of the
    params' complex dtype); without, init refuses them.

    ``sparse`` is what ``step`` gives an element whose gradient is zero
    (:attr:`Rule.sparse`); weight decay moves every element, so with a
    nonzero ``weight_decay`` the rule is ``"dense"``.
    """
    n_slots = len(slots)
    if sparse not in SPARSE_LEVELS:
        raise ValueError(f"{name}: sparse must be one of {SPARSE_LEVELS}, got {sparse!r}")
    if not is_zero(weight_decay):
        sparse = "dense"

    def init(params, layouts=None):
        params = check_params(name, params, complex_params)
        xp = namespace(*params)
        lays = _state.layouts_for(f"{name}.init", params, layouts) if uses_layout else ()
        extra = () if scalars is None else scalars(xp, params, lays) if uses_layout else (
            scalars(xp, params))
        return state_type(zeros_count(xp, params[0]),
                          *_state.build(name, slots, params, lays, state_dtype), *extra)

    def update(grads, state, params, layouts=None):
        check_state(name, state, state_type)
        fields = list(state[1:1 + n_slots])
        xp, grads, params = check_update(name, grads, state, params)
        lays = _state.layouts_for(f"{name}.update", params, layouts) if uses_layout else None
        _check_slots(name, slots, fields, params, lays)
        stored = fields
        fields = [_state.to_compute(xp, f, grads) for f in fields]
        lr = evaluate(learning_rate, state.count)
        grads = add_l2(xp, grads, params, weight_decay, weight_decay_mode)
        current = state_type(state.count, *fields, *state[1 + n_slots:])
        updates, new, decay_lr = (step(xp, grads, params, current, lr, lays) if uses_layout
                                  else step(xp, grads, params, current, lr))
        new = list(new)
        for k, (slot, old) in enumerate(zip(slots, stored)):
            if old or (state_dtype is not None and slot.dtype == "state"):
                like = old if old else [
                    xp.zeros((), dtype=_state.storage_dtype(xp, slot, p, state_dtype))
                    for p in params]
                new[k] = _state.to_storage(xp, new[k], like)
        updates = apply_decoupled(xp, updates, params, weight_decay, decay_lr, weight_decay_mode)
        return updates, state_type(increment(state.count), *new)

    if not uses_layout:  # the Rule contract: only a rule using layouts takes them
        return Rule(lambda params: init(params),
                    lambda grads, state, params: update(grads, state, params),
                    slots=tuple(slots), elementwise=elementwise, sparse=sparse)
    return Rule(init, update, slots=tuple(slots), elementwise=elementwise, uses_layout=True,
                sparse=sparse)


def _check_slots(owner: str, slots: tuple, fields: list, params: list,
                 layouts: list | None = None) -> None:
    """Each non-empty slot holds one array per param, of the shape its Slot gives."""
    where = f"{owner}.update"
    for slot, field in zip(slots, fields):
        if not field:
            continue
        if len(field) != len(params):
            raise ValueError(
                f"{where}: state holds {len(field)} arrays per slot for "
                f"{len(params)} params; was it made by init() for other params?")
        for i, (s, p) in enumerate(zip(field, params)):
            want = _state.slot_shape(slot, p.shape, None if layouts is None else layouts[i])
            if want is None:  # a switched-off slot started later (momentum set at run time)
                want = tuple(p.shape)
            if tuple(s.shape) != want:
                expected = "" if want == tuple(p.shape) else f" (expected {want})"
                raise ValueError(
                    f"{where}: state for params[{i}] has shape {tuple(s.shape)}, "
                    f"params[{i}] has shape {tuple(p.shape)}{expected}")


def momentum_buffers(xp, buffers: list[Array], grads: list[Array], use_momentum: bool,
                     count: Array) -> tuple[list[Array], Any]:
    """The momentum buffers to step from, and whether this is their first step.

    A rule made with momentum 0 (a number) keeps no buffers; when momentum
    becomes non-zero later (a scheduler, rebuilt hyperparameters), buffers
    start here from zero and count as new, as torch's lazily created
    momentum_buffer does (its first value is the gradient).
    """
    if use_momentum and not buffers:
        return [xp.zeros_like(g) for g in grads], True
    return buffers, count == 0


def momentum_step(xp, direction: Array, slot: Array, momentum: Any, learning_rate: Any,
                  *, nesterov: bool, form: str, dampening: Any = 0.0,
                  first: Array | None = None) -> tuple[Array, Array]:
    """Heavy-ball momentum on one array; returns (update, new slot).

    ``direction`` is the (preconditioned) gradient. form 'buffer' keeps
    b = m*b + (1-d)*g and steps -lr*b (torch; first step b = g when d != 0);
    'velocity' keeps v = m*v - lr*(1-d)*g and steps v (Keras). Nesterov steps
    -lr*(g + m*b), or m*v - lr*g. ``first`` (a boolean array, or True) marks
    the buffer's first step.
    """
    damped = direction
    if not is_zero(dampening):
        damped = (1 - dampening) * direction
        if first is True:
            damped = direction
        elif first is not None:
            damped = xp.where(first, direction, damped)
    if form == "buffer":
        slot = momentum * slot + damped
        step = direction + momentum * slot if nesterov else slot
        return -learning_rate * step, slot
    slot = momentum * slot - learning_rate * damped
    update = momentum * slot - learning_rate * direction if nesterov else slot
    return update, slot


def per_dtype(fn: Callable[[Array], Any]) -> Callable[[Array], Any]:
    """Memoise ``fn(like)`` by ``like.dtype``: scalar work is done once per dtype,
    not once per parameter."""
    cache: dict = {}

    def get(like: Array) -> Any:
        key = like.dtype
        if key not in cache:
            cache[key] = fn(like)
        return cache[key]

    return get
