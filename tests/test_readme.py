"""The README and the docs pages stay true: their tables are generated from the
code, their examples run, their links lead somewhere.

README.md is the front page; the long sections live in docs/*.md. Every
```python block of README.md and of the docs pages runs here, in the main
pytest process (torch and jax, KERAS_BACKEND=jax). Blocks fenced ```python
keras run once per Keras backend: README.md's in tests/test_keras_interop.py,
the docs pages' here (marked ``keras``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from polyopt import hyper, native

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
RULES_PAGE = ROOT / "docs" / "rules.md"
CONVENTIONS_PAGE = ROOT / "docs" / "conventions.md"
MAX_README_LINES = 250


def _blocks(pages: list[Path], fence: str) -> list[tuple[str, str]]:
    """(id, code) of every block fenced exactly ```{fence} in ``pages``."""
    found = []
    for page in pages:
        name = page.relative_to(ROOT).as_posix()
        blocks = re.findall(rf"```{fence}\n(.*?)```", page.read_text(), re.DOTALL)
        found += [(f"{name}:block{i}", code) for i, code in enumerate(blocks)]
    return found


BLOCKS = _blocks(PAGES, "python")
KERAS_DOC_BLOCKS = _blocks(DOCS, "python keras")

REGENERATE = "out of date: run `python -m tests.test_readme` to regenerate the docs' tables"


def test_rules_table_is_generated_from_the_spec():
    assert hyper.defaults_table() in RULES_PAGE.read_text(), REGENERATE


def test_conventions_table_is_generated_from_the_presets():
    assert native.markdown_table() in CONVENTIONS_PAGE.read_text(), REGENERATE


def test_the_two_commands():
    """The main job (the cross-framework matrix) first, then the tests, which CI runs."""
    section = README.split("## The two commands", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL).group(1)
    assert block.splitlines() == ["python3 noxw.py -s torch tf jax compare",
                                  "python3 noxw.py -s tests"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # The line that runs nox: `"$python" noxw.py -s ...`, as the README does.
    sessions = [line for line in ci if re.match(r'\s*"\$python" noxw\.py -s ', line)]
    assert len(sessions) == 1 and re.search(r'noxw\.py -s tests\b', sessions[0]), sessions


def test_every_rule_is_in_the_table():
    from polyopt import rules

    page = RULES_PAGE.read_text()
    for name in hyper.SPECS:
        assert f"| `{name}` |" in page
        assert callable(getattr(rules, name))


@pytest.mark.parametrize("name,block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_examples_run(name, block):
    exec(compile(block, name, "exec"), {})  # noqa: S102 - our own docs


@pytest.mark.keras
@pytest.mark.parametrize("name,block", KERAS_DOC_BLOCKS, ids=[n for n, _ in KERAS_DOC_BLOCKS])
def test_keras_examples_in_the_docs_run(name, block):
    exec(compile(block, name, "exec"), {})  # noqa: S102 - our own docs


def test_there_are_examples():
    """One example per adapter on the front page, and the docs' examples."""
    readme_blocks = [code for name, code in BLOCKS if name.startswith("README.md:")]
    readme_blocks += re.findall(r"```python keras\n(.*?)```", README, re.DOTALL)
    for module in ("polyopt.torch", "polyopt.keras", "polyopt.optax"):
        assert any(f"import {module}" in code for code in readme_blocks), module
    assert len(BLOCKS) >= 9 and KERAS_DOC_BLOCKS


def test_readme_is_a_front_page():
    lines = len(README.splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines: move sections to docs/"
    assert re.search(r"^!\[[^\]]*\]\(docs/matrix/[^)]+\.png\)$", README, re.MULTILINE)


# [text](target) and ![alt](target), outside code blocks and code spans
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_point_to_files(page):
    targets = [t for t in _links(page.read_text()) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    missing = [t for t in targets
               if t.split("#")[0] and not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_the_link_check_finds_links():
    assert "docs/matrix.md" in _links(README)
    assert "../README.md" in _links((ROOT / "docs" / "torch.md").read_text())
    assert _links("`[a](b)` and\n```\n[c](d)\n```\n[e](f#g)") == ["f#g"]


def _regenerate() -> None:
    """Rewrite the docs' generated tables: ``python -m tests.test_readme``."""
    for path, header, table in ((RULES_PAGE, "| rule | arguments and defaults |",
                                 hyper.defaults_table()),
                                (CONVENTIONS_PAGE, "| native optimizer (defaults) |",
                                 native.markdown_table())):
        text = path.read_text()
        start = text.index(header)
        end = text.find("\n\n", start)
        text = text[:start] + table + (text[end:] if end >= 0 else "\n")
        path.write_text(text)


if __name__ == "__main__":
    _regenerate()
