"""The one registry of rule cases, reused by the core tests and every adapter.

CASES: (rule, hyperparameters) that every adapter must run; ``wraps`` names
an inner rule for wrappers. ERRORS: bad arguments with the expected
exception and message. Capabilities are data here, not skips in test bodies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polyopt import rules


@dataclasses.dataclass(frozen=True)
class Case:
    rule: str
    options: dict = dataclasses.field(default_factory=dict)
    inner: tuple | None = None  # (rule, options) for lookahead / sam

    def build(self):
        factory = getattr(rules, self.rule)
        if self.inner is not None:
            name, options = self.inner
            return factory(getattr(rules, name)(**options), **self.options)
        return factory(**self.options)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        inner = f"[{self.inner[0]}]" if self.inner else ""
        return f"{self.rule}{inner}({opts})"


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    rule: str
    options: dict
    exception: type
    match: str
    inner: tuple | None = None

    def build(self):
        return Case(self.rule, self.options, self.inner).build()

    def __str__(self) -> str:
        return f"{self.rule}({self.options})"


CASES: list[Case] = [
    Case("sgd", {"learning_rate": 0.05}),
    Case("sgd", {"learning_rate": 0.05, "momentum": 0.9}),
    Case("sgd", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    Case("sgd", {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Case("sgd", {"learning_rate": 0.05, "momentum": 0.9, "momentum_form": "velocity",
                 "nesterov": True}),
    Case("sgd", {"learning_rate": 0.05, "weight_decay": 0.01}),
    Case("sgd", {"learning_rate": 0.05, "weight_decay": 0.01, "weight_decay_mode": "decoupled"}),
    Case("adagrad", {}),
    Case("adagrad", {"initial_accumulator_value": 0.1, "eps": 1e-7, "eps_placement": "inside",
                     "lr_decay": 0.01}),
    Case("rmsprop", {}),
    Case("rmsprop", {"centered": True, "momentum": 0.9}),
    Case("rmsprop", {"eps_placement": "outside", "momentum": 0.9, "momentum_form": "buffer",
                     "decay": 0.99}),
    Case("rmsprop", {"momentum": 0.9, "nesterov": True, "bias_correction": True,
                     "initial_scale": 0.1}),
    Case("adadelta", {}),
    Case("adadelta", {"rho": 0.9, "weight_decay": 0.01}),
    Case("adam", {}),
    Case("adam", {"amsgrad": True}),
    Case("adam", {"amsgrad": True, "amsgrad_form": "corrected", "eps_root": 1e-8}),
    Case("adam", {"eps_placement": "hat", "eps": 1e-7}),
    Case("adam", {"weight_decay": 0.01}),
    Case("adamw", {}),
    Case("adamw", {"weight_decay_mode": "decoupled_unscaled", "weight_decay": 1e-3}),
    Case("amsgrad", {}),
    Case("adamax", {}),
    Case("adamax", {"eps_placement": "outside", "eps": 1e-7}),
    Case("nadam", {}),
    Case("nadam", {"momentum_decay": 1.0}),
    Case("nadam", {"momentum_schedule": False}),
    Case("radam", {}),
    Case("lion", {"learning_rate": 0.01}),
    Case("lion", {"learning_rate": 0.01, "b1": 0.95, "weight_decay": 0.1}),
    Case("adafactor", {}),
    Case("adafactor", {"learning_rate": 0.05, "eps": None, "eps_placement": "floor",
                       "factoring": "last_two", "weight_decay": 0.1}),
    Case("adafactor", {"learning_rate": 0.01, "relative_step": False, "factoring": "largest_two",
                       "min_dim_size_to_factor": 2, "momentum": 0.9, "weight_decay": 0.01,
                       "weight_decay_mode": "decoupled_unscaled", "decay_offset": 1}),
    Case("adafactor", {"factoring": "none", "clipping_threshold": None,
                       "multiply_by_parameter_scale": False, "learning_rate": 0.01,
                       "beta2_decay": -0.5, "param_scale_after_decay": True}),
    Case("adafactor", {"weight_decay": 0.05, "param_scale_after_decay": True,
                       "state_dtype": "float32"}),
    Case("adafactor", {"learning_rate": 0.01, "relative_step": False, "momentum": 0.9,
                       "momentum_dtype": "float32"}),
    Case("lamb", {"learning_rate": 0.01}),
    Case("lamb", {"learning_rate": 0.01, "weight_decay": 0.1, "eps_root": 1e-8}),
    Case("lamb", {"learning_rate": 0.01, "weight_decay": 0.1, "weight_decay_mode": "decoupled",
                  "eps": 1e-7}),
    Case("lamb", {"learning_rate": 0.01, "trust_ratio": False, "weight_decay": 0.1}),
    Case("lars", {"learning_rate": 0.5}),
    Case("lars", {"learning_rate": 0.5, "weight_decay": 0.01, "nesterov": True,
                  "trust_norm": "combined", "eps": 1e-6}),
    Case("lars", {"learning_rate": 0.5, "momentum": 0.0, "weight_decay": 0.01,
                  "trust_coefficient": 0.01}),
    Case("lars", {"learning_rate": 0.5, "momentum_form": "buffer", "trust_ratio": False}),
    Case("schedule_free_adamw", {"learning_rate": 0.01}),
    Case("schedule_free_adamw", {"learning_rate": 0.01, "b1": 0.95, "warmup_steps": 3,
                                 "warmup_lag": True, "r": 0.5, "weight_decay": 0.01}),
    Case("schedule_free_adamw", {"learning_rate": 0.01, "weight_lr_power": 0.0,
                                 "weight_decay": 0.01, "weight_decay_mode": "variable"}),
    Case("adopt", {"learning_rate": 0.01}),
    Case("adopt", {"learning_rate": 0.01, "nesterov": True, "clip_exponent": 0.5,
                   "weight_decay": 0.01, "weight_decay_mode": "decoupled"}),
    Case("adopt", {"learning_rate": 0.01, "use_clipping": False}),
    Case("muon", {"learning_rate": 0.02}),
    Case("muon", {"learning_rate": 0.01, "momentum_form": "ema_debiased", "nesterov": False,
                  "adaptive": True, "weight_decay": 0.1, "adam_weight_decay": 0.05,
                  "adam_learning_rate": None, "adam_lr_ratio": 0.5, "adam_nesterov": True}),
    Case("muon", {"learning_rate": 0.01, "momentum_form": "sum", "lr_scale": "rms",
                  "eps_placement": "clamp", "muon_params": "2d", "adam_eps_placement": "hat",
                  "state_dtype": "float32"}),
    Case("muon", {"learning_rate": 0.01, "preconditioning": "spectral", "nesterov": False}),
    Case("muon", {"learning_rate": 0.01, "preconditioning": "aol", "adaptive": True}),
    Case("muon", {"learning_rate": 0.01, "preconditioning": "schatten", "lr_scale": "rms",
                  "ns_table": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377),
                               (3.7418, -5.5913, 2.3037))}),
    Case("radam", {"eps_placement": "outside", "fallback": "none"}),
    Case("radam", {"total_steps": 20, "warmup_proportion": 0.2, "min_lr": 1e-5,
                   "weight_decay": 0.01, "weight_decay_mode": "decoupled"}),
    Case("lookahead", {"sync_period": 3, "slow_step_size": 0.5},
         inner=("sgd", {"learning_rate": 0.05, "momentum": 0.9})),
    Case("lookahead", {}, inner=("radam", {})),
    Case("lookahead", {"sync_period": 3, "reset_state": True}, inner=("adam", {})),
    Case("ranger", {}),
    Case("ranger", {"gradient_centralization": False, "sync_period": 2}),
]

NAMES = sorted({c.rule for c in CASES})
WRAPPERS = ("lookahead", "sam", "apply_if_finite")  # factories taking an inner rule first

ERRORS: list[ErrorCase] = [
    ErrorCase("sgd", {"learning_rate": -0.1}, ValueError,
              r"sgd: learning_rate must be .*in \[0, inf\), got learning_rate=-0.1"),
    ErrorCase("sgd", {"learning_rate": float("nan")}, ValueError, r"learning_rate=nan"),
    ErrorCase("sgd", {"learning_rate": float("inf")}, ValueError, r"learning_rate=inf"),
    ErrorCase("sgd", {"learning_rate": "0.1"}, TypeError, r"learning_rate='0.1'"),
    ErrorCase("sgd", {"learning_rate": True}, TypeError, r"learning_rate=True"),
    ErrorCase("sgd", {"momentum": 1.5}, ValueError, r"momentum must be a number in \[0, 1\]"),
    ErrorCase("sgd", {"momentum": -0.1}, ValueError, r"momentum=-0.1"),
    ErrorCase("sgd", {"dampening": 2.0}, ValueError, r"dampening=2.0"),
    ErrorCase("sgd", {"nesterov": 1}, TypeError, r"nesterov must be True or False, got nesterov=1"),
    ErrorCase("sgd", {"momentum_form": "keras"}, ValueError,
              r"momentum_form must be one of 'buffer', 'velocity', got momentum_form='keras'"),
    ErrorCase("sgd", {"weight_decay": -1e-4}, ValueError, r"weight_decay=-0.0001"),
    ErrorCase("sgd", {"weight_decay_mode": "L2"}, ValueError, r"weight_decay_mode='L2'"),
    ErrorCase("sgd", {"lr": 0.1}, TypeError, r"sgd: .*lr"),
    ErrorCase("adagrad", {"initial_accumulator_value": -0.1}, ValueError,
              r"initial_accumulator_value=-0.1"),
    ErrorCase("adagrad", {"eps_placement": "hat"}, ValueError, r"eps_placement='hat'"),
    ErrorCase("adagrad", {"lr_decay": -1.0}, ValueError, r"lr_decay=-1.0"),
    ErrorCase("rmsprop", {"decay": 1.0}, ValueError,
              r"rmsprop: decay must be a number in \[0, 1\)"),
    ErrorCase("rmsprop", {"eps": -1e-8}, ValueError, r"eps=-1e-08"),
    ErrorCase("rmsprop", {"centered": "yes"}, TypeError, r"centered='yes'"),
    ErrorCase("adadelta", {"rho": 1.0}, ValueError, r"adadelta: rho must be a number in \[0, 1\)"),
    ErrorCase("adadelta", {"rho": None}, TypeError, r"rho=None"),
    ErrorCase("adam", {"b1": 1.0}, ValueError,
              r"adam: b1 must be a number in \[0, 1\), got b1=1.0"),
    ErrorCase("adam", {"b2": -0.5}, ValueError, r"b2=-0.5"),
    ErrorCase("lion", {"b2": 1.0}, ValueError,
              r"lion: b2 must be a number in \[0, 1\), got b2=1.0"),
    ErrorCase("lion", {"state_dtype": "int8"}, ValueError, r"lion: state_dtype must be one of"),
    ErrorCase("adafactor", {"beta2_decay": 0.8}, ValueError,
              r"adafactor: beta2_decay must be a number in \(-inf, 0\], got beta2_decay=0.8"),
    ErrorCase("adafactor", {"eps": -1e-30}, ValueError,
              r"adafactor: eps must be a number in \[0, inf\) or None, got eps=-1e-30"),
    ErrorCase("adafactor", {"eps2": float("nan")}, ValueError, r"adafactor: eps2 .* got eps2=nan"),
    ErrorCase("adafactor", {"clipping_threshold": 0.0}, ValueError,
              r"adafactor: clipping_threshold must be a number in \(0, inf\) or None, "
              r"got clipping_threshold=0.0"),
    ErrorCase("adafactor", {"factoring": "rows"}, ValueError,
              r"adafactor: factoring must be one of 'layout', 'last_two', 'largest_two', "
              r"'none', got factoring='rows'"),
    ErrorCase("adafactor", {"eps_placement": "outside"}, ValueError,
              r"adafactor: eps_placement must be one of 'inside', 'floor'"),
    ErrorCase("adafactor", {"min_dim_size_to_factor": 1.5}, TypeError,
              r"adafactor: min_dim_size_to_factor must be an integer in \[0, inf\)"),
    ErrorCase("adafactor", {"decay_offset": -1}, ValueError, r"got decay_offset=-1"),
    ErrorCase("adafactor", {"momentum": 0.9, "momentum_dtype": "int8"}, ValueError,
              r"adafactor: momentum_dtype must be one of 'float32', 'float64', 'bfloat16', "
              r"'float16' or None, got momentum_dtype='int8'"),
    ErrorCase("adafactor", {"momentum": 1.0}, ValueError,
              r"adafactor: momentum must be a number in \[0, 1\) or None, got momentum=1.0"),
    ErrorCase("adafactor", {"relative_step": "yes"}, TypeError,
              r"adafactor: relative_step must be True or False"),
    ErrorCase("adafactor", {"weight_decay_mode": "l1"}, ValueError,
              r"adafactor: weight_decay_mode must be one of"),
    ErrorCase("lamb", {"b2": 1.0}, ValueError,
              r"lamb: b2 must be a number in \[0, 1\), got b2=1.0"),
    ErrorCase("lamb", {"weight_decay_mode": "l2"}, ValueError,
              r"lamb: weight_decay_mode must be one of 'inside', 'decoupled', "
              r"got weight_decay_mode='l2'"),
    ErrorCase("lamb", {"trust_coefficient": 0.0}, ValueError,
              r"lamb: trust_coefficient must be a number in \(0, inf\), got trust_coefficient=0.0"),
    ErrorCase("lamb", {"trust_ratio": "yes"}, TypeError,
              r"lamb: trust_ratio must be True or False, got trust_ratio='yes'"),
    ErrorCase("lars", {"momentum": 1.5}, ValueError,
              r"lars: momentum must be a number in \[0, 1\], got momentum=1.5"),
    ErrorCase("lars", {"trust_norm": "sum"}, ValueError,
              r"lars: trust_norm must be one of 'separate', 'combined', got trust_norm='sum'"),
    ErrorCase("lars", {"eps": -1e-9}, ValueError, r"lars: eps must be .* got eps=-1e-09"),
    ErrorCase("lars", {"weight_decay": -0.1}, ValueError, r"lars: weight_decay.*-0.1"),
    ErrorCase("lars", {"state_dtype": "int8"}, ValueError, r"lars: state_dtype must be one of"),
    ErrorCase("schedule_free_adamw", {"b1": 0.0}, ValueError,
              r"schedule_free_adamw: b1 must be a number in \(0, 1\), got b1=0.0"),
    ErrorCase("schedule_free_adamw", {"warmup_steps": -1}, ValueError,
              r"schedule_free_adamw: warmup_steps must be an integer in \[0, inf\), "
              r"got warmup_steps=-1"),
    ErrorCase("schedule_free_adamw", {"warmup_steps": 2.5}, TypeError, r"warmup_steps=2.5"),
    ErrorCase("schedule_free_adamw", {"weight_decay_mode": "l2"}, ValueError,
              r"weight_decay_mode must be one of 'gradient', 'variable', "
              r"got weight_decay_mode='l2'"),
    ErrorCase("schedule_free_adamw", {"weight_lr_power": -1.0}, ValueError,
              r"weight_lr_power=-1.0"),
    ErrorCase("schedule_free_adamw", {"r": float("nan")}, ValueError, r"r=nan"),
    ErrorCase("adopt", {"b2": 1.0}, ValueError,
              r"adopt: b2 must be a number in \[0, 1\), got b2=1.0"),
    ErrorCase("adopt", {"clip_exponent": -0.25}, ValueError,
              r"adopt: clip_exponent must be a number in \[0, inf\), got clip_exponent=-0.25"),
    ErrorCase("adopt", {"use_clipping": 1}, TypeError,
              r"adopt: use_clipping must be True or False, got use_clipping=1"),
    ErrorCase("muon", {"ns_steps": 0}, ValueError,
              r"muon: ns_steps must be an integer in \[1, inf\), got ns_steps=0"),
    ErrorCase("muon", {"ns_steps": 2.5}, TypeError, r"muon: ns_steps .* got ns_steps=2.5"),
    ErrorCase("muon", {"momentum": -0.5}, ValueError,
              r"muon: momentum must be a number in \[0, 1\), got momentum=-0.5"),
    ErrorCase("muon", {"momentum": 1.0}, ValueError, r"muon: momentum .* got momentum=1.0"),
    ErrorCase("muon", {"eps": -1e-7}, ValueError,
              r"muon: eps must be a number in \[0, inf\), got eps=-1e-07"),
    ErrorCase("muon", {"weight_decay": -0.1}, ValueError,
              r"muon: weight_decay must be a number in \[0, inf\), got weight_decay=-0.1"),
    ErrorCase("muon", {"adam_weight_decay": -0.1}, ValueError, r"got adam_weight_decay=-0.1"),
    ErrorCase("muon", {"eps_placement": "floor"}, ValueError,
              r"muon: eps_placement must be one of 'add', 'clamp', got eps_placement='floor'"),
    ErrorCase("muon", {"lr_scale": "original"}, ValueError,
              r"muon: lr_scale must be one of 'spectral', 'rms', 'none', 'spectral_last_two', got "
              r"lr_scale='original'"),
    ErrorCase("muon", {"preconditioning": "newton"}, ValueError,
              r"muon: preconditioning must be one of 'frobenius', 'spectral', 'aol', "
              r"'schatten', got preconditioning='newton'"),
    ErrorCase("muon", {"ns_table": ()}, ValueError,
              r"muon: ns_table must be a triple of finite numbers \(a, b, c\) or a non-empty "
              r"sequence of them or None, got ns_table=\(\)"),
    ErrorCase("muon", {"ns_table": (3.0, -3.0)}, ValueError,
              r"muon: ns_table must be .*, got ns_table=\(3.0, -3.0\)"),
    ErrorCase("muon", {"ns_table": ((3.0, -3.0, 1.0), (3.0, -3.0))}, TypeError,
              r"muon: ns_table must be .*, got ns_table=\(\(3.0, -3.0, 1.0\), \(3.0, -3.0\)\)"),
    ErrorCase("muon", {"ns_table": "dion"}, ValueError,
              r"muon: ns_table must be .*, got ns_table='dion'"),
    ErrorCase("muon", {"ns_table": ((3.0, -3.0, 1.0),) * 3, "ns_steps": 2}, ValueError,
              r"muon: ns_table \(optax's ns_coeffs\) holds 3 triples, more than ns_steps=2"),
    ErrorCase("muon", {"ns_table": (3.0, -3.0, 1.0), "ns_a": 3.0}, ValueError,
              r"muon: ns_table \(optax's ns_coeffs\) replaces ns_a, ns_b, ns_c, got both"),
    ErrorCase("muon", {"rms_scale": 0.0}, ValueError, r"muon: rms_scale .* got rms_scale=0.0"),
    ErrorCase("muon", {"muon_params": "2D"}, ValueError, r"muon: muon_params must be one of"),
    ErrorCase("muon", {"adam_lr_ratio": -1.0}, ValueError,
              r"muon: adam_lr_ratio must be a number in \[0, inf\), got adam_lr_ratio=-1.0"),
    ErrorCase("muon", {"iteration_dtype": "float16"}, ValueError,
              r"muon: iteration_dtype must be one of 'bfloat16', 'float32' or None"),
    ErrorCase("muon", {"adam_nesterov": True, "adam_eps_placement": "hat"}, ValueError,
              r"muon: adam_nesterov=True takes adam_eps_placement='outside'"),
    ErrorCase("adam", {"b1": (0.9, 0.99)}, TypeError, r"b1=\(0.9, 0.99\)"),
    ErrorCase("adam", {"eps": float("nan")}, ValueError, r"eps=nan"),
    ErrorCase("adam", {"eps_root": -1.0}, ValueError, r"eps_root=-1.0"),
    ErrorCase("adam", {"eps_placement": "inside"}, ValueError, r"eps_placement='inside'"),
    ErrorCase("adam", {"amsgrad": "False"}, TypeError, r"amsgrad='False'"),
    ErrorCase("adam", {"amsgrad_form": "max"}, ValueError, r"amsgrad_form='max'"),
    ErrorCase("adamw", {"weight_decay": -0.01}, ValueError, r"adamw: weight_decay"),
    ErrorCase("amsgrad", {"b2": 1.0}, ValueError, r"b2=1.0"),
    ErrorCase("adamax", {"eps_placement": "hat"}, ValueError,
              r"adamax: eps_placement must .* got eps_placement='hat'"),
    ErrorCase("nadam", {"momentum_decay": -0.004}, ValueError, r"momentum_decay=-0.004"),
    ErrorCase("nadam", {"momentum_schedule": None}, TypeError, r"momentum_schedule=None"),
    ErrorCase("radam", {"threshold": 4.0}, ValueError,
              r"radam: threshold must be a number in \(4, inf\), got threshold=4.0"),
    ErrorCase("radam", {"total_steps": 10.5}, TypeError, r"total_steps must be an integer"),
    ErrorCase("radam", {"total_steps": -1}, ValueError, r"total_steps=-1"),
    ErrorCase("radam", {"warmup_proportion": 1.5}, ValueError, r"warmup_proportion=1.5"),
    ErrorCase("radam", {"fallback": "sgd"}, ValueError, r"fallback='sgd'"),
    ErrorCase("apply_if_finite", {"max_consecutive_errors": -1}, ValueError,
              r"apply_if_finite: max_consecutive_errors must be an integer in \[0, inf\], "
              r"got max_consecutive_errors=-1", inner=("adam", {})),
    ErrorCase("apply_if_finite", {"max_consecutive_errors": 1.5}, TypeError,
              r"max_consecutive_errors=1.5", inner=("adam", {})),
    ErrorCase("lookahead", {"sync_period": 0}, ValueError,
              r"lookahead: sync_period must be an integer in \[1, inf\)",
              inner=("sgd", {})),
    ErrorCase("lookahead", {"sync_period": 2.0}, TypeError, r"sync_period=2.0", inner=("sgd", {})),
    ErrorCase("lookahead", {"slow_step_size": 1.5}, ValueError, r"slow_step_size=1.5",
              inner=("sgd", {})),
    ErrorCase("ranger", {"b1": 1.2}, ValueError, r"ranger: b1"),
    ErrorCase("ranger", {"gradient_centralization": 1}, TypeError, r"gradient_centralization=1"),
    ErrorCase("sam", {"rho": -0.05}, ValueError,
              r"sam: rho must be a number in \[0, inf\), got rho=-0.05",
              inner=("sgd", {})),
    ErrorCase("sam", {"adaptive": "no"}, TypeError, r"adaptive='no'", inner=("sgd", {})),
    ErrorCase("clip_by_global_norm", {"max_norm": -1.0}, ValueError, r"max_norm=-1.0"),
    ErrorCase("centralize", {"keep_axis": 0.5}, TypeError, r"keep_axis=0.5"),
    ErrorCase("add_decayed_weights", {"weight_decay": -1.0}, ValueError, r"weight_decay=-1.0"),
    ErrorCase("decoupled_weight_decay", {"weight_decay": 0.1, "learning_rate": -1.0}, ValueError,
              r"learning_rate=-1.0"),
]


def build(name: str, **options: Any):
    return getattr(rules, name)(**options)
