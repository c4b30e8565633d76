"""The CI matrix (issue 7): every experiment for a few steps in torch, tf (Keras on
TensorFlow) and jax, each framework in its own child process (torch and tensorflow
never share one), float64 runs included, then polyopt.consistency's comparison."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from examples import experiments, matrix
from polyopt import consistency
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "tf", "jax")

CHILD = """
from examples import matrix
matrix.run_ci(payload["framework"], payload["runs_dir"])
result = None
"""


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    env = {"PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with ThreadPoolExecutor(2) as pool:  # one child process per framework, two at a time
        list(pool.map(lambda framework: run_python(
            CHILD, {"framework": framework, "runs_dir": str(runs_dir)}, env=env, timeout=900),
            FRAMEWORKS))
    return runs_dir


def test_every_experiment_agrees_across_the_three_frameworks(ci_runs):
    records = consistency.read_runs(ci_runs)
    expected = [(name, "float32") for name in experiments.EXPERIMENTS]
    expected += [(name, "float64") for name in matrix.CI_FLOAT64]
    assert sorted({(r.experiment, r.dtype) for r in records}) == sorted(expected)
    result = consistency.compare(records)
    assert result.passed, result.table()
    for row in result.rows:
        assert row.frameworks == list(FRAMEWORKS), row
        model = experiments.get(row.experiment).model
        steps = (matrix.CI_FLOAT64[row.experiment] if row.dtype == "float64"
                 else matrix.CI_LENGTH[model][0])
        assert row.steps == steps
        if row.dtype == "float64":
            # exact arithmetic: far inside the 1e-9 / 1e-8 policy
            assert row.step_loss_diff <= 1e-12 and row.weights_diff <= 1e-12, row
        else:
            # a few float32 steps, before the chaos: rounding-level agreement. ResNet-20:
            # the first Adam steps amplify float32 batch-norm rounding (measured 1.9e-3)
            # and its near-uniform predictions flip argmax ties (1.5 points = 3 of 200
            # images); the policy's 1.5 points (result.passed) bounds its accuracy
            if model == "resnet20":
                assert row.step_loss_diff <= 1e-2, row
            else:
                assert row.step_loss_diff <= 1e-4 and row.accuracy_diff <= 1.0, row
    for record in records:
        assert consistency.weights_checksum(record.load_weights()) == record.weights_checksum
        assert record.config["test_size"] == matrix.CI_TEST_SIZE


def test_the_compare_command_passes_and_plots(ci_runs, tmp_path, capsys):
    code = consistency.main([str(ci_runs), "--plots", str(tmp_path),
                             "--markdown", str(tmp_path / "agreement.md")])
    out = capsys.readouterr().out
    assert code == 0, out
    n = len(experiments.EXPERIMENTS) + len(matrix.CI_FLOAT64)
    assert f"{n} of {n} experiment(s) agree" in out
    assert len(list(tmp_path.glob("*.png"))) == n
