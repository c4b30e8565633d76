"""Per-tensor rules on FSDP2-sharded params equal one process.

Two ranks (gloo, CPU) shard a float64 MLP with ``fully_shard`` (DTensor
params on Shard(0), uneven and empty shards). A rule that is not elementwise
(Muon, Adafactor, LAMB, LARS, Ranger) is stepped by polyopt.torch on the
gathered whole tensors (:mod:`polyopt.torch._sharded`), eager and compiled.
Rank 0 also trains an unsharded copy of the model on the whole batch with
the same optimizer (one process's numbers, side by side); the losses and
params must agree to 1e-12 relative. The bytes each ``step()`` moves are
counted on the collectives it dispatches. torch.optim.Muon and Adafactor
themselves crash under fully_shard (asserted, with their errors).
"""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import native
from tests._native import run_ranks

STEPS = 4
RTOL = 1e-12

_WORKER = r"""
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
import polyopt.torch as pt
from polyopt.torch import _flat, _sharded

rank, world, STEPS = payload["rank"], payload["world"], payload["steps"]
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
dist.init_process_group("gloo", init_method=payload["init"], rank=rank, world_size=world)
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
half = slice(rank * 8, (rank + 1) * 8)


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "broadcast")


def size(tree):
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor))


class Collectives(TorchDispatchMode):
    # every collective dispatched: its input (this rank's part) and its output
    def __init__(self):
        super().__init__()
        self.sent = self.output = self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace in ("_c10d_functional", "c10d") and any(
                name in func.__name__ for name in COLLECTIVES):
            self.count += 1
            self.sent += size((args, kwargs))
            self.output += size(out)
        return out


gathered, compiled_kinds = [0], set()
_step, _run_compiled = _sharded.step, _flat._run_compiled
def spy(*args, **kwargs):
    gathered[0] += 1
    return _step(*args, **kwargs)
def spy_compiled(opt, values, layout, present, structure, *args, **kwargs):
    compiled_kinds.add(structure[0])  # "flat", "views", "local" (shards) or "gathered"
    return _run_compiled(opt, values, layout, present, structure, *args, **kwargs)
_sharded.step, _flat._run_compiled = spy, spy_compiled


def model(shard):
    # uneven shards: the (3, 8) weight splits 2 + 1 rows, the (1, 3) weight and
    # the (1,) bias leave rank 1 an empty shard
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
                              torch.nn.Tanh(), torch.nn.Linear(3, 1))
    if shard:
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    return net


def optimizer(case, net):
    params = list(net.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], **case.get("vectors", {})}]
    kwargs = {**case.get("kwargs", {}), "compiled": case.get("compiled", False)}
    if "preset" in case:
        return pt.preset(case["preset"], groups, **kwargs)
    return getattr(pt, case["cls"])(groups, **kwargs)


def train(net, opt, steps, sharded, count=None):
    losses = []
    for t in steps:
        opt.zero_grad()
        part = half if sharded else slice(None)
        loss = ((net(x[part]) - y[part]) ** 2).mean()
        loss.backward()
        if count is None:
            opt.step()
        else:
            with count:
                opt.step()
        loss = loss.detach()
        if sharded:  # equal halves: the whole batch's loss is the mean
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return losses


def whole(net, sharded):
    return [(p.full_tensor() if sharded else p.detach()).tolist() for p in net.parameters()]


def checkpoint(net, opt, path, save):
    model_state, opt_state = get_state_dict(net, opt)
    state = {"model": model_state, "optim": opt_state}
    if save:
        dcp.save(state, checkpoint_id=path)
        return
    dcp.load(state, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def native_error(name):
    net = model(True)
    params = list(net.parameters())
    opt = (torch.optim.Muon([p for p in params if p.ndim == 2]) if name == "Muon"
           else torch.optim.Adafactor(params))
    net(x[half]).sum().backward()
    try:
        opt.step()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


result = {"cases": {}, "natives": {n: native_error(n) for n in payload["natives"]}}
for case in payload["cases"]:
    out = result["cases"][case["id"]] = {}
    gathered[0] = 0
    compiled_kinds.clear()
    net = model(True)
    opt = optimizer(case, net)
    count = Collectives()
    save = case.get("resume")
    path = payload["checkpoint"] + "-" + case["id"]
    steps = range(STEPS)
    out["losses"] = train(net, opt, steps[:2] if save else steps, True, count)
    if save:
        checkpoint(net, opt, path, save=True)
        out["losses"] += train(net, opt, steps[2:], True, count)
    out["params"] = whole(net, True)
    out["gathered"] = gathered[0]
    out["compiled"] = sorted(compiled_kinds)
    out["bytes"] = {"collectives": count.count / STEPS, "sent": count.sent / STEPS,
                    "output": count.output / STEPS,
                    "received": (count.output - count.sent) / STEPS}
    out["slots"] = sorted({f"{key} {type(v).__name__} {tuple(v.shape) == tuple(p.shape)}"
                           for p, st in opt.state.items() for key, v in st.items()
                           if v.ndim > 0})
    if save:  # a fresh model and optimizer resumed from the checkpoint after step 2
        net = model(True)
        opt = optimizer(case, net)
        checkpoint(net, opt, path, save=False)
        out["resumed"] = {"losses": train(net, opt, steps[2:], True),
                          "params": whole(net, True)}
    if rank == 0:  # one process: the whole batch, an unsharded copy of the model
        net = model(False)
        opt = optimizer(case, net)
        count = Collectives()
        out["single"] = {"losses": train(net, opt, steps, False, count),
                         "params": whole(net, False), "bytes": count.output}


def placed(name, steps=3):
    # tensor-parallel placements on a (1, 2) mesh, without a model: a (4, 5)
    # weight on (Replicate(), Shard(1)) (columns split 3 + 2) and a (5,) bias on
    # (Shard(0), Replicate()), their grads set by hand; the same optimizer on
    # plain copies of them is one process
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (1, world))
    gen = torch.Generator().manual_seed(1)
    whole = [torch.randn(4, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(w.shape, generator=gen) for w in whole] for _ in range(steps)]
    layouts = [(Replicate(), Shard(1)), (Shard(0), Replicate())]
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, pl)) for w, pl in zip(whole, layouts)]
    plain = [torch.nn.Parameter(w.clone()) for w in whole]
    runs = []
    for ps, shard in ((params, True), (plain, False)):
        opt = getattr(pt, name)([{"params": ps[:1]}, {"params": ps[1:]}])
        for gs in grads:
            for p, g, pl in zip(ps, gs, layouts):
                p.grad = distribute_tensor(g, mesh, pl) if shard else g.clone()
            opt.step()
        runs.append([(p.full_tensor() if shard else p.detach()).tolist() for p in ps])
    return {"placed": runs[0], "single": runs[1], "local": list(params[0].to_local().shape)}


def refusals():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    mesh = init_device_mesh("cpu", (world,))
    def param(placement):
        return torch.nn.Parameter(DTensor.from_local(torch.ones(3, 4), mesh, [placement]))
    errors = {}
    for name, placement in (("Partial", Partial()),
                            ("strided", _StridedShard(0, split_factor=2))):
        for compiled in (False, True):
            try:
                pt.Muon([param(Shard(0)), param(placement)], compiled=compiled)
            except ValueError as e:
                errors[f"{name} {compiled}"] = str(e)
    # an elementwise rule on a Partial param is accepted (its local tensors, or DTensor ops)
    pt.Ranger([param(Partial())], gradient_centralization=False)
    # a group whose change makes the rule per-tensor is refused at the step, nothing moved
    p = param(Partial())
    opt = pt.Ranger([p], gradient_centralization=False)
    p.grad = DTensor.from_local(torch.ones(3, 4), mesh, [Partial()])
    opt.param_groups[0]["gradient_centralization"] = True
    try:
        opt.step()
    except ValueError as e:
        errors["step"] = str(e)
    moved = not torch.equal(p.to_local(), torch.ones(3, 4))
    return {"errors": errors, "moved": moved, "state": len(opt.state)}


result["placed"] = {name: placed(name) for name in payload["placed"]}
if payload["refusals"]:
    result["refusals"] = refusals()
dist.barrier()
dist.destroy_process_group()
"""


def _run(tmp_path, cases: list, natives: tuple = (), placed: tuple = (),
         refusals: bool = False) -> list:
    payload = {"cases": cases, "natives": list(natives), "placed": list(placed),
               "refusals": refusals, "steps": STEPS,
               "checkpoint": str(tmp_path / "checkpoint")}
    return run_ranks(_WORKER, payload, 2, str(tmp_path / "rendezvous"))


def _rel(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     / max(np.max(np.abs(np.asarray(y))), 1e-300)) for x, y in zip(a, b))


def _check(case: dict, out: dict, gathers: bool = True) -> None:
    """The sharded run equals one process; it trained, and took the gathered
    step (``gathers``) or moved nothing in its steps."""
    single = out["single"]
    assert _rel([single["losses"][-1]], [single["losses"][0]]) > 1e-3, case  # it trained
    diff = max(_rel([out["losses"]], [single["losses"]]), _rel(out["params"], single["params"]))
    moved = out["bytes"]
    print(f"FSDP2 {case['id']} vs one process: max rel diff {diff:.1e}; per step and rank "
          f"{moved['collectives']:.0f} collectives, {moved['output']:.0f} B gathered, "
          f"{moved['received']:.0f} B received")
    assert diff <= RTOL, (case["id"], diff)
    assert single["bytes"] == 0
    if not gathers:  # an elementwise rule: stepped on the local shards
        assert out["gathered"] == 0 and out["bytes"]["collectives"] == 0, out["bytes"]
        return
    assert out["gathered"] > 0
    # compiled=True: the compiled per-tensor step of one process ran on the gathered tensors
    assert out["compiled"] == (["gathered"] if case.get("compiled") else []), out["compiled"]
    # param-shaped slots stay sharded as their params
    assert all(s.endswith("DTensor True") or not s.endswith("True") for s in out["slots"])
    if "resumed" in out:  # DCP save after step 2, resumed: bitwise the same steps 3 and 4
        assert out["resumed"]["losses"] == out["losses"][2:]
        assert out["resumed"]["params"] == out["params"]


_MUON_VECTORS = {"muon_params": "matrices"}  # torch.optim.Muon takes matrices only
_MUON_PRESETS = [name for name in native.PRESETS if name.startswith("torch.optim.Muon")]

DEFAULT_CASES = [
    {"id": "Muon-torch-eager", "preset": "torch.optim.Muon", "vectors": _MUON_VECTORS,
     "kwargs": {"lr": 0.02}, "resume": True},
    {"id": "Adafactor-eager", "cls": "Adafactor", "kwargs": {"lr": 0.05}, "resume": True},
]


_ELEMENTWISE = {"id": "AdamW-eager", "cls": "AdamW", "kwargs": {"lr": 0.05}}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default tests' one 2-rank run (each rank's result)."""
    return _run(tmp_path_factory.mktemp("sharded"), [*DEFAULT_CASES, _ELEMENTWISE],
                natives=("Muon", "Adafactor"), placed=("Muon", "Adafactor", "Ranger"),
                refusals=True)


@pytest.mark.needs("torch")
def test_fsdp2_muon_and_adafactor_eager_equal_one_process(default_run):
    """Muon (torch.optim.Muon's preset: bfloat16 Newton-Schulz) and Adafactor,
    eager, under fully_shard: one process's numbers to 1e-12 (float64);
    Muon's momentum stays sharded, Adafactor's factored statistics whole, and
    both resume bitwise from a DCP checkpoint;
    the natives torch.optim.Muon and Adafactor crash in their first step.
    An elementwise rule (AdamW) gathers nothing: its steps move no byte.
    Muon, Adafactor and Ranger (its centralization then over the split axis:
    DTensor operations on the grads, the rest on the local shards) on
    tensor-parallel placements of a 2-D mesh (a weight's columns split,
    uneven) equal one process too."""
    outs = default_run
    for case in DEFAULT_CASES:
        _check(case, outs[0]["cases"][case["id"]])
    _check(_ELEMENTWISE, outs[0]["cases"][_ELEMENTWISE["id"]], gathers=False)
    slots = outs[0]["cases"]["Muon-torch-eager"]["slots"]
    assert "momentum_buffer DTensor True" in slots, slots
    slots = outs[0]["cases"]["Adafactor-eager"]["slots"]
    assert {"row_var Tensor False", "col_var Tensor False", "variance DTensor True"} <= set(
        slots), slots
    for name, out in outs[0]["placed"].items():  # tensor-parallel placements, a 2-D mesh
        assert out["local"] == [4, 3]
        diff = _rel(out["placed"], out["single"])
        print(f"{name} on (Replicate(), Shard(1)) and (Shard(0), Replicate()) vs one process: "
              f"max rel diff {diff:.1e}")
        assert diff <= RTOL
    natives = outs[0]["natives"]
    print(natives)
    for name in ("Muon", "Adafactor"):
        assert natives[name] is not None and natives[name].startswith("RuntimeError"), natives
        assert "in-place operations that require placement changes" in natives[name]


@pytest.mark.needs("torch")
def test_placements_the_gather_cannot_write_back_are_refused(default_run):
    """A per-tensor rule's DTensor param placed other than Shard/Replicate
    (Partial sums, strided shards) is refused at construction, eager and
    compiled, naming the param, its placements and what is allowed; at the
    step when a group's change makes the rule per-tensor (nothing moved)."""
    out = default_run[0]["refusals"]
    errors = out["errors"]
    assert sorted(errors) == ["Partial False", "Partial True", "step", "strided False",
                              "strided True"]
    for name, message in errors.items():
        owner = "Ranger" if name == "step" else "Muon"
        assert message.startswith(f"polyopt.torch.{owner}: param group 0, params[")
        assert "takes placements Shard(dim) and Replicate() only" in message
        assert ("Partial(" if name.startswith(("Partial", "step")) else "_StridedShard(") \
            in message, message
    assert "params[1] (shape (3, 4))" in errors["Partial False"]
    assert not out["moved"] and out["state"] == 0


def _matrix_cases(compiled: bool) -> list:
    mode = "compiled" if compiled else "eager"
    cases = [{"id": f"{name}-{mode}", "preset": name, "vectors": _MUON_VECTORS,
              "kwargs": {"lr": 0.02}} for name in _MUON_PRESETS]
    cases += [
        {"id": f"Muon-{mode}", "cls": "Muon"},
        {"id": f"Adafactor-torch-{mode}", "preset": "torch.optim.Adafactor",
         "kwargs": {"lr": 0.05}},
        {"id": f"Lamb-{mode}", "cls": "Lamb", "kwargs": {"lr": 0.02, "weight_decay": 0.01}},
        {"id": f"Lars-{mode}", "cls": "Lars", "kwargs": {"lr": 0.5}},
        # Ranger's prefix (the centralization) on the DTensor grads, the rest on
        # the local shards (eager: replayed; compiled: the compiled local step)
        {"id": f"Ranger-{mode}", "cls": "Ranger", "kwargs": {"lr": 0.05}, "local": True},
    ]
    if compiled:
        cases += [{**case, "id": case["id"].replace("eager", mode)} for case in DEFAULT_CASES]
    return [{**case, "compiled": compiled} for case in cases]


@pytest.mark.distributed
@pytest.mark.needs("torch")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fsdp2_per_tensor_rules_equal_one_process(tmp_path, compiled):
    """Every per-tensor rule of polyopt.torch (each torch.optim.Muon preset,
    Muon's defaults, Adafactor's torch preset, LAMB, LARS, Ranger), eager and
    compiled, under fully_shard: one process's numbers to 1e-12 (float64);
    compiled Muon resumes bitwise from a DCP checkpoint. Ranger's step, eager
    and compiled, gathers nothing and moves nothing (its centralization
    reduces along the unsharded axes)."""
    cases = _matrix_cases(compiled)
    outs = _run(tmp_path, cases)
    for case in cases:
        _check(case, outs[0]["cases"][case["id"]], gathers=not case.get("local"))


_VERSIONS = r"""
import warnings
warnings.simplefilter("ignore")
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import polyopt.torch as pt

rank, world = payload["rank"], payload["world"]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=payload["init"], rank=rank, world_size=world)
mesh = init_device_mesh("cpu", (world,))
MAKERS = {
    "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "Adam": lambda ps, c: pt.preset("torch.optim.Adam", ps, lr=0.1, compiled=c),
    "Ranger": lambda ps, c: pt.Ranger(ps, lr=0.1, compiled=c),
    "Muon": lambda ps, c: pt.Muon(ps, lr=0.1, compiled=c),
}
result = {}
for name, make in MAKERS.items():
    for compiled in ([None] if name.startswith("torch") else [False, True]):
        gen = torch.Generator().manual_seed(0)
        whole = torch.randn(6, 4, generator=gen)
        p = torch.nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
        opt = make([p]) if compiled is None else make([p], compiled)
        for t in range(3):
            p.grad = distribute_tensor(torch.randn(6, 4, generator=gen), mesh, [Shard(0)])
            if t == 2:
                before = p._version
                loss = (p * p).sum()  # saves p
            opt.step()
        try:
            loss.backward()
            outcome = "no error"
        except RuntimeError as e:
            outcome = "refused" if "modified by an inplace operation" in str(e) else str(e)
        result[f"{name}, compiled={compiled}"] = [p._version > before, outcome]
dist.destroy_process_group()
"""


@pytest.mark.needs("torch")  # 2 ranks, 10 s: in the main run
def test_a_step_counts_its_change_of_dtensor_params_as_torch_optim_does(tmp_path):
    """A step on DTensor params (its local shards, or the whole tensors
    gathered) moves each DTensor param's version counter, as torch.optim's
    DTensor ops do: autograd refuses a backward through a graph that saved
    the param before the step. Elementwise (the replay on the local shards,
    the compiled kernel on them), a per-tensor prefix (Ranger) and a
    per-tensor rule (Muon, gathered), eager and compiled; 2 ranks."""
    for out in run_ranks(_VERSIONS, {}, 2, str(tmp_path / "rendezvous")):
        assert out.pop("torch.optim.Adam, compiled=None") == [True, "refused"]
        assert out == {key: [True, "refused"] for key in out}, out
        assert len(out) == 6
