"""polyopt.keras: polyopt's rules as Keras 3 optimizers, on the TensorFlow, JAX and torch backends.

>>> import keras, polyopt.keras                                # doctest: +SKIP
>>> model.compile(optimizer=polyopt.keras.Adam(learning_rate=1e-3), loss="mse")  # doctest: +SKIP

Classes: SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW, Adamax, Nadam, RAdam, Lion,
Adafactor, Lamb, Lars, ScheduleFreeAdamW (``evaluation_point()`` for x), ADOPT, Muon,
Lookahead, Ranger, SkipNonFinite (subclasses of ``keras.optimizers.Optimizer`` through
:class:`RuleOptimizer`), :class:`SAMModel` for sharpness-aware training in
``model.fit``, and :class:`PolyoptSchedule`. Arguments use Keras' spellings
(``learning_rate``, ``beta_1``, ``epsilon``, ``rho``, ...) but polyopt's
defaults, the same in every adapter; ``polyopt.native.PRESETS`` lists the
options that give ``keras.optimizers``' own numbers.

State files (move a run to torch or JAX and back) and native
``keras.optimizers.Adam`` import: :mod:`polyopt.keras.interop` and the
optimizers' ``export_state``/``import_state``. Non-finite gradients propagate
by default, as in Keras; :class:`SkipNonFinite` skips such steps.

On the TensorFlow backend this module registers an Array API namespace for
TensorFlow tensors with the core (``polyopt.keras._tf_namespace``).
"""

from __future__ import annotations

import keras

if keras.backend.backend() == "tensorflow":
    from polyopt._namespace import register_namespace
    from polyopt.keras import _tf_namespace

    register_namespace(_tf_namespace.is_tf_array, _tf_namespace.namespace)

from polyopt.keras._base import BASE_OPTIONS, PolyoptSchedule, RuleOptimizer  # noqa: E402
from polyopt.keras._optimizers import (  # noqa: E402
    ADOPT,
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Lamb,
    Lars,
    Lion,
    Lookahead,
    Muon,
    Nadam,
    RAdam,
    Ranger,
    RMSprop,
    ScheduleFreeAdamW,
)
from polyopt.keras._sam import SAMModel  # noqa: E402
from polyopt.keras.nonfinite import SkipNonFinite  # noqa: E402

__all__ = [
    "BASE_OPTIONS", "PolyoptSchedule", "RuleOptimizer",
    "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam", "RAdam",
    "Lion", "Adafactor", "Lamb", "Lars", "ScheduleFreeAdamW", "ADOPT", "Muon", "Lookahead",
    "Ranger",
    "SAMModel", "SkipNonFinite",
]
