"""The frameworks under test, and helpers to move arrays between namespaces.

POLYOPT_FRAMEWORKS
    Comma-separated names of what this pytest process tests, among:

    ``numpy``, ``array_api_strict``
        Always tested (naming them is allowed and changes nothing): every rule
        must run under array_api_strict, whatever else is named.
    ``torch``, ``jax``
        Add torch and jax arrays (through array_api_compat) to the array
        namespaces under test, and enable the torch adapter tests
        (``test_torch*.py``) and the optax adapter tests (``test_optax*.py``,
        ``test_jax*.py``).
    ``keras``
        Enable the tests marked ``keras`` (and every test in ``test_keras*.py``,
        marked automatically), on the backend named by KERAS_BACKEND, which
        must then be set explicitly (tensorflow, jax or torch).

    Unset or empty: numpy and array_api_strict only. An unknown name, a named
    framework that is not installed, or torch beside tensorflow (a Keras
    process on the tensorflow backend) is a usage error at startup: nothing
    passes by testing nothing, and torch and tensorflow never share a process
    (importing both can crash it). ``nox -s tests`` names numpy,torch,jax for
    the main run and runs the Keras tests in one process per backend.

Tests of a framework that is not under test are not collected (their modules
are never imported, so a tensorflow process never imports torch); the
terminal summary lists them. As a safety net, a process that tests torch
refuses to import tensorflow, and one that tests tensorflow (keras on the
tensorflow backend) refuses to import torch: an ImportError that names the
cause instead of a crash.

Fixtures: ``frameworks`` (names under test), ``array_namespaces`` (names of the
array namespaces under test: numpy, array_api_strict, then torch and jax when
named), ``xp_name`` and ``xp`` (a test taking either runs once per array
namespace under test), ``to_namespace(name, numpy_array)`` and
``to_numpy(array)``. The same helpers are plain functions of this module.

float64 everywhere: jax is imported with ``jax_enable_x64`` turned on (set
here before any test module imports jax, so jax arrays keep float64 instead
of silently becoming float32), and torch has TF32 matmuls turned off
(``allow_tf32 = False``, as Keras's test configuration does; a no-op on CPU).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ENV_VAR = "POLYOPT_FRAMEWORKS"
ALWAYS = ("numpy", "array_api_strict")
KNOWN = ("numpy", "array_api_strict", "torch", "jax", "keras")
NAMESPACES = ("numpy", "array_api_strict", "torch", "jax")  # array namespaces, in test order
KERAS_BACKENDS = ("tensorflow", "jax", "torch")  # the backends the Keras adapter supports

# Test modules that need frameworks at import: collected only when all are under test.
# test_conventions_* compare the core rules with torch.optim and optax in this
# process (and native Keras in a child process on the jax backend).
_MODULE_NEEDS = [
    (re.compile(r"test_torch(?:_\w*)?\.py"), ("torch",)),
    (re.compile(r"test_(?:jax|optax)(?:_\w*)?\.py"), ("jax",)),
    (re.compile(r"test_keras(?:_\w*)?\.py"), ("keras",)),
    (re.compile(r"test_conventions_\w*\.py"), ("torch", "jax")),
]
_KERAS_MODULE = re.compile(r"test_keras(?:_\w*)?\.py")


def module_needs(filename: str) -> tuple[str, ...]:
    """The frameworks a test module needs at import (empty: none)."""
    for pattern, needed in _MODULE_NEEDS:
        if pattern.fullmatch(filename):
            return needed
    return ()


# --------------------------------------------------------------------------
# the frameworks under test


def _parse(value: str | None) -> list[str]:
    return [n.strip().lower().replace("-", "_") for n in (value or "").split(",") if n.strip()]


@functools.cache
def _resolve(value: str | None, keras_backend: str | None) -> tuple[str, ...]:
    """Validated frameworks for a POLYOPT_FRAMEWORKS value; raises pytest.UsageError."""
    named = _parse(value)
    unknown = sorted(set(named) - set(KNOWN))
    if unknown:
        raise pytest.UsageError(
            f"{ENV_VAR}: unknown name(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}"
        )
    chosen = [n for n in KNOWN if n in ALWAYS or n in named]

    modules = {n: n for n in chosen}  # framework -> module that must be importable
    if "keras" in chosen:
        if not keras_backend:
            raise pytest.UsageError(
                f"{ENV_VAR} names keras: set KERAS_BACKEND explicitly "
                f"(one of {', '.join(KERAS_BACKENDS)})"
            )
        if keras_backend not in KERAS_BACKENDS:
            raise pytest.UsageError(
                f"KERAS_BACKEND={keras_backend!r} is not tested; "
                f"use one of {', '.join(KERAS_BACKENDS)}"
            )
        modules["keras backend"] = keras_backend
    missing = [
        f"{name} (module {module!r})"
        for name, module in modules.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise pytest.UsageError(
            f"{ENV_VAR}={value!r}: not installed: {', '.join(missing)}. "
            "A framework named for testing must be installed (nox -s tests installs all)."
        )
    if "torch" in modules.values() and "tensorflow" in modules.values():
        raise pytest.UsageError(
            f"{ENV_VAR}={value!r} with KERAS_BACKEND=tensorflow would put torch and "
            "tensorflow in one process, which can crash it: test them in separate "
            "pytest processes (as nox -s tests does)"
        )
    return tuple(chosen)


def frameworks() -> tuple[str, ...]:
    """The frameworks under test in this process, from POLYOPT_FRAMEWORKS."""
    return _resolve(os.environ.get(ENV_VAR), os.environ.get("KERAS_BACKEND"))


def array_namespaces() -> list[str]:
    """Names of the array namespaces under test: numpy, array_api_strict, [torch], [jax]."""
    under_test = frameworks()
    return [n for n in NAMESPACES if n in under_test]


def keras_backend() -> str | None:
    """The Keras backend under test, or None when keras is not under test."""
    return os.environ["KERAS_BACKEND"] if "keras" in frameworks() else None


class RefusedImport(ModuleNotFoundError):
    """Importing this framework here could crash the process (see _guard_imports)."""


class _RefusingLoader(importlib.abc.Loader):
    def __init__(self, reason: str) -> None:
        self.reason = reason

    def create_module(self, spec):
        raise RefusedImport(self.reason, name=spec.name)

    def exec_module(self, module):
        raise RefusedImport(self.reason, name=module.__name__)


class _ImportGuard(importlib.abc.MetaPathFinder):
    """Makes an import that could crash the process fail with a clear message.

    ``importlib.util.find_spec`` probes still succeed (the module is installed;
    torch's dynamo probes for tensorflow, for one): only loading it fails.
    """

    def __init__(self, forbidden: dict[str, str]) -> None:
        self.forbidden = forbidden

    def find_spec(self, fullname, path=None, target=None):
        reason = self.forbidden.get(fullname.partition(".")[0])
        if reason is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _RefusingLoader(reason))


def _guard_imports() -> None:
    """Forbid tensorflow in a process that tests torch, and torch in a tensorflow one."""
    backend = keras_backend()
    present = {n for n in ("torch", "tensorflow") if n in frameworks() or n == backend}
    if len(present) != 1:
        return
    (tested,) = present
    other = "tensorflow" if tested == "torch" else "torch"
    reason = (
        f"{other} must not be imported in this pytest process, which tests {tested} "
        f"({ENV_VAR}={os.environ.get(ENV_VAR)!r}, KERAS_BACKEND={backend}): torch and "
        f"tensorflow in one process can crash it. Import {other} inside tests that "
        f"need it, in a test_{'keras' if other == 'tensorflow' else 'torch'}*.py module "
        "or a child process (tests/_native.py)."
    )
    if other in sys.modules:
        raise pytest.UsageError(f"{other} is already imported. {reason}")
    sys.meta_path.insert(0, _ImportGuard({other: reason}))


def _prepare_frameworks() -> None:
    """Import the frameworks under test once, with float64-exact settings."""
    under_test = frameworks()
    imported = set(under_test) | ({keras_backend()} if "keras" in under_test else set())
    if "jax" in imported:
        import jax

        # Without x64, jax turns float64 input into float32 without a word.
        jax.config.update("jax_enable_x64", True)
    if "torch" in imported:
        import torch

        # As Keras's test configuration: no TF32 matmuls (a no-op on CPU).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# --------------------------------------------------------------------------
# moving arrays between namespaces


def namespace(name: str) -> Any:
    """The array API namespace called ``name`` (compat-wrapped where needed)."""
    _check_under_test(name)
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        import array_api_strict as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    else:
        import jax.numpy as xp
    return xp


def to_namespace(name: str, array: Any) -> Any:
    """A copy of numpy ``array`` (any dtype, any shape, 0-d too) in namespace ``name``.

    The dtype is kept exactly: float64 stays float64 in every namespace.
    """
    _check_under_test(name)
    array = np.array(array, copy=True)
    if name == "numpy":
        out = array
    elif name == "array_api_strict":
        import array_api_strict

        out = array_api_strict.asarray(array)
    elif name == "torch":
        import torch

        out = torch.from_numpy(array)
    else:
        import jax.numpy as jnp

        out = jnp.asarray(array)
    if to_numpy(out).dtype != array.dtype:
        raise RuntimeError(f"to_namespace({name!r}) changed dtype {array.dtype} to {out.dtype}")
    return out


def to_numpy(array: Any) -> np.ndarray:
    """A numpy copy of an array of any namespace under test (or a Python scalar)."""
    import array_api_compat

    if array_api_compat.is_torch_array(array):
        return array.detach().cpu().numpy().copy()
    if isinstance(array, (np.ndarray, np.generic, int, float, bool, complex)):
        return np.array(array, copy=True)
    if array_api_compat.is_jax_array(array):
        return np.array(array, copy=True)
    return np.array(np.from_dlpack(array), copy=True)  # array_api_strict and others


def _check_under_test(name: str) -> None:
    if name not in NAMESPACES:
        raise ValueError(f"unknown array namespace {name!r}; known: {', '.join(NAMESPACES)}")
    if name not in array_namespaces():
        raise ValueError(
            f"array namespace {name!r} is not under test ({ENV_VAR}={os.environ.get(ENV_VAR)!r})"
        )


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(name="frameworks", scope="session")
def _frameworks_fixture() -> tuple[str, ...]:
    return frameworks()


@pytest.fixture(name="array_namespaces", scope="session")
def _array_namespaces_fixture() -> list[str]:
    return array_namespaces()


@pytest.fixture(name="to_namespace", scope="session")
def _to_namespace_fixture():
    return to_namespace


@pytest.fixture(name="to_numpy", scope="session")
def _to_numpy_fixture():
    return to_numpy


@pytest.fixture
def xp(xp_name: str) -> Any:
    """The array namespace of ``xp_name`` (the test runs once per namespace under test)."""
    return namespace(xp_name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "xp_name" in metafunc.fixturenames:
        metafunc.parametrize("xp_name", array_namespaces())


# --------------------------------------------------------------------------
# hooks


def pytest_configure(config: pytest.Config) -> None:
    frameworks()  # a usage error stops the run here, before anything is collected
    _prepare_frameworks()
    _guard_imports()
    config.stash[_NOT_COLLECTED] = []


_NOT_COLLECTED = pytest.StashKey[list]()


def pytest_report_header(config: pytest.Config) -> str:
    parts = []
    for name in frameworks():
        module = importlib.import_module(name) if name != "keras" else None
        version = getattr(module, "__version__", "") if module else ""
        parts.append(f"{name} {version}".strip())
    backend = keras_backend()
    keras_note = f" (KERAS_BACKEND={backend})" if backend else ""
    return f"polyopt frameworks under test: {', '.join(parts)}{keras_note}"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    needed = module_needs(collection_path.name)
    if needed and not set(needed) <= set(frameworks()):
        config.stash[_NOT_COLLECTED].append(collection_path)
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect tests marked ``keras`` or ``needs(...)`` whose frameworks are not
    under test (listed in the summary; never reported as passed or skipped)."""
    keep, drop = [], []
    for item in items:
        if _KERAS_MODULE.fullmatch(item.path.name):
            item.add_marker(pytest.mark.keras)
        needed = set()
        if item.get_closest_marker("keras"):
            needed.add("keras")
        for mark in item.iter_markers("needs"):
            needed.update(mark.args)
        if needed and not needed <= set(frameworks()):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    not_collected = config.stash.get(_NOT_COLLECTED, [])
    if not_collected:
        terminalreporter.write_line(
            f"not collected, framework not in {ENV_VAR}: "
            + ", ".join(sorted({p.name for p in not_collected}))
        )
