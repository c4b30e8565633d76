"""A small Array API namespace over TensorFlow: exactly ``polyopt.rules.ARRAY_API_SUBSET``.

TensorFlow has no array_api_compat support, so the Keras adapter registers
this namespace (``polyopt.rules.register_namespace``) for ``tf.Tensor`` and
``tf.Variable`` when Keras runs on the TensorFlow backend. It covers the
names the rules and schedules call (of the ``linalg``
extension its ``matrix_norm``), with Array API semantics, built from
plain TensorFlow ops, so it runs eagerly, in ``tf.function`` and under
``jit_compile=True`` (XLA). Operators (``+ - * / ** %``, comparisons) are
tf.Tensor's own: a Python number meets a tensor in the tensor's dtype, so a
float64 tensor times 0.9 uses the exact float64 0.9.

Devices: TensorFlow places ops itself; the ``device`` arguments are accepted
and ignored (inside a graph a tensor's ``device`` is often empty).
"""

from __future__ import annotations

import types
from typing import Any

import ml_dtypes
import tensorflow as tf

__all__ = ["is_tf_array", "namespace", "NAMES"]

NAMES = frozenset({
    "abs", "all", "asarray", "astype", "conj", "cos", "expm1", "finfo", "float32", "floor",
    "full_like", "imag", "int32", "isdtype", "isfinite", "linalg", "matmul", "matrix_transpose",
    "maximum", "mean", "minimum", "ones", "permute_dims", "pow", "real", "reshape",
    "result_type", "sqrt", "sum", "where", "zeros", "zeros_like",
})

_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: (d.is_integer or d.is_floating or d.is_complex) and d != tf.bool,
}


def is_tf_array(x: Any) -> bool:
    """True for TensorFlow tensors and variables (what this namespace serves)."""
    return isinstance(x, (tf.Tensor, tf.Variable))


def _dtype(dtype: Any) -> tf.DType | None:
    return None if dtype is None else tf.as_dtype(dtype)


def asarray(obj, /, *, dtype=None, device=None, copy=None):
    dtype = _dtype(dtype)
    if is_tf_array(obj):
        out = obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
        if isinstance(out, tf.Variable):
            out = tf.convert_to_tensor(out)  # a snapshot: later assigns do not show
        return tf.identity(out) if copy else out
    # Python numbers: exact in the requested dtype (convert_to_tensor, not cast)
    if dtype is None and isinstance(obj, float):
        dtype = tf.float32  # the Array API default floating dtype
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x, dtype, /, *, copy=True, device=None):
    dtype = _dtype(dtype)
    if x.dtype == dtype:
        return tf.identity(x) if copy else tf.convert_to_tensor(x)
    return tf.cast(x, dtype)


def zeros(shape, *, dtype=None, device=None):
    return tf.zeros(shape, dtype=_dtype(dtype) or tf.float32)


def ones(shape, *, dtype=None, device=None):
    return tf.ones(shape, dtype=_dtype(dtype) or tf.float32)


def zeros_like(x, /, *, dtype=None, device=None):
    return tf.zeros_like(x, dtype=_dtype(dtype) or x.dtype)


def full_like(x, /, fill_value, *, dtype=None, device=None):
    dtype = _dtype(dtype) or x.dtype
    return tf.fill(tf.shape(x), tf.convert_to_tensor(fill_value, dtype=dtype))


def where(condition, x1, x2, /):
    if not is_tf_array(x1) and not is_tf_array(x2):
        raise TypeError("where: at least one of x1, x2 must be an array")
    dtype = x1.dtype if is_tf_array(x1) else x2.dtype
    x1 = tf.convert_to_tensor(x1, dtype=dtype)
    x2 = tf.convert_to_tensor(x2, dtype=dtype)
    return tf.where(condition, x1, x2)


def _axis(axis):
    return list(axis) if isinstance(axis, tuple) else axis


def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 - Array API name
    if dtype is not None:
        x = tf.cast(x, _dtype(dtype))
    return tf.reduce_sum(x, axis=_axis(axis), keepdims=keepdims)


def mean(x, /, *, axis=None, keepdims=False):
    return tf.reduce_mean(x, axis=_axis(axis), keepdims=keepdims)


def all(x, /, *, axis=None, keepdims=False):  # noqa: A001 - Array API name
    return tf.reduce_all(tf.cast(x, tf.bool), axis=_axis(axis), keepdims=keepdims)


def _binary(fn):
    def op(x1, x2, /):
        if is_tf_array(x1) and not is_tf_array(x2):
            x2 = tf.convert_to_tensor(x2, dtype=x1.dtype)
        elif is_tf_array(x2) and not is_tf_array(x1):
            x1 = tf.convert_to_tensor(x1, dtype=x2.dtype)
        return fn(x1, x2)

    op.__name__ = fn.__name__
    return op


maximum = _binary(tf.maximum)
minimum = _binary(tf.minimum)
pow = _binary(tf.pow)  # noqa: A001 - Array API name


def abs(x, /):  # noqa: A001 - Array API name
    return tf.abs(x)


def cos(x, /):
    return tf.cos(x)


def expm1(x, /):
    return tf.math.expm1(x)


def floor(x, /):
    return x if x.dtype.is_integer else tf.floor(x)


def sqrt(x, /):
    return tf.sqrt(x)


def matmul(x1, x2, /):
    return tf.linalg.matmul(x1, x2)


def matrix_transpose(x, /):
    return tf.linalg.matrix_transpose(x)


def _matrix_norm(x, /, *, keepdims=False, ord="fro"):  # noqa: A002 - Array API name
    """The Array API's ``linalg.matrix_norm`` over the last two axes (a real result)."""
    magnitude = tf.abs(x)
    if ord == "fro":
        out = tf.sqrt(tf.reduce_sum(magnitude * magnitude, axis=[-2, -1]))
    elif ord in (2, -2, "nuc"):
        values = tf.linalg.svd(x, compute_uv=False)
        values = tf.math.real(values) if values.dtype.is_complex else values
        out = (tf.reduce_sum(values, axis=-1) if ord == "nuc" else
               tf.reduce_max(values, axis=-1) if ord == 2 else tf.reduce_min(values, axis=-1))
    elif ord in (1, -1, float("inf"), -float("inf")):
        sums = tf.reduce_sum(magnitude, axis=-2 if ord in (1, -1) else -1)
        out = tf.reduce_max(sums, axis=-1) if ord > 0 else tf.reduce_min(sums, axis=-1)
    else:
        raise ValueError(f"matrix_norm: ord must be 'fro', 'nuc', 1, -1, 2, -2, inf or -inf, "
                         f"got ord={ord!r}")
    return out[..., None, None] if keepdims else out


linalg = types.SimpleNamespace(matrix_norm=_matrix_norm)


def permute_dims(x, /, axes):
    return tf.transpose(x, perm=list(axes))


def conj(x, /):
    return tf.math.conj(x)


def real(x, /):
    return tf.math.real(x)


def imag(x, /):
    return tf.math.imag(x)


def finfo(type, /):  # noqa: A002 - Array API name
    """The Array API's finfo; ``.dtype`` is the real dtype (of a complex one too)."""
    dtype = tf.as_dtype(type.dtype if hasattr(type, "dtype") else type).real_dtype
    numbers = ml_dtypes.finfo(dtype.as_numpy_dtype)
    return types.SimpleNamespace(bits=int(numbers.bits), eps=float(numbers.eps),
                                 max=float(numbers.max), min=float(numbers.min),
                                 smallest_normal=float(numbers.smallest_normal), dtype=dtype)


def reshape(x, /, shape, *, copy=None):
    return tf.reshape(x, shape)


def isfinite(x, /):
    return tf.math.is_finite(x) if x.dtype.is_floating else tf.ones_like(x, dtype=tf.bool)


def isdtype(dtype, kind) -> bool:
    dtype = tf.as_dtype(dtype)
    if isinstance(kind, tuple):
        return any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        try:
            return bool(_KINDS[kind](dtype))
        except KeyError:
            raise ValueError(f"isdtype: unknown kind {kind!r}") from None
    return dtype == tf.as_dtype(kind)


def result_type(*arrays_and_dtypes):
    dtypes = [tf.as_dtype(a.dtype if hasattr(a, "dtype") else a) for a in arrays_and_dtypes]
    if not dtypes:
        raise ValueError("result_type: needs at least one array or dtype")
    out = dtypes[0]
    for d in dtypes[1:]:
        out = _promote(out, d)
    return out


_FLOATS = [tf.float16, tf.float32, tf.float64]


def _promote(a: tf.DType, b: tf.DType) -> tf.DType:
    if a == b:
        return a
    if a in _FLOATS and b in _FLOATS:
        return max(a, b, key=_FLOATS.index)
    if a.is_integer and b.is_integer and a.is_unsigned == b.is_unsigned:
        return a if a.size >= b.size else b
    raise TypeError(f"result_type: no Array API promotion for {a.name} and {b.name}")


float32 = tf.float32
int32 = tf.int32

namespace = types.SimpleNamespace(**{name: globals()[name] for name in sorted(NAMES)})
namespace.__name__ = "polyopt.keras._tf_namespace"
