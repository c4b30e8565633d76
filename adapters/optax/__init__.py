"""polyopt.optax: the polyopt rules as optax GradientTransformations.

Each factory (``sgd``, ``adagrad``, ``rmsprop``, ``adadelta``, ``adam``,
``adamw``, ``amsgrad``, ``adamax``, ``nadam``, ``radam``, ``lion``,
``adafactor``, ``lamb``, ``lars``, ``schedule_free_adamw``, ``adopt``, ``muon``,
``ranger``) takes optax's argument names with polyopt's defaults (the same in
every framework), checks them at construction, and returns an
``optax.GradientTransformation`` that runs the core rule of
:mod:`polyopt.rules` on any pytree of params, under ``jax.jit``, in
``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``, with
optax or polyopt schedules as learning rate. ``lookahead`` has optax's
``LookaheadParams`` API; ``sam`` is ``optax.contrib.sam``'s protocol around
any optax transformation, and ``sam_step`` makes the jitted two-gradient
training step from a loss function. Non-finite gradients propagate (as in
optax); ``apply_if_finite(transformation)`` skips and counts such steps.
``polyopt.optax.interop`` saves and loads framework-neutral state files.

Example::

    import optax, polyopt.optax
    opt = optax.chain(optax.clip_by_global_norm(1.0), polyopt.optax.adamw(1e-3))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
"""

from polyopt.optax._transforms import (
    SAMState,
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    adopt,
    amsgrad,
    apply_if_finite,
    lamb,
    lars,
    lion,
    lookahead,
    muon,
    nadam,
    radam,
    ranger,
    rmsprop,
    sam,
    sam_step,
    schedule_free_adamw,
    schedule_free_eval_params,
    sgd,
)

__all__ = [
    "sgd", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "amsgrad", "adamax", "nadam",
    "radam", "lion", "adafactor", "lamb", "lars", "schedule_free_adamw",
    "schedule_free_eval_params", "adopt", "muon", "lookahead", "ranger", "sam", "sam_step",
    "SAMState",
    "apply_if_finite",
]
