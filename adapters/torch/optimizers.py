"""The polyopt rules as torch optimizers: one spec and one rule factory each.

Defaults are polyopt's (the same in every adapter). Where they differ from
torch.optim's, the class docstring says which arguments reproduce torch.optim
(``polyopt.native.PRESETS``); ``polyopt.torch.preset("torch.optim.RMSprop",
params)`` builds that directly.
"""

from __future__ import annotations

import torch

from polyopt import hyper, rules
from polyopt.torch._optimizer import RuleOptimizer


def _positive(value) -> bool:
    return bool(value > 0) if isinstance(value, torch.Tensor) else value > 0


class SGD(RuleOptimizer):
    """SGD with (Nesterov) momentum and dampening: :func:`polyopt.rules.sgd`.

    State per param: ``step``, ``momentum_buffer`` (with momentum). polyopt's
    default lr is 0.01 (torch.optim.SGD: 0.001).
    """

    spec = hyper.SGD
    factory = staticmethod(rules.sgd)

    def _torch_check(self, owner: str, values: dict) -> None:
        # torch.optim.SGD's own check (its error type): optax and Keras allow both
        if values["nesterov"] and not (_positive(
                values["momentum"]) and values["dampening"] == 0):
            raise ValueError(f"{owner}: Nesterov momentum requires a momentum and zero "
                             f"dampening, got momentum={values['momentum']!r}, "
                             f"dampening={values['dampening']!r}")


class Adagrad(RuleOptimizer):
    """AdaGrad: :func:`polyopt.rules.adagrad`. State: ``step``, ``sum``."""

    spec = hyper.ADAGRAD
    factory = staticmethod(rules.adagrad)


class RMSprop(RuleOptimizer):
    """RMSprop, optionally centered, with momentum: :func:`polyopt.rules.rmsprop`.

    State: ``step``, ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer``.
    polyopt's defaults are the paper's and Keras's/optax's (alpha 0.9, eps inside
    the sqrt, lr-scaled momentum 'velocity'); torch.optim.RMSprop's are listed below.
    """

    spec = hyper.RMSPROP
    factory = staticmethod(rules.rmsprop)


class Adadelta(RuleOptimizer):
    """AdaDelta: :func:`polyopt.rules.adadelta`. State: ``step``, ``square_avg``,
    ``acc_delta``. polyopt's rho is the paper's 0.95 (torch.optim: 0.9)."""

    spec = hyper.ADADELTA
    factory = staticmethod(rules.adadelta)


class Adam(RuleOptimizer):
    """Adam (and AMSGrad with ``amsgrad=True``): :func:`polyopt.rules.adam`.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).
    """

    spec = hyper.ADAM
    factory = staticmethod(rules.adam)


class AdamW(RuleOptimizer):
    """AdamW, decoupled weight decay p -= lr*wd*p: :func:`polyopt.rules.adamw`."""

    spec = hyper.ADAMW
    factory = staticmethod(rules.adamw)


class Adamax(RuleOptimizer):
    """Adamax: :func:`polyopt.rules.adamax`. State: ``step``, ``exp_avg``, ``exp_inf``."""

    spec = hyper.ADAMAX
    factory = staticmethod(rules.adamax)


class NAdam(RuleOptimizer):
    """NAdam with Dozat's momentum schedule: :func:`polyopt.rules.nadam`.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``mu_product`` (in the
    params' compute dtype; torch.optim keeps it in the default dtype).
    torch's ``decoupled_weight_decay=True`` is ``weight_decay_mode='decoupled'``.
    """

    spec = hyper.NADAM
    factory = staticmethod(rules.nadam)


class RAdam(RuleOptimizer):
    """RAdam: :func:`polyopt.rules.radam`. State: ``step``, ``exp_avg``, ``exp_avg_sq``.

    torch's ``decoupled_weight_decay=True`` is ``weight_decay_mode='decoupled'``.
    """

    spec = hyper.RADAM
    factory = staticmethod(rules.radam)


class Lion(RuleOptimizer):
    """Lion: :func:`polyopt.rules.lion` (torch has no native Lion). State: ``step``,
    ``momentum_buffer``.
    """

    spec = hyper.LION
    factory = staticmethod(rules.lion)


class Ranger(RuleOptimizer):
    """Ranger: Lookahead over RAdam with gradient centralization, one rule
    (:func:`polyopt.rules.ranger`; lessw2020's defaults: betas (0.95, 0.999),
    eps 1e-5, k=6, alpha=0.5).

    State: ``step`` (Lookahead's count), ``slow_buffer``, ``exp_avg``,
    ``exp_avg_sq``, ``radam_step`` (RAdam's count: it restarts with
    ``reset_state``) and ``gc_step`` (gradient centralization's).
    """

    spec = hyper.RANGER
    factory = staticmethod(rules.ranger)
    state_names = {"inner.inner.0.count": "gc_step", "inner.inner.1.count": "radam_step",
                   "inner.count": "radam_step"}


OPTIMIZERS = {cls.spec.name: cls for cls in (SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW,
                                             Adamax, NAdam, RAdam, Lion, Ranger)}
