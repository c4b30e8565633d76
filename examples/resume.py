"""Resume after ``kill -9``: the MNIST MLP trained with checkpoints, killed at random, finished.

Two commands, one framework per process:

    python -m examples.resume train --framework torch --dir runs/resume --steps 70 --every 5
    python -m examples.resume campaign --framework jax --kills 20 --dir /tmp/kills

``train`` trains the MNIST MLP (examples/models, the shipped MNIST subset,
polyopt's Adam through the framework's adapter: ``polyopt.torch.Adam``,
``polyopt.optax.adam``, ``polyopt.keras.Adam`` on ``$KERAS_BACKEND``) for
``--steps`` steps and writes a checkpoint every ``--every`` steps; started
again on the same directory it resumes from the checkpoint there. The
batches of step ``s`` depend on ``s`` and the seed only (one numpy
permutation per epoch), so a resumed run sees the same batches as an
uninterrupted one. At the end it writes the final weights (``final.npz``).

A checkpoint (``checkpoint.npz``) is one file: the step, the weights (neutral
layout) and the optimizer state as a polyopt state file (the adapter's
``export_state``), written with :func:`polyopt.files.atomic_write`, so a
kill at any moment leaves the previous checkpoint whole. A checkpoint that
is truncated, empty, foreign or from another configuration is refused with
its path and the reason (exit status 2), and left as it is.

``train`` reports on stdout, one line per event (the campaign reads them):
``fresh`` or ``resumed <step> <sha256>``, ``step <n>``, ``writing <n>``,
``saved <n> <bytes> <sha256>`` (after the rename), ``done <sha256 of final.npz>``.

``campaign`` runs ``train`` uninterrupted, then again under SIGKILL at
seeded random moments (``--kills`` times): during start-up or the restore,
between steps, and in the middle of a checkpoint write (``--slow-write``
spreads the write over that many seconds so that the kill lands inside it;
the campaign checks that the temporary file is there when it kills). After
every kill it checks that the checkpoint on disk is the last one announced
as saved (or a complete newer one whose announcement the kill cut off), and
that the next process resumes from it; at the end, that the final weights are
bitwise those of the uninterrupted run. It prints kills, resumes, steps
redone and bytes lost (the size of any announced checkpoint not found
intact: 0 is the only passing value) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from polyopt import files

FORMAT = "polyopt-resume/1"
MODEL = "mlp"
LEARNING_RATE = 1e-3
CHECKPOINT = "checkpoint.npz"
FINAL = "final.npz"
FRAMEWORKS = ("torch", "jax", "keras")
_HEADER = "header"
_OPTIMIZER = "optimizer"
_WEIGHT = "weights/"
ROOT = Path(__file__).resolve().parents[1]


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not belong to this run."""


@dataclasses.dataclass(frozen=True)
class Config:
    framework: str
    steps: int = 70
    every: int = 5
    seed: int = 0
    batch: int = 32
    train_size: int = 2048

    def check(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {self.framework!r}")
        for name in ("steps", "every", "batch", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.batch > self.train_size:
            raise ValueError(f"batch must be <= train_size, got batch={self.batch}, "
                             f"train_size={self.train_size}")

    def run_fields(self) -> dict:
        """What a checkpoint must agree on to be resumed (not ``steps``: a run may be extended)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "steps"}


# --------------------------------------------------------------------------
# data: the batch of step s from s and the seed only


def load_images(config: Config) -> tuple[np.ndarray, np.ndarray]:
    from examples import data

    mnist = data.load_mnist()
    if len(mnist.train_images) < config.train_size:
        raise ValueError(f"train_size must be <= {len(mnist.train_images)} (the shipped MNIST "
                         f"subset), got {config.train_size}")
    images = mnist.train_images[:config.train_size].astype(np.float32) / np.float32(255)
    return images, mnist.train_labels[:config.train_size]


def batch_indices(config: Config, step: int) -> np.ndarray:
    per_epoch = config.train_size // config.batch
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(config.train_size)
    return order[position * config.batch:(position + 1) * config.batch]


# --------------------------------------------------------------------------
# checkpoint files (numpy only: the campaign reads them too)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_checkpoint(config: Config, step: int, weights: dict[str, np.ndarray],
                      optimizer: bytes) -> bytes:
    header = {"format": FORMAT, "step": step, **config.run_fields()}
    arrays = {_HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8),
              _OPTIMIZER: np.frombuffer(optimizer, np.uint8),
              **{_WEIGHT + name: value for name, value in weights.items()}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class Checkpoint(NamedTuple):
    step: int
    weights: dict[str, np.ndarray]
    optimizer: bytes  # a polyopt state file (the adapter's export_state)
    sha256: str  # of the whole file


def read_checkpoint(path: Path, config: Config) -> Checkpoint:
    """The checkpoint at ``path``, checked against ``config`` and the model.

    Raises:
      CheckpointError: naming ``path``: empty, truncated or not an npz archive,
        no header (a foreign file), another format, another run's
        configuration, weights missing or of other shapes or dtypes.
    """
    from examples.models import init

    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not an npz "
                              f"archive: {error})") from error
    if _HEADER not in arrays or _OPTIMIZER not in arrays:
        raise CheckpointError(f"{path}: no {_HEADER!r} and {_OPTIMIZER!r} entries: not a "
                              f"checkpoint of examples.resume (entries {sorted(arrays)[:5]})")
    try:
        header = json.loads(arrays[_HEADER].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt header ({error})") from error
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    differ = {k: (header.get(k), v) for k, v in config.run_fields().items() if header.get(k) != v}
    if differ:
        raise CheckpointError(f"{path}: written by another run: (checkpoint, this run) "
                              f"{differ}")
    step = header.get("step")
    if not isinstance(step, int) or not 0 <= step <= config.steps:
        raise CheckpointError(f"{path}: step {step!r} outside [0, {config.steps}]")
    weights = {k[len(_WEIGHT):]: v for k, v in arrays.items() if k.startswith(_WEIGHT)}
    want = {p.name: (tuple(p.shape), np.dtype(np.float32)) for p in init.layout(MODEL)}
    have = {k: (v.shape, v.dtype) for k, v in weights.items()}
    if have != want:
        raise CheckpointError(f"{path}: weights {have} do not fit the {MODEL} model {want}")
    return Checkpoint(step, weights, arrays[_OPTIMIZER].tobytes(), sha256(data))


# --------------------------------------------------------------------------
# one small trainer per framework: step, weights, optimizer state as bytes


class TorchTrainer:
    def __init__(self, config: Config) -> None:
        import torch

        import polyopt.torch as pt
        from examples.models import torch_models as tm

        torch.set_num_threads(1)
        self.torch, self.tm = torch, tm
        self.model = tm.build(MODEL, config.seed, "float32")
        self.optimizer = pt.Adam(tm.parameters(self.model, MODEL), lr=LEARNING_RATE)

    def step(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.optimizer.zero_grad()
        loss = self.tm.loss_fn(self.model(self.tm.to_input(images)), self.torch.from_numpy(labels))
        loss.backward()
        self.optimizer.step()

    def weights(self) -> dict[str, np.ndarray]:
        return self.tm.to_neutral(self.model, MODEL)

    def optimizer_state(self) -> bytes:
        buffer = io.BytesIO()
        self.optimizer.export_state(buffer, names=self.model)
        return buffer.getvalue()

    def restore(self, weights: dict[str, np.ndarray], optimizer: bytes) -> None:
        self.optimizer.import_state(io.BytesIO(optimizer), names=self.model)
        self.tm.load_neutral(self.model, MODEL, weights)


class JaxTrainer:
    def __init__(self, config: Config) -> None:
        import jax
        import optax

        import polyopt.optax as po
        from examples.models import jax_models as jm
        from polyopt.optax import interop

        self.jax, self.interop = jax, interop
        self.params, state = jm.build(MODEL, config.seed, "float32")
        self.optimizer = po.adam(LEARNING_RATE)
        self.opt_state = self.optimizer.init(self.params)
        self.names = [n.replace("/", ".") for n in interop.param_names(self.params)]

        def loss_of(params, x, y):
            logits, _ = jm.apply(MODEL, params, state, x, train=True)
            return jm.loss_fn(logits, y)

        def step(params, opt_state, x, y):
            grads = jax.grad(loss_of)(params, x, y)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._step = jax.jit(step)

    def step(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.params, self.opt_state = self._step(self.params, self.opt_state, images, labels)

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.params.items()}

    def optimizer_state(self) -> bytes:
        buffer = io.BytesIO()
        self.interop.export_state(buffer, self.optimizer, self.opt_state, self.params, self.names)
        return buffer.getvalue()

    def restore(self, weights: dict[str, np.ndarray], optimizer: bytes) -> None:
        params = {k: self.jax.numpy.asarray(weights[k]) for k in self.params}
        self.opt_state = self.interop.import_state(io.BytesIO(optimizer), self.optimizer,
                                                   params, self.names)
        self.params = params


class KerasTrainer:
    def __init__(self, config: Config) -> None:
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        import polyopt.keras as pk
        from examples.models import keras_models as km

        self.km = km
        self.model = km.build(MODEL, config.seed, "float32")
        self.optimizer = pk.Adam(learning_rate=LEARNING_RATE)
        self.model.compile(optimizer=self.optimizer, loss=km.loss_fn("float32"))

    def step(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.model.train_on_batch(images, labels)

    def weights(self) -> dict[str, np.ndarray]:
        return self.km.to_neutral(self.model, MODEL)

    def optimizer_state(self) -> bytes:
        buffer = io.BytesIO()
        self.optimizer.export_state(buffer, self.model)
        return buffer.getvalue()

    def restore(self, weights: dict[str, np.ndarray], optimizer: bytes) -> None:
        self.optimizer.import_state(io.BytesIO(optimizer), self.model)
        self.km.load_neutral(self.model, MODEL, weights)


TRAINERS = {"torch": TorchTrainer, "jax": JaxTrainer, "keras": KerasTrainer}


# --------------------------------------------------------------------------
# train


def _say(line: str) -> None:
    print(line, flush=True)


def write_checkpoint(path: Path, data: bytes, slow_write: float, direct: bool = False) -> None:
    """``data`` to ``path`` atomically; ``slow_write`` > 0 spreads the bytes over that
    many seconds (16 pieces), so that a kill can land in the middle of the write.

    ``direct``: the control experiment, written straight onto ``path`` as
    ``np.savez(path, ...)`` does (what polyopt did before polyopt.files)."""
    pieces = 16 if slow_write > 0 else 1
    size = -(-len(data) // pieces)
    with open(path, "wb") if direct else files.atomic_write(path) as out:
        for i in range(pieces):
            out.write(data[i * size:(i + 1) * size])
            if slow_write > 0:
                out.flush()
                time.sleep(slow_write / pieces)


def stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files a killed writer left beside the checkpoint (see polyopt.files)."""
    return sorted(directory.glob(f".{CHECKPOINT}.*.tmp"))


def train(config: Config, directory: Path, slow_write: float = 0.0,
          direct_write: bool = False) -> Path:
    """Train (resuming from ``directory``'s checkpoint if there is one); the final weights' path."""
    config.check()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(directory):  # this run is the checkpoint's only writer
        stale.unlink()
    path = directory / CHECKPOINT
    saved = read_checkpoint(path, config) if path.exists() else None  # before any import
    images, labels = load_images(config)
    trainer = TRAINERS[config.framework](config)
    start = 0
    if saved is not None:
        trainer.restore(saved.weights, saved.optimizer)
        start = saved.step
        _say(f"resumed {start} {saved.sha256}")
    else:
        _say("fresh")
    for step in range(start, config.steps):
        chosen = batch_indices(config, step)
        trainer.step(images[chosen], labels[chosen])
        done = step + 1
        _say(f"step {done}")
        if done % config.every == 0 and done < config.steps:
            data = encode_checkpoint(config, done, trainer.weights(), trainer.optimizer_state())
            _say(f"writing {done}")
            write_checkpoint(path, data, slow_write, direct_write)
            _say(f"saved {done} {len(data)} {sha256(data)}")
    final = directory / FINAL
    files.write_to(final, np.savez, **trainer.weights())
    _say(f"done {sha256(final.read_bytes())}")
    return final


# --------------------------------------------------------------------------
# campaign: kill -9 at seeded random moments, check, finish, compare


KINDS = ("between-steps", "mid-write", "start-up")


@dataclasses.dataclass
class Report:
    framework: str
    kills: int = 0
    by_kind: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    temporary_seen_at_kill: int = 0  # mid-write kills that found the temporary file
    over_a_checkpoint: int = 0  # mid-write kills while an older checkpoint was there
    resumes: int = 0
    steps_redone: int = 0
    bytes_lost: int = 0
    lost: list = dataclasses.field(default_factory=list)  # sha256 of the lost checkpoints
    unannounced_saves: int = 0  # a rename done, its "saved" line cut off by the kill
    processes: int = 0
    final_bitwise_equal: bool = False
    reference_seconds: float = 0.0
    campaign_seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.final_bitwise_equal and self.bytes_lost == 0 and not self.failures

    def text(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.by_kind.items())
        return (f"{self.framework}: {self.kills} kills ({kinds}; temporary file present at "
                f"{self.temporary_seen_at_kill} mid-write kills, {self.over_a_checkpoint} of them "
                f"over an older checkpoint), {self.resumes} resumes, "
                f"{self.steps_redone} steps redone, {self.bytes_lost} bytes lost, "
                f"{self.unannounced_saves} saves completed but unannounced, "
                f"{self.processes} processes; final weights bitwise equal to the "
                f"uninterrupted run: {self.final_bitwise_equal}; uninterrupted "
                f"{self.reference_seconds:.1f} s, with kills {self.campaign_seconds:.1f} s"
                + "".join(f"\n  FAILED: {f}" for f in self.failures))


def worker_environment(extra: dict | None = None) -> dict:
    """One thread per worker (deterministic and light on shared machines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return {**env, **(extra or {})}


class _Worker:
    def __init__(self, config: Config, directory: Path, slow_write: float, env: dict,
                 log: Path, direct_write: bool = False) -> None:
        args = [sys.executable, "-m", "examples.resume", "train", "--framework",
                config.framework, "--dir", str(directory), "--steps", str(config.steps),
                "--every", str(config.every), "--seed", str(config.seed), "--batch",
                str(config.batch), "--train-size", str(config.train_size),
                "--slow-write", str(slow_write)] + ["--direct-write"] * direct_write
        self.slow_write, self.log = slow_write, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as err:  # a file, not a pipe: a chatty worker never blocks
            self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=err, text=True)
        self.lines: list[str] = []

    def next_line(self) -> str | None:
        line = self.process.stdout.readline()
        if not line:
            return None
        self.lines.append(line.strip())
        return self.lines[-1]

    def kill(self) -> None:
        """SIGKILL, then collect the lines it printed before dying."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.finish(60)

    def finish(self, timeout: float) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.lines += [line.strip() for line in out.splitlines()]
        return self.process.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _final_weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


Saved = tuple[int, int, str]  # (step, bytes, sha256) of a checkpoint


def campaign(config: Config, directory: Path, *, kills: int = 20, seed: int = 0,
             slow_write: float = 0.4, timeout: float = 600.0,
             direct_write: bool = False) -> Report:
    """Uninterrupted run, then one under ``kills`` SIGKILLs; the :class:`Report`.

    ``direct_write``: the control experiment, the killed run writes its
    checkpoints straight onto the file (as ``np.savez(path)`` does): mid-write
    kills then destroy the last good checkpoint, and the report says so."""
    config.check()
    env = worker_environment()
    report = Report(config.framework)
    rng = np.random.default_rng(seed)
    logs = directory / "logs"

    began = time.monotonic()
    reference = _Worker(config, directory / "reference", 0.0, env, logs / "reference.txt")
    if reference.finish(timeout) != 0:
        raise RuntimeError(f"the uninterrupted {config.framework} run failed:\n"
                           f"{reference.stderr()}")
    report.reference_seconds = time.monotonic() - began
    expected = _final_weights(directory / "reference" / FINAL)

    began = time.monotonic()
    run_dir = directory / "killed"
    announced: Saved | None = None  # the last checkpoint known to be complete
    start_up = max(0.5, report.reference_seconds / 3)  # kills before the first step
    for index in range(kills + 1):
        worker = _Worker(config, run_dir, slow_write, env, logs / f"process-{index}.txt",
                         direct_write)
        report.processes += 1
        if index == kills:  # the last process runs to the end
            if worker.finish(timeout) != 0:
                report.failures.append(f"the last process failed: {worker.stderr()}")
            _check_resume(report, worker.lines, announced)
            break
        kind = KINDS[index % len(KINDS)]
        report.temporary_seen_at_kill += _run_until_kill(worker, kind, rng, config, start_up,
                                                         run_dir, report)
        report.kills += 1
        report.by_kind[kind] += 1
        report.over_a_checkpoint += kind == "mid-write" and announced is not None
        _check_resume(report, worker.lines, announced)
        announced = _check_after_kill(report, run_dir, config, worker.lines, announced)
        steps = [int(line.split()[1]) for line in worker.lines if line.startswith("step ")]
        if steps:
            report.steps_redone += max(steps) - (announced[0] if announced else 0)
    report.campaign_seconds = time.monotonic() - began
    final = run_dir / FINAL
    report.final_bitwise_equal = final.exists() and _bitwise_equal(_final_weights(final),
                                                                   expected)
    return report


def _run_until_kill(worker: _Worker, kind: str, rng: np.random.Generator, config: Config,
                    start_up: float, run_dir: Path, report: Report) -> bool:
    """Read the worker's lines and kill it at the moment ``kind`` calls for;
    whether the checkpoint's temporary file was there at the kill."""
    if kind == "start-up":
        time.sleep(rng.uniform(0.0, start_up))
        worker.kill()
        return False
    # steps before a between-steps kill: at least one checkpoint interval, so that
    # every life makes progress, and up to two (a kill in or after the next write)
    budget = int(rng.integers(config.every, 2 * config.every + 1))
    while True:
        line = worker.next_line()
        if line is None:  # finished (or died) before the planned moment
            worker.finish(60)
            report.failures.append(f"a {kind} kill found the process gone: "
                                   f"{worker.lines[-3:]} {worker.stderr()}")
            return False
        if kind == "between-steps" and line.startswith("step "):
            budget -= 1
            if budget == 0:
                time.sleep(rng.uniform(0.0, 0.02))
                worker.kill()
                return False
        if kind == "mid-write" and line.startswith("writing "):
            time.sleep(rng.uniform(0.05, 0.85) * worker.slow_write)
            temporary = bool(stale_temporaries(run_dir))
            worker.kill()
            return temporary


def _check_resume(report: Report, lines: list[str], announced: Saved | None) -> None:
    """The process started from the last complete checkpoint (if it got that far)."""
    if not lines:
        return
    if announced is None:
        if lines[0] != "fresh":
            report.failures.append(f"expected a fresh start, got {lines[0]!r}")
        return
    report.resumes += lines[0].startswith("resumed ")
    if lines[0] != f"resumed {announced[0]} {announced[2]}":
        report.failures.append(f"expected to resume from step {announced[0]} "
                               f"({announced[2][:12]}), got {lines[0]!r}")


def _check_after_kill(report: Report, run_dir: Path, config: Config, lines: list[str],
                      announced: Saved | None) -> Saved | None:
    """The checkpoint on disk after a kill: the last one announced, or a complete
    newer one whose "saved" line the kill cut off. Anything else loses bytes."""
    for line in lines:
        if line.startswith("saved "):
            step, size, digest = line.split()[1:]
            announced = (int(step), int(size), digest)
    path = run_dir / CHECKPOINT
    data = path.read_bytes() if path.exists() else None
    if data is not None and announced is not None and sha256(data) == announced[2]:
        return announced
    writing = {int(line.split()[1]) for line in lines if line.startswith("writing ")}
    if data is not None:
        try:
            step = read_checkpoint(path, config).step
        except CheckpointError as error:
            step = None
            report.failures.append(str(error))
        if step is not None and step in writing and (announced is None or step > announced[0]):
            report.unannounced_saves += 1
            return step, len(data), sha256(data)
    if announced is not None:
        if announced[2] not in report.lost:  # each lost checkpoint counts once
            report.lost.append(announced[2])
            report.bytes_lost += announced[1]
        report.failures.append(f"after a kill the checkpoint of step {announced[0]} is "
                               f"{'missing' if data is None else 'not intact'}")
    elif data is not None:
        report.failures.append("a checkpoint appeared that no process wrote")
    return announced


# --------------------------------------------------------------------------
# python -m examples.resume


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Config("torch")
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS,
                        help="keras runs on $KERAS_BACKEND")
    parser.add_argument("--dir", type=Path, required=True, help="where the files go")
    for name in ("steps", "every", "seed", "batch", "train_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int,
                            default=getattr(defaults, name))
    parser.add_argument("--slow-write", type=float, default=None,
                        help="seconds over which each checkpoint write is spread")
    parser.add_argument("--direct-write", action="store_true",
                        help="control experiment: write checkpoints straight onto the file, "
                             "not atomically")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.resume", description=__doc__
                                     .split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _config_arguments(commands.add_parser("train", help="train, resuming from --dir"))
    runner = commands.add_parser("campaign", help="kill -9 train at random, check, compare")
    _config_arguments(runner)
    runner.add_argument("--kills", type=int, default=20)
    runner.add_argument("--kill-seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = Config(args.framework, args.steps, args.every, args.seed, args.batch,
                    args.train_size)
    try:
        config.check()
    except ValueError as error:
        parser.error(str(error))
    if args.command == "train":
        try:
            train(config, args.dir, args.slow_write or 0.0, args.direct_write)
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    slow_write = 0.4 if args.slow_write is None else args.slow_write
    report = campaign(config, args.dir, kills=args.kills, seed=args.kill_seed,
                      slow_write=slow_write, direct_write=args.direct_write)
    print(report.text())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
