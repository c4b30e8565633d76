"""polyopt: optimizer update rules written once against the Python Array API.

The core (this package) imports numpy and array_api_compat only, never a deep
learning framework: ``rules`` (the update rules), ``schedules`` (learning-rate
schedules and the plateau controller), ``hyper`` (the one hyperparameter
spec), ``native`` (native optimizer -> polyopt preset) and ``interop``
(framework-neutral optimizer state files). ``python -m
polyopt.lab`` runs the toy-function experiments.
"""

from polyopt import hyper, interop, native, rules, schedules

__version__ = "0.1.0"

__all__ = ["__version__", "hyper", "interop", "native", "rules", "schedules"]

# The framework adapters live in adapters/<name> and install as polyopt.<name>
# (pyproject's package-dir). From a source checkout without installation (the
# tests, `python -m examples...`) they are found through this package's path.
import os as _os

_ADAPTERS = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "adapters")
if _os.path.isdir(_ADAPTERS):
    __path__.append(_ADAPTERS)
del _os
