"""polyopt.torch state transfer: torch <-> JAX state files, native torch.optim import.

JAX runs in a child process (tests/_native.py), torch in this one. The
continuation after a transfer must match an uninterrupted run of the source
framework (float64, <= 1e-10 relative); torch -> torch is bitwise.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polyopt.torch
from polyopt.interop import StateFileError, read_header
from tests._native import run_python

N = 5  # steps before the transfer, and after it
RTOL = 1e-10

# torch class, torch kwargs, polyopt.optax factory, optax kwargs
CASES = {
    "adam": ("Adam", {"lr": 0.05}, "adam", {"learning_rate": 0.05}),
    "amsgrad": ("Adam", {"lr": 0.05, "amsgrad": True}, "adam",
                {"learning_rate": 0.05, "amsgrad": True}),
    "adamw": ("AdamW", {"lr": 0.05, "weight_decay": 0.1}, "adamw",
              {"learning_rate": 0.05, "weight_decay": 0.1}),
    "sgd": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "sgd",
            {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    "nadam": ("NAdam", {"lr": 0.05}, "nadam", {"learning_rate": 0.05}),
    "rmsprop": ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}, "rmsprop",
                {"learning_rate": 0.01, "momentum": 0.5, "centered": True}),
    # gradient centralization off: it keeps torch's axis 0 but JAX's last axis
    "ranger": ("Ranger", {"lr": 0.05, "k": 3, "gradient_centralization": False}, "ranger",
               {"learning_rate": 0.05, "sync_period": 3, "gradient_centralization": False}),
}


def _data():
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=3),
            "x": rng.normal(size=(8, 4)), "y": rng.normal(size=(8, 3))}


def _model(data):
    model = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(data["w"]))
        model.bias.copy_(torch.tensor(data["b"]))
    return model


def _train(model, opt, data, steps):
    x, y = torch.tensor(data["x"]), torch.tensor(data["y"])
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _params(model):
    return {k: p.detach().numpy().copy() for k, p in model.named_parameters()}


_JAX_SCRIPT = """
import io, base64
import jax, jax.numpy as jnp, numpy as np, optax
import polyopt.optax
from polyopt.optax import interop
jax.config.update("jax_enable_x64", True)
d = {k: np.asarray(v) for k, v in payload["data"].items()}

def loss(p):
    return jnp.mean((d["x"] @ p["weight"].T + p["bias"] - d["y"]) ** 2)

def run(opt, params, state, steps, lookahead_fast=None):
    for _ in range(steps):
        g = jax.grad(loss)(params)
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state

result = {}
for name, (factory, kwargs) in payload["cases"].items():
    opt = getattr(polyopt.optax, factory)(**kwargs)
    p0 = {"weight": jnp.asarray(d["w"]), "bias": jnp.asarray(d["b"])}
    # torch -> JAX: continue the torch state for N steps
    state = interop.import_state(io.BytesIO(base64.b64decode(payload["files"][name])), opt, p0)
    p_torch = {k: jnp.asarray(v) for k, v in payload["torch_params"][name].items()}
    cont, _ = run(opt, p_torch, state, payload["n"])
    # JAX uninterrupted 2N steps, exporting at N; JAX -> JAX must be bitwise
    p_mid, s_mid = run(opt, p0, opt.init(p0), payload["n"])
    buffer = io.BytesIO()
    interop.export_state(buffer, opt, s_mid, p_mid)
    p_end, _ = run(opt, p_mid, s_mid, payload["n"])
    p_again, _ = run(opt, p_mid, interop.import_state(io.BytesIO(buffer.getvalue()), opt, p_mid),
                     payload["n"])
    result[name] = {
        "continued": {k: np.asarray(v) for k, v in cont.items()},
        "mid": {k: np.asarray(v) for k, v in p_mid.items()},
        "end": {k: np.asarray(v) for k, v in p_end.items()},
        "file": base64.b64encode(buffer.getvalue()).decode(),
        "bitwise": all(bool(np.array_equal(p_end[k], p_again[k])) for k in p_end),
    }
"""


@pytest.fixture(scope="module")
def transfers():
    """Torch runs N steps and exports; the child continues in JAX and runs JAX alone."""
    import base64
    data = _data()
    files, torch_params, expected = {}, {}, {}
    for name, (cls, kwargs, _, _) in CASES.items():
        model = _model(data)
        opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
        _train(model, opt, data, N)
        buffer = io.BytesIO()
        opt.export_state(buffer, names=model)
        files[name] = base64.b64encode(buffer.getvalue()).decode()
        torch_params[name] = _params(model)
        _train(model, opt, data, N)
        expected[name] = _params(model)
    payload = {"data": {k: v.tolist() for k, v in data.items()}, "n": N, "files": files,
               "torch_params": {k: {n: a.tolist() for n, a in v.items()}
                                for k, v in torch_params.items()},
               "cases": {k: (c[2], c[3]) for k, c in CASES.items()}}
    out = run_python(_JAX_SCRIPT, payload, env={"JAX_ENABLE_X64": "1"})
    return data, expected, out


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("name", CASES)
def test_torch_to_jax_continues_the_torch_run(transfers, name):
    _, expected, out = transfers
    diff = max(_rel(out[name]["continued"][k], expected[name][k]) for k in ("weight", "bias"))
    print(f"torch -> JAX {name}: max rel diff {diff:.1e}")
    assert diff <= RTOL


@pytest.mark.parametrize("name", CASES)
def test_jax_to_torch_continues_the_jax_run(transfers, name):
    import base64
    data, _, out = transfers
    cls, kwargs, _, _ = CASES[name]
    model = _model(data)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.tensor(np.asarray(out[name]["mid"][k])))
    opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
    header = opt.import_state(io.BytesIO(base64.b64decode(out[name]["file"])), names=model)
    assert header["framework"] == "jax" and header["algorithm"] == opt.spec.name
    _train(model, opt, data, N)
    diff = max(_rel(p, out[name]["end"][k]) for k, p in _params(model).items())
    print(f"JAX -> torch {name}: max rel diff {diff:.1e}")
    assert diff <= RTOL
    assert out[name]["bitwise"]  # JAX -> JAX


@pytest.mark.parametrize("name", CASES)
def test_torch_to_torch_is_bitwise(name):
    data = _data()
    cls, kwargs, _, _ = CASES[name]
    model = _model(data)
    opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
    _train(model, opt, data, N)
    buffer = io.BytesIO()
    opt.export_state(buffer)  # positional names
    mid = {k: v.copy() for k, v in _params(model).items()}
    _train(model, opt, data, N)
    model2 = _model(data)
    with torch.no_grad():
        for k, p in model2.named_parameters():
            p.copy_(torch.tensor(mid[k]))
    opt2 = getattr(polyopt.torch, cls)(model2.parameters(), **kwargs)
    buffer.seek(0)
    opt2.import_state(buffer)
    _train(model2, opt2, data, N)
    for k in ("weight", "bias"):
        assert torch.equal(getattr(model, k), getattr(model2, k))


def test_header_keeps_the_scheduled_lr_and_options(tmp_path):
    data = _data()
    model = _model(data)
    opt = polyopt.torch.Adam(model.parameters(), lr=0.1, amsgrad=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        _train(model, opt, data, 1)
        sched.step()
    opt.export_state(tmp_path / "s.npz", names=model)
    header = read_header(tmp_path / "s.npz")
    assert header["hyperparameters"]["learning_rate"] == pytest.approx(0.1 * 0.5 ** 3)
    assert header["options"]["amsgrad"] is True
    assert [p["name"] for p in header["params"]] == ["weight", "bias"]


def _snapshot(opt):
    sd = opt.state_dict()
    return {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}, \
        [dict(g) for g in sd["param_groups"]]


def _same(a, b):
    (sa, ga), (sb, gb) = a, b
    return ga == gb and sa.keys() == sb.keys() and all(
        sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])
        for i in sa)


def _saved(cls, module, **kwargs):
    data = _data()
    opt = getattr(polyopt.torch, cls)(module.parameters(), **kwargs)
    x = torch.tensor(data["x"][:, :next(module.parameters()).shape[1]])
    opt.zero_grad()
    module(x).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    opt.export_state(buffer, names=module)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("source, match", [
    (lambda: _saved("SGD", _model(_data()), momentum=0.9), "'sgd' state"),
    (lambda: _saved("Adam", _model(_data())), "only in the file .*max_second_moment"),
    (lambda: _saved("Adam", torch.nn.Sequential(torch.nn.Linear(4, 3).double())),
     "missing from the file"),
    (lambda: _saved("Adam", torch.nn.Linear(3, 4).double()), "other shapes"),
    (lambda: io.BytesIO(b"PK\x03\x04 truncated"), "not a readable"),
], ids=["other-algorithm", "other-options", "renamed-params", "reshaped", "corrupt"])
def test_mismatched_file_is_refused_and_changes_nothing(source, match):
    data = _data()
    model = _model(data)
    opt = polyopt.torch.Adam(model.parameters(), lr=0.05, amsgrad=True)
    _train(model, opt, data, 2)
    before = _snapshot(opt)
    with pytest.raises(StateFileError, match=match):
        opt.import_state(source(), names=model)
    assert _same(before, _snapshot(opt))


# --------------------------------------------------------------------------
# native torch.optim state


NATIVE = {
    "Adam": ({"lr": 0.05, "betas": (0.8, 0.99)}, "Adam"),
    "Adam-amsgrad": ({"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}, "Adam"),
    "AdamW": ({"lr": 0.05, "weight_decay": 0.1}, "AdamW"),
    "SGD": ({"lr": 0.05, "momentum": 0.9, "dampening": 0.1}, "SGD"),
    "SGD-nesterov": ({"lr": 0.05, "momentum": 0.9, "nesterov": True}, "SGD"),
}


@pytest.mark.parametrize("name", NATIVE)
def test_native_state_continues_like_the_native(name):
    kwargs, cls = NATIVE[name]
    data = _data()
    native_model = _model(data)
    native = getattr(torch.optim, cls)(native_model.parameters(), **kwargs)
    _train(native_model, native, data, N)
    model = _model(data)
    with torch.no_grad():
        for p, q in zip(model.parameters(), native_model.parameters()):
            p.copy_(q)
    opt = polyopt.torch.preset(f"torch.optim.{cls}", model.parameters(), **kwargs)
    opt.import_native_state(native.state_dict())
    _train(native_model, native, data, N)
    _train(model, opt, data, N)
    diff = max(_rel(p.detach(), q.detach())
               for p, q in zip(model.parameters(), native_model.parameters()))
    print(f"native torch.optim {name} -> polyopt: max rel diff {diff:.1e}")
    assert diff <= RTOL


def test_non_contiguous_params_and_grads_step_like_contiguous_ones():
    rng = np.random.default_rng(3)
    values = torch.tensor(rng.normal(size=(4, 3)))
    grads = [torch.tensor(rng.normal(size=(4, 3))) for _ in range(N)]
    dense = torch.nn.Parameter(values.clone())
    strided = torch.nn.Parameter(values.t().contiguous().t())  # stride (1, 4)
    assert not strided.is_contiguous()
    for p in (dense, strided):
        opt = polyopt.torch.Adam([p], lr=0.05, weight_decay=0.1)
        for g in grads:
            p.grad = g.t().contiguous().t() if p is strided else g.clone()
            opt.step()
    assert torch.equal(dense, strided)


@pytest.mark.parametrize("native_kwargs, kwargs, match", [
    ({"amsgrad": True}, {}, "amsgrad"),
    ({}, {"amsgrad": True}, "amsgrad"),
], ids=["native-amsgrad", "polyopt-amsgrad"])
def test_native_adam_mismatch_is_refused(native_kwargs, kwargs, match):
    data = _data()
    model = _model(data)
    native = torch.optim.Adam(model.parameters(), lr=0.05, **native_kwargs)
    _train(model, native, data, 1)
    opt = polyopt.torch.Adam(model.parameters(), lr=0.05, **kwargs)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.import_native_state(native.state_dict())
    assert _same(before, _snapshot(opt))


def test_native_sgd_without_momentum_is_refused_by_momentum_sgd():
    data = _data()
    model = _model(data)
    native = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, native, data, 1)
    opt = polyopt.torch.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, data, 1)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.import_native_state(native.state_dict())
    assert _same(before, _snapshot(opt))


# --------------------------------------------------------------------------
# checkpoints: truncated or corrupt files


def test_truncated_checkpoints_give_clear_errors_and_change_nothing(tmp_path):
    data = _data()
    model = _model(data)
    opt = polyopt.torch.Adam(model.parameters(), lr=0.05)
    _train(model, opt, data, 2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt.export_state(tmp_path / "opt.npz", names=model)
    _train(model, opt, data, 1)
    before = _snapshot(opt)
    for name in ("opt.pt", "opt.npz"):
        raw = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(raw[: len(raw) // 2])
    with pytest.raises((RuntimeError, EOFError), match="(?i)zip|archive|central directory"):
        opt.load_state_dict(torch.load(tmp_path / "cut-opt.pt"))
    with pytest.raises(StateFileError, match="not a readable polyopt state file"):
        opt.import_state(tmp_path / "cut-opt.npz", names=model)
    with pytest.raises(StateFileError, match="no such state file"):
        opt.import_state(tmp_path / "missing.npz", names=model)
    corrupt = torch.load(tmp_path / "opt.pt")
    corrupt["state"][0]["exp_avg"] = torch.zeros(7)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        opt.load_state_dict(corrupt)
    del corrupt["state"][0]["exp_avg"]
    corrupt["state"][0]["nonsense"] = torch.zeros(())
    with pytest.raises(ValueError, match="unknown key"):
        opt.load_state_dict(corrupt)
    assert _same(before, _snapshot(opt))


# --------------------------------------------------------------------------
# non-finite gradients


def _nan_step(model, opt, data):
    opt.zero_grad()
    x = torch.tensor(data["x"])
    (model(x).sum() * torch.tensor(float("nan"))).backward()
    opt.step()


def test_nonfinite_gradients_propagate_by_default_as_in_torch_optim():
    data = _data()
    for make in (lambda ps: polyopt.torch.Adam(ps, lr=0.05),
                 lambda ps: torch.optim.Adam(ps, lr=0.05)):
        model = _model(data)
        opt = make(model.parameters())
        _nan_step(model, opt, data)
        assert torch.isnan(model.weight).all()


def test_skip_nonfinite_skips_counts_and_keeps_the_state_finite():
    data = _data()
    model, reference = _model(data), _model(data)
    opt = polyopt.torch.SkipNonFinite(polyopt.torch.Adam(model.parameters(), lr=0.05),
                                      max_consecutive_errors=2)
    ref = polyopt.torch.Adam(reference.parameters(), lr=0.05)
    _train(model, opt, data, 2)
    _train(reference, ref, data, 2)
    before = _snapshot(opt.base_optimizer)
    for i in range(2):
        _nan_step(model, opt, data)
        assert opt.total_notfinite == i + 1 and opt.notfinite_count == i + 1
        assert not opt.last_finite
    assert _same(before, _snapshot(opt.base_optimizer))
    assert torch.equal(model.weight, reference.weight)
    saved = opt.state_dict()
    assert all(g["skip_nonfinite_total_notfinite"] == 2 for g in saved["param_groups"])
    _train(model, opt, data, 1)  # a finite step resets the consecutive count
    _train(reference, ref, data, 1)
    assert opt.notfinite_count == 0 and opt.total_notfinite == 2 and opt.last_finite
    assert torch.equal(model.weight, reference.weight)
    opt.load_state_dict(saved)
    assert opt.total_notfinite == 2 and opt.notfinite_count == 2
    _nan_step(model, opt, data)  # the third in a row: applied, as optax.apply_if_finite
    assert opt.total_notfinite == 3 and torch.isnan(model.weight).all()


def test_skip_nonfinite_refuses_bad_arguments():
    model = _model(_data())
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        polyopt.torch.SkipNonFinite(polyopt.torch.Adam(model.parameters()),
                                    max_consecutive_errors=-1)
    with pytest.raises(TypeError, match="base_optimizer"):
        polyopt.torch.SkipNonFinite(model.parameters())
