"""The recording half of every conformance plugin (loaded by pytest with ``-p``).

Each substituted native records, while a test runs, that the test used a
polyopt optimizer (:func:`used`) or reached a native that polyopt has no
preset for (:func:`no_preset`, which then skips the test). At the end of the
run every test's outcome, failure text and those records are written as JSON
to the file named by ``POLYOPT_CONFORMANCE_OUT``; :mod:`conformance.__main__`
judges them against the expectations file.
"""

from __future__ import annotations

import json
import os
import re
import unittest
from pathlib import Path

import pytest

_current: dict[str, set] = {"polyopt": set(), "no_preset": set()}
_results: dict[str, dict] = {}
_MESSAGE_CHARS = 4000


def used(native: str) -> None:
    """The running test called the polyopt substitute of ``native``."""
    _current["polyopt"].add(native)


def no_preset(native: str) -> None:
    """The running test reached ``native``, which polyopt has no preset for: skip it."""
    _current["no_preset"].add(native)
    raise unittest.SkipTest(f"polyopt has no preset for {native}")


def _params(item: pytest.Item) -> str:
    """absl's parameter text of a parameterized test ('' for any other test)."""
    reprs = getattr(getattr(item, "cls", None), "_test_params_reprs", None) or {}
    text = getattr(getattr(item, "obj", None), "__x_params_repr__", None) or reprs.get(
        item.name, "")
    if not text and hasattr(item, "callspec"):
        text = item.callspec.id
    text = re.sub(r" at 0x[0-9a-f]+", "", str(text))  # addresses change from run to run
    return " ".join(text.split())[:300]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["polyopt"], _current["no_preset"] = set(), set()
    entry = _results.setdefault(item.nodeid, {"outcome": "passed", "message": ""})
    entry["params"] = _params(item)
    try:
        return (yield)
    finally:
        entry["polyopt"] = sorted(_current["polyopt"])
        entry["no_preset"] = sorted(_current["no_preset"])


def pytest_runtest_logreport(report) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.failed:
        entry["outcome"] = "failed"
        text = report.longreprtext or ""
        # the exception line(s) of the traceback, where pytest marks them with "E "
        lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
        entry["message"] = (entry["message"] + "\n" + "\n".join(lines or [text]))[
            -_MESSAGE_CHARS:].strip()
    elif report.skipped and entry["outcome"] == "passed" and report.when != "teardown":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)


def pytest_collectreport(report) -> None:
    if report.failed:  # a test file that cannot be imported
        _results[report.nodeid] = {"outcome": "failed", "message": report.longreprtext[
            -_MESSAGE_CHARS:], "params": "", "polyopt": [], "no_preset": [],
            "collection": True}


def pytest_sessionfinish(session, exitstatus) -> None:
    out = os.environ.get("POLYOPT_CONFORMANCE_OUT")
    if out:
        Path(out).write_text(json.dumps(_results, indent=1, sort_keys=True))
