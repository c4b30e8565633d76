"""Native optimizer -> the polyopt call that reproduces it.

``PRESETS["keras.optimizers.Adam"]`` is ``("adam", {...})``: the rule and the
options that give keras.optimizers.Adam's numbers with its default
arguments (pass the native's other arguments under polyopt's names as
usual). The conventions table (docs/conventions.md) is generated from this dict, and
tests/test_presets.py runs every entry side by side with the real native
optimizer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "LINKED", "preset", "linked", "markdown_table"]

# Keras applies weight decay decoupled, times the learning rate, to every optimizer.
_KERAS = {"weight_decay_mode": "decoupled"}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # torch.optim (2.x defaults)
    "torch.optim.SGD": ("sgd", {"learning_rate": 0.001}),
    "torch.optim.Adagrad": ("adagrad", {}),
    "torch.optim.RMSprop": ("rmsprop", {"learning_rate": 0.01, "decay": 0.99,
                                        "eps_placement": "outside", "momentum_form": "buffer"}),
    "torch.optim.Adadelta": ("adadelta", {"rho": 0.9}),
    "torch.optim.Adam": ("adam", {}),
    "torch.optim.Adam(amsgrad=True)": ("adam", {"amsgrad": True}),
    "torch.optim.AdamW": ("adamw", {}),
    "torch.optim.Adamax": ("adamax", {}),
    "torch.optim.NAdam": ("nadam", {"momentum_product_dtype": "float32"}),
    "torch.optim.RAdam": ("radam", {}),
    "torch.optim.Adafactor": ("adafactor", {"eps": None, "eps_placement": "floor",
                                            "factoring": "last_two"}),
    # torch.optim.Muon takes 2-D params only and iterates Newton-Schulz in bfloat16
    **{f"torch.optim.Muon{arg}": ("muon", {
        "learning_rate": 1e-3, "weight_decay": 0.1, "eps_placement": "clamp",
        "iteration_dtype": "bfloat16", "muon_params": "all", **extra})
       for arg, extra in (("", {}), ("(adjust_lr_fn='original')", {}),
                          ("(adjust_lr_fn='match_rms_adamw')", {"lr_scale": "rms"}))},
    # keras.optimizers (Keras 3 defaults)
    "keras.optimizers.SGD": ("sgd", {"momentum_form": "velocity", **_KERAS}),
    "keras.optimizers.Adagrad": ("adagrad", {"learning_rate": 0.001,
                                             "initial_accumulator_value": 0.1, "eps": 1e-7,
                                             "eps_placement": "inside", **_KERAS}),
    "keras.optimizers.RMSprop": ("rmsprop", {"learning_rate": 0.001, "decay": 0.9, "eps": 1e-7,
                                             "eps_placement": "inside",
                                             "momentum_form": "velocity", **_KERAS}),
    "keras.optimizers.Adadelta": ("adadelta", {"learning_rate": 0.001, "rho": 0.95, "eps": 1e-7,
                                               **_KERAS}),
    "keras.optimizers.Adam": ("adam", {"eps": 1e-7, "eps_placement": "hat", **_KERAS}),
    "keras.optimizers.Adam(amsgrad=True)": ("adam", {"eps": 1e-7, "eps_placement": "hat",
                                                     "amsgrad": True, **_KERAS}),
    "keras.optimizers.AdamW": ("adamw", {"eps": 1e-7, "eps_placement": "hat",
                                         "weight_decay": 0.004}),
    "keras.optimizers.Adamax": ("adamax", {"learning_rate": 0.001, "eps": 1e-7,
                                           "eps_placement": "outside", **_KERAS}),
    "keras.optimizers.Nadam": ("nadam", {"learning_rate": 0.001, "eps": 1e-7,
                                         "momentum_decay": 1.0, **_KERAS}),
    "keras.optimizers.Lion": ("lion", {"learning_rate": 0.001}),
    "keras.optimizers.Adafactor": ("adafactor", {"learning_rate": 0.001,
                                                 "factoring": "last_two",
                                                 "param_scale_after_decay": True}),
    # Keras's update_step caps the step at 1/sqrt(t) whatever relative_step says
    "keras.optimizers.Adafactor(relative_step=False)": ("adafactor", {
        "learning_rate": 0.001, "factoring": "last_two", "param_scale_after_decay": True}),
    "keras.optimizers.Lamb": ("lamb", {"eps": 1e-7, "weight_decay_mode": "decoupled"}),
    "keras.optimizers.ScheduleFreeAdamW": ("schedule_free_adamw", {
        "weight_lr_power": 0.0, "weight_decay_mode": "variable"}),
    # Keras's Muon steps 2-D variables (not named *embedding*) by Muon, the others by its
    # Adam (learning_rate * adam_lr_ratio, 'epsilon hat'); decay times learning_rate
    "keras.optimizers.Muon": ("muon", {
        "learning_rate": 1e-3, "momentum_form": "sum", "lr_scale": "rms", "weight_decay": 0.004,
        "muon_params": "2d", "adam_learning_rate": None, "adam_b2": 0.999, "adam_eps": 1e-7,
        "adam_eps_placement": "hat", "adam_weight_decay": 0.004}),
    # optax (learning_rate is required there; any value)
    "optax.sgd": ("sgd", {}),
    "optax.adagrad": ("adagrad", {"initial_accumulator_value": 0.1, "eps": 1e-7,
                                  "eps_placement": "inside"}),
    "optax.rmsprop": ("rmsprop", {}),
    "optax.adadelta": ("adadelta", {"rho": 0.9}),
    "optax.adam": ("adam", {}),
    "optax.adamw": ("adamw", {"weight_decay": 1e-4}),
    "optax.amsgrad": ("adam", {"amsgrad": True, "amsgrad_form": "corrected"}),
    "optax.adamax": ("adamax", {}),
    "optax.nadam": ("nadam", {"momentum_schedule": False}),
    "optax.radam": ("radam", {"eps_placement": "outside"}),
    "optax.lion": ("lion", {"weight_decay": 1e-3}),
    # optax.adafactor's learning_rate=None (its default) scales by nothing: 1.0;
    # its momentum is kept in float32 (dtype_momentum) whatever the params' dtype
    "optax.adafactor": ("adafactor", {"learning_rate": 1.0, "relative_step": False,
                                      "factoring": "largest_two",
                                      "min_dim_size_to_factor": 128,
                                      "momentum_dtype": "float32",
                                      "weight_decay_mode": "decoupled_unscaled"}),
    "optax.lamb": ("lamb", {}),
    "optax.lars": ("lars", {"trust_norm": "combined"}),
    "optax.contrib.schedule_free_adamw": ("schedule_free_adamw", {"warmup_lag": True}),
    "optax.contrib.adopt": ("adopt", {}),
    # 2-D leaves by Muon (seen as (in, out)), the others by optax.adamw(nesterov=nesterov)
    "optax.contrib.muon": ("muon", {
        "eps": 1e-8, "momentum_form": "ema_debiased", "muon_params": "2d",
        "adam_learning_rate": None, "adam_b2": 0.999, "adam_eps": 1e-8, "adam_nesterov": True}),
    # the reference (github KellerJordan/Muon, muon.py: SingleDeviceMuonWithAuxAdam, on
    # PyPI as muon-optimizer 0.1.0): muon_update scales by max(1, grad.size(-2) /
    # grad.size(-1)) ** 0.5 of the gradient as stored, so a conv kernel's is kh/kw
    "reference:muon": ("muon", {"iteration_dtype": "bfloat16",
                                "lr_scale": "spectral_last_two"}),
}


#: Options of a preset that follow another argument of its rule, because the
#: native takes one argument for both: preset -> {option: argument}.
#: optax.contrib.muon's Adam (for the non-2-D leaves) takes muon's ``eps`` and
#: ``nesterov``; polyopt's muon has an ``adam_eps`` and ``adam_nesterov`` of its own.
LINKED: dict[str, dict[str, str]] = {
    "optax.contrib.muon": {"adam_eps": "eps", "adam_nesterov": "nesterov"},
}


def linked(native: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of preset ``native`` that follow an argument in ``given``
    (polyopt's names) which does not name them itself, with its value."""
    return {option: given[argument] for option, argument in LINKED.get(native, {}).items()
            if argument in given and option not in given}


def preset(native: str, **overrides: Any):
    """The polyopt rule reproducing ``native`` (a key of PRESETS), with overrides
    (polyopt's names; an override of an argument the native shares with
    another option sets both: :data:`LINKED`)."""
    from polyopt import rules

    try:
        name, options = PRESETS[native]
    except KeyError:
        raise KeyError(f"no preset for {native!r}; known: {sorted(PRESETS)}") from None
    return getattr(rules, name)(**{**options, **linked(native, overrides), **overrides})


def _call(name: str, options: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return f"`rules.{name}({args})`"


def markdown_table() -> str:
    """The table of docs/conventions.md: native optimizer -> polyopt call."""
    rows = ["| native optimizer (defaults) | polyopt call with the same numbers |", "|---|---|"]
    rows += [f"| `{native}` | {_call(*entry)} |" for native, entry in PRESETS.items()]
    return "\n".join(rows)
