"""polyopt.keras under Keras's distribution machinery, in child processes.

TensorFlow backend: ``tf.distribute.MirroredStrategy`` with two logical CPU
devices (configured before TensorFlow initialises). Two replicas with the
global batch split between them must train like one device with the same
global batch.

JAX backend: the Keras distribution API (``keras.distribution``) over four
host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set
before jax is imported), float64. One child process trains a conv + MLP with
``model.fit`` (5 steps) for each configuration: every polyopt.keras class,
every Keras preset of ``polyopt.native.PRESETS``, the wrappers (Lookahead,
SkipNonFinite, SAMModel), and keras.optimizers.Muon and Adafactor; each
without a distribution, under ``DataParallel`` (4 devices) and under
``ModelParallel`` (a 2x2 mesh ("batch", "model") whose ``LayoutMap`` shards
the kernels on "model": the conv's output channels, d1's columns and bias,
d2's rows; the natives without a distribution and under ModelParallel only).
It reports, per configuration:

- the weights and every optimizer variable after fit, distributed vs not
  (float64: equal to 1e-12 relative; measured at most 2.3e-15 for the
  weights, 1.7e-14 for the state);
- the sharding of every optimizer variable (``v.value.sharding``) against
  its param's: a param-shaped one has the param's, a factored statistic
  (Adafactor's row and column means) the param's along the axes it keeps,
  scalars, empty placeholders and the rule's global state replicated;
- the collectives of the update as Keras's JAX trainer compiles it
  (``optimizer.stateless_apply`` jitted with its outputs pinned to the
  variables' shardings), counted by tests/_hlo.py: an elementwise rule's
  update has none; only Muon gathers; against keras.optimizers.Muon and
  Adafactor under the same distribution, polyopt moves no more elements, in
  the update and in the whole train step.

The default run trains a representative few (the Keras Adafactor and Muon
presets, and the two natives for the bytes); the rest is marked
``distributed`` (nox -s distributed). The numbers are in docs/distributed.md.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from polyopt import native
from tests._native import run_python

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
import keras
import polyopt.keras as pk

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 6)).astype(np.float32)
y = np.tanh(x @ rng.normal(size=(6, 2))).astype(np.float32)
makers = {
    "Adam": lambda: pk.Adam(learning_rate=0.01),
    "Nadam": lambda: pk.Nadam(learning_rate=0.01),
    "Lookahead": lambda: pk.Lookahead(pk.RAdam(learning_rate=0.01), sync_period=3),
    "SGD": lambda: pk.SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.01),
}

def train(name, strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=makers[name](), loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return [w.tolist() for w in model.get_weights()], int(model.optimizer.iterations.numpy())

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = {"replicas": mirrored.num_replicas_in_sync}
for name in payload:
    result[name] = {"one": train(name, tf.distribute.get_strategy()),
                    "two": train(name, mirrored)}
"""

NAMES = ["Adam", "Nadam", "Lookahead", "SGD"]


@pytest.mark.parametrize("name", NAMES)
def test_per_variable_path_matches_whole_list(name):
    """What tf.distribute uses on every replica (update_step once per variable, scalar
    state written by the last call) gives the numbers of the whole-list update.
    Runs on every backend (nox selects this module by collecting it on JAX)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    import polyopt.keras as pk

    makers = {"Adam": lambda: pk.Adam(learning_rate=0.01),
              "Nadam": lambda: pk.Nadam(learning_rate=0.01),
              "Lookahead": lambda: pk.Lookahead(pk.RAdam(learning_rate=0.01), sync_period=3),
              "SGD": lambda: pk.SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.01)}
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2,), (2, 2)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(8)]
    results = []
    for per_variable in (False, True):
        opt = makers[name]()
        if per_variable:  # Keras' own loop: update_step(grad, var) for each variable
            opt._backend_update_step = lambda g, v, lr, opt=opt: \
                BaseOptimizer._backend_update_step(opt, g, v, lr)
        variables = [keras.Variable(a) for a in start]
        for g in grads:
            opt.apply_gradients(zip([keras.ops.convert_to_tensor(a) for a in g], variables))
        results.append([keras.ops.convert_to_numpy(v) for v in variables])
    for a, b, s in zip(*results, start):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        assert np.max(np.abs(a - s)) > 1e-3


if keras.backend.backend() == "tensorflow":

    @pytest.fixture(scope="module")
    def runs():
        env = {"KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        return run_python(SCRIPT, NAMES, env=env, timeout=600)

    @pytest.mark.parametrize("name", NAMES)
    def test_mirrored_strategy_matches_one_device(runs, name):
        assert runs["replicas"] == 2
        (one, steps_one), (two, steps_two) = runs[name]["one"], runs[name]["two"]
        assert steps_one == steps_two == 16
        for a, b in zip(one, two):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------
# JAX backend: keras.distribution over four host devices

LR = 0.01
RTOL = 1e-12
#: every polyopt.keras optimizer class (the wrappers around an inner optimizer below)
CLASSES = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam", "RAdam",
           "Lion", "Adafactor", "Lamb", "Lars", "ScheduleFreeAdamW", "ADOPT", "Muon", "Ranger"]
KERAS_PRESETS = [f"preset:{k}" for k in native.PRESETS if k.startswith("keras.optimizers.")]
WRAPPERS = ["Lookahead[Adam]", "Lookahead[Adafactor]", "SkipNonFinite[Adam]", "SAMModel[Adam]"]
MUON, ADAFACTOR = "preset:keras.optimizers.Muon", "preset:keras.optimizers.Adafactor"
#: the natives whose compiled update polyopt's is compared with
NATIVES = {MUON: "native:keras.optimizers.Muon", ADAFACTOR: "native:keras.optimizers.Adafactor"}
DEFAULT = [ADAFACTOR, MUON, *NATIVES.values()]
ALL = CLASSES + KERAS_PRESETS + WRAPPERS
REST = [c for c in ALL if c not in DEFAULT]
#: elementwise, but whether every gradient is finite is one flag for all variables
GLOBAL_FLAG = {"SkipNonFinite[Adam]"}
#: Muon steps take the whole matrix: XLA gathers a sharded kernel
GATHERING = {"Muon", MUON}

_JAX_SCRIPT = r"""
import time
import traceback
from itertools import combinations

import jax
import keras
from keras import distribution as kd

import polyopt.keras as pk
from polyopt import native
from tests._hlo import collectives, summary

keras.config.set_floatx("float64")
assert jax.config.jax_enable_x64 and len(jax.devices()) == 4, jax.devices()
LR = payload["lr"]
DEVICES = jax.devices()
MESH = kd.DeviceMesh((2, 2), ["batch", "model"], DEVICES)
# kernels sharded on "model": the conv's output channels, d1's columns (and its bias),
# d2's rows; d3 (8, 3) replicated (3 is not divisible)
LAYOUTS = {"conv/kernel": (None, None, None, "model"), "d1/kernel": (None, "model"),
           "d1/bias": ("model",), "d2/kernel": ("model", None)}


def model_parallel():
    layout_map = kd.LayoutMap(MESH)
    for path, axes in LAYOUTS.items():
        layout_map[f".*{path}"] = axes
    return kd.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


DISTRIBUTIONS = {"data": lambda: kd.DataParallel(devices=DEVICES), "model": model_parallel}
rng = np.random.default_rng(0)
X = rng.normal(size=(80, 6, 6, 2))
Y = rng.normal(size=(80, 3))


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv"),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="tanh", name="d1"),
        keras.layers.Dense(8, activation="tanh", name="d2"), keras.layers.Dense(3, name="d3")])


W0 = make_model().get_weights()
CLASSES = {c.spec.name: c for c in vars(pk).values()
           if isinstance(c, type) and issubclass(c, pk.RuleOptimizer) and "spec" in c.__dict__}


def optimizer(config):
    # (the optimizer, whether it is polyopt's, SAM's rho or None)
    if config.startswith("native:"):
        name = config[len("native:keras.optimizers."):]
        return getattr(keras.optimizers, name)(learning_rate=LR), False, None
    if config.startswith("preset:"):
        name, options = native.PRESETS[config[len("preset:"):]]
        cls = CLASSES[name]
        spelled = {cls.spec[k].spelling("keras"): v for k, v in options.items()}
        return cls(**{**spelled, "learning_rate": LR}), True, None
    wrapper, _, inner = config.partition("[")
    if not inner:
        return getattr(pk, config)(learning_rate=LR), True, None
    inner = getattr(pk, inner.rstrip("]"))(learning_rate=LR)
    if wrapper == "SAMModel":
        return inner, True, 0.05
    if wrapper == "Lookahead":  # synced once within the 5 steps
        return pk.Lookahead(inner, sync_period=3), True, None
    return getattr(pk, wrapper)(inner), True, None


def spec_of(variable):
    spec = tuple(getattr(variable.value.sharding, "spec", ()))
    spec = spec + (None,) * (len(variable.shape) - len(spec))
    return tuple(None if e == () else e for e in spec)


def expected_spec(shape, param):
    # where a state variable of ``shape`` for ``param`` belongs: the param's spec; for
    # a smaller array, the param's spec on the only axes whose sizes it has;
    # replicated for scalars and empty placeholders
    pshape, pspec = tuple(param.shape), spec_of(param)
    if shape == pshape:
        return pspec
    if int(np.prod(shape)) <= 1:
        return (None,) * len(shape)
    found = {tuple(pspec[a] for a in kept) for kept in combinations(range(len(pshape)), len(shape))
             if tuple(pshape[a] for a in kept) == shape}
    assert len(found) == 1, (shape, pshape)
    return found.pop()


def placement(opt):
    # every optimizer variable's sharding against its param's: [checked, factored
    # statistics sharded along a kept axis, mismatches]
    params = list(opt._trainable_variables)
    owner = {id(v): params[i] for slot in opt._slot_variables for i, v in enumerate(slot)}
    checked, factored, wrong = 0, 0, []
    for v in opt.variables:
        param = owner.get(id(v))
        # iterations, the learning rate, the rule's global state: replicated
        want = (None,) * len(v.shape) if param is None else expected_spec(tuple(v.shape), param)
        factored += param is not None and tuple(v.shape) != tuple(param.shape) and any(want)
        checked += 1
        if spec_of(v) != want:
            wrong.append(f"{v.path} {tuple(v.shape)}: {spec_of(v)}, expected {want}")
    return [checked, int(factored), wrong]


def update_collectives(model, opt):
    # the collectives of the update as Keras's JAX trainer compiles it (stateless_apply,
    # outputs pinned to the variables' shardings, as its jit pins them)
    params = [v.value for v in model.trainable_variables]
    state = [v.value for v in opt.variables]
    fn = jax.jit(lambda s, g, p: opt.stateless_apply(s, g, p),
                 out_shardings=([p.sharding for p in params], [s.sharding for s in state]))
    found = collectives(fn.lower(state, [p * 0.5 for p in params], params).compile().as_text())
    # param-sized: at least the smallest shard of a sharded kernel, d2's (8, 8)
    out = summary(found, 64)
    out["elements"] = sum(sum(counts) * max(times, 1) for _, _, counts, times in found)
    out["each"] = [f"{op} {counts} {size} B x{times}" for op, size, counts, times in found]
    return out


def step_collectives(model, opt):
    # the collectives of the whole train step (forward, backward, update) as Keras's JAX
    # trainer jits it, for the first batch laid out by the distribution
    state = tuple([v.value for v in vs] for vs in (
        model.trainable_variables, model.non_trainable_variables, opt.variables,
        model.metrics_variables))
    layout = kd.distribution().get_data_layout
    data = tuple(jax.device_put(a[:16], layout(a[:16].shape).backend_layout) for a in (X, Y))
    fn = jax.jit(model.train_step, out_shardings=(None, model._get_state_sharding_spec()))
    found = collectives(fn.lower(state, data).compile().as_text())
    out = summary(found, 64)
    out["elements"] = sum(sum(counts) * max(times, 1) for _, _, counts, times in found)
    return out


def train(config, how):
    if how != "none":
        kd.set_distribution(DISTRIBUTIONS[how]())
    try:
        opt, ours, rho = optimizer(config)
        model = make_model()
        model.set_weights(W0)
        fitted = model if rho is None else pk.SAMModel(model, rho=rho)
        fitted.compile(optimizer=opt, loss="mse")
        fitted.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        out = {"weights": model.get_weights(), "steps": int(opt.iterations.numpy()),
               "state": [np.asarray(v.value) for v in opt.variables]}
        if how != "none":
            out["shardings"] = {v.path: str(spec_of(v)) for v in opt.variables}
            out["placement"] = placement(opt) if ours else None
        if how == "model":
            out["update"] = update_collectives(model, opt)
            if payload["whole_step"] and rho is None:
                out["step"] = step_collectives(model, opt)
            out["elementwise"] = bool(opt.make_rule(LR).elementwise) if ours else None
        return out
    finally:
        kd.set_distribution(None)


def rel(a, b):
    # max over arrays of max|a - b| / max|b|; integers equal or inf
    out = 0.0
    for u, v in zip(a, b):
        u, v = np.asarray(u), np.asarray(v)
        if not np.issubdtype(u.dtype, np.floating):
            out = max(out, 0.0 if np.array_equal(u, v) else np.inf)
        elif u.size and np.any(u != v):
            out = max(out, float(np.max(np.abs(u - v)) / np.max(np.abs(v))))
    return out


def backend_layout():
    # a variable laid out with a JAX NamedSharding (Keras takes backend layouts too):
    # Adafactor's statistics of it, {path: spec}
    kd.set_distribution(model_parallel())
    try:
        sharding = jax.sharding.NamedSharding(MESH.backend_mesh,
                                              jax.sharding.PartitionSpec("model", None))
        w = keras.Variable(np.ones((16, 8)), layout=sharding, name="w")
        opt = pk.Adafactor(learning_rate=LR, factoring="last_two")
        opt.build([w])
        return {v.path.split("/")[-1]: list(spec_of(v)) for v in opt.variables}
    finally:
        kd.set_distribution(None)


result = {"backend_layout": backend_layout()} if payload.get("backend_layout") else {}
for config in payload["configs"]:
    t0 = time.perf_counter()
    try:
        hows = ("none", "model") if config.startswith("native:") else ("none", "data", "model")
        runs = {how: train(config, how) for how in hows}
        one = runs.pop("none")
        result[config] = {
            "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(one["weights"], W0)),
            "steps": [one["steps"]] + [r["steps"] for r in runs.values()],
            "weights": {how: rel(r["weights"], one["weights"]) for how, r in runs.items()},
            "state": {how: rel(r["state"], one["state"]) for how, r in runs.items()},
            "placement": {how: r["placement"] for how, r in runs.items()},
            "shardings": runs["model"]["shardings"], "update": runs["model"]["update"],
            "step": runs["model"].get("step"),
            "elementwise": runs["model"]["elementwise"], "seconds": time.perf_counter() - t0}
    except Exception:  # reported by this configuration's test; the others still run
        result[config] = {"error": traceback.format_exc()[-3000:]}
"""


@functools.cache
def _jax_results(configs: tuple) -> dict:
    env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    payload = {"configs": list(configs), "lr": LR, "backend_layout": configs == tuple(DEFAULT),
               "whole_step": configs == tuple(DEFAULT)}
    return run_python(_JAX_SCRIPT, payload, env=env, timeout=1800)


def _jax_result(config: str) -> dict:
    out = _jax_results(tuple(DEFAULT) if config in DEFAULT else tuple(REST))[config]
    assert "error" not in out, out.get("error")
    return out


def _check_distribution(config: str) -> None:
    out = _jax_result(config)
    update = out["update"]
    print(f"\n{config}: weights {out['weights']}, state {out['state']} relative to no "
          f"distribution; update under ModelParallel: {update['bytes']} B, "
          f"{update['elements']} elements, {update['count']} collectives {update['ops']}; "
          f"placement {out['placement']}; {out['seconds']:.1f} s")
    assert out["steps"] == [5, 5, 5]
    assert out["moved"] > 1e-4  # the steps changed the weights
    for how in ("data", "model"):
        assert out["weights"][how] <= RTOL and out["state"][how] <= RTOL, out
        checked, factored, wrong = out["placement"][how]
        assert checked == len(out["shardings"]) and not wrong, wrong
        # Adafactor's factored statistics of the sharded kernels keep a sharded axis
        assert (factored > 0) == ("Adafactor" in config and how == "model"), factored
    assert update["unknown_trips"] == 0
    if out["elementwise"] and config not in GLOBAL_FLAG:
        assert update["count"] == 0, update  # every variable updated where it lives
    if config not in GATHERING:
        assert set(update["ops"]) <= {"all-reduce"}, update  # norms, means: never a gather
        assert update["param_gathers"] == 0


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX backend")
@pytest.mark.parametrize("config", [c for c in DEFAULT if c not in NATIVES.values()])
def test_keras_distribution_matches_one_device(config):
    _check_distribution(config)


@pytest.mark.distributed
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX backend")
@pytest.mark.parametrize("config", REST)
def test_keras_distribution_matches_one_device_every_optimizer(config):
    _check_distribution(config)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX backend")
@pytest.mark.parametrize("config", list(NATIVES))
def test_update_moves_no_more_than_keras_native(config):
    """Muon: the same program as keras.optimizers.Muon (XLA gathers the sharded
    kernels for Newton-Schulz); Adafactor: all-reduces of the statistics only, no
    gather (keras.optimizers.Adafactor keeps its statistics replicated and gathers
    them). Compared in elements: Keras computes its means in float32 (its ops.mean
    on JAX promotes float64 with float32 to float32), so its bytes are not float64's."""
    ours, theirs = _jax_result(config), _jax_result(NATIVES[config])
    print(f"\n{config}: {ours['update']['bytes']} B, {ours['update']['elements']} elements "
          f"({ours['update']['each']}); {NATIVES[config]}: {theirs['update']['bytes']} B, "
          f"{theirs['update']['elements']} elements ({theirs['update']['each']}); the native "
          f"distributed vs not: weights {theirs['weights']}")
    print(f"the whole train step: {ours['step']['bytes']} B, {ours['step']['elements']} "
          f"elements; the native's {theirs['step']['bytes']} B, {theirs['step']['elements']}")
    for what in ("update", "step"):
        assert ours[what]["elements"] <= theirs[what]["elements"], what
        assert ours[what]["param_gathers"] <= theirs[what]["param_gathers"], what
    # the forward and backward are the model's: the same collectives whatever the optimizer
    assert (ours["step"]["elements"] - ours["update"]["elements"]
            == theirs["step"]["elements"] - theirs["update"]["elements"])
    if config == MUON:
        assert ours["update"]["param_gathers"] > 0  # the whole matrix, as the native's


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX backend")
def test_statistics_of_a_variable_laid_out_with_a_jax_sharding():
    """A (16, 8) variable on NamedSharding(mesh, P("model", None)): its (16,)
    statistic on "model", its (8,) one replicated, the placeholder replicated."""
    assert _jax_results(tuple(DEFAULT))["backend_layout"] == {
        "iteration": [], "learning_rate": [], "w_v_row": ["model"], "w_v_col": [None],
        "w_v": [None]}


def test_the_jax_matrix_covers_every_optimizer_and_keras_preset():
    import polyopt.keras as pk

    classes = {n for n in pk.__all__ if isinstance(getattr(pk, n), type)
               and issubclass(getattr(pk, n), pk.RuleOptimizer) and n != "RuleOptimizer"}
    wrapped = {c.split("[")[0] for c in WRAPPERS} | {c.split("[")[1].rstrip("]") for c in WRAPPERS}
    assert classes == set(CLASSES) | (wrapped - {"SAMModel"})
    assert set(KERAS_PRESETS) == {f"preset:{k}" for k in native.PRESETS
                                  if k.startswith("keras.optimizers.")}
    assert set(DEFAULT) - set(NATIVES.values()) <= set(ALL)
