"""The bad-input catalogue: one table of bad inputs, every adapter, one check each.

Every row feeds one bad input and checks the documented exception type, a
message naming the argument, and that nothing changed (the params, the
optimizer's state and hyperparameters are compared before and after).

Rows are tagged by framework: ``core`` (numpy, always run), ``torch`` and
``optax`` (gated with ``pytest.mark.needs``: only the frameworks in
POLYOPT_FRAMEWORKS run). The Keras rows (32, same Row format and check) are
in tests/test_keras_bad_inputs.py, which runs in the Keras processes, once
per Keras backend.

Documented behaviour for a learning-rate callable that returns a negative
value: polyopt.schedules are checked at construction (a negative or NaN
setting is refused there); a user's own callable is called inside the
(possibly jitted) update, so the core and polyopt.optax cannot check its
value and apply it as given (a negative lr ascends). In torch the scheduled
lr is a number in the param group, checked at every ``step()`` before any
param changes: that row is in the table.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

from polyopt import interop, rules, schedules


class Row(NamedTuple):
    framework: str
    id: str
    setup: Callable[[], Any] | None  # the subject that must stay unchanged (or None)
    action: Callable[[Any], Any]  # feeds the bad input
    exc: type | tuple
    match: str  # regex: the argument's name (and what is allowed)


ROWS: list[Row] = []
MARKS = {"core": (), "torch": (pytest.mark.needs("torch"),), "optax": (pytest.mark.needs("jax"),)}


def _rows(framework: str, setup, *rows) -> None:
    for id_, action, exc, match in rows:
        ROWS.append(Row(framework, id_, setup, action, exc, match))


# --------------------------------------------------------------------------
# snapshots: everything an action could have changed


def _snap(x: Any) -> Any:
    if hasattr(x, "param_groups") and hasattr(x, "state_dict"):  # a torch optimizer
        sd = x.state_dict()
        return ("optimizer", _snap(sd), [_snap(p) for g in x.param_groups for p in g["params"]])
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    if isinstance(x, dict):
        return {k: _snap(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x).__name__, [_snap(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return np.array(x, copy=True)
    return repr(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    return a == b


# --------------------------------------------------------------------------
# core (numpy)


def _core():
    params = [np.ones((2, 3)), np.zeros(3)]
    rule = rules.adam(learning_rate=0.1)
    state = rule.init(params)
    _, state = rule.update([np.ones((2, 3)), np.ones(3)], state, params)
    return {"rule": rule, "state": state, "params": params}


def _update(s, grads=None, state=None, params=None):
    s["rule"].update(grads if grads is not None else [np.ones((2, 3)), np.ones(3)],
                     state if state is not None else s["state"],
                     params if params is not None else s["params"])


def _core_file(s):
    buffer = io.BytesIO()
    interop.save_state(buffer, s["state"], algorithm="adam", params=s["params"], names=["w", "b"])
    buffer.seek(0)
    return buffer


def _drop_entry(buffer, entry):
    with np.load(buffer) as archive:
        arrays = {k: archive[k] for k in archive.files if k != entry}
    out = io.BytesIO()
    np.savez(out, **arrays)
    out.seek(0)
    return out


_rows("core", None, *[
    (f"{name}-{label}", (lambda _, name=name, v=v, f=f: f(**{name: v})), exc, name)
    for f, name, label, v, exc in [
        (rules.adam, "learning_rate", "negative", -0.1, ValueError),
        (rules.adam, "learning_rate", "nan", math.nan, ValueError),
        (rules.adam, "learning_rate", "inf", math.inf, ValueError),
        (rules.adam, "learning_rate", "str", "0.1", TypeError),
        (rules.adam, "learning_rate", "bool", True, TypeError),
        (rules.adam, "b1", "one", 1.0, ValueError),
        (rules.adam, "b1", "negative", -0.1, ValueError),
        (rules.adam, "b2", "above-one", 1.5, ValueError),
        (rules.adam, "eps", "negative", -1e-8, ValueError),
        (rules.adam, "eps", "nan", math.nan, ValueError),
        (rules.adamw, "weight_decay", "negative", -0.01, ValueError),
        (rules.adam, "weight_decay_mode", "unknown", "sideways", ValueError),
        (rules.adam, "amsgrad_form", "unknown", "x", ValueError),
        (rules.adam, "amsgrad", "str", "yes", TypeError),
        (rules.sgd, "momentum", "negative", -0.5, ValueError),
        (rules.sgd, "dampening", "above-one", 1.5, ValueError),
        (rules.rmsprop, "decay", "one", 1.0, ValueError),
        (rules.adadelta, "rho", "one", 1.0, ValueError),
        (rules.clip_by_global_norm, "max_norm", "negative", -1.0, ValueError),
    ]])
_rows("core", None,
      ("lookahead-sync_period-zero", lambda _: rules.lookahead(rules.adam(), sync_period=0),
       ValueError, "sync_period"),
      ("lookahead-slow_step_size-above-one",
       lambda _: rules.lookahead(rules.adam(), slow_step_size=1.5), ValueError, "slow_step_size"),
      ("chain-not-a-rule", lambda _: rules.chain(3), TypeError, r"rules\[0\]"),
      ("apply_if_finite-negative",
       lambda _: rules.apply_if_finite(rules.adam(), max_consecutive_errors=-1), ValueError,
       "max_consecutive_errors"),
      ("schedule-negative-value", lambda _: schedules.constant(-1.0), ValueError, "value"),
      ("schedule-nan-init", lambda _: schedules.cosine_decay(math.nan, 10), ValueError,
       "init_value"),
      ("init-empty-params", lambda _: rules.adam().init([]), ValueError, "params"),
      ("init-int-params", lambda _: rules.adam().init([np.ones(3, dtype=int)]), TypeError,
       r"params\[0\]"),
      )
_rows("core", _core,
      ("update-grad-shape", lambda s: _update(s, grads=[np.ones((3, 2)), np.ones(3)]),
       ValueError, r"grads\[0\]"),
      ("update-grad-count", lambda s: _update(s, grads=[np.ones((2, 3))]), ValueError, "grads"),
      ("update-grad-dtype", lambda s: _update(s, grads=[np.ones((2, 3), np.float32), np.ones(3)]),
       TypeError, r"grads\[0\]"),
      ("update-grads-not-a-list", lambda s: _update(s, grads=np.ones(3)), TypeError, "grads"),
      ("update-state-of-another-rule",
       lambda s: _update(s, state=rules.sgd(momentum=0.9).init(s["params"])), TypeError, "state"),
      ("update-state-missing-fields", lambda s: _update(s, state=tuple(s["state"])[:2]),
       TypeError, "state"),
      ("state-file-missing-entry",
       lambda s: interop.load_state(_drop_entry(_core_file(s), "first_moment/w"), s["state"],
                                    algorithm="adam", params=s["params"], names=["w", "b"]),
       interop.StateFileError, "first_moment/w"),
      ("state-file-other-algorithm",
       lambda s: interop.load_state(_core_file(s), s["state"], algorithm="nadam",
                                    params=s["params"], names=["w", "b"]),
       interop.StateFileError, "'adam'.*'nadam'"),
      ("state-file-duplicate-names",
       lambda s: interop.save_state(io.BytesIO(), s["state"], algorithm="adam",
                                    params=s["params"], names=["w", "w"]),
       interop.StateFileError, "names"),
      )


# --------------------------------------------------------------------------
# torch


def _torch(cls: str = "Adam", **kwargs):
    import torch

    import polyopt.torch
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    opt = getattr(polyopt.torch, cls)(model.parameters(), **kwargs)
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt}


def _new(cls: str, *args, **kwargs):
    import torch

    import polyopt.torch
    if not args:
        args = (torch.nn.Linear(3, 2).parameters(),)
    return getattr(polyopt.torch, cls)(*args, **kwargs)


def _torch_group(**group):
    """A trained optimizer whose first param group the user changed (the bad input)."""
    def setup():
        s = _torch()
        s["opt"].param_groups[0].update(group)
        return s
    return setup


def _torch_scheduled():
    """A LambdaLR whose factor turns negative: lr 0.1, 0, -0.1 after two steps."""
    import torch
    s = _torch(lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(s["opt"], lambda epoch: 1.0 - epoch)
    for _ in range(2):
        s["opt"].step()
        scheduler.step()
    assert s["opt"].param_groups[0]["lr"] < 0
    return s


def _step(s):
    s["opt"].step()


def _torch_complex_group(cls: str, **group):
    """A trained optimizer given a second group with a complex param and its grad."""
    def setup():
        import torch
        s = _torch(cls)
        p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.cfloat))
        p.grad = torch.full_like(p, 1 - 2j)
        s["opt"].add_param_group({"params": [p], **group})
        s["complex"] = p
        return s
    return setup


def _torch_file(cls: str, **kwargs):
    s = _torch(cls, **kwargs)
    buffer = io.BytesIO()
    s["opt"].export_state(buffer)
    buffer.seek(0)
    return buffer


def _native_adam_state(**kwargs):
    import torch
    model = torch.nn.Linear(3, 2).double()
    opt = torch.optim.Adam(model.parameters(), **kwargs)
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    return opt.state_dict()


def _sparse_grad_step(s):
    import torch
    w = s["model"].weight
    w.grad = torch.zeros_like(w).to_sparse()
    s["opt"].step()


def _with(sd_change):
    def action(s):
        sd = copy.deepcopy(s["opt"].state_dict())
        sd_change(sd)
        s["opt"].load_state_dict(sd)
    return action


def _sgd_state_dict(s):
    return _torch("SGD", momentum=0.9)["opt"].state_dict()


_rows("torch", None, *[
    (f"{cls}-{name}-{label}", (lambda _, cls=cls, name=name, v=v: _new(cls, **{name: v})), exc,
     re.escape(name))
    for cls, name, label, v, exc in [
        ("Adam", "lr", "negative", -1e-3, ValueError),
        ("Adam", "lr", "nan", math.nan, ValueError),
        ("Adam", "lr", "inf", math.inf, ValueError),
        ("Adam", "lr", "str", "1e-3", TypeError),
        ("Adam", "betas", "b1-one", (1.0, 0.999), ValueError),
        ("Adam", "betas", "b2-negative", (0.9, -0.1), ValueError),
        ("Adam", "betas", "one-number", (0.9,), TypeError),
        ("Adam", "eps", "negative", -1e-8, ValueError),
        ("AdamW", "weight_decay", "negative", -0.01, ValueError),
        ("Adam", "amsgrad", "str", "yes", TypeError),
        ("SGD", "momentum", "above-one", 1.5, ValueError),
        ("SGD", "dampening", "negative", -0.1, ValueError),
        ("RMSprop", "alpha", "one", 1.0, ValueError),
        ("Adadelta", "rho", "negative", -0.5, ValueError),
        ("Ranger", "k", "zero", 0, ValueError),
        ("Adam", "compiled", "str", "yes", TypeError),
    ]])
_rows("torch", None,
      ("Adam-unknown-argument", lambda _: _new("Adam", beta1=0.9), TypeError, "beta1"),
      ("Adam-empty-params", lambda _: _new("Adam", []), ValueError, "empty parameter list"),
      ("Adam-int-param", lambda _: _new("Adam", [__import__("torch").ones(2, dtype=int)]),
       TypeError, r"params\[0\]"),
      ("Lookahead-k-zero", lambda _: _new("Lookahead", _new("Adam"), k=0), ValueError, "k"),
      ("Lookahead-alpha-above-one", lambda _: _new("Lookahead", _new("Adam"), alpha=1.5),
       ValueError, "alpha"),
      ("Lookahead-not-an-optimizer", lambda _: _new("Lookahead", [1.0]), TypeError,
       "base_optimizer"),
      ("SkipNonFinite-negative", lambda _: _new("SkipNonFinite", _new("Adam"),
                                                max_consecutive_errors=-1),
       ValueError, "max_consecutive_errors"),
      )
# torch.optim.Adafactor refuses complex params at the step, with RuntimeError (torch's type)
_rows("torch", _torch_complex_group("Adafactor"),
      ("Adafactor-complex-param-step", _step, RuntimeError,
       r"Adafactor does not support complex parameters \(param group 1, params\[0\]\)"))
_rows("torch", _torch_complex_group("Adam", state_dtype="bfloat16"),
      ("Adam-complex-param-bfloat16-state", _step, TypeError,
       r"state_dtype='bfloat16' cannot hold the state of a complex param"))
_rows("torch", _torch_group(lr=-0.1), ("step-group-lr-negative", _step, ValueError, "lr"))
_rows("torch", _torch_group(lr=math.nan), ("step-group-lr-nan", _step, ValueError, "lr"))
_rows("torch", _torch_group(betas=(0.9,)),
      ("step-group-betas-wrong-length", _step, TypeError, "betas"))
_rows("torch", _torch_scheduled, ("step-scheduler-negative-lr", _step, ValueError, "lr"))
_rows("torch", _torch,
      ("step-sparse-grad", _sparse_grad_step, RuntimeError, "sparse"),
      ("load-state-of-another-algorithm",
       lambda s: s["opt"].load_state_dict(_sgd_state_dict(s)), ValueError, "momentum_buffer"),
      ("load-state-missing-key", _with(lambda sd: sd.pop("state")), ValueError, "'state'"),
      ("load-state-wrong-shape",
       _with(lambda sd: sd["state"][0].update(exp_avg=__import__("torch").zeros(5))),
       ValueError, "exp_avg"),
      ("load-state-not-a-tensor", _with(lambda sd: sd["state"][0].update(exp_avg=[0.0])),
       TypeError, "exp_avg"),
      ("load-state-extra-group",
       _with(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))),
       ValueError, "param groups"),
      ("load-state-bad-hyper",
       _with(lambda sd: sd["param_groups"][0].update(eps=-1.0)), ValueError, "eps"),
      ("import-state-other-algorithm",
       lambda s: s["opt"].import_state(_torch_file("NAdam")), interop.StateFileError,
       "'nadam'"),
      ("import-state-other-options",
       lambda s: s["opt"].import_state(_torch_file("Adam", amsgrad=True)),
       interop.StateFileError, "max_second_moment"),
      ("import-state-truncated",
       lambda s: s["opt"].import_state(io.BytesIO(_torch_file("Adam").getvalue()[:100])),
       interop.StateFileError, "not a readable"),
      ("import-native-amsgrad",
       lambda s: s["opt"].import_native_state(_native_adam_state(amsgrad=True)), ValueError,
       "amsgrad"),
      ("import-native-not-a-state-dict", lambda s: s["opt"].import_native_state({"x": 1}),
       ValueError, "state_dict"),
      )


# --------------------------------------------------------------------------
# optax


def _optax():
    import jax.numpy as jnp

    import polyopt.optax
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    opt = polyopt.optax.adam(0.1)
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, state, params)
    return {"opt": opt, "state": state, "params": params}


def _ox(name: str, *args, **kwargs):
    import polyopt.optax
    return getattr(polyopt.optax, name)(*args, **kwargs)


def _ox_update(s, grads=None, state=None, params="same"):
    import jax.numpy as jnp
    s["opt"].update(grads if grads is not None else {"w": jnp.ones((2, 3)), "b": jnp.ones(3)},
                    state if state is not None else s["state"],
                    s["params"] if params == "same" else params)


def _jnp(*args, **kwargs):
    import jax.numpy as jnp
    return jnp.ones(*args, **kwargs)


def _ox_file(s, name="adam"):
    from polyopt.optax import interop as ox
    opt = _ox(name, 0.1)
    buffer = io.BytesIO()
    ox.export_state(buffer, opt, opt.init(s["params"]), s["params"])
    buffer.seek(0)
    return buffer


_rows("optax", None, *[
    (f"{f}-{name}-{label}", (lambda _, f=f, name=name, v=v: _ox(f, **{name: v})), exc, name)
    for f, name, label, v, exc in [
        ("adam", "learning_rate", "negative", -0.1, ValueError),
        ("adam", "learning_rate", "nan", math.nan, ValueError),
        ("adam", "learning_rate", "str", "0.1", TypeError),
        ("adam", "b1", "one", 1.0, ValueError),
        ("adam", "b2", "negative", -0.1, ValueError),
        ("adam", "eps", "inf", math.inf, ValueError),
        ("adamw", "weight_decay", "negative", -1.0, ValueError),
        ("sgd", "momentum", "negative", -0.9, ValueError),
        ("rmsprop", "decay", "above-one", 1.5, ValueError),
        ("radam", "total_steps", "float", 2.5, TypeError),
    ]])
_rows("optax", None,
      ("lookahead-inner-not-a-transformation",
       lambda _: _ox("lookahead", 0.1), TypeError, "inner"),
      ("lookahead-sync_period-zero", lambda _: _ox("lookahead", _ox("adam"), sync_period=0),
       ValueError, "sync_period"),
      ("sam-sync_period-one", lambda _: _ox("sam", _ox("adam"), sync_period=1), ValueError,
       "sync_period"),
      ("apply_if_finite-negative",
       lambda _: _ox("apply_if_finite", _ox("adam"), max_consecutive_errors=-2), ValueError,
       "max_consecutive_errors"),
      ("init-int-params", lambda _: _ox("adam").init({"w": _jnp(3, dtype=int)}), TypeError,
       r"params\['w'\]"),
      )
_rows("optax", _optax,
      ("update-missing-leaf", lambda s: _ox_update(s, grads={"w": _jnp((2, 3))}), ValueError,
       "updates"),
      ("update-grad-shape", lambda s: _ox_update(s, grads={"w": _jnp((3, 2)), "b": _jnp(3)}),
       ValueError, r"updates\['w'\]"),
      ("update-grad-dtype",
       lambda s: _ox_update(s, grads={"w": _jnp((2, 3), dtype="float32"), "b": _jnp(3)}),
       ValueError, r"updates\['w'\]"),
      ("update-state-of-another-rule",
       lambda s: _ox_update(s, state=_ox("sgd", momentum=0.9).init(s["params"])), ValueError,
       "state"),
      ("update-state-missing-fields", lambda s: _ox_update(s, state=tuple(s["state"])[:2]),
       ValueError, "state"),
      ("update-adamw-without-params",
       lambda s: _ox("adamw").update({"w": _jnp((2, 3)), "b": _jnp(3)},
                                     _ox("adamw").init(s["params"])),
       ValueError, "params"),
      ("import-state-other-algorithm",
       lambda s: __import__("polyopt.optax.interop").optax.interop.import_state(
           _ox_file(s, "nadam"), s["opt"], s["params"]),
       interop.StateFileError, "'nadam'"),
      ("load-checkpoint-corrupt",
       lambda s: __import__("polyopt.optax.interop").optax.interop.load_checkpoint(
           io.BytesIO(b"PK\x03\x04junk"), s["state"]),
       interop.StateFileError, "not a readable checkpoint"),
      ("import-native-into-amsgrad",
       lambda s: __import__("polyopt.optax.interop").optax.interop.import_native_state(
           _ox("amsgrad"), __import__("optax").adam(0.1).init(s["params"]), s["params"]),
       ValueError, "amsgrad"),
      )


# --------------------------------------------------------------------------


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.framework}:{r.id}",
                                              marks=MARKS[r.framework]) for r in ROWS])
def test_bad_input_is_refused_and_changes_nothing(row: Row):
    assert_refused_unchanged(row, _snap)


def assert_refused_unchanged(row: Row, snap) -> None:
    """``row``'s action raises its exception, naming the argument, and
    ``snap`` (a snapshot of everything the action could change) is unchanged."""
    subject = row.setup() if row.setup else None
    before = snap(subject)
    with pytest.raises(row.exc) as info:
        row.action(subject)
    assert re.search(row.match, str(info.value)), f"message does not name it: {info.value}"
    assert _same(before, snap(subject)), "the bad input changed something"


def test_catalogue_size():
    ids = [(r.framework, r.id) for r in ROWS]
    assert len(set(ids)) == len(ids) >= 60
