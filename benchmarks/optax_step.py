"""Time of one jitted, donated optimizer step: polyopt.optax.adam against optax.adam.

The model is ~2.5M float32 parameters in 60 leaves (30 dense layers of
288x288 plus biases). Each step is ``jax.jit(update + apply_updates,
donate_argnums=(params, state))`` on fixed gradients; the two optimizers run
interleaved in one process (warm-up, then ``--repeats`` rounds of
``--steps`` steps each); the best and the median round's time per step are
reported, with the ratios polyopt / optax (on a shared machine the best
round is the steadier number). Not a test: nothing is asserted.

    python benchmarks/optax_step.py [--steps 50] [--repeats 7] [--optimizers adam,sgd,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import polyopt.optax as po  # noqa: E402

LAYERS, WIDTH = 30, 288

PAIRS = {
    "adam": (lambda: po.adam(1e-3), lambda: optax.adam(1e-3)),
    "adamw": (lambda: po.adamw(1e-3, weight_decay=1e-4), lambda: optax.adamw(1e-3)),
    "sgd_momentum": (lambda: po.sgd(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, momentum=0.9)),
    "rmsprop": (lambda: po.rmsprop(1e-3), lambda: optax.rmsprop(1e-3)),
}


def make_params():
    rng = np.random.default_rng(0)
    return {f"layer{i:02d}": {"kernel": jnp.asarray(rng.normal(size=(WIDTH, WIDTH)), jnp.float32),
                              "bias": jnp.asarray(rng.normal(size=(WIDTH,)), jnp.float32)}
            for i in range(LAYERS)}


def make_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def timed(step, params, state, grads, steps):
    start = time.perf_counter()
    for _ in range(steps):
        params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    return (time.perf_counter() - start) / steps, params, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizers", default="adam", help=f"comma-separated: {list(PAIRS)}")
    args = parser.parse_args()

    base = make_params()
    n = sum(x.size for x in jax.tree.leaves(base))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), base)
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}; "
          f"{n / 1e6:.2f}M float32 params in {len(jax.tree.leaves(base))} leaves")
    for name in args.optimizers.split(","):
        runs = {}
        for label, make in zip(("polyopt", "optax"), PAIRS[name]):
            opt = make()
            params = jax.tree.map(jnp.copy, base)
            runs[label] = [make_step(opt), params, opt.init(params), []]
        for _ in range(2):  # compile and warm up
            for run in runs.values():
                _, run[1], run[2] = timed(run[0], run[1], run[2], grads, 5)
        for _ in range(args.repeats):  # interleaved
            for run in runs.values():
                t, run[1], run[2] = timed(run[0], run[1], run[2], grads, args.steps)
                run[3].append(t)
        for stat in (min, statistics.median):
            ours, theirs = stat(runs["polyopt"][3]), stat(runs["optax"][3])
            print(f"{name:14s} {stat.__name__:6s}  polyopt.optax {ours * 1e3:7.3f} ms/step   "
                  f"optax {theirs * 1e3:7.3f} ms/step   ratio {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
