"""The natives that polyopt.native.PRESETS reproduces, and how to swap them.

A key of PRESETS is a native's import path (``"optax.adam"``,
``"keras.optimizers.Adam"``), optionally with the native arguments that
select a variant (``"keras.optimizers.Adam(amsgrad=True)"``). The plugins
replace each such native, wherever a module holds it, by a stand-in that
calls polyopt with the preset's options; every other native optimizer of the
framework by a stand-in that skips the test (no preset).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

from polyopt.native import PRESETS


@dataclass(frozen=True)
class Preset:
    key: str  # the PRESETS key
    when: dict  # native arguments that select this variant ({} for the base preset)
    rule: str
    options: dict


def resolve(path: str) -> Any:
    """The object named by a dotted import path."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _variant(key: str) -> tuple[str, dict]:
    if "(" not in key:
        return key, {}
    path, args = key.split("(", 1)
    call = ast.parse(f"f({args}", mode="eval").body
    return path, {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def presets(prefix: str) -> dict[str, list[Preset]]:
    """native path -> its presets (variants with more selecting arguments first)."""
    found: dict[str, list[Preset]] = {}
    for key, (rule, options) in PRESETS.items():
        path, when = _variant(key)
        if path.startswith(prefix):
            found.setdefault(path, []).append(Preset(key, when, rule, dict(options)))
    for variants in found.values():
        variants.sort(key=lambda p: -len(p.when))
    return found


def choose(variants: list[Preset], given: dict) -> tuple[Preset, dict]:
    """The variant whose selecting arguments ``given`` holds, and the remaining arguments."""
    for preset in variants:
        if all(k in given and _same(given[k], v) for k, v in preset.when.items()):
            return preset, {k: v for k, v in given.items() if k not in preset.when}
    raise AssertionError("a base preset always matches")


def _same(a: Any, b: Any) -> bool:
    simple = (bool, int, float, str, type(None))
    return a is b or (type(a) in simple and type(a) is type(b) and a == b)


def given_arguments(signature: inspect.Signature, args: tuple, kwargs: dict,
                    skip_self: bool = False) -> dict:
    """The arguments a call gives, by name, less those equal to the native's default
    (the preset reproduces the native with its defaults)."""
    if skip_self:
        args = (None, *args)
    bound = signature.bind(*args, **kwargs)
    given = {}
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(value)
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                given[name] = value
        elif not (skip_self and name == next(iter(signature.parameters))):
            if parameter.default is inspect.Parameter.empty or not _same(
                    value, parameter.default):
                given[name] = value
    return given


def replace_everywhere(native: Any, stand_in: Any, module_prefixes: tuple[str, ...]) -> int:
    """Put ``stand_in`` wherever an imported module of these packages holds ``native``."""
    count = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(module_prefixes):
            continue
        for attr, value in list(vars(module).items()):
            if value is native:
                setattr(module, attr, stand_in)
                count += 1
            elif isinstance(value, dict) and any(v is native for v in value.values()):
                value.update({k: stand_in for k, v in value.items() if v is native})
                count += 1
            elif isinstance(value, set) and any(v is native for v in value):
                value.discard(native)
                value.add(stand_in)
                count += 1
    return count


def install(prefix: str, without_preset: dict[str, Any], stand_in, skipper,
            module_prefixes: tuple[str, ...]) -> dict[str, int]:
    """Swap every native under ``prefix`` that has a preset for ``stand_in(path, native,
    variants)``, and the others (``without_preset``, path -> native) for
    ``skipper(path, native)``, in every module under ``module_prefixes``; returns how
    many module attributes each swap touched."""
    with_preset = presets(prefix)
    natives = {path: resolve(path) for path in with_preset}
    others = {path: native for path, native in without_preset.items()
              if path not in with_preset and not any(native is n for n in natives.values())}
    swapped = {}
    for path, variants in with_preset.items():
        swapped[path] = replace_everywhere(natives[path], stand_in(path, natives[path], variants),
                                           module_prefixes)
    for path, native in others.items():
        swapped[path] = replace_everywhere(native, skipper(path, native), module_prefixes)
    return swapped
