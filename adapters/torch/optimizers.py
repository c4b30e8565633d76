"""The polyopt rules as torch optimizers: one spec and one rule factory each.

Defaults are polyopt's (the same in every adapter). Where they differ from
torch.optim's, the class docstring says which arguments reproduce torch.optim
(``polyopt.native.PRESETS``); ``polyopt.torch.preset("torch.optim.RMSprop",
params)`` builds that directly.
"""

from __future__ import annotations

import torch

from polyopt import hyper, rules
from polyopt.rules import _state
from polyopt.torch._common import _LOW_PRECISION
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


class Adafactor(RuleOptimizer):
    """Adafactor: :func:`polyopt.rules.adafactor`. State per param: ``step``,
    ``row_var`` and ``col_var`` (a factored param: its row and column means of
    g^2, shaped like the param without its reduction axes and without its
    output axes, in the default ``factoring='layout'``; empty otherwise),
    ``variance`` (a param not factored: its full second moment; empty
    otherwise), ``momentum_buffer`` (with momentum).

    The default factoring reads each param's layout: a group's ``"layout"``
    (:class:`polyopt.rules.Layout`), else torch's, output axis 0. torch.optim's
    own factoring (the last two axes) is ``factoring="last_two"``.
    """

    spec = hyper.ADAFACTOR
    factory = staticmethod(rules.adafactor)
    state_names = {"v_row": "row_var", "v_col": "col_var", "v": "variance"}
    complex_params = False  # torch.optim.Adafactor refuses them (RuntimeError at the step)


class Lamb(RuleOptimizer):
    """LAMB: :func:`polyopt.rules.lamb` (torch has no native LAMB). State: ``step``,
    ``exp_avg``, ``exp_avg_sq``. Per-tensor trust ratios: a param group with
    ``trust_ratio=False`` (and/or ``weight_decay=0``) leaves e.g. biases out, as
    optax's masks do. ``compiled=True`` runs the norms on each param's view of
    the flat buffers.
    """

    spec = hyper.LAMB
    factory = staticmethod(rules.lamb)


class Lars(RuleOptimizer):
    """LARS: :func:`polyopt.rules.lars` (torch has no native LARS). State: ``step``,
    ``momentum_buffer``. A param group with ``trust_ratio=False`` and/or
    ``weight_decay=0`` plays the role of optax's ``trust_ratio_mask`` /
    ``weight_decay_mask``.
    """

    spec = hyper.LARS
    factory = staticmethod(rules.lars)


class ScheduleFreeAdamW(RuleOptimizer):
    """Schedule-Free AdamW: :func:`polyopt.rules.schedule_free_adamw`, with the
    reference implementation's (facebookresearch/schedule_free) modes:
    ``optimizer.eval()`` puts the params at the evaluation point x (call it
    before evaluating or saving a checkpoint), ``optimizer.train()`` puts them
    back at y (call it before training again). ``step()`` in eval mode raises.
    Each param group keeps its mode in ``group["train_mode"]``, so a
    ``state_dict`` saved in either mode loads back in that mode. Unlike the
    reference, a new optimizer starts in train mode (the reference requires a
    first ``train()``; calling it here is harmless).

    State: ``step``, ``z``, ``exp_avg_sq``, and the 0-d ``b1`` (the b1 the
    params were interpolated with), ``weight_sum``, ``max_lr`` (the
    reference keeps the last three, and ``k``, in the param group).
    """

    spec = hyper.SCHEDULE_FREE_ADAMW
    factory = staticmethod(rules.schedule_free_adamw)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            mode = param_group.setdefault("train_mode", True)
            if not isinstance(mode, bool):
                raise TypeError(f"{self.spec.name}: train_mode must be True or False, "
                                f"got train_mode={mode!r}")
        super().add_param_group(param_group)

    def step(self, closure=None):
        """One step at the training point y; raises in eval mode (nothing changes)."""
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"polyopt.torch.{type(self).__name__}.step: param group {index} is in "
                    f"eval mode (its params are the evaluation point x): call "
                    f"optimizer.train() before training steps")
        return super().step(closure)

    @torch.no_grad()
    def eval(self) -> None:
        """Params -> x = (y - (1 - b1) z) / b1 (groups already in eval mode stay)."""
        self._swap(False, rules.schedule_free_eval_params)

    @torch.no_grad()
    def train(self) -> None:
        """Params -> y = b1 x + (1 - b1) z (groups already in train mode stay)."""
        self._swap(True, rules.schedule_free_train_params)

    def _swap(self, train: bool, move) -> None:
        for index, group in enumerate(self.param_groups):
            if group["train_mode"] == train:
                continue
            layout = self._layout(self._group_values(index, group))
            for p in group["params"]:
                st = self.state.get(p, {})
                if "z" not in st:  # no step yet: x = y = z
                    continue
                work = p.detach().float() if p.dtype in _LOW_PRECISION else p.detach()
                p.copy_(move([work], self._tree(layout, [st]))[0])
            group["train_mode"] = train

    def _checked(self, state_dict: dict):
        state, groups = super()._checked(state_dict)
        for index, group in enumerate(groups):
            mode = group.setdefault("train_mode", True)
            if not isinstance(mode, bool):
                raise TypeError(
                    f"polyopt.torch.{type(self).__name__}.load_state_dict: param group "
                    f"{index}: train_mode must be True or False, got train_mode={mode!r}")
        return state, groups


class ADOPT(RuleOptimizer):
    """ADOPT: :func:`polyopt.rules.adopt` (torch has no native ADOPT). State:
    ``step``, ``exp_avg``, ``exp_avg_sq``. The first step only fills exp_avg_sq.
    """

    spec = hyper.ADOPT
    factory = staticmethod(rules.adopt)


class Muon(RuleOptimizer):
    """Muon: :func:`polyopt.rules.muon`. Each param's matrix is (output axes, reduction
    axes) of its layout (a group's ``"layout"``, else torch's: output axis 0), so a
    Conv2d kernel is (out, in*kh*kw) (torch.optim.Muon refuses it; on the kernel's
    (out, -1) view it gives the same numbers). Params that are not Muon matrices take
    an AdamW step with the ``adam_*`` options: 0-d and 1-D params, and every param of
    a group with ``muon_params="none"`` (or ``"layout": polyopt.rules.NOT_A_MATRIX``)
    for e.g. the embeddings and the head, as the reference's ``use_muon=False`` groups;
    what torch needs two optimizers for (torch.optim.Muon and AdamW) is one here.
    ``torch.optim.Muon``'s numbers: ``polyopt.native.PRESETS['torch.optim.Muon']``. State: ``step``,
    ``momentum_buffer`` (Muon params; empty for the others) and the Adam part's
    ``adam.step``, ``exp_avg``, ``exp_avg_sq`` (empty for the Muon params).
    """

    spec = hyper.MUON
    factory = staticmethod(rules.muon)
    state_names = {"momentum": "momentum_buffer", "adam.count": "adam.step",
                   "adam.first_moment": "exp_avg", "adam.second_moment": "exp_avg_sq",
                   "adam.max_second_moment": "max_exp_avg_sq"}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        values = self._group_values(len(self.param_groups) - 1, group)
        if values["muon_params"] != "all":
            return
        vector = group.get("layout") is not None and _state.is_not_a_matrix(group["layout"])
        for i, p in enumerate(group["params"]):
            if p.ndim < 2 or vector:
                said = " and the group's layout NOT_A_MATRIX" if vector else ""
                raise ValueError(
                    f"polyopt.torch.Muon: param group {len(self.param_groups) - 1}, params[{i}] "
                    f"has shape {tuple(p.shape)}{said}: with muon_params='all' every param "
                    f"must be a matrix (2 or more axes); give the others muon_params="
                    f"'matrices' or 'none' (an AdamW step)")


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
                                             Adamax, NAdam, RAdam, Lion, Adafactor, Lamb,
                                             Lars, ScheduleFreeAdamW, ADOPT, Muon,
                                             Ranger)}
