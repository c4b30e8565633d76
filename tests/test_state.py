"""The core's one state walker (polyopt.rules._state) and the declared capabilities."""

from __future__ import annotations

import numpy as np
import pytest

from polyopt import rules
from polyopt.rules import _state
from polyopt.rules._state import COLS, NONE, PARAM, ROWS, SCALAR, Layout, Slot


def _params():
    return [np.ones((4, 3)), np.ones(5), np.ones((2, 3, 3, 8))]


def test_slot_shapes_follow_the_layout():
    torch_conv = _state.out_first((8, 2, 3, 3))  # (out, in, kh, kw)
    keras_conv = _state.out_last((3, 3, 2, 8))  # (kh, kw, in, out)
    assert torch_conv == Layout((1, 2, 3), (0,)) and keras_conv == Layout((0, 1, 2), (3,))
    assert _state.slot_shape(Slot("r", ROWS), (8, 2, 3, 3), torch_conv) == (8,)
    assert _state.slot_shape(Slot("r", ROWS), (3, 3, 2, 8), keras_conv) == (8,)
    assert _state.slot_shape(Slot("c", COLS), (8, 2, 3, 3), torch_conv) == (2, 3, 3)
    assert _state.slot_shape(Slot("s", SCALAR), (8, 2), None) == ()
    assert _state.slot_shape(Slot("n", NONE), (8, 2), None) is None
    assert _state.slot_shape(Slot("p", PARAM), (8, 2), None) == (8, 2)


def test_a_probe_tells_which_axes_a_state_array_keeps():
    """The adapters place a reduced state array (Adafactor's row and column
    statistics) along the axes it keeps: read off the same rule's init for a
    param whose axes differ in size (probe_shape), each as small as that allows."""
    assert _state.probe_shape((16, 16)) == (16, 17)
    assert _state.probe_shape((3, 3, 2, 4)) == (3, 4, 2, 5)  # order kept, ties by position
    assert _state.probe_shape((7, 1, 9)) == (7, 1, 9)
    rule = rules.adafactor(factoring="layout", min_dim_size_to_factor=2)
    for shape in [(16, 16), (4, 4, 4), (3, 3, 2, 4)]:
        layouts = [_state.out_last(shape)]
        real = rules.init_of(rule, [np.zeros(shape)], layouts)
        probe = rules.init_of(rule, [np.zeros(_state.probe_shape(shape))], layouts)
        kept = [_state.kept_axes(a.value[0].shape, shape, b.value[0].shape)
                for a, b in zip(_state.entries(real), _state.entries(probe))
                if a.kind == "slot" and a.value]
        # Keras's layout (output last): the rows keep the output axis, the columns the others
        assert (len(shape) - 1,) in kept and tuple(range(len(shape) - 1)) in kept, kept
    assert _state.kept_axes((0,), (16, 16), (0,)) is None  # an empty placeholder
    assert _state.kept_axes((), (16, 16), ()) == ()
    assert _state.kept_axes((16,), (16, 16), (16,)) == (0,)
    assert _state.kept_axes((16,), (16, 16), (17,)) == (1,)


def test_build_makes_each_slot_from_its_description():
    params = _params()
    layouts = _state.layouts_for("t", params, None)
    rows, cols, none, copy = _state.build(
        "t", (Slot("rows", ROWS), Slot("cols", COLS, init=0.5), Slot("off", NONE),
              Slot("slow", dtype="param", init="param")), params, layouts)
    assert [r.shape for r in rows] == [(4,), (), (2,)]  # a vector is one row
    assert [c.shape for c in cols] == [(3,), (5,), (3, 3, 8)] and float(cols[0][0]) == 0.5
    assert none == [] and all(np.array_equal(a, p) for a, p in zip(copy, params))


def test_state_dtype_is_the_storage_dtype_and_the_math_stays_in_the_params_dtype():
    params = [np.ones((3, 2), np.float64)]
    rule = rules.adam(learning_rate=0.1, state_dtype="float32")
    state = rule.init(params)
    assert state.first_moment[0].dtype == np.float32
    updates, state = rule.update([np.full((3, 2), 0.3)], state, params)
    assert updates[0].dtype == np.float64 and state.second_moment[0].dtype == np.float32
    assert _state.nbytes(state) == 4 + 2 * 6 * 4  # the count, m and v in float32
    with pytest.raises(TypeError, match=r"state_dtype='bfloat16': .* no bfloat16"):
        rules.adam(state_dtype="bfloat16").init(params)
    with pytest.raises(ValueError, match=r"adam: state_dtype must be one of .* got "
                                         r"state_dtype='int8'"):
        rules.adam(state_dtype="int8")


def test_a_foreign_state_is_refused_with_the_path_of_the_leaf():
    params = _params()
    template = rules.lookahead(rules.adam()).init(params)
    other = rules.lookahead(rules.sgd(momentum=0.9)).init(params)
    with pytest.raises(_state.StateError, match=r"owner: state.inner is a SGDState, "
                                                r"expected a AdamState"):
        _state.check("owner", other, template)
    shorter = rules.lookahead(rules.adam()).init(params[:2] + [np.ones((2, 3, 3, 7))])
    with pytest.raises(_state.StateError, match=r"state.slow\[2\] has shape \(2, 3, 3, 7\) "
                                                r"and dtype float64, expected \(2, 3, 3, 8\)"):
        _state.check("owner", shorter, template)
    amsgrad = rules.adam(amsgrad=True).init(params)
    with pytest.raises(_state.StateError, match=r"state.max_second_moment must be empty"):
        _state.check("owner", amsgrad, rules.adam().init(params))
    _state.check("owner", rules.lookahead(rules.adam()).init(params), template)  # fits


def test_flatten_and_rebuild_round_trip():
    params = _params()
    state = rules.chain(rules.centralize(), rules.ranger()).init(params)
    entries = _state.entries(state, len(params))
    kinds = {_state.path_text(e.path): e.kind for e in entries}
    assert kinds["state.inner[1].slow"] == "slot"
    assert kinds["state.inner[1].inner.inner[1].max_second_moment"] == "empty"
    assert kinds["state.inner[0].count"] == "array"
    again = _state.rebuild(state, [e.value for e in entries])
    _state.check("owner", again, state)
    doubled = _state.map_arrays(lambda a: a + 1, state)
    assert float(doubled.inner[1].slow[0][0, 0]) == 2.0
    with pytest.raises(_state.StateError, match=r"state.slow holds 2 arrays for 3 params"):
        _state.entries(rules.lookahead(rules.sgd()).init(params[:2]), 3)


def test_a_layout_that_does_not_fit_is_refused_naming_the_tensor():
    params = _params()
    with pytest.raises(ValueError, match=r"centralize.init: layout \(\(0,\), \(0,\)\) does not "
                                         r"fit params\[0\] of shape \(4, 3\)"):
        rules.centralize().init(params, layouts=[Layout((0,), (0,)), None, None])
    with pytest.raises(ValueError, match=r"layouts holds 1 entries for 3 params"):
        rules.centralize().init(params, layouts=[None])


def test_checked_layouts_are_kept_and_a_refusal_is_not():
    """The checked layouts of the same shapes and layouts come back from the
    cache (equal, each call its own list); other shapes or layouts are
    checked again, a layout that does not fit is refused at every call, and
    layouts given as lists (unhashable) are checked without the cache."""
    params = _params()
    given = [Layout((1,), (0,)), None, Layout((0, 1, 2), (3,))]
    first = _state.layouts_for("t", params, given)
    again = _state.layouts_for("t", params, list(given))
    assert again == first and again is not first
    assert first[0] == Layout((1,), (0,), ()) and first[1] is None
    other = _state.layouts_for("t", [np.ones((3, 4)), *params[1:]], given)
    assert other[0] == Layout((1,), (0,), ())
    bad = [Layout((0,), (0,)), None, None]
    for _ in range(2):
        with pytest.raises(ValueError, match=r"does not fit params\[0\] of shape \(4, 3\)"):
            _state.layouts_for("t", params, bad)
    as_lists = _state.layouts_for("t", params, [[[1], [0]], None, [[0, 1, 2], [3]]])
    assert as_lists == first
    with pytest.raises(ValueError, match=r"layout \(\(3,\), \(0, 1, 2\)\) does not fit"):
        _state.layouts_for("t", [np.ones((4, 3))], [[[3], [0, 1, 2]]])


def test_capabilities_are_declared_and_combined_by_wrappers():
    assert rules.adam().elementwise and not rules.adam().uses_layout
    assert [s.name for s in rules.adam(amsgrad=True).slots] == [
        "first_moment", "second_moment", "max_second_moment"]
    assert rules.adam().slots[2].shape == NONE
    assert not rules.centralize().elementwise and rules.centralize().uses_layout
    assert not rules.centralize(keep_axis=-1).uses_layout
    assert not rules.ranger().elementwise and rules.ranger().uses_layout
    assert rules.ranger(gradient_centralization=False).elementwise
    assert not rules.clip_by_global_norm(1.0).elementwise
    assert rules.sam(rules.sgd()).needs_closure and not rules.adam().needs_closure
    assert rules.apply_if_finite(rules.ranger()).uses_layout
    assert not hasattr(rules, "elementwise")


def test_centralize_follows_the_layout_so_both_kernel_orders_agree():
    rng = np.random.default_rng(0)
    torch_kernel = rng.normal(size=(8, 2, 3, 3))  # (out, in, kh, kw)
    keras_kernel = np.transpose(torch_kernel, (2, 3, 1, 0))  # (kh, kw, in, out)
    rule = rules.centralize()
    got_torch = rule.update([torch_kernel], rule.init([torch_kernel]), [torch_kernel],
                            layouts=[_state.out_first(torch_kernel.shape)])[0][0]
    got_keras = rule.update([keras_kernel], rule.init([keras_kernel]), [keras_kernel],
                            layouts=[_state.out_last(keras_kernel.shape)])[0][0]
    np.testing.assert_allclose(np.transpose(got_keras, (3, 2, 0, 1)), got_torch, rtol=0,
                               atol=1e-15)
    assert np.abs(got_torch.mean(axis=(1, 2, 3))).max() < 1e-15
