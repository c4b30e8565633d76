"""polyopt.torch: the polyopt rules as ``torch.optim.Optimizer`` subclasses.

>>> import torch, polyopt.torch
>>> model = torch.nn.Linear(3, 1)
>>> opt = polyopt.torch.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
>>> model(torch.ones(3)).sum().backward(); opt.step()

Classes: SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW, Adamax, NAdam, RAdam, Lion,
Adafactor, Lamb, Lars, ScheduleFreeAdamW (with eval()/train()), ADOPT, Muon, Ranger (one
rule each, argument names generated from ``polyopt.hyper``) and
the wrappers Lookahead(base_optimizer, k, alpha) and SAM(params,
base_optimizer, rho, adaptive, **base_kwargs) and
SkipNonFinite(base_optimizer, max_consecutive_errors), which take any torch
optimizer. Non-finite gradients: by default they propagate (NaN params), as
in torch.optim; SkipNonFinite skips and counts such steps.
``preset("torch.optim.RMSprop", params, ...)`` builds the polyopt
optimizer that gives a native optimizer's numbers (``polyopt.native.PRESETS``:
torch.optim, Keras, optax).
"""

from __future__ import annotations

from typing import Any

from polyopt import native
from polyopt.torch._optimizer import RuleOptimizer, spelled
from polyopt.torch.nonfinite import SkipNonFinite
from polyopt.torch.optimizers import (
    ADOPT,
    OPTIMIZERS,
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
    Muon,
    NAdam,
    RAdam,
    Ranger,
    RMSprop,
    ScheduleFreeAdamW,
)
from polyopt.torch.wrappers import SAM, Lookahead

__all__ = ["RuleOptimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax",
           "NAdam", "RAdam", "Lion", "Adafactor", "Lamb", "Lars", "ScheduleFreeAdamW", "ADOPT",
           "Muon",
           "Ranger", "Lookahead", "SAM",
           "SkipNonFinite", "preset"]


def preset(name: str, params, **kwargs: Any) -> RuleOptimizer:
    """The polyopt optimizer with the numbers of native optimizer ``name``.

    ``name`` is a key of ``polyopt.native.PRESETS`` ("torch.optim.RMSprop",
    "keras.optimizers.Adam", "optax.adamw", ...); ``kwargs`` are torch-spelled
    arguments that override the preset's (e.g. ``lr=0.1, momentum=0.9``).
    """
    try:
        rule, options = native.PRESETS[name]
    except KeyError:
        raise KeyError(f"no preset {name!r}; known: {sorted(native.PRESETS)}") from None
    cls = OPTIMIZERS[rule]
    # an argument given through a value alias that sets others overrides those too
    names = {a.name: h.name for a in cls._args for i, h in a.hypers if i is None}
    given = {names[k]: v for k, v in kwargs.items() if k in names}
    options = cls.spec.overridden(options, given, "torch")
    options.update(native.linked(name, given))  # the native's one argument for both
    return cls(params, **{**spelled(cls, options), **kwargs})
