"""Where the core gets an array namespace: array_api_compat, or one an adapter registered.

TensorFlow has no array_api_compat support, so the Keras adapter registers a
small namespace of its own for tf.Tensor/tf.Variable (covering
``polyopt.rules.ARRAY_API_SUBSET``); the rules and schedules then run on
TensorFlow arrays unchanged. Registered namespaces are consulted first, the
most recent first; nothing is imported to find one.

:func:`fused` gives the few combined operations the core names beyond that
subset (Muon's ``lerp``, ``matmul_add``, ...; gradient centralization's
``centered``): written in the subset for every namespace, torch's own
kernels for torch's, whose ``centered`` can leave its subtraction to the
caller (:func:`deferred_centering`).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from array_api_compat import array_namespace, is_torch_namespace

_REGISTERED: list[tuple[Callable[[Any], bool], Any]] = []


def register_namespace(is_array: Callable[[Any], bool], xp: Any) -> Callable[[], None]:
    """Use namespace ``xp`` for arrays where ``is_array(array)`` is true.

    Returns a function that removes the registration again.
    """
    if not callable(is_array):
        raise TypeError(f"register_namespace: is_array must be callable, got {is_array!r}")
    entry = (is_array, xp)
    _REGISTERED.insert(0, entry)

    def unregister() -> None:
        if entry in _REGISTERED:
            _REGISTERED.remove(entry)

    return unregister


def namespace(*arrays: Any) -> Any:
    """The Array API namespace of ``arrays`` (one namespace, or a clear TypeError)."""
    for is_array, xp in _REGISTERED:
        if arrays and all(is_array(a) for a in arrays):
            return xp
    try:
        return array_namespace(*arrays)
    except TypeError as e:
        raise TypeError(f"arrays must all come from one array library: {e}") from None


# --------------------------------------------------------------------------
# fused operations: a few combinations the core names, run as written in the
# Array API subset, or as one kernel where a namespace has it (torch)


class Fused:
    """The operations beyond ``rules.ARRAY_API_SUBSET`` that the core names, each
    computed here as written with that subset (every namespace: numpy, JAX,
    Keras's TensorFlow namespace). :func:`fused` gives torch's kernels instead,
    the same algebra with torch.optim's roundings (docs/design.md, Roundings)."""

    @staticmethod
    def lerp(xp, start, end, weight, keep):
        """keep start + weight end (``keep`` is 1 - ``weight`` as the caller computes it)."""
        return keep * start + weight * end

    @staticmethod
    def matmul_add(xp, y, a, b, beta, alpha=None):
        """beta y + alpha (a @ b) of matrices or stacks of them (no alpha: 1), alpha
        applied to ``a``."""
        return beta * y + xp.matmul(a if alpha is None else alpha * a, b)

    @staticmethod
    def minus(xp, y, s, x):
        """y - s x."""
        return y - s * x

    @staticmethod
    def row_major(xp, x):
        """``x``, the same numbers (a layout where the namespace has one)."""
        return x

    @staticmethod
    def centered(xp, x, axes):
        """x minus its mean over ``axes`` (gradient centralization)."""
        return x - xp.mean(x, axis=axes, keepdims=True)

    @staticmethod
    def bfloat16_norm(xp, x, keepdims):
        """The Frobenius norm of a bfloat16 matrix (of each of a stack, kept as
        (..., 1, 1) with ``keepdims``), accumulated in float32: returned in float32."""
        wide = xp.astype(x, xp.float32)
        squares = wide * wide
        return xp.sqrt(xp.sum(squares, axis=(-2, -1), keepdims=True) if keepdims
                       else xp.sum(squares))


#: The centerings a caller computes itself (see :func:`deferred_centering`), per
#: thread: ``.pending`` = the caller's dict (a thread-local, which
#: torch.compile traces, where it cannot trace a ContextVar).
_DEFERRED = threading.local()


@contextlib.contextmanager
def deferred_centering(pending: dict) -> Iterator[dict]:
    """Within the block, torch's ``centered(x, axes)`` computes nothing and
    returns a new view of ``x`` (its values not centered), recording
    ``pending[id(view)] = (view, center)``: the caller calls ``center(out)``
    (``x - mean`` into ``out``, the same kernels and numbers) where it reads
    the view. For a caller that reads every result of the block itself, as
    returned: the torch adapter's eager step of a rule's per-tensor prefix
    (gradient centralization), whose replay centers each gradient into a
    cache-sized buffer right before it reads it, the mean's pass included,
    so that the gradient comes from memory once (docs/performance.md). A
    result that the block itself computes with would be wrong: callers
    check that each view is returned as it is. Other namespaces ignore it."""
    before = getattr(_DEFERRED, "pending", None)
    _DEFERRED.pending = pending
    try:
        yield pending
    finally:
        _DEFERRED.pending = before


def _number(x: Any) -> bool:
    """Whether ``x`` is a Python real number (float and int looked up first: an
    isinstance of the numbers ABC costs about 0.5 us, twice per matrix product)."""
    return type(x) in (float, int) or isinstance(x, numbers.Real)


class TorchFused(Fused):
    """:class:`Fused` as torch's kernels, where the operands allow them (number
    coefficients): one pass and one rounding each, as torch.optim.Muon computes."""

    @staticmethod
    def lerp(xp, start, end, weight, keep):
        """torch.lerp (a fused multiply-add for either half of the weights)."""
        if _number(weight):
            return xp.lerp(start, end, weight)
        return Fused.lerp(xp, start, end, weight, keep)

    @staticmethod
    def matmul_add(xp, y, a, b, beta, alpha=None):
        """torch.addmm (baddbmm for a stack): the sum rounded once."""
        scale = 1 if alpha is None else alpha
        if _number(beta) and _number(scale) and y.ndim in (2, 3):
            return (xp.addmm if y.ndim == 2 else xp.baddbmm)(y, a, b, beta=beta, alpha=scale)
        return Fused.matmul_add(xp, y, a, b, beta, alpha)

    @staticmethod
    def minus(xp, y, s, x):
        """torch.sub(alpha=s): one rounding."""
        if _number(s):
            return xp.sub(y, x, alpha=s)
        return Fused.minus(xp, y, s, x)

    @staticmethod
    def row_major(xp, x):
        """A transposed view copied once (each elementwise pass after it then reads
        its rows in order: 0.4-0.9 ms against 6.9-8.7 ms for a 3072x768 one)."""
        return x.contiguous()

    @staticmethod
    def centered(xp, x, axes):
        """``x - mean``; within :func:`deferred_centering` left to the caller."""
        pending = getattr(_DEFERRED, "pending", None)
        if pending is None:
            return Fused.centered(xp, x, axes)
        view = x.view(x.shape)
        pending[id(view)] = (view, functools.partial(TorchFused._center, xp, x, axes))
        return view

    @staticmethod
    def _center(xp, x, axes, out):
        """``x - mean`` into ``out`` (torch.sub: the kernel of ``x - mean``)."""
        return xp.sub(x, xp.mean(x, axis=axes, keepdims=True), out=out)

    @staticmethod
    def bfloat16_norm(xp, x, keepdims):
        """linalg.vector_norm of the bfloat16 matrix: one pass, accumulated in float32,
        returned in bfloat16 (Tensor.norm's number, torch.optim.Muon's)."""
        return xp.linalg.vector_norm(x, axis=(-2, -1), keepdims=keepdims)


#: array_api_compat's test without its lru_cache: torch.compile traces the
#: rules (polyopt.torch's compiled=True), and dynamo warns at a traced call of
#: an lru_cache-wrapped function (its cache is not consulted under tracing)
_is_torch_namespace = getattr(is_torch_namespace, "__wrapped__", is_torch_namespace)


def fused(xp) -> type[Fused]:
    """The fused operations for namespace ``xp``: torch's kernels for torch's
    namespace (array_api_compat's or torch itself), else :class:`Fused`."""
    # a registered namespace (Keras's on TensorFlow) need not be a module, nor hashable
    if isinstance(xp, types.ModuleType) and _is_torch_namespace(xp):
        return TorchFused
    return Fused
