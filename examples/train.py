"""Train one experiment in one framework and write its run record.

    python -m examples.train --framework torch --experiment mnist-adam --epochs 3
    python -m examples.train --framework jax --experiment cifar-ranger --steps 100 --dtype float64
    python -m polyopt.consistency runs          # compare the records

Every framework trains the same model (examples/models) from the same numpy
initial weights, on the same batches in the same order (a numpy permutation
per epoch from ``--seed``; the last batch of an epoch may be smaller), with
the same learning rate at every step (examples/experiments.py: schedules,
ReduceLROnPlateau and EarlyStopping on the test loss, decided on the host).
Images are scaled to [0, 1] in numpy, in the run's dtype, before any
framework sees them. The optimizer comes from examples.optimizers.make_optimizer.

A run writes ``RUNS_DIR/<experiment>-<dtype>-<framework>.json`` (a
polyopt.consistency.RunRecord) and the final weights beside it (``.npz``,
neutral layout). One framework per process (torch and tensorflow must never
share one).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import polyopt
from examples import data, experiments, native_logs
from examples.models import init
from examples.optimizers import FRAMEWORKS, make_optimizer, sam_perturb
from polyopt import files
from polyopt.consistency import RunRecord, weights_checksum, weights_norms

EVAL_BATCH = 1000


# --------------------------------------------------------------------------
# one small backend per framework: train_step, evaluate, weights


class TorchBackend:
    def __init__(self, experiment: experiments.Experiment, dtype: str, seed: int) -> None:
        import torch

        from examples.models import torch_models as tm

        self.torch, self.tm, self.name = torch, tm, experiment.model
        self.model = tm.build(experiment.model, seed, dtype)
        self.optimizer = make_optimizer("torch", experiment, tm.parameters(self.model, self.name))
        self.sam = experiment.optimizer.startswith("sam-")
        self.versions = {"torch": torch.__version__}

    def _forward_backward(self, x, y):
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = self.tm.loss_fn(logits, y)
        loss.backward()
        return logits, loss

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, int]:
        x, y = self.tm.to_input(images), self.torch.from_numpy(labels)
        self.model.train()
        self.optimizer.param_groups[0]["lr"] = lr
        logits, loss = self._forward_backward(x, y)
        if self.sam:
            self.optimizer.first_step()
            bns = [m for m in self.model.modules() if isinstance(m, self.tm.BatchNorm2d)]
            for bn in bns:  # the second pass must not move the running statistics
                bn.momentum = 0.0
            self._forward_backward(x, y)
            for bn in bns:
                bn.momentum = 1 - init.BN_MOMENTUM
            self.optimizer.second_step()
        else:
            self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        self.model.eval()
        with self.torch.no_grad():
            logits = self.model(self.tm.to_input(images))
            y = self.torch.from_numpy(labels)
            loss = self.torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return float(loss), int((logits.argmax(1) == y).sum())

    def weights(self) -> dict[str, np.ndarray]:
        return {**self.tm.to_neutral(self.model, self.name),
                **self.tm.to_neutral(self.model, self.name, state=True)}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        params = {p.name: weights[p.name] for p in init.layout(self.name)}
        state = {p.name: weights[p.name] for p in init.state_layout(self.name)}
        self.tm.load_neutral(self.model, self.name, params, state or None)


class JaxBackend:
    def __init__(self, experiment: experiments.Experiment, dtype: str, seed: int) -> None:
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        from examples.models import jax_models as jm

        self.jax, self.jnp, self.name = jax, jnp, experiment.model
        params, self.state = jm.build(experiment.model, seed, dtype)
        self.names = list(params)
        self.optimizer = make_optimizer("jax", experiment)
        self.train_params, self.opt_state = self.optimizer.init(list(params.values()))
        self.params = self.optimizer.weights(self.train_params)
        self.versions = {"jax": jax.__version__}
        names, name = self.names, experiment.model

        def loss_of(plist, state, x, y):
            logits, new_state = jm.apply(name, dict(zip(names, plist)), state, x, train=True)
            correct = jnp.sum(jnp.argmax(logits, axis=1) == y)
            return jm.loss_fn(logits, y), (correct, new_state)

        self._step = self.optimizer.make_step(loss_of)

        def evaluate(plist, state, x, y):
            logits, _ = jm.apply(name, dict(zip(names, plist)), state, x, train=False)
            log_probs = jax.nn.log_softmax(logits)
            loss = -jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=1))
            return loss, jnp.sum(jnp.argmax(logits, axis=1) == y)

        self._evaluate = jax.jit(evaluate)
        self.dtype = np.dtype(dtype)

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, int]:
        lr_array = self.jnp.asarray(lr, dtype=self.dtype)
        self.train_params, self.opt_state, (loss, (correct, self.state)) = self._step(
            self.train_params, self.opt_state, lr_array, self.state, images, labels)
        self.params = self.optimizer.weights(self.train_params)
        return float(loss), int(correct)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        loss, correct = self._evaluate(self.params, self.state, images, labels)
        return float(loss), int(correct)

    def weights(self) -> dict[str, np.ndarray]:
        out = {n: np.asarray(p) for n, p in zip(self.names, self.params)}
        return {**out, **{n: np.asarray(v) for n, v in self.state.items()}}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        # a fresh optimizer state: only called before training or at its end
        self.train_params, self.opt_state = self.optimizer.init(
            [self.jnp.asarray(weights[n]) for n in self.names])
        self.params = self.optimizer.weights(self.train_params)
        self.state = {n: self.jnp.asarray(weights[n]) for n in self.state}


class KerasBackend:
    """Keras 3 on TensorFlow: the model of keras_models, a tf.function train step with a
    GradientTape and ``optimizer.apply_gradients``; the learning rate is assigned to the
    optimizer's variable before every step (as a LearningRateScheduler would).

    SAM: the ascent point from the core's ``perturb`` (as ``polyopt.keras.SAMModel``),
    a second pass there whose BatchNormalization statistics are dropped (as in the
    torch and JAX loops), then ``apply_gradients`` at the original weights."""

    def __init__(self, experiment: experiments.Experiment, dtype: str, seed: int) -> None:
        import keras
        import tensorflow as tf

        from examples.models import keras_models as km

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"--framework tf needs KERAS_BACKEND=tensorflow, got "
                               f"{keras.backend.backend()!r}")
        # the optimizer's learning-rate variable has floatx's dtype
        keras.config.set_floatx(dtype)
        native_logs.quiet_retracing_warning(tf)
        self.tf, self.km, self.name = tf, km, experiment.model
        self.optimizer = make_optimizer("tf", experiment)
        self.model = km.build(experiment.model, seed, dtype)
        self.params = km.parameters(self.model, self.name)
        stats = [v for v in self.model.non_trainable_variables]
        perturb = sam_perturb(experiment) if experiment.optimizer.startswith("sam-") else None
        loss_fn = km.loss_fn(dtype)
        self.versions = {"tensorflow": tf.__version__, "keras": keras.__version__}

        def gradients(x, y):
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                loss = loss_fn(y, logits)
            return loss, logits, tape.gradient(loss, self.params)

        @tf.function
        def step(x, y):
            loss, logits, grads = gradients(x, y)
            if perturb is not None:
                origin = [tf.identity(p) for p in self.params]
                kept = [tf.identity(v) for v in stats]
                for p, q in zip(self.params, perturb(origin, grads)):
                    p.assign(q)
                _, _, grads = gradients(x, y)
                for p, q in zip(self.params, origin):
                    p.assign(q)
                for v, q in zip(stats, kept):
                    v.assign(q)
            self.optimizer.apply_gradients(zip(grads, self.params))
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, axis=1) == y, tf.int64))
            return loss, correct

        @tf.function
        def evaluate(x, y):
            logits = self.model(x, training=False)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            return loss, tf.reduce_sum(tf.cast(tf.argmax(logits, axis=1) == y, tf.int64))

        self._step, self._evaluate = step, evaluate

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, int]:
        self.optimizer.learning_rate.assign(lr)
        loss, correct = self._step(images, labels)
        return float(loss), int(correct)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        loss, correct = self._evaluate(images, labels)
        return float(loss), int(correct)

    def weights(self) -> dict[str, np.ndarray]:
        return {**self.km.to_neutral(self.model, self.name),
                **self.km.to_neutral(self.model, self.name, state=True)}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        params = {p.name: weights[p.name] for p in init.layout(self.name)}
        state = {p.name: weights[p.name] for p in init.state_layout(self.name)}
        self.km.load_neutral(self.model, self.name, params, state or None)


BACKENDS = {"torch": TorchBackend, "tf": KerasBackend, "jax": JaxBackend}


def make_backend(framework: str, experiment: experiments.Experiment, dtype: str, seed: int):
    if framework not in BACKENDS:
        raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")
    return BACKENDS[framework](experiment, dtype, seed)


# --------------------------------------------------------------------------
# the loop


class StepBar:
    """A tqdm progress bar over a run's steps (epoch and loss in its postfix); off when
    stderr is not a terminal. A ``StepBar(description)`` is an ``on_step`` callback."""

    def __init__(self, description: str, **options) -> None:
        from tqdm import tqdm

        options.setdefault("disable", None)  # None: on a terminal only
        self.bar = tqdm(desc=description, unit="step", leave=False, dynamic_ncols=True,
                        **options)

    def __call__(self, step: int, total: int, epoch: int, loss: float) -> None:
        self.bar.total = total
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def train(framework: str, experiment: experiments.Experiment, *, epochs: int | None = None,
          steps: int | None = None, dtype: str = "float32", seed: int = 0,
          data_dir: str | None = None, runs_dir: str | os.PathLike = "runs",
          test_size: int | None = None, quiet: bool = False, twin: bool = False,
          on_step: Callable[[int, int, float, float], None] | None = None,
          arithmetic: str = "default") -> RunRecord:
    """Train ``experiment`` in ``framework``; write and return its run record.

    ``on_step(step, total_steps, epoch, loss)`` is called after every optimizer
    step (steps and epochs count from 1); without it, and unless ``quiet``, a
    :class:`StepBar` shows progress. ``arithmetic`` names the float32 arithmetic
    profile the process runs under (examples.matrix.ARITHMETIC; recorded only).

    ``test_size`` evaluates on the first ``test_size`` test images only (quick runs).
    ``twin``: start from initial weights moved by one ulp (``np.nextafter`` towards
    +inf), to measure the framework's own float32 spread (polyopt.consistency's policy).
    """
    started = time.perf_counter()
    dataset = data.load(experiment.dataset, data_dir)
    if test_size is not None:
        dataset = dataset._replace(test_images=dataset.test_images[:test_size],
                                   test_labels=dataset.test_labels[:test_size])
    n = len(dataset.train_labels)
    steps_per_epoch = math.ceil(n / experiment.batch_size)
    if epochs is None:
        epochs = math.ceil(steps / steps_per_epoch) if steps else experiment.epochs
    total_steps = min(epochs * steps_per_epoch, steps or math.inf)
    bar = None
    if on_step is None and not quiet:
        on_step = bar = StepBar(f"{experiment.name} [{framework}, {dtype}]")
    backend = make_backend(framework, experiment, dtype, seed)
    if twin:
        backend.set_weights({name: np.nextafter(value, np.inf).astype(value.dtype)
                             for name, value in backend.weights().items()})
    learning_rate = experiments.LearningRate(experiment, total_steps)
    stopper = (experiments.EarlyStopping(**experiment.early_stopping)
               if experiment.early_stopping else None)
    best_weights = None
    rng = np.random.default_rng(seed)

    def scaled(images: np.ndarray) -> np.ndarray:
        return images.astype(dtype) / np.asarray(255, dtype)

    def evaluate() -> tuple[float, float]:
        """(mean test loss, test accuracy) of the model as it is."""
        total = hits = 0
        for start in range(0, len(dataset.test_labels), EVAL_BATCH):
            part = slice(start, start + EVAL_BATCH)
            batch_loss, batch_hits = backend.evaluate(scaled(dataset.test_images[part]),
                                                      dataset.test_labels[part])
            total += batch_loss
            hits += batch_hits
        return total / len(dataset.test_labels), hits / len(dataset.test_labels)

    step_loss, history, step = [], [], 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        seen = loss_sum = correct = 0
        lr = learning_rate.at(step, epoch)
        for start in range(0, n, experiment.batch_size):
            if step >= total_steps:
                break
            index = order[start:start + experiment.batch_size]
            lr = learning_rate.at(step, epoch)
            loss, hits = backend.train_step(scaled(dataset.train_images[index]),
                                            dataset.train_labels[index], lr)
            step_loss.append(loss)
            seen += len(index)
            loss_sum += loss * len(index)
            correct += hits
            step += 1
            if on_step is not None:
                on_step(step, total_steps, epoch + 1, loss)
        if not seen:
            break
        test_loss, test_accuracy = evaluate()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen,
                        "train_accuracy": correct / seen, "test_loss": test_loss,
                        "test_accuracy": test_accuracy, "learning_rate": lr})
        if not quiet:
            h = history[-1]
            print(f"epoch {epoch + 1}/{epochs}  loss {h['train_loss']:.4f}  "
                  f"acc {100 * h['train_accuracy']:.2f}%  test loss {h['test_loss']:.4f}  "
                  f"test acc {100 * h['test_accuracy']:.2f}%  lr {lr:.3g}  "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
        learning_rate.end_epoch(history[-1]["test_loss"])
        if stopper:
            improved, stop = stopper.end_epoch(epoch, history[-1]["test_loss"])
            if improved and stopper.restore_best:
                best_weights = backend.weights()
            if stop:
                if not quiet:
                    print(f"early stopping after epoch {epoch + 1} "
                          f"(best: epoch {stopper.best_epoch + 1})")
                break
        if step >= total_steps:
            break
    if bar is not None:
        bar.close()
    final = None
    if best_weights is not None and stopper.best_epoch + 1 != len(history):
        backend.set_weights(best_weights)
        test_loss, test_accuracy = evaluate()
        final = {"epoch": stopper.best_epoch + 1, "test_loss": test_loss,
                 "test_accuracy": test_accuracy}
        if not quiet:
            print(f"restored the weights of epoch {final['epoch']}: test loss "
                  f"{test_loss:.4f}, test accuracy {100 * test_accuracy:.2f}%")
    weights = backend.weights()

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{experiment.name}-{dtype}-{framework}" + ("-twin" if twin else "")
    files.write_to(runs_dir / f"{stem}.npz", np.savez, **weights)
    config = {**experiment.config(), "epochs": epochs, "steps": total_steps, "seed": seed,
              "dtype": dtype, "framework": framework, "test_size": len(dataset.test_labels),
              "arithmetic": arithmetic}
    if twin:
        config["perturbation"] = "initial weights + 1 ulp"

    versions = {**backend.versions, "polyopt": polyopt.__version__, "numpy": np.__version__,
                "python": platform.python_version()}
    record = RunRecord(experiment.name, framework, dtype, config, versions, step_loss, history,
                       time.perf_counter() - started, weights_checksum(weights),
                       weights_norms(weights), f"{stem}.npz", final)
    path = record.write(runs_dir / f"{stem}.json")
    if not quiet and history:
        print(f"{experiment.name} [{framework}, {dtype}]: {step} steps, {len(history)} epochs, "
              f"final test accuracy {100 * record.final_value('test_accuracy'):.2f}% "
              f"(test loss {record.final_value('test_loss'):.4f}), {record.wall_time:.1f} s "
              f"-> {path}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--experiment", required=True, choices=list(experiments.KNOWN))
    parser.add_argument("--epochs", type=int, help="default: the experiment's")
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help=f"data directory (default: ${data.DATA_ENV}, then "
                        "the subsets shipped in examples/data)")
    parser.add_argument("--runs-dir", default="runs", help="where run records go (runs)")
    parser.add_argument("--test-size", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--twin", action="store_true",
                        help="start from the initial weights + 1 ulp (measures the own spread)")
    args = parser.parse_args(argv)
    for name in ("epochs", "steps", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        train(args.framework, experiments.get(args.experiment), epochs=args.epochs,
              steps=args.steps, dtype=args.dtype, seed=args.seed, data_dir=args.data_dir,
              runs_dir=args.runs_dir, test_size=args.test_size, quiet=args.quiet,
              twin=args.twin)
    except (NotImplementedError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
