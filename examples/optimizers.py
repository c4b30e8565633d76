"""The one place where the matrix gets its optimizer: ``make_optimizer``.

Interim implementation, until the adapters are merged: it calls
``polyopt.rules`` directly on the framework's arrays (array_api_compat
handles torch tensors and jax arrays), wrapped in the smallest object each
training loop needs. When polyopt.torch / polyopt.optax / polyopt.keras land,
only this module changes:

- torch: a ``torch.optim.Optimizer`` over the model's parameters, with
  ``param_groups[0]["lr"]`` set by the loop before every ``step()``; SAM
  experiments also use ``first_step()`` (move to the perturbed point, as
  davda54/sam) before the second backward pass, then ``step()``.
- jax: an object with ``init(params)``, ``update(grads, state, params, lr)``
  -> ``(updates, state)`` and, for SAM, ``ascent(grads, params, lr)``, all
  pure and called inside ``jax.jit`` (``lr`` a traced 0-d array; optax's
  ``inject_hyperparams`` gives the same shape).
- tf (Keras): not available before polyopt.keras.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from examples.experiments import Experiment, base_learning_rate, build_rule

FRAMEWORKS = ("torch", "tf", "jax")


class JaxOptimizer(NamedTuple):
    """Pure functions on lists of jax arrays (see the module docstring)."""

    init: Any
    update: Any
    ascent: Any | None


def make_optimizer(framework: str, experiment: Experiment, params: Any = None) -> Any:
    """The optimizer of ``experiment`` for ``framework`` (torch needs ``params``)."""
    if framework == "torch":
        return _torch_optimizer(experiment, params)
    if framework == "jax":
        return _jax_optimizer(experiment)
    if framework == "tf":
        raise NotImplementedError("polyopt.keras not merged yet")
    raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")


def _torch_optimizer(experiment: Experiment, params: Any) -> Any:
    import torch

    class RuleOptimizer(torch.optim.Optimizer):
        """polyopt rule as a torch optimizer (one param group; interim)."""

        def __init__(self, params) -> None:
            super().__init__(params, {"lr": base_learning_rate(experiment)})
            self.rule_state = None
            self._origin = None

        def _params(self) -> list:
            return list(self.param_groups[0]["params"])

        def _rule(self):
            return build_rule(experiment, self.param_groups[0]["lr"])

        @torch.no_grad()
        def first_step(self) -> None:
            params = self._params()
            perturbed = self._rule().perturb([p.detach() for p in params],
                                             [p.grad for p in params])
            self._origin = [p.clone() for p in params]
            for p, q in zip(params, perturbed):
                p.copy_(q)

        @torch.no_grad()
        def step(self, closure=None):
            params = self._params()
            if self._origin is not None:  # SAM: the update applies to the original point
                for p, origin in zip(params, self._origin):
                    p.copy_(origin)
                self._origin = None
            rule = self._rule()
            values = [p.detach() for p in params]  # plain tensors: the state needs no grad
            if self.rule_state is None:
                self.rule_state = rule.init(values)
            updates, self.rule_state = rule.update([p.grad for p in params], self.rule_state,
                                                   values)
            for p, u in zip(params, updates):
                p.add_(u)

    return RuleOptimizer(params)


def _jax_optimizer(experiment: Experiment) -> JaxOptimizer:
    def init(params):
        return build_rule(experiment, base_learning_rate(experiment)).init(params)

    def update(grads, state, params, lr):
        return build_rule(experiment, lr).update(grads, state, params)

    def ascent(grads, params, lr):
        return build_rule(experiment, lr).ascent(grads, params)

    sam = experiment.optimizer.startswith("sam-")
    return JaxOptimizer(init, update, ascent if sam else None)
