"""polyopt.torch under torch.distributed: the worker of tests/test_torch_distributed.py.

``spawn(tmp_path, cases, world)`` starts ``world`` processes of this module
(``python -m tests._torch_distributed``; one gloo group over a file
rendezvous, CPU, float64) and returns rank 0's results. Each process runs
every case, one after another (spawning a group costs seconds): a case is
``{"id", "optimizer": a spec for build, "settings": [...]}`` and optionally
``"later": {group key: value}`` (set from step 2 on); the settings are among

- ``single``: one unsharded process (rank 0 only) with the whole batch, the
  reference; saves a DCP checkpoint after step ``SAVE`` (``no_dist``);
- ``fsdp``: ``fully_shard`` on each Linear and on the root, each rank half of
  the batch; after step ``SAVE`` saves the sharded model and optimizer state
  dicts with DCP and the full ones (``torch.save`` on rank 0);
- ``resume-sharded``, ``resume-full``: a fresh FSDP2 model and optimizer
  resumed from them (``get_state_dict``, ``dcp.load``, ``set_state_dict``;
  ``set_state_dict`` with ``full_state_dict=True``), steps ``SAVE + 1`` on;
- ``resume-to-one``: one unsharded process resumed from the FSDP2 DCP checkpoint;
- ``resume-from-one``: FSDP2 resumed from the single process's DCP checkpoint;
- ``compiled``: ``fsdp`` with ``compiled=True`` (its DCP checkpoint only);
  ``resume-compiled``: resumed from it; ``single-compiled``: ``single`` with
  ``compiled=True`` (no checkpoint), the reference of ``compiled`` for a rule
  whose compiled numbers differ from its eager ones (a bfloat16 iteration);
- ``ddp``: DistributedDataParallel, each rank half of the batch;
- ``whole``: ``fsdp`` (no checkpoint) with an elementwise rule's eager
  replay run on the whole DTensors (DTensor ops) instead of their local
  shards.

A setting's result: per-step losses (the global batch's), the final full
params, how far they moved from the start (max relative), the types of the
params the eager replay ran on ("local" when the compiled step ran on local
shards, "gathered" when a per-tensor rule stepped params gathered whole),
the types of the param-shaped state slots and its wall time; or its error
(``"TypeName: message"``), which does not stop the other settings.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

STEPS = 10
SAVE = 5  # checkpoints hold the state after step SAVE; resumed runs take steps SAVE+1..STEPS-1
BATCH = 16
ROOT = Path(__file__).resolve().parent.parent

#: settings that run on rank 0 alone (one unsharded process)
ONE_PROCESS = ("single", "resume-to-one", "single-compiled")
#: resumed setting -> the setting that writes its checkpoint
NEEDS = {"resume-sharded": "fsdp", "resume-full": "fsdp", "resume-to-one": "fsdp",
         "resume-from-one": "single", "resume-compiled": "compiled"}


def spawn(tmp_path: Path, cases: list[dict], world: int = 2, timeout: float = 1200) -> dict:
    """Run ``cases`` in ``world`` processes of this module; rank 0's results:
    ``{case id: {setting: result}}``, ``"seconds"``: the group's wall time and
    ``"cpu_seconds"``: rank 0's CPU time (and its ended children's; compiler
    workers still alive at its end are not counted)."""
    jobs = tmp_path / "cases.json"
    jobs.write_text(json.dumps(cases))
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # a fresh rendezvous file per group (gloo's file store would reuse a left-over one)
    rendezvous = tmp_path / f"rendezvous-{uuid.uuid4().hex}"
    command = [sys.executable, "-m", "tests._torch_distributed", str(world),
               f"file://{rendezvous}", str(jobs), str(out), str(tmp_path)]
    procs = [subprocess.Popen([*command, str(rank)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:  # a hung group (a collective some rank never joined) ends here
            p.kill()
        raise
    for rank, (p, err) in enumerate(zip(procs, errors)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{err[-4000:]}"
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------
# the worker (everything below runs in the spawned processes)


def build(spec: dict, params, compiled: bool = False):
    """The optimizer of ``spec``: ``{"cls": name, "kwargs"}`` (a polyopt.torch
    class), ``{"preset": native name, "kwargs"}`` (polyopt.torch.preset), or a
    wrapper ``{"wrap": "Lookahead" | "SkipNonFinite", "base": spec, "kwargs"}``
    / ``{"wrap": "SAM", "base": {"cls": ...}, "kwargs"}``; ``compiled`` goes to
    the polyopt optimizer inside. ``"matrices": True``: the params of two or
    more axes only (torch.optim.Muon takes nothing else; the biases stay)."""
    import polyopt.torch as pt

    if spec.get("matrices"):
        params = [p for p in params if p.ndim >= 2]
    kwargs = dict(spec.get("kwargs", {}))
    if "wrap" in spec:
        base = spec["base"]
        if spec["wrap"] == "SAM":  # SAM builds its base optimizer from a class
            base_kwargs = {**base.get("kwargs", {}), **({"compiled": True} if compiled else {})}
            return pt.SAM(params, getattr(pt, base["cls"]), **kwargs, **base_kwargs)
        return getattr(pt, spec["wrap"])(build(base, params, compiled), **kwargs)
    if compiled:
        kwargs["compiled"] = True
    if "preset" in spec:
        return pt.preset(spec["preset"], params, **kwargs)
    return getattr(pt, spec["cls"])(params, **kwargs)


class _Worker:
    def __init__(self, rank: int, world: int, directory: Path) -> None:
        import torch

        self.rank, self.world, self.directory = rank, world, directory
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 5, generator=gen, dtype=torch.float64)
        self.y = torch.randn(BATCH, 1, generator=gen, dtype=torch.float64)

    # -- models ---------------------------------------------------------------

    def model(self):
        """The same float64 MLP in every run; uneven shards under fully_shard on 2
        ranks: the (3, 8) weight splits 2 + 1 rows, the (1, 3) weight and the (1,)
        bias leave rank 1 an empty shard."""
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 3), torch.nn.Tanh(),
                                   torch.nn.Linear(3, 1)).to(torch.float64)

    def sharded(self):
        import torch
        from torch.distributed.fsdp import fully_shard

        model = self.model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model

    # -- one run --------------------------------------------------------------

    def train(self, model, net, opt, start: int, save=None, later: dict | None = None
              ) -> list[float]:
        """Steps ``start..STEPS-1`` of ``net`` (each process its part of the
        batch); ``save(model, opt)`` after step SAVE; the group values ``later``
        set from step 2 on; the global batch's losses."""
        import torch.distributed as dist

        distributed = net is not model or _is_sharded(model)
        if distributed:
            part = slice(self.rank * BATCH // self.world, (self.rank + 1) * BATCH // self.world)
        else:
            part = slice(None)
        x, y = self.x[part], self.y[part]
        losses = []
        for t in range(start, STEPS):
            if t >= 2:
                opt.param_groups[0].update(later or {})

            def closure():
                loss = ((net(x) - y) ** 2).mean()
                loss.backward()
                return loss

            if type(opt).__name__ == "SAM":  # two passes per step: SAM's users pass a closure
                loss = opt.step(closure)
            else:
                opt.zero_grad()
                loss = closure()
                opt.step()
            loss = loss.detach().clone()
            if distributed:  # equal parts: the global batch's loss is the mean
                dist.all_reduce(loss)
                loss /= self.world
            losses.append(float(loss))
            if t == SAVE and save is not None:
                save(model, opt)
        return losses

    def result(self, model, opt, losses: list[float], replayed: set) -> dict:
        params = [p.full_tensor() if _is_dtensor(p) else p.detach() for p in model.parameters()]
        start = [p.detach() for p in self.model().parameters()]
        moved = max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(params, start))
        state = opt.base_optimizer.state if hasattr(opt, "base_optimizer") else opt.state
        # the param-shaped slots (Adafactor's factored statistics and Muon's (0,)
        # placeholders are kept whole: polyopt.torch._sharded)
        slots = sorted({f"{key} {type(v).__name__}" for p, st in state.items()
                        for key, v in st.items()
                        if getattr(v, "ndim", 0) > 0 and v.shape == p.shape})
        return {"losses": losses, "params": [p.tolist() for p in params], "moved": moved,
                "replayed": sorted(replayed), "slots": slots,
                "local_shapes": [list(p.to_local().shape) if _is_dtensor(p) else None
                                 for p in model.parameters()]}

    def run(self, case: dict, setting: str) -> dict:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            get_state_dict,
            set_state_dict,
        )

        from polyopt.torch import _eager, _flat, _sharded

        spec, where = case["optimizer"], self.directory / case["id"]
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        one = setting in ONE_PROCESS
        compiled = setting in ("compiled", "resume-compiled", "single-compiled")

        def checkpointed(opt):
            """SAM's users checkpoint its base optimizer: torch's set_optimizer_state_dict
            creates a fresh optimizer's state by a step without closure, which SAM
            refuses; SAM's own rho and adaptive are its constructor's arguments."""
            return opt.base_optimizer if type(opt).__name__ == "SAM" else opt

        def save_sharded(model, opt):
            opt = checkpointed(opt)
            model_state, opt_state = get_state_dict(model, opt)
            name = {"single": "single", "compiled": "compiled"}.get(setting, "sharded")
            dcp.save({"model": model_state, "optim": opt_state},
                     checkpoint_id=where / name, no_dist=one)
            if setting == "fsdp":  # the full state dicts too, gathered and written by rank 0
                model_state = get_model_state_dict(model, options=full)
                opt_state = get_optimizer_state_dict(model, opt, options=full)
                if self.rank == 0:
                    torch.save({"model": model_state, "optim": opt_state}, where / "full.pt")

        def load(model, opt, checkpoint: str):
            opt = checkpointed(opt)
            if checkpoint == "full.pt":
                state = torch.load(where / checkpoint, weights_only=False)
                options = StateDictOptions(full_state_dict=True)
            else:
                model_state, opt_state = get_state_dict(model, opt)
                state = {"model": model_state, "optim": opt_state}
                dcp.load(state, checkpoint_id=where / checkpoint, no_dist=one)
                options = None
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=options)

        where.mkdir(exist_ok=True)
        model = self.model() if one or setting == "ddp" else self.sharded()
        net = model
        if setting == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(model)
        # "Tensor": the eager replay on local shards; "local": compiled on local
        # shards; "gathered": a per-tensor rule on params gathered whole
        replayed: set = set()
        original_replay, original_local_shards = _eager._Schedule.run, _eager._local
        original_local, original_gathered = _flat.local_step, _sharded.step

        def spy(schedule, program, grads, *rest):
            replayed.update(type(g).__name__ for g in grads)
            return original_replay(schedule, program, grads, *rest)

        def local_spy(*args, **kwargs):
            replayed.add("local")
            return original_local(*args, **kwargs)

        def gathered_spy(*args, **kwargs):
            replayed.add("gathered")
            return original_gathered(*args, **kwargs)

        _eager._Schedule.run, _flat.local_step, _sharded.step = spy, local_spy, gathered_spy
        if setting == "whole":
            _eager._local = lambda *args: None
        try:
            opt = build(spec, model.parameters(), compiled=compiled)
            start, save = 0, None
            resumed = {"resume-sharded": "sharded", "resume-full": "full.pt",
                       "resume-to-one": "sharded", "resume-from-one": "single",
                       "resume-compiled": "compiled"}.get(setting)
            if resumed:
                load(model, opt, resumed)
                start = SAVE + 1
            elif setting in ("single", "fsdp", "compiled"):
                save = save_sharded
            losses = self.train(model, net, opt, start, save, case.get("later", {}))
            return self.result(model, opt, losses, replayed)
        finally:
            _eager._Schedule.run, _eager._local = original_replay, original_local_shards
            _flat.local_step, _sharded.step = original_local, original_gathered

    def all(self, cases: list[dict]) -> dict:
        import torch.distributed as dist

        results: dict = {}
        for case in cases:
            results[case["id"]] = {}
            for setting in case["settings"]:
                outcome = None
                needed = results[case["id"]].get(NEEDS.get(setting))
                if needed is not None and "error" in needed:
                    outcome = {"error": f"not run: {NEEDS[setting]} (its checkpoint) failed"}
                elif self.rank == 0 or setting not in ONE_PROCESS:
                    started = time.monotonic()
                    try:
                        outcome = self.run(case, setting)
                        outcome["seconds"] = time.monotonic() - started
                    except BaseException as e:  # noqa: BLE001 - reported, the others still run
                        if isinstance(e, (KeyboardInterrupt, SystemExit)):
                            raise  # (DCP's CheckpointException is a BaseException)
                        outcome = {"error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()[-3000:]}
                gathered = [None] * self.world
                dist.all_gather_object(gathered, outcome)  # every rank's error is seen
                errors = [o["error"] for o in gathered if o is not None and "error" in o]
                if errors and "error" not in (outcome or {}):
                    outcome = next(o for o in gathered if o is not None and "error" in o)
                results[case["id"]][setting] = outcome
        return results


def _is_dtensor(p) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def _is_sharded(model) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def main(world: int, init: str, jobs: str, out: str, directory: str, rank: int) -> None:
    import torch
    import torch.distributed as dist

    started = time.monotonic()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    worker = _Worker(rank, world, Path(directory))
    results = worker.all(json.loads(Path(jobs).read_text()))
    results["seconds"] = time.monotonic() - started
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in usage)  # rank 0's
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    # no interpreter teardown: a rank once aborted there ("terminate called without an
    # active exception", a native thread destroyed at exit), its work done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
