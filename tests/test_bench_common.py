"""benchmarks/common.py's result files and tables (numpy only; no timing is asserted)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def _timing(name, median, **extra):
    return {"name": name, "first_call_s": 0.5, "median_s": median, "p25_s": median * 0.9,
            "p75_s": median * 1.1, "rounds": 5, **extra}


def test_epoch_results_get_their_own_table(tmp_path):
    step = common.Result("torch", "Adam", "resnet18", 10, 2, 2_000_000, 1e9,
                         [_timing("native fused", 1e-3, state_bytes=2**20),
                          _timing("polyopt fast", 2e-3, state_bytes=2**20)])
    epoch = common.Result("jax", "Adam", "cifar-cnn 78x128", 42442, 6, 0, math.nan,
                          [_timing("native optax", 10.0, paired_vs_native=1.0,
                                   optimizer_ms_per_batch=0.2, estimate_vs_native=1.0),
                           _timing("polyopt", 11.0, paired_vs_native=1.05,
                                   optimizer_ms_per_batch=0.3, estimate_vs_native=1.001)],
                          per="epoch")
    common.write([step, epoch], tmp_path / "r.json")
    step_table, epoch_table = common.markdown(tmp_path / "r.json").split("\n\n")
    assert "ms/step" in step_table and "| polyopt fast | 2.00 (1.80-2.20) |" in step_table
    assert "| 2.00x | 1.00x | 1.0 |" in step_table  # vs native, vs bound (2 ms), MiB
    assert "cifar" not in step_table and "resnet18" not in epoch_table
    assert epoch_table.startswith("| framework | algorithm | data | variant | s/epoch")
    assert ("| jax | Adam (CIFAR CNN epoch) | cifar-cnn 78x128 | polyopt | 11.00 (9.90-12.10) "
            "| 0.50 | 1.050x | 0.30 | 1.001x |") in epoch_table


def test_step_files_without_per_still_load(tmp_path):
    """Result files written before ``per`` existed are optimizer-step results."""
    result = asdict(common.Result("jax", "SGD", "resnet18", 10, 2, 80, 1e9,
                                  [_timing("native optax", 1e-3)]))
    del result["per"]
    (tmp_path / "old.json").write_text(json.dumps([result]))
    table = common.markdown(tmp_path / "old.json")
    assert "\n\n" not in table and "| jax | SGD | resnet18 | native optax | 1.00" in table


def test_ratio_to_native_is_paired_by_round_when_the_rounds_are_recorded():
    """A load spike that hits the native's rounds 0-1 and the variant's rounds
    2-3 moves the ratio of the medians (2.4x) but not the median of the per-round
    ratios: in every quiet round the variant took 0.8 of the native's time."""
    native = [3.0, 3.0, 1.0, 1.0, 1.0]
    ours = [2.4, 2.4, 3.0, 3.0, 0.8]
    result = common.Result("torch", "Adam", "resnet18", 10, 2, 2_000_000, 1e9, [
        {**_timing("native fused", 1.0), "per_round_s": native},
        {**_timing("polyopt fast", 2.4), "per_round_s": ours}])
    rows = {row["variant"]: row for row in result.rows()}
    assert rows["native fused"]["vs_native"] == 1.0
    assert rows["polyopt fast"]["vs_native"] == 0.8
    old = common.Result(**{**asdict(result), "timings": [
        {k: v for k, v in t.items() if k != "per_round_s"} for t in result.timings]})
    assert {row["variant"]: row["vs_native"] for row in old.rows()}["polyopt fast"] == 2.4


def test_polyopt_default_gets_a_column_against_the_native_default(tmp_path):
    """"polyopt default" is also compared with "native default (...)" (what
    torch.optim runs without flags), paired by round; a run without a native
    default has no such column."""
    result = common.Result("torch", "Adam", "resnet18", 10, 2, 2_000_000, 1e9, [
        {**_timing("native fused", 1.0), "per_round_s": [1.0] * 3},
        {**_timing("native default (for-loop)", 4.0), "per_round_s": [4.0, 4.0, 8.0]},
        {**_timing("polyopt default", 5.0), "per_round_s": [5.0, 5.0, 4.0]}])
    rows = {row["variant"]: row for row in result.rows()}
    assert rows["polyopt default"]["vs_default"] == 1.25
    assert rows["polyopt default"]["vs_native"] == 5.0
    assert math.isnan(common.Result("jax", "Adam", "resnet18", 10, 2, 2_000_000, 1e9, [
        _timing("native optax", 1.0), _timing("polyopt", 1.0)]).rows()[1]["vs_default"])
    path = tmp_path / "torch.json"
    common.write([result], path)
    table = common.summary(path)
    assert table.splitlines()[0] == ("| algorithm | params | torch default | "
                                     "torch default vs native default |")
    assert table.splitlines()[2] == ("| Adam | resnet18 | 5.00x (5000.0 / 1000.0) | "
                                     "1.25x (5000.0 / 4000.0) |")


def test_a_reference_variant_is_paired_by_mode_and_named_in_the_summary_cell(tmp_path):
    """Keras has no RAdam: Ranger's row times polyopt's RAdam as its reference
    ("reference ..."), in each mode. Each variant's vs_reference is paired with the
    reference of its mode (the names' last word), or the only reference (JAX); the
    reference gets no column of its own and the native stays the vs_native one."""
    keras = common.Result("keras", "Ranger", "resnet18", 10, 2, 2_000_000, 1e9, [
        {**_timing("polyopt jit_compile", 3.0), "per_round_s": [3.0, 3.0, 6.0]},
        {**_timing("polyopt tf.function", 8.0), "per_round_s": [8.0] * 3},
        {**_timing("native Adam (no Ranger) jit_compile", 1.0), "per_round_s": [1.0] * 3},
        {**_timing("reference polyopt RAdam jit_compile", 2.0), "per_round_s": [2.0, 2.0, 2.0]},
        {**_timing("reference polyopt RAdam tf.function", 4.0), "per_round_s": [4.0] * 3}])
    rows = {row["variant"]: row for row in keras.rows()}
    assert rows["polyopt jit_compile"]["vs_reference"] == 1.5
    assert rows["polyopt tf.function"]["vs_reference"] == 2.0
    assert rows["polyopt jit_compile"]["vs_native"] == 3.0
    jax = common.Result("jax", "Ranger", "resnet18", 10, 2, 2_000_000, 1e9, [
        _timing("polyopt", 3.0), _timing("native optax.radam (no Ranger)", 2.0),
        _timing("reference polyopt RAdam", 1.5)])
    assert {row["variant"]: row["vs_reference"] for row in jax.rows()}["polyopt"] == 2.0
    assert math.isnan(common.Result("jax", "Adam", "resnet18", 10, 2, 2_000_000, 1e9, [
        _timing("native optax", 1.0), _timing("polyopt", 1.0)]).rows()[1]["vs_reference"])
    path = tmp_path / "r.json"
    common.write([keras, jax], path)
    table = common.summary(path).splitlines()
    assert table[0] == "| algorithm | params | keras jit_compile | keras tf.function | jax |"
    assert table[2] == ("| Ranger | resnet18 | 3.00x (3000.0 / 1000.0); 1.50x polyopt RAdam "
                        "(3000.0 / 2000.0) | 8.00x (8000.0 / 1000.0); 2.00x polyopt RAdam "
                        "(8000.0 / 4000.0) | 1.50x (3000.0 / 2000.0); 2.00x polyopt RAdam "
                        "(3000.0 / 1500.0) |")


def test_muon_is_timed_on_the_transformer_set_alone_one_step_per_round():
    shapes = common.PARAM_SETS["transformer"]
    assert common.sizes(shapes) == (14_178_816, 36)
    assert sorted(set(common.matrices(shapes))) == [(768, 768), (768, 3072), (3072, 768)]
    assert common.sizes(common.matrices(shapes)) == (14_155_776, 12)
    assert common.sets_of("Muon") == ("transformer",)
    assert "transformer" not in common.sets_of("Adam")
    args = common.parser("x", {"Adam": 0, "Muon": 0}, Path("out.json")).parse_args([])
    assert common.length("Muon", args) == (1, args.rounds)
    assert common.length("Adam", args) == (args.steps, args.rounds)
