"""Optimizer state memory: bytes of state per rule, polyopt next to the natives.

    python benchmarks/bench_memory.py --framework torch --out benchmarks/results/memory-torch.json
    python benchmarks/bench_memory.py --markdown benchmarks/results/memory.md memory-*.json

One process per framework (torch, keras, optax; Keras on whatever
KERAS_BACKEND says). For a fixed parameter set (benchmarks/common.py, float32;
conv kernels and dense weights transposed to Keras's and Flax's layouts
there), each rule is measured:

- the core rule with polyopt's defaults (numpy, torch's shapes and the
  core's default layouts, output axis first): ``polyopt.rules._state.nbytes``
  of ``init``;
- the framework's polyopt optimizer, with the options of the native's preset
  (``polyopt.native.PRESETS``) when the framework has a native of that rule,
  else with polyopt's defaults;
- that native optimizer.

Bytes counted: torch, the distinct storages of ``optimizer.state`` after one
step (torch creates state lazily); Keras, every optimizer variable after
``build`` (iterations and the learning rate included); optax, every leaf of
``init``'s state. The rules come from the presets and the framework's
optimizer classes, so a new rule appears with its own row. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

from polyopt import native, rules  # noqa: E402
from polyopt.rules import _state  # noqa: E402

FRAMEWORKS = ("torch", "keras", "optax")
#: natives that refuse some params of the set: both cells of the row are
#: measured on the params they take (torch.optim.Muon: 2-D params only)
NATIVE_PARAMS = {"torch.optim.Muon": ("2-D params only", common.matrices)}
PREFIX = {"torch": "torch.optim.", "keras": "keras.optimizers.", "optax": "optax."}
OPTAX_LR = 1e-3


def _parse(key: str) -> tuple[str, dict]:
    """'torch.optim.Adam(amsgrad=True)' -> ('Adam', {'amsgrad': True})."""
    match = re.fullmatch(r"(?:\w+\.)+(\w+)(?:\((.*)\))?", key)
    return match[1], eval(f"dict({match[2] or ''})")  # noqa: S307 - our own table


def _native(key: str):
    """The callable a preset key names: 'optax.contrib.adopt' -> optax.contrib.adopt."""
    module, _, name = key.split("(")[0].rpartition(".")
    return getattr(importlib.import_module(module), name)


def natives_of(framework: str) -> dict:
    """rule -> the first plain preset key of this framework (no arguments)."""
    out: dict = {}
    for key, (rule, _) in native.PRESETS.items():
        if key.startswith(PREFIX[framework]) and "(" not in key:
            out.setdefault(rule, key)
    return out


def framework_shapes(shapes: list[tuple], framework: str) -> list[tuple]:
    """torch's (out, in) and (out, in, kh, kw) as Keras's and Flax's (in, out) and
    (kh, kw, in, out)."""
    if framework == "torch":
        return list(shapes)
    perms = {2: (1, 0), 4: (2, 3, 1, 0)}
    return [tuple(s[i] for i in perms[len(s)]) if len(s) in perms else s for s in shapes]


def core_bytes(rule_name: str, options: dict, shapes: list[tuple]) -> int:
    rule = getattr(rules, rule_name)(**options)
    return _state.nbytes(rule.init([np.zeros(s, np.float32) for s in shapes]))


# --------------------------------------------------------------------------
# one framework


def _torch(shapes: list[tuple]) -> dict:
    import torch
    from bench_torch import state_bytes

    import polyopt.torch as pt

    def measure(make, shapes=shapes) -> int:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = make(params)
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        return state_bytes(opt)

    rows = {}
    found = natives_of("torch")
    for rule_name in sorted(set(pt.OPTIMIZERS) | set(found)):
        key = found.get(rule_name)
        row = {"native": key}
        if key is not None:
            name, kwargs = _parse(key)
            which, some = NATIVE_PARAMS.get(key, (None, list))
            if which is not None:
                row["params"] = which
            row["native_bytes"] = measure(
                lambda ps, name=name, kwargs=kwargs: getattr(torch.optim, name)(ps, **kwargs),
                some(shapes))
            row["polyopt_bytes"] = measure(lambda ps, key=key: pt.preset(key, ps), some(shapes))
        else:
            row["polyopt_bytes"] = measure(pt.OPTIMIZERS[rule_name])
        rows[rule_name] = row
    return rows


def _keras(shapes: list[tuple]) -> dict:
    import keras

    import polyopt.keras as pk

    classes = {cls.spec.name: cls for cls in vars(pk).values()
               if isinstance(cls, type) and issubclass(cls, pk.RuleOptimizer)
               and "spec" in vars(cls) and cls.__name__ not in ("Lookahead", "SkipNonFinite")}

    def measure(opt) -> int:
        variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
        opt.build(variables)
        return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in opt.variables)

    rows = {}
    found = natives_of("keras")
    for rule_name in sorted(set(classes) | set(found)):
        key = found.get(rule_name)
        row = {"native": key}
        cls = classes.get(rule_name)
        if key is not None:
            name, kwargs = _parse(key)
            row["native_bytes"] = measure(getattr(keras.optimizers, name)(**kwargs))
        if cls is not None:
            options = native.PRESETS[key][1] if key is not None else {}
            row["polyopt_bytes"] = measure(cls(**{cls.spec[k].spelling("keras"): v
                                                  for k, v in options.items()}))
        rows[rule_name] = row
    return rows


def _optax(shapes: list[tuple]) -> dict:
    import jax
    import jax.numpy as jnp

    import polyopt.optax as po
    from polyopt import hyper

    def measure(transformation) -> int:
        params = {str(i): jnp.zeros(s, jnp.float32) for i, s in enumerate(shapes)}
        return sum(leaf.nbytes for leaf in jax.tree.leaves(transformation.init(params)))

    factories = {name: getattr(po, name) for name in po.__all__ if name in hyper.SPECS
                 and "learning_rate" in hyper.spec(name)}
    rows = {}
    found = natives_of("optax")
    for rule_name in sorted(set(factories) | set(found)):
        key = found.get(rule_name)
        row = {"native": key}
        if key is not None:
            name, kwargs = _parse(key)
            row["native_bytes"] = measure(_native(key)(OPTAX_LR, **kwargs))
        if rule_name in factories:
            spec = hyper.spec(rule_name)
            options = native.PRESETS[key][1] if key is not None else {}
            spelled = {spec[k].spelling("optax"): v for k, v in options.items()}
            spelled.setdefault("learning_rate", OPTAX_LR)
            row["polyopt_bytes"] = measure(factories[rule_name](**spelled))
        rows[rule_name] = row
    return rows


def run(framework: str, set_name: str) -> dict:
    torch_shapes = common.PARAM_SETS[set_name]
    shapes = framework_shapes(torch_shapes, framework)
    rows = {"torch": _torch, "keras": _keras, "optax": _optax}[framework](shapes)
    for rule_name, row in rows.items():
        row["core_bytes"] = core_bytes(rule_name, {}, torch_shapes)
    n_params, n_tensors = common.sizes(torch_shapes)
    return {"framework": framework, "set": set_name, "params": n_params, "tensors": n_tensors,
            "param_bytes": 4 * n_params, "rules": rows}


# --------------------------------------------------------------------------
# the report


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.2f}"


def markdown(results: list[dict]) -> str:
    by_framework = {r["framework"]: r for r in results}
    first = results[0]
    lines = [f"Optimizer state, MiB, float32, parameter set `{first['set']}` "
             f"({first['params']:,} params in {first['tensors']} tensors, "
             f"{_mib(first['param_bytes'])} MiB). core: the rule with polyopt's defaults "
             f"(torch's layouts). Each framework's cell: polyopt / native (the native of "
             f"the rule's preset in that framework, polyopt with that preset's options; "
             f"polyopt's defaults where the framework has no native).", "",
             "| rule | core | " + " | ".join(f for f in FRAMEWORKS if f in by_framework) + " |",
             "|---|---:|" + "---:|" * len([f for f in FRAMEWORKS if f in by_framework])]
    names = sorted({name for r in results for name in r["rules"]})
    for name in names:
        core = next((r["rules"][name]["core_bytes"] for r in results if name in r["rules"]),
                    None)
        cells = []
        for framework in FRAMEWORKS:
            if framework not in by_framework:
                continue
            row = by_framework[framework]["rules"].get(name)
            if row is None:
                cells.append("")
                continue
            text = _mib(row.get("polyopt_bytes")) or "-"
            if row.get("native") is not None:
                text += f" / {_mib(row['native_bytes'])} (`{row['native']}`)"
            if row.get("params"):
                text += f", {row['params']}"
            cells.append(text)
        lines.append(f"| `{name}` | {_mib(core)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=FRAMEWORKS)
    parser.add_argument("--sets", nargs="+", default=["resnet20-wide"],
                        choices=list(common.PARAM_SETS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the table of these results")
    parser.add_argument("results", nargs="*", type=Path)
    args, _ = parser.parse_known_args(argv)  # the bench session's other options
    if args.markdown is not None:
        results = [json.loads(p.read_text()) for p in args.results]
        text = markdown(results)
        args.markdown.write_text(text)
        print(text)
        return
    if args.framework is None or args.out is None:
        parser.error("--framework and --out are needed to measure")
    result = run(args.framework, args.sets[0])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown([result]))


if __name__ == "__main__":
    main()
