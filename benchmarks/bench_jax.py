"""Time per optimizer step: polyopt.optax against optax, both jitted with donated buffers (issue 8).

    python benchmarks/bench_jax.py [--rounds 5] [--steps 5] [--out benchmarks/results/jax.json]

For Adam, AdamW, SGD with momentum, RAdam and Ranger on the parameter sets of
benchmarks/common.py (float32, fixed gradients: the update only), each
optimizer's step is ``jax.jit(update + optax.apply_updates,
donate_argnums=(params, state))``; the variants run interleaved in one
process (compilation is the first call, reported apart). optax has no
Ranger (optax.lookahead takes LookaheadParams and there is no gradient
centralization): Ranger's native is optax.radam, the same RAdam step
alone; its row also times polyopt.optax.radam with Ranger's defaults
("reference polyopt RAdam": eps on sqrt(v), where optax.radam adds it after
the bias correction). The copy bandwidth is a jitted, donated ``x + 1`` in the same process;
``vs bound`` is time / (minimum bytes per step / bandwidth). The optimizer
state's bytes (every array leaf) are recorded too. Muon: optax.contrib.muon
against polyopt.optax.muon with the preset ``optax.contrib.muon`` on the
transformer set (its 12 matrices by Muon, its 24 vectors by the Adam part;
Newton-Schulz in float32 in both), one step per round. XLA's CPU threads are
left at their default (set XLA_FLAGS to pin them). Not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import polyopt.optax as po  # noqa: E402
from polyopt import hyper, native, rules  # noqa: E402


def _preset(factory, spec, name: str, **values):
    """A maker of polyopt.optax ``factory`` with the options of ``PRESETS[name]`` and
    ``values`` (canonical names)."""
    _, options = native.PRESETS[name]
    return lambda: factory(**{spec[k].spelling("optax"): v
                              for k, v in {**options, **values}.items()})


#: algorithm -> (polyopt.optax transform, optax transform, polyopt rule for the slot count)
ALGORITHMS = {
    "Adam": (lambda: po.adam(1e-3), lambda: optax.adam(1e-3), lambda: rules.adam()),
    "AdamW": (lambda: po.adamw(1e-3, weight_decay=1e-4),
              lambda: optax.adamw(1e-3, weight_decay=1e-4), lambda: rules.adamw()),
    "SGD momentum": (lambda: po.sgd(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, momentum=0.9),
                     lambda: rules.sgd(momentum=0.9)),
    "RAdam": (lambda: po.radam(1e-3, eps_placement="outside"), lambda: optax.radam(1e-3),
              lambda: rules.radam()),
    "Ranger": (lambda: po.ranger(1e-3), lambda: optax.radam(1e-3), lambda: rules.ranger()),
    # the transformer set: 2-D leaves by Muon (Newton-Schulz in float32 in both), the
    # vectors by the Adam part
    "Muon": (_preset(po.muon, hyper.MUON, "optax.contrib.muon", learning_rate=1e-3),
             lambda: optax.contrib.muon(1e-3), lambda: rules.muon()),
}


#: algorithm -> (name, maker) of a polyopt reference timed in the same rounds: Ranger
#: against its own inner RAdam (Ranger's defaults: b1 0.95, eps 1e-5 on sqrt(v), where
#: optax.radam puts eps after the bias correction), the same step without Lookahead and
#: gradient centralization
REFERENCES = {
    "Ranger": ("polyopt RAdam", lambda: po.radam(**{
        **{h.spelling("optax"): hyper.RANGER[h.name].default for h in hyper.RADAM},
        "learning_rate": 1e-3})),
}


def make_params(shapes, seed=0) -> dict:
    arrays = common.make_arrays(shapes, seed)
    return {f"p{i:02d}": jnp.asarray(a * 0.05) for i, a in enumerate(arrays)}


def make_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def copy_bandwidth(n: int) -> float:
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    box = [jnp.zeros(n, jnp.float32)]

    def copy(calls: int) -> None:
        for _ in range(calls):
            box[0] = add(box[0])
        box[0].block_until_ready()

    return common.bandwidth(copy, 2 * 4 * n)


def run(name: str, set_name: str, steps: int, rounds: int, *, bandwidth: float) -> common.Result:
    shapes = common.PARAM_SETS[set_name]
    ours, theirs, rule = ALGORITHMS[name]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), make_params(shapes, 1))
    label_native = "native optax" if name != "Ranger" else "native optax.radam (no Ranger)"
    variants, boxes = {}, {}
    makers = [("polyopt", ours), (label_native, theirs)]
    if name in REFERENCES:
        reference, make = REFERENCES[name]
        makers.append((f"{common.REFERENCE} {reference}", make))
    for label, make in makers:
        opt = make()
        params = make_params(shapes)
        box = boxes[label] = [make_step(opt), params, opt.init(params)]

        def go(k: int, box=box) -> None:
            step, params, state = box
            for _ in range(k):
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            box[1], box[2] = params, state

        variants[label] = go
    return common.measure("jax", name, set_name, variants,
                          lambda label: state_bytes(boxes[label][2]),
                          slots=common.slot_count(rule()), bandwidth=bandwidth,
                          versions={"jax": jax.__version__, "optax": optax.__version__},
                          steps=steps, rounds=rounds)


def main(argv=None) -> None:
    parser = common.parser(__doc__, ALGORITHMS, ROOT / "benchmarks" / "results" / "jax.json")
    args = parser.parse_args(argv)
    header = (f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
              f"{common.machine()}")
    common.run_all(args, header, copy_bandwidth, lambda a, s, bw: run(
        a, s, *common.length(a, args), bandwidth=bw))


if __name__ == "__main__":
    main()
