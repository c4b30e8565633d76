"""examples.resume without a framework: batches, checkpoint files, the kill checker.

The kill -9 campaigns themselves run per framework (test_torch_checkpoints.py,
test_optax_checkpoints.py, test_keras_checkpoints.py); here is what makes
their verdicts trustworthy: a bad checkpoint is refused (naming the path,
leaving the file), a lost or damaged checkpoint is counted as lost bytes,
and a one-ulp difference in the final weights is not bitwise equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import resume
from examples.models import init

ROOT = Path(__file__).resolve().parents[1]
CONFIG = resume.Config("torch", steps=30, every=5)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in init.init_params("mlp", seed).items()}


def _write(path: Path, step: int = 5, config: resume.Config = CONFIG) -> bytes:
    data = resume.encode_checkpoint(config, step, _weights(), b"optimizer state")
    path.write_bytes(data)
    return data


def test_the_batch_of_a_step_depends_on_the_step_and_seed_only():
    config = resume.Config("jax", batch=32, train_size=2048)
    first = [resume.batch_indices(config, s) for s in range(70)]
    assert all(np.array_equal(a, resume.batch_indices(config, s)) for s, a in enumerate(first))
    epoch = np.concatenate(first[:64])
    assert sorted(epoch.tolist()) == list(range(2048))  # one epoch: every image once
    assert not np.array_equal(first[0], first[64])  # the next epoch: another order
    other = resume.Config("jax", seed=1)
    assert not np.array_equal(first[0], resume.batch_indices(other, 0))


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    data = _write(tmp_path / "c.npz", step=10)
    saved = resume.read_checkpoint(tmp_path / "c.npz", CONFIG)
    assert saved.step == 10 and saved.optimizer == b"optimizer state"
    assert saved.sha256 == resume.sha256(data)
    assert all(np.array_equal(saved.weights[k], v) for k, v in _weights().items())


def _foreign(path: Path) -> None:
    np.savez(path, weights=np.ones(3))


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(b""), r"empty file, not a checkpoint"),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"not a readable checkpoint \(truncated"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), r"not a readable checkpoint \(truncated"),
    (_foreign, r"no 'header' and 'optimizer' entries: not a checkpoint of examples.resume"),
    (lambda p: _write(p, config=resume.Config("torch", steps=30, every=5, seed=3)),
     r"written by another run: \(checkpoint, this run\) \{'seed': \(3, 0\)\}"),
    (lambda p: _write(p, step=31), r"step 31 outside \[0, 30\]"),
], ids=["empty", "truncated-end", "truncated-start", "foreign-npz", "other-seed", "step"])
def test_bad_checkpoints_are_refused_with_the_path(tmp_path, damage, reason):
    path = tmp_path / "checkpoint.npz"
    _write(path)
    damage(path)
    with pytest.raises(resume.CheckpointError, match=rf"{path}: {reason}"):
        resume.read_checkpoint(path, CONFIG)


def test_the_trainer_refuses_a_bad_checkpoint_and_leaves_it(tmp_path):
    path = tmp_path / resume.CHECKPOINT
    data = _write(path)[:-10]
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-m", "examples.resume", "train", "--framework",
                           "torch", "--dir", str(tmp_path), "--steps", "30", "--every", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"error: {path}: not a readable checkpoint" in done.stderr
    assert done.stdout == "" and path.read_bytes() == data


def test_a_damaged_or_missing_checkpoint_after_a_kill_counts_as_lost_bytes(tmp_path):
    report = resume.Report("torch")
    path = tmp_path / resume.CHECKPOINT
    data = _write(path)
    announced = (5, len(data), resume.sha256(data))
    assert resume._check_after_kill(report, tmp_path, CONFIG, [], announced) == announced
    assert report.bytes_lost == 0 and report.failures == []

    path.write_bytes(data[: len(data) // 2])  # what a non-atomic writer leaves
    resume._check_after_kill(report, tmp_path, CONFIG, ["step 6", "writing 10"], announced)
    assert report.bytes_lost == len(data) and not report.passed
    path.unlink()
    resume._check_after_kill(report, tmp_path, CONFIG, [], announced)
    assert report.bytes_lost == len(data)  # the same checkpoint, lost once
    assert "checkpoint of step 5 is missing" in report.failures[-1]


def test_a_save_whose_announcement_the_kill_cut_off_is_accepted(tmp_path):
    report = resume.Report("torch")
    path = tmp_path / resume.CHECKPOINT
    old = _write(path, step=5)
    announced = (5, len(old), resume.sha256(old))
    new = _write(path, step=10)
    lines = ["resumed 5 x", "step 6", "step 10", "writing 10"]
    assert resume._check_after_kill(report, tmp_path, CONFIG, lines, announced) == (
        10, len(new), resume.sha256(new))
    assert report.unannounced_saves == 1 and report.bytes_lost == 0 and report.failures == []


def test_one_ulp_is_not_bitwise_equal():
    a = _weights()
    b = {k: v.copy() for k, v in a.items()}
    assert resume._bitwise_equal(a, b)
    name = next(iter(b))
    b[name].flat[7] = np.nextafter(b[name].flat[7], np.float32(np.inf))
    assert not resume._bitwise_equal(a, b)
