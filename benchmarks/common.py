"""Shared pieces of the optimizer benchmarks: parameter sets, memory traffic,
interleaved timing and the result files. numpy only: each framework's script
imports this and runs in its own process.

Method (docs/performance.md): warm-up and compilation are timed apart;
the variants of one comparison run interleaved, round after round, so that
load changes on a shared machine hit all of them alike; each round times
``steps`` consecutive optimizer steps; the report gives the median and the
spread (25th-75th percentile) over rounds, and ratios against the fastest
native variant measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyopt import files

# --------------------------------------------------------------------------
# parameter sets: the tensor shapes of real networks (conv kernels in torch's
# OIHW layout; frameworks with other layouts transpose, which changes nothing
# for an elementwise optimizer)


def _resnet_cifar(blocks: int = 3, widths=(24, 48, 96, 192)) -> list[tuple]:
    """ResNet-20's layout (3 stages of 3 basic blocks, batch-norm scale and
    shift), widened 1.5x: 2.6M params in 59 tensors."""
    shapes: list[tuple] = [(widths[0], 3, 3, 3), (widths[0],), (widths[0],)]
    cin = widths[0]
    for width in widths[1:4]:
        for b in range(blocks):
            shapes += [(width, cin if b == 0 else width, 3, 3), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,)]
            cin = width
    shapes += [(10, cin), (10,)]
    return shapes


def _resnet18() -> list[tuple]:
    """torchvision's ResNet-18 (ImageNet head): 11.7M params in 62 tensors."""
    shapes: list[tuple] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width in (64, 128, 256, 512):
        for b in range(2):
            stride_block = b == 0 and width != 64
            shapes += [(width, cin, 3, 3), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,)]
            if stride_block:
                shapes += [(width, cin, 1, 1), (width,), (width,)]
            cin = width
    shapes += [(1000, 512), (1000,)]
    return shapes


def _transformer(blocks: int = 2, width: int = 768) -> list[tuple]:
    """Two GPT-2-small blocks (torch's (out, in)): per block the attention's q, k, v and
    output projections (768x768), the MLP's 3072x768 and 768x3072, their biases and two
    layer norms' scale and shift: 12 matrices (14.2M params) and 24 vectors."""
    shapes: list[tuple] = []
    for _ in range(blocks):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,)] * 8 + [(4 * width,), (width,)] + [(width,)] * 2
    return shapes


PARAM_SETS: dict[str, list[tuple]] = {
    "resnet20-wide": _resnet_cifar(),
    "resnet18": _resnet18(),
    "transformer": _transformer(),
}
#: the sets each algorithm runs on (default: the two ResNets). Muon (per-matrix
#: Newton-Schulz: 5 x 3 matrix products per matrix) runs on the transformer's matrices
ALGORITHM_SETS = {"Muon": ("transformer",)}
DEFAULT_SETS = ("resnet20-wide", "resnet18")
#: steps per round of an algorithm whose step takes seconds on a CPU (the arguments'
#: are for the elementwise ones; the rounds are the arguments')
ALGORITHM_STEPS = {"Muon": 1}


def sets_of(algorithm: str) -> tuple[str, ...]:
    """The parameter sets ``algorithm`` is timed on."""
    return ALGORITHM_SETS.get(algorithm, DEFAULT_SETS)


def length(algorithm: str, args: argparse.Namespace) -> tuple[int, int]:
    """(steps, rounds) of ``algorithm``: its own steps (ALGORITHM_STEPS) or the arguments'."""
    return ALGORITHM_STEPS.get(algorithm, args.steps), args.rounds


def matrices(shapes: list[tuple]) -> list[tuple]:
    """The 2-D shapes of ``shapes`` (what torch.optim.Muon takes)."""
    return [s for s in shapes if len(s) == 2]


def sizes(shapes: list[tuple]) -> tuple[int, int]:
    """(parameter count, tensor count)."""
    return int(sum(int(np.prod(s)) for s in shapes)), len(shapes)


def make_arrays(shapes: list[tuple], seed: int = 0, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# --------------------------------------------------------------------------
# memory traffic: the bytes an optimizer must move per step at the least


def traffic_bytes(n_params: int, slots: int, itemsize: int = 4) -> int:
    """Bytes read and written by one step that keeps ``slots`` arrays per param:
    read params, grads and every slot; write params and every slot."""
    return n_params * itemsize * ((2 + slots) + (1 + slots))


def slot_count(rule, shapes: list[tuple] | None = None) -> int:
    """Per-parameter state arrays of a polyopt rule (e.g. 2 for Adam, 1 for
    SGD with momentum, 3 for Lookahead(RAdam): slow weights + 2 moments)."""
    shapes = shapes or [(3, 2), (2,)]
    state = rule.init([np.zeros(s, np.float32) for s in shapes])
    return _count_lists(state) // len(shapes)


def _count_lists(tree: Any) -> int:
    if isinstance(tree, list):
        return len(tree)
    if isinstance(tree, tuple):
        return sum(_count_lists(t) for t in tree)
    return 0


# --------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Seconds per step over rounds, and the first (warm-up/compile) call."""

    name: str
    first_call: float = 0.0
    per_step: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_step)

    @property
    def spread(self) -> tuple[float, float]:
        q = np.percentile(self.per_step, [25, 75])
        return float(q[0]), float(q[1])

    def summary(self) -> dict[str, Any]:
        lo, hi = self.spread
        return {"name": self.name, "first_call_s": self.first_call, "median_s": self.median,
                "p25_s": lo, "p75_s": hi, "rounds": len(self.per_step),
                "per_round_s": list(self.per_step)}


def interleaved(variants: dict[str, Callable[[int], None]], *, steps: int, rounds: int,
                warmup: int = 2, prepare: Callable[[str], None] | None = None
                ) -> dict[str, Timing]:
    """Time ``variants`` (name -> run(n): run n steps and wait for the result).

    The first call of each variant (one step: compilation, allocation) is
    timed on its own; then ``warmup`` untimed rounds; then ``rounds`` rounds
    in which every variant runs ``steps`` steps, in rotating order.
    ``prepare(name)``, untimed, runs before every call of a variant (fresh
    gradients, as a training loop's backward makes them).
    """
    prepare = prepare or (lambda name: None)
    timings = {name: Timing(name) for name in variants}
    for name, run in variants.items():
        prepare(name)
        start = time.perf_counter()
        run(1)
        timings[name].first_call = time.perf_counter() - start
    for _ in range(warmup):
        for name, run in variants.items():
            prepare(name)
            run(steps)
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            prepare(name)
            start = time.perf_counter()
            variants[name](steps)
            timings[name].per_step.append((time.perf_counter() - start) / steps)
    return timings


def bandwidth(copy: Callable[[int], None], nbytes_per_call: int, *, calls: int = 20,
              rounds: int = 5) -> float:
    """Bytes per second of ``copy(n)`` (n calls, each moving ``nbytes_per_call``
    bytes: read plus write), best round."""
    copy(2)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        copy(calls)
        best = min(best, (time.perf_counter() - start) / calls)
    return nbytes_per_call / best


# --------------------------------------------------------------------------
# results


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
            "cpus": os.cpu_count(), "python": platform.python_version()}


@dataclass
class Result:
    framework: str
    algorithm: str
    param_set: str
    n_params: int
    n_tensors: int
    traffic_bytes: int
    bandwidth_bytes_per_s: float
    timings: list[dict]
    versions: dict = field(default_factory=dict)
    #: what a timing is per: "step" (one optimizer update) or "epoch" (a training
    #: epoch, bench_epoch.py: no bandwidth bound, ``bandwidth_bytes_per_s`` NaN)
    per: str = "step"

    def rows(self) -> list[dict[str, Any]]:
        """One row per variant: median ms, spread, ratio to the fastest native
        variant (names starting with ``native``, by median), to the native
        default (the variant named ``native default ...``: what the framework
        runs without flags; NaN where there is none) and to the bandwidth
        bound, and to the variant's reference (:data:`REFERENCE`; NaN where
        there is none). The ratios are paired: the median over rounds of the
        variant's time over the reference's time in the same round, so
        that load which hits one round does not move it (results written
        without the times of each round: the ratio of the medians)."""
        natives = [t for t in self.timings if t["name"].startswith("native")]
        fastest = min(natives, key=lambda t: t["median_s"]) if natives else None
        default = next((t for t in natives if t["name"].startswith(DEFAULT)), None)
        references = [t for t in self.timings if t["name"].startswith(REFERENCE)]
        bound = self.traffic_bytes / self.bandwidth_bytes_per_s

        def reference_of(t: dict) -> dict | None:
            mode = t["name"].split()[-1]
            same = [r for r in references if r["name"].split()[-1] == mode]
            return same[0] if same else references[0] if len(references) == 1 else None

        def ratio(t: dict, reference: dict | None = fastest) -> float:
            if reference is None:
                return float("nan")
            mine, theirs = t.get("per_round_s"), reference.get("per_round_s")
            if mine and theirs and len(mine) == len(theirs):
                return statistics.median(a / b for a, b in zip(mine, theirs))
            return t["median_s"] / reference["median_s"]

        rows = []
        for t in self.timings:
            reference = reference_of(t)
            rows.append({
                "framework": self.framework, "algorithm": self.algorithm,
                "params": self.param_set, "variant": t["name"], "ms": 1e3 * t["median_s"],
                "spread_ms": (1e3 * t["p25_s"], 1e3 * t["p75_s"]),
                "first_call_s": t["first_call_s"],
                "vs_native": ratio(t), "vs_bound": t["median_s"] / bound,
                "vs_default": ratio(t, default), "vs_reference": ratio(t, reference),
                "reference": reference and reference["name"],
                "reference_ms": reference and 1e3 * reference["median_s"],
            })
        return rows


#: The name prefix of the native variant built without flags (torch.optim's
#: default: for-loop on a CPU, foreach on CUDA), the reference of "polyopt default".
DEFAULT = "native default"
#: The name prefix of a polyopt variant timed as the reference of a row where the
#: framework has no such optimizer (Keras has no RAdam: Ranger's row also times
#: polyopt.keras.RAdam). Each variant's "vs_reference" is paired with the reference
#: of its mode (the last word of both names: "jit_compile", "tf.function"), or the
#: only reference; the summary adds it to the cell and gives the reference no column.
REFERENCE = "reference"


def write(results: list[Result], path: Path, replace: bool = False) -> None:
    """Append results to a JSON file (a list of Result dicts; created if absent); with
    ``replace``, a result takes the place of the file's one of the same algorithm and
    parameter set (appended if there is none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    for r in map(asdict, results):
        same = [i for i, old in enumerate(existing) if replace and (
            old["algorithm"], old["param_set"]) == (r["algorithm"], r["param_set"])]
        if same:
            existing[same[0]] = r
        else:
            existing.append(r)
    files.write_text(path, json.dumps(existing, indent=1))


def markdown(*paths: Path) -> str:
    """The markdown table of every optimizer-step result in ``paths`` (state
    memory in MiB where a variant records ``state_bytes``), then one of every
    epoch result (bench_epoch.py: ratio of epoch times paired by round; the
    optimizer's time per batch and the epoch ratio it implies)."""
    results = [Result(**r) for path in paths for r in json.loads(Path(path).read_text())]
    tables = []
    steps = [r for r in results if r.per == "step"]
    if steps:
        lines = ["| framework | algorithm | params | variant | ms/step (p25-p75) | first call s "
                 "| vs fastest native | vs bandwidth bound | state MiB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for result in steps:
            memory = {t["name"]: t.get("state_bytes") for t in result.timings}
            for row in result.rows():
                lo, hi = row["spread_ms"]
                mib = memory[row["variant"]]
                lines.append(f"| {row['framework']} | {row['algorithm']} | {row['params']} | "
                             f"{row['variant']} | {row['ms']:.2f} ({lo:.2f}-{hi:.2f}) | "
                             f"{row['first_call_s']:.2f} | {row['vs_native']:.2f}x | "
                             f"{row['vs_bound']:.2f}x | "
                             f"{'' if mib is None else f'{mib / 2**20:.1f}'} |")
        tables.append("\n".join(lines))
    epochs = [r for r in results if r.per == "epoch"]
    if epochs:
        lines = ["| framework | algorithm | data | variant | s/epoch (p25-p75) | first batch s "
                 "| vs fastest native (paired) | optimizer ms/batch | vs native from "
                 "optimizer ms |", "|---|---|---|---|---|---|---|---|---|"]
        for result in epochs:
            extra = {t["name"]: t for t in result.timings}
            for row in result.rows():
                lo, hi = row["spread_ms"]
                t = extra[row["variant"]]
                lines.append(f"| {row['framework']} | {row['algorithm']} (CIFAR CNN epoch) | "
                             f"{row['params']} | {row['variant']} | {row['ms'] / 1e3:.2f} "
                             f"({lo / 1e3:.2f}-{hi / 1e3:.2f}) | {row['first_call_s']:.2f} | "
                             f"{t.get('paired_vs_native', row['vs_native']):.3f}x | "
                             f"{t['optimizer_ms_per_batch']:.2f} | "
                             f"{t['estimate_vs_native']:.3f}x |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def summary(*paths: Path) -> str:
    """The ratios only, of every optimizer-step result in ``paths``: one row per
    algorithm and parameter set, one column per framework's polyopt variant,
    each cell that variant's time over the fastest native variant of the
    same run, with both times, and where both exist a column of "polyopt
    default" over the native default (the epoch results have their own table
    in :func:`markdown`)."""
    cells: dict = {}
    columns: list = []
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            if r.get("per", "step") != "step":
                continue
            rows = Result(**r).rows()
            natives = [row for row in rows if row["variant"].startswith("native")]
            if not natives:
                continue
            best = min(natives, key=lambda row: row["ms"])
            for row in rows:
                if row["variant"].startswith(("native", REFERENCE)):
                    continue
                column = f"{row['framework']} {row['variant'].removeprefix('polyopt').strip()}"
                column = column.strip()
                if column not in columns:
                    columns.append(column)
                cell = f"{row['vs_native']:.2f}x ({row['ms']:.1f} / {best['ms']:.1f})"
                if row["reference"] is not None:
                    label = row["reference"].removeprefix(REFERENCE).removesuffix(
                        row["variant"].split()[-1]).strip()
                    cell += (f"; {row['vs_reference']:.2f}x {label} "
                             f"({row['ms']:.1f} / {row['reference_ms']:.1f})")
                cells[(row["algorithm"], row["params"], column)] = cell
                default = next((n for n in natives if n["variant"].startswith(DEFAULT)), None)
                if row["variant"] == "polyopt default" and default is not None:
                    column = f"{row['framework']} default vs native default"
                    if column not in columns:
                        columns.append(column)
                    cells[(row["algorithm"], row["params"], column)] = (
                        f"{row['vs_default']:.2f}x ({row['ms']:.1f} / {default['ms']:.1f})")
    keys = list(dict.fromkeys((a, p) for a, p, _ in cells))
    keys.sort(key=lambda k: k[1], reverse=True)
    lines = ["| algorithm | params | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for algorithm, params in keys:
        lines.append(f"| {algorithm} | {params} | " + " | ".join(
            cells.get((algorithm, params, c), "") for c in columns) + " |")
    return "\n".join(lines)


def print_rows(result: Result) -> None:
    """One line per variant of ``result`` (whose timings hold ``state_bytes``)."""
    rows = result.rows()
    width = max(len(row["variant"]) for row in rows)
    for row, timing in zip(rows, result.timings):
        print(f"{result.algorithm:13s} {result.param_set:14s} {row['variant']:{width}s} "
              f"{row['ms']:8.2f} ms ({row['spread_ms'][0]:.2f}-{row['spread_ms'][1]:.2f})  "
              f"first {row['first_call_s']:6.2f} s  {row['vs_native']:5.2f}x native  "
              f"{row['vs_bound']:5.2f}x bound  state {timing['state_bytes'] / 2**20:6.1f} MiB",
              flush=True)


def measure(framework: str, algorithm: str, set_name: str,
            variants: dict[str, Callable[[int], None]], state_bytes: Callable[[str], int], *,
            slots: int, bandwidth: float, versions: dict, steps: int, rounds: int,
            prepare: Callable[[str], None] | None = None) -> Result:
    """Time ``variants`` (see :func:`interleaved`, one warm-up round), then record each
    one's ``state_bytes(name)`` (after the runs) and print the rows."""
    n, count = sizes(PARAM_SETS[set_name])
    timings = interleaved(variants, steps=steps, rounds=rounds, warmup=1, prepare=prepare)
    summaries = [{**t.summary(), "state_bytes": state_bytes(name)} for name, t in timings.items()]
    result = Result(framework, algorithm, set_name, n, count, traffic_bytes(n, slots), bandwidth,
                    summaries, versions)
    print_rows(result)
    return result


# --------------------------------------------------------------------------
# the scripts' command line


def parser(doc: str, algorithms: dict, out: Path) -> argparse.ArgumentParser:
    """The options every benchmark script takes (a script adds its own)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(algorithms),
                        choices=list(algorithms))
    parser.add_argument("--sets", nargs="+", default=list(PARAM_SETS), choices=list(PARAM_SETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows measured (--algorithms on --sets) in --out "
                             "and keep its others (default: --out is rewritten)")
    return parser


def run_all(args: argparse.Namespace, header: str, copy_bandwidth: Callable[[int], float],
            run: Callable[[str, str, float], Result]) -> None:
    """Every algorithm of ``args`` on every set: ``run(algorithm, set, bandwidth)``, the
    bandwidth measured per set with ``copy_bandwidth(n_params)``; results to ``args.out``
    (replaced; with ``--update`` only the rows measured), then the markdown table."""
    print(header, flush=True)
    if args.out.exists() and not args.update:
        args.out.unlink()
    for set_name in args.sets:
        algorithms = [a for a in args.algorithms if set_name in sets_of(a)]
        if not algorithms:
            continue
        n, _ = sizes(PARAM_SETS[set_name])
        bw = copy_bandwidth(n)
        print(f"{set_name}: copy bandwidth {bw / 1e9:.2f} GB/s", flush=True)
        write([run(a, set_name, bw) for a in algorithms], args.out, replace=args.update)
    print(markdown(args.out))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="markdown table of benchmark JSON files")
    parser.add_argument("--markdown", type=Path, required=True, help="the .md file to write")
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    ratios, table = summary(*args.results), markdown(*args.results)
    machine_line = ", ".join(f"{k} {v}" for k, v in machine().items())
    files.write_text(args.markdown, f"Machine: {machine_line}\n\n## Ratios\n\n{ratios}\n\n"
                             f"## Every variant\n\n{table}\n")
    print(ratios)
