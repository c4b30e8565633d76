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
distinct storages of ``optimizer.state``) is recorded too. The rows
"Adam, fresh grads" and "SGD momentum, fresh grads" give every variant new
gradient tensors before each step (untimed; one step per round), as a
training loop's ``zero_grad()`` and backward do.

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
#: the same, with fresh gradients before every step (untimed), as a training
#: loop's zero_grad() and backward make them: one step per round, more rounds
FRESH = ", fresh grads"
ALGORITHMS.update({name + FRESH: ALGORITHMS[name] for name in ("Adam", "SGD momentum")})
FRESH_ROUNDS = 4  # rounds of one step per round of --steps steps
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
        extra = {"momentum": 0.9} if name.removesuffix(FRESH) == "SGD momentum" else {}
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
    opts, grads = {}, {}
    for label, make in builders(name, fast).items():
        params = make_params(shapes)
        opts[label] = make(params)
        grads[label] = [p.grad for p in params]

    def runner(opt):
        def go(k: int) -> None:
            for _ in range(k):
                opt.step()
        return go

    prepare = None
    if name.endswith(FRESH):  # each step's grads new tensors (the last ones freed)
        steps, rounds = 1, FRESH_ROUNDS * rounds

        def prepare(label: str) -> None:
            for p in opts[label].param_groups[0]["params"]:
                p.grad = None
            for p, g in zip(opts[label].param_groups[0]["params"], grads[label]):
                p.grad = g.clone()

    return common.measure("torch", name, set_name, {k: runner(o) for k, o in opts.items()},
                          lambda label: state_bytes(opts[label]), slots=slots(name),
                          bandwidth=bandwidth, versions={"torch": torch.__version__,
                                                         "threads": torch.get_num_threads()},
                          steps=steps, rounds=rounds, prepare=prepare)


# --------------------------------------------------------------------------
# FSDP2: the optimizer step on sharded params (2 ranks, gloo)

#: the FSDP2 step's variants: Adam, float32, lr 1e-3 (polyopt's preset of torch.optim.Adam)
FSDP_VARIANTS = {
    "native for-loop": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    "native foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "polyopt eager": lambda ps: pt.preset("torch.optim.Adam", ps, lr=1e-3),
    "polyopt compiled": lambda ps: pt.preset("torch.optim.Adam", ps, lr=1e-3, compiled=True),
}
FSDP_WIDTH, FSDP_LAYERS = 512, 4  # 4 Linear(512, 512): 1.05M params, 8 tensors


def fsdp_rank(rank: int, world: int, init: str, out: str, steps: int, rounds: int) -> None:
    """One rank of the FSDP2 benchmark: each variant on its own fully_shard
    model (the same init), the optimizer step alone (the grads of one
    backward, kept) and the whole train step (forward, backward, step);
    medians over ``rounds`` blocks of ``steps`` steps, rank 0 writes them."""
    import json
    import statistics
    import time

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = torch.randn(64, FSDP_WIDTH, generator=torch.Generator().manual_seed(rank))
    variants, results = {}, {}
    for label, make in FSDP_VARIANTS.items():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(FSDP_WIDTH, FSDP_WIDTH) for _ in range(FSDP_LAYERS)]
        model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        opt = make(list(model.parameters()))

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        started = time.perf_counter()
        train_step()  # the first step (compiled: traces and compiles)
        results[label] = {"first step s": time.perf_counter() - started}
        for _ in range(3):
            train_step()
        variants[label] = (opt, train_step)
    # the variants interleaved, round after round, so that load hits all alike;
    # the optimizer step also in CPU time of this thread (what load moves least)
    times = {label: {"optimizer step": [], "optimizer step cpu": [], "train step": []}
             for label in variants}
    for _ in range(rounds):
        for label, (opt, train_step) in variants.items():
            dist.barrier()
            started, cpu = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                opt.step()
            times[label]["optimizer step"].append((time.perf_counter() - started) / steps)
            times[label]["optimizer step cpu"].append((time.thread_time() - cpu) / steps)
            dist.barrier()
            started = time.perf_counter()
            for _ in range(steps):
                train_step()
            times[label]["train step"].append((time.perf_counter() - started) / steps)
    for label, kinds in times.items():
        results[label].update({f"{k} ms": 1e3 * statistics.median(v) for k, v in kinds.items()})
        results[label]["optimizer step cpu, ratio to the native default"] = statistics.median(
            a / b for a, b in zip(kinds["optimizer step cpu"],
                                  times["native for-loop"]["optimizer step cpu"]))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({
            "model": f"{FSDP_LAYERS} x Linear({FSDP_WIDTH}, {FSDP_WIDTH}), {n} params, "
                     f"float32, batch 64 per rank", "world": world, "steps": steps,
            "rounds": rounds, "torch": torch.__version__, "machine": common.machine(),
            "results": results}, indent=1))


def fsdp_table(data: dict) -> str:
    foreach = data["results"]["native foreach"]
    lines = [f"FSDP2 (fully_shard, {data['world']} ranks, gloo, 1 thread each): Adam on "
             f"{data['model']}; medians over {data['rounds']} interleaved rounds of "
             f"{data['steps']} steps (rank 0); the optimizer step in wall time and in CPU "
             "time of the stepping thread; ratios: over torch.optim.Adam's default here "
             "(the for-loop; CPU time, median of the rounds' ratios) and over its foreach "
             "(wall time)", "",
             "| variant | optimizer step ms | CPU ms | vs native default (CPU) | vs foreach "
             "(wall) | train step ms | vs foreach | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in data["results"].items():
        lines.append(
            f"| {label} | {r['optimizer step ms']:.2f} | {r['optimizer step cpu ms']:.2f} | "
            f"{r['optimizer step cpu, ratio to the native default']:.2f}x | "
            f"{r['optimizer step ms'] / foreach['optimizer step ms']:.2f}x | "
            f"{r['train step ms']:.2f} | {r['train step ms'] / foreach['train step ms']:.2f}x "
            f"| {r['first step s']:.2f} |")
    return "\n".join(lines)


def fsdp(out: Path, steps: int, rounds: int, world: int = 2) -> None:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [subprocess.Popen([sys.executable, __file__, "--fsdp-rank", str(r), str(world),
                                   init, str(out), str(steps), str(rounds)]) for r in range(world)]
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"FSDP2 benchmark: ranks exited with {codes}")
    import json
    print(fsdp_table(json.loads(out.read_text())))


# --------------------------------------------------------------------------
# the compiled path's first call: cold and warm inductor cache


def first_call_child(algorithm: str, set_name: str) -> None:
    """Time the compiled path's first and second step with fresh grads (a
    training loop with zero_grad()), then its first step with the grads of
    the step before it back (zero_grad(set_to_none=False): the flat kernel
    compiles then), in a fresh process."""
    import json
    import time

    torch.set_num_threads(1)
    _, kwargs, polyopt_name, _ = ALGORITHMS[algorithm]
    params = make_params(common.PARAM_SETS[set_name])
    grads = [p.grad for p in params]
    if polyopt_name.startswith("torch.optim."):
        opt = pt.preset(polyopt_name, params, **kwargs, compiled=True)
    else:
        opt = getattr(pt, polyopt_name)(params, **kwargs, compiled=True)
    times = []
    for fresh in (True, True, False):
        if fresh:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        started = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - started)
    print("@@" + json.dumps(times))


def first_call(out: Path, algorithms: list, set_name: str) -> None:
    """Each algorithm's first compiled step in a fresh process: with an empty
    inductor cache (cold), then again with the cache the first run filled (warm)."""
    import json
    import subprocess

    results = {}
    for algorithm in algorithms:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for kind in ("cold", "warm"):
                done = subprocess.run([sys.executable, __file__, "--first-call-child", algorithm,
                                       set_name], env=env, capture_output=True, text=True,
                                      check=True)
                first, second, kept = json.loads(done.stdout.rsplit("@@", 1)[1])
                results[f"{algorithm}, {kind} cache"] = {
                    "first step s": first, "second step ms": 1e3 * second,
                    "first step with kept grads s": kept}
                print(algorithm, kind, f"first step {first:.2f} s, second {1e3 * second:.2f} ms, "
                      f"first with kept grads {kept:.2f} s", flush=True)
    out.write_text(json.dumps({"set": set_name, "torch": torch.__version__,
                               "machine": common.machine(), "results": results}, indent=1))
    print(f"compiled=True, first step on {set_name} (a fresh process each; fresh grads, then "
          f"the first step whose grads are the last step's):")
    for label, r in results.items():
        print(f"| {label} | {r['first step s']:.2f} s | {r['second step ms']:.2f} ms "
              f"| {r['first step with kept grads s']:.2f} s |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fsdp-rank"]:  # a child of --fsdp
        rank, world, init, out, steps, rounds = argv[1:7]
        fsdp_rank(int(rank), int(world), init, out, int(steps), int(rounds))
        return
    if argv[:1] == ["--first-call-child"]:  # a child of --first-call
        first_call_child(argv[1], argv[2])
        return
    parser = common.parser(__doc__, ALGORITHMS, ROOT / "benchmarks" / "results" / "torch.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fast", action="store_true", help="skip polyopt's compiled path")
    parser.add_argument("--fsdp", action="store_true",
                        help="the FSDP2 step instead (2 ranks, gloo): --out gets its JSON")
    parser.add_argument("--first-call", action="store_true",
                        help="the compiled path's first step, cold and warm inductor cache "
                             "(--algorithms, the first of --sets): --out gets its JSON")
    parser.set_defaults(rounds=11)  # more rounds: steps of 2-10 ms move with load
    args = parser.parse_args(argv)
    if args.fsdp:
        fsdp(args.out, max(args.steps, 10), args.rounds)
        return
    if args.first_call:
        first_call(args.out, args.algorithms, args.sets[0])
        return
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    header = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {common.machine()}"
    common.run_all(args, header, copy_bandwidth, lambda a, s, bw: run(
        a, s, *common.length(a, args), fast=not args.no_fast, bandwidth=bw))


if __name__ == "__main__":
    main()
