"""Independent checks of the math: closed forms and hand-computed first steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyopt import rules
from tests.registry import CASES


def _step(rule, grads, params, state=None):
    state = rule.init(params) if state is None else state
    updates, state = rule.update(grads, state, params)
    return [p + u for p, u in zip(params, updates)], state


def test_sgd_on_a_quadratic_is_geometric():
    # f = a/2 x^2: x_t = (1 - lr a)^t x_0
    a, lr, x0 = 3.0, 0.1, 2.0
    rule = rules.sgd(learning_rate=lr)
    params, state = [np.array(x0)], None
    for _ in range(25):
        params, state = _step(rule, [a * params[0]], params, state)
    assert float(params[0]) == pytest.approx(x0 * (1 - lr * a) ** 25, rel=1e-12)


def test_heavy_ball_on_a_quadratic_matches_the_linear_recurrence():
    # x_{t+1} = x_t - lr*b_t, b_t = m b_{t-1} + a x_t  <=> companion matrix power
    a, lr, m, x0 = 2.0, 0.05, 0.9, 1.5
    matrix = np.array([[1 - lr * a, -lr * m], [a, m]])  # state (x, b_prev) -> (x', b)
    x, b = x0, 0.0
    expected = np.linalg.matrix_power(matrix, 40) @ np.array([x, b])
    rule = rules.sgd(learning_rate=lr, momentum=m)
    params, state = [np.array(x0)], None
    for _ in range(40):
        params, state = _step(rule, [a * params[0]], params, state)
    assert float(params[0]) == pytest.approx(expected[0], rel=1e-12)
    assert float(state.momentum[0]) == pytest.approx(expected[1], rel=1e-12)


def test_nesterov_first_steps_by_hand():
    lr, m = 0.1, 0.9
    rule = rules.sgd(learning_rate=lr, momentum=m, nesterov=True)
    params, state = _step(rule, [np.array(1.0)], [np.array(0.0)])
    assert float(params[0]) == pytest.approx(-lr * (1 + m * 1))          # b1 = 1
    params, state = _step(rule, [np.array(2.0)], params, state)
    b2 = m * 1 + 2
    assert float(params[0]) == pytest.approx(-lr * 1.9 - lr * (2 + m * b2))


def test_dampening_skips_the_first_step_like_torch():
    rule = rules.sgd(learning_rate=1.0, momentum=0.5, dampening=0.5)
    params, state = _step(rule, [np.array(4.0)], [np.array(0.0)])
    assert float(state.momentum[0]) == 4.0                          # first buffer = g
    params, state = _step(rule, [np.array(4.0)], params, state)
    assert float(state.momentum[0]) == 0.5 * 4 + 0.5 * 4


def test_velocity_and_buffer_forms_agree_at_constant_lr_and_differ_when_lr_changes():
    grads = [np.array([0.3, -1.0]), np.array([0.5, 0.2]), np.array([-0.1, 0.4])]

    def run(form, schedule):
        rule = rules.sgd(learning_rate=schedule, momentum=0.9, momentum_form=form)
        params, state = [np.zeros(2)], None
        for g in grads:
            params, state = _step(rule, [g], params, state)
        return params[0]

    np.testing.assert_allclose(run("buffer", 0.1), run("velocity", 0.1), rtol=1e-14)
    changing = lambda count: 0.1 / (1.0 + count)  # noqa: E731
    assert np.max(np.abs(run("buffer", changing) - run("velocity", changing))) > 1e-3


@pytest.mark.parametrize("make", [rules.adam, rules.adamw, rules.amsgrad, rules.nadam])
def test_adam_first_step_is_minus_lr_sign_g(make):
    g = np.array([3.0, -0.25, 1e-3, -50.0])
    rule = make(learning_rate=0.01, eps=1e-12, **({"weight_decay": 0.0} if make is rules.adamw
                                                  else {}))
    params, _ = _step(rule, [g], [np.zeros(4)])
    if make is rules.nadam:
        # Dozat: (1-mu_1)/(1-mu_1) g/|g| + mu_2/(1-mu_1 mu_2) (1-b1) g/|g|
        mu1 = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
        mu2 = 0.9 * (1 - 0.5 * 0.96 ** 0.008)
        scale = 1 + mu2 * 0.1 / (1 - mu1 * mu2)
        np.testing.assert_allclose(params[0], -0.01 * scale * np.sign(g), rtol=1e-8)
    else:
        np.testing.assert_allclose(params[0], -0.01 * np.sign(g), rtol=1e-8)


@pytest.mark.parametrize("b1", [0.0, 0.3, 0.9])
def test_adam_moments_by_hand_in_each_form(b1):
    """m: m + (1 - b1)(g - m) for b1 > 0.5 (torch's lerp_), b1 m + (1 - b1) g
    otherwise (exact at b1 = 0: m is g itself); v: b2 v + ((1 - b2) g) g
    (torch's addcmul_), each rounding as written (numpy, float32)."""
    rng = np.random.default_rng(0)
    g0, g1 = ((rng.standard_normal(1000) * 10.0 ** rng.integers(-3, 3, 1000)).astype(np.float32)
              for _ in range(2))
    rule = rules.adam(learning_rate=0.01, b1=b1)
    state = rule.init([np.zeros(1000, np.float32)])
    for g in (g0, g1):
        _, state = rule.update([g], state, [np.zeros(1000, np.float32)])
    w, b1_, b2, w2 = (np.float32(x) for x in (1 - b1, b1, 0.999, 1 - 0.999))
    if b1 > 0.5:
        m0 = w * g0  # 0 + w (g0 - 0)
        m1 = m0 + w * (g1 - m0)
    else:
        m0 = w * g0
        m1 = b1_ * m0 + w * g1
    v0 = (w2 * g0) * g0
    v1 = b2 * v0 + (w2 * g1) * g1
    np.testing.assert_array_equal(state.first_moment[0], m1)
    np.testing.assert_array_equal(state.second_moment[0], v1)
    if b1 == 0.0:
        np.testing.assert_array_equal(state.first_moment[0], g1)


def test_adam_hat_placement_first_step_by_hand():
    # Keras: lr_t = lr sqrt(1-b2)/(1-b1); p -= lr_t m/(sqrt(v)+eps), m=(1-b1)g, v=(1-b2)g^2
    g, lr, eps = 0.5, 0.1, 1e-3
    rule = rules.adam(learning_rate=lr, eps=eps, eps_placement="hat")
    params, _ = _step(rule, [np.array(g)], [np.array(0.0)])
    expected = -lr * math.sqrt(0.001) / 0.1 * (0.1 * g) / (math.sqrt(0.001 * g * g) + eps)
    assert float(params[0]) == pytest.approx(expected, rel=1e-13)


def test_adadelta_first_step_by_hand():
    g, rho, eps, lr = 2.0, 0.95, 1e-6, 1.0
    params, state = _step(rules.adadelta(), [np.array(g)], [np.array(0.0)])
    delta = math.sqrt(eps) / math.sqrt((1 - rho) * g * g + eps) * g
    assert float(params[0]) == pytest.approx(-lr * delta, rel=1e-13)
    assert float(state.mean_square_delta[0]) == pytest.approx((1 - rho) * delta ** 2, rel=1e-13)


def test_adagrad_steps_by_hand():
    rule = rules.adagrad(learning_rate=0.5, initial_accumulator_value=0.1, eps=0.0,
                         eps_placement="inside")
    params, state = _step(rule, [np.array(3.0)], [np.array(0.0)])
    assert float(params[0]) == pytest.approx(-0.5 * 3 / math.sqrt(9.1), rel=1e-14)
    params, state = _step(rule, [np.array(1.0)], params, state)
    assert float(params[0]) == pytest.approx(-0.5 * 3 / math.sqrt(9.1) - 0.5 / math.sqrt(10.1),
                                             rel=1e-14)


def test_rmsprop_centered_first_step_by_hand():
    g, lr, rho, eps = 2.0, 0.01, 0.9, 1e-8
    rule = rules.rmsprop(learning_rate=lr, centered=True)
    params, _ = _step(rule, [np.array(g)], [np.array(0.0)])
    var = (1 - rho) * g * g - ((1 - rho) * g) ** 2
    assert float(params[0]) == pytest.approx(-lr * g / math.sqrt(var + eps), rel=1e-12)


def test_adamax_second_step_by_hand():
    rule = rules.adamax(learning_rate=0.1, eps=0.0)
    params, state = _step(rule, [np.array(4.0)], [np.array(0.0)])
    params, state = _step(rule, [np.array(-1.0)], params, state)
    m = 0.9 * 0.4 + 0.1 * -1.0
    u = max(0.999 * 4.0, 1.0)
    assert float(params[0]) == pytest.approx(-0.1 - 0.1 / (1 - 0.81) * m / u, rel=1e-13)


def test_radam_uses_momentum_until_rho_exceeds_the_threshold_then_rectifies():
    b2, lr = 0.999, 0.1
    rho_inf = 2 / (1 - b2) - 1
    rule = rules.radam(learning_rate=lr, eps=0.0)
    params, state = [np.array(0.0)], None
    g = 1.0
    for t in range(1, 8):
        before = float(params[0])
        params, state = _step(rule, [np.array(g)], params, state)
        step = float(params[0]) - before
        rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        if rho >= 5:
            rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf
                             / ((rho_inf - 4) * (rho_inf - 2) * rho))
            # constant g: m_hat = g, v_hat = g^2 -> step = -lr * rect
            assert step == pytest.approx(-lr * rect, rel=1e-10), t
            assert t >= 6
        else:
            assert step == pytest.approx(-lr, rel=1e-12), t  # m_hat = g = 1


def test_lookahead_syncs_every_k_steps():
    rule = rules.lookahead(rules.sgd(learning_rate=1.0), sync_period=3, slow_step_size=0.25)
    params, state = [np.array(0.0)], None
    trace = []
    for _ in range(6):
        params, state = _step(rule, [np.array(-1.0)], params, state)
        trace.append(float(params[0]))
    # fast walks +1 per step; at step 3: slow = 0 + 0.25*(3-0) = 0.75
    assert trace[:3] == [1.0, 2.0, 0.75]
    assert trace[3:] == [1.75, 2.75, pytest.approx(0.75 + 0.25 * (3.75 - 0.75))]


def test_sam_perturbation_by_hand():
    rule = rules.sam(rules.sgd(), rho=0.05)
    g = [np.array([3.0]), np.array([[4.0]])]
    p = [np.array([1.0]), np.array([[1.0]])]
    out = rule.perturb(p, g)
    assert float(out[0][0]) == pytest.approx(1 + 0.05 * 3 / (5 + 1e-12))
    assert float(out[1][0, 0]) == pytest.approx(1 + 0.05 * 4 / (5 + 1e-12))


NO_DECAY = [c for c in CASES if not c.options.get("weight_decay") and c.rule != "adamw"]


@pytest.mark.parametrize("case", NO_DECAY, ids=str)
def test_zero_gradient_without_decay_leaves_params_unchanged(case):
    rule = case.build()
    params = [np.linspace(-1, 1, 6).reshape(2, 3), np.array([0.5, -0.5])]
    state = rule.init(params)
    for _ in range(8):
        updates, state = rule.update([np.zeros((2, 3)), np.zeros(2)], state, params)
        for u in updates:
            np.testing.assert_array_equal(u, 0.0)


def test_momentum_switched_on_after_init_starts_like_torch():
    """A rule made without momentum keeps no buffer; rebuilt with momentum (as a
    scheduler does), the buffer starts at the gradient, as torch's lazily made
    momentum_buffer; rebuilt without it again, the buffer is kept, unused."""
    params = [np.array(0.0)]
    state = rules.sgd(learning_rate=1.0).init(params)
    assert state.momentum == []
    rule = rules.sgd(learning_rate=1.0, momentum=0.5, dampening=0.5)
    params, state = _step(rule, [np.array(2.0)], params, state)
    assert float(state.momentum[0]) == 2.0 and float(params[0]) == -2.0
    params, state = _step(rules.sgd(learning_rate=1.0), [np.array(1.0)], params, state)
    assert float(state.momentum[0]) == 2.0 and float(params[0]) == -3.0
    params, state = _step(rule, [np.array(2.0)], params, state)
    assert float(state.momentum[0]) == 0.5 * 2.0 + 0.5 * 2.0


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_ascent_is_perturb_in_updates_form(adaptive):
    rule = rules.sam(rules.sgd(), rho=0.1, adaptive=adaptive)
    params = [np.array([1.0, -2.0]), np.array([[0.5]])]
    grads = [np.array([3.0, 4.0]), np.array([[-1.0]])]
    ascent = rule.ascent(grads, params)
    perturbed = rule.perturb(params, grads)
    for p, e, q in zip(params, ascent, perturbed):
        np.testing.assert_array_equal(p + e, q)
    # the ascent lies on the rho-sphere in the metric T^-1 (T = |p| for ASAM, else 1)
    metric = [1 / np.abs(p) if adaptive else 1.0 for p in params]
    length = np.sqrt(sum(np.sum((t * e) ** 2) for t, e in zip(metric, ascent)))
    assert length == pytest.approx(0.1, rel=1e-10)
    with pytest.raises(ValueError, match=r"sam.ascent: got 1 grads for 2 params"):
        rule.ascent(grads[:1], params)
