"""The lab's toy-function trajectories through each adapter (float64).

    python -m examples.toys --framework torch     # or tf (KERAS_BACKEND=tensorflow), jax

Every optimizer of ``polyopt.lab`` runs on both 2-D functions (the
ill-conditioned quadratic and the local-minima function) from the lab's start
point and learning rate, as a polyopt.torch optimizer on a torch tensor, a
polyopt.keras optimizer on a Keras variable, or a polyopt.optax
transformation on a jax array; the gradient is the lab's (numpy, exact). The
trajectory must be the core's numpy trajectory (``polyopt.lab.run``): the
largest difference of any visited point, relative to the largest coordinate
of the core's trajectory, is printed (and returned by :func:`check`).
SAM: polyopt.torch.SAM's first_step/second_step, the core's ``perturb`` for
Keras (as polyopt.keras.SAMModel), polyopt.optax.sam's two update calls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import numpy as np

from examples.optimizers import FRAMEWORKS, _spelled
from polyopt import lab, rules

STEPS = lab.QUICK_STEPS
#: lab optimizer -> (wrapper, rule, options); the lab uses polyopt's defaults otherwise
OPTIMIZERS: dict[str, tuple[str, str, dict]] = {
    "sgd": ("", "sgd", {}),
    "momentum": ("", "sgd", {"momentum": 0.9}),
    "nesterov": ("", "sgd", {"momentum": 0.9, "nesterov": True}),
    "lookahead": ("lookahead", "sgd", {"momentum": 0.9}),
    "sam": ("sam", "sgd", {}),
    "adagrad": ("", "adagrad", {}),
    "rmsprop": ("", "rmsprop", {}),
    "adadelta": ("", "adadelta", {}),
    "adam": ("", "adam", {}),
    "adamw": ("", "adamw", {}),
    "amsgrad": ("", "adam", {"amsgrad": True}),
    "adamax": ("", "adamax", {}),
    "nadam": ("", "nadam", {}),
    "radam": ("", "radam", {}),
    "ranger": ("", "ranger", {}),
}
_KERAS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adadelta": "Adadelta",
          "adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "Nadam",
          "radam": "RAdam", "ranger": "Ranger"}


def _torch(wrapper: str, name: str, options: dict, grad: Callable, start, steps: int):
    import torch

    import polyopt.torch as pt
    from polyopt.torch.optimizers import OPTIMIZERS as CLASSES

    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    cls, spelled = CLASSES[name], _spelled(name, options, "torch")
    if wrapper == "sam":
        opt = pt.SAM([p], cls, **spelled)
    elif wrapper == "lookahead":
        opt = pt.Lookahead(cls([p], **spelled))
    else:
        opt = cls([p], **spelled)

    def set_grad():
        p.grad = torch.from_numpy(grad(p.detach().numpy().copy()))

    points = [p.detach().numpy().copy()]
    for _ in range(steps):
        set_grad()
        if wrapper == "sam":
            opt.first_step()
            set_grad()
            opt.second_step()
        else:
            opt.step()
        points.append(p.detach().numpy().copy())
    return points


def _keras(wrapper: str, name: str, options: dict, grad: Callable, start, steps: int):
    import keras

    import polyopt.keras as pk

    keras.config.set_floatx("float64")  # the learning-rate variable's dtype
    v = keras.Variable(np.array(start), dtype="float64")
    opt = getattr(pk, _KERAS[name])(**_spelled(name, options, "keras"))
    if wrapper == "lookahead":
        opt = pk.Lookahead(opt)
    perturb = rules.sam(rules.sgd()).perturb if wrapper == "sam" else None
    points = [np.asarray(v.numpy())]
    for _ in range(steps):
        g = grad(np.asarray(v.numpy()))
        if perturb is not None:
            g = grad(np.asarray(perturb([np.asarray(v.numpy())], [g])[0]))
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), v)])
        points.append(np.asarray(v.numpy()))
    return points


def _jax(wrapper: str, name: str, options: dict, grad: Callable, start, steps: int):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    import polyopt.optax as po

    tx = getattr(po, name)(**_spelled(name, options, "optax"))
    if wrapper == "lookahead":
        tx = po.lookahead(tx)
    elif wrapper == "sam":
        tx = po.sam(tx)
    update = jax.jit(tx.update)
    params = jnp.asarray(start, dtype=jnp.float64)
    if wrapper == "lookahead":
        params = optax.LookaheadParams.init_synced(params)
    state = tx.init(params)

    def fast(p):
        return np.asarray(p.fast if wrapper == "lookahead" else p)

    points = [fast(params)]
    for _ in range(steps):
        # SAM: two calls per step, the second with the gradient at the perturbed point
        for _ in range(2 if wrapper == "sam" else 1):
            updates, state = update(jnp.asarray(grad(fast(params))), state, params)
            params = optax.apply_updates(params, updates)
        points.append(fast(params))
    return points


RUNNERS = {"torch": _torch, "tf": _keras, "jax": _jax}


def check(framework: str, steps: int = STEPS,
          names: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
    """(optimizer, problem) -> max |adapter - core| / max |core| over the trajectory."""
    if framework not in RUNNERS:
        raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")
    out = {}
    for problem in lab.PROBLEMS.values():
        for name in names or OPTIMIZERS:
            wrapper, rule, options = OPTIMIZERS[name]
            lr = lab.LEARNING_RATES[problem.name][name]
            core = lab.run(name, problem, steps=steps)
            points = np.array(RUNNERS[framework](wrapper, rule, {**options, "learning_rate": lr},
                                                 problem.grad, problem.start, steps))
            if points.shape != core.points.shape:
                out[(name, problem.name)] = float("inf")
                continue
            out[(name, problem.name)] = float(np.max(np.abs(points - core.points))
                                              / np.max(np.abs(core.points)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.toys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    result = check(args.framework, args.steps)
    for (name, problem), diff in result.items():
        print(f"{args.framework:5s} {name:10s} {problem:12s} {diff:.1e}")
    worst = max(result.values())
    print(f"{args.framework}: largest relative difference from the core {worst:.1e}")
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
