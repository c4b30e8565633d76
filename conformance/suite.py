"""Run the frameworks' own optimizer tests against polyopt and judge the outcome.

    python -m conformance                      # every suite
    python -m conformance optax keras-jax      # some suites
    python -m conformance optax -- -k adam     # arguments after -- go to pytest
    python -m conformance optax --update       # rewrite the expectations' failure list

Suites: optax (the test files shipped in the optax wheel), keras-<backend>
(keras/src/optimizers/*_test.py from the Keras wheel, one backend per process)
and torch (conformance/torch_optim_db_test.py, driven by torch's own
optimizer database). Each runs in its own pytest process with its plugin,
which substitutes polyopt for the natives of polyopt.native.PRESETS.

conformance/expected/<suite>.toml lists every test that still fails, each
with a cause (class and reason). The run fails on a failure that is not
listed, on a listed failure that now passes (remove it: the list only
shrinks), on a listed failure whose message no longer matches its cause, and
on a failure of a test that never reached an optimizer. ``--update`` rewrites
the list from the run, giving each failure the first cause whose ``match``
regex finds its message (else "unclassified", which never passes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "conformance"
EXPECTED = HERE / "expected"
SUMMARY = EXPECTED / "summary.json"
DOCS = ROOT / "docs" / "conformance.md"
README = ROOT / "README.md"
SITE = Path(sysconfig.get_paths()["purelib"])
CLASSES = ("missing feature", "deliberate difference", "reads native private internals",
           "native fails the check", "unclassified")


@dataclass
class Suite:
    name: str
    plugin: str
    files: list[str]  # globs, relative to rootdir
    rootdir: Path = SITE
    env: dict = field(default_factory=dict)
    #: files not run, with the reason
    left_out: dict = field(default_factory=dict)


_KERAS_FILES = ["keras/src/optimizers/*_test.py"]
SUITES = {
    "optax": Suite("optax", "conformance.optax_plugin",
                   ["optax/_src/*_test.py", "optax/contrib/*_test.py"],
                   env={"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
                   left_out={"optax/_src/linear_algebra_test.py":
                             "imports flax (not installed); tests no optimizer"}),
    **{f"keras-{backend}": Suite(f"keras-{backend}", "conformance.keras_plugin", _KERAS_FILES,
                                 env={"KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"})
       for backend in ("tensorflow", "jax", "torch")},
    "torch": Suite("torch", "conformance._record", ["conformance/torch_optim_db_test.py"],
                   rootdir=ROOT, env={"KERAS_BACKEND": "jax"}),
}


# --------------------------------------------------------------------------
# running


def files_of(suite: Suite) -> list[str]:
    found = sorted({str(p.relative_to(suite.rootdir)) for pattern in suite.files
                    for p in suite.rootdir.glob(pattern)})
    return [f for f in found if f not in suite.left_out]


def run(suite: Suite, pytest_args: list[str], keep: Path | None = None) -> dict[str, dict]:
    """Run the suite's pytest process; returns its recorded results (also written to
    ``keep``/<suite>.json when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = (keep or Path(tmp)) / f"{suite.name}.json"
        env = {**os.environ, **suite.env, "POLYOPT_CONFORMANCE_OUT": str(out),
               "PYTHONPATH": os.pathsep.join(
                   [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, "-m", "pytest", "-q", "-p", suite.plugin,
                   "-c", str(HERE / "pytest.ini"), "--rootdir", str(suite.rootdir),
                   *pytest_args, *files_of(suite)]
        print(f"[{suite.name}] {' '.join(command[3:])}", flush=True)
        subprocess.run(command, cwd=suite.rootdir, env=env, check=False)
        if not out.exists():
            raise SystemExit(f"[{suite.name}] pytest wrote no results (it crashed)")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------
# expectations


def load_expected(name: str) -> dict:
    path = EXPECTED / f"{name}.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    causes = data.get("causes", {})
    causes.setdefault("unclassified", {"class": "unclassified",
                                       "reason": "a failure no cause's match finds"})
    for key, cause in causes.items():
        if cause.get("class") not in CLASSES:
            raise SystemExit(f"{path}: cause {key!r} has class {cause.get('class')!r}; "
                             f"allowed: {CLASSES}")
    for test, key in data.get("failures", {}).items():
        if key not in causes:
            raise SystemExit(f"{path}: {test} names the unknown cause {key!r}")
    return {"causes": causes, "failures": data.get("failures", {})}


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a TOML basic string


def write_expected(name: str, expected: dict, results: dict[str, dict]) -> None:
    lines = [f"# Expected failures of the {name} conformance suite (python -m conformance "
             f"{name}).", "# Causes: class is one of " + ", ".join(CLASSES[:-1]) + ".",
             "# failures: test -> cause; `python -m conformance "
             f"{name} --update` rewrites that table from a run.", ""]
    for key, cause in expected["causes"].items():
        if cause["class"] == "unclassified":
            continue
        lines.append(f"[causes.{_quote(key)}]")
        for field_name in ("class", "reason", "docs", "match"):
            if field_name in cause:
                lines.append(f"{field_name} = {_quote(cause[field_name])}")
        lines.append("")
    lines.append("[failures]")
    for test, key in sorted(expected["failures"].items()):
        params = results.get(test, {}).get("params", "")
        lines.append(f"{_quote(test)} = {_quote(key)}" + (f"  # {params}" if params else ""))
    (EXPECTED / f"{name}.toml").write_text("\n".join(lines) + "\n")


def classify(expected: dict, message: str) -> str:
    for key, cause in expected["causes"].items():
        if cause.get("match") and re.search(cause["match"], message):
            return key
    return "unclassified"


def keep_or_classify(expected: dict, test: str, message: str) -> str:
    """A listed failure keeps its cause while that cause's match finds the message."""
    key = expected["failures"].get(test)
    cause = expected["causes"].get(key, {})
    if key and cause.get("class") != "unclassified" and re.search(
            cause.get("match", ""), message):
        return key
    return classify(expected, message)


# --------------------------------------------------------------------------
# the verdict


def judge(results: dict[str, dict], expected: dict, complete: bool) -> tuple[dict, list[str]]:
    """Counts and the list of problems (empty: the suite conforms as expected)."""
    counts = dict.fromkeys(("in scope", "passed", "expected failures", "skipped (no preset)",
                            "skipped by the test", "not reaching an optimizer"), 0)
    by_cause: dict[str, int] = {}
    problems = []
    listed = expected["failures"]
    for test, result in sorted(results.items()):
        failed = result["outcome"] == "failed"
        if result.get("no_preset"):
            counts["skipped (no preset)"] += 1
            continue
        if not result.get("polyopt") and not result.get("collection"):
            counts["not reaching an optimizer"] += 1
            if failed and test not in listed:
                problems.append(f"FAILS without reaching an optimizer: {test}\n    "
                                f"{_first(result['message'])}")
            continue
        counts["in scope"] += 1
        if result["outcome"] == "skipped":
            counts["skipped by the test"] += 1
        elif not failed:
            counts["passed"] += 1
            if test in listed:
                problems.append(f"NOW PASSES (remove it from the expectations): {test}")
        elif test not in listed:
            problems.append(f"UNEXPECTED FAILURE: {test} {result.get('params', '')}\n    "
                            f"{_first(result['message'])}")
        else:
            cause = expected["causes"][listed[test]]
            if cause["class"] == "unclassified":
                problems.append(f"UNCLASSIFIED FAILURE: {test}\n    {_first(result['message'])}")
            elif cause.get("match") and not re.search(cause["match"], result["message"]):
                problems.append(f"FAILS FOR ANOTHER REASON than {listed[test]!r}: {test}\n    "
                                f"{_first(result['message'])}")
            else:
                counts["expected failures"] += 1
                by_cause[listed[test]] = by_cause.get(listed[test], 0) + 1
    if complete:
        problems += [f"LISTED BUT NOT RUN (remove it): {test}"
                     for test in sorted(set(listed) - set(results))]
    counts["by cause"] = by_cause
    return counts, problems


def _first(message: str) -> str:
    """The line of a failure message that names the error."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith(
        ("For simplicity, JAX", "-----", "See https://"))]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Failed)\b", line)]
    return ((errors or lines or ["(no message)"])[-1])[:400]


# --------------------------------------------------------------------------
# the summary in docs/conformance.md

_START, _END = "<!-- conformance-counts:start -->", "<!-- conformance-counts:end -->"


def summary_markdown(summary: dict) -> str:
    rows = ["| suite | in scope | passed | expected failures | skipped (no preset) | "
            "skipped by the test |", "|---|---:|---:|---:|---:|---:|"]
    causes = ["| suite | cause | class | tests | reason |", "|---|---|---|---:|---|"]
    for name, entry in summary.items():
        c = entry["counts"]
        rows.append(f"| {name} | {c['in scope']} | {c['passed']} | {c['expected failures']} | "
                    f"{c['skipped (no preset)']} | {c['skipped by the test']} |")
        for key, n in sorted(c["by cause"].items(), key=lambda kv: -kv[1]):
            cause = entry["causes"][key]
            causes.append(f"| {name} | {key} | {cause['class']} | {n} | "
                          f"{cause['reason'].replace('|', '/')} |")
    return "\n".join(rows) + "\n\nExpected failures by cause:\n\n" + "\n".join(causes)


def readme_markdown(summary: dict) -> str:
    """The README's table: counts per suite and expected failures per class."""
    rows = ["| suite | in scope | passed | " + " | ".join(CLASSES[:-1]) + " |",
            "|---|---:|---:|" + "---:|" * (len(CLASSES) - 1)]
    for name, entry in summary.items():
        c = entry["counts"]
        per_class = {k: 0 for k in CLASSES}
        for key, n in c["by cause"].items():
            per_class[entry["causes"][key]["class"]] += n
        rows.append(f"| {name} | {c['in scope']} | {c['passed']} | "
                    + " | ".join(str(per_class[k]) for k in CLASSES[:-1]) + " |")
    return "\n".join(rows)


def _replace_between(path: Path, text: str) -> None:
    old = path.read_text()
    start, end = old.index(_START) + len(_START), old.index(_END)
    path.write_text(old[:start] + "\n" + text + "\n" + old[end:])


def write_docs(summary: dict) -> None:
    _replace_between(DOCS, summary_markdown(summary))
    _replace_between(README, readme_markdown(summary))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--update", action="store_true",
                        help="rewrite the failures table of each suite's expectations")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="keep each suite's recorded results in DIR/<suite>.json")
    parser.add_argument("--rejudge", action="store_true",
                        help="judge the results kept in --results-dir instead of running")
    args = parser.parse_args(argv)
    if args.rejudge and not args.results_dir:
        parser.error("--rejudge needs --results-dir")
    names = args.suites or list(SUITES)
    unknown = sorted(set(names) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    failed = []
    for name in names:
        suite = SUITES[name]
        if args.rejudge:
            results = json.loads((args.results_dir / f"{name}.json").read_text())
        else:
            if args.results_dir:
                args.results_dir.mkdir(parents=True, exist_ok=True)
            results = run(suite, pytest_args, args.results_dir)
        expected = load_expected(name)
        if args.update:
            expected["failures"] = {
                test: keep_or_classify(expected, test, r["message"])
                for test, r in results.items() if r["outcome"] == "failed"
                and not r.get("no_preset")}
            write_expected(name, expected, results)
        counts, problems = judge(results, expected, complete=not pytest_args)
        print(f"\n[{name}] " + ", ".join(f"{k}: {v}" for k, v in counts.items()
                                         if k != "by cause"))
        for key, n in sorted(counts["by cause"].items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d}  {key} ({expected['causes'][key]['class']})")
        for problem in problems:
            print(f"  {problem}")
        if problems:
            failed.append(name)
        elif not pytest_args:
            summary[name] = {"counts": counts, "causes": {
                k: expected["causes"][k] for k in counts["by cause"]}}
    if not pytest_args and not failed:
        summary = {k: summary[k] for k in SUITES if k in summary}
        SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
        if DOCS.exists():
            write_docs(summary)
    if failed:
        print(f"\nconformance: FAILED: {', '.join(failed)}")
        return 1
    print(f"\nconformance: {len(names)} suite(s) as expected")
    return 0


