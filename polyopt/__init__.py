"""polyopt: optimizer update rules written once against the Python Array API.

The core (this package) imports numpy and array_api_compat only, never a deep
learning framework: ``rules`` (the update rules), ``schedules`` (learning-rate
schedules and the plateau controller), ``hyper`` (the one hyperparameter
spec) and ``native`` (native optimizer -> polyopt preset). ``python -m
polyopt.lab`` runs the toy-function experiments.
"""

from polyopt import hyper, native, rules, schedules

__version__ = "0.1.0"

__all__ = ["__version__", "hyper", "native", "rules", "schedules"]
