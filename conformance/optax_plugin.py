"""pytest plugin: optax's own tests with polyopt.optax in place of the optax aliases.

Every ``optax.X`` of polyopt.native.PRESETS becomes a function with the
native's signature that calls ``polyopt.optax.<rule>`` with the preset's
options (in optax's spellings) and the caller's arguments on top (an argument
equal to the native's default is left to the preset). Every other optimizer
of ``optax._src.alias`` and ``optax.contrib`` skips the test that reaches it.
"""

from __future__ import annotations

import functools
import inspect

import optax
import optax.contrib

import polyopt.native
import polyopt.optax
from conformance import _natives, _record
from conformance._record import (  # noqa: F401  (the recording hooks)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
)

_MODULES = ("optax",)


def _spelled(factory, options: dict) -> dict:
    return {factory.spec[name].spelling("optax"): value for name, value in options.items()}


def _stand_in(path: str, native, variants: list[_natives.Preset]):
    signature = inspect.signature(native)

    @functools.wraps(native)
    def polyopt_factory(*args, **kwargs):
        _record.used(path)
        given = _natives.given_arguments(signature, args, kwargs)
        preset, given = _natives.choose(variants, given)
        factory = getattr(polyopt.optax, preset.rule)
        names = {factory.spec[n].spelling("optax"): n for n in factory.spec.names}
        links = polyopt.native.linked(preset.key, {names[k]: v for k, v in given.items()
                                                   if k in names})
        return factory(**{**_spelled(factory, {**preset.options, **links}), **given})

    polyopt_factory.__signature__ = signature
    return polyopt_factory


def _skipper(path: str, native):
    @functools.wraps(native)
    def no_preset(*args, **kwargs):
        _record.no_preset(path)

    no_preset.__signature__ = inspect.signature(native)
    return no_preset


def natives_without_preset() -> dict[str, object]:
    """optax's optimizers: the public factories of optax._src.alias and optax.contrib."""
    from optax._src import alias

    found = {}
    for module, prefix in ((alias, "optax."), (optax.contrib, "optax.contrib.")):
        for name, value in vars(module).items():
            if name.startswith("_") or inspect.isclass(value):
                continue
            target = value.func if isinstance(value, functools.partial) else value
            if inspect.isfunction(target) and target.__module__.startswith(
                    (alias.__name__, "optax.contrib")):
                found[prefix + name] = value
    return found


def install() -> dict[str, int]:
    """Swap the natives; returns how many module attributes each swap touched."""
    return _natives.install("optax.", natives_without_preset(), _stand_in, _skipper, _MODULES)


def pytest_configure(config) -> None:
    install()
