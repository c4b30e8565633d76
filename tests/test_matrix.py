"""The CI matrix: every experiment for a few steps in torch, tf (Keras on TensorFlow)
and jax, float32 and float64, each framework in its own child process (torch and
tensorflow never share one), then polyopt.consistency's comparison. Also:

- the verdict catches a wrong optimizer: torch runs whose optimizer is off (Adam's
  beta2 0.99 instead of 0.999, the learning rate 20 % high, SAM's rho doubled) while
  their records say the true configuration, as an adapter bug would leave them, are
  reported as disagreeing (MLP, CNN and ResNet-20);
- every rule beyond the seed set (``experiments.RULE_CHECKS``) gives the same numbers
  in the three frameworks in float64, on the MLP and the CNN;
- the verdict does not depend on the arithmetic: torch's float32 runs under the
  ``strict`` profile (one thread, oneDNN off) agree with the other frameworks' default
  runs.
"""

from __future__ import annotations

import shutil
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
runs = matrix.plan(payload.get("names") or list(matrix.experiments.EXPERIMENTS), ci=True)
runs = [run for run in runs if run.dtype in payload.get("dtypes", ("float32", "float64"))]
matrix.execute(payload["framework"], runs, payload["runs_dir"], progress=False,
               arithmetic=payload.get("arithmetic", "default"))
result = None
"""

#: experiment -> how its torch run goes wrong (the record keeps the true configuration):
#: param-group values changed after construction, the learning rate of every step scaled,
#: or the experiment's options replaced
WRONG = {
    "mnist-adam": {"group": {"betas": [0.9, 0.99]}},       # Adam's beta2 0.99, not 0.999
    "cifar-adam": {"lr_factor": 1.2},                       # the learning rate 20 % high
    "resnet20-adam": {"lr_factor": 1.2},
    "resnet20-sam": {"replace": {"wrapper": {"rho": 0.1}}},  # SAM's rho doubled
}

WRONG_CHILD = """
import dataclasses
from examples import experiments, matrix, train

WRONG = payload["wrong"]
real_optimizer, real_at = train.make_optimizer, experiments.LearningRate.at

def wrong_optimizer(framework, experiment, *args):
    change = WRONG[experiment.name]
    optimizer = real_optimizer(
        framework, dataclasses.replace(experiment, **change.get("replace", {})), *args)
    for group in optimizer.param_groups:
        group.update({k: tuple(v) for k, v in change.get("group", {}).items()})
    return optimizer

def wrong_at(self, step, epoch):
    return real_at(self, step, epoch) * WRONG[self.experiment.name].get("lr_factor", 1.0)

train.make_optimizer = wrong_optimizer
experiments.LearningRate.at = wrong_at
runs = matrix.plan(list(WRONG), ci=True)
matrix.execute("torch", runs, payload["runs_dir"], progress=False)
result = None
"""


def _env(extra: dict | None = None) -> dict:
    return {"PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow", "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})}


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(2) as pool:  # one child process per framework, two at a time
        list(pool.map(lambda framework: run_python(
            CHILD, {"framework": framework, "runs_dir": str(runs_dir)},
            env=_env(), timeout=1200), FRAMEWORKS))
    return runs_dir


def test_every_experiment_agrees_across_the_three_frameworks(ci_runs):
    records = consistency.read_runs(ci_runs)
    expected = [(name, dtype) for name in experiments.EXPERIMENTS
                for dtype in ("float32", "float64")]
    assert sorted({(r.experiment, r.dtype) for r in records}) == sorted(expected)
    result = consistency.compare(records)
    assert result.passed, result.table()
    for row in result.rows:
        assert row.frameworks == list(FRAMEWORKS), row
        model = experiments.get(row.experiment).model
        steps = (matrix.CI_FLOAT64 if row.dtype == "float64" else
                 {m: length[0] for m, length in matrix.CI_LENGTH.items()})[model]
        assert row.steps == steps
        if row.dtype == "float64":
            # exact arithmetic: far inside the 1e-9 / 1e-8 policy
            assert row.step_loss_diff <= 1e-12 and row.weights_diff <= 1e-12, row
            assert row.margin >= 1e3, row
        else:
            # a few float32 steps, before the chaos: rounding-level agreement. The first
            # Adam steps amplify float32 rounding (CNN: measured 2.4e-4; ResNet-20's batch
            # norm: 1.9e-3); accuracy after so few steps is near chance and not judged
            assert [c.name for c in row.checks] == ["epoch loss"], row
            bound = {"mlp": 1e-4, "cnn": 1e-3, "resnet20": 1e-2}[model]
            assert row.step_loss_diff <= bound, row
            if model != "resnet20":
                assert row.accuracy_diff <= 1.0, row
            assert row.margin >= 1.5, row
    for record in records:
        assert consistency.weights_checksum(record.load_weights()) == record.weights_checksum
        assert record.config["test_size"] == matrix.CI_TEST_SIZE


def test_every_new_rule_agrees_exactly_across_the_three_frameworks(tmp_path):
    names = list(experiments.RULE_CHECKS)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda framework: run_python(
            CHILD, {"framework": framework, "runs_dir": str(tmp_path), "names": names,
                    "dtypes": ["float64"]}, env=_env(), timeout=1200), FRAMEWORKS))
    records = consistency.read_runs(tmp_path)
    pairs = {(experiments.get(name).optimizer, experiments.get(name).model) for name in names}
    rules = {rule for rule, _ in pairs}
    assert pairs == {(rule, model) for rule in rules for model in ("mlp", "cnn")}
    result = consistency.compare(records)
    print(result.table())
    assert sorted(row.experiment for row in result.rows) == sorted(names)
    for row in result.rows:
        assert row.frameworks == list(FRAMEWORKS), row
        assert row.steps == matrix.CI_FLOAT64[experiments.get(row.experiment).model], row
        # the floor measured with the seed rules' float64 runs: 1e-12; above it is a bug
        assert row.step_loss_diff <= 1e-12 and row.weights_diff <= 1e-12, row
        assert row.passed, row


def test_the_compare_command_passes_and_plots(ci_runs, tmp_path, capsys):
    code = consistency.main([str(ci_runs), "--plots", str(tmp_path),
                             "--markdown", str(tmp_path / "agreement.md")])
    out = capsys.readouterr().out
    assert code == 0, out
    n = 2 * len(experiments.EXPERIMENTS)
    assert f"{n} of {n} experiment(s) agree" in out
    assert "smallest margin" in out and "fragile:" not in out
    assert len(list(tmp_path.glob("*.png"))) == n
    assert "| margin |" in (tmp_path / "agreement.md").read_text()


def _mixed(ci_runs: Path, other: Path, framework: str, target: Path) -> list:
    """The records of ``ci_runs``, with ``framework``'s replaced by those in ``other``."""
    target.mkdir()
    for source in (ci_runs, other):
        for path in source.iterdir():
            mine = f"-{framework}." in path.name or f"-{framework}-twin." in path.name
            if (source == other) == mine and path.suffix in (".json", ".npz"):
                shutil.copy(path, target / path.name)
    return consistency.read_runs(target)


def test_a_wrong_optimizer_is_caught_in_every_model(ci_runs, tmp_path):
    wrong_dir = tmp_path / "wrong"
    run_python(WRONG_CHILD, {"runs_dir": str(wrong_dir), "wrong": WRONG}, env=_env(),
               timeout=900)
    records = _mixed(ci_runs, wrong_dir, "torch", tmp_path / "mixed")
    # the wrong runs still claim the true configuration
    wrong = [r for r in records if r.framework == "torch"]
    assert {r.experiment for r in wrong} == set(WRONG)
    for record in wrong:
        assert record.config["options"] == experiments.get(record.experiment).options
    result = consistency.compare(records)
    assert not result.passed
    for row in result.rows:
        if row.dtype == "float64":
            # exact arithmetic sees every one of them at once
            assert row.passed == (row.experiment not in WRONG), row
            if not row.passed:
                assert any("step loss differs" in reason for reason in row.reasons), row
    models = {experiments.get(r.experiment).model for r in result.rows if not r.passed}
    assert models == {"mlp", "cnn", "resnet20"}


def test_the_verdict_holds_under_strict_arithmetic(ci_runs, tmp_path):
    strict_dir = tmp_path / "strict"
    run_python(CHILD, {"framework": "torch", "runs_dir": str(strict_dir), "dtypes": ["float32"],
                       "arithmetic": "strict"}, env=_env(matrix.ARITHMETIC["strict"]), timeout=900)
    records = _mixed(ci_runs, strict_dir, "torch", tmp_path / "mixed")
    float32 = [r for r in records if r.dtype == "float32"]
    assert {r.config["arithmetic"] for r in float32 if r.framework == "torch"} == {"strict"}
    result = consistency.compare(float32)
    assert result.passed, result.table()
    assert not result.fragile(), result.table()
