"""Every rule gives the same numbers in every array namespace.

This is the test that keeps "written once" honest: the same rule runs under
array_api_strict (only the standard), numpy, and torch and jax arrays
through array_api_compat, eagerly; float64 results agree to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import rules
from tests.registry import CASES, Case

SHAPES = [(4, 3), (3,), (2, 3, 2), ()]
STEPS = 12


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _run(case_or_rule, namespace, to_namespace, to_numpy, dtype="float64"):
    rule = case_or_rule.build() if isinstance(case_or_rule, Case) else case_or_rule
    params0, grads = _problem()
    params = [to_namespace(namespace, p.astype(dtype)) for p in params0]
    state = rule.init(params)
    for g in grads:
        g = [to_namespace(namespace, a.astype(dtype)) for a in g]
        if hasattr(rule, "perturb"):
            # SAM: the test feeds the same grads at the perturbed point (the
            # namespaces must agree on perturb too)
            perturbed = rule.perturb(params, g)
            assert len(perturbed) == len(params)
        updates, state = rule.update(g, state, params)
        params = [p + u for p, u in zip(params, updates)]
    return [to_numpy(p) for p in params], state


SAM_CASES = [
    Case("sam", {"rho": 0.05}, inner=("sgd", {"learning_rate": 0.05, "momentum": 0.9})),
    Case("sam", {"rho": 0.1, "adaptive": True}, inner=("adam", {})),
]
PIECES = [
    lambda: rules.chain(rules.clip_by_global_norm(1.0), rules.centralize(),
                        rules.add_decayed_weights(1e-3), rules.sgd(learning_rate=0.1)),
    lambda: rules.chain(rules.adam(), rules.decoupled_weight_decay(0.01, learning_rate=1e-3)),
    lambda: rules.chain(rules.centralize(keep_axis=-1), rules.clip_by_global_norm(0.5, eps=1e-6),
                        rules.rmsprop()),
]


@pytest.mark.parametrize("case", CASES + SAM_CASES, ids=str)
def test_rule_agrees_across_namespaces(case, array_namespaces, to_namespace, to_numpy):
    reference, _ = _run(case, "numpy", to_namespace, to_numpy)
    for name in array_namespaces:
        got, _ = _run(case, name, to_namespace, to_numpy)
        for r, g in zip(reference, got):
            assert g.dtype == np.float64, name
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15, err_msg=name)
    # the rule really moved the params
    start, _ = _problem()
    assert max(float(np.max(np.abs(r - s))) for r, s in zip(reference, start)) > 1e-4


@pytest.mark.parametrize("make", PIECES, ids=["clip-gc-l2-sgd", "adam-decoupled", "gc-last-rms"])
def test_pieces_agree_across_namespaces(make, array_namespaces, to_namespace, to_numpy):
    reference, _ = _run(make(), "numpy", to_namespace, to_numpy)
    for name in array_namespaces:
        got, _ = _run(make(), name, to_namespace, to_numpy)
        for r, g in zip(reference, got):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c.rule in ("adam", "sgd", "rmsprop")][:6],
                         ids=str)
def test_float32_stays_float32(case, array_namespaces, to_namespace, to_numpy):
    """No silent float64 promotion: float32 params give float32 updates and state."""
    for name in array_namespaces:
        got, state = _run(case, name, to_namespace, to_numpy, dtype="float32")
        assert all(g.dtype == np.float32 for g in got), name
        for slot in state[1:]:
            for s in slot if isinstance(slot, list) else []:
                assert to_numpy(s).dtype == np.float32, name


def test_float64_learning_rate_array_does_not_promote_float32(array_namespaces, to_namespace,
                                                              to_numpy):
    for name in array_namespaces:
        lr = to_namespace(name, np.asarray(0.1, dtype=np.float64))
        rule = rules.adam(learning_rate=lr)
        p = [to_namespace(name, np.ones(3, dtype=np.float32))]
        updates, state = rule.update(p, rule.init(p), p)
        assert to_numpy(updates[0]).dtype == np.float32, name


def test_schedule_learning_rate_is_called_with_the_count(to_namespace, to_numpy):
    seen = []

    def schedule(count):
        seen.append(int(np.asarray(count)))
        return 0.1 * (count + 1)

    rule = rules.sgd(learning_rate=schedule)
    params = [np.zeros(2)]
    state = rule.init(params)
    for _ in range(3):
        updates, state = rule.update([np.ones(2)], state, params)
        params = [p + u for p, u in zip(params, updates)]
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(params[0], -(0.1 + 0.2 + 0.3) * np.ones(2), rtol=1e-14)


def test_the_documented_array_api_subset_is_exactly_what_the_core_calls():
    """The rules, the schedules and the fused operations as written for every
    namespace (``polyopt._namespace.Fused``; torch's kernels are ``TorchFused``)."""
    import inspect
    import re
    from pathlib import Path

    from polyopt._namespace import Fused

    root = Path(rules.__file__).resolve().parents[1]
    sources = [*sorted((root / "rules").glob("*.py")), root / "schedules.py"]
    texts = [path.read_text() for path in sources] + [inspect.getsource(Fused)]
    used = set()
    for text in texts:
        used |= set(re.findall(r"\bxp\.([A-Za-z_][A-Za-z_0-9]*)", text))
    assert used == set(rules.ARRAY_API_SUBSET)
    import array_api_strict

    missing = [name for name in used if not hasattr(array_api_strict, name)]
    assert missing == [], "not in the Array API standard"


def _runtime_names(case: Case) -> list[str]:
    from polyopt import hyper

    names = [h.name for h in hyper.spec(case.rule) if h.runtime]
    return [n for n in names if n in case.options or hyper.spec(case.rule)[n].default != 0]


RUNTIME_CASES = [c for c in CASES if c.inner is None]


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=str)
def test_runtime_hyperparameters_as_0d_arrays(case, array_namespaces, to_namespace, to_numpy):
    """learning_rate, momentum and b1 (what torch schedulers, Keras variables and
    optax.inject_hyperparams change while training) may be 0-d arrays of the
    params' namespace: same numbers as Python floats."""
    from polyopt import hyper

    spec = hyper.spec(case.rule)
    names = _runtime_names(case)
    assert names, "every rule has a runtime learning rate"
    reference, _ = _run(case, "numpy", to_namespace, to_numpy)
    for name in array_namespaces:
        options = {**spec.defaults(), **case.options}
        arrays = {n: to_namespace(name, np.asarray(float(options[n]))) for n in names}
        rule = getattr(rules, case.rule)(**{**case.options, **arrays})
        got, _ = _run(rule, name, to_namespace, to_numpy)
        for r, g in zip(reference, got):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15, err_msg=name)


class _RecordingNamespace:
    """An adapter-style namespace: forwards to array_api_compat.numpy, records what is used."""

    def __init__(self):
        import array_api_compat.numpy as np_compat

        self._inner = np_compat
        self.used: set[str] = set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("case", CASES + SAM_CASES, ids=str)
def test_a_registered_namespace_is_used_and_needs_only_the_subset(case, to_namespace, to_numpy):
    """What the Keras adapter does for TensorFlow: register a namespace for arrays
    array_api_compat does not know. The rules must use it, and only the names of
    ARRAY_API_SUBSET from it."""
    recording = _RecordingNamespace()
    unregister = rules.register_namespace(lambda a: isinstance(a, (np.ndarray, np.generic)),
                                          recording)
    try:
        got, _ = _run(case, "numpy", to_namespace, to_numpy)
    finally:
        unregister()
    reference, _ = _run(case, "numpy", to_namespace, to_numpy)
    for r, g in zip(reference, got):
        np.testing.assert_array_equal(g, r)
    assert recording.used, "the registered namespace was not used"
    assert recording.used <= set(rules.ARRAY_API_SUBSET), recording.used - rules.ARRAY_API_SUBSET


def test_register_namespace_checks_its_argument():
    with pytest.raises(TypeError, match="is_array must be callable"):
        rules.register_namespace("tf.Tensor", object())


def test_schedules_use_a_registered_namespace_and_only_the_subset():
    from polyopt import schedules

    made = [schedules.one_cycle(100, 0.1), schedules.one_cycle(100, 0.1, anneal="linear",
                                                               three_phase=True),
            schedules.warmup_cosine_decay(0.0, 1.0, 10, 100), schedules.step_decay(0.1, 0.5, 10),
            schedules.exponential_decay(0.1, 10, 0.5, staircase=True),
            schedules.rampup_sustain_decay(1e-5, 1e-3, 1e-6, 5, 3, 0.8)]
    recording = _RecordingNamespace()
    unregister = rules.register_namespace(lambda a: isinstance(a, (np.ndarray, np.generic)),
                                          recording)
    try:
        for schedule in made:
            for count in (0, 7, 42, 99):
                got = schedule(np.asarray(count, dtype=np.int32))
                assert float(got) == pytest.approx(schedule(count), rel=1e-14)
    finally:
        unregister()
    functions = {name for name in recording.used if not name.startswith("__")}
    assert functions <= set(rules.ARRAY_API_SUBSET), functions - rules.ARRAY_API_SUBSET
    assert {"where"} <= recording.used
