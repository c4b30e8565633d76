"""Time per optimizer step: polyopt.torch against torch.optim (issue 8).

    python benchmarks/bench_torch.py [--quick] [--threads 1] [--out benchmarks/results/torch.json]

For Adam, AdamW, SGD with momentum, RAdam and Ranger on two parameter sets
(benchmarks/common.py: ResNet-20 x1.5, 2.4M params in 59 tensors; ResNet-18,
11.7M in 62), float32, fixed random gradients (the update only): polyopt's
fast path (``compiled=True``: flat state, one compiled elementwise kernel),
polyopt's default (no flags: the eager step, polyopt.torch._eager), and
torch.optim fused / foreach / for-loop (those that exist; the one torch runs
without flags, for-loop on a CPU, is built without flags and named
"native default (...)", the reference of "polyopt default";
RAdam has no fused version; Ranger has no torch.optim version at all, so its
row's reference is torch.optim.RAdam, which does the same RAdam step without
Lookahead and gradient centralization). The copy bandwidth is measured with
torch in the same process; ``vs bound`` is time / (minimum bytes per step /
bandwidth). The optimizer state memory of each variant (bytes of the
distinct storages of ``optimizer.state``) is recorded too.

Muon: torch.optim.Muon (its one flavour, without flags) against the preset
``torch.optim.Muon`` (fast and default) on the 12 matrices of the
transformer set (torch.optim.Muon takes 2-D params only), both iterating
Newton-Schulz in bfloat16; one step per round (seconds each), the script's
rounds. The bandwidth bound means nothing there (15 matrix products per matrix).

Threads: one intra-op thread by default (``--threads``). On a small shared
CPU, torch's spinning worker threads under oversubscription make steps up to
100x slower, and a one-thread run compares the algorithms, not the scheduler.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="polyopt-bench-"))

import common  # noqa: E402
import torch  # noqa: E402

import polyopt.torch as pt  # noqa: E402
from polyopt import native, rules  # noqa: E402

#: algorithm -> (torch.optim class or None, kwargs, polyopt preset or class, native flavours)
ALGORITHMS = {
    "Adam": ("Adam", {"lr": 1e-3}, "torch.optim.Adam", ("fused", "foreach", "for-loop")),
    "AdamW": ("AdamW", {"lr": 1e-3}, "torch.optim.AdamW", ("fused", "foreach", "for-loop")),
    "SGD momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}, "torch.optim.SGD",
                     ("fused", "foreach", "for-loop")),
    "RAdam": ("RAdam", {"lr": 1e-3}, "torch.optim.RAdam", ("foreach", "for-loop")),
    "Ranger": ("RAdam", {"lr": 1e-3}, "Ranger", ("foreach",)),
    # torch.optim.Muon: one flavour (a loop over params), 2-D params only: timed on the
    # matrices of the set; Newton-Schulz in bfloat16 in both (the preset's iteration_dtype)
    "Muon": ("Muon", {"lr": 1e-3}, "torch.optim.Muon", ("for-loop",)),
}
FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_params(shapes, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.05).requires_grad_()
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def state_bytes(opt) -> int:
    """Bytes of the distinct storages that ``opt.state`` references."""
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                storage = v.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def builders(name: str, fast: bool) -> dict:
    native_cls, kwargs, polyopt_name, flavours = ALGORITHMS[name]
    out = {}
    for flavour in flavours:
        label = f"native {flavour}" if name != "Ranger" else f"native RAdam {flavour} (no Ranger)"
        if flavour == default_flavour() and name != "Ranger":
            label = f"{common.DEFAULT} ({flavour})"  # built without flags: torch's own choice
            out[label] = lambda ps: getattr(torch.optim, native_cls)(ps, **kwargs)
            continue
        out[label] = (lambda ps, f=flavour: getattr(torch.optim, native_cls)(
            ps, **kwargs, **FLAGS[f]))
    if polyopt_name.startswith("torch.optim."):
        make = lambda ps, **kw: pt.preset(polyopt_name, ps, **kwargs, **kw)  # noqa: E731
    else:
        make = lambda ps, **kw: getattr(pt, polyopt_name)(ps, **kwargs, **kw)  # noqa: E731
    if fast:
        out["polyopt fast"] = lambda ps: make(ps, compiled=True)
    out["polyopt default"] = make  # no flags: the eager default
    return out


def default_flavour() -> str:
    """What torch.optim runs without flags for float32 CPU params (for-loop on a
    CPU; torch.optim.optimizer._default_to_fused_or_foreach decides)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [torch.zeros(2)]
    fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "for-loop"


def slots(name: str) -> int:
    _, _, polyopt_name, _ = ALGORITHMS[name]
    if name == "Muon":  # the preset refuses the vector slot_count makes
        return common.slot_count(rules.muon())
    if polyopt_name.startswith("torch.optim."):
        rule_name, options = native.PRESETS[polyopt_name]
        extra = {"momentum": 0.9} if name == "SGD momentum" else {}
        return common.slot_count(getattr(rules, rule_name)(**{**options, **extra}))
    return common.slot_count(rules.ranger())


def copy_bandwidth(n: int) -> float:
    src, dst = torch.randn(n), torch.empty(n)

    def copy(calls: int) -> None:
        for _ in range(calls):
            dst.copy_(src)

    return common.bandwidth(copy, 2 * 4 * n)


def run(name: str, set_name: str, steps: int, rounds: int, *, fast: bool,
        bandwidth: float) -> common.Result:
    shapes = common.PARAM_SETS[set_name]
    if name == "Muon":
        shapes = common.matrices(shapes)
    opts = {}
    for label, make in builders(name, fast).items():
        opts[label] = make(make_params(shapes))

    def runner(opt):
        def go(k: int) -> None:
            for _ in range(k):
                opt.step()
        return go

    return common.measure("torch", name, set_name, {k: runner(o) for k, o in opts.items()},
                          lambda label: state_bytes(opts[label]), slots=slots(name),
                          bandwidth=bandwidth, versions={"torch": torch.__version__,
                                                         "threads": torch.get_num_threads()},
                          steps=steps, rounds=rounds)


def main(argv=None) -> None:
    parser = common.parser(__doc__, ALGORITHMS, ROOT / "benchmarks" / "results" / "torch.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fast", action="store_true", help="skip polyopt's compiled path")
    parser.set_defaults(rounds=11)  # more rounds: steps of 2-10 ms move with load
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    header = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {common.machine()}"
    common.run_all(args, header, copy_bandwidth, lambda a, s, bw: run(
        a, s, *common.length(a, args), fast=not args.no_fast, bandwidth=bw))


if __name__ == "__main__":
    main()
