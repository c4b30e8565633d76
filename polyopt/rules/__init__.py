"""Update rules, written once against the Python Array API standard.

Every rule is a factory returning a :class:`Rule` (or :class:`SAMRule`):
``state = rule.init(params)``, ``updates, state = rule.update(grads, state,
params)`` on lists of arrays of one namespace; ``params + updates`` is the
new point. Rules are pure: nothing is changed in place.

The Array API subset the core calls is ``polyopt.rules.ARRAY_API_SUBSET``
(plus operators and the attributes shape, ndim, dtype, device); a test
keeps it exact. A namespace that provides it runs every rule and schedule:
``register_namespace(is_array, xp)`` makes the core use ``xp`` for arrays
array_api_compat does not know (TensorFlow's, in the Keras adapter).
"""

from polyopt._namespace import register_namespace
from polyopt.rules._base import ARRAY_API_SUBSET, COUNT_LIMIT, Rule
from polyopt.rules.adam_family import (
    AdamaxState,
    AdamState,
    NAdamState,
    RAdamState,
    adam,
    adamax,
    adamw,
    amsgrad,
    nadam,
    radam,
)
from polyopt.rules.adaptive import (
    AdadeltaState,
    AdagradState,
    RMSpropState,
    adadelta,
    adagrad,
    rmsprop,
)
from polyopt.rules.sgd_family import SGDState, sgd
from polyopt.rules.wrappers import (
    ApplyIfFiniteState,
    ChainState,
    CountState,
    LookaheadState,
    SAMRule,
    add_decayed_weights,
    apply_if_finite,
    centralize,
    chain,
    clip_by_global_norm,
    decoupled_weight_decay,
    global_norm,
    lookahead,
    ranger,
    sam,
)


def elementwise(name: str, values: dict) -> bool:
    """Whether the rule factory ``name`` with these (canonical) arguments treats
    every element alone: no per-tensor reductions, no axes. Its numbers then do
    not depend on how the arrays are shaped or split, so an adapter may run it
    on 1-D reshapes or on one concatenation of all arrays (checked for every
    torch class by tests/test_torch_flat.py). Only Ranger's gradient
    centralization (per-tensor means over every axis but the first) is not.

    >>> elementwise("adam", {})
    True
    >>> elementwise("ranger", {"gradient_centralization": True})
    False
    """
    return not (name == "ranger" and values.get("gradient_centralization", True))


__all__ = [
    "ARRAY_API_SUBSET", "COUNT_LIMIT", "Rule", "SAMRule", "register_namespace", "elementwise",
    "sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax", "nadam",
    "radam", "lookahead", "ranger", "sam",
    "chain", "clip_by_global_norm", "centralize", "add_decayed_weights",
    "decoupled_weight_decay", "global_norm", "apply_if_finite",
    "SGDState", "AdagradState", "RMSpropState", "AdadeltaState", "AdamState", "AdamaxState",
    "NAdamState", "RAdamState", "LookaheadState", "ChainState", "CountState",
    "ApplyIfFiniteState",
]
