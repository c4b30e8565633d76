"""The experiments of the matrix (from the seed posts), framework-neutral.

Each :class:`Experiment` names a model (examples/models), a dataset
(examples/data), a batch size, default epochs, and an optimizer as a polyopt
rule (:func:`build_rule`) with its learning-rate policy: constant, a per-step
schedule (one-cycle), a per-epoch schedule (ramp-up/sustain/exp-decay), and
optionally Keras-style ReduceLROnPlateau and EarlyStopping on the test loss.

Frameworks get their optimizer from one hook, ``examples.optimizers.make_optimizer``;
everything else (data order, learning rate per step, callbacks) is decided
here and in examples/train.py, identically for every framework.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polyopt import hyper, rules, schedules


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment; ``optimizer`` is a polyopt rule name (``lookahead-radam``,
    ``sam-adam`` wrap the second name)."""

    name: str
    model: str                    # mlp | cnn | resnet20
    dataset: str                  # mnist | cifar10
    batch_size: int
    epochs: int                   # the full run; the CLI's --epochs overrides it
    optimizer: str
    options: dict = dataclasses.field(default_factory=dict)   # rule arguments
    wrapper: dict = dataclasses.field(default_factory=dict)   # lookahead / sam arguments
    schedule: str | None = None   # None | "one_cycle" (per step) | "rampup" (per epoch)
    schedule_options: dict = dataclasses.field(default_factory=dict)
    plateau: dict | None = None   # schedules.reduce_on_plateau arguments (Keras convention)
    early_stopping: dict | None = None  # {"patience": int, "restore_best": bool}
    note: str = ""

    def config(self) -> dict[str, Any]:
        """A JSON-ready description (goes into the run record)."""
        return dataclasses.asdict(self)


_CALLBACKS = {"plateau": {"factor": 0.5, "patience": 3},
              "early_stopping": {"patience": 10, "restore_best": True}}

EXPERIMENTS = {e.name: e for e in [
    Experiment("mnist-adadelta", "mlp", "mnist", 128, 12, "adadelta",
               note="AdaDelta with the paper's defaults (lr 1.0, rho 0.95, eps 1e-6)"),
    Experiment("mnist-adam", "mlp", "mnist", 128, 12, "adam", {"learning_rate": 1e-3}),
    Experiment("cifar-ranger", "cnn", "cifar10", 100, 10, "lookahead-radam",
               {"learning_rate": 1e-3}, {"sync_period": 6, "slow_step_size": 0.5},
               note="Ranger as in the post: Lookahead(RAdam), k=6, alpha=0.5"),
    Experiment("cifar-adam", "cnn", "cifar10", 100, 10, "adam", {"learning_rate": 1e-3}),
    Experiment("cifar-onecycle", "cnn", "cifar10", 100, 10, "sgd", {"momentum": 0.9},
               schedule="one_cycle", schedule_options={"max_value": 0.05},
               note="torch OneCycleLR convention (cosine, pct_start 0.3), per step; "
                    "momentum not cycled"),
    Experiment("cifar-rampup", "cnn", "cifar10", 100, 10, "adam",
               schedule="rampup",
               schedule_options={"lr_start": 1e-4, "lr_max": 2e-3, "lr_min": 1e-4,
                                 "rampup": 3, "sustain": 2, "decay": 0.8},
               note="ramp-up/sustain/exponential decay, per epoch (LearningRateScheduler)"),
    Experiment("resnet20-sam", "resnet20", "cifar10", 128, 40, "sam-adam",
               {"learning_rate": 1e-3}, {"rho": 0.05}, **_CALLBACKS),
    Experiment("resnet20-adam", "resnet20", "cifar10", 128, 40, "adam",
               {"learning_rate": 1e-3}, **_CALLBACKS),
]}


#: One experiment per model family for each rule beyond the seed set: not in the
#: main command's matrix (which trains the seed posts' experiments; cifar-muon is the
#: exception, below), but run in float64 by the tests in every framework, where the
#: three must agree exactly (``python -m examples.matrix --experiments mnist-lion,...``
#: runs them in full).
#: Schedule-Free is evaluated at its training point y in every framework (as
#: keras.optimizers.ScheduleFreeAdamW does under ``fit``/``evaluate``).
RULE_CHECKS = {e.name: e for e in [
    Experiment(f"{prefix}-{rule}", model, data, batch, epochs, rule, options)
    for rule, options in [
        ("lion", {"learning_rate": 1e-4}),
        ("adafactor", {}),                       # the relative step, capped at 1e-2
        ("lamb", {"learning_rate": 1e-3, "weight_decay": 0.01}),
        ("lars", {"learning_rate": 1.0, "weight_decay": 1e-4}),
        ("adopt", {"learning_rate": 1e-3}),
        ("schedule_free_adamw", {"learning_rate": 2.5e-3}),
        # the reference's learning rates (Muon 0.02, its AdamW 3e-4 for the biases),
        # Newton-Schulz in the params' dtype (float64 runs iterate in float64)
        ("muon", {"learning_rate": 0.02}),
    ]
    for prefix, model, data, batch, epochs in [("mnist", "mlp", "mnist", 128, 12),
                                               ("cifar", "cnn", "cifar10", 100, 10)]
]}

#: Muon is also a row of the main command's matrix, on the seed CIFAR CNN (its float32
#: accuracy beside Adam's and Ranger's): the same experiment as its rule check
EXPERIMENTS["cifar-muon"] = RULE_CHECKS["cifar-muon"]

KNOWN = {**EXPERIMENTS, **RULE_CHECKS}


def get(name: str) -> Experiment:
    """The experiment called ``name`` (ValueError listing the known ones)."""
    if name not in KNOWN:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def base_learning_rate(experiment: Experiment) -> float:
    """The learning rate before any schedule or plateau (the rule's default if unset)."""
    if "learning_rate" in experiment.options:
        return float(experiment.options["learning_rate"])
    spec = hyper.SPECS[experiment.optimizer.rsplit("-", 1)[-1]]
    return float(next(h.default for h in spec.hypers if h.name == "learning_rate"))


class LearningRate:
    """The learning rate of every step: schedule x plateau, decided on the host.

    ``at(step, epoch)`` is the value for the optimizer step ``step`` (0 first)
    in epoch ``epoch`` (0 first); ``end_epoch(test_loss)`` feeds the plateau
    controller.
    """

    def __init__(self, experiment: Experiment, total_steps: int) -> None:
        self.experiment = experiment
        options = experiment.schedule_options
        if experiment.schedule == "one_cycle":
            self.schedule = schedules.one_cycle(total_steps=max(total_steps, 2),
                                                convention="torch", **options)
        elif experiment.schedule == "rampup":
            self.schedule = schedules.rampup_sustain_decay(**options)
        elif experiment.schedule is None:
            self.schedule = None
        else:
            raise ValueError(f"unknown schedule {experiment.schedule!r}")
        self.base = base_learning_rate(experiment)
        self.controller = (schedules.reduce_on_plateau(convention="keras", **experiment.plateau)
                           if experiment.plateau else None)
        self.plateau = self.controller.init(self.base) if self.controller else None

    def at(self, step: int, epoch: int) -> float:
        if self.experiment.schedule == "one_cycle":
            return float(self.schedule(step))
        if self.experiment.schedule == "rampup":
            return float(self.schedule(epoch))
        return float(self.plateau.learning_rate) if self.plateau else self.base

    def end_epoch(self, test_loss: float) -> None:
        if self.controller:
            self.plateau = self.controller.update(self.plateau, test_loss)


class EarlyStopping:
    """Keras's EarlyStopping on the test loss (min_delta 0): stop after ``patience``
    epochs without improvement; remembers the best epoch for ``restore_best``."""

    def __init__(self, patience: int, restore_best: bool = True) -> None:
        self.patience, self.restore_best = patience, restore_best
        self.best, self.best_epoch, self.wait = float("inf"), -1, 0

    def end_epoch(self, epoch: int, test_loss: float) -> tuple[bool, bool]:
        """(improved, stop) after ``epoch``."""
        if test_loss < self.best:
            self.best, self.best_epoch, self.wait = test_loss, epoch, 0
            return True, False
        self.wait += 1
        return False, self.wait >= self.patience


def build_rule(experiment: Experiment, learning_rate: Any):
    """The polyopt rule of ``experiment`` with ``learning_rate`` (a number or 0-d array)."""
    outer, _, inner = experiment.optimizer.rpartition("-")
    options = {**experiment.options, "learning_rate": learning_rate}
    rule = getattr(rules, inner)(**options)
    if outer == "lookahead":
        return rules.lookahead(rule, **experiment.wrapper)
    if outer == "sam":
        return rules.sam(rule, **experiment.wrapper)
    if outer:
        raise ValueError(f"unknown optimizer wrapper {outer!r} in {experiment.optimizer!r}")
    return rule
