"""Packaging and test-infrastructure checks.

- ``import polyopt`` (and every core module) imports no deep-learning framework;
  importing one adapter imports no other framework; adapters import as
  polyopt.<name> from the installed (editable) project and from the wheel.
- The wheel, built offline from the work tree, holds every package (core and
  published adapters, mapped from adapters/<name> to polyopt.<name>), imports
  from an unpacked copy, and declares only numpy and array-api-compat as core
  dependencies.
- CI runs the README's test command.
- POLYOPT_FRAMEWORKS is validated (tests/conftest.py).
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FRAMEWORKS = ("torch", "tensorflow", "jax", "keras", "optax")
CORE_DEPENDENCIES = {"numpy", "array-api-compat"}

# adapter -> the frameworks that importing it may bring in


def _package_dirs() -> dict[str, Path]:
    """pyproject's packages and the directory each one comes from."""
    mapping = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
    dirs = {}
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            parent = ".".join(parts[:cut])
            if parent in mapping:
                dirs[package] = ROOT / mapping[parent] / Path(*parts[cut:])
                break
        else:
            dirs[package] = ROOT / Path(*parts)
    return dirs


PACKAGES = _package_dirs()
PUBLISHED_ADAPTERS = sorted(
    p.split(".")[1] for p in PACKAGES if p.count(".") == 1 and PACKAGES[p].parent.name == "adapters"
)


def _python(code: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )


def _imported_frameworks(statement: str, cwd: Path = ROOT, **env: str) -> set[str]:
    proc = _python(
        f"""
        import json, sys
        {statement}
        print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))
        """,
        cwd=cwd, **env,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------
# (a) imports


def test_import_polyopt_imports_no_framework():
    assert _imported_frameworks("import polyopt") == set()


def test_no_core_module_imports_a_framework():
    # polyopt.__path__[0] is the core; the adapters (appended in a source checkout) import
    # their framework by design
    statement = (
        "import importlib, pkgutil, polyopt\n"
        "        for m in pkgutil.walk_packages(polyopt.__path__[:1], 'polyopt.'):\n"
        "            importlib.import_module(m.name)"
    )
    assert _imported_frameworks(statement) == set()


def test_package_exposes_version():
    import polyopt

    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", polyopt.__version__)


# --------------------------------------------------------------------------
# (b) the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the work tree: offline, no build isolation."""
    import setuptools  # the build backend, from the [dev] extra: --no-build-isolation

    assert int(setuptools.__version__.split(".")[0]) >= 77, setuptools.__version__
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".nox", ".venv", "build", "dist", "*.egg-info", "__pycache__",
        ".pytest_cache", ".hypothesis", ".ruff_cache", "lab-output", "runs",
    ))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("polyopt-*.whl")
    return built


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_holds_every_package_and_module(wheel):
    files = _wheel_files(wheel)
    expected = set()
    for package, directory in PACKAGES.items():
        assert (directory / "__init__.py").is_file(), f"{package}: no {directory}/__init__.py"
        target = package.replace(".", "/")
        expected |= {f"{target}/{f.name}" for f in directory.glob("*.py")}
    assert expected <= files, sorted(expected - files)
    top_level = {name.split("/")[0] for name in files} - {"polyopt"}
    assert len(top_level) == 1 and top_level.pop().endswith(".dist-info"), top_level


def test_every_source_package_is_listed_in_pyproject():
    """A subpackage missing from pyproject works from the source tree but not when installed."""
    roots = [ROOT / "polyopt"] + [PACKAGES[f"polyopt.{a}"] for a in PUBLISHED_ADAPTERS]
    listed = {d.resolve() for d in PACKAGES.values()}
    for root in roots:
        for init in root.rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is not in pyproject's packages"


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_wheel_core_dependencies_are_numpy_and_array_api_compat_only(wheel):
    metadata = _metadata(wheel)
    requirements = metadata.get_all("Requires-Dist") or []
    core = {_requirement_name(r) for r in requirements if "extra ==" not in r}
    assert core == CORE_DEPENDENCIES
    import polyopt

    assert metadata["Version"] == polyopt.__version__
    assert set(metadata.get_all("Provides-Extra")) >= {"torch", "tf", "jax", "lab", "all", "dev"}


@pytest.fixture(scope="module")
def unpacked_wheel(wheel) -> Path:
    site = wheel.parent.parent / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_unpacked_wheel_imports_with_its_adapters(unpacked_wheel, tmp_path):
    site = unpacked_wheel
    modules = ["polyopt", *(f"polyopt.{a}" for a in PUBLISHED_ADAPTERS)]
    proc = _python(
        f"""
        import importlib, json
        files = [importlib.import_module(m).__file__ for m in {modules!r}]
        print(json.dumps(files))
        """,
        cwd=tmp_path, PYTHONPATH=str(site), KERAS_BACKEND="jax",
    )
    assert proc.returncode == 0, proc.stderr
    for module, file in zip(modules, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert Path(file).is_relative_to(site), (module, file)


# --------------------------------------------------------------------------
# (c) CI runs the README's test command


def _nox_sessions(script: str) -> list[list[str]]:
    """The session lists of the nox invocations in a shell script."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():  # continuation lines joined
        words = shlex.split(line, comments=True)
        if words and len(words) > 1 and words[1] == "noxw.py":  # python noxw.py ...
            words = words[1:]
        if not words or not re.search(r"(^|/)(nox|noxw\.py)\"?$", words[0]):
            continue
        if "-s" in words or "--sessions" in words:
            start = words.index("-s" if "-s" in words else "--sessions") + 1
            sessions = []
            for word in words[start:]:
                if word.startswith("-"):
                    break
                sessions.append(word)
            found.append(sessions)
    return found


def test_ci_runs_nox_tests():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in script
    assert _nox_sessions(script) == [["tests"]]


def test_readme_test_command_is_what_ci_runs():
    readme = ROOT / "README.md"
    assert re.search(r"^\s*(\$\s*)?python3 noxw\.py -s tests\s*$", readme.read_text(),
                     re.MULTILINE), (
        "README.md must give the test command `python3 noxw.py -s tests`, which .ci/run runs"
    )


# --------------------------------------------------------------------------
# the test configuration itself (tests/conftest.py)


def _pytest_startup(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(Path(__file__).with_name("test_rules_math.py"))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )


@pytest.mark.parametrize("frameworks,backend,message", [
    ("numpy,tensorflw", "jax", r"unknown name\(s\) tensorflw"),
    ("keras", "", r"names keras: set KERAS_BACKEND explicitly"),
    ("keras", "mlx", r"KERAS_BACKEND='mlx' is not tested"),
    ("torch,keras", "tensorflow", r"torch and tensorflow in one process"),
])
def test_bad_polyopt_frameworks_is_a_usage_error(frameworks, backend, message):
    proc = _pytest_startup(POLYOPT_FRAMEWORKS=frameworks, KERAS_BACKEND=backend)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_frameworks_named_here_are_the_ones_tested(frameworks, array_namespaces):
    value = os.environ.get("POLYOPT_FRAMEWORKS", "")
    named = {n.strip().lower().replace("-", "_") for n in value.split(",") if n.strip()}
    assert set(frameworks) == named | {"numpy", "array_api_strict"}
    assert array_namespaces[:2] == ["numpy", "array_api_strict"]
    assert set(array_namespaces) == set(frameworks) - {"keras"}


@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "bool"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_to_namespace_round_trip_keeps_dtype_and_values(xp_name, to_namespace, to_numpy,
                                                        dtype, shape):
    original = (np.arange(int(np.prod(shape))).reshape(shape) * 0.1 + 1 / 3).astype(dtype)
    converted = to_namespace(xp_name, original)
    back = to_numpy(converted)
    assert back.dtype == original.dtype and back.shape == original.shape
    np.testing.assert_array_equal(back, original)
