"""Time per optimizer step: polyopt.keras against keras.optimizers on TensorFlow (issue 8).

    KERAS_BACKEND=tensorflow python benchmarks/bench_keras.py [--rounds 5] [--steps 5]
        [--out benchmarks/results/keras.json]

For Adam, AdamW, SGD with momentum, RAdam and Ranger on the parameter sets of
benchmarks/common.py (float32, in Keras layouts: conv kernels (kh, kw, in,
out), dense kernels (in, out); fixed gradients: the update only), each
optimizer's step is ``opt.apply_gradients(zip(grads, variables))`` inside
``tf.function(jit_compile=True)`` (XLA) and inside a plain ``tf.function``;
the four variants (native and polyopt, each both ways) run interleaved in
one process, the first call (tracing and compilation) reported apart.
polyopt runs with the options that give the native's numbers
(``polyopt.native.PRESETS``). Keras has no RAdam and no Ranger: their
native is keras.optimizers.Adam (the same moments without the
rectification, Lookahead and gradient centralization); Ranger's row also
times polyopt.keras.RAdam with Ranger's defaults ("reference polyopt RAdam",
the issue's reference: RAdam of the same framework), both ways. The copy bandwidth is
a jit-compiled ``x.assign_add(1)`` on a variable of n floats in the same
process; ``vs bound`` is time / (minimum bytes per step / bandwidth). The
optimizer state's bytes (``optimizer.variables`` without the iteration
counter) are recorded too. Muon: keras.optimizers.Muon against
polyopt.keras.Muon with the preset ``keras.optimizers.Muon`` on the
transformer set (matrices by Muon, vectors by the Adam part; float32), one
step per round. Not a test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import polyopt.keras as pk  # noqa: E402
from polyopt import hyper, native, rules  # noqa: E402


def _preset(cls, name: str, **values):
    """A maker of polyopt.keras ``cls`` with the options of ``PRESETS[name]`` and ``values``
    (canonical names)."""
    _, options = native.PRESETS[name]
    values = {cls.spec[k].spelling("keras"): v for k, v in {**options, **values}.items()}
    return lambda: cls(**values)


#: algorithm -> (polyopt.keras maker, keras.optimizers maker, polyopt rule for the slot count)
ALGORITHMS = {
    "Adam": (_preset(pk.Adam, "keras.optimizers.Adam", learning_rate=1e-3),
             lambda: keras.optimizers.Adam(1e-3), lambda: rules.adam()),
    "AdamW": (_preset(pk.AdamW, "keras.optimizers.AdamW", learning_rate=1e-3, weight_decay=1e-4),
              lambda: keras.optimizers.AdamW(1e-3, weight_decay=1e-4), lambda: rules.adamw()),
    "SGD momentum": (_preset(pk.SGD, "keras.optimizers.SGD", learning_rate=1e-2, momentum=0.9),
                     lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
                     lambda: rules.sgd(momentum=0.9)),
    "RAdam": (lambda: pk.RAdam(1e-3), lambda: keras.optimizers.Adam(1e-3), lambda: rules.radam()),
    "Ranger": (lambda: pk.Ranger(1e-3), lambda: keras.optimizers.Adam(1e-3),
               lambda: rules.ranger()),
    # the transformer set: 2-D variables by Muon (Newton-Schulz in float32 in both), the
    # vectors by the Adam part
    "Muon": (_preset(pk.Muon, "keras.optimizers.Muon", learning_rate=1e-3),
             lambda: keras.optimizers.Muon(1e-3), lambda: rules.muon()),
}
#: algorithm -> (name, maker) of a polyopt reference timed in the same rounds where Keras
#: has no such optimizer: Ranger against its own inner RAdam (Ranger's defaults: b1 0.95,
#: eps 1e-5 on sqrt(v)), the same step without Lookahead and gradient centralization
REFERENCES = {
    "Ranger": ("polyopt RAdam", lambda: pk.RAdam(**{
        **{h.spelling("keras"): hyper.RANGER[h.name].default for h in hyper.RADAM},
        "learning_rate": 1e-3})),
}
MODES = {"jit_compile": True, "tf.function": False}


def keras_shape(shape: tuple) -> tuple:
    """torch layout -> Keras layout: (out, in, kh, kw) -> (kh, kw, in, out); (out, in) ->
    (in, out)."""
    if len(shape) == 4:
        return shape[2], shape[3], shape[1], shape[0]
    return tuple(reversed(shape))


def make_variables(shapes, seed=0) -> list:
    arrays = common.make_arrays([keras_shape(s) for s in shapes], seed)
    return [keras.Variable(a * 0.05, name=f"p{i:02d}") for i, a in enumerate(arrays)]


def state_bytes(opt) -> int:
    """Bytes of ``opt.variables`` other than the iteration counter."""
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in opt.variables
               if v is not opt.iterations)


def make_step(opt, variables: list, grads: list, jit_compile: bool):
    def step() -> None:
        opt.apply_gradients(zip(grads, variables))

    return tf.function(step, jit_compile=jit_compile)


def copy_bandwidth(n: int) -> float:
    x = tf.Variable(tf.zeros(n, tf.float32))
    add = tf.function(lambda: x.assign_add(tf.ones_like(x)), jit_compile=True)

    def copy(calls: int) -> None:
        for _ in range(calls):
            add()
        x[0].numpy()

    return common.bandwidth(copy, 2 * 4 * n)


def run(name: str, set_name: str, steps: int, rounds: int, *, bandwidth: float) -> common.Result:
    shapes = common.PARAM_SETS[set_name]
    ours, theirs, rule = ALGORITHMS[name]
    grads = [tf.constant(np.full(keras_shape(s), 1e-3, np.float32)) for s in shapes]
    native_label = "native" if name not in ("RAdam", "Ranger") else f"native Adam (no {name})"
    variants, opts = {}, {}
    makers = [("polyopt", ours), (native_label, theirs)]
    if name in REFERENCES:
        reference, make = REFERENCES[name]
        makers.append((f"{common.REFERENCE} {reference}", make))
    for label, make in makers:
        for mode, jit in MODES.items():
            opt, variables = make(), make_variables(shapes)
            opt.build(variables)
            step = make_step(opt, variables, grads, jit)

            def go(k: int, step=step, opt=opt) -> None:
                for _ in range(k):
                    step()
                opt.iterations.numpy()

            opts[f"{label} {mode}"] = opt
            variants[f"{label} {mode}"] = go
    return common.measure("keras", name, set_name, variants, lambda label: state_bytes(opts[label]),
                          slots=common.slot_count(rule()), bandwidth=bandwidth,
                          versions={"keras": keras.__version__, "tensorflow": tf.__version__},
                          steps=steps, rounds=rounds)


def main(argv=None) -> None:
    parser = common.parser(__doc__, ALGORITHMS, ROOT / "benchmarks" / "results" / "keras.json")
    parser.set_defaults(rounds=9)  # more rounds: steps of 2-10 ms move with load
    args = parser.parse_args(argv)
    header = (f"keras {keras.__version__} ({keras.backend.backend()}), tensorflow "
              f"{tf.__version__}, {common.machine()}")
    common.run_all(args, header, copy_bandwidth, lambda a, s, bw: run(
        a, s, *common.length(a, args), bandwidth=bw))


if __name__ == "__main__":
    main()
