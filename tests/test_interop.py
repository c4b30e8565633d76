"""polyopt.interop: framework-neutral state files.

Every registry case is saved mid-run from one namespace and resumed in each
of the others; the continuation equals the uninterrupted run. Bad files and
mismatched optimizers give a clear StateFileError.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from polyopt import interop, rules
from polyopt.interop import StateFileError
from tests.registry import CASES

SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "conv": (2, 3, 2), "scale": ()}
NAMES = [n.replace("/", ".") for n in SHAPES]
STEPS, SPLIT = 10, 4


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES.values()]
    grads = [[rng.normal(size=s) for s in SHAPES.values()] for _ in range(STEPS)]
    return params, grads


def _steps(rule, state, params, grads):
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return state, params


@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_in_every_namespace_continues_exactly(case, array_namespaces, to_namespace,
                                                      to_numpy):
    rule = case.build()
    params0, grads = _problem()
    _, expected = _steps(rule, rule.init(params0), params0, grads)

    source = array_namespaces[-1]  # torch or jax when named, else array_api_strict
    conv = [to_namespace(source, p) for p in params0]
    state, params = _steps(rule, rule.init(conv), conv,
                           [[to_namespace(source, a) for a in g] for g in grads[:SPLIT]])
    buffer = io.BytesIO()
    interop.save_state(buffer, state, algorithm=str(case), params=params, names=NAMES,
                       options=case.options, framework=source)
    for target in ["numpy", *array_namespaces]:
        buffer.seek(0)
        # the target lists its params in another order: matched by name
        order = [2, 0, 3, 1]
        target_params = [to_namespace(target, to_numpy(params[i])) for i in order]
        loaded = interop.load_state(buffer, rule.init(target_params), algorithm=str(case),
                                    params=target_params, names=[NAMES[i] for i in order])
        assert loaded.header["framework"] == source
        back = [None] * len(order)
        for position, i in enumerate(order):
            back[i] = target_params[position]
        # reorder the loaded state's per-param lists back to the original order
        state_back = _reorder(loaded.state, order)
        _, got = _steps(rule, state_back, back,
                        [[to_namespace(target, a) for a in g] for g in grads[SPLIT:]])
        for g, e in zip(got, expected):
            np.testing.assert_allclose(to_numpy(g), e, rtol=1e-13, atol=1e-15,
                                       err_msg=f"{source} -> {target}")


def _reorder(tree, order):
    if isinstance(tree, list):
        if not tree:
            return tree
        out = [None] * len(order)
        for position, i in enumerate(order):
            out[i] = tree[position]
        return out
    if isinstance(tree, tuple):
        items = [_reorder(t, order) for t in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return tree


def test_header_records_the_run():
    rule = rules.adam(learning_rate=0.1, amsgrad=True)
    params = [np.ones((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    buffer = io.BytesIO()
    interop.save_state(buffer, rule.init(params), algorithm="adam", params=params,
                       names=["w", "b"], options={"learning_rate": 0.1, "amsgrad": True},
                       hyperparameters={"learning_rate": np.asarray(0.05)}, framework="numpy")
    buffer.seek(0)
    header = interop.read_header(buffer)
    assert header["format"] == interop.FORMAT
    assert header["options"] == {"learning_rate": 0.1, "amsgrad": True}
    assert header["hyperparameters"] == {"learning_rate": 0.05}
    assert header["params"] == [{"name": "w", "shape": [2, 2], "dtype": "float32"},
                                {"name": "b", "shape": [3], "dtype": "float32"}]
    assert "max_second_moment/*" in header["layout"]


def _saved(rule=None, params=None, names=("w", "b")) -> bytes:
    rule = rule or rules.adam()
    params = params or [np.ones((2, 2)), np.zeros(3)]
    state = rule.init(params)
    _, state = rule.update([np.ones_like(p) for p in params], state, params)
    buffer = io.BytesIO()
    interop.save_state(buffer, state, algorithm="adam", params=params, names=list(names))
    return buffer.getvalue()


def _corrupt_header() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, __polyopt__=np.frombuffer(b"{not json", dtype=np.uint8))
    return buffer.getvalue()


def _without_entry() -> bytes:
    source = zipfile.ZipFile(io.BytesIO(_saved()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for item in source.namelist():
            if not item.startswith("first_moment/w"):
                out.writestr(item, source.read(item))
    return buffer.getvalue()


LOAD_ERRORS = [
    ("truncated", lambda: _saved()[:200], {}, r"not a readable polyopt state file"),
    ("not npz", lambda: b"hello", {}, r"not a readable polyopt state file"),
    ("no header", lambda: _npz(x=np.ones(2)), {}, r"no __polyopt__ header"),
    ("corrupt header", _corrupt_header, {}, r"corrupt header"),
    ("missing entry", _without_entry, {}, r"no entry 'first_moment/w'"),
    ("other algorithm", _saved, {"algorithm": "radam"},
     r"holds a 'adam' state, cannot load it into 'radam'"),
    ("renamed param", _saved, {"names": ["w", "bias"]},
     r"missing from the file \['bias'\], only in the file \['b'\]"),
    ("reshaped param", _saved, {"params": [np.ones((2, 2)), np.zeros(4)]},
     r"b: file \(3,\), params \(4,\)"),
    ("fewer params", _saved, {"params": [np.ones((2, 2))], "names": ["w"]},
     r"only in the file \['b'\]"),
    ("other layout", _saved, {"rule": rules.adam(amsgrad=True)},
     r"layouts differ .* only in the optimizer \['max_second_moment/\*'\]"),
    ("duplicate names", _saved, {"names": ["w", "w"]}, r"names must be unique"),
]


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("make, overrides, match", [e[1:] for e in LOAD_ERRORS],
                         ids=[e[0] for e in LOAD_ERRORS])
def test_bad_files_and_mismatches_raise_clear_errors(make, overrides, match):
    params = overrides.get("params", [np.ones((2, 2)), np.zeros(3)])
    rule = overrides.get("rule", rules.adam())
    with pytest.raises(StateFileError, match=match):
        interop.load_state(io.BytesIO(make()), rule.init(params),
                           algorithm=overrides.get("algorithm", "adam"), params=params,
                           names=overrides.get("names", ["w", "b"]))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(StateFileError, match=r"nope.npz: no such state file"):
        interop.load_state(path, rules.sgd().init([np.ones(1)]), algorithm="sgd",
                           params=[np.ones(1)])


def test_truncated_file_on_disk_is_named(tmp_path):
    path = tmp_path / "state.npz"
    path.write_bytes(_saved()[:-50])
    with pytest.raises(StateFileError, match=r"state.npz: not a readable"):
        interop.load_state(path, rules.adam().init([np.ones((2, 2)), np.zeros(3)]),
                           algorithm="adam", params=[np.ones((2, 2)), np.zeros(3)],
                           names=["w", "b"])


@pytest.mark.parametrize("names, match", [
    (["w"], r"names: 1 names for 2 params"),
    (["w", ""], r"non-empty strings without '/'"),
    (["w", "a/b"], r"non-empty strings without '/'"),
])
def test_bad_names_when_saving(names, match):
    params = [np.ones(2), np.ones(3)]
    with pytest.raises(StateFileError, match=match):
        interop.save_state(io.BytesIO(), rules.adam().init(params), algorithm="adam",
                           params=params, names=names)


def test_a_state_for_other_params_is_refused_when_saving():
    with pytest.raises(StateFileError, match=r"first_moment holds 2 arrays for 1 params"):
        state = rules.adam().init([np.ones(2), np.ones(3)])
        interop.save_state(io.BytesIO(), state, algorithm="adam", params=[np.ones(2)])


def test_values_take_the_templates_dtype():
    loaded = interop.load_state(
        io.BytesIO(_saved()), rules.adam().init([np.ones((2, 2), np.float32),
                                                 np.zeros(3, np.float32)]),
        algorithm="adam", params=[np.ones((2, 2)), np.zeros(3)], names=["w", "b"])
    assert loaded.state.first_moment[0].dtype == np.float32
    assert int(loaded.state.count) == 1
