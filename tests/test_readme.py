"""The README stays true: its tables are generated from the code, its examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from polyopt import hyper, native

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


REGENERATE = "out of date: run `python -m tests.test_readme` to regenerate the README's tables"


def test_rules_table_is_generated_from_the_spec():
    assert hyper.defaults_table() in README, REGENERATE


def test_conventions_table_is_generated_from_the_presets():
    assert native.markdown_table() in README, REGENERATE


def test_the_two_commands():
    """The main job (the cross-framework matrix) first, then the tests, which CI runs."""
    section = README.split("## The two commands", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL).group(1)
    assert block.splitlines() == ["nox -s torch tf jax compare", "nox -s tests"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    sessions = [line for line in ci if re.match(r'\s*"\$bootstrap/bin/nox" -s ', line)]
    assert len(sessions) == 1 and re.search(r'nox" -s tests\b', sessions[0]), sessions


def test_every_rule_is_in_the_table():
    from polyopt import rules

    for name in hyper.SPECS:
        assert f"| `{name}` |" in README
        assert callable(getattr(rules, name))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_examples_run(block):
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README


def test_there_are_examples():
    assert len(BLOCKS) >= 2


def _regenerate() -> None:
    """Rewrite the README's generated tables: ``python -m tests.test_readme``."""
    path = Path(__file__).resolve().parents[1] / "README.md"
    text = path.read_text()
    for header, table in (("| rule | arguments and defaults |", hyper.defaults_table()),
                          ("| native optimizer (defaults) |", native.markdown_table())):
        start = text.index(header)
        end = text.find("\n\n", start)
        text = text[:start] + table + (text[end:] if end >= 0 else "\n")
    path.write_text(text)


if __name__ == "__main__":
    _regenerate()
