"""The training harness (examples.train) end to end in float64: torch, tf (Keras) and
jax, each in its own child process, train the same experiments a few steps and their run
records agree (polyopt.consistency); plus the framework-free pieces."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from examples import experiments, matrix, train
from polyopt import consistency
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]
# (experiment, steps, batch size, test images): Lookahead syncs every 6 steps, so 7
# steps cross a sync; the CNN runs on small batches to keep the test fast
SMOKE = [("mnist-adam", 12, 128, 200), ("cifar-ranger", 7, 16, 100)]

CHILD = """
import dataclasses
from examples import experiments, train
framework = payload["framework"]
runs = [(experiments.get(name), steps, batch_size, test_size)
        for name, steps, batch_size, test_size in payload["runs"]]
for experiment, steps, batch_size, test_size in runs:
    experiment = dataclasses.replace(experiment, batch_size=batch_size)
    train.train(framework, experiment, steps=steps, dtype="float64",
                runs_dir=payload["runs_dir"], test_size=test_size, quiet=True)
result = None
"""


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    payload = {"runs": SMOKE, "runs_dir": str(runs_dir)}
    env = {"PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with ThreadPoolExecutor(2) as pool:  # one child process per framework, two at a time
        list(pool.map(lambda framework: run_python(
            CHILD, {**payload, "framework": framework}, env=env), ("torch", "jax", "tf")))
    return runs_dir


def test_float64_torch_tf_and_jax_runs_agree(smoke_runs):
    records = consistency.read_runs(smoke_runs)
    assert sorted((r.experiment, r.framework) for r in records) == [
        ("cifar-ranger", "jax"), ("cifar-ranger", "tf"), ("cifar-ranger", "torch"),
        ("mnist-adam", "jax"), ("mnist-adam", "tf"), ("mnist-adam", "torch")]
    result = consistency.compare(records)
    assert result.passed, result.table()
    for row in result.rows:
        # exact arithmetic in both: far inside the 1e-9 policy
        assert row.step_loss_diff <= 1e-12 and row.weights_diff <= 1e-12, row
    for record in records:
        steps = {name: n for name, n, *_ in SMOKE}[record.experiment]
        assert len(record.step_loss) == steps and record.config["steps"] == steps
        assert len(record.epochs) == 1 and record.dtype == "float64"
        library = {"tf": "keras"}.get(record.framework, record.framework)
        assert record.versions[library] and record.versions["polyopt"]
        weights = record.load_weights()
        assert consistency.weights_checksum(weights) == record.weights_checksum
        assert record.step_loss[0] == pytest.approx(math.log(10), rel=0.1)
        if record.experiment == "mnist-adam":  # it trains: 12 Adam steps cut the loss by 1/3
            assert max(record.step_loss[-3:]) < record.step_loss[0] * 2 / 3


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        train.main(["--framework", "torch", "--experiment", "nope"])
    with pytest.raises(SystemExit):
        train.main(["--framework", "torch", "--experiment", "mnist-adam", "--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_experiments_registry():
    assert list(experiments.EXPERIMENTS) == [
        "mnist-adadelta", "mnist-adam", "cifar-ranger", "cifar-adam", "cifar-onecycle",
        "cifar-rampup", "resnet20-sam", "resnet20-adam"]
    assert experiments.get("mnist-adam").batch_size == 128
    assert experiments.get("cifar-adam").batch_size == 100
    assert experiments.base_learning_rate(experiments.get("mnist-adadelta")) == 1.0
    ranger = experiments.build_rule(experiments.get("cifar-ranger"), 1e-3)
    params = [np.ones(3)]
    state = ranger.init(params)
    assert type(state).__name__ == "LookaheadState"
    sam = experiments.build_rule(experiments.get("resnet20-sam"), 1e-3)
    assert hasattr(sam, "perturb")
    with pytest.raises(ValueError, match="unknown experiment 'x'; known: mnist-adadelta"):
        experiments.get("x")


def test_learning_rate_policies():
    onecycle = experiments.LearningRate(experiments.get("cifar-onecycle"), total_steps=100)
    lrs = [onecycle.at(step, 0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.05 / 25) and max(lrs) == pytest.approx(0.05)
    assert int(np.argmax(lrs)) == 29  # torch OneCycleLR: the peak at pct_start * total - 1
    rampup = experiments.LearningRate(experiments.get("cifar-rampup"), total_steps=100)
    # ramp-up 3 epochs, sustain 2, then (max - min) * 0.8^(epoch - 5) + min
    assert [rampup.at(0, e) for e in (0, 3, 5, 6)] == pytest.approx(
        [1e-4, 2e-3, 2e-3, 1.9e-3 * 0.8 + 1e-4])
    plateau = experiments.LearningRate(experiments.get("resnet20-adam"), total_steps=100)
    for loss in (1.0, 0.9, 0.95, 0.95):
        plateau.end_epoch(loss)
        assert plateau.at(0, 0) == 1e-3
    plateau.end_epoch(0.95)  # third epoch without improvement: patience 3, factor 0.5
    assert plateau.at(0, 0) == 5e-4


def test_early_stopping():
    stopper = experiments.EarlyStopping(patience=2)
    outcomes = [stopper.end_epoch(e, loss) for e, loss in enumerate([1.0, 0.8, 0.9, 0.85])]
    assert outcomes == [(True, False), (True, False), (False, False), (False, True)]
    assert stopper.best_epoch == 1


def test_matrix_runs():
    quick = matrix.runs(True, list(experiments.EXPERIMENTS))
    assert len(quick) == len(experiments.EXPERIMENTS) + len(matrix.FLOAT64_EXPERIMENTS)
    assert ["--experiment", "resnet20-sam", "--dtype", "float32", "--steps", "6",
            "--test-size", "500"] in quick
    assert ["--experiment", "cifar-ranger", "--dtype", "float64", "--steps", "100",
            "--test-size", "500"] in quick
    main = matrix.runs(False, ["mnist-adam", "resnet20-adam"])
    assert main == [["--experiment", "mnist-adam", "--dtype", "float32", "--epochs", "2"],
                    ["--experiment", "resnet20-adam", "--dtype", "float32", "--steps", "10"],
                    ["--experiment", "resnet20-adam", "--dtype", "float32", "--steps", "10",
                     "--twin"],
                    ["--experiment", "mnist-adam", "--dtype", "float64", "--steps", "100"]]
    full = matrix.runs(False, ["mnist-adam"], full=True)
    assert full == [["--experiment", "mnist-adam", "--dtype", "float32"],
                    ["--experiment", "mnist-adam", "--dtype", "float64", "--steps", "100"]]
    assert matrix.runs(False, ["mnist-adam"], epochs=5)[0][-2:] == ["--epochs", "5"]


class _ScriptedBackend:
    """Stands in for a framework: scripted test losses, weights = the epochs trained."""

    def __init__(self, test_losses):
        self.test_losses, self.epoch, self.lrs, self.seen = list(test_losses), 0, [], []
        self.restored = None
        self.versions = {"scripted": "0"}
        self._evaluated = 0

    def train_step(self, images, labels, lr):
        self.lrs.append(lr)
        self.seen.append(labels.copy())
        return 1.0 / (1 + len(self.lrs)), len(labels) // 2

    def evaluate(self, images, labels):
        loss = self.test_losses[self.epoch]
        self._evaluated += len(labels)
        if self._evaluated == 300:  # the whole (shortened) test set: the epoch ends
            self.epoch, self._evaluated = self.epoch + 1, 0
        return loss * len(labels), len(labels) // 4

    def weights(self):
        return self.restored or {"w": np.array([float(self.epoch)])}

    def set_weights(self, weights):
        self.restored = weights
        self.epoch = int(weights["w"][0]) - 1  # evaluate() gives that epoch's test loss


def test_loop_early_stopping_plateau_and_shuffling(tmp_path, monkeypatch):
    test_losses = [1.0, 0.8, 0.9, 0.9, 0.9, 0.95, 0.9, 0.9]
    backend = _ScriptedBackend(test_losses)
    monkeypatch.setattr(train, "make_backend", lambda *args: backend)
    experiment = experiments.Experiment(
        "scripted", "mlp", "mnist", batch_size=1000, epochs=8, optimizer="adam",
        options={"learning_rate": 0.1}, plateau={"factor": 0.5, "patience": 2},
        early_stopping={"patience": 4, "restore_best": True})
    record = train.train("scripted", experiment, runs_dir=tmp_path, test_size=300, quiet=True)
    # best test loss at epoch 2; four epochs without improvement: stop after epoch 6
    assert [e["test_loss"] for e in record.epochs] == pytest.approx(test_losses[:6])
    assert backend.restored == {"w": np.array([2.0])}
    assert record.final == {"epoch": 2, "test_loss": 0.8, "test_accuracy": 0.25}
    assert record.final_value("test_loss") == 0.8
    assert record.weights_checksum == consistency.weights_checksum({"w": np.array([2.0])})
    # plateau (Keras convention, patience 2): halved after epochs 4 and 6 -> from epoch 5 on
    assert [e["learning_rate"] for e in record.epochs] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
    assert len(record.step_loss) == 6 * 8  # 8000 images in batches of 1000
    # numpy-driven shuffling: every epoch is a permutation, and epochs differ
    epochs = [np.concatenate(backend.seen[i * 8:(i + 1) * 8]) for i in range(6)]
    mnist = train.data.load_mnist()
    for labels in epochs:
        assert np.array_equal(np.bincount(labels), np.bincount(mnist.train_labels))
    assert not np.array_equal(epochs[0], epochs[1])
    assert (tmp_path / "scripted-float32-scripted.json").is_file()
