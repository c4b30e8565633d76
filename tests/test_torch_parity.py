"""polyopt.torch against the real torch.optim optimizers, side by side.

Every algorithm torch.optim has, with the options that reproduce torch's
conventions (``polyopt.torch.preset("torch.optim.X", ...)``, from
``polyopt.native.PRESETS``), runs next to the native optimizer for 200 steps
of the same random gradients on four params of shapes (5, 3), (3,),
(2, 2, 3), () whose gradient scales span 1 .. 1e-5 (so every eps shows).
Final params agree to 1e-10 (float64) and 1e-5 (float32) relative, also
with lr schedulers stepping every step (LambdaLR, ExponentialLR, StepLR,
SequentialLR, ReduceLROnPlateau, OneCycleLR cycling momentum or betas[0]).

``python -m tests.test_torch_parity`` prints the parity table of docs/torch.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

import polyopt.torch as pt

SHAPES = ((5, 3), (3,), (2, 2, 3), ())
STEPS = 200
DTYPES = ("float64", "float32")
TOL = {"float64": 1e-10, "float32": 1e-5}
T = torch.optim


def _make_problem(seed: int = 4):
    rng = np.random.default_rng(seed)
    params = [rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.5, size=s) for s in SHAPES]
    scales = (1.0, 1e-3, 0.1, 1e-5)
    drifts = [rng.standard_normal(s) for s in SHAPES]
    grads = []
    for t in range(STEPS):
        decay = 0.2 + 1.5 * math.exp(-t / 40)
        grads.append([c * decay * (rng.standard_normal(s) + 0.5 * d)
                      for s, c, d in zip(SHAPES, scales, drifts)])
    return [np.asarray(p) for p in params], [[np.asarray(g) for g in step] for step in grads]


PARAMS, GRADS = _make_problem()
# a validation loss for ReduceLROnPlateau: falls, then stalls (so it reduces lr)
METRIC = [1.0 / (1 + t) if t < 60 else 0.02 + 0.001 * math.sin(t) for t in range(STEPS)]


def max_rel_diff(actual, expected) -> float:
    """max |a - e| / max(|e|, 0.1) (params stay near |p| ~ 1)."""
    return max(float(np.max(np.abs(a - e) / np.maximum(np.abs(e), 0.1)))
               for a, e in zip(actual, expected))


def run(make: Callable, dtype: str, scheduler: Callable | None = None,
        plateau: bool = False) -> tuple[list, list]:
    """Final params and, per step, the first group's (lr, momentum or betas)."""
    params = [torch.tensor(p, dtype=getattr(torch, dtype), requires_grad=True) for p in PARAMS]
    opt = make(params)
    sched = scheduler(opt) if scheduler is not None else None
    seen = []
    for t, grads in enumerate(GRADS):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=p.dtype)
        group = opt.param_groups[0]
        seen.append((group["lr"], group.get("momentum", group.get("betas"))))
        opt.step()
        if sched is not None:
            sched.step(METRIC[t]) if plateau else sched.step()
    return [p.detach().numpy().astype(np.float64) for p in params], seen


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    native: str  # torch.optim class name
    kwargs: dict  # the same torch arguments for both
    native_only: dict = dataclasses.field(default_factory=dict)
    polyopt_only: dict = dataclasses.field(default_factory=dict)
    scheduler: Callable | None = None
    plateau: bool = False
    preset: str | None = None  # polyopt.native.PRESETS key, default torch.optim.<native>

    def make_native(self, params):
        return getattr(T, self.native)(params, **self.kwargs, **self.native_only)

    def make_polyopt(self, params):
        return pt.preset(self.preset or f"torch.optim.{self.native}", params,
                         **self.kwargs, **self.polyopt_only)

    def __str__(self) -> str:
        return self.id


FACTORS = [(1.0 + 0.6 * math.sin(0.37 * t)) / (1.0 + 0.01 * t) for t in range(STEPS + 1)]


def lambda_lr(opt):
    return T.lr_scheduler.LambdaLR(opt, lambda t: FACTORS[t])


def one_cycle(opt):
    return T.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1,
                                     base_momentum=0.8, max_momentum=0.95)


def sequential(opt):
    return T.lr_scheduler.SequentialLR(opt, [
        T.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=20),
        T.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 20, eta_min=1e-4)], milestones=[20])


CASES = [
    Case("SGD", "SGD", {"lr": 0.05}),
    Case("SGD momentum", "SGD", {"lr": 0.05, "momentum": 0.9}),
    Case("SGD nesterov", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    Case("SGD dampening", "SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Case("SGD weight_decay", "SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    Case("Adagrad", "Adagrad", {"lr": 0.1}),
    Case("Adagrad lr_decay, init, wd", "Adagrad",
         {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-6,
          "weight_decay": 0.01}),
    Case("RMSprop", "RMSprop", {"lr": 0.01}),
    Case("RMSprop centered", "RMSprop", {"lr": 0.01, "centered": True}),
    Case("RMSprop momentum", "RMSprop", {"lr": 0.01, "momentum": 0.9}),
    Case("RMSprop centered momentum wd", "RMSprop",
         {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "centered": True, "momentum": 0.9,
          "weight_decay": 0.01}),
    Case("Adadelta", "Adadelta", {}),
    Case("Adadelta options", "Adadelta", {"lr": 0.5, "rho": 0.95, "eps": 1e-5,
                                          "weight_decay": 0.01}),
    Case("Adam", "Adam", {"lr": 0.01}),
    Case("Adam amsgrad", "Adam", {"lr": 0.01, "amsgrad": True}),
    Case("Adam weight_decay", "Adam", {"lr": 0.01, "weight_decay": 0.01}),
    Case("AdamW", "AdamW", {"lr": 0.01}),
    Case("AdamW amsgrad", "AdamW", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    Case("Adamax", "Adamax", {"lr": 0.01}),
    Case("NAdam", "NAdam", {"lr": 0.01}),
    Case("NAdam decoupled wd", "NAdam", {"lr": 0.01, "weight_decay": 0.01,
                                         "momentum_decay": 0.01},
         native_only={"decoupled_weight_decay": True},
         polyopt_only={"weight_decay_mode": "decoupled"}),
    Case("RAdam", "RAdam", {"lr": 0.01}),
    Case("RAdam decoupled wd", "RAdam", {"lr": 0.01, "weight_decay": 0.01},
         native_only={"decoupled_weight_decay": True},
         polyopt_only={"weight_decay_mode": "decoupled"}),
    # schedulers: lr (and momentum) change at every step
    Case("SGD momentum + LambdaLR", "SGD", {"lr": 0.05, "momentum": 0.9}, scheduler=lambda_lr),
    Case("Adam + LambdaLR", "Adam", {"lr": 0.01}, scheduler=lambda_lr),
    Case("RMSprop momentum + ExponentialLR", "RMSprop", {"lr": 0.01, "momentum": 0.9},
         scheduler=lambda opt: T.lr_scheduler.ExponentialLR(opt, 0.98)),
    Case("Adagrad + StepLR", "Adagrad", {"lr": 0.1},
         scheduler=lambda opt: T.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)),
    Case("AdamW + SequentialLR", "AdamW", {"lr": 0.01}, scheduler=sequential),
    Case("SGD + ReduceLROnPlateau", "SGD", {"lr": 0.05, "momentum": 0.9},
         scheduler=lambda opt: T.lr_scheduler.ReduceLROnPlateau(opt, patience=5, factor=0.5),
         plateau=True),
    Case("SGD nesterov + OneCycleLR (momentum)", "SGD",
         {"lr": 0.05, "momentum": 0.9, "nesterov": True}, scheduler=one_cycle),
    Case("RMSprop + OneCycleLR (momentum)", "RMSprop", {"lr": 0.01, "momentum": 0.9},
         scheduler=one_cycle),
    Case("Adam + OneCycleLR (betas[0])", "Adam", {"lr": 0.01}, scheduler=one_cycle),
    Case("NAdam + OneCycleLR (betas[0])", "NAdam", {"lr": 0.01}, scheduler=one_cycle),
]


def _runs(case: Case, dtype: str, make: Callable) -> tuple[list, list]:
    # (torch NAdam keeps mu_product in float32 under torch's default dtype: the
    # preset's momentum_product_dtype="float32" does the same)
    return run(make, dtype, case.scheduler, case.plateau)


def compare(case: Case, dtype: str, errors: bool = False) -> dict:
    """Max relative differences: polyopt from native (same dtype), how far native
    moved, and in float32 (when ``errors`` or beyond TOL) how far each float32
    run is from native float64."""
    native, native_seen = _runs(case, dtype, case.make_native)
    ours, ours_seen = _runs(case, dtype, case.make_polyopt)
    assert ours_seen == native_seen  # the schedulers drove both the same way
    out = {"diff": max_rel_diff(ours, native), "moved": max_rel_diff(native, PARAMS)}
    if dtype == "float32" and (errors or out["diff"] > TOL[dtype]):
        exact, _ = _runs(case, "float64", case.make_native)
        out["native_error"] = max_rel_diff(native, exact)
        out["our_error"] = max_rel_diff(ours, exact)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_optim(case, dtype):
    result = compare(case, dtype)
    assert result["moved"] > 1e-2  # the run goes somewhere
    if "native_error" in result:
        # Two float32 runs may differ by more than TOL through their own
        # rounding (centered RMSprop: v - mean^2 cancels for the 1e-5-scale
        # param; torch.optim's float32 AdamW drifts 7e-6 from its float64 run):
        # then polyopt must be no further from the exact (float64) result than
        # torch.optim's float32 run is, within the tolerance.
        assert result["our_error"] <= result["native_error"] + TOL[dtype], result
    else:
        assert result["diff"] <= TOL[dtype], f"{case} {dtype}: {result}"


def test_schedulers_really_change_the_hyperparameters():
    _, seen = run(CASES[-2].make_polyopt, "float64", one_cycle)  # Adam + OneCycleLR
    assert len({lr for lr, _ in seen}) > STEPS // 2
    assert len({betas[0] for _, betas in seen}) > STEPS // 2
    _, seen = run(lambda ps: pt.SGD(ps, lr=0.05, momentum=0.9), "float64", one_cycle)
    assert len({m for _, m in seen}) > STEPS // 2
    plateau = next(c for c in CASES if c.plateau)
    _, seen = run(plateau.make_polyopt, "float64", plateau.scheduler, plateau=True)
    assert len({lr for lr, _ in seen}) >= 3  # ReduceLROnPlateau reduced lr at least twice


def test_a_wrong_convention_is_caught():
    """The problem tells torch's conventions apart: polyopt's own defaults for
    RMSprop (eps inside the sqrt, velocity momentum) miss torch.optim.RMSprop."""
    native, _ = run(lambda ps: T.RMSprop(ps, lr=0.01, momentum=0.9), "float64")
    ours, _ = run(lambda ps: pt.RMSprop(ps, lr=0.01, alpha=0.99, momentum=0.9), "float64")
    assert max_rel_diff(ours, native) > 1e-6


def table() -> str:
    rows = ["| torch.optim run (200 steps) | float64 | float32 | float32 runs vs torch.optim "
            "float64: torch / polyopt |", "|---|---|---|---|"]
    for case in CASES:
        r64, r32 = compare(case, "float64"), compare(case, "float32", errors=True)
        rows.append(f"| {case.id} | {r64['diff']:.1e} | {r32['diff']:.1e} | "
                    f"{r32['native_error']:.1e} / {r32['our_error']:.1e} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())


S = T.lr_scheduler
EVERY_SCHEDULER = {
    "StepLR": lambda o: S.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[10, 30], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=20),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=30),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.97),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=40, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=25),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2),
    "CyclicLR (cycles momentum)": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1,
                                                       step_size_up=8),
    "OneCycleLR linear, three phases": lambda o: S.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS + 1, anneal_strategy="linear", three_phase=True),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.99),
                                                      S.StepLR(o, step_size=9, gamma=0.7)]),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda t: FACTORS[t]),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda t: 0.98),
}


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
@pytest.mark.parametrize("name", EVERY_SCHEDULER)
def test_every_lr_scheduler(name, optimizer):
    """Every torch.optim.lr_scheduler drives polyopt.torch as it drives torch.optim
    (CyclicLR and OneCycleLR also cycle SGD's momentum and Adam's betas[0])."""
    kw = {"lr": 0.05, "momentum": 0.9} if optimizer == "SGD" else {"lr": 0.01}
    case = Case(name, optimizer, kw, scheduler=EVERY_SCHEDULER[name])
    result = compare(case, "float64")
    assert result["diff"] <= TOL["float64"] and result["moved"] > 1e-2
