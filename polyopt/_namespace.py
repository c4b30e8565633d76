"""Where the core gets an array namespace: array_api_compat, or one an adapter registered.

TensorFlow has no array_api_compat support, so the Keras adapter registers a
small namespace of its own for tf.Tensor/tf.Variable (covering
``polyopt.rules.ARRAY_API_SUBSET``); the rules and schedules then run on
TensorFlow arrays unchanged. Registered namespaces are consulted first, the
most recent first; nothing is imported to find one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace

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
