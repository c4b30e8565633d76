"""The framework-free pieces of the training harness (examples.train): CLI, experiments,
learning-rate policies, early stopping, the matrix plan, the loop with a scripted
backend. The three frameworks end to end: tests/test_matrix.py."""

from __future__ import annotations

import numpy as np
import pytest

from examples import experiments, matrix, train
from polyopt import consistency


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        train.main(["--framework", "torch", "--experiment", "nope"])
    with pytest.raises(SystemExit):
        train.main(["--framework", "torch", "--experiment", "mnist-adam", "--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_experiments_registry():
    assert list(experiments.EXPERIMENTS) == [
        "mnist-adadelta", "mnist-adam", "cifar-ranger", "cifar-adam", "cifar-onecycle",
        "cifar-rampup", "resnet20-sam", "resnet20-adam", "cifar-muon"]
    assert experiments.get("cifar-muon") is experiments.RULE_CHECKS["cifar-muon"]
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


def test_matrix_plan():
    names = list(experiments.EXPERIMENTS)
    Run = matrix.Run
    main = matrix.plan(names)
    # every experiment: float32 and its twin, then float64 (after every float32 run)
    assert len(main) == 3 * len(names)
    assert [r.dtype for r in main] == ["float32"] * 2 * len(names) + ["float64"] * len(names)
    assert main[:2] == [Run("mnist-adadelta", epochs=2), Run("mnist-adadelta", epochs=2, twin=True)]
    assert Run("cifar-adam", epochs=1) in main and Run("resnet20-sam", steps=10) in main
    assert Run("resnet20-sam", "float64", steps=3, batch_size=32, test_size=200) in main
    assert Run("mnist-adam", "float64", steps=100) in main
    assert Run("cifar-ranger", "float64", steps=12, test_size=200) in main
    quick = matrix.plan(names, quick=True)
    assert not any(r.twin for r in quick) and len(quick) == 2 * len(names)
    assert Run("resnet20-sam", steps=6, test_size=500) in quick
    assert Run("mnist-adam", "float64", steps=100, test_size=500) in quick
    full = matrix.plan(["mnist-adam"], full=True)
    assert full[:2] == [Run("mnist-adam"), Run("mnist-adam", twin=True)]
    assert matrix.plan(["mnist-adam"], epochs=5)[0] == Run("mnist-adam", epochs=5)
    ci = matrix.plan(names, ci=True)
    assert Run("resnet20-adam", steps=3, batch_size=32, test_size=200) in ci
    assert {r.experiment for r in ci if r.dtype == "float64"} == set(names)
    assert ci[0].experiment_object().batch_size == 128
    assert Run("resnet20-adam", batch_size=32).experiment_object().batch_size == 32


def test_matrix_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        matrix.main(["--framework", "torch", "--experiments", "mnist-adam,nope"])
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        matrix.main(["--framework", "torch", "--arithmetic", "fast"])
    with pytest.raises(SystemExit):
        matrix.main(["--framework", "torch", "--epochs", "0"])
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


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
