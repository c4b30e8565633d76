"""Time per optimizer step: polyopt.torch (eager and compiled) against torch.optim.

    python benchmarks/torch_step.py                    # Adam, AdamW, SGD momentum, RMSprop
    python benchmarks/torch_step.py --algorithms Adam --repeats 5 --threads 2

The model: 30 Linear(290, 290) layers, 60 tensors, 2.53 M float32 params,
random gradients. Each optimizer is warmed up (the compiled one compiles
then; its compile time is printed), then all of an algorithm's variants are
timed in interleaved rounds (so that load from other processes hits them
alike); the median of the rounds is reported, with its ratio to torch.optim's
for-loop step. Not a test: it asserts nothing.

One intra-op thread by default: on a small shared CPU torch's spinning
worker threads make the numbers swing by 10x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="polyopt-bench-"))

import torch  # noqa: E402

import polyopt.torch as pt  # noqa: E402

LAYERS, WIDTH = 30, 290

# algorithm -> (torch.optim class, shared torch kwargs, polyopt preset, native variants)
ALGORITHMS = {
    "Adam": ("Adam", {"lr": 1e-3}, "torch.optim.Adam", ("for-loop", "foreach", "fused")),
    "AdamW": ("AdamW", {"lr": 1e-3}, "torch.optim.AdamW", ("for-loop", "foreach", "fused")),
    "SGD momentum": ("SGD", {"lr": 0.01, "momentum": 0.9}, "torch.optim.SGD",
                     ("for-loop", "foreach", "fused")),
    "RMSprop": ("RMSprop", {"lr": 0.01}, "torch.optim.RMSprop", ("for-loop", "foreach")),
}
NATIVE_FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True},
                "fused": {"fused": True}}


def make_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(LAYERS):
        params.append(torch.randn(WIDTH, WIDTH, generator=gen) * 0.05)
        params.append(torch.zeros(WIDTH))
    params = [p.requires_grad_() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def variants(name: str) -> dict:
    native, kwargs, preset, flavours = ALGORITHMS[name]
    out = {}
    for flavour in flavours:
        out[f"torch.optim {flavour}"] = (
            lambda ps, f=flavour: getattr(torch.optim, native)(ps, **kwargs, **NATIVE_FLAGS[f]))
    out["polyopt eager"] = lambda ps: pt.preset(preset, ps, **kwargs)
    out["polyopt compiled"] = lambda ps: pt.preset(preset, ps, **kwargs, compiled=True)
    return out


def bench(name: str, repeats: int, steps: int, skip_compiled: bool) -> None:
    opts = {}
    for label, make in variants(name).items():
        if skip_compiled and "compiled" in label:
            continue
        opt = make(make_params())
        start = time.perf_counter()
        opt.step()  # first step: state, and compilation for the compiled path
        first = time.perf_counter() - start
        for _ in range(2):
            opt.step()
        opts[label] = opt
        if "compiled" in label:
            print(f"  {name}: polyopt compiled: first step (compile) {first:.1f} s")
    times = {label: [] for label in opts}
    for _ in range(repeats):
        for label, opt in opts.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[label].append((time.perf_counter() - start) / steps * 1e3)
    base = statistics.median(times["torch.optim for-loop"])
    print(f"\n{name} ({LAYERS * 2} tensors, {LAYERS * (WIDTH * WIDTH + WIDTH) / 1e6:.2f} M "
          f"params, median of {repeats} x {steps} steps, {torch.get_num_threads()} thread(s))")
    print(f"  {'':24s} {'ms/step':>8s} {'vs torch for-loop':>18s}")
    for label, values in times.items():
        ms = statistics.median(values)
        print(f"  {label:24s} {ms:8.2f} {ms / base:17.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS),
                        choices=list(ALGORITHMS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip polyopt compiled")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} cpu(s)")
    for name in args.algorithms:
        bench(name, args.repeats, args.steps, args.no_compile)


if __name__ == "__main__":
    main()
