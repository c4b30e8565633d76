"""The one place where the matrix gets its optimizer: the polyopt adapters.

- torch: ``make_optimizer("torch", experiment, params)`` is a polyopt.torch
  optimizer (``pt.Adam``, ``pt.Adadelta``, ``pt.SGD``;
  ``pt.Lookahead(pt.RAdam(...), k=6, alpha=0.5)`` for Ranger;
  ``pt.SAM(params, pt.Adam, rho=...)`` for SAM, driven by the loop with
  ``first_step()``, its own second pass, then ``second_step()``). The loop
  sets ``param_groups[0]["lr"]`` before every step, as a scheduler would.
- tf (Keras 3 on TensorFlow): a polyopt.keras optimizer (``pk.Adam``, ...;
  ``pk.Lookahead(pk.RAdam(), sync_period=6, slow_step_size=0.5)``); the loop
  assigns ``optimizer.learning_rate`` before every step (a Keras variable of
  ``keras.config.floatx()``: float64 runs set floatx to float64 first, or the
  learning rate would be rounded to float32). SAM: the plain base optimizer,
  and :func:`sam_perturb` gives the ascent point for the loop's second pass,
  exactly as ``pk.SAMModel``'s train_step does (the core's ``perturb``).
- jax: a :class:`JaxOptimizer` built on polyopt.optax: the transformation is
  wrapped in ``optax.inject_hyperparams`` so that the host sets the learning
  rate of every step in the state (Lookahead: ``po.lookahead`` on
  ``optax.LookaheadParams``; SAM: ``po.sam(..., opaque_mode=True)`` and the
  jitted ``po.sam_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from examples.experiments import Experiment, base_learning_rate
from polyopt import hyper, rules

FRAMEWORKS = ("torch", "tf", "jax")


def _parts(experiment: Experiment) -> tuple[str, str]:
    """(wrapper, rule): "lookahead-radam" -> ("lookahead", "radam"), "adam" -> ("", "adam")."""
    outer, _, inner = experiment.optimizer.rpartition("-")
    if outer not in ("", "lookahead", "sam"):
        raise ValueError(f"unknown optimizer wrapper {outer!r} in {experiment.optimizer!r}")
    return outer, inner


def _spelled(spec_name: str, options: dict, framework: str) -> dict:
    """Canonical options -> ``framework``'s argument names (from polyopt.hyper)."""
    spec = hyper.SPECS[spec_name] if spec_name in hyper.SPECS else getattr(hyper, spec_name)
    return {spec[name].spelling(framework): value for name, value in options.items()}


def _options(experiment: Experiment) -> dict:
    """The inner rule's options with the learning rate made explicit."""
    return {**experiment.options, "learning_rate": base_learning_rate(experiment)}


def make_optimizer(framework: str, experiment: Experiment, params: Any = None) -> Any:
    """The optimizer of ``experiment`` for ``framework`` (torch needs ``params``)."""
    if framework == "torch":
        return _torch_optimizer(experiment, params)
    if framework == "tf":
        return _keras_optimizer(experiment)
    if framework == "jax":
        return _jax_optimizer(experiment)
    raise ValueError(f"unknown framework {framework!r}; known: {', '.join(FRAMEWORKS)}")


def sam_perturb(experiment: Experiment) -> Callable:
    """``perturb(params, grads)`` of the SAM experiment: the core's, as pk.SAMModel uses it."""
    return rules.sam(rules.sgd(), **experiment.wrapper).perturb


# --------------------------------------------------------------------------
# torch


def _torch_optimizer(experiment: Experiment, params: Any) -> Any:
    import polyopt.torch as pt
    from polyopt.torch.optimizers import OPTIMIZERS

    outer, name = _parts(experiment)
    cls = OPTIMIZERS[name]
    options = _spelled(name, _options(experiment), "torch")
    if outer == "sam":
        return pt.SAM(params, cls, **_spelled("SAM", experiment.wrapper, "torch"), **options)
    optimizer = cls(params, **options)
    if outer == "lookahead":
        return pt.Lookahead(optimizer, **_spelled("LOOKAHEAD", experiment.wrapper, "torch"))
    return optimizer


# --------------------------------------------------------------------------
# Keras (TensorFlow backend)


def _keras_optimizer(experiment: Experiment) -> Any:
    import polyopt.keras as pk

    outer, name = _parts(experiment)
    cls = next(getattr(pk, n) for n in pk.__all__
               if getattr(getattr(pk, n), "spec", None) is hyper.SPECS[name])
    optimizer = cls(**_spelled(name, _options(experiment), "keras"))
    if outer == "lookahead":
        return pk.Lookahead(optimizer, **_spelled("LOOKAHEAD", experiment.wrapper, "keras"))
    return optimizer  # SAM: the loop's two passes use sam_perturb


# --------------------------------------------------------------------------
# JAX (optax)


class JaxOptimizer(NamedTuple):
    """What the JAX loop needs, on polyopt.optax.

    init(params) -> (train_params, state): ``params`` a list of arrays;
      ``train_params`` is what the optimizer steps (``optax.LookaheadParams``
      for Lookahead).
    make_step(loss_fn) -> step: ``loss_fn(params, *batch) -> (loss, aux)``;
      ``step(train_params, state, lr, *batch) -> (train_params, state,
      (loss, aux))``, jitted, ``lr`` a 0-d array set into the state by the host.
    weights(train_params) -> params: the list the model is evaluated with
      (Lookahead: the fast weights, as polyopt.torch and polyopt.keras keep them).
    """

    init: Callable
    make_step: Callable
    weights: Callable


def _with_lr(state: Any, lr: Any) -> Any:
    """An ``optax.inject_hyperparams`` state with ``learning_rate`` replaced."""
    return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})


def _jax_optimizer(experiment: Experiment) -> JaxOptimizer:
    import jax
    import optax

    import polyopt.optax as po

    outer, name = _parts(experiment)
    options = _spelled(name, _options(experiment), "optax")
    lookahead = outer == "lookahead"

    def weights(train_params):
        return train_params.fast if lookahead else train_params

    if outer == "sam":
        tx = po.sam(optax.inject_hyperparams(getattr(po, name))(**options),
                    **_spelled("SAM", experiment.wrapper, "optax"), opaque_mode=True)

        def make_step(loss_fn):
            sam_step = po.sam_step(loss_fn, tx, has_aux=True, donate=False)

            def step(params, state, lr, *batch):
                state = state._replace(inner_state=_with_lr(state.inner_state, lr))
                return sam_step(params, state, *batch)

            return step

        return JaxOptimizer(lambda params: (params, tx.init(params)), make_step, weights)

    wrapper = _spelled("LOOKAHEAD", experiment.wrapper, "optax")
    learning_rate = options.pop("learning_rate")

    def factory(learning_rate):
        inner = getattr(po, name)(learning_rate=learning_rate, **options)
        return po.lookahead(inner, **wrapper) if lookahead else inner

    tx = optax.inject_hyperparams(factory)(learning_rate=learning_rate)

    def init(params):
        train_params = optax.LookaheadParams.init_synced(params) if lookahead else params
        return train_params, tx.init(train_params)

    def make_step(loss_fn):
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

        def step(params, state, lr, *batch):
            value, grads = value_and_grad(weights(params), *batch)
            updates, state = tx.update(grads, _with_lr(state, lr), params)
            return optax.apply_updates(params, updates), state, value

        return jax.jit(step)

    return JaxOptimizer(init, make_step, weights)
