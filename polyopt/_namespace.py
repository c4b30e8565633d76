"""Where the core gets an array namespace: array_api_compat, or one an adapter registered.

TensorFlow has no array_api_compat support, so the Keras adapter registers a
small namespace of its own for tf.Tensor/tf.Variable (covering
``polyopt.rules.ARRAY_API_SUBSET``); the rules and schedules then run on
TensorFlow arrays unchanged. Registered namespaces are consulted first, the
most recent first; nothing is imported to find one.

:func:`fused` gives the few combined operations the core names beyond that
subset (Muon's ``lerp``, ``matmul_add``, ...; gradient centralization's
``centered``): written in the subset for every namespace, torch's own
kernels for torch's, which can write into buffers the caller keeps
(:func:`kept_results`).
"""

from __future__ import annotations

import contextlib
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


#: The buffers a caller keeps for the results of the fused operations (see
#: :func:`kept_results`), per thread: ``.kept`` = [buffers, index of the next
#: result] (a thread-local, which torch.compile traces, where it cannot trace
#: a ContextVar).
_RESULTS = threading.local()


@contextlib.contextmanager
def kept_results(buffers: list) -> Iterator[None]:
    """Within the block, torch's fused operations that return a new array of
    their operand's shape write it into ``buffers`` instead: the k-th such
    result into ``buffers[k]``, made (and appended) at its first use, or when
    the shape, dtype or device changed. For a caller that reads the results
    before it enters the block again and keeps none of them (the torch
    adapter's eager step of a rule's per-tensor prefix, whose replay copies
    what it keeps into its own state): a fresh tensor of a gradient's size
    costs its memory pages again at every step (the allocator gives them
    back; docs/performance.md). Other namespaces ignore it."""
    before = getattr(_RESULTS, "kept", None)
    _RESULTS.kept = [buffers, 0]
    try:
        yield
    finally:
        _RESULTS.kept = before


def _result_like(xp, x: Any) -> Any:
    """The kept buffer for the next result shaped as ``x`` (None outside
    :func:`kept_results`)."""
    kept = getattr(_RESULTS, "kept", None)
    if kept is None:
        return None
    buffers, k = kept
    kept[1] = k + 1
    if k < len(buffers):
        buffer = buffers[k]
        if buffer.shape == x.shape and buffer.dtype == x.dtype and buffer.device == x.device:
            return buffer
    buffer = xp.empty(x.shape, dtype=x.dtype, device=x.device)
    if k < len(buffers):
        buffers[k] = buffer
    else:
        buffers.append(buffer)
    return buffer


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
        """torch.sub into the kept buffer (:func:`kept_results`), if any: the
        same kernel and numbers as ``x - mean``."""
        out = _result_like(xp, x)
        if out is None:
            return Fused.centered(xp, x, axes)
        return xp.sub(x, xp.mean(x, axis=axes, keepdims=True), out=out)

    @staticmethod
    def bfloat16_norm(xp, x, keepdims):
        """linalg.vector_norm of the bfloat16 matrix: one pass, accumulated in float32,
        returned in bfloat16 (Tensor.norm's number, torch.optim.Muon's)."""
        return xp.linalg.vector_norm(x, axis=(-2, -1), keepdims=keepdims)


def fused(xp) -> type[Fused]:
    """The fused operations for namespace ``xp``: torch's kernels for torch's
    namespace (array_api_compat's or torch itself), else :class:`Fused`."""
    # a registered namespace (Keras's on TensorFlow) need not be a module, nor hashable
    if isinstance(xp, types.ModuleType) and is_torch_namespace(xp):
        return TorchFused
    return Fused
