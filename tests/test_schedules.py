"""Tests of polyopt.schedules.

Four kinds: values computed by hand; side by side with the native
implementations at every step (torch OneCycleLR and ReduceLROnPlateau, optax's
schedule functions in float64, Keras's ReduceLROnPlateau in a subprocess with
the JAX backend, since tensorflow and torch must not share a process); the
same values from every array namespace (numpy, array_api_strict, torch, jax
under jit); and every argument check.

Frameworks under test may be named in POLYOPT_FRAMEWORKS (comma separated:
torch, jax/optax, keras/tf); unset means all. A named framework that is not
installed is an error, not a skip.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import array_api_strict
import numpy as np
import pytest

from polyopt import schedules
from polyopt.schedules import (
    PlateauState,
    constant,
    cosine_decay,
    exponential_decay,
    one_cycle,
    one_cycle_momentum,
    rampup_sustain_decay,
    reduce_on_plateau,
    step_decay,
    warmup_cosine_decay,
)
from tests import conftest

REPO = Path(__file__).resolve().parents[1]

# float64 parity bound with the native implementations (relative difference)
EXACT = 1e-12

# The native comparisons need these frameworks under test (POLYOPT_FRAMEWORKS);
# Keras runs in a child process on the jax backend, so it needs jax.
_NEEDS = {"torch": "torch", "jax": "jax", "keras": "jax"}


def _selected(family: str) -> bool:
    return _NEEDS[family] in conftest.frameworks()


def require(module: str, family: str):
    """Import a framework for a test marked ``needs`` (deselected when not under test)."""
    if not _selected(family):
        raise RuntimeError(f"{module} is not under test: mark the test needs({_NEEDS[family]!r})")
    return importlib.import_module(module)


def relative_difference(a: float, b: float) -> float:
    a, b = float(a), float(b)
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def max_relative_difference(got, expected) -> float:
    return max(relative_difference(g, e) for g, e in zip(got, expected, strict=True))


# --------------------------------------------------------------------------
# values by hand


def test_constant_by_hand():
    schedule = constant(0.3)
    assert schedule(0) == 0.3
    assert schedule(10**6) == 0.3
    assert isinstance(schedule(5), float)


def test_step_decay_by_hand():
    schedule = step_decay(0.1, drop=0.5, steps_drop=10)
    expected = {0: 0.1, 9: 0.1, 10: 0.05, 19: 0.05, 20: 0.025, 35: 0.0125}
    for count, value in expected.items():
        assert schedule(count) == pytest.approx(value, rel=1e-15), count


def test_exponential_decay_by_hand():
    schedule = exponential_decay(2.0, transition_steps=4, decay_rate=0.5)
    assert schedule(0) == 2.0
    assert schedule(2) == pytest.approx(2.0 * math.sqrt(0.5), rel=1e-15)
    assert schedule(4) == pytest.approx(1.0, rel=1e-15)
    assert schedule(8) == pytest.approx(0.5, rel=1e-15)

    stairs = exponential_decay(2.0, transition_steps=4, decay_rate=0.5, staircase=True)
    assert [stairs(t) for t in (0, 3, 4, 7, 8)] == [2.0, 2.0, 1.0, 1.0, 0.5]

    delayed = exponential_decay(2.0, transition_steps=4, decay_rate=0.5, transition_begin=3)
    assert delayed(3) == 2.0
    assert delayed(5) == pytest.approx(2.0 * math.sqrt(0.5), rel=1e-15)

    floor = exponential_decay(2.0, transition_steps=4, decay_rate=0.5, end_value=0.6)
    assert floor(4) == pytest.approx(1.0, rel=1e-15)
    assert floor(8) == 0.6  # 0.5 clipped from below
    growth = exponential_decay(1.0, transition_steps=4, decay_rate=2.0, end_value=5.0)
    assert growth(8) == pytest.approx(4.0, rel=1e-15)
    assert growth(12) == 5.0  # 8 clipped from above


def test_cosine_decay_by_hand():
    schedule = cosine_decay(1.0, decay_steps=10, alpha=0.2)
    assert schedule(0) == pytest.approx(1.0, rel=1e-15)
    assert schedule(5) == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-15)
    assert schedule(10) == pytest.approx(0.2, rel=1e-15)
    assert schedule(100) == pytest.approx(0.2, rel=1e-15)
    squared = cosine_decay(2.0, decay_steps=10, exponent=2.0)
    assert squared(5) == pytest.approx(2.0 * 0.25, rel=1e-15)


def test_warmup_cosine_decay_by_hand():
    schedule = warmup_cosine_decay(0.1, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1)
    assert schedule(0) == pytest.approx(0.1, rel=1e-15)
    assert schedule(5) == pytest.approx(0.55, rel=1e-15)
    assert schedule(10) == pytest.approx(1.0, rel=1e-15)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-15)
    assert schedule(110) == pytest.approx(0.1, rel=1e-15)
    assert schedule(500) == pytest.approx(0.1, rel=1e-15)
    no_warmup = warmup_cosine_decay(0.5, 1.0, warmup_steps=0, decay_steps=10)
    assert no_warmup(0) == pytest.approx(1.0, rel=1e-15)
    assert no_warmup(5) == pytest.approx(0.5, rel=1e-15)


def test_one_cycle_torch_by_hand():
    # initial 1/25 = 0.04, final 0.04/1e4 = 4e-6; first phase ends at 0.3*100-1 = 29
    schedule = one_cycle(100, 1.0, pct_start=0.3)
    assert schedule(0) == pytest.approx(0.04, rel=1e-14)
    assert schedule(29) == pytest.approx(1.0, rel=1e-15)
    assert schedule(64) == pytest.approx((1.0 + 4e-6) / 2, rel=1e-14)  # half-way 29 -> 99
    assert schedule(99) == pytest.approx(4e-6, rel=1e-12)
    assert schedule(100) == schedule(99)  # held after the cycle
    assert schedule(10_000) == schedule(99)

    linear = one_cycle(100, 1.0, pct_start=0.3, anneal="linear")
    assert linear(14) == pytest.approx(0.04 + 0.96 * 14 / 29, rel=1e-15)
    assert linear(64) == pytest.approx((1.0 + 4e-6) / 2, rel=1e-14)

    # three phases end at 29, 2*0.3*100-2 = 58 and 99
    three = one_cycle(100, 1.0, pct_start=0.3, anneal="linear", three_phase=True)
    assert three(29) == pytest.approx(1.0, rel=1e-15)
    assert three(43) == pytest.approx(1.0 - 0.96 * 14 / 29, rel=1e-15)
    assert three(58) == pytest.approx(0.04, rel=1e-14)
    assert three(99) == pytest.approx(4e-6, rel=1e-12)


def test_one_cycle_optax_by_hand():
    # phases end at int(0.3*100) = 30 and 100: one step later than torch
    schedule = one_cycle(100, 1.0, pct_start=0.3, convention="optax")
    assert schedule(0) == pytest.approx(0.04, rel=1e-15)
    assert schedule(30) == pytest.approx(1.0, rel=1e-15)
    assert schedule(65) == pytest.approx((1.0 + 4e-6) / 2, rel=1e-14)
    assert schedule(100) == pytest.approx(4e-6, rel=1e-12)
    assert schedule(500) == schedule(100)
    # linear three-phase: 30, int(0.85*100) = 85, 100
    three = one_cycle(100, 1.0, anneal="linear", three_phase=True, convention="optax")
    assert three(30) == pytest.approx(1.0, rel=1e-15)
    assert three(85) == pytest.approx(0.04, rel=1e-14)
    assert three(100) == pytest.approx(4e-6, rel=1e-12)


def test_one_cycle_momentum_by_hand():
    momentum = one_cycle_momentum(100, pct_start=0.3)
    assert momentum(0) == pytest.approx(0.95, rel=1e-15)
    assert momentum(29) == pytest.approx(0.85, rel=1e-15)
    assert momentum(64) == pytest.approx(0.9, rel=1e-15)
    assert momentum(99) == pytest.approx(0.95, rel=1e-15)
    three = one_cycle_momentum(100, pct_start=0.3, three_phase=True)
    assert three(58) == pytest.approx(0.95, rel=1e-15)
    assert three(80) == pytest.approx(0.95, rel=1e-15)


def test_rampup_sustain_decay_by_hand():
    schedule = rampup_sustain_decay(0.1, 0.5, 0.1, rampup=4, sustain=2, decay=0.5)
    expected = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.3, 0.2, 0.15]
    assert [schedule(t) for t in range(10)] == pytest.approx(expected, rel=1e-15)
    assert schedule(1000) == pytest.approx(0.1, rel=1e-15)
    no_ramp = rampup_sustain_decay(0.0, 1.0, 0.0, rampup=0, sustain=0, decay=0.5)
    assert [no_ramp(t) for t in range(3)] == [1.0, 0.5, 0.25]


def _kaggle_lrfn(epoch, start, peak, low, rampup, sustain, decay):
    # the Kaggle TPU notebook's lrfn, verbatim but for the constants' names
    if epoch < rampup:
        lr = (peak - start) / rampup * epoch + start
    elif epoch < rampup + sustain:
        lr = peak
    else:
        lr = (peak - low) * decay ** (epoch - rampup - sustain) + low
    return lr


@pytest.mark.parametrize("args", [
    (1e-5, 5e-5 * 8, 1e-5, 5, 0, 0.8),   # the notebook's constants on 8 TPU cores
    (1e-4, 1e-3, 1e-5, 3, 4, 0.7),
])
def test_rampup_sustain_decay_matches_kaggle_function(args):
    schedule = rampup_sustain_decay(*args)
    got = [schedule(epoch) for epoch in range(60)]
    expected = [_kaggle_lrfn(epoch, *args) for epoch in range(60)]
    assert max_relative_difference(got, expected) <= EXACT


def _keras_step_decay(epoch, initial_lrate, drop, epochs_drop):
    # the classic Keras LearningRateScheduler step-decay function (epoch index as count)
    return initial_lrate * math.pow(drop, math.floor(epoch / epochs_drop))


def test_step_decay_matches_classic_function():
    schedule = step_decay(0.1, 0.5, 10.0)
    got = [schedule(epoch) for epoch in range(100)]
    expected = [_keras_step_decay(epoch, 0.1, 0.5, 10.0) for epoch in range(100)]
    assert max_relative_difference(got, expected) <= EXACT


def test_schedule_config_rebuilds_it():
    for schedule in (one_cycle(50, 0.2, anneal="linear", three_phase=True, convention="optax",
                               pct_final=0.7),
                     exponential_decay(1.0, 3, 0.9, staircase=True, end_value=0.1)):
        again = getattr(schedules, schedule.name)(**schedule.config)
        assert [again(t) for t in range(60)] == [schedule(t) for t in range(60)]
        assert repr(schedule).startswith(schedule.name + "(")


# --------------------------------------------------------------------------
# torch OneCycleLR, side by side


class OneCycleCase(NamedTuple):
    total_steps: int
    max_lr: float
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4


ONE_CYCLE_CASES = [
    OneCycleCase(100, 1.0),
    OneCycleCase(37, 0.37, pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
    OneCycleCase(10, 0.1, pct_start=0.05),   # first phase ends before step 0
    OneCycleCase(50, 0.5, pct_start=0.6),    # three-phase: phases overlap
    OneCycleCase(1, 0.2),
]


def _torch_one_cycle(torch, case: OneCycleCase, anneal: str, three_phase: bool, adam: bool):
    """Learning rates and momenta of a real optimizer driven by OneCycleLR."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    if adam:
        optimizer = torch.optim.Adam([param], lr=0.1)
    else:
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=case.max_lr, total_steps=case.total_steps, pct_start=case.pct_start,
        anneal_strategy=anneal, div_factor=case.div_factor,
        final_div_factor=case.final_div_factor, three_phase=three_phase,
    )
    learning_rates, momenta = [], []
    for _ in range(case.total_steps):
        group = optimizer.param_groups[0]
        learning_rates.append(scheduler.get_last_lr()[0])
        momenta.append(group["betas"][0] if adam else group["momentum"])
        optimizer.step()
        scheduler.step()
    return learning_rates, momenta


@pytest.mark.parametrize("three_phase", [False, True], ids=["two_phase", "three_phase"])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("case", ONE_CYCLE_CASES, ids=str)
@pytest.mark.needs("torch")
def test_one_cycle_matches_torch(case, anneal, three_phase):
    torch = require("torch", "torch")
    native_lr, native_momentum = _torch_one_cycle(torch, case, anneal, three_phase, adam=False)
    schedule = one_cycle(case.total_steps, case.max_lr, pct_start=case.pct_start, anneal=anneal,
                         div_factor=case.div_factor, final_div_factor=case.final_div_factor,
                         three_phase=three_phase, convention="torch")
    momentum = one_cycle_momentum(case.total_steps, pct_start=case.pct_start, anneal=anneal,
                                  three_phase=three_phase, convention="torch")
    counts = range(case.total_steps)
    assert max_relative_difference([schedule(t) for t in counts], native_lr) <= EXACT
    assert max_relative_difference([momentum(t) for t in counts], native_momentum) <= EXACT


@pytest.mark.needs("torch")
def test_one_cycle_momentum_matches_torch_adam_betas():
    torch = require("torch", "torch")
    case = OneCycleCase(60, 0.01, pct_start=0.4)
    _, native = _torch_one_cycle(torch, case, "cos", False, adam=True)
    momentum = one_cycle_momentum(60, pct_start=0.4, base_momentum=0.85, max_momentum=0.95)
    assert max_relative_difference([momentum(t) for t in range(60)], native) <= EXACT


@pytest.mark.needs("torch")
def test_one_cycle_torch_degenerate_case_is_rejected_like_torch():
    torch = require("torch", "torch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    with pytest.raises(ZeroDivisionError):  # 0.1 * 10 - 1 == 0: torch divides 0 by 0
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10, pct_start=0.1)
    with pytest.raises(ValueError, match=r"one_cycle: pct_start \* total_steps must not be 1"):
        one_cycle(10, 1.0, pct_start=0.1)
    one_cycle(10, 1.0, pct_start=0.1, convention="optax")  # defined there


# --------------------------------------------------------------------------
# optax, side by side in float64


@pytest.fixture
def optax_x64():
    """optax with jax_enable_x64 for this test only."""
    jax = require("jax", "jax")
    optax = require("optax", "jax")
    with jax.enable_x64(True):
        yield optax


class OptaxCase(NamedTuple):
    name: str
    native: Callable[[Any], Callable]  # optax module -> optax schedule
    ours: Callable[[], schedules.Schedule]

    def __str__(self) -> str:
        return self.name


OPTAX_HORIZON = 120  # every case ends by step 100; one shape for all (compiled once)

OPTAX_CASES = [
    OptaxCase("cosine_onecycle", lambda o: o.cosine_onecycle_schedule(100, 1.0),
              lambda: one_cycle(100, 1.0, convention="optax")),
    OptaxCase("cosine_onecycle_options",
              lambda o: o.cosine_onecycle_schedule(37, 0.37, pct_start=0.25, div_factor=10.0,
                                                   final_div_factor=100.0),
              lambda: one_cycle(37, 0.37, pct_start=0.25, div_factor=10.0,
                                final_div_factor=100.0, convention="optax")),
    OptaxCase("cosine_onecycle_truncated_boundary",  # int(13.5) = 13
              lambda o: o.cosine_onecycle_schedule(45, 0.45, pct_start=0.3),
              lambda: one_cycle(45, 0.45, pct_start=0.3, convention="optax")),
    OptaxCase("linear_onecycle_truncated_boundaries",  # int(13.5) = 13, int(34.65) = 34
              lambda o: o.linear_onecycle_schedule(45, 0.45, pct_start=0.3, pct_final=0.77),
              lambda: one_cycle(45, 0.45, pct_start=0.3, anneal="linear", three_phase=True,
                                convention="optax", pct_final=0.77)),
    OptaxCase("cosine_onecycle_no_rise", lambda o: o.cosine_onecycle_schedule(20, 1.0, 0.02),
              lambda: one_cycle(20, 1.0, pct_start=0.02, convention="optax")),
    OptaxCase("linear_onecycle", lambda o: o.linear_onecycle_schedule(100, 1.0),
              lambda: one_cycle(100, 1.0, anneal="linear", three_phase=True,
                                convention="optax")),
    OptaxCase("linear_onecycle_options",
              lambda o: o.linear_onecycle_schedule(50, 0.3, pct_start=0.2, pct_final=0.6,
                                                   div_factor=5.0, final_div_factor=50.0),
              lambda: one_cycle(50, 0.3, pct_start=0.2, anneal="linear", three_phase=True,
                                convention="optax", pct_final=0.6, div_factor=5.0,
                                final_div_factor=50.0)),
    OptaxCase("linear_two_phase_piecewise",
              lambda o: o.piecewise_interpolate_schedule(
                  "linear", 1.0 / 25.0, {30: 25.0, 100: 1.0 / (25.0 * 1e4)}),
              lambda: one_cycle(100, 1.0, anneal="linear", convention="optax")),
    OptaxCase("cosine_three_phase_piecewise",
              lambda o: o.piecewise_interpolate_schedule(
                  "cosine", 1.0 / 25.0, {30: 25.0, 85: 1.0 / 25.0, 100: 1.0 / 1e4}),
              lambda: one_cycle(100, 1.0, three_phase=True, convention="optax")),
    OptaxCase("momentum_three_phase_piecewise",
              lambda o: o.piecewise_interpolate_schedule(
                  "linear", 0.95, {30: 0.85 / 0.95, 85: 0.95 / 0.85, 100: 1.0}),
              lambda: one_cycle_momentum(100, anneal="linear", three_phase=True,
                                         convention="optax")),
    OptaxCase("warmup_cosine", lambda o: o.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100),
              lambda: warmup_cosine_decay(0.0, 1.0, 10, 100)),
    OptaxCase("warmup_cosine_options",
              lambda o: o.warmup_cosine_decay_schedule(0.01, 0.3, 7, 50, end_value=0.02,
                                                       exponent=2.0),
              lambda: warmup_cosine_decay(0.01, 0.3, 7, 50, end_value=0.02, exponent=2.0)),
    OptaxCase("warmup_cosine_no_warmup",
              lambda o: o.warmup_cosine_decay_schedule(0.5, 1.0, 0, 30, end_value=0.1),
              lambda: warmup_cosine_decay(0.5, 1.0, 0, 30, end_value=0.1)),
    OptaxCase("cosine_decay",
              lambda o: o.cosine_decay_schedule(0.7, 40, alpha=0.1, exponent=1.5),
              lambda: cosine_decay(0.7, 40, alpha=0.1, exponent=1.5)),
    OptaxCase("exponential", lambda o: o.exponential_decay(1.0, 7, 0.8),
              lambda: exponential_decay(1.0, 7, 0.8)),
    OptaxCase("exponential_staircase",
              lambda o: o.exponential_decay(0.5, 5, 0.5, staircase=True),
              lambda: exponential_decay(0.5, 5, 0.5, staircase=True)),
    OptaxCase("exponential_begin_end",
              lambda o: o.exponential_decay(1.0, 4, 0.7, transition_begin=10, end_value=0.05),
              lambda: exponential_decay(1.0, 4, 0.7, transition_begin=10, end_value=0.05)),
    OptaxCase("exponential_growth_capped",
              lambda o: o.exponential_decay(0.01, 3, 1.5, staircase=True, end_value=0.2),
              lambda: exponential_decay(0.01, 3, 1.5, staircase=True, end_value=0.2)),
]


@pytest.mark.parametrize("case", OPTAX_CASES, ids=str)
@pytest.mark.needs("jax")
def test_matches_optax_float64(case, optax_x64):
    jax = require("jax", "jax")

    native = case.native(optax_x64)
    # jit(vmap): optax as it runs inside a jitted update, one compilation per case
    expected = jax.jit(jax.vmap(native))(jax.numpy.arange(OPTAX_HORIZON))
    assert expected.dtype == jax.numpy.float64  # x64 really on
    ours = case.ours()
    got = [ours(t) for t in range(OPTAX_HORIZON)]
    assert max_relative_difference(got, np.asarray(expected)) <= EXACT


# --------------------------------------------------------------------------
# every namespace gives the values of Python ints

NAMESPACE_CASES = {
    "constant": lambda: constant(0.3),
    "step_decay": lambda: step_decay(0.1, 0.5, 7),
    "exponential": lambda: exponential_decay(1.0, 5, 0.7, transition_begin=3, end_value=0.1),
    "exponential_staircase": lambda: exponential_decay(1.0, 5, 0.7, staircase=True),
    "cosine_decay": lambda: cosine_decay(1.0, 30, alpha=0.1, exponent=2.0),
    "warmup_cosine": lambda: warmup_cosine_decay(0.0, 1.0, 8, 40, end_value=0.05),
    "one_cycle_torch": lambda: one_cycle(40, 1.0, three_phase=True),
    "one_cycle_torch_linear": lambda: one_cycle(40, 1.0, anneal="linear"),
    "one_cycle_optax": lambda: one_cycle(40, 1.0, convention="optax"),
    "one_cycle_optax_linear": lambda: one_cycle(40, 1.0, anneal="linear", three_phase=True,
                                                convention="optax"),
    "momentum": lambda: one_cycle_momentum(40, three_phase=True),
    "rampup": lambda: rampup_sustain_decay(0.1, 0.5, 0.05, 5, 3, 0.8),
}
HORIZON = 50


def _python_values(schedule):
    values = [schedule(t) for t in range(HORIZON)]
    assert all(type(v) is float for v in values)
    return values


def _close_in_float32(got, expected):
    """float32 results: a few ulps of the schedule's largest value."""
    scale = max(abs(v) for v in expected)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=1e-6,
                               atol=1e-6 * scale)


@pytest.mark.parametrize("name", NAMESPACE_CASES)
def test_numpy_and_array_api_strict_counts(name):
    schedule = NAMESPACE_CASES[name]()
    expected = _python_values(schedule)
    for t in range(HORIZON):
        for count in (np.int64(t), np.asarray(t, dtype=np.int32), np.asarray(float(t))):
            value = schedule(count)
            assert value.dtype == np.float64
            assert value.shape == ()
            assert relative_difference(value, expected[t]) <= EXACT
        strict = schedule(array_api_strict.asarray(t))
        assert isinstance(strict, array_api_strict._array_object.Array)
        assert strict.dtype == array_api_strict.float64
        assert relative_difference(float(strict), expected[t]) <= EXACT
    strict32 = schedule(array_api_strict.asarray(3.0, dtype=array_api_strict.float32))
    assert strict32.dtype == array_api_strict.float32  # a floating count keeps its dtype
    vector = schedule(np.arange(HORIZON))  # elementwise, for plots
    assert max_relative_difference(vector, expected) <= EXACT


@pytest.mark.parametrize("name", NAMESPACE_CASES)
@pytest.mark.needs("torch")
def test_torch_tensor_counts(name):
    torch = require("torch", "torch")
    schedule = NAMESPACE_CASES[name]()
    expected = _python_values(schedule)
    got64, got32 = [], []
    for t in range(HORIZON):
        value = schedule(torch.tensor(t))
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64 and value.shape == ()
        got64.append(value.item())
        value32 = schedule(torch.tensor(float(t), dtype=torch.float32))
        assert value32.dtype == torch.float32
        got32.append(value32.item())
    assert max_relative_difference(got64, expected) <= EXACT
    _close_in_float32(got32, expected)


@pytest.mark.parametrize("name", NAMESPACE_CASES)
@pytest.mark.needs("jax")
def test_jax_traced_counts(name):
    jax = require("jax", "jax")
    jnp = jax.numpy
    schedule = NAMESPACE_CASES[name]()
    expected = _python_values(schedule)
    # jax without x64 (conftest turns x64 on for the session): float32
    with jax.enable_x64(False):
        got = jax.jit(jax.vmap(schedule))(jnp.arange(HORIZON))
        assert got.dtype == jnp.float32
    _close_in_float32(np.asarray(got), expected)
    # with x64: float64 and exact
    with jax.enable_x64(True):
        got64 = jax.jit(jax.vmap(schedule))(jnp.arange(HORIZON))
        assert got64.dtype == jnp.float64
        # XLA contracts a*b+c into fused multiply-adds: where a phase ends in
        # cancellation (linear one-cycle near its final value) the last bits
        # differ, so the bound is relative to the schedule's scale
        scale = max(abs(v) for v in expected)
        np.testing.assert_allclose(np.asarray(got64), expected, rtol=EXACT, atol=EXACT * scale)


@pytest.mark.needs("jax")
def test_jax_jit_of_a_0d_count():
    jax = require("jax", "jax")
    schedule = NAMESPACE_CASES["warmup_cosine"]()
    with jax.enable_x64(False):
        value = jax.jit(schedule)(jax.numpy.asarray(7))
        assert value.shape == () and value.dtype == jax.numpy.float32
    assert relative_difference(value, schedule(7)) <= 1e-6
    with jax.enable_x64(True):
        value = jax.jit(schedule)(jax.numpy.asarray(7))
        assert value.dtype == jax.numpy.float64
    assert relative_difference(value, schedule(7)) <= EXACT


def test_schedule_with_an_explicit_namespace():
    schedule = one_cycle(40, 1.0)
    value = schedule(np.asarray(10), xp=schedules._NUMPY)
    assert relative_difference(value, schedule(10)) == 0.0


def test_core_imports_no_framework():
    code = ("import sys, polyopt.schedules; "
            "print([m for m in ('torch', 'jax', 'tensorflow', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------
# the plateau controller: by hand


def _run(controller, learning_rate, metrics):
    state = controller.init(learning_rate)
    states = []
    for metric in metrics:
        state = controller.update(state, metric)
        states.append(state)
    return states


def test_plateau_keras_by_hand():
    controller = reduce_on_plateau(factor=0.5, patience=2, min_delta=0.01, cooldown=1,
                                   min_lr=0.02)
    metrics = [1.0, 0.995, 0.98, 0.98, 0.975, 0.99, 0.99, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    states = _run(controller, 0.1, metrics)
    assert [s.learning_rate for s in states] == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.025, 0.02, 0.02, 0.02, 0.02], rel=1e-15)
    assert [s.wait for s in states] == [0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 2, 3]
    assert [s.cooldown_counter for s in states] == [0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    assert [s.best for s in states] == [1.0, 1.0, 0.98, 0.98, 0.98, 0.98, 0.98] + [0.5] * 6
    assert states[-1].num_reductions == 3  # at min_lr: no more reductions


def test_plateau_keras_max_mode_patience_zero():
    controller = reduce_on_plateau(factor=0.1, patience=0, min_delta=0.05, mode="max")
    states = _run(controller, 1.0, [0.5, 0.6, 0.6, 0.7, 0.65])
    assert [s.learning_rate for s in states] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01],
                                                              rel=1e-15)
    assert [s.best for s in states] == [0.5, 0.6, 0.6, 0.7, 0.7]


def test_plateau_keras_nan():
    controller = reduce_on_plateau(factor=0.5, patience=1, min_delta=0.0)
    # a NaN first metric becomes best; nothing improves on NaN
    states = _run(controller, 1.0, [math.nan, 1.0, 0.5, 0.1])
    assert [s.learning_rate for s in states] == [1.0, 0.5, 0.25, 0.125]
    assert math.isnan(states[-1].best)
    # a NaN later is a bad epoch
    states = _run(controller, 1.0, [1.0, math.nan, 0.9])
    assert [s.learning_rate for s in states] == [1.0, 0.5, 0.5]
    assert states[-1].best == 0.9


def test_plateau_torch_by_hand():
    controller = reduce_on_plateau(factor=0.5, patience=1, min_delta=0.1, cooldown=1,
                                   convention="torch")  # relative: better means < 0.9 * best
    states = _run(controller, 1.0, [10.0, 9.5, 9.2, 8.0, 7.5, 7.4, 7.3, 7.3, 7.3])
    assert [s.learning_rate for s in states] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25,
                                                 0.125]
    assert [s.wait for s in states] == [0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert states[0].best == 10.0 and states[3].best == 8.0 and states[-1].best == 8.0
    assert controller.init(1.0).best == math.inf
    assert reduce_on_plateau(mode="max", convention="torch").init(1.0).best == -math.inf


def test_plateau_torch_eps_skips_tiny_reductions():
    states = _run(reduce_on_plateau(factor=0.5, patience=0, min_delta=0.0, convention="torch"),
                  1.5e-8, [1.0, 1.0, 1.0])
    assert [s.learning_rate for s in states] == [1.5e-8] * 3  # 7.5e-9 < eps = 1e-8
    assert states[-1].num_reductions == 0
    states = _run(reduce_on_plateau(factor=0.5, patience=0, min_delta=0.0, convention="torch",
                                    eps=0.0), 1.5e-8, [1.0, 1.0, 1.0])
    assert [s.learning_rate for s in states] == [1.5e-8, 7.5e-9, 3.75e-9]


def test_plateau_torch_abs_max_and_nan():
    controller = reduce_on_plateau(factor=0.1, patience=0, min_delta=0.1, mode="max",
                                   threshold_mode="abs", convention="torch")
    states = _run(controller, 1.0, [0.5, 0.55, 0.7, 0.75])
    assert [s.learning_rate for s in states] == pytest.approx([1.0, 0.1, 0.1, 0.01], rel=1e-15)
    nan = _run(reduce_on_plateau(factor=0.5, patience=0, convention="torch"), 1.0,
               [math.nan, 1.0, math.nan])
    assert [s.learning_rate for s in nan] == [0.5, 0.5, 0.25]


def test_plateau_accepts_0d_arrays():
    controller = reduce_on_plateau(factor=0.5, patience=0)
    states = _run(controller, 1.0, [np.float32(1.0), np.asarray(2.0)])
    assert states[-1].learning_rate == 0.5
    assert isinstance(states[-1], PlateauState)


# --------------------------------------------------------------------------
# the plateau controller against the natives

class PlateauCase(NamedTuple):
    name: str
    options: dict
    learning_rate: float
    metrics: list


def _random_metrics(seed: int, n: int = 120, maximize: bool = False) -> list:
    rng = np.random.default_rng(seed)
    trend = np.cumsum(rng.normal(-0.01, 0.02, n)) + 1.0
    values = trend + rng.normal(0.0, 0.01, n)
    values = 1.0 - values if maximize else values
    # float32 values, as Keras logs them
    return [float(np.float32(v)) for v in values]


def _with_nan(metrics, where):
    metrics = list(metrics)
    for i in where:
        metrics[i] = math.nan
    return metrics


KERAS_PLATEAU_CASES = [
    PlateauCase("hand", dict(factor=0.5, patience=2, min_delta=0.01, cooldown=1, min_lr=0.02),
                0.1, [1.0, 0.995, 0.98, 0.98, 0.975, 0.99, 0.99, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]),
    PlateauCase("nan_first", dict(factor=0.5, patience=1, min_delta=0.0), 1.0,
                [math.nan, 1.0, 0.5, 0.1]),
    PlateauCase("random_min", dict(factor=0.5, patience=3, min_delta=0.005, cooldown=2,
                                   min_lr=1e-3), 0.1, _random_metrics(0)),
    PlateauCase("random_default", dict(patience=4), 0.01, _random_metrics(1)),
    PlateauCase("random_max", dict(factor=0.3, patience=2, min_delta=0.002, mode="max"), 0.05,
                _random_metrics(2, maximize=True)),
    PlateauCase("random_nan_patience0", dict(factor=0.8, patience=0, min_delta=0.0,
                                             cooldown=3), 1.0,
                _with_nan(_random_metrics(3), [5, 6, 40])),
    PlateauCase("min_lr_not_float32", dict(factor=0.5, patience=1, min_delta=0.0, min_lr=0.01),
                0.1, [1.0] + [1.0 + i for i in range(1, 12)]),
]

_KERAS_DRIVER = textwrap.dedent("""
    import json, sys, types
    import jax
    import keras
    cases = json.loads(sys.stdin.read())
    out = {"modules": sorted(m for m in ("tensorflow", "torch") if m in sys.modules)}
    for precision in ("float32", "float64"):
        jax.config.update("jax_enable_x64", precision == "float64")
        keras.config.set_floatx(precision)
        results = []
        for options, learning_rate, metrics in cases:
            optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
            callback = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **options)
            callback.set_model(types.SimpleNamespace(optimizer=optimizer))
            callback.on_train_begin()
            rows = []
            for epoch, metric in enumerate(metrics):
                callback.on_epoch_end(epoch, {"val_loss": metric})
                lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
                best = None if callback.best is None else float(callback.best)
                rows.append([lr, callback.wait, callback.cooldown_counter, best])
            results.append(rows)
        out[precision] = {"dtype": str(optimizer.learning_rate.dtype), "results": results}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module", autouse=True)
def _keras_process(request):
    """Start Keras's ReduceLROnPlateau on every KERAS_PLATEAU_CASES early.

    One subprocess with the JAX backend (tensorflow must not share a process
    with torch), started when this module's first test runs, so that it works
    while the other tests do; only if a Keras comparison was selected.
    """
    wanted = any(item.name.startswith("test_plateau_matches_keras")
                 for item in request.session.items)
    if not wanted or not _selected("keras"):
        yield None
        return
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-c", _KERAS_DRIVER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    cases = [[c.options, c.learning_rate, c.metrics] for c in KERAS_PLATEAU_CASES]
    process.stdin.write(json.dumps(cases))
    process.stdin.close()
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def keras_plateau(_keras_process):
    """Keras's results per precision (float32: Keras's default; float64: floatx float64)."""
    require("keras", "keras")
    assert _keras_process is not None
    stdout = _keras_process.stdout.read()
    stderr = _keras_process.stderr.read()
    assert _keras_process.wait(timeout=120) == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["modules"] == []  # no tensorflow (nor torch) in Keras's process
    assert out["float32"]["dtype"] == "float32" and out["float64"]["dtype"] == "float64"
    return out


def _compare_keras(case, native_rows, learning_rate_tolerance):
    ours = _run(reduce_on_plateau(**case.options), case.learning_rate, case.metrics)
    assert len(ours) == len(native_rows)
    for epoch, (state, (lr, wait, cooldown_counter, best)) in enumerate(zip(ours, native_rows)):
        where = f"{case.name}, epoch {epoch}"
        assert state.wait == wait, where
        assert state.cooldown_counter == cooldown_counter, where
        assert relative_difference(state.best, best) == 0.0, where
        assert relative_difference(state.learning_rate, lr) <= learning_rate_tolerance, where
    return max_relative_difference([s.learning_rate for s in ours], [r[0] for r in native_rows])


@pytest.mark.parametrize("index", range(len(KERAS_PLATEAU_CASES)),
                         ids=[c.name for c in KERAS_PLATEAU_CASES])
@pytest.mark.needs("jax")
def test_plateau_matches_keras(keras_plateau, index):
    case = KERAS_PLATEAU_CASES[index]
    for precision, tolerance in (("float64", 1e-15), ("float32", 1e-6)):
        rows = keras_plateau[precision]["results"][index]
        _compare_keras(case, rows, tolerance)
    reductions = {r[0] for r in keras_plateau["float64"]["results"][index]}
    assert len(reductions) > 1  # the case exercises at least one reduction


TORCH_PLATEAU_CASES = [
    PlateauCase("hand", dict(factor=0.5, patience=1, min_delta=0.1, cooldown=1), 1.0,
                [10.0, 9.5, 9.2, 8.0, 7.5, 7.4, 7.3, 7.3, 7.3]),
    PlateauCase("eps", dict(factor=0.5, patience=0, min_delta=0.0), 1.5e-8, [1.0, 1.0, 1.0]),
    PlateauCase("abs_max", dict(factor=0.1, patience=0, min_delta=0.1, mode="max",
                                threshold_mode="abs"), 1.0, [0.5, 0.55, 0.7, 0.75]),
    PlateauCase("random_rel", dict(factor=0.5, patience=3, min_delta=0.003, cooldown=2,
                                   min_lr=1e-3), 0.1, _random_metrics(0)),
    PlateauCase("random_abs", dict(factor=0.2, patience=2, min_delta=0.004,
                                   threshold_mode="abs", min_lr=1e-4), 0.1, _random_metrics(4)),
    PlateauCase("random_max_nan", dict(factor=0.7, patience=1, min_delta=1e-3, mode="max",
                                       cooldown=1), 0.05,
                _with_nan(_random_metrics(5, maximize=True), [0, 30, 31])),
]


@pytest.mark.parametrize("case", TORCH_PLATEAU_CASES, ids=lambda c: c.name)
@pytest.mark.needs("torch")
def test_plateau_matches_torch(case):
    torch = require("torch", "torch")
    options = dict(case.options)
    ours = _run(reduce_on_plateau(convention="torch", **options), case.learning_rate,
                case.metrics)
    native_options = {"factor": options.get("factor", 0.1), "patience": options.get("patience", 10),
                      "threshold": options.get("min_delta", 1e-4),
                      "threshold_mode": options.get("threshold_mode", "rel"),
                      "cooldown": options.get("cooldown", 0), "min_lr": options.get("min_lr", 0.0),
                      "mode": options.get("mode", "min")}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=case.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **native_options)
    learning_rates = set()
    for epoch, (state, metric) in enumerate(zip(ours, case.metrics)):
        scheduler.step(metric)
        where = f"{case.name}, epoch {epoch}"
        assert state.learning_rate == optimizer.param_groups[0]["lr"], where
        assert state.wait == scheduler.num_bad_epochs, where
        assert state.cooldown_counter == scheduler.cooldown_counter, where
        assert relative_difference(state.best, scheduler.best) == 0.0, where
        learning_rates.add(state.learning_rate)
    assert len(learning_rates) > 1 or case.name == "eps"


# --------------------------------------------------------------------------
# argument checks


class ErrorCase(NamedTuple):
    factory: Callable
    options: dict
    exception: type
    match: str

    def __str__(self) -> str:
        return f"{self.factory.__name__}({self.options})"


_ONE_CYCLE = {"total_steps": 100, "max_value": 1.0}
_RAMP = {"lr_start": 0.1, "lr_max": 0.5, "lr_min": 0.01, "rampup": 3, "sustain": 2, "decay": 0.8}
_WARMUP = {"init_value": 0.0, "peak_value": 1.0, "warmup_steps": 10, "decay_steps": 100}

ERRORS = [
    ErrorCase(constant, {"value": -1}, ValueError,
              r"^constant: value must be a number in \[0, inf\), got value=-1$"),
    ErrorCase(constant, {"value": math.nan}, ValueError,
              r"constant: value must be .*got value=nan"),
    ErrorCase(constant, {"value": math.inf}, ValueError,
              r"constant: value must be .*got value=inf"),
    ErrorCase(constant, {"value": "0.1"}, TypeError, r"constant: value must be a number .*'0.1'"),
    ErrorCase(constant, {"value": True}, TypeError, r"constant: value must be .*got value=True"),
    ErrorCase(constant, {"value": np.ones(2)}, TypeError, r"constant: value must be a number"),
    ErrorCase(step_decay, {"initial_value": 0.1, "drop": 0.0, "steps_drop": 10}, ValueError,
              r"step_decay: drop must be a number in \(0, 1\], got drop=0.0"),
    ErrorCase(step_decay, {"initial_value": 0.1, "drop": 1.5, "steps_drop": 10}, ValueError,
              r"step_decay: drop must be .*got drop=1.5"),
    ErrorCase(step_decay, {"initial_value": 0.1, "drop": 0.5, "steps_drop": 0}, ValueError,
              r"step_decay: steps_drop must be a number in \(0, inf\), got steps_drop=0"),
    ErrorCase(step_decay, {"initial_value": -0.1, "drop": 0.5, "steps_drop": 1}, ValueError,
              r"step_decay: initial_value must be .*got initial_value=-0.1"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 0, "decay_rate": 0.5},
              ValueError, r"exponential_decay: transition_steps must be an integer in \[1, inf\), "
              r"got transition_steps=0"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 2.5, "decay_rate": 0.5},
              TypeError, r"exponential_decay: transition_steps must be an integer .*=2.5"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 2, "decay_rate": 0.0},
              ValueError, r"exponential_decay: decay_rate must be a number in \(0, inf\), "
              r"got decay_rate=0.0"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 2, "decay_rate": 0.5,
                                  "transition_begin": -1}, ValueError,
              r"exponential_decay: transition_begin must be an integer in \[0, inf\), "
              r"got transition_begin=-1"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 2, "decay_rate": 0.5,
                                  "staircase": "yes"}, TypeError,
              r"exponential_decay: staircase must be True or False, got staircase='yes'"),
    ErrorCase(exponential_decay, {"init_value": 1.0, "transition_steps": 2, "decay_rate": 0.5,
                                  "end_value": -1.0}, ValueError,
              r"exponential_decay: end_value must be .*got end_value=-1.0"),
    ErrorCase(cosine_decay, {"init_value": 1.0, "decay_steps": 0}, ValueError,
              r"cosine_decay: decay_steps must be an integer in \[1, inf\), got decay_steps=0"),
    ErrorCase(cosine_decay, {"init_value": 1.0, "decay_steps": 10, "alpha": 1.5}, ValueError,
              r"cosine_decay: alpha must be a number in \[0, 1\], got alpha=1.5"),
    ErrorCase(cosine_decay, {"init_value": 1.0, "decay_steps": 10, "exponent": 0.0}, ValueError,
              r"cosine_decay: exponent must be a number in \(0, inf\), got exponent=0.0"),
    ErrorCase(warmup_cosine_decay, {**_WARMUP, "decay_steps": 10}, ValueError,
              r"warmup_cosine_decay: decay_steps must be an integer > warmup_steps \(10\).*"
              r"got decay_steps=10"),
    ErrorCase(warmup_cosine_decay, {**_WARMUP, "warmup_steps": -1}, ValueError,
              r"warmup_cosine_decay: warmup_steps must be .*got warmup_steps=-1"),
    ErrorCase(warmup_cosine_decay, {**_WARMUP, "end_value": math.nan}, ValueError,
              r"warmup_cosine_decay: end_value must be .*got end_value=nan"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "total_steps": 0}, ValueError,
              r"one_cycle: total_steps must be an integer in \[1, inf\), got total_steps=0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "total_steps": 100.0}, TypeError,
              r"one_cycle: total_steps must be an integer .*got total_steps=100.0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "max_value": -1.0}, ValueError,
              r"one_cycle: max_value must be .*got max_value=-1.0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_start": 1.5}, ValueError,
              r"one_cycle: pct_start must be a number in \[0, 1\], got pct_start=1.5"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "anneal": "cosine"}, ValueError,
              r"one_cycle: anneal must be one of 'cos', 'linear', got anneal='cosine'"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "anneal": 1}, TypeError,
              r"one_cycle: anneal must be one of .*got anneal=1"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "div_factor": 0.0}, ValueError,
              r"one_cycle: div_factor must be a number in \(0, inf\), got div_factor=0.0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "final_div_factor": -1.0}, ValueError,
              r"one_cycle: final_div_factor must be .*got final_div_factor=-1.0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "three_phase": 1}, TypeError,
              r"one_cycle: three_phase must be True or False, got three_phase=1"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "convention": "keras"}, ValueError,
              r"one_cycle: convention must be one of 'torch', 'optax', got convention='keras'"),
    ErrorCase(one_cycle, {"total_steps": 10, "max_value": 1.0, "pct_start": 0.1}, ValueError,
              r"one_cycle: pct_start \* total_steps must not be 1 .*pct_start=0.1, total_steps=10"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_start": 1.0, "convention": "optax"}, ValueError,
              r"one_cycle: with convention='optax', need int\(pct_start \* total_steps\) < "
              r"total_steps.*pct_start=1.0"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_start": 0.5, "pct_final": 0.4, "three_phase": True,
                          "convention": "optax"}, ValueError,
              r"one_cycle: with convention='optax' and three_phase=True, need .*pct_final=0.4"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_final": 0.8}, ValueError,
              r"one_cycle: pct_final must be None unless .*got pct_final=0.8"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_final": 0.8, "convention": "optax"}, ValueError,
              r"one_cycle: pct_final must be None unless .*got pct_final=0.8"),
    ErrorCase(one_cycle, {**_ONE_CYCLE, "pct_final": 1.2, "three_phase": True,
                          "convention": "optax"}, ValueError,
              r"one_cycle: pct_final must be a number in \[0, 1\], got pct_final=1.2"),
    ErrorCase(one_cycle_momentum, {"total_steps": 100, "base_momentum": 1.5}, ValueError,
              r"one_cycle_momentum: base_momentum must be a number in \[0, 1\], "
              r"got base_momentum=1.5"),
    ErrorCase(one_cycle_momentum, {"total_steps": 100, "max_momentum": -0.1}, ValueError,
              r"one_cycle_momentum: max_momentum must be .*got max_momentum=-0.1"),
    ErrorCase(rampup_sustain_decay, {**_RAMP, "rampup": -1}, ValueError,
              r"rampup_sustain_decay: rampup must be an integer in \[0, inf\), got rampup=-1"),
    ErrorCase(rampup_sustain_decay, {**_RAMP, "sustain": 1.5}, TypeError,
              r"rampup_sustain_decay: sustain must be an integer .*got sustain=1.5"),
    ErrorCase(rampup_sustain_decay, {**_RAMP, "decay": 1.5}, ValueError,
              r"rampup_sustain_decay: decay must be a number in \[0, 1\], got decay=1.5"),
    ErrorCase(rampup_sustain_decay, {**_RAMP, "lr_max": math.nan}, ValueError,
              r"rampup_sustain_decay: lr_max must be .*got lr_max=nan"),
    ErrorCase(reduce_on_plateau, {"factor": 1.0}, ValueError,
              r"reduce_on_plateau: factor must be a number in \(0, 1\), got factor=1.0"),
    ErrorCase(reduce_on_plateau, {"factor": 0.0}, ValueError,
              r"reduce_on_plateau: factor must be .*got factor=0.0"),
    ErrorCase(reduce_on_plateau, {"patience": -1}, ValueError,
              r"reduce_on_plateau: patience must be an integer in \[0, inf\), got patience=-1"),
    ErrorCase(reduce_on_plateau, {"patience": 1.5}, TypeError,
              r"reduce_on_plateau: patience must be an integer .*got patience=1.5"),
    ErrorCase(reduce_on_plateau, {"min_delta": -1e-4}, ValueError,
              r"reduce_on_plateau: min_delta must be a number in \[0, inf\), "
              r"got min_delta=-0.0001"),
    ErrorCase(reduce_on_plateau, {"cooldown": -1}, ValueError,
              r"reduce_on_plateau: cooldown must be .*got cooldown=-1"),
    ErrorCase(reduce_on_plateau, {"min_lr": -1.0}, ValueError,
              r"reduce_on_plateau: min_lr must be .*got min_lr=-1.0"),
    ErrorCase(reduce_on_plateau, {"min_lr": math.nan}, ValueError,
              r"reduce_on_plateau: min_lr must be .*got min_lr=nan"),
    ErrorCase(reduce_on_plateau, {"mode": "minimum"}, ValueError,
              r"reduce_on_plateau: mode must be one of 'auto', 'min', 'max', got mode='minimum'"),
    ErrorCase(reduce_on_plateau, {"convention": "tf"}, ValueError,
              r"reduce_on_plateau: convention must be one of 'keras', 'torch', "
              r"got convention='tf'"),
    ErrorCase(reduce_on_plateau, {"threshold_mode": "relative", "convention": "torch"},
              ValueError, r"reduce_on_plateau: threshold_mode must be one of 'rel', 'abs', "
              r"got threshold_mode='relative'"),
    ErrorCase(reduce_on_plateau, {"threshold_mode": "rel"}, ValueError,
              r"reduce_on_plateau: threshold_mode must be None or 'abs' with convention='keras'"),
    ErrorCase(reduce_on_plateau, {"eps": 1e-8}, ValueError,
              r"reduce_on_plateau: eps must be None with convention='keras'.*got eps=1e-08"),
    ErrorCase(reduce_on_plateau, {"eps": -1.0, "convention": "torch"}, ValueError,
              r"reduce_on_plateau: eps must be .*got eps=-1.0"),
]


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_argument_errors(case):
    with pytest.raises(case.exception, match=case.match):
        case.factory(**case.options)


def test_plateau_runtime_errors():
    controller = reduce_on_plateau()
    with pytest.raises(ValueError, match=r"reduce_on_plateau: learning_rate must be .*=-0.1"):
        controller.init(-0.1)
    with pytest.raises(TypeError, match=r"reduce_on_plateau: learning_rate must be .*='fast'"):
        controller.init("fast")
    state = controller.init(0.1)
    with pytest.raises(TypeError, match=r"reduce_on_plateau: metric must be .*got metric='x'"):
        controller.update(state, "x")
    with pytest.raises(TypeError, match=r"reduce_on_plateau: metric must be .*got metric=True"):
        controller.update(state, True)
    with pytest.raises(TypeError, match=r"reduce_on_plateau: metric must be .*got metric=None"):
        controller.update(state, None)


def test_count_errors():
    schedule = constant(0.1)
    with pytest.raises(TypeError, match=r"constant: count must be a number or an array"):
        schedule(True)
    with pytest.raises(TypeError, match=r"constant: count must have an integer or real floating"):
        schedule(np.asarray(True))
    with pytest.raises(TypeError):
        schedule("3")
