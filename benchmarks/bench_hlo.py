"""The compiled XLA programs of one optimizer step compared: fusions, copies and bytes moved.

    python benchmarks/bench_hlo.py [--framework jax|keras] [--algorithms RAdam Ranger]
        [--sets resnet18] [--dump DIR]

For each algorithm of bench_jax.py (JAX: update + optax.apply_updates, jitted
with params and state donated) or bench_keras.py (Keras: ``apply_gradients``
under ``tf.function(jit_compile=True)`` on the tensorflow backend, or
``stateless_apply`` under ``jax.jit`` with donation on the jax backend), the
optimized HLO of the step, polyopt's and the reference's: the number of
fusions and of copies in the entry computation, and the bytes its fusions
and copies read and write (arrays of 4 KiB or more), in passes over the
params (one pass = the params' bytes). An Adam-like step that reads
p, g, m, v and writes p, m, v in three loops moves 10 passes. Where XLA
reports it (programs compiled by jax: JAX, and Keras on the jax backend),
also the temporary memory of one call, in params' sizes (jax's CPU client
allocates it at every call). Nothing is timed: the counts do not move with
the machine's load. Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

_ITEM = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
_ARRAY = re.compile(r"\b(f64|f32|s32|u32|bf16|f16|pred)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z-]+)\((.*)")


def _bytes(shape_text: str, smallest: int = 0) -> int:
    """Bytes of the arrays named in an HLO type (a tuple: each of its arrays of at least
    ``smallest`` bytes)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        size = _ITEM[dtype] * prod(int(d) for d in dims.split(",") if d)
        total += size if size >= smallest else 0
    return total


def entry_traffic(hlo: str, smallest: int = 4096) -> dict:
    """Fusions, copies and bytes read + written by the fusions and copies of the entry
    computation of an optimized HLO module."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    sizes: dict[str, int] = {}
    fusions = copies = moved = 0
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, op, rest = match.groups()
        sizes[name] = _bytes(type_text) if not type_text.startswith("(") else 0
        if op not in ("fusion", "copy"):
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        moved += sum(sizes.get(a, 0) for a in set(operands) if sizes.get(a, 0) >= smallest)
        moved += _bytes(type_text, smallest)
        fusions += op == "fusion"
        copies += op == "copy"
    return {"fusions": fusions, "copies": copies, "bytes": moved,
            "conditionals": entry.count(" conditional(")}


def jax_programs(algorithm: str, shapes: list) -> dict:
    """{variant: (optimized HLO, temporary bytes)} of bench_jax.py's step for
    ``algorithm``."""
    import bench_jax
    import jax

    ours, theirs, _ = bench_jax.ALGORITHMS[algorithm]
    out = {}
    for label, make in (("polyopt", ours), ("reference", theirs)):
        opt, params = make(), bench_jax.make_params(shapes)
        grads = jax.tree.map(lambda p: p * 0 + 1e-3, params)
        compiled = bench_jax.make_step(opt).lower(params, opt.init(params), grads).compile()
        out[label] = compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes
    return out


def keras_programs(algorithm: str, shapes: list) -> dict:
    """{variant: (optimized HLO, temporary bytes or None)} of bench_keras.py's step for
    ``algorithm``, on the backend of KERAS_BACKEND (tensorflow: jit_compile, whose
    temporary memory TensorFlow does not report; jax: jax.jit with donation)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras  # before bench_keras, which would set the tensorflow backend
    import numpy as np

    backend = keras.backend.backend()
    import bench_keras

    ours, theirs, _ = bench_keras.ALGORITHMS[algorithm]
    out = {}
    for label, make in (("polyopt", ours), ("reference", theirs)):
        opt, variables = make(), bench_keras.make_variables(shapes)
        opt.build(variables)
        grads = [np.full(tuple(v.shape), 1e-3, np.float32) for v in variables]
        if backend == "tensorflow":
            import tensorflow as tf

            grads = [tf.constant(g) for g in grads]
            step = bench_keras.make_step(opt, variables, grads, jit_compile=True)
            out[label] = step.experimental_get_compiler_ir()(stage="optimized_hlo"), None
        elif backend == "jax":
            import jax

            def step(trainable, optimizer_variables, grads, opt=opt):
                return opt.stateless_apply(optimizer_variables, grads, trainable)

            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
                [v.value for v in variables], [v.value for v in opt.variables],
                [jax.numpy.asarray(g) for g in grads]).compile()
            out[label] = compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes
        else:
            raise SystemExit(f"bench_hlo: KERAS_BACKEND={backend}: tensorflow or jax")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("jax", "keras"), default="jax")
    parser.add_argument("--algorithms", nargs="+", default=["RAdam", "Ranger"])
    parser.add_argument("--sets", nargs="+", default=["resnet18"], choices=list(common.PARAM_SETS))
    parser.add_argument("--dump", type=Path, help="write each program's HLO text here")
    args = parser.parse_args(argv)
    programs = jax_programs if args.framework == "jax" else keras_programs
    backend = ("" if args.framework == "jax"
               else f" ({os.environ.get('KERAS_BACKEND', 'tensorflow')})")
    print("| framework | algorithm | params | variant | fusions | copies | conditionals "
          "| passes over the params | temporaries, in params |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for set_name in args.sets:
        shapes = common.PARAM_SETS[set_name]
        n, _ = common.sizes(shapes)
        for algorithm in args.algorithms:
            for label, (hlo, temporary) in programs(algorithm, shapes).items():
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    name = f"{args.framework}-{algorithm}-{set_name}-{label}.hlo".replace(" ", "_")
                    (args.dump / name).write_text(hlo)
                t = entry_traffic(hlo)
                print(f"| {args.framework}{backend} | {algorithm} | {set_name} | {label} "
                      f"| {t['fusions']} | {t['copies']} | {t['conditionals']} "
                      f"| {t['bytes'] / (4 * n):.1f} "
                      f"| {'-' if temporary is None else f'{temporary / (4 * n):.2f}'} |",
                      flush=True)


if __name__ == "__main__":
    main()
