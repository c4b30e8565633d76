"""RuleOptimizer: a keras.optimizers.Optimizer that runs a polyopt rule.

The class holds glue only. Each step it rebuilds the rule's state (a
NamedTuple) from Keras variables, calls ``rule.update`` on the whole list of
trainable variables at once, and assigns the new params and state back.
One call for the whole list (rather than Keras's update_step per variable)
computes the scalar terms (bias corrections, ...) once per dtype: faster
eagerly, the same graph under XLA. Under a ``tf.distribute`` strategy Keras
all-reduces the gradients and updates every replica's copy one variable at a
time, so there the rule runs per variable (``update_step``), with the same
numbers.

Where things live:

- per-parameter state (moments, momentum buffers, slow weights): one Keras
  variable per trainable variable and slot, made in ``build()`` from
  ``rule.init`` (so ``model.save``/``load_model`` and checkpoints keep it);
- the rule's top-level step count: Keras' own ``optimizer.iterations``
  (divided by ``gradient_accumulation_steps`` as Keras does), so that a
  ``LearningRateSchedule`` and the rule see the same step;
- other scalar state (NAdam's momentum product, the counts of wrapped rules):
  scalar Keras variables;
- the learning rate: Keras' own machinery (a variable, a
  ``LearningRateSchedule``, a callable, or a ``polyopt.schedules`` schedule,
  wrapped in :class:`PolyoptSchedule`), passed to the rule as a 0-d tensor
  every step, never baked in as a constant;
- every other hyperparameter: a Python number, exact in float64 (the rule
  combines it with the tensors in their dtype; nothing is cast through float32);
- under a ``keras.distribution`` (JAX backend): a state variable shaped like its
  param has the param's layout, a factored statistic (Adafactor's) the param's
  layout along the axes it keeps, every other one is replicated (:class:`_Placement`).

Sparse gradients (TensorFlow's ``tf.IndexedSlices``, JAX's ``BCOO``) are
densified for the rule (duplicate entries summed). Where the rule says a zero
gradient leaves an element alone (``rule.sparse``: SGD, AdaGrad, RMSprop
without momentum, AdaDelta, Adafactor), the new values are written back only
at the gradient's entries, as sparse values (TensorFlow's ``scatter_update``;
on JAX this class's :meth:`assign` of a ``BCOO`` sets its entries): the
params for ``"updates"``, the params and the slots for ``"updates_and_state"``.

Weight decay is the rule's own (``weight_decay`` and ``weight_decay_mode``
from the spec); Keras' base-class decay is never used (it is always passed
``weight_decay=None``). ``exclude_from_weight_decay`` still works: excluded
variables are updated by the same rule built with ``weight_decay=0``.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import keras
import numpy as np
from keras import ops

from polyopt import hyper, rules, schedules
from polyopt._namespace import namespace
from polyopt.rules import COUNT_LIMIT, _state

_BACKEND = keras.backend.backend()

#: Keras base-class options accepted by every optimizer, with Keras' defaults.
BASE_OPTIONS: dict[str, Any] = {
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
    "name": None,
}


@keras.saving.register_keras_serializable(package="polyopt")
class PolyoptSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A ``polyopt.schedules`` schedule as a Keras ``LearningRateSchedule``.

    Optimizers wrap a :class:`polyopt.schedules.Schedule` passed as
    ``learning_rate`` in this class themselves. The step is converted to
    float64 before the schedule sees it (float32 on JAX without x64).
    """

    def __init__(self, schedule: schedules.Schedule) -> None:
        if not isinstance(schedule, schedules.Schedule):
            raise TypeError(
                f"PolyoptSchedule: schedule must be a polyopt.schedules.Schedule, got {schedule!r}")
        self.schedule = schedule

    def __call__(self, step):
        return self.schedule(ops.cast(step, "float64"))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.schedule.name, "config": dict(self.schedule.config)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PolyoptSchedule:
        return cls(getattr(schedules, config["name"])(**config["config"]))


# --------------------------------------------------------------------------
# the rule's state <-> Keras variables, along the core walker's entries


def _storage(entries: list) -> list:
    """Where each entry of a state lives: ("slot", k) slot variables k,
    ("empty",), ("count",) optimizer.iterations, ("global", j) global variable j,
    ("none",)."""
    out, slots, globals_ = [], 0, 0
    for entry in entries:
        if entry.kind == "slot":
            out.append(("slot", slots))
            slots += 1
        elif entry.kind == "array" and entry.path == ("count",):
            out.append(("count",))
        elif entry.kind == "array":
            out.append(("global", globals_))
            globals_ += 1
        else:
            out.append((entry.kind,))
    return out


class _Layout:
    """The state made in build() and where each of its leaves is stored, held
    apart from Keras's attribute tracking (which would wrap its tuples)."""

    __slots__ = ("template", "where")

    def __init__(self, template: Any, where: list) -> None:
        self.template = template
        self.where = where


def _variable_name(path: tuple) -> str:
    return "_".join(str(p) for p in path)


class RuleOptimizer(keras.optimizers.Optimizer):
    """Base class: a Keras 3 optimizer running the polyopt rule named by ``spec``.

    Subclasses set ``spec`` (a :class:`polyopt.hyper.Spec`) and may override
    :meth:`make_rule`. The constructor's arguments are generated from the
    spec (Keras spellings, the core's defaults) plus Keras' base-class
    options (:data:`BASE_OPTIONS`); every value is checked at construction
    (``spec.validate(framework="keras")``).
    """

    spec: hyper.Spec
    #: weight_decay=None is refused (Keras's AdamW) instead of meaning 0 (every other)
    weight_decay_required: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__init__ = _generated_init(cls.spec)

    # ---- construction

    def _setup(self, values: dict[str, Any], base: dict[str, Any],
               learning_rate: Any = None, layouts: Any = None) -> None:
        """Validate ``values`` (canonical names) and initialise the Keras base class.

        ``learning_rate`` is for specs without one (Lookahead: the inner optimizer's).
        """
        values = self.spec.validate(values, framework="keras")
        learning_rate = values.pop("learning_rate", learning_rate)
        unknown = set(base) - set(BASE_OPTIONS)
        if unknown:
            raise TypeError(f"{self.spec.name}: unexpected argument(s) {sorted(unknown)}")
        if not (layouts is None or callable(layouts) or isinstance(layouts, dict)):
            raise TypeError(f"{self.spec.name}: layouts must be None, a dict {{variable path: "
                            f"Layout}} or a callable variable -> Layout, got layouts={layouts!r}")
        base = {**BASE_OPTIONS, **base}
        super().__init__(learning_rate=_keras_learning_rate(learning_rate), weight_decay=None,
                         **base)
        self._hypers = dict(values)
        self._layout_overrides = layouts

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The rule's hyperparameters (canonical names) other than the learning rate."""
        return dict(self._hypers)

    def make_rule(self, learning_rate: Any, **overrides: Any) -> rules.Rule:
        """The polyopt rule with this optimizer's hyperparameters and ``learning_rate``."""
        return getattr(rules, self.spec.name)(learning_rate=learning_rate,
                                              **{**self._hypers, **overrides})

    # ---- state

    def build(self, variables):
        if self.built:
            return
        for v in variables:
            if np.issubdtype(_numpy_dtype(v.dtype), np.complexfloating):
                raise TypeError(
                    f"polyopt.keras.{type(self).__name__}: variable "
                    f"{getattr(v, 'path', v.name)} has dtype {_numpy_dtype(v.dtype)}: complex "
                    f"variables are not supported (Keras's own optimizers square a complex "
                    f"gradient as it is, g*g, where optax uses |g|^2 and torch the real view: "
                    f"docs/conventions.md, Complex parameters)")
        super().build(variables)
        #: the state copies values TensorFlow could not read in build() (a model built
        #: inside the traced first step): the first step makes it from the params
        self._init_at_first_step = False
        if not variables:  # Keras allows it: the base's variables only, no state
            self._state_layout = _Layout(None, [])
            self._slot_variables, self._global_variables = [], []
            return
        # The layout of the state from zeros; its values lazily, when Keras calls the
        # initializers (on TensorFlow build() may run inside a tf.function trace:
        # the values are then computed eagerly, under tf.init_scope).
        zeros = [np.zeros(tuple(v.shape), dtype=_numpy_dtype(v.dtype)) for v in variables]
        rule = self.make_rule(0.0)
        template = rules.init_of(rule, zeros, self._param_layouts(rule, variables))
        entries = _state.entries(template, len(variables))
        self._state_layout = _Layout(template, _storage(entries))
        initial = _InitialState(self, variables)
        placement = _Placement.of(self, rule, variables, entries)
        self._slot_variables = []
        self._global_variables = []
        # every slot's variables first, then the global ones (the order saved models keep)
        for entry, (kind, *index) in zip(entries, self._where):
            name = _variable_name(entry.path)
            if kind == "slot":
                k = index[0]
                self._slot_variables.append([
                    self.add_variable(shape=tuple(a.shape), dtype=_numpy_dtype(a.dtype).name,
                                      name=f"{_variable_name((v.path,))}_{name}".replace(
                                          "/", "_"), initializer=initial.slot(k, i),
                                      layout=placement and placement.slot(k, i, a.shape))
                    if tuple(a.shape) != tuple(v.shape) or _numpy_dtype(a.dtype) != (
                        _numpy_dtype(v.dtype))
                    else self.add_variable_from_reference(v, name=name,
                                                          initializer=initial.slot(k, i))
                    for i, (v, a) in enumerate(zip(variables, entry.value))
                ])
        for entry, (kind, *index) in zip(entries, self._where):
            if kind == "global":
                array, name = entry.value, _variable_name(entry.path)
                self._global_variables.append(self.add_variable(
                    shape=array.shape, dtype=_numpy_dtype(array.dtype).name, name=name,
                    initializer=initial.global_(index[0]),
                    layout=placement and placement.replicated(array.shape)))

    @property
    def _template(self) -> Any:
        return self._state_layout.template

    @property
    def _where(self) -> list:
        return self._state_layout.where

    def _param_layouts(self, rule: Any, variables: list) -> list | None:
        """Each variable's Layout for a rule that uses layouts (else None): the
        ``layouts`` given at construction (a dict {variable path: Layout}, or a
        callable ``variable -> Layout or None``), else Keras's (the last axis
        is the output: Dense (in, out), Conv (kh, kw, in, out))."""
        if not rule.uses_layout:
            return None
        given = self._layout_overrides
        if callable(given):
            given = [given(v) for v in variables]
        elif given is not None:
            paths = {v.path for v in variables}
            unknown = sorted(set(given) - paths)
            if unknown:
                raise ValueError(f"{self.spec.name}: layouts names {unknown[:5]}, which are not "
                                 f"variables of this optimizer")
            given = [given.get(v.path) for v in variables]
        return _state.layouts_for(self.spec.name, variables, given, _state.out_last,
                                  names=[f"variable {v.path!r}" for v in variables])

    def _rebuild(self, template: Any, indices: list[int], count: Any, globals_: list) -> Any:
        """The rule's state for the variables at ``indices`` (``template``: the state
        made in build(), whose structure the core walker gives)."""
        leaves = []
        for kind, *index in self._where:
            if kind == "slot":
                leaves.append([_read(self._slot_variables[index[0]][i]) for i in indices])
            elif kind == "global":
                leaves.append(globals_[index[0]])
            elif kind == "count":
                leaves.append(count)
            else:
                leaves.append([] if kind == "empty" else None)
        return _state.rebuild(template, leaves)

    def _write(self, new: Any, indices: list[int], write_globals: bool,
               write_slots: bool = True, entries: list | None = None) -> None:
        """Assign the state ``new`` of the variables at ``indices``; a slot of the
        variable ``indices[j]`` only at ``entries[j]`` when that is not None."""
        entries = entries or [None] * len(indices)
        for (kind, *index), entry in zip(self._where, _state.entries(new)):
            if kind == "slot" and write_slots:
                for i, value, at in zip(indices, entry.value, entries):
                    variable = self._slot_variables[index[0]][i]
                    self.assign(variable, value if at is None else at.sparse(at.take(value)))
            elif kind == "global" and write_globals:
                self.assign(self._global_variables[index[0]], entry.value)

    # ---- the step

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if _BACKEND == "tensorflow":
            import tensorflow as tf

            if tf.distribute.has_strategy():
                # tf.distribute: Keras all-reduces the gradients and calls
                # update_step once per variable on every replica's copy.
                return super()._backend_update_step(grads, trainable_variables, learning_rate)
        if _BACKEND == "torch":
            import torch

            with torch.no_grad():
                return self._update(grads, trainable_variables, learning_rate)
        return self._update(grads, trainable_variables, learning_rate)

    def assign(self, variable, value):
        """Keras's ``assign``; on JAX a ``BCOO`` value sets only its entries (as
        TensorFlow's ``scatter_update`` does for ``IndexedSlices``)."""
        if _BACKEND == "jax":
            from jax.experimental import sparse as jax_sparse

            if isinstance(value, jax_sparse.BCOO):
                current = _read(variable)
                value = current.at[tuple(value.indices.T)].set(
                    value.data.astype(current.dtype), mode="drop")
        super().assign(variable, value)

    def update_step(self, gradient, variable, learning_rate):
        # One variable at a time (tf.distribute). Scalar state is written by
        # the call for the last variable only: every earlier call reads it first.
        last = self._get_variable_index(variable) == len(self._trainable_variables) - 1
        self._update([gradient], [variable], learning_rate, write_globals=last)

    def _update(self, grads, variables, learning_rate, write_globals: bool = True) -> None:
        indices = [self._get_variable_index(v) for v in variables]
        count = step_count(self.iterations)
        lr = _runtime(learning_rate)
        globals_ = [_read(v) for v in self._global_variables]
        new_globals = None
        for group, weight_decay in self._groups(variables):
            rule = self.make_rule(lr, **weight_decay)
            params = [_read(variables[k]) for k in group]
            gs = [_as_dtype(grads[k], params[j].dtype) for j, k in enumerate(group)]
            ids = [indices[k] for k in group]
            state = self._rebuild(self._template, ids, count, globals_)
            layouts = self._param_layouts(rule, [variables[k] for k in group])
            if self._init_at_first_step:
                state = _state.select(namespace(*params), count == 0,
                                      rules.init_of(rule, params, layouts), state)
            updates, new_state = rules.update_of(rule, gs, state, params, layouts)
            sparse = getattr(rule, "sparse", "dense")
            entries = [None if sparse == "dense" else _Entries.of(grads[k]) for k in group]
            for k, p, u, at in zip(group, params, updates, entries):
                if at is None:
                    # p + u, written in place: no copy of the variable read as params
                    self.assign_add(variables[k], u)
                else:  # u is zero elsewhere: p + u at the gradient's entries only
                    self.assign(variables[k], at.sparse(at.take(p) + at.take(u)))
            self._write(new_state, ids, write_globals=False,
                        entries=entries if sparse == "updates_and_state" else None)
            if new_globals is None:
                new_globals = new_state
        if write_globals and self._global_variables:
            self._write(new_globals, [], write_globals=True, write_slots=False)

    def _groups(self, variables) -> list[tuple[list[int], dict]]:
        """Positions of the variables with and without weight decay."""
        everything = [(list(range(len(variables))), {})]
        if hyper_is_zero(self._weight_decay()):
            return everything
        decayed = [self._use_weight_decay(v) for v in variables]
        if all(decayed):
            return everything
        groups = [([k for k, d in enumerate(decayed) if d], {}),
                  ([k for k, d in enumerate(decayed) if not d], {"weight_decay": 0.0})]
        return [g for g in groups if g[0]]

    def _weight_decay(self) -> Any:
        return self._hypers.get("weight_decay", 0)

    # ---- state files (polyopt.keras.interop)

    def export_state(self, file, variables_or_model, names=None) -> None:
        """Write the state to a framework-neutral file: see :mod:`polyopt.keras.interop`."""
        from polyopt.keras import interop

        interop.export_state(self, file, variables_or_model, names)

    def import_state(self, file, variables_or_model, names=None) -> dict:
        """Load a state file from any adapter: see :mod:`polyopt.keras.interop`."""
        from polyopt.keras import interop

        return interop.import_state(self, file, variables_or_model, names)

    # ---- saving

    def load_own_variables(self, store):
        saved = len(store.keys())
        if saved != len(self.variables):
            raise ValueError(
                f"{type(self).__name__} '{self.name}': the saved optimizer state holds "
                f"{saved} variables but this optimizer ({self.spec.name} with "
                f"{self._describe_hypers()}) has {len(self.variables)}. The state was "
                "saved by a different optimizer or with other options (e.g. momentum, "
                "amsgrad, centered); rebuild the optimizer as it was saved, or load "
                "the model with compile=False."
            )
        for i, variable in enumerate(self.variables):
            value = store[str(i)]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{type(self).__name__} '{self.name}': saved optimizer variable {i} "
                    f"has shape {tuple(value.shape)}, but {variable.path} has shape "
                    f"{tuple(variable.shape)}")
        for i, variable in enumerate(self.variables):
            variable.assign(store[str(i)])

    def _describe_hypers(self) -> str:
        return ", ".join(f"{self.spec[k].spelling('keras')}={v!r}"
                         for k, v in self._hypers.items())

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("weight_decay", None)  # the rule's, below
        for name, value in self._hypers.items():
            config[self.spec[name].spelling("keras")] = value
        if isinstance(self._layout_overrides, dict):
            config["layouts"] = {  # batch axes only when there are some
                path: [list(axes) for axes in (
                    layout if len(layout) > 2 and len(layout[2]) else layout[:2])]
                for path, layout in self._layout_overrides.items()}
        return config


def hyper_is_zero(value: Any) -> bool:
    return isinstance(value, numbers.Number) and value == 0


def _generated_init(spec: hyper.Spec):
    """An __init__ whose signature is the spec's (Keras spellings) plus BASE_OPTIONS."""
    keras_to_name = {h.spelling("keras"): h.name for h in spec}
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(h.spelling("keras"), inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=h.default)
        for h in spec
    ]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                   for k, v in BASE_OPTIONS.items()]
    parameters.append(inspect.Parameter("layouts", inspect.Parameter.KEYWORD_ONLY, default=None))
    signature = inspect.Signature(parameters)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e}; allowed arguments: "
                            f"{list(signature.parameters)[1:]}") from None
        arguments = dict(bound.arguments)
        arguments.pop("self")
        values = {keras_to_name[k]: v for k, v in arguments.items() if k in keras_to_name}
        if "weight_decay" in values and values["weight_decay"] is None:
            # Keras's spelling of "no weight decay", except for AdamW, which is its decay
            if type(self).weight_decay_required:
                raise ValueError(f"{type(self).__name__}: Argument `weight_decay` must be a "
                                 f"float. Received: weight_decay=None")
            values["weight_decay"] = 0.0
        base = {k: v for k, v in arguments.items() if k in BASE_OPTIONS}
        self._setup(values, base, layouts=arguments.get("layouts"))

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    return __init__


def _keras_learning_rate(value: Any) -> Any:
    """What Keras' base class takes: a float, a LearningRateSchedule or a callable."""
    if isinstance(value, schedules.Schedule):
        return PolyoptSchedule(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


class _InitialState:
    """``rule.init`` of the variables' values, computed once, eagerly, on first use."""

    def __init__(self, optimizer: RuleOptimizer, variables: list) -> None:
        self.optimizer = optimizer
        self.variables = variables
        self.slots: list | None = None
        self.globals: list | None = None

    def _compute(self) -> None:
        if self.slots is not None:
            return
        with _eager():
            values = [np.asarray(ops.convert_to_numpy(v)) for v in self.variables]
        rule = self.optimizer.make_rule(0.0)
        layouts = self.optimizer._param_layouts(rule, self.variables)
        # A variable that TensorFlow creates inside the traced first step (a model
        # built lazily by fit) has no value to read yet. Its state does not need
        # one unless the rule copies the params (Lookahead's slow weights,
        # Schedule-Free's z): then the state from zeros and from ones differ, and
        # the first step makes the state from the params, in the graph (Keras's
        # natives assign the copy in build(), which TensorFlow then records into
        # the traced step: the copy is made again at every step).
        unread = [i for i, (v, a) in enumerate(zip(self.variables, values))
                  if a.shape != tuple(v.shape)]
        for i in unread:
            values[i] = np.zeros(tuple(self.variables[i].shape),
                                 _numpy_dtype(self.variables[i].dtype))
        state = rules.init_of(rule, values, layouts)
        if unread:
            ones = [np.ones_like(a) if i in unread else a for i, a in enumerate(values)]
            other = rules.init_of(rule, ones, layouts)
            self.optimizer._init_at_first_step = any(
                not np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(_leaves(state), _leaves(other)))
        entries = _state.entries(state, len(values))
        self.slots = [e.value for e in entries if e.kind == "slot"]
        self.globals = [e.value for e, (kind, *_) in zip(entries, self.optimizer._where)
                        if kind == "global"]

    def slot(self, k: int, i: int):
        def initializer(shape, dtype=None):
            self._compute()
            return np.asarray(self.slots[k][i]).reshape(shape)

        return initializer

    def global_(self, j: int):
        def initializer(shape, dtype=None):
            self._compute()
            return np.asarray(self.globals[j]).reshape(shape)

        return initializer


class _Placement:
    """Where the state variables that are not shaped like their param go under a
    ``keras.distribution`` (those that are take their param's layout through
    ``add_variable_from_reference``): a slot array that keeps some axes of its param
    (Adafactor's factored statistics: a kernel's rows, its columns) is laid out
    along those axes as the param is; the others (scalars, empty placeholders, the
    global state) are replicated. Which axes an array keeps is read off the state
    of a probe: the rule's init for params whose axes differ in size
    (``_state.probe_shape``: at most a few elements longer per axis), made only for
    the params that are sharded and hold such an array. Without a distribution,
    or for a param without a layout, Keras decides (None)."""

    def __init__(self, mesh: Any, params: list, kept: dict) -> None:
        self.mesh, self.params, self.kept = mesh, params, kept

    @classmethod
    def of(cls, optimizer: RuleOptimizer, rule: Any, variables: list,
           entries: list) -> _Placement | None:
        distribution = keras.distribution.distribution()
        if distribution is None:
            return None
        params = [_layout_axes(v) for v in variables]
        slots = [e.value for e in entries if e.kind == "slot"]
        probed = [i for i, (v, axes) in enumerate(zip(variables, params))
                  if axes is not None and any(a is not None for a in axes[0])
                  and any(tuple(s[i].shape) != tuple(v.shape) and s[i].ndim > 0
                          and s[i].size > 0 for s in slots)]
        kept = {}
        if probed:
            chosen = [variables[i] for i in probed]
            zeros = [np.zeros(_state.probe_shape(v.shape), dtype=_numpy_dtype(v.dtype))
                     for v in chosen]
            state = rules.init_of(rule, zeros, optimizer._param_layouts(rule, chosen))
            probes = [e.value for e in _state.entries(state, len(chosen)) if e.kind == "slot"]
            for k, (slot, probe) in enumerate(zip(slots, probes)):
                for j, i in enumerate(probed):
                    kept[k, i] = _state.kept_axes(tuple(slot[i].shape),
                                                  tuple(variables[i].shape),
                                                  tuple(probe[j].shape))
        return cls(distribution.device_mesh, params, kept)

    def slot(self, k: int, i: int, shape: tuple) -> Any:
        """The layout of slot ``k``'s array (of ``shape``) for param ``i``."""
        if self.params[i] is None:
            return None
        axes, make = self.params[i]
        kept = self.kept.get((k, i))
        if kept is None:
            return make((None,) * len(shape))
        return make(tuple(axes[a] for a in kept))

    def replicated(self, shape: tuple) -> Any:
        return keras.distribution.TensorLayout((None,) * len(shape), self.mesh)


def _layout_axes(variable: Any) -> tuple | None:
    """(the mesh axis of each axis of ``variable``, a function mesh axes -> a layout
    of the same kind on the same mesh), from its Keras ``TensorLayout`` or a JAX
    ``NamedSharding``; None for a variable without a layout."""
    layout = getattr(variable, "_layout", None)
    if isinstance(layout, keras.distribution.TensorLayout):
        mesh = layout.device_mesh
        return (tuple(layout.axes) + (None,) * (len(variable.shape) - len(layout.axes)),
                lambda axes: keras.distribution.TensorLayout(axes, mesh))
    if _BACKEND == "jax":
        import jax

        if isinstance(layout, jax.sharding.NamedSharding):
            spec = tuple(None if e == () else e for e in layout.spec)
            return (spec + (None,) * (len(variable.shape) - len(spec)),
                    lambda axes: jax.sharding.NamedSharding(
                        layout.mesh, jax.sharding.PartitionSpec(*axes)))
    return None


def _leaves(state: Any) -> list:
    """Every array of a state, in the walker's order."""
    out = []
    for entry in _state.entries(state):
        out += list(entry.value) if entry.kind == "slot" else [entry.value] if (
            entry.kind == "array") else []
    return out


def _eager():
    """A context where values can be read eagerly (tf.init_scope on TensorFlow)."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    import contextlib

    return contextlib.nullcontext()


def _numpy_dtype(dtype: Any) -> np.dtype:
    return np.dtype(keras.backend.standardize_dtype(dtype))


def step_count(iterations) -> Any:
    """Keras' ``optimizer.iterations`` as the rule's int32 count, saturating at
    2**31 - 1: an int64 count (TensorFlow backend) beyond it is clipped, and an
    int32 one that Keras' own increment wrapped negative (JAX and torch
    backends) reads as the limit, never as a negative step."""
    limited = ops.where(iterations < 0, COUNT_LIMIT, ops.minimum(iterations, COUNT_LIMIT))
    return ops.cast(limited, "int32")


def _read(variable: Any) -> Any:
    """A variable's current value as a backend tensor."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(variable)  # keras.ops returns tf.Variables as they are
    return ops.convert_to_tensor(variable)


def _as_dtype(gradient: Any, dtype: Any) -> Any:
    """A dense gradient tensor of ``dtype``: TensorFlow's IndexedSlices and JAX's
    BCOO are densified, duplicate entries summed (every row's moments decay, as
    in keras.optimizers on dense math)."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        gradient = tf.convert_to_tensor(gradient)
    gradient = ops.convert_to_tensor(gradient, sparse=False)
    return gradient if gradient.dtype == dtype else ops.cast(gradient, dtype)


class _Entries:
    """The entries a sparse gradient holds: the rows of a TensorFlow
    ``IndexedSlices``, the indices of a JAX ``BCOO`` (duplicates allowed: the
    values written there are the same each time)."""

    def __init__(self, indices: Any, shape: tuple | None, kind: str) -> None:
        self.indices, self.shape, self.kind = indices, shape, kind

    @classmethod
    def of(cls, gradient: Any) -> _Entries | None:
        """The entries of a sparse gradient; None for a dense one."""
        if _BACKEND == "tensorflow":
            import tensorflow as tf

            if isinstance(gradient, tf.IndexedSlices):
                return cls(gradient.indices, None, "rows")
        elif _BACKEND == "jax":
            from jax.experimental import sparse as jax_sparse

            if isinstance(gradient, jax_sparse.BCOO) and gradient.n_batch == 0:
                return cls(gradient.indices, tuple(gradient.shape), "bcoo")
        return None

    def take(self, value: Any) -> Any:
        """``value`` at the entries."""
        if self.kind == "rows":
            import tensorflow as tf

            return tf.gather(value, self.indices)
        return value[tuple(self.indices.T)]

    def sparse(self, values: Any) -> Any:
        """``values`` (as :meth:`take` gives) as a sparse tensor of the gradient's kind."""
        if self.kind == "rows":
            import tensorflow as tf

            return tf.IndexedSlices(values, self.indices)
        from jax.experimental import sparse as jax_sparse

        return jax_sparse.BCOO((values, self.indices), shape=self.shape)


def _runtime(value: Any) -> Any:
    """The learning rate for the rule: a Python number as is, else a 0-d tensor."""
    if isinstance(value, numbers.Real):
        return value
    return _read(value)
