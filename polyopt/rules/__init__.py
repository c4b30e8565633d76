"""Update rules, written once against the Python Array API standard.

Every rule is a factory returning a :class:`Rule` (or :class:`SAMRule`):
``state = rule.init(params)``, ``updates, state = rule.update(grads, state,
params)`` on lists of arrays of one namespace; ``params + updates`` is the
new point. Rules are pure: nothing is changed in place.

A rule declares what adapters may know about it as attributes of its
:class:`Rule` (never by its name): its state ``slots`` (:class:`Slot`:
shape as a function of the param's shape and :class:`Layout`, dtype
policy), ``elementwise``, ``uses_layout``, ``needs_closure`` and
``eval_params``. :mod:`polyopt.rules._state` is the one walker that builds,
checks, flattens and restores states from that description.

The Array API subset the core calls is ``polyopt.rules.ARRAY_API_SUBSET``
(plus operators and the attributes shape, ndim, dtype, device); a test
keeps it exact. A namespace that provides it runs every rule and schedule:
``register_namespace(is_array, xp)`` makes the core use ``xp`` for arrays
array_api_compat does not know (TensorFlow's, in the Keras adapter).
"""

from polyopt._namespace import register_namespace
from polyopt.rules._base import ARRAY_API_SUBSET, COUNT_LIMIT, Rule, init_of, update_of
from polyopt.rules._state import NOT_A_MATRIX, Layout, Slot, StateError
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
from polyopt.rules.factored import AdafactorState, adafactor
from polyopt.rules.muon import MuonState, muon
from polyopt.rules.schedule_free import (
    ADOPTState,
    ScheduleFreeState,
    adopt,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_train_params,
)
from polyopt.rules.sgd_family import SGDState, sgd
from polyopt.rules.sign_family import LionState, lion
from polyopt.rules.trust_ratio import LambState, LarsState, lamb, lars
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

__all__ = [
    "ARRAY_API_SUBSET", "COUNT_LIMIT", "Rule", "SAMRule", "Slot", "Layout", "NOT_A_MATRIX",
    "StateError",
    "register_namespace", "init_of", "update_of",
    "sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax", "nadam",
    "radam", "lion", "adafactor", "lamb", "lars", "schedule_free_adamw", "muon",
    "schedule_free_eval_params", "schedule_free_train_params", "adopt", "lookahead",
    "ranger", "sam",
    "chain", "clip_by_global_norm", "centralize", "add_decayed_weights",
    "decoupled_weight_decay", "global_norm", "apply_if_finite",
    "SGDState", "AdagradState", "RMSpropState", "AdadeltaState", "AdamState", "AdamaxState",
    "NAdamState", "RAdamState", "LionState", "AdafactorState", "LambState", "LarsState",
    "ScheduleFreeState", "ADOPTState", "MuonState", "LookaheadState", "ChainState", "CountState",
    "ApplyIfFiniteState",
]
