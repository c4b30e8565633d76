"""polyopt.keras state transfer: Keras <-> torch/JAX state files, native keras Adam import.

Runs once per Keras backend. torch and JAX (polyopt.optax) run in child
processes (tests/_native.py: never torch next to Keras-TensorFlow): each
trains N steps, exports its state, and trains N more steps uninterrupted;
Keras imports the file at step N and continues. The continuation must match
the source's uninterrupted run (float64, <= 1e-10 relative); Keras -> Keras is
bitwise.

The model is ``mean((x @ weight.T + bias - y) ** 2)`` with variables named
``weight`` (3, 4) and ``bias`` (3,) in all three frameworks (torch Linear's
names and layout); Keras' gradients are the analytic ones, in numpy.
float64 with a learning rate exact in float32 (Keras keeps it in a float32
variable; see tests/test_keras_parity.py).
"""

from __future__ import annotations

import base64
import io
import zipfile

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt import native
from polyopt.interop import StateFileError
from polyopt.keras import interop
from tests._native import run_python

BACKEND = keras.backend.backend()
N = 5
RTOL = 1e-10
LR = 2.0 ** -5

# name: (torch class, torch kwargs, optax factory, optax kwargs, keras factory)
CASES = {
    "adam": ("Adam", {"lr": LR}, "adam", {"learning_rate": LR},
             lambda: pk.Adam(learning_rate=LR)),
    "amsgrad": ("Adam", {"lr": LR, "amsgrad": True}, "adam", {"learning_rate": LR, "amsgrad": True},
                lambda: pk.Adam(learning_rate=LR, amsgrad=True)),
    "sgd": ("SGD", {"lr": LR, "momentum": 0.9, "nesterov": True}, "sgd",
            {"learning_rate": LR, "momentum": 0.9, "nesterov": True},
            lambda: pk.SGD(learning_rate=LR, momentum=0.9, nesterov=True)),
    "nadam": ("NAdam", {"lr": LR}, "nadam", {"learning_rate": LR},
              lambda: pk.Nadam(learning_rate=LR)),
    "rmsprop": ("RMSprop", {"lr": LR, "momentum": 0.5, "centered": True}, "rmsprop",
                {"learning_rate": LR, "momentum": 0.5, "centered": True},
                lambda: pk.RMSprop(learning_rate=LR, momentum=0.5, centered=True)),
    "ranger": ("Ranger", {"lr": LR, "k": 3, "gradient_centralization": False}, "ranger",
               {"learning_rate": LR, "sync_period": 3, "gradient_centralization": False},
               lambda: pk.Ranger(learning_rate=LR, sync_period=3, gradient_centralization=False)),
    # lr_scale 'rms' is symmetric in rows and columns: the (3, 4) weight is (out, in) in
    # torch's layout and (in, out) in Keras's, the same orthogonalized matrix either way
    "muon": ("Muon", {"lr": LR, "adjust_lr_fn": "match_rms_adamw", "adam_learning_rate": LR},
             "muon",
             {"learning_rate": LR, "lr_scale": "rms", "adam_learning_rate": LR},
             lambda: pk.Muon(learning_rate=LR, lr_scale="rms", adam_learning_rate=LR)),
}


def _data():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=3),
            "x": rng.normal(size=(8, 4)), "y": rng.normal(size=(8, 3))}


def _grads(data, w, b):
    r = data["x"] @ w.T + b - data["y"]
    scale = 2.0 / r.size
    return [scale * r.T @ data["x"], scale * r.sum(axis=0)]


def _variables(w, b):
    return [keras.Variable(np.asarray(w, "float64"), dtype="float64", name="weight"),
            keras.Variable(np.asarray(b, "float64"), dtype="float64", name="bias")]


def _train(opt, variables, data, steps):
    for _ in range(steps):
        w, b = (keras.ops.convert_to_numpy(v) for v in variables)
        opt.apply_gradients(zip(_grads(data, w, b), variables))


def _values(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


_SOURCE_SCRIPT = """
import io, base64
d = {k: np.asarray(v) for k, v in payload["data"].items()}
result = {}
if payload["framework"] == "torch":
    import torch
    import polyopt.torch
    x, y = torch.tensor(d["x"]), torch.tensor(d["y"])
    for name, (cls, kwargs) in payload["cases"].items():
        model = torch.nn.Linear(4, 3).double()
        with torch.no_grad():
            model.weight.copy_(torch.tensor(d["w"]))
            model.bias.copy_(torch.tensor(d["b"]))
        opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
        def train():
            for _ in range(payload["n"]):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
        train()
        buffer = io.BytesIO()
        opt.export_state(buffer, names=model)
        mid = [model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()]
        train()
        result[name] = {"file": base64.b64encode(buffer.getvalue()).decode(), "mid": mid,
                        "end": [model.weight.detach().numpy(), model.bias.detach().numpy()]}
else:
    import jax, jax.numpy as jnp, optax
    jax.config.update("jax_enable_x64", True)
    import polyopt.optax
    from polyopt.optax import interop

    def loss(p):
        return jnp.mean((d["x"] @ p["weight"].T + p["bias"] - d["y"]) ** 2)

    def run(opt, params, state):
        for _ in range(payload["n"]):
            u, state = opt.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, u)
        return params, state

    for name, (factory, kwargs) in payload["cases"].items():
        opt = getattr(polyopt.optax, factory)(**kwargs)
        p0 = {"weight": jnp.asarray(d["w"]), "bias": jnp.asarray(d["b"])}
        mid, state = run(opt, p0, opt.init(p0))
        buffer = io.BytesIO()
        interop.export_state(buffer, opt, state, mid)
        end, _ = run(opt, mid, state)
        result[name] = {"file": base64.b64encode(buffer.getvalue()).decode(),
                        "mid": [np.asarray(mid["weight"]), np.asarray(mid["bias"])],
                        "end": [np.asarray(end["weight"]), np.asarray(end["bias"])]}
"""


@pytest.fixture(scope="module", params=["torch", "jax"])
def source(request):
    """The source framework's runs (child process): state files at N, params at N and 2N."""
    index = 0 if request.param == "torch" else 2
    cases = {k: (c[index], c[index + 1]) for k, c in CASES.items()}
    payload = {"framework": request.param, "n": N, "cases": cases,
               "data": {k: v.tolist() for k, v in _data().items()}}
    return request.param, run_python(_SOURCE_SCRIPT, payload, env={"JAX_ENABLE_X64": "1"})


@pytest.mark.parametrize("name", CASES)
def test_torch_and_jax_to_keras_continue_the_source_run(source, name):
    framework, out = source
    data = _data()
    variables = _variables(*out[name]["mid"])
    opt = CASES[name][4]()
    header = opt.import_state(io.BytesIO(base64.b64decode(out[name]["file"])), variables)
    assert header["framework"] == framework
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == N
    _train(opt, variables, data, N)
    gap = max(_rel(a, e) for a, e in zip(_values(variables), out[name]["end"]))
    moved = max(_rel(a, m) for a, m in zip(out[name]["end"], out[name]["mid"]))
    print(f"TRANSFER {framework}->keras-{BACKEND} {name} float64 {gap:.3e}")
    assert moved > 1e-3
    assert gap <= RTOL, f"{framework} -> Keras {name}: {gap:.3e}"


@pytest.mark.parametrize("make", [
    lambda: pk.Adam(learning_rate=LR, amsgrad=True),
    lambda: pk.Lookahead(pk.RAdam(learning_rate=LR), sync_period=3),
    lambda: pk.Nadam(learning_rate=LR),
    lambda: pk.AdamW(learning_rate=LR, weight_decay=0.1),
], ids=["amsgrad", "lookahead", "nadam", "adamw"])
def test_keras_to_keras_resumes_bitwise(make):
    data = _data()
    variables = _variables(data["w"], data["b"])
    opt = make()
    _train(opt, variables, data, N)
    buffer = io.BytesIO()
    opt.export_state(buffer, variables)
    mid = _values(variables)
    _train(opt, variables, data, N)
    again = _variables(*mid)[::-1]  # another order: matched by name
    fresh = make()
    fresh.import_state(io.BytesIO(buffer.getvalue()), again)
    _train(fresh, again[::-1], data, N)
    for a, b in zip(_values(variables), _values(again[::-1])):
        assert np.array_equal(a, b)


def test_model_names_are_paths_relative_to_the_model():
    def model():
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
        m.build((None, 4))
        return m

    first, second = model(), model()  # sequential, sequential_1: names still agree
    opt = pk.Adam(learning_rate=LR)
    opt.build(first.trainable_variables)
    buffer = io.BytesIO()
    opt.export_state(buffer, first)
    fresh = pk.Adam(learning_rate=LR)
    header = fresh.import_state(io.BytesIO(buffer.getvalue()), second)
    assert [p["name"] for p in header["params"]] == ["dense.kernel", "dense.bias"]
    assert fresh.built


def _saved(make=lambda: pk.Adam(learning_rate=LR)):
    data = _data()
    variables = _variables(data["w"], data["b"])
    opt = make()
    _train(opt, variables, data, 2)
    buffer = io.BytesIO()
    opt.export_state(buffer, variables)
    return buffer.getvalue(), data


def _snapshot(opt):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in opt.variables]


@pytest.mark.parametrize(("make", "variables", "match"), [
    (lambda: pk.RAdam(learning_rate=LR), None, "holds a 'adam' state"),
    (lambda: pk.Adam(learning_rate=LR, amsgrad=True), None, "layouts differ"),
    (lambda: pk.Adam(learning_rate=LR), lambda d: _variables(d["w"], d["b"])[:1],
     "missing|only in"),
    (lambda: pk.Adam(learning_rate=LR),
     lambda d: _variables(d["w"], d["b"]) + [keras.Variable(np.zeros(2), name="extra")],
     "missing from the file"),
    (lambda: pk.Adam(learning_rate=LR), lambda d: _variables(d["w"].T, d["b"]), "other shapes"),
], ids=["algorithm", "amsgrad", "missing", "extra", "reshaped"])
def test_mismatched_state_file_is_refused_and_changes_nothing(make, variables, match):
    blob, data = _saved()
    target = variables(data) if variables else _variables(data["w"], data["b"])
    opt = make()
    opt.apply_gradients(zip([np.full(tuple(v.shape), 0.5) for v in target], target))
    before = _snapshot(opt)
    with pytest.raises(StateFileError, match=match):
        opt.import_state(io.BytesIO(blob), target)
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(opt)))
    # an unbuilt optimizer stays unbuilt
    unbuilt = make()
    with pytest.raises(StateFileError, match=match):
        unbuilt.import_state(io.BytesIO(blob), target)
    assert not unbuilt.built


def test_truncated_state_file_is_refused():
    blob, data = _saved()
    variables = _variables(data["w"], data["b"])
    opt = pk.Adam(learning_rate=LR)
    _train(opt, variables, data, 1)
    before = _snapshot(opt)
    with pytest.raises(StateFileError, match="not a readable"):
        opt.import_state(io.BytesIO(blob[: len(blob) // 2]), variables)
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(opt)))


def test_export_needs_a_built_optimizer():
    data = _data()
    with pytest.raises(StateFileError, match="not built"):
        pk.Adam().export_state(io.BytesIO(), _variables(data["w"], data["b"]))


# --------------------------------------------------------------------------
# native keras.optimizers.Adam


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_keras_adam_state_continues_like_keras(dtype):
    if dtype == "float64":  # exact in float32: see tests/test_keras_parity.py
        options = {"learning_rate": LR, "beta_1": 0.875, "beta_2": 1 - 2.0 ** -9,
                   "epsilon": 2.0 ** -20}
    else:
        options = {"learning_rate": 0.01}
    rng = np.random.default_rng(3)
    shapes = [(5, 4), (4,), (3,)]
    start = [rng.normal(size=s).astype(dtype) for s in shapes]
    grads = [[keras.ops.convert_to_tensor(rng.normal(size=s).astype(dtype)) for s in shapes]
             for _ in range(2 * N)]
    theirs_vars = [keras.Variable(v, dtype=dtype) for v in start]
    theirs = keras.optimizers.Adam(**options)
    for g in grads[:N]:
        theirs.apply_gradients(zip(g, theirs_vars))
    ours_vars = [keras.Variable(keras.ops.convert_to_numpy(v), dtype=dtype) for v in theirs_vars]
    _, preset = native.PRESETS["keras.optimizers.Adam"]
    ours = pk.Adam(**{**{pk.Adam.spec[k].spelling("keras"): v for k, v in preset.items()},
                      **options})
    interop.import_native_state(ours, theirs, ours_vars, native_variables=theirs_vars)
    assert int(keras.ops.convert_to_numpy(ours.iterations)) == N
    for g in grads[N:]:
        theirs.apply_gradients(zip(g, theirs_vars))
        ours.apply_gradients(zip(g, ours_vars))
    gap = max(_rel(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
              for a, b in zip(ours_vars, theirs_vars))
    bound = RTOL if dtype == "float64" else 1e-5
    print(f"NATIVE keras.optimizers.Adam->polyopt keras-{BACKEND} {dtype} {gap:.3e}")
    assert gap <= bound


def test_native_keras_adam_mismatch_is_refused():
    variables = [keras.Variable(np.ones(3))]
    theirs = keras.optimizers.Adam(amsgrad=True)
    theirs.apply_gradients(zip([keras.ops.ones(3, dtype=variables[0].dtype)], variables))
    ours = pk.Adam()
    with pytest.raises(ValueError, match="amsgrad=True"):
        interop.import_native_state(ours, theirs, variables)
    assert not ours.built
    with pytest.raises(ValueError, match="not built"):
        interop.import_native_state(ours, keras.optimizers.Adam(), variables)
    with pytest.raises(ValueError, match="Adam or AdamW"):
        interop.import_native_state(pk.SGD(), theirs, variables)
    other = [keras.Variable(np.ones(3))]
    with pytest.raises(ValueError, match="not built with these"):
        interop.import_native_state(pk.Adam(amsgrad=True), theirs, other)


# --------------------------------------------------------------------------
# non-finite gradients


def _bad_grads(variables):
    return [keras.ops.convert_to_tensor(np.full(tuple(v.shape), np.nan, "float64"))
            for v in variables]


@pytest.mark.parametrize("make", [lambda: keras.optimizers.Adam(LR), lambda: pk.Adam(LR)],
                         ids=["keras", "polyopt"])
def test_nonfinite_gradients_propagate_by_default_as_in_keras(make):
    data = _data()
    variables = _variables(data["w"], data["b"])
    make().apply_gradients(zip(_bad_grads(variables), variables))
    assert all(np.isnan(v).all() for v in _values(variables))


def test_skip_nonfinite_skips_counts_and_applies_after_max_consecutive_errors():
    data = _data()
    variables = _variables(data["w"], data["b"])
    opt = pk.SkipNonFinite(pk.Adam(LR), max_consecutive_errors=2)
    assert opt.total_notfinite == 0 and opt.last_finite
    _train(opt, variables, data, 2)
    before, state = _values(variables), _snapshot(opt)[2:6]  # the moments
    for i in range(2):
        opt.apply_gradients(zip(_bad_grads(variables), variables))
        assert all(np.array_equal(a, b) for a, b in zip(before, _values(variables)))
        assert all(np.array_equal(a, b) for a, b in zip(state, _snapshot(opt)[2:6]))
        assert opt.total_notfinite == i + 1 and opt.notfinite_count == i + 1
        assert not opt.last_finite
    opt.apply_gradients(zip(_bad_grads(variables), variables))  # third in a row: applied
    assert opt.total_notfinite == 3
    assert all(np.isnan(v).all() for v in _values(variables))
    # the counters travel in state files (the same algorithm name as polyopt.optax's)
    buffer = io.BytesIO()
    opt.export_state(buffer, variables)
    from polyopt.interop import read_header
    assert read_header(io.BytesIO(buffer.getvalue()))["algorithm"] == "apply_if_finite[adam]"
    fresh = pk.SkipNonFinite(pk.Adam(LR), max_consecutive_errors=2)
    fresh.import_state(io.BytesIO(buffer.getvalue()), variables)
    assert fresh.total_notfinite == 3 and fresh.notfinite_count == 3


def _fit_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    return x, y


def _fit_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="dense")])
    return model


def test_skip_nonfinite_in_fit_with_jit_compile_and_saved_with_the_model(tmp_path):
    x, y = _fit_data()
    bad = x.copy()
    bad[8] = np.nan  # batch 1 of 4: its gradients are NaN
    model = _fit_model()
    opt = pk.SkipNonFinite(pk.Adam(learning_rate=0.01))
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    model.fit(bad, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert opt.total_notfinite == 2 and opt.last_finite
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 8
    assert all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in opt.variables)
    # the same as training on the finite batches only (the inner count skips too)
    keep = np.r_[0:8, 16:32]
    reference = _fit_model()
    reference.compile(optimizer=pk.Adam(learning_rate=0.01), loss="mse", jit_compile=False)
    reference.fit(x[keep], y[keep], batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # counters are optimizer variables: model.save keeps them
    path = tmp_path / "skip.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, pk.SkipNonFinite)
    assert loaded.optimizer.total_notfinite == 2
    assert loaded.optimizer.get_config()["max_consecutive_errors"] == opt.get_config()[
        "max_consecutive_errors"]


# --------------------------------------------------------------------------
# checkpoints: bitwise resume; truncated or corrupt files are refused


def _ckpt_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=pk.Lookahead(pk.Nadam(learning_rate=0.01), sync_period=3),
                  loss="mse")
    return model


def _everything(model):
    return [np.array(keras.ops.convert_to_numpy(v))
            for v in model.variables + model.optimizer.variables]


def _flip(data: bytes) -> bytes:
    """64 bytes in the middle (inside the zipped weights) overwritten: a CRC error."""
    mid = len(data) // 2
    return data[:mid] + b"\xff" * 64 + data[mid + 64:]


def test_model_save_resumes_bitwise_and_damaged_files_leave_the_run_untouched(tmp_path):
    x, y = _fit_data()
    model = _ckpt_model()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "run.keras")
    model.save_weights(tmp_path / "run.weights.h5")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded = keras.saving.load_model(tmp_path / "run.keras")
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_everything(loaded), _everything(model)):
        np.testing.assert_array_equal(a, b)  # bitwise continuation
    before = _everything(model)
    whole = (tmp_path / "run.keras").read_bytes()
    damaged = {"truncated.keras": whole[: len(whole) // 2],
               "corrupt.keras": _flip(whole)}
    h5 = (tmp_path / "run.weights.h5").read_bytes()
    damaged["truncated.weights.h5"] = h5[: len(h5) - 100]
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        if name.endswith(".keras"):
            # Keras says "File not found ... accessible .keras zip file" for a damaged zip
            with pytest.raises((ValueError, zipfile.BadZipFile)):
                keras.saving.load_model(tmp_path / name)
        with pytest.raises((ValueError, OSError, zipfile.BadZipFile),
                           match="zip|truncated|CRC|open"):
            model.load_weights(tmp_path / name)
        for a, b in zip(before, _everything(model)):
            np.testing.assert_array_equal(a, b)


if BACKEND == "tensorflow":

    def test_truncated_tf_train_checkpoint_is_refused_and_changes_nothing(tmp_path):
        import tensorflow as tf

        x, y = _fit_data()
        model = _ckpt_model()
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
            str(tmp_path / "ckpt"))
        data = next(p for p in tmp_path.iterdir() if ".data-" in p.name)
        data.write_bytes(data.read_bytes()[:100])
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        before = _everything(model)
        # TensorFlow: "Read less bytes than requested" (an IndexError) or an OpError
        with pytest.raises((tf.errors.OpError, IndexError)):
            tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(prefix)
        for a, b in zip(before, _everything(model)):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# the README's Keras examples (fenced ```python keras: tests/test_readme.py runs
# the plain ```python blocks in the torch/JAX process, these run here, per backend)


def _readme_keras_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"```python keras\n(.*?)```", text, re.DOTALL)


@pytest.mark.parametrize("block", _readme_keras_blocks(),
                         ids=lambda b: f"block{_readme_keras_blocks().index(b)}")
def test_readme_keras_examples_run(block):
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README


def test_readme_has_a_keras_example():
    assert _readme_keras_blocks()
