"""polyopt.optax with params sharded over a 2x2 mesh ("data", "model") of host devices.

One child process (XLA_FLAGS=--xla_force_host_platform_device_count=4, jax
x64) trains every configuration in sequence: a conv + MLP whose leaves are
sharded with NamedSharding along "model" on rows, on columns, on both axes,
or replicated (the dimensions 5 and 3 divide by no mesh axis), the batch
sharded along "data", the jitted step of each optimizer run 5 times on one
device and on the mesh. It reports, per configuration:

- the params and state after the steps, sharded vs one device (float64:
  equal to 1e-12 relative; measured below 1e-15);
- the placement of every state leaf named after a param, after
  ``opt.init(params)`` on the sharded params and after the jitted steps:
  a param-shaped leaf has its param's sharding, Adafactor's factored row
  and column statistics the param's sharding along the axis they keep;
- the collectives in the compiled HLO (``jit(step).lower(...).compile()``),
  each with its operands' bytes per device (a while loop's body counted its
  trip count times): of the whole step and of ``update`` alone, for polyopt
  and for the native optax optimizer under the same mesh. An elementwise
  rule's update compiles to no collective at all (apply_if_finite: one
  all-reduce of its finite flag); only Muon's update gathers (all-gather,
  all-to-all, collective-permute), the others reduce (all-reduce of norms,
  of Adafactor's statistics); against a native with the same math, polyopt
  has no more param-sized gathers (an operand with at least the elements of
  the smallest matrix param's shard) and moves no more bytes.

The default run trains a representative few (adam, Adafactor factored,
Muon, lookahead); the rest is marked ``distributed`` (nox -s distributed).
The numbers measured are in docs/distributed.md.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from polyopt import native
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
RTOL = 1e-12

FACTORIES = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax",
             "nadam", "radam", "lion", "adafactor", "lamb", "lars", "schedule_free_adamw",
             "adopt", "muon", "ranger"]
#: every optax preset, and optax.adafactor with factoring on this model's small
#: matrices (its min_dim_size_to_factor=128 factors none of them)
FACTORED = "preset:optax.adafactor|min_dim_size_to_factor=4"
PRESETS = [f"preset:{k}" for k in native.PRESETS if k.startswith("optax.")] + [FACTORED]
WRAPPERS = ["lookahead[adam]", "sam[adam]", "sam_step[sgd]", "apply_if_finite[adam]"]
MUON = "preset:optax.contrib.muon"
DEFAULT = ["adam", FACTORED, MUON, "lookahead[adam]"]
ALL = FACTORIES + PRESETS + WRAPPERS
REST = [c for c in ALL if c not in DEFAULT]
#: the configurations whose native (compiled beside them) does the same math: the optax
#: presets, adam, optax.lookahead and optax.apply_if_finite around optax.adam. The
#: others are compared with a native of other defaults (polyopt's adafactor factors
#: every matrix, its muon steps the conv kernel too) or with optax.adam (ranger, sam)
SAME_MATH = set(PRESETS) | {"adam", "lookahead[adam]", "apply_if_finite[adam]"}
#: elementwise, but whether every gradient is finite is one flag for all params: an
#: all-reduce of a bool (optax.apply_if_finite's too)
GLOBAL_FLAG = {"apply_if_finite[adam]"}
#: no state array per param (plain SGD)
STATELESS = {"sgd", "preset:optax.sgd"}

_SCRIPT = r'''
import time
import traceback

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import polyopt.optax
from polyopt import native
from tests._hlo import collectives, summary

assert jax.config.jax_enable_x64 and len(jax.devices()) == 4, jax.devices()
STEPS, LR = payload["steps"], 0.01
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
rng = np.random.default_rng(0)
# a conv kernel (kh, kw, in, out), an MLP: leaves sharded on rows, on columns, on
# both axes, replicated; dimensions 5 and 3 are not divisible by the mesh axes
SHAPES = {"conv": (3, 3, 2, 4), "w1": (144, 16), "b1": (16,), "w2": (16, 5), "b2": (5,),
          "w3": (5, 3)}
SPECS = {"conv": P(None, None, None, "model"), "w1": P("data", "model"), "b1": P("model"),
         "w2": P("model", None), "b2": P(), "w3": P()}
params0 = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(np.prod(s[:-1]) if len(s) > 1 else 4))
           for k, s in SHAPES.items()}
x0 = jnp.asarray(rng.normal(size=(8, 6, 6, 2)))
y0 = jnp.asarray(rng.normal(size=(8, 3)))
SHARDINGS = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
BATCH = NamedSharding(mesh, P("data"))


def loss(p, x, y):
    h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h).reshape(x.shape[0], -1)
    h = jnp.tanh(h @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return jnp.mean((h @ p["w3"] - y) ** 2)


def optax_kwargs(factory, options):
    return {factory.spec[k].spelling("optax"): v for k, v in options.items()}


def native_of(key, **extra):
    module, name = key.rsplit(".", 1)
    return getattr(optax.contrib if module == "optax.contrib" else optax, name)(
        learning_rate=LR, **extra)


FACTORIES = ["sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax",
             "nadam", "radam", "lion", "adafactor", "lamb", "lars", "schedule_free_adamw",
             "adopt", "muon", "ranger"]


def build(config):
    """(kind, polyopt transformation, native optax transformation to compare the HLO with)."""
    if config.startswith("preset:"):
        key, _, extra = config[len("preset:"):].partition("|")
        extra = eval(f"dict({extra})")  # noqa: S307 - our own configs
        name, options = native.PRESETS[key]
        factory = getattr(polyopt.optax, name)
        ours = factory(**optax_kwargs(factory, {**options, "learning_rate": LR, **extra}))
        return "plain", ours, native_of(key, **extra)
    if config in FACTORIES:
        nat = getattr(optax, config, None) or getattr(optax.contrib, config, None)
        return "plain", getattr(polyopt.optax, config)(LR), (nat or optax.adam)(LR)
    if config == "lookahead[adam]":
        return ("lookahead", polyopt.optax.lookahead(polyopt.optax.adam(LR), 3, 0.5),
                optax.lookahead(optax.adam(LR), 3, 0.5))
    if config == "sam[adam]":
        return "plain", polyopt.optax.sam(polyopt.optax.adam(LR), rho=0.05), optax.adam(LR)
    if config == "sam_step[sgd]":
        return ("sam_step", polyopt.optax.sam(polyopt.optax.sgd(LR, momentum=0.9), rho=0.05,
                                              opaque_mode=True), optax.sgd(LR, momentum=0.9))
    if config == "apply_if_finite[adam]":
        return ("plain", polyopt.optax.apply_if_finite(polyopt.optax.adam(LR)),
                optax.apply_if_finite(optax.adam(LR), 5))
    raise KeyError(config)


def make_step(kind, opt):
    """The jitted step: (params, state, x, y) -> (params, state, ...)."""
    if kind == "sam_step":
        return polyopt.optax.sam_step(loss, opt, donate=False)

    def step(p, s, x, y):
        g = jax.grad(loss)(p.fast if kind == "lookahead" else p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step)


def start(kind, params):
    return optax.LookaheadParams.init_synced(params) if kind == "lookahead" else params


# --------------------------------------------------------------------------
# the compiled HLO: collectives and their bytes (tests/_hlo.py)

# the smallest shard of a matrix param: w2 (16, 5) split in 2 -> 40 elements
PARAM_ELEMENTS = min(int(np.prod(SHARDINGS[k].shard_shape(s))) for k, s in SHAPES.items()
                     if len(s) >= 2)


# --------------------------------------------------------------------------
# state shardings: each state leaf under a param's name placed like that param

def spec_of(sharding, ndim):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(None if e == () else e for e in spec)


def expected_spec(shape, name):
    """The spec a state array of ``shape`` for param ``name`` should have (None: not
    checked: a placeholder of size 0 or 1)."""
    pshape, pspec = SHAPES[name], spec_of(SHARDINGS[name], len(SHAPES[name]))
    if tuple(shape) == pshape:
        return pspec
    if int(np.prod(shape)) <= 1:
        return None
    from itertools import combinations
    found = {tuple(pspec[a] for a in kept) for kept in combinations(range(len(pshape)), len(shape))
             if tuple(pshape[a] for a in kept) == tuple(shape)}
    assert len(found) == 1, (name, shape)
    return found.pop()


def placement(state):
    """(state leaves checked, [mismatches])."""
    checked, wrong = 0, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if not keys or keys[-1] not in SHAPES or not hasattr(leaf, "sharding"):
            continue
        want = expected_spec(leaf.shape, keys[-1])
        if want is None:
            continue
        checked += 1
        got = (spec_of(leaf.sharding, leaf.ndim)
               if isinstance(leaf.sharding, NamedSharding) else type(leaf.sharding).__name__)
        if got != want:
            wrong.append(f"{jax.tree_util.keystr(path)} {leaf.shape}: {got}, its param "
                         f"{SPECS[keys[-1]]}")
    return checked, wrong


def leaves_of(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree) if hasattr(a, "shape")]


def rel(a, b):
    out = 0.0
    for u, v in zip(a, b):
        if u.size and np.issubdtype(u.dtype, np.floating):
            out = max(out, float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-300)))
    return out


params_sharded = {k: jax.device_put(v, SHARDINGS[k]) for k, v in params0.items()}
xs, ys = jax.device_put(x0, BATCH), jax.device_put(y0, BATCH)
def run(config):
    t0 = time.perf_counter()
    kind, opt, nat = build(config)
    step = make_step(kind, opt)
    # one device
    p = start(kind, params0)
    s = opt.init(p)
    for _ in range(STEPS):
        p, s = step(p, s, x0, y0)[:2]
    single_p, single_s = leaves_of(p), leaves_of(s)
    single_hlo = step.lower(start(kind, params0), opt.init(start(kind, params0)), x0, y0
                            ).compile().as_text()
    # sharded: init eagerly on the sharded params
    p = start(kind, params_sharded)
    s = opt.init(p)
    init_checked, init_wrong = placement(s)
    hlo_step = step.lower(p, s, xs, ys).compile().as_text()
    update_fn = jax.jit(lambda g, s, p: opt.update(g, s, p))
    grads = jax.tree.map(lambda a: a * 0.5, p.fast if kind == "lookahead" else p)
    hlo_update = (None if kind == "sam_step" else
                  update_fn.lower(grads, s, p).compile().as_text())
    for _ in range(STEPS):
        p, s = step(p, s, xs, ys)[:2]
    steps_checked, steps_wrong = placement(s)
    sharded_p, sharded_s = leaves_of(p), leaves_of(s)
    moved = rel(sharded_p, leaves_of(start(kind, params0)))
    # the native under the same mesh
    nkind = "lookahead" if kind == "lookahead" else "plain"
    np_ = start(nkind, params_sharded)
    ns = nat.init(np_)
    native_init = placement(ns)
    nat_step = make_step(nkind, nat)
    nat_hlo_step = nat_step.lower(np_, ns, xs, ys).compile().as_text()
    for _ in range(STEPS):
        np_, ns = nat_step(np_, ns, xs, ys)
    native_steps = placement(ns)
    nat_hlo_update = jax.jit(lambda g, s, p: nat.update(g, s, p)).lower(
        jax.tree.map(lambda a: a * 0.5, np_.fast if nkind == "lookahead" else np_), ns, np_
    ).compile().as_text()
    rule = getattr(opt.init, "polyopt_rule", None)
    return {
        "params_rel": rel(sharded_p, single_p), "state_rel": rel(sharded_s, single_s),
        "moved": moved, "init": [init_checked, init_wrong], "steps": [steps_checked, steps_wrong],
        "native_init": native_init, "native_steps": native_steps,
        "elementwise": getattr(rule, "elementwise", None),
        "single_step": summary(collectives(single_hlo), PARAM_ELEMENTS),
        "step": summary(collectives(hlo_step), PARAM_ELEMENTS),
        "update": None if hlo_update is None else summary(collectives(hlo_update), PARAM_ELEMENTS),
        "native_step": summary(collectives(nat_hlo_step), PARAM_ELEMENTS),
        "native_update": summary(collectives(nat_hlo_update), PARAM_ELEMENTS),
        "seconds": time.perf_counter() - t0,
    }


def same_placement_at_init():
    """Adafactor's statistics of params whose axes have equal sizes (which axes a
    statistic keeps is not told by its shape): after init placed as XLA places them
    after a jitted step (and as it places optax.adafactor's). Returns the differences."""
    params = {"square": jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("model", None))),
              "cube": jax.device_put(jnp.ones((4, 4, 4)),
                                     NamedSharding(mesh, P(None, "data", "model")))}
    out = []
    for factoring in ("layout", "largest_two", "last_two"):
        opt = polyopt.optax.adafactor(LR, factoring=factoring, min_dim_size_to_factor=4)
        state = opt.init(params)

        def step(p, s):
            u, s = opt.update(p, s, p)
            return optax.apply_updates(p, u), s

        after = jax.jit(step)(params, state)[1]
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                jax.tree.leaves(after)):
            if a.size > 1 and spec_of(a.sharding, a.ndim) != spec_of(b.sharding, b.ndim):
                out.append(f"{factoring} {jax.tree_util.keystr(path)} {a.shape}: init "
                           f"{a.sharding.spec}, after a step {b.sharding.spec}")
    return out


result = {}
if payload.get("equal_sizes"):
    result["equal_sizes"] = same_placement_at_init()
for config in payload["configs"]:
    try:
        result[config] = run(config)
    except Exception:  # reported by this config's test; the others still run
        result[config] = {"error": traceback.format_exc()[-3000:]}
'''


@functools.cache
def _results(configs: tuple) -> dict:
    return run_python(_SCRIPT, {"steps": STEPS, "configs": list(configs),
                                "equal_sizes": configs == tuple(DEFAULT)},
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                           "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
                           "PYTHONPATH": os.pathsep.join(  # the child imports tests._hlo
                               [str(ROOT), os.environ.get("PYTHONPATH", "")])},
                      timeout=1800)


def _result(config: str) -> dict:
    out = _results(tuple(DEFAULT) if config in DEFAULT else tuple(REST))[config]
    assert "error" not in out, out.get("error")
    return out


def _check(config: str) -> None:
    out = _result(config)
    print(f"{config}: params {out['params_rel']:.1e}, state {out['state_rel']:.1e} relative "
          f"to one device; update moves {out['update'] and out['update']['bytes']} B/step "
          f"(native {out['native_update']['bytes']}), the whole step {out['step']['bytes']} "
          f"(native {out['native_step']['bytes']}, one device "
          f"{out['single_step']['bytes']}); {out['seconds']:.1f} s; native's state leaves "
          f"not placed like their params after init: {out['native_init'][1]}, after the "
          f"steps: {out['native_steps'][1]}")
    assert out["moved"] > 1e-4  # the steps changed the params (LARS least: 1.8e-4)
    # numbers: the mesh gives one device's
    assert out["params_rel"] <= RTOL and out["state_rel"] <= RTOL
    # placement: every state leaf of a param like that param, after init and after steps
    assert out["init"][0] == out["steps"][0]  # the same leaves checked
    assert out["init"][0] > 0 or config in STATELESS
    for when in ("init", "steps"):
        assert not out[when][1], (when, out[when][1])
    # communication: one device none; an elementwise update none; only Muon gathers
    # param-sized arrays; against the native with the same math, no more gathers or bytes
    assert out["single_step"]["count"] == 0
    for what in ("step", "update", "native_step", "native_update"):
        assert out[what] is None or out[what]["unknown_trips"] == 0, what
    if out["elementwise"] and config not in GLOBAL_FLAG:
        assert out["update"]["count"] == 0, out["update"]
    if out["update"] is not None and config not in ("muon", MUON):
        assert not set(out["update"]["ops"]) - {"all-reduce"}, out["update"]
    if config in SAME_MATH:
        if out["update"] is not None:
            assert out["update"]["param_gathers"] <= out["native_update"]["param_gathers"]
            assert out["update"]["bytes"] <= out["native_update"]["bytes"], out
        assert out["step"]["param_gathers"] <= out["native_step"]["param_gathers"], out
        assert out["step"]["bytes"] <= out["native_step"]["bytes"], out


@pytest.mark.needs("jax")
@pytest.mark.parametrize("config", DEFAULT)
def test_sharded_mesh_matches_one_device(config):
    _check(config)


@pytest.mark.needs("jax")
def test_factored_statistics_of_equal_sized_axes_placed_at_init():
    wrong = _results(tuple(DEFAULT))["equal_sizes"]
    assert not wrong, wrong


@pytest.mark.distributed
@pytest.mark.needs("jax")
@pytest.mark.parametrize("config", REST)
def test_sharded_mesh_matches_one_device_every_optimizer(config):
    _check(config)


@pytest.mark.needs("jax")
def test_the_matrix_covers_every_factory_and_optax_preset():
    import polyopt.optax

    factories = {n for n in polyopt.optax.__all__ if getattr(getattr(polyopt.optax, n), "spec",
                                                               None) is not None}
    assert factories == set(FACTORIES)
    assert {c.split("|")[0] for c in PRESETS} == {
        f"preset:{k}" for k in native.PRESETS if k.startswith("optax.")}
    assert set(DEFAULT) <= set(ALL)
