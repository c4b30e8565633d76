"""pytest plugin: Keras's own optimizer tests with polyopt.keras in place of the natives.

Every ``keras.optimizers.X`` of polyopt.native.PRESETS becomes a subclass of
the polyopt.keras class of the preset's rule, with the native's name, module
and signature, whose constructor passes the preset's options (Keras
spellings) and the caller's arguments on top (an argument equal to the
native's default is left to the preset). Every other optimizer class of
``keras.src.optimizers`` skips the test that constructs it; the wrappers
(LossScaleOptimizer, MultiOptimizer) stay native.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import keras
import keras.src.optimizers as keras_optimizers

import polyopt.keras
from conformance import _natives, _record
from conformance._record import (  # noqa: F401  (the recording hooks)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
    pytest_sessionfinish,
)

_MODULES = ("keras",)
#: Keras's optimizer base classes and wrappers of other optimizers: not update rules
_NOT_RULES = ("Optimizer", "BaseOptimizer", "LossScaleOptimizer", "MultiOptimizer",
              "TFOptimizer", "JaxOptimizer", "TorchOptimizer", "NumpyOptimizer",
              "OpenVINOOptimizer")


def _polyopt_classes() -> dict[str, type]:
    """rule name -> the polyopt.keras class running it."""
    return {value.spec.name: value for value in vars(polyopt.keras).values()
            if inspect.isclass(value) and issubclass(value, polyopt.keras.RuleOptimizer)
            and "spec" in value.__dict__}


def _stand_in(path: str, native: type, variants: list[_natives.Preset]) -> type:
    rules = {p.rule for p in variants}
    assert len(rules) == 1, f"{path}: variants of one Keras class run one rule, got {rules}"
    base = _polyopt_classes()[rules.pop()]
    signature = inspect.signature(native)

    def __init__(self, *args, **kwargs):
        _record.used(path)
        given = _natives.given_arguments(signature, args, kwargs)
        preset, given = _natives.choose(variants, given)
        names = {h.spelling("keras"): h.name for h in base.spec}
        kept = base.spec.overridden(  # e.g. Muon's rms_rate=None sets lr_scale='none'
            preset.options, {names[k]: v for k, v in given.items() if k in names}, "keras")
        options = {base.spec[k].spelling("keras"): v for k, v in kept.items()}
        base.__init__(self, **{**options, **given})

    def __new__(cls, *args, **kwargs):
        # Keras's torch backend picks its own subclass for each native class it
        # finds under keras.src.optimizers (where the stand-in now is): skip that
        # dispatch, as it is skipped for polyopt.keras's classes themselves
        for klass in cls.__mro__:
            if klass.__name__ == "TorchOptimizer" and "__new__" in vars(klass):
                return super(klass, cls).__new__(cls)
        return super(stand_in, cls).__new__(cls)

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         *signature.parameters.values()])
    stand_in = type(native.__name__, (base,), {
        "__init__": __init__, "__new__": __new__, "__module__": native.__module__,
        "__qualname__": native.__qualname__, "__doc__": base.__doc__})
    return stand_in


def _skipper(path: str, native: type) -> type:
    def __init__(self, *args, **kwargs):
        _record.no_preset(path)

    return type(native.__name__, (native,), {
        "__init__": __init__, "__module__": native.__module__,
        "__qualname__": native.__qualname__})


def natives_without_preset() -> dict[str, type]:
    """Keras's optimizer classes: the Optimizer subclasses of keras.src.optimizers.*."""
    for info in pkgutil.iter_modules(keras_optimizers.__path__):
        if not info.name.endswith("_test"):
            importlib.import_module(f"{keras_optimizers.__name__}.{info.name}")
    found = {}
    for name, module in list(importlib.sys.modules.items()):
        if not name.startswith(keras_optimizers.__name__ + ".") or name.endswith("_test"):
            continue
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, keras.optimizers.Optimizer)
                    and value.__module__ == name and attr not in _NOT_RULES
                    and not attr.startswith("_")):
                found[f"keras.optimizers.{attr}"] = value
    return found


def install() -> dict[str, int]:
    """Swap the natives; returns how many module attributes each swap touched."""
    return _natives.install("keras.optimizers.", natives_without_preset(), _stand_in, _skipper,
                            _MODULES)


def pytest_configure(config) -> None:
    install()
