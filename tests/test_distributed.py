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


# --------------------------------------------------------------------------
# FSDP2 (fully_shard): params are DTensors sharded on dim 0 over 2 ranks

_FSDP_WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
import polyopt.torch
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
cls, kwargs, steps = sys.argv[5], json.loads(sys.argv[6]), json.loads(sys.argv[7])
checkpoint, save_after, options = sys.argv[8], int(sys.argv[9]), json.loads(sys.argv[10])
from polyopt.torch import _eager
if options.get("whole"):  # the per-tensor step on the whole DTensors (DTensor ops)
    _eager.eligible = lambda rule: False
replayed = set()  # the types of the params the eager replay ran on
_replay = _eager._replay
def spy(program, started, outputs, params, *args):
    replayed.update(type(p).__name__ for p in params)
    return _replay(program, started, outputs, params, *args)
_eager._replay = spy
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
torch.manual_seed(0)
# uneven shards: the (3, 8) weight splits 2 + 1 rows, the (1, 3) weight and the
# (1,) bias leave rank 1 an empty shard
model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
                            torch.nn.Tanh(), torch.nn.Linear(3, 1))
if world > 1:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    part = slice(rank * 16 // world, (rank + 1) * 16 // world)
else:
    part = slice(None)
opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
if steps[0] > 0:  # resume: the model and the optimizer from the checkpoint
    model_state, opt_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": opt_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
losses = []
for t in range(*steps):
    for key, value in options.get("later", {}).items():  # set from step 2 on
        if t >= 2:
            opt.param_groups[0][key] = value
    opt.zero_grad()
    loss = ((model(x[part]) - y[part]) ** 2).mean()
    loss.backward()
    opt.step()
    loss = loss.detach()
    if world > 1:  # equal halves: the global batch's loss is the mean
        dist.all_reduce(loss)
        loss /= world
    losses.append(float(loss))
    if t == save_after:
        model_state, opt_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=checkpoint)
if kwargs.get("compiled") and world > 1:  # the compiled step on the local shards ran
    assert any(key[0] == "local" for key in polyopt.torch._flat._COMPILED_STEPS)
full = [p.full_tensor() if world > 1 else p.detach() for p in model.parameters()]
if world > 1:
    sharded = [type(p).__name__ for p in model.parameters()]
    assert sharded == ["DTensor"] * 6, sharded
    assert [tuple(p.to_local().shape) for p in model.parameters()][2:] == (
        [(2, 8), (2,), (1, 3), (1,)] if rank == 0 else [(1, 8), (1,), (0, 3), (0,)])
if rank == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses, "params": [p.tolist() for p in full],
                   "replayed": sorted(replayed),
                   "slots": sorted({f"{key} {type(v).__name__} {tuple(v.shape) == p.shape}"
                                    for p, st in opt.state.items() for key, v in st.items()
                                    if v.ndim > 0})}, f)
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def _fsdp_run(tmp_path, name: str, world: int, cls: str, kwargs: dict,
              steps=(0, STEPS), save_after: int = -1, checkpoint: str = "checkpoint",
              **options) -> dict:
    script = tmp_path / "fsdp_worker.py"
    script.write_text(_FSDP_WORKER)
    out = tmp_path / f"{name}.json"
    init = f"file://{tmp_path / f'rendezvous-{name}'}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), init, str(out),
                               cls, json.dumps(kwargs), json.dumps(list(steps)),
                               str(tmp_path / checkpoint), str(save_after),
                               json.dumps(options)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [p.communicate(timeout=400)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    return {"losses": np.asarray(result["losses"]),
            "params": [np.asarray(a) for a in result["params"]], "replayed": result["replayed"],
            "slots": result["slots"]}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _same(a: dict, b: dict) -> bool:
    """Bitwise the same losses and params."""
    return bool((a["losses"] == b["losses"]).all()) and all(
        (x == y).all() for x, y in zip(a["params"], b["params"]))


@pytest.mark.needs("torch")
def test_torch_fsdp2_eager_and_compiled_match_unsharded_and_resume_exactly(tmp_path):
    """float64 AdamW under fully_shard (2 ranks, gloo, uneven and empty
    shards). The eager default replays the rule on each DTensor's local shard
    (it ran on plain tensors only) and gives bitwise the numbers of the
    per-tensor step on the whole DTensors (DTensor ops); it, and the compiled
    path (the rule on the local shards too), give the losses and params of one
    unsharded process to 1e-12 relative. Resumed from a DCP checkpoint after
    step 5, each ends bitwise where its uninterrupted run did."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    compiled_kwargs = {**kwargs, "compiled": True}
    single = _fsdp_run(tmp_path, "single", 1, "AdamW", kwargs)
    eager = _fsdp_run(tmp_path, "eager", 2, "AdamW", kwargs, save_after=5,
                      checkpoint="checkpoint-eager")
    eager_resumed = _fsdp_run(tmp_path, "eager-resumed", 2, "AdamW", kwargs, steps=(6, STEPS),
                              checkpoint="checkpoint-eager")
    whole = _fsdp_run(tmp_path, "whole", 2, "AdamW", kwargs, whole=True)
    compiled = _fsdp_run(tmp_path, "compiled", 2, "AdamW", compiled_kwargs, save_after=5)
    resumed = _fsdp_run(tmp_path, "resumed", 2, "AdamW", compiled_kwargs, steps=(6, STEPS))
    assert _rel(single["losses"][-1], single["losses"][0]) > 1e-2  # it trained
    assert eager["replayed"] == eager_resumed["replayed"] == ["Tensor"]  # the local shards
    assert whole["replayed"] == compiled["replayed"] == []
    assert _same(eager, whole)
    for name, run in (("eager", eager), ("compiled", compiled)):
        diff = max(_rel(run["losses"], single["losses"]),
                   _max_rel(run["params"], single["params"]))
        print(f"FSDP2 {name} vs unsharded, AdamW float64: max rel diff {diff:.2e}")
        assert diff <= 1e-12
    diff = max(_rel(compiled["losses"], eager["losses"]),
               _max_rel(compiled["params"], eager["params"]))
    print(f"FSDP2 compiled vs eager: max rel diff {diff:.2e}")
    assert diff <= 1e-12
    for run, resumed_run in ((eager, eager_resumed), (compiled, resumed)):
        assert (resumed_run["losses"] == run["losses"][6:]).all()
        assert all((a == b).all() for a, b in zip(resumed_run["params"], run["params"]))


@pytest.mark.needs("torch")
def test_torch_fsdp2_eager_starts_a_slot_on_the_local_shards(tmp_path):
    """SGD whose momentum is set from step 2 on: the eager replay starts the
    momentum buffers on the local shards and keeps them as DTensors laid out
    as their params; bitwise the per-tensor step on the whole DTensors, and
    the unsharded numbers to 1e-12 relative (float64)."""
    kwargs, later = {"lr": 0.05}, {"momentum": 0.9}
    single = _fsdp_run(tmp_path, "single", 1, "SGD", kwargs, later=later)
    eager = _fsdp_run(tmp_path, "eager", 2, "SGD", kwargs, later=later)
    whole = _fsdp_run(tmp_path, "whole", 2, "SGD", kwargs, later=later, whole=True)
    assert eager["replayed"] == ["Tensor"] and whole["replayed"] == []
    assert eager["slots"] == whole["slots"] == ["momentum_buffer DTensor True"]
    assert _same(eager, whole)
    diff = max(_rel(eager["losses"], single["losses"]),
               _max_rel(eager["params"], single["params"]))
    print(f"FSDP2 eager SGD (momentum from step 2) vs unsharded: max rel diff {diff:.2e}")
    assert diff <= 1e-12


@pytest.mark.needs("torch")
def test_torch_fsdp2_eager_ranger_matches_unsharded(tmp_path):
    """Ranger's gradient centralization reduces over the whole tensor: the
    eager path (the params gathered whole, polyopt.torch._sharded) gives the
    unsharded numbers under fully_shard (float64, 1e-12)."""
    single = _fsdp_run(tmp_path, "single", 1, "Ranger", {"lr": 0.05})
    sharded = _fsdp_run(tmp_path, "sharded", 2, "Ranger", {"lr": 0.05})
    assert sharded["replayed"] == []  # not elementwise: not replayed, whole DTensors
    diff = max(_rel(sharded["losses"], single["losses"]),
               _max_rel(sharded["params"], single["params"]))
    print(f"FSDP2 eager Ranger vs unsharded: max rel diff {diff:.2e}")
    assert diff <= 1e-12
