"""Data-parallel training matches one process with the same global batch.

torch: DistributedDataParallel over gloo, 2 processes on the CPU, each with
half of the global batch (DDP averages the gradients), polyopt.torch.Adam
and SGD(momentum) stepping in each. JAX: polyopt.optax.adam under jit with
the batch sharded over 2 host devices (XLA_FLAGS in a child process), params
replicated. float32; the tolerance is 1e-5 relative (the reductions are
split differently, so the last bits differ; measured ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests._native import run_python

STEPS = 10
RTOL = 1e-5

_TORCH_WORKER = r"""
import json, os, sys
import numpy as np
import torch
import torch.distributed as dist
import polyopt.torch
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
cls, kwargs, steps = sys.argv[5], json.loads(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(1)
rng = np.random.default_rng(0)
x = torch.tensor(rng.normal(size=(16, 5)), dtype=torch.float32)
y = torch.tensor(rng.normal(size=(16, 2)), dtype=torch.float32)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
start = [p.detach().clone() for p in model.parameters()]
if world > 1:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(model)
    part = slice(rank * 16 // world, (rank + 1) * 16 // world)
else:
    net, part = model, slice(None)
opt = getattr(polyopt.torch, cls)(net.parameters(), **kwargs)
for _ in range(steps):
    opt.zero_grad()
    ((net(x[part]) - y[part]) ** 2).mean().backward()
    opt.step()
moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), start))
assert moved > 1e-3, moved
if rank == 0:
    with open(out, "w") as f:
        json.dump([p.detach().numpy().tolist() for p in model.parameters()], f)
if world > 1:
    dist.barrier()  # no rank tears gloo down while the other still uses it (abort at exit)
    dist.destroy_process_group()
"""


def _torch_run(tmp_path, world: int, cls: str, kwargs: dict) -> list[np.ndarray]:
    script = tmp_path / "worker.py"
    script.write_text(_TORCH_WORKER)
    out = tmp_path / f"out-{world}.json"
    init = f"file://{tmp_path / f'rendezvous-{world}'}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), init, str(out),
                               cls, json.dumps(kwargs), str(STEPS)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    return [np.asarray(a) for a in json.loads(out.read_text())]


def _max_rel(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(a, b))


@pytest.mark.needs("torch")
@pytest.mark.parametrize("cls, kwargs", [("Adam", {"lr": 0.01}),
                                         ("SGD", {"lr": 0.05, "momentum": 0.9})])
def test_torch_ddp_matches_one_process(tmp_path, cls, kwargs):
    single = _torch_run(tmp_path, 1, cls, kwargs)
    ddp = _torch_run(tmp_path, 2, cls, kwargs)
    diff = _max_rel(ddp, single)
    print(f"torch DDP (gloo, 2 processes) vs 1 process, {cls}: max rel diff {diff:.2e}")
    assert diff <= RTOL


_JAX_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import polyopt.optax
assert len(jax.devices()) == 2, jax.devices()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
params = {"w1": jnp.asarray(rng.normal(size=(5, 8)) * 0.4, jnp.float32), "b1": jnp.zeros(8),
          "w2": jnp.asarray(rng.normal(size=(8, 2)) * 0.4, jnp.float32), "b2": jnp.zeros(2)}
params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
opt = polyopt.optax.adam(0.01)

def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

@jax.jit
def step(p, s, x, y):
    u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

def train(p, x, y):
    s = opt.init(p)
    for _ in range(payload["steps"]):
        p, s = step(p, s, x, y)
    return p

single = train(params, x, y)
mesh = Mesh(np.array(jax.devices()), ("data",))
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ys = jax.device_put(y, NamedSharding(mesh, P("data")))
ps = jax.device_put(params, NamedSharding(mesh, P()))
sharded = train(ps, xs, ys)
result = {"single": {k: np.asarray(v) for k, v in single.items()},
          "sharded": {k: np.asarray(v) for k, v in sharded.items()},
          "shards": len(xs.sharding.device_set)}
"""


@pytest.mark.needs("jax")
def test_jax_two_host_devices_match_one():
    out = run_python(_JAX_SCRIPT, {"steps": STEPS},
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                          "JAX_PLATFORMS": "cpu"})
    assert out["shards"] == 2
    keys = sorted(out["single"])
    diff = _max_rel([np.asarray(out["sharded"][k]) for k in keys],
                    [np.asarray(out["single"][k]) for k in keys])
    print(f"JAX 2 host devices vs 1 device, adam: max rel diff {diff:.2e}")
    assert diff <= RTOL
