r"""Run records and the cross-framework agreement check.

Train the same model with the same data, initial weights and optimizer in
several frameworks; each run writes one :class:`RunRecord` (JSON); then
:func:`compare` says whether the runs agree, per experiment, against a
:class:`Policy`, and :func:`plot` overlays their curves. Numpy only
(matplotlib, for the plots, is imported when they are drawn); no framework.

``python -m polyopt.consistency RUNS_DIR`` reads every ``*.json`` record under
``RUNS_DIR``, prints the agreement table, writes overlay plots (PNG) and exits
1 when some experiment disagrees (2 when a record is unreadable or missing).

The record (``schema: "polyopt.run/1"``), one JSON object:

======================  ====================================================
``experiment``          name; records with the same experiment and dtype are
                        compared with each other
``framework``           e.g. ``torch``, ``tf``, ``jax``
``dtype``               ``float32`` or ``float64`` (or any other name)
``config``              object: what was run (model, optimizer, batch size,
                        epochs, seed...); must be equal across the compared
                        records, except for keys listed in ``config_ignore``
``versions``            object: name -> version string (framework, polyopt...)
``step_loss``           list of the training loss at every optimizer step
``epochs``              list of objects with ``train_loss``,
                        ``train_accuracy``, ``test_loss``, ``test_accuracy``
                        (accuracies as fractions in [0, 1]) and
                        ``learning_rate``
``wall_time``           seconds the run took
``weights_checksum``    sha256 of the final weights (:func:`weights_checksum`)
``weights_norms``       object: parameter name -> L2 norm of its final value
``final``               optional object ``{"epoch", "test_loss",
                        "test_accuracy"}``: the evaluation of the model the
                        run returns when it is not the last epoch's (early
                        stopping restored an earlier epoch's weights)
``weights_file``        optional: an ``.npz`` of the final weights, relative
                        to the record; compared exactly when every record
                        of an experiment has one
======================  ====================================================

The tolerance policy (``Policy()``, from the project's design):

- float64 (exact arithmetic in every framework): the training loss of the
  first 100 steps agrees to 1e-9 relative, the final weights to 1e-8
  (relative to each parameter's norm; the norms when no weights file);
- float32 (runs drift apart chaotically after some hundred steps): the
  per-epoch mean train and test losses agree to 5 % relative, and the final
  test accuracies to 1.5 points, or to ``spread_factor`` (2) times the
  framework's own float32 spread when that is larger. The spread is measured
  by *twin* runs: the same framework again from initial weights moved by one
  ulp (a record whose ``config`` has ``"perturbation"``); it is the largest
  difference between a framework's run and its twin (accuracy in points,
  epoch losses relative), over the frameworks that have a twin. A
  difference between frameworks no larger than what one ulp does inside one
  framework is float32 chaos, not disagreement. Twins are never compared
  across frameworks themselves.

Examples:

>>> a = RunRecord("demo", "torch", "float64", step_loss=[2.3, 1.9, 1.5])
>>> b = RunRecord("demo", "jax", "float64", step_loss=[2.3, 1.9, 1.5 + 1e-12])
>>> result = compare([a, b])
>>> result.passed
True
>>> c = RunRecord("demo", "tf", "float64", step_loss=[2.3, 1.9, 1.6])
>>> bad = compare([a, b, c])
>>> bad.passed, bad.rows[0].reasons
(False, ['step loss differs by 0.0625 relative (> 1e-09) at step 2 (torch vs tf)'])
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyopt import files

SCHEMA = "polyopt.run/1"
EPOCH_FIELDS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate")


class RecordError(ValueError):
    """A run record is not valid (the message names the file and the field)."""


# --------------------------------------------------------------------------
# the record


@dataclasses.dataclass
class RunRecord:
    """One training run (see the module docstring for the fields)."""

    experiment: str
    framework: str
    dtype: str
    config: dict = dataclasses.field(default_factory=dict)
    versions: dict = dataclasses.field(default_factory=dict)
    step_loss: list = dataclasses.field(default_factory=list)
    epochs: list = dataclasses.field(default_factory=list)
    wall_time: float = 0.0
    weights_checksum: str = ""
    weights_norms: dict = dataclasses.field(default_factory=dict)
    weights_file: str | None = None
    final: dict | None = None
    path: Path | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The JSON object of this record (validated)."""
        out = {"schema": SCHEMA}
        for field in dataclasses.fields(self):
            if field.name != "path":
                out[field.name] = getattr(self, field.name)
        out["step_loss"] = [float(x) for x in self.step_loss]
        out["epochs"] = [{k: float(v) if k != "epoch" else int(v) for k, v in e.items()}
                         for e in self.epochs]
        validate(out)
        return out

    @classmethod
    def from_dict(cls, data: Mapping, path: str | os.PathLike | None = None) -> RunRecord:
        """A record from its JSON object, validated; errors name ``path``."""
        validate(data, path)
        values = {f.name: data[f.name] for f in dataclasses.fields(cls)
                  if f.name in data and f.name != "path"}
        return cls(**values, path=None if path is None else Path(path))

    def write(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON to ``path`` (directories are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=True)
        files.write_text(path, text + "\n")
        self.path = path
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunRecord:
        """Read and validate one record."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise RecordError(f"{path}: not a readable JSON run record ({error})") from error
        return cls.from_dict(data, path)

    def final_value(self, field: str) -> float:
        """``test_loss`` or ``test_accuracy`` of the model the run returned: ``final``
        if given, else the last epoch's (NaN without epochs)."""
        if self.final is not None:
            return float(self.final[field])
        return float(self.epochs[-1][field]) if self.epochs else math.nan

    def load_weights(self) -> dict[str, np.ndarray] | None:
        """The final weights from ``weights_file`` (None without one)."""
        if not self.weights_file:
            return None
        file = (self.path.parent if self.path else Path()) / self.weights_file
        try:
            with np.load(file) as arrays:
                return {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError) as error:
            raise RecordError(f"{self.path or 'run record'}: weights_file {file}: {error}") \
                from error


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(data: Any, path: str | os.PathLike | None = None) -> None:
    """Raise RecordError (naming ``path`` and the field) unless ``data`` is a valid record.

    >>> validate({"schema": "polyopt.run/1", "experiment": "x", "framework": "torch"})
    Traceback (most recent call last):
    ...
    polyopt.consistency.RecordError: run record: missing field 'dtype'
    """
    where = f"{path}" if path is not None else "run record"

    def fail(message: str) -> None:
        raise RecordError(f"{where}: {message}")

    if not isinstance(data, Mapping):
        fail(f"expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        fail(f"field 'schema' must be {SCHEMA!r}, got {data.get('schema')!r}")
    for name in ("experiment", "framework", "dtype"):
        if name not in data:
            fail(f"missing field {name!r}")
        if not isinstance(data[name], str) or not data[name]:
            fail(f"field {name!r} must be a non-empty string, got {data[name]!r}")
    for name in ("config", "versions", "weights_norms"):
        if not isinstance(data.get(name, {}), Mapping):
            fail(f"field {name!r} must be an object, got {type(data[name]).__name__}")
    for key, value in data.get("weights_norms", {}).items():
        if not _is_number(value):
            fail(f"field 'weights_norms': {key!r} must be a number, got {value!r}")
    losses = data.get("step_loss", [])
    if not isinstance(losses, list) or not all(_is_number(x) for x in losses):
        bad = next((x for x in losses if not _is_number(x)), losses) \
            if isinstance(losses, list) else losses
        fail(f"field 'step_loss' must be a list of numbers, found {bad!r}")
    epochs = data.get("epochs", [])
    if not isinstance(epochs, list):
        fail(f"field 'epochs' must be a list, got {type(epochs).__name__}")
    for i, epoch in enumerate(epochs):
        if not isinstance(epoch, Mapping):
            fail(f"epochs[{i}] must be an object, got {epoch!r}")
        for name in EPOCH_FIELDS:
            if not _is_number(epoch.get(name)):
                fail(f"epochs[{i}].{name} must be a number, got {epoch.get(name)!r}")
        for name in ("train_accuracy", "test_accuracy"):
            if not 0 <= epoch[name] <= 1 and not math.isnan(epoch[name]):
                fail(f"epochs[{i}].{name} must be a fraction in [0, 1], got {epoch[name]!r}")
    if not _is_number(data.get("wall_time", 0.0)) or data.get("wall_time", 0.0) < 0:
        fail(f"field 'wall_time' must be a number >= 0, got {data.get('wall_time')!r}")
    for name in ("weights_checksum",):
        if not isinstance(data.get(name, ""), str):
            fail(f"field {name!r} must be a string, got {data[name]!r}")
    final = data.get("final")
    if final is not None:
        if not isinstance(final, Mapping):
            fail(f"field 'final' must be an object or null, got {final!r}")
        for name in ("epoch", "test_loss", "test_accuracy"):
            if not _is_number(final.get(name)):
                fail(f"final.{name} must be a number, got {final.get(name)!r}")
        if not 0 <= final["test_accuracy"] <= 1 and not math.isnan(final["test_accuracy"]):
            fail(f"final.test_accuracy must be a fraction in [0, 1], got "
                 f"{final['test_accuracy']!r}")
    if data.get("weights_file") is not None and not isinstance(data["weights_file"], str):
        fail(f"field 'weights_file' must be a string or null, got {data['weights_file']!r}")
    unknown = set(data) - {f.name for f in dataclasses.fields(RunRecord)} - {"schema"}
    if unknown:
        fail(f"unknown field(s) {', '.join(sorted(unknown))}")


def read_runs(directory: str | os.PathLike) -> list[RunRecord]:
    """Every ``*.json`` record under ``directory`` (recursively), validated, sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecordError(f"{directory}: no such directory")
    return [RunRecord.read(p) for p in sorted(directory.rglob("*.json"))]


def weights_checksum(weights: Mapping[str, Any]) -> str:
    """sha256 over the names and float64 bytes of ``weights`` (in the given order).

    Equal only for bit-identical weights; across frameworks compare norms or
    the weights themselves.

    >>> weights_checksum({"w": np.zeros(2)}) == weights_checksum({"w": np.zeros(2, np.float32)})
    True
    >>> weights_checksum({"w": np.zeros(2)}) == weights_checksum({"w": np.ones(2)})
    False
    """
    digest = hashlib.sha256()
    for name, value in weights.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value, dtype=np.float64).tobytes())
    return digest.hexdigest()


def weights_norms(weights: Mapping[str, Any]) -> dict[str, float]:
    """The L2 norm (in float64) of every array of ``weights``, by name."""
    return {name: float(np.linalg.norm(np.asarray(value, np.float64).ravel()))
            for name, value in weights.items()}


# --------------------------------------------------------------------------
# the policy and the comparison


@dataclasses.dataclass(frozen=True)
class Policy:
    """Tolerances (see the module docstring); ``exact_dtypes`` get the step-by-step check."""

    exact_dtypes: tuple[str, ...] = ("float64",)
    exact_steps: int = 100
    exact_loss_rtol: float = 1e-9
    exact_weights_rtol: float = 1e-8
    epoch_loss_rtol: float = 0.05
    accuracy_points: float = 1.5
    accuracy_min_steps: int = 50
    spread_factor: float = 3.0
    min_frameworks: int = 2
    fragile_margin: float = 1.5
    config_ignore: tuple[str, ...] = ("framework", "data_dir", "runs_dir", "arithmetic")


DEFAULT_POLICY = Policy()


@dataclasses.dataclass(frozen=True)
class Check:
    """One judged quantity of a row: the observed difference and its limit."""

    name: str        # "step loss", "final weights", "epoch loss", "test accuracy"
    observed: float
    limit: float

    @property
    def margin(self) -> float:
        if math.isnan(self.observed):
            return 0.0
        return math.inf if self.observed == 0 else self.limit / self.observed

    @property
    def passed(self) -> bool:
        return self.observed <= self.limit


@dataclasses.dataclass
class Agreement:
    """One row of the agreement table: one experiment in one dtype."""

    experiment: str
    dtype: str
    frameworks: list[str]
    steps: int = 0                      # steps compared
    step_loss_diff: float = math.nan    # max relative difference over the compared steps
    epoch_loss_diff: float = math.nan   # max relative difference of epoch train/test losses
    weights_diff: float = math.nan      # max relative difference of the final weights (or norms)
    test_accuracy: dict = dataclasses.field(default_factory=dict)  # framework -> final, fraction
    accuracy_diff: float = math.nan     # max difference of final test accuracy, in points
    accuracy_spread: float = math.nan   # own float32 spread (twin runs), in points
    epoch_loss_spread: float = math.nan  # own float32 spread of the epoch losses, relative
    wall_time: dict = dataclasses.field(default_factory=dict)
    reasons: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)  # what the verdict judged

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def margin(self) -> float:
        """How far the verdict is from flipping: min over the checks of limit / observed
        (inf when every observed difference is 0; NaN without checks)."""
        return min((check.margin for check in self.checks), default=math.nan)


@dataclasses.dataclass
class Comparison:
    """The result of :func:`compare`: one :class:`Agreement` per experiment and dtype."""

    rows: list[Agreement]
    policy: Policy

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def fragile(self) -> list[Agreement]:
        """The passing rows whose margin is under the policy's ``fragile_margin``."""
        return [row for row in self.rows
                if row.passed and not row.margin >= self.policy.fragile_margin]

    def table(self, markdown: bool = True) -> str:
        """The full agreement table (markdown, or aligned plain text)."""
        header = ["experiment", "dtype", "frameworks", "steps", "max step-loss diff",
                  "max epoch-loss diff", "weights diff", "final test accuracy (%)",
                  "accuracy diff (points)", "own spread (points)", "judged: observed / limit",
                  "margin", "verdict"]
        lines = [[row.experiment, row.dtype, ", ".join(row.frameworks), str(row.steps),
                  _fmt(row.step_loss_diff), _fmt(row.epoch_loss_diff), _fmt(row.weights_diff),
                  " / ".join(f"{fw} {100 * acc:.2f}" for fw, acc in row.test_accuracy.items())
                  or "-",
                  _fmt(row.accuracy_diff, ".2f"), _fmt(row.accuracy_spread, ".2f"),
                  _checks(row), _margin(row.margin), self._verdict(row)]
                 for row in self.rows]
        return _render(header, lines, markdown)

    def summary(self, markdown: bool = False) -> str:
        """The short table: per row, what was judged, the margin and the verdict."""
        header = ["experiment", "dtype", "steps", "test accuracy (%)", "judged: observed / limit",
                  "margin", "verdict"]
        lines = [[row.experiment, row.dtype, str(row.steps),
                  " / ".join(f"{100 * acc:.2f}" for acc in row.test_accuracy.values()) or "-",
                  _checks(row), _margin(row.margin), self._verdict(row)]
                 for row in self.rows]
        return _render(header, lines, markdown)

    def _verdict(self, row: Agreement) -> str:
        if not row.passed:
            return "FAIL: " + "; ".join(row.reasons)
        return "pass (fragile)" if row in self.fragile() else "pass"


def _checks(row: Agreement) -> str:
    return "; ".join(f"{c.name} {_fmt(c.observed, '.2g')} / {_fmt(c.limit, '.2g')}"
                     for c in row.checks) or "-"


def _margin(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}x"


def _render(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in [header, *lines])


def _fmt(value: float, spec: str = ".1e") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise |a - b| / max(|a|, |b|); 0 where both are 0, inf where one is NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.maximum(np.abs(a), np.abs(b))
        out = np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1), 0.0)
    return np.where(np.isnan(a) | np.isnan(b), np.inf, out)


def _config_difference(records: Sequence[RunRecord], ignore: Iterable[str]) -> str | None:
    ignore = set(ignore)
    first = records[0]
    for other in records[1:]:
        keys = (set(first.config) | set(other.config)) - ignore
        for key in sorted(keys):
            if first.config.get(key) != other.config.get(key):
                return (f"configs differ: {key}={first.config.get(key)!r} ({first.framework}) "
                        f"vs {other.config.get(key)!r} ({other.framework})")
    return None


def is_twin(record: RunRecord) -> bool:
    """Whether ``record`` is a twin run (perturbed initial weights; see the policy)."""
    return bool(record.config.get("perturbation"))


def _spread(records: list[RunRecord], twins: list[RunRecord]) -> tuple[float, float]:
    """(accuracy points, epoch-loss relative): the largest run-vs-twin differences."""
    accuracy, loss = math.nan, math.nan
    for twin in twins:
        for record in records:
            if record.framework != twin.framework or not (record.epochs and twin.epochs):
                continue
            gap = abs(record.final_value("test_accuracy") - twin.final_value("test_accuracy"))
            accuracy = np.nanmax([accuracy, 100 * gap])
            n = min(len(record.epochs), len(twin.epochs))
            for field in ("train_loss", "test_loss"):
                diff = _relative([e[field] for e in record.epochs[:n]],
                                 [e[field] for e in twin.epochs[:n]])
                loss = np.nanmax([loss, float(diff.max())])
    return float(accuracy), float(loss)


def _agreement(records: list[RunRecord], policy: Policy,
               twins: Sequence[RunRecord] = ()) -> Agreement:
    first = records[0]
    row = Agreement(first.experiment, first.dtype, [r.framework for r in records])
    row.test_accuracy = {r.framework: r.final_value("test_accuracy") for r in records if r.epochs}
    row.wall_time = {r.framework: r.wall_time for r in records}
    exact = first.dtype in policy.exact_dtypes

    frameworks = row.frameworks
    if len(set(frameworks)) != len(frameworks):
        row.reasons.append(f"several records per framework: {', '.join(frameworks)}")
    if len(set(frameworks)) < policy.min_frameworks:
        row.reasons.append(f"{len(set(frameworks))} framework(s), at least "
                           f"{policy.min_frameworks} needed to compare")
    difference = _config_difference(records, policy.config_ignore)
    if difference:
        row.reasons.append(difference)
    lengths = {len(r.step_loss) for r in records}
    epochs = {len(r.epochs) for r in records}
    if exact and (len(lengths) > 1 or len(epochs) > 1):
        # float32 runs may legitimately stop early at different epochs: their
        # common prefix and final accuracies are compared
        row.reasons.append("runs of different length: " + ", ".join(
            f"{r.framework} {len(r.step_loss)} steps/{len(r.epochs)} epochs" for r in records))
    if min(lengths) == 0:
        row.reasons.append("no step losses recorded")
    steps = min(lengths)
    row.steps = min(steps, policy.exact_steps) if exact else steps

    step_worst = (0.0, "", 0)
    epoch_worst = (0.0, "", "")
    accuracy_worst = 0.0
    for a, b in itertools.combinations(records, 2):
        pair = f"{a.framework} vs {b.framework}"
        if row.steps:
            diff = _relative(a.step_loss[:row.steps], b.step_loss[:row.steps])
            i = int(np.argmax(diff))
            if diff[i] > step_worst[0] or not step_worst[1]:
                step_worst = (float(diff[i]), pair, i)
        n = min(len(a.epochs), len(b.epochs))
        for field in ("train_loss", "test_loss"):
            if n:
                diff = _relative([e[field] for e in a.epochs[:n]], [e[field] for e in b.epochs[:n]])
                if diff.max() > epoch_worst[0] or not epoch_worst[1]:
                    epoch_worst = (float(diff.max()), pair, field)
        if a.epochs and b.epochs:
            gap = abs(a.final_value("test_accuracy") - b.final_value("test_accuracy")) * 100
            accuracy_worst = max(accuracy_worst, gap if not math.isnan(gap) else math.inf)
    if step_worst[1]:
        row.step_loss_diff = step_worst[0]
    if epoch_worst[1]:
        row.epoch_loss_diff = epoch_worst[0]
    if len(row.test_accuracy) >= 2:
        row.accuracy_diff = accuracy_worst
    row.weights_diff = _weights_difference(records)

    accuracy_points, epoch_loss_rtol = policy.accuracy_points, policy.epoch_loss_rtol
    if not exact and twins:
        row.accuracy_spread, row.epoch_loss_spread = _spread(records, list(twins))
        if not math.isnan(row.accuracy_spread):
            accuracy_points = max(accuracy_points, policy.spread_factor * row.accuracy_spread)
        if not math.isnan(row.epoch_loss_spread):
            epoch_loss_rtol = max(epoch_loss_rtol, policy.spread_factor * row.epoch_loss_spread)
    if exact:
        if step_worst[1]:
            row.checks.append(Check("step loss", step_worst[0], policy.exact_loss_rtol))
            if not row.checks[-1].passed:
                row.reasons.append(f"step loss differs by {step_worst[0]:.3g} relative "
                                   f"(> {policy.exact_loss_rtol:g}) at step {step_worst[2]} "
                                   f"({step_worst[1]})")
        if not math.isnan(row.weights_diff):
            row.checks.append(Check("final weights", row.weights_diff,
                                    policy.exact_weights_rtol))
            if not row.checks[-1].passed:
                row.reasons.append(f"final weights differ by {row.weights_diff:.3g} relative "
                                   f"(> {policy.exact_weights_rtol:g})")
    elif epoch_worst[1]:
        row.checks.append(Check("epoch loss", epoch_worst[0], epoch_loss_rtol))
        if not row.checks[-1].passed:
            row.reasons.append(f"epoch {epoch_worst[2].replace('_', ' ')} differs by "
                               f"{epoch_worst[0]:.3g} relative (> {epoch_loss_rtol:.3g}) "
                               f"({epoch_worst[1]})")
    # accuracy says something only after some training: a few steps leave it near
    # chance, where argmax ties flip (the losses judge those runs)
    if not math.isnan(row.accuracy_diff) and (exact or steps >= policy.accuracy_min_steps):
        row.checks.append(Check("test accuracy", row.accuracy_diff, accuracy_points))
        if not row.checks[-1].passed:
            row.reasons.append(f"final test accuracy differs by {row.accuracy_diff:.2f} "
                               f"points (> {accuracy_points:.3g})")
    return row


def _weights_difference(records: list[RunRecord]) -> float:
    """Max relative difference of the final weights (norm-wise per parameter), or of
    their norms when some record has no weights file; NaN when nothing to compare."""
    weights = [r.load_weights() for r in records]
    if all(w is not None for w in weights):
        worst = 0.0
        for a, b in itertools.combinations(weights, 2):
            if set(a) != set(b):
                return math.inf
            for name in a:
                scale = max(np.linalg.norm(a[name]), np.linalg.norm(b[name]))
                gap = np.linalg.norm(np.asarray(a[name], np.float64) - b[name])
                worst = max(worst, float(gap / scale) if scale else 0.0)
        return worst
    norms = [r.weights_norms for r in records]
    if not all(norms):
        return math.nan
    worst = 0.0
    for a, b in itertools.combinations(norms, 2):
        if set(a) != set(b):
            return math.inf
        names = sorted(a)
        worst = max(worst, float(_relative([a[n] for n in names], [b[n] for n in names]).max()))
    return worst


def compare(records: Iterable[RunRecord], policy: Policy = DEFAULT_POLICY) -> Comparison:
    """Group ``records`` by (experiment, dtype) and check each group against ``policy``."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    twins: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        (twins if is_twin(record) else groups).setdefault(
            (record.experiment, record.dtype), []).append(record)
    rows = [_agreement(sorted(group, key=_framework_order), policy, twins.get(key, ()))
            for key, group in sorted(groups.items())]
    return Comparison(rows, policy)


_ORDER = ("torch", "tf", "keras", "jax")


def _framework_order(record: RunRecord) -> tuple[int, str]:
    name = record.framework
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


# --------------------------------------------------------------------------
# plots


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("polyopt.consistency draws its plots with matplotlib, which is not "
                          "installed: pip install matplotlib (or polyopt[lab])") from error
    return Figure, FigureCanvasAgg


def plot(records: Iterable[RunRecord], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per experiment and dtype: step loss, epoch losses and test accuracy,
    every framework overlaid. Returns the paths written."""
    Figure, FigureCanvasAgg = _figure_class()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.experiment, record.dtype), []).append(record)
    written = []
    for (experiment, dtype), group in sorted(groups.items()):
        figure = Figure(figsize=(13, 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        steps, losses, accuracy = figure.subplots(1, 3)
        for i, record in enumerate(sorted(group, key=_framework_order)):
            label = record.framework
            style = ("-", "--", ":", "-.")[i % 4]  # agreeing curves overlap: keep all visible
            if record.step_loss:
                steps.plot(np.arange(1, len(record.step_loss) + 1), record.step_loss,
                           label=label, linewidth=1.0, linestyle=style)
            if record.epochs:
                x = np.arange(1, len(record.epochs) + 1)
                line, = losses.plot(x, [e["train_loss"] for e in record.epochs], marker="o",
                                    label=f"{label} train")
                losses.plot(x, [e["test_loss"] for e in record.epochs], marker="s",
                            linestyle="--", color=line.get_color(), label=f"{label} test")
                accuracy.plot(x, [100 * e["test_accuracy"] for e in record.epochs],
                              marker="o", label=label)
        steps.set(title="training loss per step", xlabel="step", ylabel="loss")
        losses.set(title="loss per epoch", xlabel="epoch", ylabel="loss")
        accuracy.set(title="test accuracy", xlabel="epoch", ylabel="accuracy (%)")
        for axes in (steps, losses, accuracy):
            if axes.has_data():
                axes.legend(fontsize="small")
        figure.suptitle(f"{experiment} ({dtype})")
        path = out_dir / f"{_safe(experiment)}-{_safe(dtype)}.png"
        files.write_to(path, figure.savefig, format="png", dpi=90)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------
# python -m polyopt.consistency RUNS_DIR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyopt.consistency",
        description="Compare run records across frameworks: agreement table, overlay plots; "
                    "exit 1 when some experiment disagrees, 2 when records are missing or bad.")
    parser.add_argument("runs_dir", help="directory holding the run records (*.json)")
    parser.add_argument("--plots", metavar="DIR",
                        help="where to write the PNG plots (default: RUNS_DIR/plots)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--text", action="store_true", help="print aligned text, not markdown")
    parser.add_argument("--min-frameworks", type=int, default=DEFAULT_POLICY.min_frameworks)
    args = parser.parse_args(argv)
    try:
        records = read_runs(args.runs_dir)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no run records (*.json) under {args.runs_dir}", file=sys.stderr)
        return 2
    policy = dataclasses.replace(DEFAULT_POLICY, min_frameworks=args.min_frameworks)
    result = compare(records, policy)
    print(result.summary(markdown=not args.text))
    if args.markdown:
        files.write_text(args.markdown, result.table() + "\n")
        print(f"full table: {args.markdown}")
    if not args.no_plots:
        main_records = [r for r in records if not is_twin(r)]
        plots = plot(main_records, args.plots or Path(args.runs_dir) / "plots")
        if plots:
            print(f"plots: {len(plots)} PNG files in {plots[0].parent}")
    failed = [row for row in result.rows if not row.passed]
    print(f"{len(result.rows) - len(failed)} of {len(result.rows)} experiment(s) agree"
          + (": " + ", ".join(f"{r.experiment} ({r.dtype})" for r in failed) + " disagree"
             if failed else ""))
    fragile = result.fragile()
    margins = [row.margin for row in result.rows if row.passed]
    if margins:
        print(f"smallest margin {_margin(min(margins))} (limit / observed; "
              f"< {policy.fragile_margin:g}x is fragile)"
              + (": fragile: " + ", ".join(f"{r.experiment} ({r.dtype})" for r in fragile)
                 if fragile else ""))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
