"""Epoch time of the CIFAR CNN: polyopt against the native optimizer (issue 8).

    python benchmarks/bench_epoch.py --framework torch|tf|jax [--rounds 20] [--batches 2]
        [--algorithms Adam Ranger] [--out benchmarks/results/epoch-<framework>.json]

Trains the matrix's CIFAR CNN (examples/models: conv 32, conv 64, dense 10;
42,442 params in 6 tensors, every framework from the same numpy init) on the
bundled small CIFAR-10 (examples/data: 10,000 training images; an epoch is
78 batches of 128, float32, one fixed order) with the native optimizer and
with the polyopt adapter, in one process per framework (torch and
tensorflow never share one):

- torch: ``torch.optim.Adam`` fused, foreach and for-loop (the CPU default)
  against ``polyopt.torch`` eager and ``compiled=True``; one intra-op thread
  (as bench_torch.py). A plain loop: zero_grad, forward, backward, step.
- tf (Keras 3 on TensorFlow): a GradientTape train step with
  ``apply_gradients``, ``keras.optimizers.Adam`` against
  ``polyopt.keras.Adam`` (keras's preset), under ``tf.function`` (what
  ``model.fit`` runs on a CPU-only machine: its ``jit_compile="auto"``
  turns XLA off there) and ``tf.function(jit_compile=True)`` (its default
  with a GPU).
- jax: one ``jax.jit`` train step (value_and_grad, update, apply_updates)
  with params and state donated, ``optax.adam`` against ``polyopt.optax.adam``.

Ranger (``--algorithms Ranger``, not in the default run): polyopt's Ranger
against the native RAdam (Keras has none: its Adam), i.e. what Lookahead and
gradient centralization add to an epoch.

Method (benchmarks/common.py): the first batch of each variant (compilation,
allocation) is timed apart; then the variants run interleaved, ``rounds``
blocks of ``batches`` consecutive batches each, every variant on the same
batches in the same order; the epoch time is the median time per batch x 78
(25th-75th percentile over blocks), and its ratio to the fastest native
variant is the median over rounds of the ratio of the two blocks of a round.

Profile: the optimizer's time per batch, measured inside the loop for torch
(``zero_grad()`` + ``step()``; the rest is forward and backward) and as the
update alone, compiled like the train step, on fixed gradients, for Keras
and JAX (the rest: the batch time minus that). Every variant runs the same
forward and backward pass, so (rest + optimizer) / (rest + the least native
optimizer time) is the epoch ratio the optimizer alone causes: on a loaded
machine a far steadier number than the measured ratio.

Not a test: nothing is asserted. Unknown arguments (``nox -s bench -- ...``
passes its arguments to every script) are ignored with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="polyopt-bench-"))

import common  # noqa: E402

from examples import data  # noqa: E402
from examples.models import init  # noqa: E402

MODEL, BATCH, SEED, LR = "cnn", 128, 0, 1e-3
ALGORITHMS = ("Adam", "Ranger")


def epoch_batches(data_dir: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The epoch: full batches of BATCH images (NHWC float32 in [0, 1]), one seeded order."""
    dataset = data.load("cifar10", data_dir)
    order = np.random.default_rng(SEED).permutation(len(dataset.train_labels))
    images = dataset.train_images.astype(np.float32) / np.float32(255)
    return [(images[order[i:i + BATCH]], dataset.train_labels[order[i:i + BATCH]])
            for i in range(0, len(order) - BATCH + 1, BATCH)]


class Cursor:
    """Hands out the epoch's batches in order, wrapping around: every variant
    calls it equally often, so all see the same batches at the same time."""

    def __init__(self, batches: list) -> None:
        self.batches, self.position = batches, 0

    def next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch


# --------------------------------------------------------------------------
# torch


def torch_variants(batches, algorithm: str) -> dict:
    import torch

    import polyopt.torch as pt
    from examples.models import torch_models as tm

    inputs = [(tm.to_input(x), torch.from_numpy(y)) for x, y in batches]
    if algorithm == "Adam":
        makers = {f"native {flavour}": (lambda ps, f=flags: torch.optim.Adam(ps, lr=LR, **f))
                  for flavour, flags in (("fused", {"fused": True}), ("foreach", {"foreach": True}),
                                         ("for-loop", {"foreach": False}))}
        makers["polyopt compiled"] = lambda ps: pt.preset("torch.optim.Adam", ps, lr=LR,
                                                          compiled=True)
        makers["polyopt eager"] = lambda ps: pt.preset("torch.optim.Adam", ps, lr=LR)
    else:  # Ranger: per-tensor gradient centralization, no flat compiled path; eager only
        makers = {"native RAdam foreach (no Ranger)":
                  lambda ps: torch.optim.RAdam(ps, lr=LR, foreach=True),
                  "polyopt Ranger eager": lambda ps: pt.Ranger(ps, lr=LR)}
    variants, spent = {}, {}
    for label, make in makers.items():
        model = tm.build(MODEL, SEED, "float32")
        opt = make(tm.parameters(model, MODEL))
        cursor, times = Cursor(inputs), spent.setdefault(label, {"optimizer": [], "rest": []})

        def run(k: int, model=model, opt=opt, cursor=cursor, times=times) -> None:
            model.train()
            clock = time.perf_counter
            for _ in range(k):
                x, y = cursor.next()
                t0 = clock()
                opt.zero_grad()
                t1 = clock()
                tm.loss_fn(model(x), y).backward()
                t2 = clock()
                opt.step()
                t3 = clock()
                times["optimizer"].append(t1 - t0 + t3 - t2)
                times["rest"].append(t2 - t1)

        variants[label] = run

    def profile(label: str) -> tuple[float, float]:
        """Median seconds per batch in zero_grad() + step(), and in forward + backward;
        the first (compiling) batch left out."""
        return tuple(float(np.median(spent[label][part][1:])) for part in ("optimizer", "rest"))

    return {"variants": variants, "profile": profile,
            "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()}}


# --------------------------------------------------------------------------
# Keras 3 on TensorFlow


def tf_variants(batches, algorithm: str) -> dict:
    import keras
    import tensorflow as tf

    import polyopt.keras as pk
    from examples.models import keras_models as km
    from polyopt import native

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("--framework tf needs KERAS_BACKEND=tensorflow")
    inputs = [(tf.constant(x), tf.constant(y)) for x, y in batches]
    if algorithm == "Adam":
        _, preset = native.PRESETS["keras.optimizers.Adam"]
        ours = {pk.Adam.spec[k].spelling("keras"): v for k, v in preset.items()}
        makers = {"native": lambda: keras.optimizers.Adam(LR),
                  "polyopt": lambda: pk.Adam(**{**ours, "learning_rate": LR})}
    else:
        # Keras has neither Ranger nor RAdam: the reference is its Adam
        makers = {"native Adam (no Ranger)": lambda: keras.optimizers.Adam(LR),
                  "polyopt Ranger": lambda: pk.Ranger(learning_rate=LR)}
    def train_step(opt, jit: bool):
        model = km.build(MODEL, SEED, "float32")
        params, loss_fn = km.parameters(model, MODEL), km.loss_fn("float32")
        opt.build(params)

        @tf.function(jit_compile=jit)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            opt.apply_gradients(zip(tape.gradient(loss, params), params))
            return loss

        return step

    def update_alone(opt, jit: bool):
        params = km.parameters(km.build(MODEL, SEED, "float32"), MODEL)
        grads = [tf.fill(p.shape, 1e-3) for p in params]
        opt.build(params)

        @tf.function(jit_compile=jit)
        def update():
            opt.apply_gradients(zip(grads, params))

        def run(k: int) -> None:
            for _ in range(k):
                update()
            params[0].numpy()

        return run

    variants, groups, alone = {}, {}, {}
    for jit in (False, True):
        mode = "jit_compile" if jit else "tf.function"
        for label, make in makers.items():
            step, cursor = train_step(make(), jit), Cursor(inputs)

            def run(k: int, step=step, cursor=cursor) -> None:
                for _ in range(k):
                    loss = step(*cursor.next())
                loss.numpy()

            variants[f"{label} {mode}"] = run
            alone[f"{label} {mode}"] = update_alone(make(), jit)
            groups.setdefault(mode, {})[f"{label} {mode}"] = label
    return {"variants": variants, "groups": groups, "alone": alone,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}}


# --------------------------------------------------------------------------
# JAX


def jax_variants(batches, algorithm: str) -> dict:
    import jax
    import optax

    import polyopt.optax as po
    from examples.models import jax_models as jm

    inputs = [(jax.device_put(x), jax.device_put(y)) for x, y in batches]
    if algorithm == "Adam":
        makers = {"native optax": lambda: optax.adam(LR), "polyopt": lambda: po.adam(LR)}
    else:
        makers = {"native optax.radam (no Ranger)": lambda: optax.radam(LR),
                  "polyopt ranger": lambda: po.ranger(LR)}
    variants, alone = {}, {}
    for label, make in makers.items():
        tx = make()
        params, state = jm.build(MODEL, SEED, "float32")

        def loss_of(params, state, x, y):
            logits, state = jm.apply(MODEL, params, state, x, train=True)
            return jm.loss_fn(logits, y), state

        def step(params, opt_state, state, x, y, tx=tx):
            (loss, state), grads = jax.value_and_grad(loss_of, has_aux=True)(params, state, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state, loss

        box = [jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), state]
        cursor = Cursor(inputs)

        def run(k: int, box=box, cursor=cursor) -> None:
            fn, params, opt_state, state = box
            for _ in range(k):
                params, opt_state, state, loss = fn(params, opt_state, state, *cursor.next())
            jax.block_until_ready((params, opt_state, loss))
            box[1:] = params, opt_state, state

        variants[label] = run

        def update(params, opt_state, grads, tx=tx):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params = jm.build(MODEL, SEED, "float32")[0]
        grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), params)
        only = [jax.jit(update, donate_argnums=(0, 1)), params, tx.init(params)]

        def run_alone(k: int, only=only, grads=grads) -> None:
            fn, params, opt_state = only
            for _ in range(k):
                params, opt_state = fn(params, opt_state, grads)
            jax.block_until_ready((params, opt_state))
            only[1:] = params, opt_state

        alone[label] = run_alone
    return {"variants": variants, "alone": alone, "versions": {"jax": jax.__version__,
                                               "optax": optax.__version__}}


FRAMEWORKS = {"torch": torch_variants, "tf": tf_variants, "jax": jax_variants}


# --------------------------------------------------------------------------


def run(framework: str, algorithm: str, batches, *, rounds: int,
        block: int) -> list[common.Result]:
    """One Result per group of variants (tf: one per compilation mode)."""
    setup = FRAMEWORKS[framework](batches, algorithm)
    groups = setup.get("groups", {"": {label: label for label in setup["variants"]}})
    per_epoch = len(batches)
    timings = common.interleaved(setup["variants"], steps=block, rounds=rounds, warmup=1)
    if "profile" in setup:  # measured in the loop: (optimizer s, rest s) per batch
        profile = {label: setup["profile"](label) for label in timings}
    else:  # the update alone, compiled like the train step, fixed gradients
        alone = common.interleaved(setup["alone"], steps=20, rounds=rounds, warmup=1)
        profile = {label: (alone[label].median, timings[label].median - alone[label].median)
                   for label in timings}
    n, count = common.sizes([p.shape for p in init.layout(MODEL)])
    results = []
    for group, labels in groups.items():
        natives = [label for label, name in labels.items() if name.startswith("native")]
        fastest = timings[min(natives, key=lambda label: timings[label].median)]
        # every variant runs the same forward and backward pass: the epoch time
        # each would take, from its optimizer time alone, against the native
        # optimizer that takes the least time
        rest = float(np.median([profile[label][1] for label in labels]))
        least = min(profile[label][0] for label in natives)
        summaries = []
        for label, name in labels.items():
            timing = timings[label]
            summary = {**timing.summary(), "name": name}
            for key in ("median_s", "p25_s", "p75_s"):
                summary[key] *= per_epoch  # seconds per batch -> per epoch
            # the blocks of one round ran back to back: their ratio is less
            # exposed to load drift than the ratio of medians
            summary["paired_vs_native"] = float(np.median(
                np.array(timing.per_step) / np.array(fastest.per_step)))
            summary["optimizer_ms_per_batch"] = 1e3 * profile[label][0]
            summary["rest_ms_per_batch"] = 1e3 * profile[label][1]
            summary["estimate_vs_native"] = (rest + profile[label][0]) / (rest + least)
            summaries.append(summary)
        data_name = f"cifar-cnn {per_epoch}x{BATCH}" + (f", {group}" if group else "")
        result = common.Result(framework, algorithm, data_name, n, count, 0, float("nan"),
                               summaries, setup["versions"], per="epoch")
        for row, s in zip(result.rows(), summaries):
            print(f"{framework:5s} {algorithm:6s} {group:12s} {row['variant']:32s} "
                  f"{row['ms'] / 1e3:6.2f} s/epoch ({row['spread_ms'][0] / 1e3:.2f}-"
                  f"{row['spread_ms'][1] / 1e3:.2f})  first batch {row['first_call_s']:5.2f} s  "
                  f"{row['vs_native']:5.3f}x native (paired {s['paired_vs_native']:5.3f}x)  "
                  f"optimizer {s['optimizer_ms_per_batch']:6.3f} ms, rest "
                  f"{s['rest_ms_per_batch']:6.1f} ms/batch: {s['estimate_vs_native']:5.3f}x",
                  flush=True)
        results.append(result)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, choices=list(FRAMEWORKS))
    parser.add_argument("--algorithms", nargs="+", default=["Adam"], choices=ALGORITHMS)
    parser.add_argument("--rounds", type=int, default=20, help="timed blocks per variant")
    parser.add_argument("--batches", type=int, default=2, help="batches per block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"bench_epoch.py: ignoring {' '.join(unknown)}")
    out = args.out or ROOT / "benchmarks" / "results" / f"epoch-{args.framework}.json"
    if args.framework == "torch":
        import torch

        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    batches = epoch_batches(args.data_dir)
    print(f"CIFAR CNN epoch: {len(batches)} batches of {BATCH}, {args.rounds} rounds of "
          f"{args.batches} batches per variant; {common.machine()}", flush=True)
    if out.exists():
        out.unlink()
    results = [r for a in args.algorithms
               for r in run(args.framework, a, batches, rounds=args.rounds, block=args.batches)]
    common.write(results, out)
    print(common.markdown(out))


if __name__ == "__main__":
    main()
