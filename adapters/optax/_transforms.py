"""The rules as optax GradientTransformations: factories, lookahead, ranger, sam.

Glue only: every number comes from :mod:`polyopt.rules`. A factory checks
its arguments with the rule's spec (optax spellings), builds the core rule
and returns ``optax.GradientTransformationExtraArgs(init, update)``; init and update
flatten the pytrees to the rule's lists and back (:mod:`._tree`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polyopt import hyper, rules
from polyopt.optax import _tree
from polyopt.rules import _state

_NO_PARAMS = "call update(updates, state, params) with the current params"


# --------------------------------------------------------------------------
# arguments


def _none_is_default(h: hyper.Hyper) -> bool:
    """Whether a factory's signature shows None for ``h`` (its default: optax's spelling
    of "no momentum"; any integer option): optax.inject_hyperparams turns every number
    into an array, so a number default would make the momentum buffer exist (a traced
    0 is not recognisably 0) or an integer that fixes the computation's structure
    traced. None stays static, and the state keeps the structure of a plain call.
    adafactor's beta2_decay shows None too: optax's spelling decay_rate may give it
    instead (inject_hyperparams passes every default, which must not count as given)."""
    return h.name in ("momentum", "beta2_decay") or (h.kind == "int" and not h.optional)


def _signature(spec: hyper.Spec, leading: tuple = (), none_defaults: bool = False
               ) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(list(leading) + [
        inspect.Parameter(h.spelling("optax"), kind,
                          default=None if none_defaults and _none_is_default(h) else h.default)
        for h in spec])


def _static_int(owner: str, h: hyper.Hyper, value: Any) -> Any:
    """An integer hyperparameter given as a 0-d integer array: its Python int.

    optax.inject_hyperparams turns every number into an array; an integer
    that decides the program's structure cannot stay a traced array.
    """
    if not (isinstance(value, (jax.Array, np.ndarray)) and value.shape == ()
            and jnp.issubdtype(value.dtype, jnp.integer)):
        return value
    try:
        return int(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        name = h.spelling("optax")
        raise TypeError(
            f"{owner}: {name} must be a Python int, got a traced array: it fixes the "
            f"structure of the computation. With optax.inject_hyperparams pass "
            f"static_args=({name!r},)") from None


def _validate(owner: str, spec: hyper.Spec, arguments: dict, none_defaults: bool = False
              ) -> dict:
    """The spec's canonical names -> checked values, from optax-spelled arguments
    (with none_defaults, None stands for the default where the signature shows it)."""
    arguments = {h.name: h.default if none_defaults and _none_is_default(h)
                 and arguments[h.spelling("optax")] is None else arguments[h.spelling("optax")]
                 for h in spec}
    values = {name: _static_int(owner, spec[name], value) if spec[name].kind == "int"
              else value for name, value in arguments.items()}
    for name in ("state_dtype", "momentum_dtype"):
        if name in values:
            values[name] = _dtype_name(values[name])
    if _is_array(values.get("momentum_dtype")):
        # optax.inject_hyperparams takes a dtype's scalar type (optax.adafactor's
        # default jnp.float32) for a schedule and passes its value, an array. With no
        # momentum nothing is stored in that dtype: ignored, as optax ignores it.
        spelled = spec["momentum_dtype"].spelling("optax")
        if values.get("momentum") is not None:
            raise TypeError(
                f"{owner}: {spelled} must be {spec['momentum_dtype'].allowed_text()} (or a "
                f"JAX dtype), got {spelled}={values['momentum_dtype']!r}; "
                f"optax.inject_hyperparams turns a dtype such as jnp.float32 into an array: "
                f"pass static_args=({spelled!r},)")
        values["momentum_dtype"] = None
    return spec.validate(values, framework="optax")


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _dtype_name(value: Any) -> Any:
    """A dtype given the JAX way (``jnp.bfloat16``, ``np.dtype('float32')``) as its name;
    anything else (an array too: np.dtype would take its dtype) is left for the spec's
    check to refuse."""
    if value is None or isinstance(value, str) or _is_array(value):
        return value
    try:
        return np.dtype(value).name
    except TypeError:
        return value


def _layouts(owner: str, rule: Any, given: Any, leaves: list, treedef) -> list | None:
    """Each leaf's Layout for a rule that uses layouts (else None): ``given`` is
    None (Flax's: the last axis is the output), one :class:`polyopt.rules.Layout`
    for every leaf of 2 or more axes, a callable ``shape -> Layout``, or a
    pytree like the params with a Layout or None per leaf."""
    if not rule.uses_layout:
        return None
    if isinstance(given, rules.Layout):
        given = [given if leaf.ndim >= 2 else None for leaf in leaves]
    elif given is not None and not callable(given):
        flat, got = jax.tree_util.tree_flatten(
            given, is_leaf=lambda x: x is None or isinstance(x, rules.Layout))
        if got != treedef:
            raise ValueError(f"{owner}: layouts must be a tree like the params: "
                             + _tree.describe_difference(got, treedef, "layouts", "params"))
        given = flat
    names = _tree._paths(treedef, "params")
    return _state.layouts_for(owner, leaves, given, _state.out_last, names=names)


def _bind(owner: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{owner}: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _uses_params(values: dict) -> bool:
    """Whether the rule reads the params' values (weight decay that is not the number 0)."""
    decay = values.get("weight_decay", 0.0)
    return not (isinstance(decay, numbers.Number) and decay == 0)


def _args_doc(spec: hyper.Spec, overrides: dict | None = None,
              none_defaults: bool = False) -> str:
    lines = []
    for h in spec:
        doc = (overrides or {}).get(h.name, h.doc)
        default = (f"None: {h.default!r}" if none_defaults and _none_is_default(h)
                   else repr(h.default))
        lines.append(f"      {h.spelling('optax')}: {doc} (default {default}; "
                     f"{h.allowed_text()}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# one rule -> one transformation


def _transformation(owner: str, rule: Any, uses_params: bool,
                    layouts: Any = None) -> optax.GradientTransformationExtraArgs:
    """init/update of ``rule`` on pytrees; the rule is kept on ``init.polyopt_rule``."""
    if layouts is not None and not rule.uses_layout:
        raise ValueError(f"{owner}: layouts were given, but this rule does not use layouts "
                         f"(it treats every element alone)")

    def init(params):
        leaves, treedef = _tree.flatten(f"{owner}.init", params, "params")
        if not leaves:
            return _tree.layout_without_arrays(rule, params)
        found = _layouts(f"{owner}.init", rule, layouts, leaves, treedef)
        return _tree.to_tree(_tree.init_state(rule, leaves, found), treedef)

    def update(updates, state, params=None, **extra_args):
        # extra_args: optax's GradientTransformationExtraArgs protocol; the rules need none
        where = f"{owner}.update"
        grads, treedef = _tree.flatten(where, updates, "updates")
        if not grads:
            return updates, state
        if params is None:
            if uses_params:
                raise ValueError(f"{where}: params is None, but this rule reads them "
                                 f"(weight decay): {_NO_PARAMS}")
            leaves = grads  # read for shapes and dtypes only
        else:
            leaves, params_treedef = _tree.flatten(where, params, "params")
            _tree.check_like(where, grads, treedef, leaves, params_treedef, "updates", "params")
        found = _layouts(where, rule, layouts, leaves, treedef)
        template = jax.eval_shape(lambda x: rules.init_of(rule, x, found), leaves)
        core_state = _tree.to_core(where, state, template, treedef)
        new_updates, core_state = rules.update_of(rule, grads, core_state, leaves, found)
        return treedef.unflatten(new_updates), _tree.to_tree(core_state, treedef)

    init.polyopt_rule = rule  # type: ignore[attr-defined]
    return optax.GradientTransformationExtraArgs(init, update)


_LAYOUTS = inspect.Parameter("layouts", inspect.Parameter.KEYWORD_ONLY, default=None)


def _make_factory(name: str, spec: hyper.Spec, build, uses_params=_uses_params, doc: str = "",
                  arg_docs: dict | None = None):
    signature = _signature(spec, none_defaults=True)
    signature = signature.replace(parameters=[*signature.parameters.values(), _LAYOUTS])

    def factory(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
        arguments = _bind(name, signature, args, kwargs)
        layouts = arguments.pop("layouts")
        values = _validate(name, spec, arguments, none_defaults=True)
        transformation = _transformation(name, build(values), uses_params(values), layouts)
        transformation.init.polyopt_name = name  # type: ignore[attr-defined]
        transformation.init.polyopt_values = values  # type: ignore[attr-defined]
        return transformation

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = "polyopt.optax"
    factory.__signature__ = signature  # type: ignore[attr-defined]
    factory.spec = spec  # type: ignore[attr-defined]
    core_doc = inspect.getdoc(getattr(rules, name)) or ""
    summary = core_doc.splitlines()[0] if core_doc else name
    factory.__doc__ = (
        f"{summary}\n\n    The optax form of :func:`polyopt.rules.{name}` (same math, same "
        f"defaults): returns an\n    ``optax.GradientTransformationExtraArgs`` on any "
        f"pytree of params."
        f"{doc}\n\n    Args:\n{_args_doc(spec, arg_docs, none_defaults=True)}\n"
        f"      layouts: for rules with per-tensor math (``uses_layout``): None (Flax's "
        f"layouts,\n        the last axis is the output), a polyopt.rules.Layout for every "
        f"leaf of 2 or\n        more axes, a callable shape -> Layout, or a pytree like "
        f"the params.\n"
    )
    return factory


def _rule_factory(name: str):
    return lambda values: getattr(rules, name)(**values)


sgd = _make_factory("sgd", hyper.SGD, _rule_factory("sgd"))
adagrad = _make_factory("adagrad", hyper.ADAGRAD, _rule_factory("adagrad"))
rmsprop = _make_factory("rmsprop", hyper.RMSPROP, _rule_factory("rmsprop"))
adadelta = _make_factory(
    "adadelta", hyper.ADADELTA, _rule_factory("adadelta"),
    doc="\n\n    Unlike ``optax.adadelta``, whose default ``learning_rate=None`` moves the"
        "\n    params uphill, the default learning rate 1.0 descends (the paper's).")
adam = _make_factory("adam", hyper.ADAM, _rule_factory("adam"))
adamw = _make_factory(
    "adamw", hyper.ADAMW, _rule_factory("adamw"),
    doc="\n\n    Default weight_decay=0.01 (torch's; ``optax.adamw`` uses 1e-4).")
amsgrad = _make_factory(
    "amsgrad", hyper.AMSGRAD, _rule_factory("amsgrad"),
    doc="\n\n    ``optax.amsgrad`` takes the maximum of the bias-corrected v:"
        "\n    ``amsgrad_form='corrected'``.")
adamax = _make_factory("adamax", hyper.ADAMAX, _rule_factory("adamax"))
nadam = _make_factory(
    "nadam", hyper.NADAM, _rule_factory("nadam"),
    doc="\n\n    ``optax.nadam`` is ``momentum_schedule=False``.")
radam = _make_factory(
    "radam", hyper.RADAM, _rule_factory("radam"),
    doc="\n\n    ``optax.radam`` is ``eps_placement='outside'``. total_steps is a structural"
        "\n    integer: with optax.inject_hyperparams pass static_args=('total_steps',).")
lion = _make_factory(
    "lion", hyper.LION, _rule_factory("lion"),
    doc="\n\n    ``optax.lion`` is ``weight_decay=1e-3`` (polyopt's default is 0).")
_DECAY_RATE = hyper.Hyper("decay_rate", None, allowed=hyper.NONNEG, optional=True)


def _with_decay_rate(plain):
    """``plain`` (the adafactor factory) that also takes optax's spelling of the
    second-moment decay, ``decay_rate=d`` (1 - t^-d): ``beta2_decay=-d``. A number
    or a 0-d array (optax.inject_hyperparams passes one), not both spellings."""
    parameter = inspect.Parameter("decay_rate", inspect.Parameter.KEYWORD_ONLY, default=None)
    signature = plain.__signature__.replace(
        parameters=[*plain.__signature__.parameters.values(), parameter])

    def factory(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"adafactor: {e}") from None
        decay_rate = _DECAY_RATE.check(given.pop("decay_rate", None), "adafactor", "optax")
        if decay_rate is not None:
            if given.get("beta2_decay") is not None:
                raise TypeError(
                    f"adafactor: give beta2_decay or optax's decay_rate, not both; got "
                    f"beta2_decay={given['beta2_decay']!r} and decay_rate={decay_rate!r}")
            given["beta2_decay"] = -decay_rate
        return plain(**given)

    for attribute in ("__name__", "__qualname__", "__module__", "spec"):
        setattr(factory, attribute, getattr(plain, attribute))
    factory.__signature__ = signature  # type: ignore[attr-defined]
    factory.__doc__ = plain.__doc__.rstrip("\n") + (
        "\n      decay_rate: optax's spelling: decay_rate=d is beta2_decay=-d (default None: "
        "\n        beta2_decay decides; a number >= 0 or None).\n")
    return factory


adafactor = _with_decay_rate(_make_factory(
    "adafactor", hyper.ADAFACTOR, _rule_factory("adafactor"),
    uses_params=lambda values: values["multiply_by_parameter_scale"] or _uses_params(values),
    doc="\n\n    ``optax.adafactor(learning_rate)`` is ``relative_step=False,"
        "\n    factoring='largest_two', min_dim_size_to_factor=128,"
        "\n    weight_decay_mode='decoupled_unscaled'`` (``polyopt.native.PRESETS``); its"
        "\n    ``decay_rate=0.8`` (accepted too) is ``beta2_decay=-0.8``, ``factored=False``"
        "\n    is ``factoring='none'``, and its ``learning_rate=None`` is 1.0. polyopt's"
        "\n    default factoring reads the layouts (Flax's: the last axis is the output)."))


def _mask_flags(owner: str, name: str, mask: Any, params: Any, n_leaves: int) -> list[bool]:
    """One Python bool per leaf from an optax mask: a bool, a pytree of bools like
    (or a prefix of) the params, or a callable params -> such a tree."""
    if callable(mask):
        mask = mask(params)

    def spread(flag, subtree):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{owner}: {name} must hold Python bools (True: apply), got "
                            f"{flag!r:.80}: the mask decides the computation's structure")
        return jax.tree.map(lambda _: bool(flag), subtree)

    try:
        flags = jax.tree.leaves(jax.tree.map(spread, mask, params))
    except ValueError as e:
        raise ValueError(f"{owner}: {name} must be a bool or a tree like (or a prefix of) "
                         f"the params: {e}") from None
    if len(flags) != n_leaves:
        raise ValueError(f"{owner}: {name} gives {len(flags)} flags for {n_leaves} params")
    return flags


def _grouped_update(name: str, rule: Any, values: dict, given: dict, masks: dict,
                    updates: Any, state: Any, params: Any, layouts: Any = None):
    """optax's mask arguments: the leaves are grouped by their flags (``given[arg]``,
    a mask per argument of ``masks``); each group is stepped by the rule built with
    the overrides of the masks that mark it False, on its part of the state."""
    where = f"{name}.update"
    if params is None:
        raise ValueError(f"{where}: params is None, but the masks are given params: "
                         f"{_NO_PARAMS}")
    grads, treedef = _tree.flatten(where, updates, "updates")
    if not grads:
        return updates, state
    leaves, params_treedef = _tree.flatten(where, params, "params")
    _tree.check_like(where, grads, treedef, leaves, params_treedef, "updates", "params")
    flags = [_mask_flags(where, arg, mask, params, len(leaves)) for arg, mask in given.items()]
    found = _layouts(where, rule, layouts, leaves, treedef)
    groups: dict = {}
    for i, key in enumerate(zip(*flags)):
        groups.setdefault(key, []).append(i)
    template = jax.eval_shape(lambda x: rules.init_of(rule, x, found), leaves)
    core = _tree.to_core(where, state, template, treedef)
    out = [None] * len(grads)
    parts = []
    for key, indices in groups.items():
        overrides = {}
        for on, (_, off) in zip(key, masks.values()):
            if not on:
                overrides.update(off)
        group_rule = getattr(rules, name)(**{**values, **overrides})
        new_updates, new = rules.update_of(
            group_rule, [grads[i] for i in indices], _state.subset(core, indices),
            [leaves[i] for i in indices], None if found is None else [found[i] for i in indices])
        for i, u in zip(indices, new_updates):
            out[i] = u
        parts.append((indices, new))
    return treedef.unflatten(out), _tree.to_tree(_state.merge(parts, len(grads)), treedef)


def _masked_factory(name: str, spec: hyper.Spec, masks: dict, doc: str = ""):
    """A factory like :func:`_make_factory`'s with optax's mask arguments:
    ``masks[argument] = (default, overrides)``; the leaves a mask marks False are
    updated by the rule built with ``overrides`` (the same state: these options
    change no slot), the others by the rule itself."""
    plain = _make_factory(name, spec, _rule_factory(name), doc=doc)
    extra = [inspect.Parameter(arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
             for arg, (default, _) in masks.items()]
    parameters = list(plain.__signature__.parameters.values())
    signature = plain.__signature__.replace(parameters=parameters[:-1] + extra
                                            + parameters[-1:])

    def factory(*args, **kwargs) -> optax.GradientTransformation:
        arguments = _bind(name, signature, args, kwargs)
        given = {arg: arguments.pop(arg) for arg in masks}
        for arg, mask in given.items():
            if not (callable(mask) or isinstance(mask, (bool, np.bool_))
                    or jax.tree.leaves(mask)):
                raise TypeError(f"{name}: {arg} must be a bool, a tree of bools or a callable "
                                f"params -> tree, got {arg}={mask!r:.80}")
        inner = plain(**arguments)
        if all(mask is True for mask in given.values()):
            return inner
        values = inner.init.polyopt_values
        rule = inner.init.polyopt_rule

        def update(updates, state, params=None):
            return _grouped_update(name, rule, values, given, masks, updates, state, params)

        def init(params):  # no ``polyopt_rule``: wrappers treat it as any transformation
            return inner.init(params)

        return optax.GradientTransformation(init, update)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = "polyopt.optax"
    factory.__signature__ = signature  # type: ignore[attr-defined]
    factory.spec = spec  # type: ignore[attr-defined]
    mask_docs = "".join(f"\n      {arg}: optax's mask: a bool, a pytree of bools like (or a "
                        f"prefix of) the params,\n        or a callable params -> such a tree; "
                        f"leaves marked False are stepped with {off}."
                        for arg, (_, off) in masks.items())
    factory.__doc__ = plain.__doc__.rstrip("\n") + mask_docs + "\n"
    return factory


_muon = _make_factory(
    "muon", hyper.MUON, _rule_factory("muon"),
    doc="\n\n    ``optax.contrib.muon``'s numbers: ``polyopt.native.PRESETS['optax.contrib.muon']``"
        "\n    (its 2-D leaves by Muon, seen with Flax's layout (in, out), the others by its"
        "\n    Adam); optax's ``preconditioning`` and ``ns_coeffs`` (``ns_table``, with its"
        "\n    names 'standard' and 'dion') are the rule's own options.")


def _dimension_layouts(owner: str, dimension_numbers: Any, tree: Any) -> Any:
    """optax's ``muon_weight_dimension_numbers`` (a tree like, or a prefix of, ``tree``
    of MuonDimensionNumbers or None, or a callable tree -> such a tree) as a tree of
    layouts: ``Layout(reduction_axes, output_axes, batch_axes)``, the axes it leaves
    unnamed the batch axes (optax vmaps over them), ``NOT_A_MATRIX`` for None."""
    from optax.contrib import MuonDimensionNumbers

    given = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    flat: list = []

    def spread(numbers, subtree):
        if not (numbers is None or isinstance(numbers, MuonDimensionNumbers)):
            raise TypeError(f"{owner}: muon_weight_dimension_numbers must hold "
                            f"optax.contrib.MuonDimensionNumbers or None, got {numbers!r:.80}")
        flat.extend([numbers] * len(jax.tree_util.tree_leaves(subtree)))

    try:
        jax.tree.map(spread, given, tree,
                     is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
    except ValueError as e:
        raise ValueError(f"{owner}: muon_weight_dimension_numbers must be a tree like (or a "
                         f"prefix of) the params: {e}") from None
    names = _tree._paths(treedef, "params")
    out = []
    for dims, leaf, name in zip(flat, leaves, names):
        if dims is None:
            out.append(rules.NOT_A_MATRIX)
            continue
        shape = tuple(leaf.shape)
        axes = [(a,) if isinstance(a, int) else tuple(a)
                for a in (dims.reduction_axis, dims.output_axis)]
        if len(shape) < 2:
            raise ValueError(f"{owner}: muon_weight_dimension_numbers gives {name} of shape "
                             f"{shape} {dims}, but Muon steps tensors of 2 or more axes; "
                             f"give it None (the Adam part)")
        listed = [int(a) for group in axes for a in group]
        named = {a % len(shape) for a in listed if -len(shape) <= a < len(shape)}
        # the unnamed axes are batch axes; axes out of range or repeated are refused
        # (layouts_for) as given
        batch = tuple(a for a in range(len(shape)) if a not in named) if len(named) == len(
            listed) else ()
        out.append(rules.Layout(*axes, batch))
    return treedef.unflatten(out)


def muon(*args: Any, muon_weight_dimension_numbers: Any = None, weight_decay_mask: Any = None,
         **kwargs: Any) -> optax.GradientTransformation:
    dimension_numbers, mask = muon_weight_dimension_numbers, weight_decay_mask
    if dimension_numbers is not None:
        if kwargs.get("layouts") is not None:
            raise TypeError("muon: give layouts or muon_weight_dimension_numbers, not both")
        chosen = kwargs.get("muon_params", "2d")
        if chosen not in ("2d", "matrices"):
            raise ValueError(f"muon: muon_weight_dimension_numbers decides which leaves take "
                             f"the Muon step (muon_params='matrices'); got muon_params="
                             f"{chosen!r} too")
        kwargs["muon_params"] = "matrices"
    if not (mask is None or mask is True or callable(mask) or isinstance(mask, (bool, np.bool_))
            or jax.tree.leaves(mask)):
        raise TypeError(f"muon: weight_decay_mask must be a bool, a tree of bools or a callable "
                        f"params -> tree, got weight_decay_mask={mask!r:.80}")
    plain = _muon(*args, **kwargs)
    masked = not (mask is None or mask is True)
    if dimension_numbers is None and not masked:
        return plain
    values, rule = plain.init.polyopt_values, plain.init.polyopt_rule
    uses_params = _uses_params(values)

    def layouts_for(where, tree):
        if dimension_numbers is None:
            return kwargs.get("layouts")
        return _dimension_layouts(where, dimension_numbers, tree)

    def init(params):
        return _transformation("muon", rule, uses_params,
                               layouts_for("muon.init", params)).init(params)

    def update(updates, state, params=None, **extra_args):
        layouts = layouts_for("muon.update", updates if params is None else params)
        if masked:
            return _grouped_update("muon", rule, values, {"weight_decay_mask": mask},
                                   {"weight_decay_mask": (True, {"weight_decay": 0.0})},
                                   updates, state, params, layouts)
        return _transformation("muon", rule, uses_params, layouts).update(updates, state, params)

    return optax.GradientTransformation(init, update)


muon.__signature__ = _muon.__signature__.replace(parameters=[  # type: ignore[attr-defined]
    *_muon.__signature__.parameters.values(),
    inspect.Parameter("muon_weight_dimension_numbers", inspect.Parameter.KEYWORD_ONLY,
                      default=None),
    inspect.Parameter("weight_decay_mask", inspect.Parameter.KEYWORD_ONLY, default=None)])
muon.spec = hyper.MUON  # type: ignore[attr-defined]
muon.__module__ = "polyopt.optax"
muon.__doc__ = _muon.__doc__.rstrip("\n") + (
    "\n      muon_weight_dimension_numbers: optax.contrib.muon's: a tree like (or a prefix "
    "of)\n        the params of optax.contrib.MuonDimensionNumbers(reduction_axis, "
    "output_axis)\n        (a leaf's layout; the axes it leaves unnamed are batch axes, one "
    "matrix per index)\n        or None (the Adam part), or a callable params -> such a "
    "tree; given, it\n        decides which leaves take the Muon step "
    "(muon_params='matrices').\n"
    "      weight_decay_mask: optax's mask of the Muon part's weight_decay (a bool, a "
    "tree\n        of bools like the params, or a callable params -> such a tree; None: "
    "all).\n")


lamb = _masked_factory(
    "lamb", hyper.LAMB, {"mask": (True, {"weight_decay": 0.0})},
    doc="\n\n    ``optax.lamb`` is the defaults (its ``mask`` covers the weight decay only); "
        "\n    ``keras.optimizers.Lamb`` is ``eps=1e-7, weight_decay_mode='decoupled'``.")
lars = _masked_factory(
    "lars", hyper.LARS, {"weight_decay_mask": (True, {"weight_decay": 0.0}),
                         "trust_ratio_mask": (True, {"trust_ratio": False})},
    doc="\n\n    ``optax.lars`` is ``trust_norm='combined'`` (polyopt's default is the paper's "
        "\n    ``'separate'``: ||g|| + weight_decay * ||p||).")

schedule_free_adamw = _make_factory(
    "schedule_free_adamw", hyper.SCHEDULE_FREE_ADAMW, _rule_factory("schedule_free_adamw"),
    uses_params=lambda values: True,
    doc="\n\n    The params are the interpolation y; evaluate at"
        "\n    ``polyopt.optax.schedule_free_eval_params(state, params)`` (the state's z and b1"
        "\n    give x; ``optax.contrib.schedule_free_eval_params`` accepts this state too)."
        "\n    ``optax.contrib.schedule_free_adamw`` is ``warmup_lag=True``.")
adopt = _make_factory(
    "adopt", hyper.ADOPT, _rule_factory("adopt"),
    doc="\n\n    ``optax.contrib.adopt(clip_value_fn=lambda t: t ** p)`` is ``clip_exponent=p``"
        "\n    (the default p = 0.25 is optax's); optax has no weight decay in adopt.")


def schedule_free_eval_params(state: Any, params: Any) -> Any:
    """The point to evaluate a Schedule-Free run at, x = (y - (1 - b1) z) / b1, as
    ``optax.contrib.schedule_free_eval_params(state, params)``: ``state`` is
    ``polyopt.optax.schedule_free_adamw``'s, or any state holding it (an
    ``optax.chain``'s tuple, ``inject_hyperparams``' ``inner_state``, ...), or
    ``optax.contrib.schedule_free``'s own; ``params`` the params y."""
    found = _find_schedule_free(state)
    if found is None:
        raise ValueError(
            "schedule_free_eval_params: no Schedule-Free state (with z and b1) in "
            f"{type(state).__name__}; pass the state of polyopt.optax.schedule_free_adamw "
            "or of optax.contrib.schedule_free")
    z_leaves, z_def = jax.tree_util.tree_flatten(found.z)
    y_leaves, y_def = jax.tree_util.tree_flatten(params)
    if z_def != y_def:
        raise ValueError("schedule_free_eval_params: params do not match the state's z: "
                         + _tree.describe_difference(y_def, z_def, "params", "state.z"))
    b1 = found.b1
    return y_def.unflatten([
        ((y - (1 - b1) * z) / b1).astype(y.dtype) for y, z in zip(y_leaves, z_leaves)])


def _find_schedule_free(state: Any) -> Any:
    """The first state with fields ``z`` and ``b1`` in ``state``, depth first."""
    if hasattr(state, "z") and hasattr(state, "b1") and not isinstance(state, type):
        return state
    children = state.values() if isinstance(state, dict) else state
    if isinstance(children, (tuple, list)) or isinstance(state, dict):
        for child in children:
            found = _find_schedule_free(child)
            if found is not None:
                return found
    return None


ranger = _make_factory(
    # XLA compiles the step: RAdam's direction computed once for Lookahead's two loops
    "ranger", hyper.RANGER, lambda values: rules.ranger(**values, read_twice=True),
    uses_params=lambda values: True,
    doc="\n\n    Works on plain params, as ``polyopt.rules.ranger``: the params are the fast"
        "\n    weights, the slow ones are ``state.slow``. Gradient centralization keeps the"
        "\n    last axis (JAX/flax layouts: Dense kernels (in, out), Conv (kh, kw, in, out)),"
        "\n    which is torch's axis 0 of (out, in): the same numbers for the same model."
        "\n    sync_period and total_steps are structural integers: with"
        "\n    optax.inject_hyperparams pass them in static_args.",
    arg_docs={"gradient_centralization": "subtract the mean of each gradient with ndim > 1 "
                                         "over all axes but the last"})


# --------------------------------------------------------------------------
# lookahead, in optax's form


def _rule_of(owner: str, inner: Any):
    rule = getattr(getattr(inner, "init", None), "polyopt_rule", None)
    if rule is None:
        raise TypeError(
            f"{owner}: inner must be a transformation made by polyopt.optax (sgd, adam, ...), "
            f"got {inner!r:.200}; wrap optax's own transformations with optax's {owner}")
    return rule


_LOOKAHEAD_SIGNATURE = _signature(hyper.LOOKAHEAD, (
    inspect.Parameter("inner", inspect.Parameter.POSITIONAL_OR_KEYWORD),))


def _foreign(inner: Any, treedef) -> rules.Rule:
    """Any optax transformation as a rule on the leaves of ``treedef``; its state stays
    the transformation's own pytree."""
    def init(leaves):
        return inner.init(treedef.unflatten(leaves))

    def update(grads, state, leaves):
        updates, state = inner.update(treedef.unflatten(grads), state, treedef.unflatten(leaves))
        return treedef.flatten_up_to(updates), state

    return rules.Rule(init, update, elementwise=False)


def lookahead(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    arguments = _bind("lookahead", _LOOKAHEAD_SIGNATURE, args, kwargs)
    values = _validate("lookahead", hyper.LOOKAHEAD, arguments)
    inner = arguments["inner"]
    inner_rule = getattr(getattr(inner, "init", None), "polyopt_rule", None)
    if inner_rule is None and not (callable(getattr(inner, "init", None))
                                   and callable(getattr(inner, "update", None))):
        raise TypeError(f"lookahead: inner must be an optax GradientTransformation, "
                        f"got {inner!r:.200}")
    owner = "lookahead"

    def rule_for(treedef):
        """The core lookahead around the inner rule (around ``inner`` itself if foreign:
        its state is then kept as is, and a state reset is done here)."""
        if inner_rule is not None:
            return rules.lookahead(inner_rule, **values)
        return rules.lookahead(_foreign(inner, treedef), **{**values, "reset_state": False})

    def init(params):
        fast = params.fast if isinstance(params, optax.LookaheadParams) else params
        leaves, treedef = _tree.flatten(f"{owner}.init", fast, "params.fast")
        rule = rule_for(treedef)
        if not leaves:
            if inner_rule is None:
                return rules.LookaheadState(jnp.zeros((), jnp.int32), [], inner.init(fast))
            return _tree.layout_without_arrays(rule, fast)._replace(slow=[])
        found = _layouts(owner, rule, None, leaves, treedef)
        state = _tree.init_state(rule, leaves, found)
        inner_state = state.inner if inner_rule is None else _tree.to_tree(state.inner, treedef)
        return rules.LookaheadState(state.count, [], inner_state)

    def update(updates, state, params=None, **extra_args):
        where = f"{owner}.update"
        if not isinstance(params, optax.LookaheadParams):
            raise TypeError(
                f"{where}: params must be optax.LookaheadParams(fast, slow) (start with "
                f"optax.LookaheadParams.init_synced(params)), got {type(params).__name__}")
        if not isinstance(state, rules.LookaheadState) or not (
                isinstance(state.slow, list) and not state.slow):
            raise TypeError(f"{where}: state must be made by this transformation's init, "
                            f"got {type(state).__name__}")
        grads, treedef = _tree.flatten(where, updates, "updates")
        fast, fast_treedef = _tree.flatten(where, params.fast, "params.fast")
        slow, slow_treedef = _tree.flatten(where, params.slow, "params.slow")
        _tree.check_like(where, grads, treedef, fast, fast_treedef, "updates", "params.fast")
        _tree.check_like(where, slow, slow_treedef, fast, fast_treedef, "params.slow",
                         "params.fast")
        rule = rule_for(treedef)
        found = _layouts(where, rule, None, fast, treedef)
        if inner_rule is None:
            inner_state = state.inner
        else:
            template = jax.eval_shape(lambda x: rules.init_of(inner_rule, x, found), fast)
            inner_state = _tree.to_core(where, state.inner, template, treedef, "state.inner")
        fast_updates, new = rules.update_of(
            rule, grads, rules.LookaheadState(state.count, slow, inner_state), fast, found)
        slow_updates = [s_new - s for s_new, s in zip(new.slow, slow)]  # optax's updates form
        if inner_rule is None:
            new_inner = new.inner
            if values["reset_state"]:
                synced = new.count % values["sync_period"] == 0
                new_inner = _where(synced, inner.init(params.fast), new_inner)
        else:
            new_inner = _tree.to_tree(new.inner, treedef)
        return (optax.LookaheadParams(fast=treedef.unflatten(fast_updates),
                                      slow=treedef.unflatten(slow_updates)),
                rules.LookaheadState(new.count, [], new_inner))

    return optax.GradientTransformationExtraArgs(init, update)


lookahead.__signature__ = _LOOKAHEAD_SIGNATURE  # type: ignore[attr-defined]
lookahead.__doc__ = f"""Lookahead in optax's form: params are ``optax.LookaheadParams(fast, slow)``.

    :func:`polyopt.rules.lookahead` with the API of ``optax.lookahead``:
    gradients are taken at ``params.fast``; ``update`` returns
    ``LookaheadParams(fast=..., slow=...)`` updates for
    ``optax.apply_updates``. Every ``sync_period`` steps the slow params move
    ``slow_step_size`` of the way to the fast ones and the fast ones restart
    there. The state is ``polyopt.rules.LookaheadState(count, [], inner)``:
    the slow weights live in ``params.slow``, not in the state.

    Args:
      inner: the fast optimizer, any optax GradientTransformation (a polyopt.optax
        one keeps its state in polyopt's form, any other its own).
{_args_doc(hyper.LOOKAHEAD)}

    Example::

      opt = polyopt.optax.lookahead(polyopt.optax.adam(1e-3), sync_period=5)
      params = optax.LookaheadParams.init_synced(params)
      state = opt.init(params)
      grads = jax.grad(loss)(params.fast)
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)   # evaluate with params.slow
    """


# --------------------------------------------------------------------------
# SAM


class SAMState(NamedTuple):
    """State of :func:`sam`.

    steps_since_sync: calls since the last outer update (transparent mode).
    inner_state: the outer optimizer's state.
    cache: the params at the start of the SAM step (transparent mode), else None.
    """

    steps_since_sync: Any
    inner_state: Any
    cache: Any


_SYNC_PERIOD = hyper.Hyper("sync_period", 2, kind="int",
                           allowed=hyper.Interval(2, math.inf),
                           doc="calls per SAM step: sync_period - 1 ascent steps, then the update")
_OPAQUE = hyper.Hyper("opaque_mode", False, kind="bool",
                      doc="one update call per SAM step, with grad_fn(params, i)")


def _where(condition, new, old):
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


_SAM_SIGNATURE = _signature(hyper.SAM, (
    inspect.Parameter("inner", inspect.Parameter.POSITIONAL_OR_KEYWORD),))
_SAM_SIGNATURE = _SAM_SIGNATURE.replace(parameters=[
    *_SAM_SIGNATURE.parameters.values(),
    *(inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default)
      for h in (_SYNC_PERIOD, _OPAQUE))])


def sam(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    arguments = _bind("sam", _SAM_SIGNATURE, args, kwargs)
    values = _validate("sam", hyper.SAM, arguments)
    sync_period = _SYNC_PERIOD.check(arguments["sync_period"], "sam", "optax")
    opaque_mode = _OPAQUE.check(arguments["opaque_mode"], "sam", "optax")
    inner = arguments["inner"]
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"sam: inner must be an optax GradientTransformation, got {inner!r:.200}")
    core = rules.sam(rules.Rule(inner.init, inner.update), **values)
    owner = "sam"

    def leaves_of(where, updates, params):
        grads, treedef = _tree.flatten(where, updates, "updates")
        leaves, params_treedef = _tree.flatten(where, params, "params")
        _tree.check_like(where, grads, treedef, leaves, params_treedef, "updates", "params")
        return grads, leaves, treedef

    def init(params):
        cache = None if opaque_mode else jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return SAMState(jnp.zeros((), jnp.int32), inner.init(params), cache)

    def check_state(where, state):
        if not isinstance(state, SAMState):
            raise TypeError(f"{where}: state must be a SAMState made by this transformation's "
                            f"init, got {type(state).__name__}")

    def full_step(updates, state, params, grad_fn):
        """All of one SAM step: sync_period - 1 ascent steps, then the inner update."""
        where = f"{owner}.update"
        check_state(where, state)
        grads, point, treedef = leaves_of(where, updates, params)
        for i in range(sync_period - 1):
            point = core.perturb(point, grads)
            grads, _ = _tree.flatten(where, grad_fn(treedef.unflatten(point), i), "grad_fn(...)")
        new_updates, inner_state = inner.update(treedef.unflatten(grads), state.inner_state,
                                                params)
        return new_updates, state._replace(inner_state=inner_state)

    def update(updates, state, params=None, *, grad_fn=None, **extra_args):
        where = f"{owner}.update"
        if params is None:
            raise ValueError(f"{where}: params is None, but SAM needs them: {_NO_PARAMS}")
        if opaque_mode:
            if grad_fn is None:
                raise ValueError(f"{where}: opaque_mode=True needs grad_fn(params, i) -> grads "
                                 "(or use polyopt.optax.sam_step)")
            return full_step(updates, state, params, grad_fn)
        check_state(where, state)
        grads, leaves, treedef = leaves_of(where, updates, params)
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == sync_period - 1
        cache = _where(first, params, state.cache)
        ascent = treedef.unflatten(core.ascent(grads, leaves))
        inner_updates, inner_state = inner.update(updates, state.inner_state, cache)
        # the outer step in updates form: from the perturbed params back to cache + u
        outer = jax.tree.map(lambda c, p, u: (c - p) + u, cache, params, inner_updates)
        return _where(last, outer, ascent), SAMState(
            (state.steps_since_sync + 1) % sync_period,
            _where(last, inner_state, state.inner_state), cache)

    update.sam_full_step = full_step  # type: ignore[attr-defined]
    return optax.GradientTransformationExtraArgs(init, update)


sam.__signature__ = _SAM_SIGNATURE  # type: ignore[attr-defined]
sam.__doc__ = f"""Sharpness-aware minimization as ``optax.contrib.sam`` does it.

    :func:`polyopt.rules.sam`'s ascent (one global norm, ``rho * g / (||g||
    + eps)``, ASAM with ``adaptive``) around any optax transformation
    ``inner`` (the outer optimizer). In the default transparent mode each
    SAM step is ``sync_period`` update calls: ``sync_period - 1`` calls
    return the ascent (params move to the perturbed point; the gradient of
    the next call is taken there), the last returns ``cache + u - params``
    with ``u = inner.update(g, state, cache)``, so the params become
    ``cache + u``. With ``eps=0`` this is ``optax.contrib.sam(inner,
    chain(contrib.normalize(), sgd(rho)), sync_period)`` (whose adversarial
    optimizer is stateless, so ``reset_state`` does not matter).
    ``opaque_mode=True`` does the whole step in one call with
    ``update(grads, state, params, grad_fn=grad_fn)``; :func:`sam_step`
    builds that jitted step from a loss function.

    Args:
      inner: the outer optimizer, any optax GradientTransformation.
{_args_doc(hyper.SAM)}
      sync_period: calls per SAM step, an integer >= 2 (default 2; optax
        also allows 1, which applies no ascent).
      opaque_mode: one call per SAM step, with grad_fn (default False).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; state :class:`SAMState`.
    """


def sam_step(loss_fn, optimizer: optax.GradientTransformationExtraArgs, *,
             has_aux: bool = False, donate: bool = True):
    """One jitted SAM training step: both gradient evaluations in one compiled call.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``).
      optimizer: a transformation made by :func:`sam` (either mode).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      donate: donate the params and state buffers to the step (default True:
        the arguments are consumed; use the returned ones).

    Returns:
      ``step(params, state, *batch) -> (params, state, loss)`` (``loss`` is
      ``(loss, aux)`` with has_aux), jitted. ``loss`` is taken at the
      params before the step, as ``jax.value_and_grad`` gives it.

    Example::

      opt = polyopt.optax.sam(polyopt.optax.sgd(0.1, momentum=0.9), rho=0.05)
      step = polyopt.optax.sam_step(loss_fn, opt)
      state = opt.init(params)
      for x, y in batches:
          params, state, loss = step(params, state, x, y)
    """
    full_step = getattr(getattr(optimizer, "update", None), "sam_full_step", None)
    if full_step is None:
        raise TypeError(f"sam_step: optimizer must be made by polyopt.optax.sam, "
                        f"got {optimizer!r:.200}")
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(params, state, *batch):
        value, grads = value_and_grad(params, *batch)
        updates, state = full_step(grads, state, params,
                                   lambda point, i: value_and_grad(point, *batch)[1])
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


# --------------------------------------------------------------------------
# non-finite gradients


def apply_if_finite(inner: Any, max_consecutive_errors: float = math.inf
                    ) -> optax.GradientTransformation:
    """Skip (and count) steps with a NaN or inf gradient: :func:`polyopt.rules.apply_if_finite`.

    optax's own policy, kept by polyopt.optax's transformations by default:
    non-finite gradients propagate into the moments and the params.
    ``apply_if_finite(polyopt.optax.adam(1e-3))`` returns zero updates for
    such a step and leaves the inner state as it was (it never becomes NaN);
    the state (``ApplyIfFiniteState``: ``count``, ``notfinite_count``,
    ``last_finite``, ``total_notfinite``, ``inner``) counts the skips, as
    ``optax.apply_if_finite``'s does. After more than
    ``max_consecutive_errors`` non-finite steps in a row they are applied.

    Args:
      inner: a transformation made by a polyopt.optax factory (adam, sgd, ...).
      max_consecutive_errors: an integer >= 0, or ``math.inf`` (default: never
        apply a non-finite step).
    """
    owner = "apply_if_finite"
    values = _validate(owner, hyper.APPLY_IF_FINITE,
                       {"max_consecutive_errors": max_consecutive_errors})
    inner_rule = _rule_of(owner, inner)
    inner_name = getattr(inner.init, "polyopt_name", "rule")
    inner_values = getattr(inner.init, "polyopt_values", {})
    transformation = _transformation(owner, rules.apply_if_finite(inner_rule, **values),
                                     _uses_params(inner_values))
    transformation.init.polyopt_name = f"apply_if_finite[{inner_name}]"  # type: ignore
    transformation.init.polyopt_values = {**inner_values, **values}  # type: ignore
    return transformation
