"""Collectives in compiled XLA HLO text, with the bytes they move per device.

``collectives(jax.jit(f).lower(...).compile().as_text())`` lists every
all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute the
module runs per call, with its operands' bytes per device (an instruction in a
while loop counted its known trip count times); ``summary`` totals them. Used
inside the child processes of tests/test_jax_sharding.py (polyopt.optax on a
mesh) and tests/test_keras_distribute.py (polyopt.keras under
keras.distribution), which import it as ``tests._hlo``.
"""

from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
GATHERS = ("all-gather", "all-to-all", "collective-permute", "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def shape_info(text):
    """(bytes, [element count of each array]) of an HLO type."""
    arrays = re.findall(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]", text)
    counts = [int(np.prod([int(d) for d in dims.split(",") if d])) for _, dims in arrays]
    return sum(_BYTES[t] * n for (t, _), n in zip(arrays, counts)), counts


def split_type(rest):
    """(the HLO type an instruction's text starts with, the rest of the text)."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


#: the computations an instruction runs (a while's condition and a reduction's
#: to_apply hold no collective)
CALLED = re.compile(r"(body|calls|branch_computations|true_computation|false_computation)"
                    r"=\{?([^,}]+(?:, %[^,}]+)*)")


def collectives(text):
    """Every collective the compiled module runs per call: (opcode, operand bytes per
    device, operand element counts, times run); instructions in a while loop count
    its known trip count times."""
    comps, shapes, current, entry = {}, {}, None, None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            current = head[-1].lstrip("%")
            comps[current] = []
            if head[0] == "ENTRY":
                entry = current
            continue
        m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m or current is None:
            continue
        name, rest = m.groups()
        type_text, rest = split_type(rest)
        op = re.match(r"([\w\-]+)\((.*)", rest)
        if not op:
            continue
        shapes[name] = type_text
        comps[current].append((op.group(1), op.group(2)))
    found = []

    def walk(comp, times):
        for opcode, rest in comps.get(comp, []):
            base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if base in COLLECTIVES:
                args = rest.split(")")[0]
                operands = re.findall(r"%([\w.\-]+)", args)
                infos = [shape_info(shapes.get(o, "")) for o in operands]
                found.append((base, sum(b for b, _ in infos), sum((c for _, c in infos), []),
                              times))
            trip = 1
            if opcode == "while":
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trip = int(t.group(1)) if t else -1
            for attr, called in CALLED.findall(rest):
                for c in re.findall(r"%?([\w.\-]+)", called):
                    walk(c, times * (trip if attr == "body" else 1))

    walk(entry, 1)
    return found


def summary(found, param_elements):
    """Bytes per step of all collectives; the param-sized gathers (an operand with at
    least as many elements as the smallest matrix param's shard)."""
    gathers = [(op, counts, times) for op, _, counts, times in found
               if op in GATHERS and any(n >= param_elements for n in counts)]
    return {"bytes": sum(b * max(t, 1) for _, b, _, t in found),
            "unknown_trips": sum(t < 0 for *_, t in found),
            "ops": sorted({op for op, *_ in found}),
            "count": len(found),
            "param_gathers": len(gathers),
            "gathers": [f"{op}{counts}x{times}" for op, counts, times in gathers]}
