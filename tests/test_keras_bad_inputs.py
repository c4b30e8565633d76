"""The bad-input catalogue's Keras rows (tests/test_bad_inputs.py's table and check).

A separate module because Keras runs in its own processes, once per backend
(test_keras*.py). Same Row format, same check: the documented exception
type, a message naming the argument, and nothing changed (the optimizer's
variables, its config and the model variables are compared before and after).
Arguments are in Keras spelling (``beta_1``, ``epsilon``, ``rho``).
"""

from __future__ import annotations

import io
import math

import keras
import numpy as np
import pytest

import polyopt.keras as pk
from polyopt.interop import StateFileError
from polyopt.keras import interop
from tests.test_bad_inputs import Row, assert_refused_unchanged

ROWS: list[Row] = []


def _rows(setup, *rows) -> None:
    for id_, action, exc, match in rows:
        ROWS.append(Row("keras", id_, setup, action, exc, match))


def _subject(make=lambda: pk.Adam(learning_rate=0.1)):
    variables = [keras.Variable(np.ones((3, 2)), name="w"), keras.Variable(np.zeros(2), name="b")]
    opt = make()
    opt.apply_gradients(zip([keras.ops.ones((3, 2), dtype=v.dtype) if v.ndim == 2
                             else keras.ops.ones(2, dtype=v.dtype) for v in variables],
                            variables))
    return {"opt": opt, "variables": variables}


def _snap(s):
    if s is None:
        return None
    return ([np.array(keras.ops.convert_to_numpy(v)) for v in s["opt"].variables + s["variables"]],
            repr(s["opt"].get_config()))


def _file(make):
    s = _subject(make)
    buffer = io.BytesIO()
    s["opt"].export_state(buffer, s["variables"])
    return io.BytesIO(buffer.getvalue())


def _native(**kwargs):
    variables = [keras.Variable(np.ones((3, 2)), name="w"), keras.Variable(np.zeros(2), name="b")]
    native = keras.optimizers.Adam(**kwargs)
    native.apply_gradients(zip([keras.ops.ones((3, 2), dtype=v.dtype) if v.ndim == 2
                                else keras.ops.ones(2, dtype=v.dtype) for v in variables],
                               variables))
    return native


# construction: bad hyperparameters in Keras spelling
_rows(
    None,
    ("Adam learning_rate<0", lambda _: pk.Adam(learning_rate=-0.1), ValueError, "learning_rate"),
    ("Adam learning_rate=inf", lambda _: pk.Adam(learning_rate=math.inf), ValueError,
     "learning_rate"),
    ("Adam learning_rate str", lambda _: pk.Adam(learning_rate="0.1"), (TypeError, ValueError),
     "learning_rate"),
    ("Adam beta_1=1", lambda _: pk.Adam(beta_1=1.0), ValueError, "beta_1"),
    ("Adam beta_2=nan", lambda _: pk.Adam(beta_2=math.nan), ValueError, "beta_2"),
    ("Adam epsilon<0", lambda _: pk.Adam(epsilon=-1e-8), ValueError, "epsilon"),
    ("Adam amsgrad not bool", lambda _: pk.Adam(amsgrad="yes"), (TypeError, ValueError),
     "amsgrad"),
    ("Adam unknown argument", lambda _: pk.Adam(betas=(0.9, 0.999)), TypeError, "betas"),
    ("Adam unknown base option", lambda _: pk.Adam(clip_norm=1.0), TypeError, "clip_norm"),
    ("AdamW weight_decay<0", lambda _: pk.AdamW(weight_decay=-0.1), ValueError, "weight_decay"),
    ("SGD momentum>1", lambda _: pk.SGD(momentum=1.5), ValueError, "momentum"),
    ("RMSprop rho<0", lambda _: pk.RMSprop(rho=-0.1), ValueError, "rho"),
    ("Lookahead keras inner", lambda _: pk.Lookahead(keras.optimizers.Adam()), TypeError,
     "optimizer"),
    ("Lookahead of Lookahead", lambda _: pk.Lookahead(pk.Lookahead(pk.Adam())), TypeError,
     "optimizer"),
    ("Lookahead inner clipnorm", lambda _: pk.Lookahead(pk.Adam(clipnorm=1.0)), ValueError,
     "clipnorm"),
    ("Lookahead sync_period=0", lambda _: pk.Lookahead(pk.Adam(), sync_period=0), ValueError,
     "sync_period"),
    ("Lookahead slow_step_size>1", lambda _: pk.Lookahead(pk.Adam(), slow_step_size=1.5),
     ValueError, "slow_step_size"),
    ("SkipNonFinite max_consecutive_errors<0",
     lambda _: pk.SkipNonFinite(pk.Adam(), max_consecutive_errors=-1), ValueError,
     "max_consecutive_errors"),
    ("SkipNonFinite keras inner", lambda _: pk.SkipNonFinite(keras.optimizers.SGD()), TypeError,
     "optimizer"),
)

# state files and native state into a running optimizer: refused, nothing changed
_rows(
    _subject,
    ("import another algorithm",
     lambda s: s["opt"].import_state(_file(lambda: pk.RAdam(0.1)), s["variables"]),
     StateFileError, "radam"),
    ("import amsgrad state",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1, amsgrad=True)), s["variables"]),
     StateFileError, "layouts differ"),
    ("import missing variable",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1)), s["variables"][:1]),
     StateFileError, "missing|only in the file"),
    ("import renamed variables",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1)), s["variables"],
                                     names=["w", "bias"]),
     StateFileError, "bias"),
    ("import names of wrong length",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1)), s["variables"], names=["w"]),
     StateFileError, "names"),
    ("import truncated file",
     lambda s: s["opt"].import_state(io.BytesIO(_file(lambda: pk.Adam(0.1)).getvalue()[:300]),
                                     s["variables"]),
     StateFileError, "not a readable"),
    ("import variables_or_model not variables",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1)), 42), TypeError,
     "variables_or_model"),
    ("import foreign variable",
     lambda s: s["opt"].import_state(_file(lambda: pk.Adam(0.1)),
                                     [s["variables"][0], keras.Variable(np.zeros(2), name="b")]),
     StateFileError, "not one the optimizer"),
    ("export names with '/'",
     lambda s: s["opt"].export_state(io.BytesIO(), s["variables"], names=["a/w", "b"]),
     StateFileError, "names"),
    ("native amsgrad into Adam",
     lambda s: interop.import_native_state(s["opt"], _native(amsgrad=True), s["variables"]),
     ValueError, "amsgrad"),
    ("native from other variables",
     lambda s: interop.import_native_state(s["opt"], _native(), s["variables"]),
     ValueError, "not built with these"),
    ("native not an Adam",
     lambda s: interop.import_native_state(s["opt"], keras.optimizers.SGD(), s["variables"]),
     ValueError, "native"),
    ("saved optimizer variables of another optimizer",
     lambda s: s["opt"].load_own_variables({str(i): np.zeros(1) for i in range(3)}),
     ValueError, "holds 3 variables"),
)


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.framework}:{r.id}") for r in ROWS])
def test_bad_input_is_refused_and_changes_nothing(row: Row):
    assert_refused_unchanged(row, _snap)


def test_catalogue_size():
    ids = [r.id for r in ROWS]
    assert len(set(ids)) == len(ids) >= 15


def test_weight_decay_none_and_empty_build_are_keras():
    # Keras: weight_decay=None is "none", except for AdamW (its ValueError and words)
    assert pk.Adam(weight_decay=None).hyperparameters["weight_decay"] == 0.0
    assert keras.optimizers.Adam(weight_decay=None).weight_decay is None
    with pytest.raises(ValueError, match="Argument `weight_decay` must be a float. "
                                         "Received: weight_decay=None"):
        pk.AdamW(weight_decay=None)
    with pytest.raises(ValueError, match="weight_decay"):
        keras.optimizers.AdamW(weight_decay=None)
    optimizer = pk.Nadam()
    optimizer.build([])  # Keras allows it: the base's variables only
    assert optimizer.built


def _complex_subject():
    """A fresh optimizer and a model variable holding complex numbers."""
    return {"opt": pk.Adam(learning_rate=0.1),
            "variables": [keras.Variable(np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
                                         name="z")]}


def _apply_complex(s):
    grad = keras.ops.convert_to_tensor(np.array([1 - 1j, 2j], dtype=np.complex64))
    s["opt"].apply_gradients([(grad, s["variables"][0])])


def test_complex_variables_are_refused_before_anything_is_built():
    """Keras's own Adam squares a complex gradient as it is (g*g, no |g|^2, no real
    view): neither optax's nor torch's convention, which polyopt implements. The
    Keras adapter refuses complex variables, naming the variable, and builds nothing."""
    s = _complex_subject()
    before = _snap(s)
    with pytest.raises(TypeError, match=r"polyopt.keras.Adam: variable .*z has dtype complex64: "
                                        r"complex variables are not supported"):
        _apply_complex(s)
    assert not s["opt"].built
    after = _snap(s)
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    # what Keras itself does: v = g*g, so g / sqrt(g*g) is +-1 (here 1), not g / |g|
    native = keras.optimizers.Adam(learning_rate=0.1)
    z = keras.Variable(np.array([1 + 2j, 3 - 1j], dtype=np.complex64))
    native.apply_gradients([(keras.ops.convert_to_tensor(
        np.array([1 - 1j, 2j], dtype=np.complex64)), z)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(z), [0.9 + 2j, 2.9 - 1j], atol=1e-5)
