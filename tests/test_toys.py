"""The lab's toy-function trajectories through each adapter (issue 7): every lab
optimizer on both 2-D functions as a polyopt.torch optimizer, a polyopt.keras
optimizer (TensorFlow) and a polyopt.optax transformation, each framework in its own
child process, follows the core's numpy trajectory (polyopt.lab.run) in float64."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from examples import toys
from polyopt import lab
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
from examples import toys
result = [[name, problem, diff]
          for (name, problem), diff in toys.check(payload["framework"]).items()]
"""


@pytest.fixture(scope="module")
def differences():
    env = {"PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda framework: run_python(
            CHILD, {"framework": framework}, env=env), toys.RUNNERS)
        return dict(zip(toys.RUNNERS, results))


def test_every_adapter_follows_the_core_trajectory(differences):
    for framework, rows in differences.items():
        assert {(name, problem) for name, problem, _ in rows} == {
            (o.name, p) for o in lab.OPTIMIZERS for p in lab.PROBLEMS}, framework
        worst = max(rows, key=lambda row: row[2])
        assert worst[2] <= 1e-12, (framework, worst)


def test_a_different_optimizer_would_be_noticed():
    """The check can fail: Adam's trajectory is not SGD's (numpy only)."""
    problem = lab.PROBLEMS["quadratic"]
    sgd = lab.run("sgd", problem, steps=toys.STEPS).points
    adam = lab.run("adam", problem, steps=toys.STEPS).points
    assert abs(sgd - adam).max() / abs(adam).max() > 1e-3
