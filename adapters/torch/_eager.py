"""The eager default step of an elementwise rule: the rule's own operations,
replayed on cache-sized pieces of the params into preallocated buffers.

A rule is a sequence of array operations, each one pass over its operands.
Run on whole tensors, every pass streams the tensor through memory (about 15
passes for Adam, against torch's 7 fused ones in its for-loop). Run on pieces
of at most :data:`CHUNK` elements, a piece's temporaries stay in the CPU's
caches, and only params, grads and state cross memory once per step.

Calling the rule once per piece costs its Python work (argument checks, the
state tree, its 0-d scalar part) hundreds of times a step, and every
operation allocates its result. So the rule is called on 1-element
stand-ins for a param, its grad and its state, and on the bucket's 0-d
state, under a ``TorchFunctionMode`` that records every torch call touching
them (:class:`_Recorder`). The calls that read only the 0-d state (bias
corrections, counts) are replayed once a step (:class:`_Plan`); the
recording is kept across steps while the rule (its hyperparameters), the
dtypes and the present slots are the same (:func:`_plan`). The other
recorded calls are replayed on every piece: the same torch functions with
the same arguments, so the same kernels and the same rounding (but for the
contraction below), with ``out=`` into a few reused scratch buffers or in
place (the Tensor method of the same kernel) where the first operand dies
there, and the new state made in place in the state tensors where nothing
reads the old value afterwards (``v * b2 + ((1 - b2) * g) * g``:
``v.mul_(b2)``, then ``v.addcmul_(g, g, value=1 - b2)``). What a bucket's
replay needs (views, pieces, buffers) is
kept across steps while its params and state are the same tensors on the
same memory (:class:`_Schedule`); the state of its small members then
lives in one flat tensor per slot, and its 0-d state (counts) in one flat
tensor per entry, whose views are the optimizer's state entries
(:func:`_consecutive`, :func:`_flat_scalar`), so that the replay reads and
writes them where they are. A ``where`` whose condition is a 0-d
boolean of the 0-d part (Lookahead's synchronisation) runs as the operand it
chooses, in a variant of the program per value (:func:`_specialized`). A
product that one addition reads (``y + x * s``, ``y + x * z``, ``y + s * (e -
y)``) runs as that addition, ``torch.add(y, x, alpha=s)``, ``addcmul``,
``lerp``: a fused multiply-add, one rounding where the rule's two operations
round twice, as XLA computes the same expressions in the other adapters; ``y +
(x * s) / z`` runs as ``addcdiv`` (:func:`_contracted`). For a rule that
declares itself ``elementwise`` (every element treated alone) the numbers of
an element do not depend on its piece, so this is the same arithmetic, bit
for bit, on pieces, gathered, whole or on the local shards of a DTensor, and
the per-tensor step's but for the contracted roundings
(tests/test_torch_eager.py; docs/performance.md has the measurements that
chose it).

A rule whose operations on the stand-ins cannot be replayed (Python control
flow on their values, results that are not tensors) is reported by
:func:`step` returning False; the adapter then runs its per-tensor step.
A DTensor param (FSDP2's ``fully_shard``, tensor parallelism) whose grad and
state are DTensors laid out as it is is replayed on its local tensors
(``to_local()``: views of the shards, written in place), the same numbers
for an elementwise rule as the whole DTensor's ops (:func:`_local`).
Other tensor subclasses, and non-contiguous tensors larger than a piece,
are replayed whole, without buffers.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections import defaultdict
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from polyopt.rules import _state
from polyopt.torch._common import entries_are, views_of

#: Elements per piece: 512k float32 (2 MiB per operand, in the L2/L3 caches);
#: smaller pieces pay the ~1 us a torch call costs too often, larger ones
#: stream from memory (measured: docs/performance.md).
CHUNK = 1 << 19
#: Tensors of at most this many elements are replayed together: their params
#: and grads gathered into one piece (the params scattered back), their state
#: kept in one flat tensor per slot, which costs less than a replay each (~15
#: torch calls of ~1 us for Adam).
SMALL = 1 << 12

_PLAIN = (torch.Tensor, torch.nn.Parameter)

#: torch functions whose results are fresh tensors (never views) and that take
#: ``out=``: a recorded call of the function or of the Tensor method of that
#: name is replayed as ``torch.<name>(..., out=buffer)``, the same kernel.
_OUT = {name: getattr(torch, name) for name in (
    "add", "sub", "mul", "div", "neg", "abs", "sqrt", "rsqrt", "exp", "expm1", "log",
    "log1p", "sign", "maximum", "minimum", "where", "clamp", "pow", "reciprocal",
    "lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not",
    "isfinite", "sin", "cos", "tanh", "floor", "square", "addcdiv", "addcmul", "lerp")}
_OUT_FUNCS = {f: name for name, f in _OUT.items()}
_OUT_FUNCS.update({getattr(torch.Tensor, name): name for name in _OUT
                   if hasattr(torch.Tensor, name)})

#: Binary operations whose Python-number operand becomes a 0-d tensor of the
#: result's dtype when recorded (the conversion torch makes at every call).
_SCALAR_OPS = (torch.add, torch.sub, torch.mul, torch.div)


def _number_operand(args: tuple, result: torch.Tensor) -> bool:
    """``(x, number)`` with x and the result of one dtype, float32 or float64
    (16-bit kernels read the number in float32, so those keep it as it is)."""
    return (len(args) == 2 and isinstance(args[1], (int, float)) and not isinstance(args[1], bool)
            and isinstance(args[0], torch.Tensor) and args[0].dtype == result.dtype
            and result.dtype in (torch.float32, torch.float64))


#: Calls on a recorded tensor that only read its metadata (the stand-in's:
#: shape (1,), the dtype and device of the real tensors).
_METADATA = frozenset({"__get__", "dim", "size", "numel", "is_floating_point", "is_complex",
                       "is_contiguous", "element_size", "__hash__", "result_type",
                       "get_device", "__len__"})


class _Untraceable(Exception):
    """The rule did something with a recorded tensor that a replay cannot repeat."""


class _Ref:
    """A recorded tensor in an argument list: variable ``index`` of the program."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Recorder(TorchFunctionMode):
    """Records the torch calls that touch the stand-ins (and what they return).

    The first ``n_pieces`` inputs are the stand-ins of a piece; any others are
    the bucket's 0-d state (counts). A call that reads a stand-in, or a result
    of one, goes to ``ops`` (replayed on every piece); a call that reads only
    the 0-d state and its results goes to ``scalar_ops`` (replayed once a step).
    """

    def __init__(self, inputs: list, n_pieces: int) -> None:
        super().__init__()
        self.tensors = list(inputs)  # variable i; kept alive so that ids stay unique
        self.index = {id(t): i for i, t in enumerate(inputs)}
        self.n_inputs = len(inputs)
        self.piece = set(range(n_pieces))  # the variables that differ between pieces
        # (function, args, kwargs, result variable, torch function taking out= or None)
        self.ops: list[tuple] = []
        self.scalar_ops: list[tuple] = []

    def _template(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and id(value) in self.index:
            return _Ref(self.index[id(value)])
        if isinstance(value, (list, tuple)) and any(
                isinstance(v, torch.Tensor) and id(v) in self.index for v in value):
            raise _Untraceable("a recorded tensor inside a list argument")
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        targs = [self._template(a) for a in args]
        tkwargs = {k: self._template(v) for k, v in kwargs.items()}
        refs = {v.index for v in (*targs, *tkwargs.values()) if isinstance(v, _Ref)}
        if not refs:
            return result  # the hyperparameters' part: a constant of the replay
        name = getattr(func, "__name__", "")
        if not isinstance(result, torch.Tensor):
            if name in _METADATA:
                return result
            raise _Untraceable(f"{name} of a recorded tensor gives {type(result).__name__}")
        on_piece = not refs.isdisjoint(self.piece)
        out = (_OUT.get(_OUT_FUNCS.get(func, "")) if on_piece and "out" not in kwargs
               else None)
        if id(result) in self.index:  # in place, or an alias (.to of the same dtype)
            index, out = self.index[id(result)], None
            if index not in self.piece and (on_piece or index < self.n_inputs and (
                    name.endswith("_") or "out" in kwargs)):
                # by a piece, or the state itself when recording (the 0-d part
                # is replayed after)
                raise _Untraceable("0-d state changed in place")
        else:
            index = len(self.tensors)
            self.tensors.append(result)
            self.index[id(result)] = index
            if on_piece:
                self.piece.add(index)
            if out is not None:
                try:  # the out= form exists for these arguments (where(c, x, 0.0) has none)
                    out(*args, **kwargs, out=torch.empty_like(result))
                except (TypeError, RuntimeError):
                    out = None
            if out is not None and out in _SCALAR_OPS and _number_operand(args, result):
                # x * 0.9: torch casts the Python number to x's dtype (a 0-d
                # tensor made per call, ~1.5 us); made once here, the same value
                targs[1] = torch.tensor(args[1], dtype=result.dtype, device=result.device)
        (self.ops if on_piece else self.scalar_ops).append((func, targs, tkwargs, index, out))
        return result


#: The in-place additions a product contracts into (the param's ``p.add_(u)``);
#: out of place: ``add`` and ``sub`` (:data:`_OUT`).
_FUSED_IN_PLACE = {torch.Tensor.add_: "add", torch.Tensor.sub_: "sub"}
#: The keyword arguments that take a Python number (a 0-d part's value is read
#: on the host for them).
_NUMBERS = ("alpha", "value")


def _makers(ops: list, n_inputs: int) -> tuple[dict, dict]:
    """(variable -> the op making it, variable -> the ops writing it in place
    later: those whose result is an input or an earlier variable)."""
    made, writes = {}, defaultdict(list)
    for j, (_, _, _, index, _) in enumerate(ops):
        if index < n_inputs or index in made:
            writes[index].append(j)
        else:
            made[index] = j
    return made, writes


def _contracted(rec: _Recorder, ops: list, outputs: list) -> list:
    """``ops`` with each sum (or difference) of a product as one operation, a
    fused multiply-add, when every intermediate result is read there only (s a
    0-d value: a constant or the 0-d part's; x, y, z, e piece variables of the
    result's dtype, float32 or float64):

    ========================  ===============================
    ``y + x * s``, ``y - x * s``  ``torch.add(y, x, alpha=s)``, ``sub``
    ``y + (x * s) * z``         ``torch.addcmul(y, x, z, value=s)``
    ``y + x * z``               ``torch.addcmul(y, x, z)``
    ``y + s * (e - y)``         ``torch.lerp(y, e, s)`` (s a constant in [0, 0.5))
    ``y + (x * s) / z``         ``torch.addcdiv(y, x, z, value=s)``
    ========================  ===============================

    (in place for ``y.add_(...)``: the param's update). torch's CPU kernels
    compute the first four as one fused multiply-add (one rounding where the
    rule's operations round twice), in their vectorised and scalar loops alike,
    so an element's result does not depend on where the piece begins; XLA
    contracts the same expressions in polyopt.optax and polyopt.keras.
    ``addcdiv`` rounds as the three operations do (a quotient is no product),
    so it only saves passes. A constant ``s`` becomes the Python number it
    holds; one of the 0-d part's is read on the host once a step
    (:meth:`_Program.bound`).
    """
    readers = defaultdict(list)
    for j, (_, args, kwargs, _, _) in enumerate(ops):
        for v in (*args, *kwargs.values()):
            if isinstance(v, _Ref):
                readers[v.index].append(j)
    made, writes = _makers(ops, rec.n_inputs)
    dropped, replaced = set(), {}

    def piece(v: Any, like: torch.Tensor) -> bool:
        return (isinstance(v, _Ref) and v.index in rec.piece
                and rec.tensors[v.index].dtype == like.dtype
                and rec.tensors[v.index].shape == like.shape)

    def scalar(v: Any, like: torch.Tensor) -> Any:
        """The number that 0-d ``v`` gives (a _Ref: the 0-d part's), or None."""
        t = rec.tensors[v.index] if isinstance(v, _Ref) else v
        if (not isinstance(t, torch.Tensor) or t.ndim != 0 or t.dtype != like.dtype
                or (isinstance(v, _Ref) and v.index in rec.piece)):
            return None
        return v if isinstance(v, _Ref) else t.item()

    def made_by(v: Any, j: int, name: str) -> tuple | None:
        """(the op making it, its two arguments) when variable ``v``, read by op
        ``j`` only, is made by the two-argument ``name`` (not contracted)."""
        if not isinstance(v, _Ref) or v.index not in made or v.index in outputs:
            return None
        i = made[v.index]
        func, args, kwargs, _, _ = ops[i]
        if (readers[v.index] != [j] or i in replaced or _OUT_FUNCS.get(func) != name
                or kwargs or len(args) != 2):
            return None
        return i, args

    def unwritten(x: _Ref, i: int, j: int) -> bool:
        """Variable ``x`` is not written in place between ops ``i`` and ``j``."""
        return not any(i < w < j for w in writes[x.index])

    def product(v: Any, j: int, like: torch.Tensor) -> tuple | None:
        """(the op making it, x, s) when variable ``v``, read by op ``j`` only,
        is ``x * s`` and x is not written in place before op ``j``."""
        found = made_by(v, j, "mul")
        if found is None:
            return None
        i, args = found
        for x, s in (args, args[::-1]):
            number = scalar(s, like)
            if piece(x, like) and number is not None and unwritten(x, i, j):
                return i, x, number
        return None

    def divided(y: _Ref, t: Any, j: int, like: torch.Tensor, sub: bool) -> tuple | None:
        """As :func:`fused`, for ``y + (x * s) / z`` (``addcdiv``)."""
        found = made_by(t, j, "div")
        if found is not None:
            k, (numerator, z) = found
            inner = product(numerator, k, like)
            if (inner is not None and piece(z, like) and unwritten(z, k, j)
                    and unwritten(inner[1], inner[0], j)):
                return (inner[0], k), "addcdiv", [y, inner[1], z], {"value": inner[2]}
        return None

    def fused(y: _Ref, t: Any, j: int, like: torch.Tensor, sub: bool) -> tuple | None:
        """(the ops it replaces, the function's name, args, kwargs) of the one
        operation computing ``y + t`` (``y - t`` if ``sub``) at op ``j``, or None."""
        found = product(t, j, like)
        if found is not None:
            i, x, s = found
            diff = None if sub else made_by(x, i, "sub")
            if (diff is not None and isinstance(s, float) and 0 <= s < 0.5
                    and isinstance(diff[1][1], _Ref) and diff[1][1].index == y.index
                    and piece(diff[1][0], like)
                    and unwritten(diff[1][0], diff[0], j) and unwritten(y, diff[0], j)):
                return (diff[0], i), "lerp", [y, diff[1][0], s], {}
            return (i,), "sub" if sub else "add", [y, x], {"alpha": s}
        if sub:
            return None
        found = made_by(t, j, "mul")
        if found is not None and all(piece(a, like) for a in found[1]):
            k, (a, b) = found
            if not (unwritten(a, k, j) and unwritten(b, k, j)):
                return None
            for a_, b_ in ((a, b), (b, a)):
                inner = product(a_, k, like)
                if inner is not None and unwritten(inner[1], inner[0], j):
                    return (inner[0], k), "addcmul", [y, inner[1], b_], {"value": inner[2]}
            return (k,), "addcmul", [y, a, b], {}
        return None

    for j, (func, args, kwargs, index, _) in enumerate(ops):
        name = _FUSED_IN_PLACE.get(func) or _OUT_FUNCS.get(func)
        result = rec.tensors[index]
        if (kwargs or len(args) != 2 or name not in ("add", "sub")
                or result.dtype not in (torch.float32, torch.float64)):
            continue
        y, b = args
        hit = None
        in_place = func in _FUSED_IN_PLACE  # into y: the sum's operands keep their places
        orders = ((y, b),) if name == "sub" or in_place else ((y, b), (b, y))
        # a quotient first: x * s + (a * c) / z is a product and addcdiv, one
        # pass fewer than the quotient and a fused multiply-add
        candidates = [] if name == "sub" else [(divided, y_, t) for y_, t in orders]
        candidates += [(fused, y_, t) for y_, t in orders]
        for how, y_, t in candidates:
            if piece(y_, result) and (hit := how(y_, t, j, result, name == "sub")):
                break
        if hit is None:
            continue
        drop, fname, fargs, fkwargs = hit
        dropped.update(drop)
        f = getattr(torch.Tensor, fname + "_") if in_place else _OUT[fname]
        replaced[j] = (f, fargs, fkwargs, index, None if in_place else f)
    return [replaced.get(j, op) for j, op in enumerate(ops) if j not in dropped]


def _live(ops: list, outputs: list) -> list:
    """``ops`` without those whose result nothing reads and that write nothing
    (a rule's ``count == 0`` that only its other branch used): each would be
    one more call at every step."""
    needed, kept = set(outputs), []
    for op in reversed(ops):
        func, args, kwargs, index, _ = op
        name = getattr(func, "__name__", "")
        if index in needed or "out" in kwargs or name.endswith("_") and name[-2:] != "__":
            kept.append(op)
            needed.update(v.index for v in (*args, *kwargs.values()) if isinstance(v, _Ref))
    return kept[::-1]


class _Program:
    """A recorded step as one generated Python function over the variables.

    ``run(constants, *inputs, *buffers, *direct)``: ``inputs`` the values of
    the variables ``inputs`` (a range of indices; ``targets``: the input
    variable each output replaces, or None; ``written`` and ``direct_inputs``
    are positions among the inputs), ``buffers`` the scratch views (or None:
    fresh results), ``direct`` the state tensors that ops write into (or
    None); returns the value of each output. ``constants`` begins with the
    values of the variables ``dynamic`` (computed once a step by the 0-d
    part's program, :meth:`bound`).
    """

    _CODE: dict = {}  # source -> code object (the same rule compiles once)

    def __init__(self, rec: _Recorder, ops: list, inputs: range, outputs: list, targets: list,
                 dynamic: tuple = ()) -> None:
        ops = _live(_contracted(rec, ops, outputs), outputs)
        first, n_inputs = inputs.start, len(inputs)
        last = {}  # variable -> index of the last op reading it
        readers = defaultdict(list)
        for j, (_, args, kwargs, _, _) in enumerate(ops):
            for v in (*args, *kwargs.values()):
                if isinstance(v, _Ref):
                    last[v.index] = j
                    readers[v.index].append(j)
        end = len(ops)
        for v in outputs:
            last[v] = end
        maker = {index: j for j, (_, _, _, index, out) in enumerate(ops) if out is not None}

        def in_place(j: int):
            """The Tensor method running op ``j`` in place on its first argument
            (a piece of the result's dtype), or None."""
            func, args, _, index, out = ops[j]
            if out is None or not args or not isinstance(args[0], _Ref):
                return None
            a = rec.tensors[args[0].index]
            if a.dtype != rec.tensors[index].dtype or a.shape != rec.tensors[index].shape:
                return None
            return getattr(torch.Tensor, _OUT_FUNCS[out] + "_", None)

        # an output made by a chain of operations that begins with the old
        # state (m * b1 + g * (1 - b1)): the chain runs in place on the state
        # tensor when nothing reads the old state after the chain's first
        # operation, every reader of it makes a fresh result (no views), and
        # each link is read by the next one only
        methods = {}  # op index -> the Tensor method running it in place
        self.chained = []  # the outputs made in place in their state tensors
        for k, (v, t) in enumerate(zip(outputs, targets)):
            j = maker.get(v)
            if t is None or v == t or j is None:
                continue
            chain = []
            while (method := in_place(j)) is not None and j not in methods:
                chain.append((j, method))
                a = ops[j][1][0].index
                if a == t:
                    if all(r <= j and ops[r][4] is not None for r in readers[t]):
                        methods.update(chain)
                        self.chained.append(k)
                    break
                i = maker.get(a)
                if i is None or set(readers[a]) != {j} or a in outputs:
                    break
                j = i
        # an output written straight into its state tensor: by the op making
        # it, with out=, when every reader of the old state uses out= too (no
        # views) and comes no later
        direct = {}  # op index -> position in the direct list
        self.direct_inputs = []
        self.copies = []  # the outputs a piece's replay copies into the state
        self.changed = []  # the outputs that are not an input as it was
        # the inputs changed in place (the param: p.add_(update))
        self.written = sorted({index - first for func, _, kwargs, index, _ in ops
                               if first <= index < first + n_inputs
                               and (getattr(func, "__name__", "").endswith("_")
                                    or "out" in kwargs)})
        for k, (v, t) in enumerate(zip(outputs, targets)):
            if v == t:  # the state unchanged
                continue
            self.changed.append(k)
            if k in self.chained:
                continue
            j = maker.get(v)
            if (t is None or j is None or j in direct
                    or any(ops[r][4] is None or r > j for r in readers[t])):
                self.copies.append(k)
                continue
            direct[j] = len(self.direct_inputs)
            self.direct_inputs.append(t - first)
        # scratch buffers for the other out= results, reused once read for the
        # last time; an op whose first argument dies there takes its buffer and
        # runs in place
        free: dict = defaultdict(list)
        self.buffers: list = []  # dtype of each buffer
        holder = {}  # variable -> buffer
        assign = {}  # op index -> buffer
        for j, (_, args, kwargs, index, out) in enumerate(ops):
            before = holder.get(args[0].index) if args and isinstance(args[0], _Ref) else None
            for v in {a.index for a in (*args, *kwargs.values()) if isinstance(a, _Ref)}:
                if last.get(v) == j and v in holder:
                    free[rec.tensors[v].dtype].append(holder.pop(v))
            if out is None or j in direct or j in methods:
                continue
            dtype = rec.tensors[index].dtype
            pool = free[dtype]
            if before in pool and in_place(j) is not None:
                pool.remove(before)
                assign[j] = holder[index] = before
                methods[j] = in_place(j)
            else:
                if not pool:
                    pool.append(len(self.buffers))
                    self.buffers.append(dtype)
                assign[j] = holder[index] = pool.pop()
            if index not in last:  # never read: free again at once
                pool.append(holder.pop(index))
        # the source
        constants: list = []

        def const(value: Any) -> str:
            constants.append(value)
            return f"c{len(constants) - 1}"

        def arg(value: Any) -> str:
            return f"v{value.index}" if isinstance(value, _Ref) else const(value)

        n_buf, n_dir = len(self.buffers), len(self.direct_inputs)
        params = ([f"v{i}" for i in inputs] + [f"b{i}" for i in range(n_buf)]
                  + [f"d{i}" for i in range(n_dir)])
        body = []
        numbers: list = []  # the 0-d part's values an alpha= reads, as Python numbers
        for j, (func, args, kwargs, index, out) in enumerate(ops):
            items = [arg(a) for a in args] + [
                f"{k}=n{v.index}" if k in _NUMBERS and isinstance(v, _Ref) else f"{k}={arg(v)}"
                for k, v in kwargs.items()]
            for k in _NUMBERS:
                number = kwargs.get(k)
                if isinstance(number, _Ref) and dynamic.index(number.index) not in numbers:
                    numbers.append(dynamic.index(number.index))
            if j in methods:
                body.append(f"    v{index} = {const(methods[j])}({', '.join(items)})")
                continue
            if j in direct:
                items.append(f"out=d{direct[j]}")
            elif j in assign:
                items.append(f"out=b{assign[j]}")
            body.append(f"    v{index} = {const(out or func)}({', '.join(items)})")
        head = f"def run(C, {', '.join(params)}):\n"
        names = ([f"v{v}" for v in dynamic] + [f"n{dynamic[k]}" for k in numbers]
                 + [f"c{i}" for i in range(len(constants))])
        unpack = f"    ({''.join(f'{name}, ' for name in names)}) = C\n"
        returns = f"    return ({''.join(f'v{v}, ' for v in outputs)})\n"
        source = head + unpack + "\n".join(body) + "\n" + returns
        code = self._CODE.get(source)
        if code is None:
            code = self._CODE[source] = compile(source, "<polyopt eager step>", "exec")
        scope: dict = {}
        exec(code, scope)  # noqa: S102 - our own generated source
        self.run = scope["run"]
        self.constants = tuple(constants)
        self.dynamic = tuple(dynamic)
        self.numbers = tuple(numbers)

    def bound(self, values: tuple) -> _Program:
        """This program with ``values`` for its ``dynamic`` variables (those an
        ``alpha=`` reads also as Python numbers, read on the host)."""
        if not self.dynamic:
            return self
        bound = copy.copy(self)
        bound.constants = (values + tuple(values[k].item() for k in self.numbers)
                           + self.constants)
        return bound


_SCRATCH = threading.local()


def _scratch(dtypes: list, n: int, device, use: str = "ops") -> list:
    """One buffer of ``n`` elements per entry of ``dtypes``, reused across steps."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    out, used = [], defaultdict(int)
    for dtype in dtypes:
        key = (use, device, dtype, used[dtype])
        used[dtype] += 1
        buf = cache.get(key)
        if buf is None or buf.numel() < n:
            buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
        out.append(buf[:n])
    return out


def step(apply, update, layout, params: list, grads: list, states: list,
         scalars: dict, chunk: int | None = None, kept: dict | None = None,
         centers: dict | None = None) -> bool:
    """One step of an elementwise rule on a bucket (same counts, same present
    slots); False (and nothing changed) when the rule cannot be replayed.

    ``apply(update, params, grads, state)``: the adapter's one-call step (16-bit
    params computed in float32, params updated in place; returns the new state).
    ``scalars``: {path: value} of the bucket's 0-d state, as the rule reads it.
    ``chunk``: elements per piece (default :data:`CHUNK`). ``kept``: a dict
    owned by the optimizer, where the bucket's schedules are kept for its next
    step (:class:`_Schedule`), whose state entries may become views of flat
    tensors (:func:`_consecutive`, :func:`_flat_scalar`); None: ``states``
    are a step's own (views of the optimizer's), nothing is kept or moved.
    ``centers``: the centerings a per-tensor prefix left to the replay
    (:func:`polyopt._namespace.deferred_centering`; plain tensors only).
    """
    if torch.is_grad_enabled():  # differentiable=True: out= does not record autograd
        return False
    chunk = CHUNK if chunk is None else chunk
    present = [(path, key) for path, key in layout.slots if key in states[0]]
    shards = _local(params, grads, states, present)
    if shards is not None:
        params, grads, states = shards[:3]  # the same local tensors at every step (no_grad)
    # the thread too: a schedule holds views of its thread's scratch buffers
    signature = (update, layout, chunk, threading.get_ident(), tuple(present))
    tensors = [*params, *(st[key] for st in states for _, key in present)]
    seen = (*signature, *map(id, tensors), *map(torch.Tensor.data_ptr, tensors))
    bucket = tuple(map(id, params))
    last = None if kept is None else kept.get(bucket)
    if last is not None and last[0] == seen:
        groups = last[1]
    else:
        by_kinds = defaultdict(list)  # one recording per combination of dtypes
        for i, (p, g) in enumerate(zip(params, grads)):
            kinds = (p, g, *(states[i][key] for _, key in present))
            by_kinds[tuple((t.dtype, t.device) for t in kinds)].append(i)
        # [kinds, members, plan, {variant: schedule}, {member: centered grad buffer}]
        groups = [[kinds, members, None, {}, {}] for kinds, members in by_kinds.items()]
    plans = []
    for group in groups:
        kinds, members, plan, schedules, _ = group
        now = _plan(apply, update, layout, present, scalars, kinds)
        if now is None:
            return False
        if now is not plan:
            group[2:4] = now, {}
        plans.append((group, *now.now(scalars)))
    for group, variant, program, _ in plans:
        kinds, members, plan, schedules, centered = group
        schedule = schedules.get(variant)  # one per variant of the program
        if schedule is None:
            for i in members:  # a slot the rule starts (momentum set at its first step)
                p = params[i]
                for key, dtype in plan.started:  # a DTensor's laid out as it is
                    states[i][key] = (torch.empty(p.shape, dtype=dtype, device=p.device)
                                      if type(p) in _PLAIN else torch.empty_like(p, dtype=dtype))
            schedule = _Schedule(program, plan.outputs, params, states, present, members,
                                 chunk, kept is not None and shards is None, centered,
                                 grad_dtype=kinds[1][0])
            if not plan.started:
                schedules[variant] = schedule
                seen = None  # it may have moved state into flat tensors (_consecutive)
        schedule.run(program, grads, centers)
    if shards is not None:
        _wrap_started(shards[3], states,
                      {key for group, *_ in plans for key, _ in group[2].started})
        # the replay changed the local tensors in place; the DTensor params
        # keep version counters of their own, which their in-place ops move
        torch.autograd.graph.increment_version([p for p, _ in shards[3].values()])
    new_scalars = plans[-1][3]
    flats = {} if last is None else last[2]
    for path, key, _ in layout.scalars:
        if kept is not None and shards is None and _flat_scalar(flats, states, key):
            flats[key][0].copy_(new_scalars[path])
        else:
            torch._foreach_copy_([st[key] for st in states], [new_scalars[path]] * len(states))
    if kept is not None:
        if seen is None:
            tensors = [*params, *(st[key] for st in states for _, key in present)]
            seen = (*signature, *map(id, tensors), *map(torch.Tensor.data_ptr, tensors))
        kept[bucket] = (seen, groups, flats)
        kept.setdefault(None, set()).add(bucket)
    return True


def _flat_scalar(flats: dict, states: list, key: str) -> bool:
    """Whether the bucket's 0-d entries ``key`` are the 0-d views of one flat
    tensor, ``flats[key] = (flat, views)``: kept from its last step, or made
    now (they then replace the entries, as the compiled path keeps its
    counts), so that one copy writes the new value of every member and
    :func:`flat_scalars` reads them without a stack; False (nothing changed)
    when the entries are not 0-d tensors of one dtype and device."""
    built = flats.get(key)
    if built is not None and entries_are(states, key, built[1]):
        return True
    first = states[0][key]
    if not all(type(st[key]) in _PLAIN and st[key].ndim == 0 and st[key].dtype == first.dtype
               and st[key].device == first.device for st in states):
        return False
    flat = torch.empty(len(states), dtype=first.dtype, device=first.device)
    views = flat.unbind()
    for st, view in zip(states, views):
        st[key] = view
    flats[key] = (flat, views)
    return True


def flat_scalars(kept: dict, params: list, states: list) -> dict | None:
    """{key: flat tensor} of the 0-d state of the bucket of exactly these
    params, when every entry is still a view of it (its last :func:`step`
    made them so, :func:`_flat_scalar`); else None."""
    last = kept.get(tuple(map(id, params)))
    if last is None or not last[2]:
        return None
    if not all(entries_are(states, key, views) for key, (_, views) in last[2].items()):
        return None
    return {key: flat for key, (flat, _) in last[2].items()}


def forget_unused(kept: dict) -> None:
    """Drop the schedules of buckets that :func:`step` did not use since the
    last call (the optimizer's params regrouped: they would keep the memory of
    replaced tensors alive)."""
    used = kept.pop(None, set())
    for key in [k for k in kept if k not in used]:
        del kept[key]


def _local(params: list, grads: list, states: list, present: list) -> tuple | None:
    """The DTensor members of a bucket as their local tensors: ``(params,
    grads, states, originals)``, where ``states`` are per-param dicts holding
    the slots' local tensors (the 0-d state entries the same objects) and
    ``originals`` maps a member's index to (its DTensor param, its state
    dict); None when no member is a DTensor.

    A DTensor member is taken locally when its grad and every present slot
    are DTensors of its mesh, placements and local shape, and no placement is
    Partial (pending sums, which an elementwise rule cannot take term by
    term): then element i of every local tensor is the same element of the
    whole tensors, so an elementwise rule's numbers are those of the whole
    DTensor's ops, replicated or sharded. Other members stay as they are.
    """
    module = sys.modules.get("torch.distributed.tensor")  # none exists before its import
    if module is None:
        return None
    dtensor = module.DTensor
    params, grads, states = list(params), list(grads), list(states)
    originals = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if type(p) is not dtensor:
            continue
        tensors = (g, *(st[key] for _, key in present))
        if not all(type(t) is dtensor and t.device_mesh == p.device_mesh
                   and t.placements == p.placements for t in tensors):
            continue
        if any(pl.is_partial() for pl in p.placements):
            continue
        local = p.to_local()
        locals_ = [t.to_local() for t in tensors]
        if any(t.shape != local.shape for t in locals_):
            continue
        originals[i] = (p, st)
        params[i], grads[i] = local, locals_[0]
        states[i] = {**st, **{key: t for (_, key), t in zip(present, locals_[1:])}}
    return None if not originals else (params, grads, states, originals)


def _wrap_started(originals: dict, states: list, started: set) -> None:
    """The slots the rule started on local tensors become DTensors laid out as
    their params, in the params' own state dicts."""
    if not started:
        return
    dtensor = sys.modules["torch.distributed.tensor"].DTensor
    for i, (p, st) in originals.items():
        for key in started & states[i].keys():
            st[key] = dtensor.from_local(states[i][key], p.device_mesh, p.placements,
                                         run_check=False, shape=p.shape, stride=p.stride())


#: Recordings kept across steps: (update, layout, present slots, dtypes and
#: devices of the stand-ins and of the 0-d state) -> (update, layout, _Plan,
#: or None when the rule's 0-d part cannot be replayed). A rule is one set of
#: hyperparameter values (the adapter makes a new one when a value changes:
#: lr set by a scheduler, a tensor hyperparameter, which may change in place,
#: at every step), so a recording is reused only while they are unchanged.
_PLANS: dict = {}
#: At most this many recordings are kept (then all are dropped).
_KEPT = 64


class _Plan:
    """A recorded step: ``program`` replayed on the pieces, ``scalar_program``
    (the 0-d part: bias corrections, counts) run once a step on the bucket's
    0-d state at ``scalar_paths``; ``started``: (key, dtype) of the slots the
    rule starts; ``outputs``: the state key of each output of ``program``;
    ``new_scalars``: path -> position among ``scalar_program``'s outputs, or
    the new 0-d state itself when it is a constant.

    ``switches``: the positions among ``program.dynamic`` of the 0-d booleans
    that choose between two operands (``where(sync, synced, slow)``:
    Lookahead's synchronisation, RAdam's rectification). Each step runs the
    variant of ``program`` made for their values (:func:`_specialized`: the
    chosen operand itself, and no operation that only the other one needed).
    """

    __slots__ = ("program", "scalar_program", "scalar_paths", "started", "outputs",
                 "new_scalars", "switches", "variants", "make")

    def __init__(self, program, scalar_program, scalar_paths, started, outputs,
                 new_scalars, switches=(), make=None) -> None:
        self.program, self.scalar_program = program, scalar_program
        self.scalar_paths, self.started, self.outputs = scalar_paths, started, outputs
        self.new_scalars = new_scalars
        self.switches, self.make = switches, make  # make(flags) -> the variant
        self.variants: dict = {}

    def now(self, scalars: dict) -> tuple:
        """(the program of this step, it bound to this step's 0-d values, the
        new 0-d state)."""
        run = self.scalar_program
        values = run.run(run.constants, *[scalars[path] for path in self.scalar_paths])
        n = len(self.program.dynamic)
        new = {path: values[n + k] if isinstance(k, int) else k
               for path, k in self.new_scalars.items()}
        program = self.program
        if self.switches:  # read on the host, as torch.optim reads its step count
            flags = tuple(bool(values[k]) for k in self.switches)
            program = self.variants.get(flags)
            if program is None:
                program = self.variants[flags] = self.make(flags)
        return program, program.bound(values[:n]), new


def _plan(apply, update, layout, present: list, scalars: dict, kinds: tuple) -> _Plan | None:
    """The kept recording of this step, or a new one (None: not replayable)."""
    key = (id(update), id(layout), tuple(present), kinds,
           tuple((path, v.dtype, v.device) for path, v in scalars.items()))
    kept = _PLANS.get(key)
    if kept is None or kept[0] is not update or kept[1] is not layout:
        plan = _record(apply, update, layout, present, scalars, kinds, True)
        if len(_PLANS) >= _KEPT:
            _PLANS.clear()
        kept = _PLANS[key] = (update, layout, plan)
        if plan is not None:
            return plan
    # a 0-d part that reads its values in Python: recorded at every step
    return kept[2] or _record(apply, update, layout, present, scalars, kinds, False)


def _record(apply, update, layout, present: list, scalars: dict, kinds: tuple,
            dynamic: bool) -> _Plan | None:
    """The rule's step on stand-ins of these dtypes, or None if it cannot be
    replayed. ``dynamic``: the 0-d state is recorded too (the plan serves
    every step), else it is read as it is now (the plan serves this step)."""
    stand_ins = [torch.zeros(1, dtype=dtype, device=device) for dtype, device in kinds]
    leaves = {path: [] for path, _ in layout.slots}
    for (path, _), t in zip(present, stand_ins[2:]):
        leaves[path] = [t]
    leaves.update(scalars)
    tree = _state.rebuild_from(layout.template, leaves)
    scalar_paths = list(scalars) if dynamic else []
    n = len(stand_ins)
    recorder = _Recorder(stand_ins + [scalars[path] for path in scalar_paths], n)
    try:
        with recorder:
            new = _state.by_path(apply(update, stand_ins[:1], stand_ins[1:2], tree))
    except _Untraceable:
        return None
    keys = dict(present)
    outputs, targets, started = [], [], []
    for path, key in layout.slots:
        arrays = new[path]
        if not arrays:
            continue
        index = recorder.index.get(id(arrays[0]))
        if index is None:
            return None  # a state made without the inputs
        if path not in keys:
            started.append((key, recorder.tensors[index].dtype))
        outputs.append((index, key))
        targets.append(2 + [p for p, _ in present].index(path) if path in keys else None)
    dynamic_vars = sorted({v.index for _, args, kwargs, _, _ in recorder.ops
                           for v in (*args, *kwargs.values())
                           if isinstance(v, _Ref) and v.index not in recorder.piece})
    scalar_outputs, new_scalars = list(dynamic_vars), {}
    for path, _, _ in layout.scalars:
        index = recorder.index.get(id(new[path]))
        if index is None:
            new_scalars[path] = new[path]
        elif index in recorder.piece:
            return None  # 0-d state computed from the pieces
        else:
            new_scalars[path] = len(scalar_outputs) - len(dynamic_vars)
            scalar_outputs.append(index)
    output_vars = [v for v, _ in outputs]
    program = _Program(recorder, recorder.ops, range(n), output_vars, targets,
                       tuple(dynamic_vars))
    scalar_program = _Program(recorder, recorder.scalar_ops, range(n, n + len(scalar_paths)),
                              scalar_outputs, [None] * len(scalar_outputs))
    switches = sorted({dynamic_vars.index(args[0].index) for func, args, kwargs, _, _
                       in recorder.ops if _switch(recorder, func, args, kwargs)})

    def make(flags: tuple) -> _Program:
        chosen = {dynamic_vars[k]: flag for k, flag in zip(switches, flags)}
        ops, outs = _specialized(recorder, n, output_vars, chosen)
        return _Program(recorder, ops, range(n), outs, targets, tuple(dynamic_vars))

    return _Plan(program, scalar_program, scalar_paths, started, [key for _, key in outputs],
                 new_scalars, switches, make)


def _switch(rec: _Recorder, func, args: list, kwargs: dict) -> bool:
    """``where(c, x, y)`` with c a 0-d boolean of the 0-d part (the same for
    every piece)."""
    if func is not torch.where or len(args) != 3 or kwargs or not isinstance(args[0], _Ref):
        return False
    c = rec.tensors[args[0].index]
    return args[0].index not in rec.piece and c.ndim == 0 and c.dtype == torch.bool


def _specialized(rec: _Recorder, n_inputs: int, outputs: list, chosen: dict) -> tuple:
    """The recorded ops and outputs with the value of each 0-d boolean in
    ``chosen`` (variable -> bool) known: ``where(c, x, y)`` becomes x (or y)
    itself, the same values bit for bit, when that operand is a piece
    variable of the result's dtype and shape that nothing writes in place
    (its later readers see it as it is); then the ops no output needs go."""
    ops = rec.ops
    written = set(_makers(ops, n_inputs)[1])  # variables some op writes in place
    alias: dict = {}  # variable -> the variable it is

    def sub(v):
        return _Ref(alias.get(v.index, v.index)) if isinstance(v, _Ref) else v

    kept = []
    for op in ops:
        func, args, kwargs, index, out = op
        args = [sub(a) for a in args]
        kwargs = {k: sub(v) for k, v in kwargs.items()}
        if _switch(rec, func, args, kwargs) and args[0].index in chosen:
            pick = args[1] if chosen[args[0].index] else args[2]
            result = rec.tensors[index]
            if (isinstance(pick, _Ref) and pick.index in rec.piece
                    and pick.index not in written
                    and rec.tensors[pick.index].dtype == result.dtype
                    and rec.tensors[pick.index].shape == result.shape):
                alias[index] = pick.index
                continue
        kept.append((func, args, kwargs, index, out))
    outputs = [alias.get(v, v) for v in outputs]
    # backwards: an op stays when it writes an earlier variable (an input in
    # place) or makes one that an output or a kept op reads
    needed, live = set(outputs), []
    for op in reversed(kept):
        func, args, kwargs, index, out = op
        if index in needed or index in written:
            live.append(op)
            needed.update(a.index for a in (*args, *kwargs.values()) if isinstance(a, _Ref))
    return live[::-1], outputs


class _Schedule:
    """The replay of one program on some members of a bucket, made from the
    params and their state: which members go in pieces, which together, which
    whole, with the views and buffers each needs. :func:`step` keeps it while
    the params and state are the same tensors on the same memory; the grads
    (new tensors at every step) are taken when it runs.

    A member of at most ``chunk`` elements is replayed as it is (its own shape
    and strides, buffers viewed in its shape); a larger contiguous one in 1-d
    pieces of ``chunk`` elements; members of at most :data:`SMALL` elements
    (and contiguous) are gathered into one piece, replayed together and
    scattered back; tensor subclasses and larger non-contiguous members go
    whole, without buffers. ``grad_dtype``: the grads' dtype (a per-tensor
    prefix's result: float32 for 16-bit params), that of their gather buffer.
    """

    def __init__(self, program: _Program, outputs: list, params: list, states: list,
                 present: list, members: list, chunk: int, move: bool = False,
                 centered: dict | None = None, *, grad_dtype: torch.dtype) -> None:
        device = params[members[0]].device
        chunk = min(chunk, sum(params[i].numel() for i in members))
        full = _scratch(program.buffers, chunk, device)
        # positions among the inputs without the grad (what ops write into is state)
        direct = [t - 1 for t in program.direct_inputs]
        self.tasks: list = []  # (kind, member, ...)
        small: list = []  # (member, its elements)
        one = {}  # member -> its task as it is (a small member left alone in its group)
        for i in members:
            st = states[i]
            inputs = (params[i], *(st[key] for _, key in present))
            targets = tuple(st[key] for key in outputs)
            tensors = inputs + targets
            n = params[i].numel()
            if any(type(t) not in _PLAIN for t in tensors):
                self.tasks.append(("whole", i, inputs, targets))
                continue
            flat = all(t.is_contiguous() for t in tensors)
            if n <= chunk:
                shape = params[i].shape
                buffers = [b[:n].view(shape) for b in full]
                task = ("one", i, inputs, targets, buffers, [inputs[t] for t in direct])
                if flat and n <= SMALL and n < chunk:
                    one[i] = task
                    small.append((i, n))
                else:
                    self.tasks.append(task)
            elif flat:
                pieces = list(zip(*(t.view(-1).split(chunk) for t in tensors)))
                runs = []
                for piece in pieces:
                    ins, outs = piece[:len(inputs)], piece[len(inputs):]
                    m = ins[0].numel()
                    buffers = full if m == chunk else [b[:m] for b in full]
                    runs.append((ins, outs, buffers, [ins[t] for t in direct]))
                self.tasks.append(("pieces", i, runs))
            else:
                self.tasks.append(("whole", i, inputs, targets))
        keys = list(dict.fromkeys([*(key for _, key in present), *outputs]))
        while small:  # groups of at most chunk elements
            size, k = 0, 0
            while k < len(small) and size + small[k][1] <= chunk:
                size += small[k][1]
                k += 1
            group, small = [i for i, _ in small[:k]], small[k:]
            if len(group) == 1:  # alone: as it is, without the gather and the scatter
                self.tasks.append(one[group[0]])
                continue
            slots = {key: _consecutive([states[i] for i in group], key, move) for key in keys}
            columns = [[params[i].view(-1) for i in group],
                       *(slots[key] for _, key in present)]
            # a gather buffer for the params, the grads and each state not one flat tensor
            lists = [columns[0], columns[0], *columns[1:]]
            dtypes = [c[0].dtype for c in lists if type(c) is list]
            # the grads' own dtype (a transform's result: float32 for 16-bit params)
            dtypes[1] = grad_dtype
            buffers = iter(_scratch(dtypes, size, device, "gather"))
            gathered = [next(buffers) if type(c) is list else None for c in lists]
            self.tasks.append(("gathered", group, [params[i].numel() for i in group],
                               [k for k, i in enumerate(group) if params[i].ndim != 1],
                               columns, gathered, [b[:size] for b in full],
                               [slots[key] for key in outputs]))
        self.none = [None] * (len(program.buffers) + len(program.direct_inputs))
        self.chunk = chunk
        # deferred centering (run's ``centers``): a member replayed as it is
        # reads its grad centered into a piece-sized buffer right before; the
        # others' centered grads are written whole, into buffers kept for the
        # bucket (``centered``: member -> buffer, shared by its schedules)
        self.whole = [i for task in self.tasks if task[0] != "one"
                      for i in (task[1] if task[0] == "gathered" else [task[1]])]
        self.centered = {} if centered is None else centered

    def run(self, program: _Program, grads: list, centers: dict | None = None) -> None:
        """Replay ``program`` (bound to this step's 0-d values) with these grads;
        ``centers``: {id(grad): (grad, center)} of grads to read as
        ``center(out)`` writes them (:func:`polyopt._namespace.deferred_centering`)."""
        run, constants, copies = program.run, program.constants, program.copies
        if centers:
            grads = self._center_whole(grads, centers)
        for task in self.tasks:
            kind = task[0]
            if kind == "one":
                _, i, inputs, targets, buffers, direct = task
                g = grads[i]
                center = centers.get(id(g)) if centers else None
                if center is not None:  # read from memory once, then from the cache
                    g = center[1](self._center_buffer(i, g))
                news = run(constants, inputs[0], g, *inputs[1:], *buffers, *direct)
                for k in copies:
                    targets[k].copy_(news[k])
            elif kind == "pieces":
                _, i, runs = task
                for (ins, outs, buffers, direct), g in zip(
                        runs, grads[i].reshape(-1).split(self.chunk)):
                    news = run(constants, ins[0], g, *ins[1:], *buffers, *direct)
                    for k in copies:
                        outs[k].copy_(news[k])
            elif kind == "gathered":
                self._run_gathered(program, grads, *task[1:])
            else:  # whole, without buffers
                _, i, inputs, targets = task
                news = run(constants, inputs[0], grads[i], *inputs[1:], *self.none)
                for target, new in zip(targets, news):
                    if new is not target:
                        target.copy_(new)

    def _center_whole(self, grads: list, centers: dict) -> list:
        """``grads`` with those of the members not replayed as they are
        centered, each into a buffer kept for it."""
        grads = list(grads)
        for i in self.whole:
            g = grads[i]
            center = centers.get(id(g))
            if center is not None:
                out = self.centered.get(i)
                if out is None or out.shape != g.shape or out.dtype != g.dtype:
                    out = self.centered[i] = torch.empty(g.shape, dtype=g.dtype,
                                                         device=g.device)
                grads[i] = center[1](out)
        return grads

    def _center_buffer(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """A buffer of the piece size, viewed in the shape of member ``i``'s grad."""
        out = self.centered.get(i)
        if out is None or out.dtype != g.dtype:
            piece = _scratch([g.dtype], self.chunk, g.device, "centered")[0]
            out = self.centered[i] = piece[:g.numel()].view(g.shape)
        return out

    @staticmethod
    def _run_gathered(program: _Program, grads: list, members: list, sizes: list,
                      shaped: list, columns: list, gathered: list, buffers: list,
                      targets: list) -> None:
        """The members' params and grads gathered into one piece each, as
        their state where it is not one flat tensor (:func:`_consecutive`);
        what the program wrote scattered back. ``shaped``: the positions
        among ``members`` of those of more than one axis (the others' grads,
        of their shape, are gathered as they are)."""
        flat = [grads[i] for i in members]
        for k in shaped:
            flat[k] = flat[k].reshape(-1)
        columns = [columns[0], flat, *columns[1:]]
        ins = [torch.cat(column, out=buf) if type(column) is list else column
               for column, buf in zip(columns, gathered)]
        news = program.run(program.constants, *ins, *buffers,
                           *[ins[t] for t in program.direct_inputs])
        for k in program.written:
            if type(columns[k]) is list:
                torch._foreach_copy_(columns[k], ins[k].split(sizes))
        for k in program.changed:
            if type(targets[k]) is list:
                torch._foreach_copy_(targets[k], news[k].split(sizes))
            elif news[k] is not targets[k]:
                targets[k].copy_(news[k])


def _consecutive(states: list, key: str, move: bool) -> torch.Tensor | list:
    """The entries ``key`` of ``states`` as one flat tensor whose consecutive
    pieces they are: the tensor they are views of, or (``move``) a new one,
    whose views then replace them in ``states`` (the optimizer's own state,
    as the compiled path keeps it), so that a gathered replay reads and
    writes the state where it is, without a gather and a scatter; else their
    flat views, to be gathered."""
    tensors = [st[key] for st in states]
    first = tensors[0]
    start, size = first.data_ptr(), sum(t.numel() for t in tensors)
    whole = first.as_strided((size,), (1,)) if size <= _room(first) else None
    if whole is not None:
        offset = 0
        for t in tensors:
            if (t.data_ptr() != start + offset * t.element_size() or not t.is_contiguous()
                    or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
                whole = None
                break
            offset += t.numel()
    if whole is not None:
        return whole
    if not move:
        return [t.view(-1) for t in tensors]
    whole = torch.cat([t.reshape(-1) for t in tensors])
    for st, view in zip(states, views_of(whole, [t.shape for t in tensors])):
        st[key] = view
    return whole


def _room(t: torch.Tensor) -> int:
    """Elements of ``t``'s storage from its first element on."""
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def eligible(rule: Any) -> bool:
    """Whether the replayed step gives this rule's numbers: it declares itself
    elementwise and takes no per-tensor layouts."""
    return bool(rule.elementwise) and not rule.uses_layout


def parts(rule: Any) -> tuple | None:
    """``(transform, rest)``: the rule as a per-tensor transform of the grads
    (None: none) run tensor by tensor, then a rule :func:`step` replays; None
    when no part of it replays (:attr:`polyopt.rules.Rule.prefix`)."""
    if eligible(rule):
        return None, rule
    prefix = getattr(rule, "prefix", None)
    if prefix is not None and eligible(prefix[1]):
        return prefix
    return None
