"""polyopt: optimizer update rules written once against the Python Array API.

The core (this package) imports numpy and array_api_compat only, never a deep
learning framework. Framework adapters are separate subpackages
(``polyopt.torch``, ``polyopt.keras``, ``polyopt.optax``) imported explicitly.
"""

from polyopt import hyper, rules

__version__ = "0.1.0"

__all__ = ["__version__", "hyper", "rules"]
