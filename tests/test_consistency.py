"""polyopt.consistency: run records (schema, read/write), the agreement check against
the tolerance policy, the table, the plots and the CLI, on synthetic records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyopt import consistency as cs
from polyopt.consistency import RecordError, RunRecord

ROOT = Path(__file__).resolve().parents[1]


def _record(framework: str, experiment: str = "mnist-adam", dtype: str = "float64", *,
            steps: int = 150, epochs: int = 3, loss_noise: float = 0.0,
            accuracy_shift: float = 0.0, epoch_loss_scale: float = 1.0, seed: int = 0,
            **config) -> RunRecord:
    rng = np.random.default_rng(seed)
    base = 2.3 * np.exp(-np.arange(steps) / 60) + 0.1
    step_loss = base * (1 + loss_noise * rng.standard_normal(steps))
    per_epoch = [
        {"epoch": e + 1, "train_loss": float(base[(e + 1) * steps // epochs - 1]
                                             * epoch_loss_scale),
         "train_accuracy": 0.7 + 0.05 * e, "test_loss": float(base[-1] * 1.1 * epoch_loss_scale),
         "test_accuracy": 0.68 + 0.05 * e + accuracy_shift, "learning_rate": 1e-3}
        for e in range(epochs)]
    weights = {"dense/kernel": np.full((3, 2), 0.5), "dense/bias": np.arange(2.0)}
    return RunRecord(
        experiment=experiment, framework=framework, dtype=dtype,
        config={"model": "mlp", "batch_size": 128, "epochs": epochs, "framework": framework,
                **config},
        versions={framework: "1.0", "polyopt": "0.1.0"},
        step_loss=step_loss.tolist(), epochs=per_epoch, wall_time=12.5,
        weights_checksum=cs.weights_checksum(weights), weights_norms=cs.weights_norms(weights))


def test_record_round_trip(tmp_path):
    record = _record("torch")
    path = record.write(tmp_path / "sub" / "torch.json")
    again = RunRecord.read(path)
    assert again == record and again.path == path
    data = json.loads(path.read_text())
    assert data["schema"] == "polyopt.run/1" and data["framework"] == "torch"
    assert list(data["epochs"][0]) == ["epoch", *cs.EPOCH_FIELDS]
    assert [r.framework for r in cs.read_runs(tmp_path)] == ["torch"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("dtype"), r"missing field 'dtype'"),
    (lambda d: d.update(schema="other/2"),
     r"field 'schema' must be 'polyopt.run/1', got 'other/2'"),
    (lambda d: d.update(framework=""), r"field 'framework' must be a non-empty string"),
    (lambda d: d.update(step_loss=[1.0, "x"]), r"field 'step_loss' must be a list of numbers, "
                                               r"found 'x'"),
    (lambda d: d.update(step_loss="1,2"), r"field 'step_loss' must be a list of numbers"),
    (lambda d: d["epochs"][1].pop("test_loss"),
     r"epochs\[1\].test_loss must be a number, got None"),
    (lambda d: d["epochs"][0].update(test_accuracy=68.0),
     r"epochs\[0\].test_accuracy must be a fraction in \[0, 1\], got 68.0"),
    (lambda d: d.update(config=[1]), r"field 'config' must be an object, got list"),
    (lambda d: d.update(wall_time=-1), r"field 'wall_time' must be a number >= 0"),
    (lambda d: d.update(weights_norms={"w": "big"}),
     r"field 'weights_norms': 'w' must be a number"),
    (lambda d: d.update(extra=1), r"unknown field\(s\) extra"),
    (lambda d: d.update(final={"epoch": 2, "test_loss": 0.5}),
     r"final.test_accuracy must be a number, got None"),
])
def test_invalid_records_name_file_and_field(tmp_path, change, message):
    data = _record("jax").to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=rf"^{path}: {message}"):
        RunRecord.read(path)
    with pytest.raises(RecordError, match=rf"^{path}: {message}"):
        cs.read_runs(tmp_path)


def test_unreadable_record(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    with pytest.raises(RecordError, match=rf"{path}: not a readable JSON run record"):
        RunRecord.read(path)
    with pytest.raises(RecordError, match="must be a non-empty string"):
        RunRecord("x", "", "float64").to_dict()  # writing validates too


def test_float64_agreement_passes():
    records = [_record("torch"), _record("jax"), _record("tf")]
    records[1].step_loss[10] *= 1 + 3e-10
    records[2].step_loss[120] *= 1.5  # beyond the first 100 steps: not judged in float64
    result = cs.compare(records)
    assert result.passed
    (row,) = result.rows
    assert row.frameworks == ["torch", "tf", "jax"]
    assert row.steps == 100
    assert row.step_loss_diff == pytest.approx(3e-10, rel=1e-3)
    assert row.weights_diff == 0 and row.accuracy_diff == 0


def test_float64_step_loss_disagreement_fails_with_step_and_pair():
    records = [_record("torch"), _record("jax")]
    records[1].step_loss[42] *= 1 + 2e-9
    (row,) = cs.compare(records).rows
    assert not row.passed
    assert row.reasons == [f"step loss differs by {row.step_loss_diff:.3g} relative (> 1e-09) "
                           "at step 42 (torch vs jax)"]


def test_float64_weights_checked_by_norms_and_by_files(tmp_path):
    records = [_record("torch"), _record("jax")]
    records[1].weights_norms["dense/bias"] *= 1 + 1e-7
    (row,) = cs.compare(records).rows
    assert row.weights_diff == pytest.approx(1e-7, rel=1e-3)
    assert row.reasons == ["final weights differ by 1e-07 relative (> 1e-08)"]
    # with weights files, the weights themselves are compared
    weights = {"dense/kernel": np.full((3, 2), 0.5), "dense/bias": np.arange(2.0)}
    for record, shift in zip(records, (0.0, 1e-9)):
        np.savez(tmp_path / f"{record.framework}.npz",
                 **{**weights, "dense/bias": weights["dense/bias"] + shift})
        record.weights_file = f"{record.framework}.npz"
        record.write(tmp_path / f"{record.framework}.json")
    (row,) = cs.compare(cs.read_runs(tmp_path)).rows
    assert row.weights_diff == pytest.approx(np.sqrt(2) * 1e-9, rel=1e-6) and row.passed
    (tmp_path / "jax.npz").unlink()
    with pytest.raises(RecordError, match="jax.json: weights_file .*jax.npz"):
        cs.compare(cs.read_runs(tmp_path))


def test_float32_judged_on_epochs_and_accuracy():
    torch_run = _record("torch", dtype="float32")
    # chaotic per-step drift (8 %) is fine in float32; epoch losses within 5 %, accuracy 1 point
    jax_run = _record("jax", dtype="float32", loss_noise=0.08, seed=1, epoch_loss_scale=1.04,
                      accuracy_shift=-0.01)
    (row,) = cs.compare([torch_run, jax_run]).rows
    assert row.passed, row.reasons
    assert row.step_loss_diff > 0.05 and row.steps == 150
    assert row.epoch_loss_diff == pytest.approx(0.04 / 1.04, rel=1e-6)
    assert row.accuracy_diff == pytest.approx(1.0)

    far = _record("tf", dtype="float32", accuracy_shift=0.02)
    (row,) = cs.compare([torch_run, far]).rows
    assert row.reasons == ["final test accuracy differs by 2.00 points (> 1.5)"]
    drifted = _record("jax", dtype="float32", epoch_loss_scale=1.2)
    (row,) = cs.compare([torch_run, drifted]).rows
    assert row.reasons == [f"epoch train loss differs by {1 - 1 / 1.2:.3g} relative (> 0.05) "
                           "(torch vs jax)"]


def test_float32_early_stopped_runs_compare_prefix_and_returned_model():
    long_run = _record("torch", dtype="float32", epochs=3)
    short = _record("jax", dtype="float32", epochs=3)
    short.epochs, short.step_loss = short.epochs[:2], short.step_loss[:100]
    short.final = {"epoch": 2, "test_loss": 0.3, "test_accuracy": 0.78}
    (row,) = cs.compare([long_run, short]).rows
    assert row.passed, row.reasons
    assert row.steps == 100 and row.test_accuracy == {"torch": 0.78, "jax": 0.78}
    short.final["test_accuracy"] = 0.70
    assert cs.compare([long_run, short]).rows[0].reasons == [
        "final test accuracy differs by 8.00 points (> 1.5)"]


def test_groups_by_experiment_and_dtype_and_refuses_what_cannot_be_compared():
    records = [_record("torch"), _record("jax"), _record("torch", dtype="float32"),
               _record("torch", "cifar-adam"), _record("jax", "cifar-adam", batch_size=100),
               _record("torch", "cnn"), _record("jax", "cnn", steps=140)]
    result = cs.compare(records)
    rows = {(r.experiment, r.dtype): r for r in result.rows}
    assert list(rows) == [("cifar-adam", "float64"), ("cnn", "float64"),
                          ("mnist-adam", "float32"), ("mnist-adam", "float64")]
    assert rows["mnist-adam", "float64"].passed
    assert rows["mnist-adam", "float32"].reasons == [
        "1 framework(s), at least 2 needed to compare"]
    assert rows["cifar-adam", "float64"].reasons == [
        "configs differ: batch_size=128 (torch) vs 100 (jax)"]
    assert rows["cnn", "float64"].reasons[0].startswith(
        "runs of different length: torch 150 steps/3 epochs, jax 140 steps/3 epochs")
    assert not result.passed
    assert not cs.compare([]).passed  # nothing compared is not agreement


def test_nan_loss_is_a_disagreement():
    records = [_record("torch"), _record("jax")]
    records[1].step_loss[5] = math.nan
    (row,) = cs.compare(records).rows
    assert not row.passed and row.step_loss_diff == math.inf


def test_tables():
    result = cs.compare([_record("torch"), _record("jax"), _record("torch", "solo")])
    markdown = result.table()
    lines = markdown.splitlines()
    assert lines[0].startswith("| experiment | dtype | frameworks | steps |")
    assert lines[2].startswith("| mnist-adam | float64 | torch, jax | 100 | 0.0e+00 |")
    assert "| torch 78.00 / jax 78.00 | 0.00 | - | step loss 0 / 1e-09; " in lines[2]
    assert lines[2].endswith("| inf | pass |")
    assert "FAIL: 1 framework(s), at least 2 needed to compare" in lines[3]
    text = result.table(markdown=False).splitlines()
    assert text[0].split()[:2] == ["experiment", "dtype"] and "|" not in text[1]


def test_float32_tolerance_grows_with_the_measured_own_spread():
    """Cross-framework accuracy within max(1.5 points, 3 x the twin-run spread)."""
    torch, jax = (_record("torch", dtype="float32"), _record("jax", dtype="float32",
                                                        accuracy_shift=0.036))
    alone = cs.compare([torch, jax]).rows[0]
    assert not alone.passed and "3.60 points (> 1.5)" in alone.reasons[0]
    assert math.isnan(alone.accuracy_spread)

    def twin(framework, shift):
        return _record(framework, dtype="float32", accuracy_shift=shift,
                       perturbation="initial weights + 1 ulp")

    # torch's own twin lands 1.5 points away: 3.6 <= 3 x 1.5 = 4.5 passes
    wide = cs.compare([torch, jax, twin("torch", 0.015), twin("jax", 0.035)]).rows[0]
    assert wide.passed, wide.reasons
    assert wide.accuracy_spread == pytest.approx(1.5) and wide.frameworks == ["torch", "jax"]
    assert wide.margin == pytest.approx(4.5 / 3.6)
    table = cs.compare([torch, jax, twin("torch", 0.015)]).table()
    assert "| 3.60 | 1.50 | " in table
    assert "test accuracy 3.6 / 4.5 | 1.25x | pass (fragile) |" in table
    # a 1-point spread allows only 3 points: 3.6 fails, naming the widened tolerance
    narrow = cs.compare([torch, jax, twin("torch", 0.01)]).rows[0]
    assert not narrow.passed and "(> 3)" in narrow.reasons[0]
    # float64 rows ignore twins: the exact policy stays exact
    exact = cs.compare([_record("torch"), _record("jax", loss_noise=1e-3),
                        _record("torch", perturbation="1 ulp", loss_noise=1e-3)]).rows[0]
    assert not exact.passed and math.isnan(exact.accuracy_spread)


def test_margins_fragile_and_short_runs():
    """margin = limit / observed of the tightest check; under 1.5x a pass is fragile;
    runs shorter than accuracy_min_steps are judged on their losses, not accuracy."""
    torch = _record("torch", dtype="float32")
    jax = _record("jax", dtype="float32", accuracy_shift=0.005, epoch_loss_scale=1.01)
    result = cs.compare([torch, jax])
    row = result.rows[0]
    assert [c.name for c in row.checks] == ["epoch loss", "test accuracy"]
    assert row.checks[0].observed == pytest.approx(0.01 / 1.01)
    assert row.margin == pytest.approx(1.5 / 0.5)  # accuracy: 0.5 of 1.5 points
    assert row.passed and not result.fragile()
    close = cs.compare([torch, _record("jax", dtype="float32", accuracy_shift=0.012)])
    assert close.passed and close.fragile() == close.rows
    assert "pass (fragile)" in close.summary()
    # 40 steps (< 50): the 3.6-point accuracy gap is reported, not judged
    short = cs.compare([_record("torch", dtype="float32", steps=40),
                        _record("jax", dtype="float32", steps=40, accuracy_shift=0.036)])
    assert short.passed and [c.name for c in short.rows[0].checks] == ["epoch loss"]
    assert short.rows[0].accuracy_diff == pytest.approx(3.6)
    # ... but a loss gap in a short run fails
    lossy = cs.compare([_record("torch", dtype="float32", steps=40),
                        _record("jax", dtype="float32", steps=40, epoch_loss_scale=1.2)])
    assert not lossy.passed and "epoch train loss differs" in lossy.rows[0].reasons[0]


def test_plots(tmp_path):
    records = [_record("torch"), _record("jax", loss_noise=0.01), _record("torch", "x", "float32")]
    paths = cs.plot(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["mnist-adam-float64.png", "x-float32.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for record in (_record("torch"), _record("jax")):
        record.write(good / f"{record.framework}.json")
    assert cs.main([str(good), "--markdown", str(tmp_path / "table.md")]) == 0
    out = capsys.readouterr().out
    assert "| mnist-adam | float64 |" in out and "1 of 1 experiment(s) agree" in out
    assert (good / "plots" / "mnist-adam-float64.png").is_file()
    assert (tmp_path / "table.md").read_text().startswith("| experiment |")

    disagreeing = _record("jax")
    disagreeing.step_loss[3] += 0.1
    for record in (_record("torch"), disagreeing):
        record.write(bad / f"{record.framework}.json")
    assert cs.main([str(bad), "--no-plots", "--text"]) == 1
    out = capsys.readouterr().out
    assert "0 of 1 experiment(s) agree: mnist-adam (float64) disagree" in out
    assert not (bad / "plots").exists()

    assert cs.main([str(tmp_path / "empty")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cs.main([str(tmp_path / "empty")]) == 2
    assert "no run records" in capsys.readouterr().err
    (bad / "broken.json").write_text("[]")
    assert cs.main([str(bad)]) == 2
    assert "broken.json: expected a JSON object, got list" in capsys.readouterr().err


def test_module_runs_and_imports_no_framework_nor_matplotlib(tmp_path):
    for record in (_record("torch"), _record("jax")):
        record.write(tmp_path / f"{record.framework}.json")
    code = ("import sys, polyopt.consistency\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'jax', 'jaxlib', 'tensorflow', 'keras', 'optax', 'matplotlib'))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "polyopt.consistency", str(tmp_path),
                           "--no-plots"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 of 1 experiment(s) agree" in proc.stdout, proc.stderr
