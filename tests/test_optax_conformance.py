"""The conformance machinery (``python -m conformance``, nox -s conformance) at work.

One small test file of the optax wheel (optax/_src/float64_test.py) runs
through the optax plugin in its own pytest process: the natives with a preset
are replaced by polyopt.optax (and pass), the others skip and are counted;
then the verdict's rules are checked on that run's real results.
"""

from __future__ import annotations

import json

import pytest

from conformance import _natives, suite

_FILE = "optax/_src/float64_test.py"
_POLYOPT = {"adagrad", "adam", "adamw", "lamb", "rmsprop", "sgd",
            "sign_sgd"}  # (sign_sgd: alias.sgd)
_NO_PRESET = {"fromage", "noisy_sgd"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    optax = suite.SUITES["optax"]
    one_file = suite.Suite("optax", optax.plugin, [_FILE], env=optax.env)
    return suite.run(one_file, [], tmp_path_factory.mktemp("conformance"))


def _by_name(results):
    return {test.rsplit("test_mixed_dtype_input_outputs_", 1)[-1]: r
            for test, r in results.items()}


def test_the_plugin_substitutes_polyopt_for_the_natives_with_a_preset(results):
    named = _by_name(results)
    for name in _POLYOPT:
        assert named[name]["polyopt"] and named[name]["outcome"] == "passed", (name, named[name])
    for name in _NO_PRESET:
        assert named[name]["no_preset"] == [f"optax.{name}"] and named[name]["outcome"] == (
            "skipped"), (name, named[name])
    assert not named["clip"]["polyopt"] and not named["clip"]["no_preset"]
    counts, problems = suite.judge(results, {"causes": {}, "failures": {}}, complete=True)
    assert problems == []
    assert counts["in scope"] == counts["passed"] == len(_POLYOPT)
    assert counts["skipped (no preset)"] == len(_NO_PRESET)


def test_the_verdict_fails_on_unlisted_failures_and_on_listed_passes(results):
    test = next(t for t in results if t.endswith("_adam"))
    cause = {"class": "missing feature", "reason": "r", "match": "boom"}
    listed = {"causes": {"boom": cause}, "failures": {test: "boom"}}
    _, problems = suite.judge(results, listed, complete=True)
    assert problems == [f"NOW PASSES (remove it from the expectations): {test}"]

    failing = {**results, test: {**results[test], "outcome": "failed",
                                 "message": "ValueError: boom"}}
    _, problems = suite.judge(failing, {"causes": {}, "failures": {}}, complete=True)
    assert len(problems) == 1 and problems[0].startswith(f"UNEXPECTED FAILURE: {test}")
    counts, problems = suite.judge(failing, listed, complete=True)
    assert problems == [] and counts["expected failures"] == 1 and counts["by cause"] == {
        "boom": 1}

    other = {**failing, test: {**failing[test], "message": "TypeError: another"}}
    _, problems = suite.judge(other, listed, complete=True)
    assert len(problems) == 1 and problems[0].startswith("FAILS FOR ANOTHER REASON")
    gone = {t: r for t, r in failing.items() if t != test}
    _, problems = suite.judge(gone, listed, complete=True)
    assert problems == [f"LISTED BUT NOT RUN (remove it): {test}"]


def test_the_committed_expectations_are_well_formed():
    for name in suite.SUITES:
        expected = suite.load_expected(name)  # raises on an unknown class or cause
        assert "unclassified" not in set(expected["failures"].values()), name
        for key, cause in expected["causes"].items():
            assert cause["reason"] and cause["class"] in suite.CLASSES, (name, key)
            if cause["class"] == "deliberate difference":
                assert cause.get("docs"), f"{name}: {key} names no docs line"


def test_presets_select_variants_by_the_natives_arguments():
    variants = _natives.presets("keras.optimizers.")["keras.optimizers.Adam"]
    chosen, rest = _natives.choose(variants, {"amsgrad": True, "beta_1": 0.8})
    assert chosen.key == "keras.optimizers.Adam(amsgrad=True)" and rest == {"beta_1": 0.8}
    chosen, rest = _natives.choose(variants, {"amsgrad": False})
    assert chosen.key == "keras.optimizers.Adam" and rest == {"amsgrad": False}


def test_the_readme_and_docs_tables_are_the_committed_summary():
    summary = json.loads(suite.SUMMARY.read_text())
    for path, table in ((suite.README, suite.readme_markdown(summary)),
                        (suite.DOCS, suite.summary_markdown(summary))):
        text = path.read_text()
        start = text.index(suite._START) + len(suite._START)
        assert text[start:text.index(suite._END)].strip() == table.strip(), path
