"""Wrappers and composable pieces, proved against natives and independent references.

lookahead, ranger, sam, chain, clip_by_global_norm, centralize,
add_decayed_weights and decoupled_weight_decay run side by side with

- the natives: optax.lookahead, optax.contrib.sam, optax.clip_by_global_norm,
  optax.chain (jax, float64, jitted), torch.nn.utils.clip_grad_norm_,
  torch.optim.AdamW, torch.optim.SGD under davda54's SAM loop;
- independent few-line numpy transcriptions written here from the papers and
  the reference code (cited at each one);

never against numbers produced by polyopt itself. Everything runs in float64
(float32 only where the copied native test used it) and is compared with a
normwise relative difference, max |got - want| / max |want| per array.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyopt import rules

SHAPES = [(4, 3), (3,), (2, 3, 2, 2), ()]
STEPS = 40


# --------------------------------------------------------------------------
# helpers


def max_rel(got, want) -> float:
    """Largest normwise relative difference over lists of arrays."""
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want):
        g = np.asarray(g, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        assert np.all(np.isfinite(g)), g
        scale = max(float(np.max(np.abs(w))), 1e-300)
        worst = max(worst, float(np.max(np.abs(g - w))) / scale)
    return worst


def assert_close(label, got, want, rtol=1e-12):
    diff = max_rel(got, want)
    print(f"{label}: max rel diff {diff:.3g}")
    assert diff <= rtol, f"{label}: {diff:.3g} > {rtol:g}"
    return diff


class Problem:
    """A smooth non-quadratic loss whose gradient depends on the params, plus a
    fixed per-step perturbation: g_t(p) = c * (p - target) + 0.3 cos(p) + 0.1 n_t."""

    def __init__(self, seed=0, shapes=SHAPES, steps=STEPS, scale=1.0):
        rng = np.random.default_rng(seed)
        self.params0 = [rng.normal(size=s) for s in shapes]
        self.target = [rng.normal(size=s) for s in shapes]
        self.curv = [rng.uniform(0.5, 2.0, size=s) for s in shapes]
        self.noise = [[rng.normal(size=s) for s in shapes] for _ in range(steps)]
        self.scale = scale

    def grad(self, params, t):
        return [self.scale * (c * (np.asarray(p) - y) + 0.3 * np.cos(np.asarray(p)) + 0.1 * n)
                for p, y, c, n in zip(params, self.target, self.curv, self.noise[t])]

    def start(self):
        return [p.copy() for p in self.params0]


def run_rule(rule, problem, steps=STEPS):
    """Run a polyopt rule; return per-step (params, state)."""
    params = problem.start()
    state = rule.init(params)
    out = []
    for t in range(steps):
        updates, state = rule.update(problem.grad(params, t), state, params)
        params = [p + u for p, u in zip(params, updates)]
        out.append((params, state))
    return out


# independent inner optimizers (torch conventions), written from the papers ----


class RefSGDMomentum:
    """b = m b + g (first b = g), p -= lr b  (torch.optim.SGD, optax.sgd)."""

    def __init__(self, lr, momentum):
        self.lr, self.m = lr, momentum

    def init(self, params):
        return [np.zeros_like(p) for p in params]

    def step(self, params, grads, bufs, t):
        bufs = [self.m * b + g for b, g in zip(bufs, grads)]
        return [p - self.lr * b for p, b in zip(params, bufs)], bufs


class RefAdam:
    """Kingma & Ba, eps after bias correction (torch.optim.Adam, optax.adam)."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps

    def init(self, params):
        return [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]

    def step(self, params, grads, state, t):
        ms, vs = state
        ms = [self.b1 * m + (1 - self.b1) * g for m, g in zip(ms, grads)]
        vs = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(vs, grads)]
        new = [p - self.lr * (m / (1 - self.b1 ** t)) / (np.sqrt(v / (1 - self.b2 ** t)) + self.eps)
               for p, m, v in zip(params, ms, vs)]
        return new, (ms, vs)


def ref_lookahead(inner, problem, k, alpha, steps=STEPS, reset=False):
    """Zhang et al. 2019, Algorithm 1: slow starts at the initial params; every k
    fast steps slow += alpha (fast - slow) and fast = slow (optionally the inner
    state restarts, as optax's reset_state)."""
    fast = problem.start()
    slow = problem.start()
    state, t_inner = inner.init(fast), 0
    out = []
    for t in range(1, steps + 1):
        t_inner += 1
        fast, state = inner.step(fast, problem.grad(fast, t - 1), state, t_inner)
        if t % k == 0:
            slow = [s + alpha * (f - s) for s, f in zip(slow, fast)]
            fast = [s.copy() for s in slow]
            if reset:
                state, t_inner = inner.init(fast), 0
        out.append((fast, slow))
    return out


INNERS = {
    "sgd_momentum": (lambda: rules.sgd(learning_rate=0.05, momentum=0.9),
                     lambda: RefSGDMomentum(0.05, 0.9)),
    "adam": (lambda: rules.adam(learning_rate=0.05), lambda: RefAdam(0.05)),
}


# --------------------------------------------------------------------------
# lookahead


@pytest.mark.parametrize("k, alpha", [(5, 0.5), (3, 0.8), (1, 0.3)])
@pytest.mark.parametrize("inner", sorted(INNERS))
def test_lookahead_matches_the_published_algorithm(inner, k, alpha):
    make_rule, make_ref = INNERS[inner]
    problem = Problem()
    got = run_rule(rules.lookahead(make_rule(), sync_period=k, slow_step_size=alpha), problem)
    want = ref_lookahead(make_ref(), problem, k, alpha)
    for t, ((params, state), (fast, slow)) in enumerate(zip(got, want)):
        assert max_rel(params, fast) <= 1e-12, (t, max_rel(params, fast))
        assert max_rel(state.slow, slow) <= 1e-12, t
    assert_close(f"lookahead[{inner}] k={k} alpha={alpha} vs algorithm",
                 got[-1][0], want[-1][0])
    # not vacuous: lookahead moved the params differently from the plain inner rule
    plain = run_rule(make_rule(), problem)
    assert max_rel(got[-1][0], plain[-1][0]) > 1e-3


def test_lookahead_reset_state_matches_the_algorithm_with_restarts():
    problem = Problem(seed=3)
    got = run_rule(rules.lookahead(rules.adam(learning_rate=0.05), sync_period=4,
                                   slow_step_size=0.5, reset_state=True), problem)
    want = ref_lookahead(RefAdam(0.05), problem, 4, 0.5, reset=True)
    for (params, state), (fast, slow) in zip(got, want):
        assert max_rel(params, fast) <= 1e-12
        assert max_rel(state.slow, slow) <= 1e-12
    assert_close("lookahead[adam] reset_state vs algorithm", got[-1][0], want[-1][0])
    # the restart is real: the inner count restarted, and without reset the path differs
    assert int(got[-1][1].inner.count) == STEPS % 4
    no_reset = ref_lookahead(RefAdam(0.05), problem, 4, 0.5, reset=False)
    assert max_rel(got[-1][0], no_reset[-1][0]) > 1e-3


@pytest.mark.needs("jax")
@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("inner", sorted(INNERS))
def test_lookahead_matches_optax(inner, reset):
    import jax
    import optax

    problem = Problem(seed=1)
    k, alpha = 4, 0.6
    native_inner = {"sgd_momentum": optax.sgd(0.05, momentum=0.9),
                    "adam": optax.adam(0.05)}[inner]
    got = run_rule(rules.lookahead(INNERS[inner][0](), sync_period=k, slow_step_size=alpha,
                                   reset_state=reset), problem)
    with jax.enable_x64(True):
        import jax.numpy as jnp

        opt = optax.lookahead(native_inner, sync_period=k, slow_step_size=alpha,
                              reset_state=reset)
        # optax's params are LookaheadParams(fast, slow); gradients are taken at
        # fast, which is what the model (and polyopt's params) holds.
        params = optax.LookaheadParams.init_synced([jnp.asarray(p) for p in problem.start()])
        state = opt.init(params)
        update = jax.jit(opt.update)
        worst = 0.0
        for t, (mine, my_state) in enumerate(got):
            grads = problem.grad([np.asarray(f) for f in params.fast], t)
            updates, state = update([jnp.asarray(g) for g in grads], state, params)
            params = optax.apply_updates(params, updates)
            assert params.fast[0].dtype == jnp.float64
            worst = max(worst, max_rel(mine, params.fast), max_rel(my_state.slow, params.slow))
    print(f"lookahead[{inner}] reset={reset} vs optax.lookahead: max rel diff {worst:.3g}")
    assert worst <= 1e-12
    # not vacuous: reset_state changes the path
    other = run_rule(rules.lookahead(INNERS[inner][0](), sync_period=k, slow_step_size=alpha,
                                     reset_state=not reset), problem)
    assert max_rel(got[-1][0], other[-1][0]) > 1e-4


@pytest.mark.needs("torch")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_lookahead_exact_ratio_of_tensorflow_addons(dtype, tol):
    """tensorflow-addons, tensorflow_addons/optimizers/tests/lookahead_test.py
    (commit 083c1e3874fe1399a76465b5e59156424e965ec1), test_dense_exact_ratio:
    with constant gradients, after k steps of Lookahead(adam, sync_period=k,
    slow_step_size=alpha) the weights are val + alpha * (quick - val), quick
    being k steps of the plain inner optimizer; seed 0x2019 and its draws in
    run_dense_sample's order, k in (5, 10, 100), alpha in (0.3, 0.7),
    rtol = atol = 1e-6 in float32. The test's inner optimizer is Keras Adam;
    here the plain run is the native torch.optim.Adam (lr 1e-3) and polyopt's
    inner is the matching adam(); float64 adds a 1e-12 run. (The sparse
    variant of that test needs IndexedSlices, which rules do not take.)"""
    import torch

    for k in (5, 10, 100):
        for alpha in (0.3, 0.7):
            # np.random.seed(0x2019) and run_dense_sample's draws, in its order
            legacy = np.random.RandomState(0x2019)
            vals = [legacy.random_sample((2,)).astype(dtype),
                    legacy.random_sample((2,)).astype(dtype)]
            grads = [legacy.standard_normal((2,)).astype(dtype),
                     legacy.standard_normal((2,)).astype(dtype)]

            quick = [torch.tensor(v, requires_grad=True) for v in vals]
            native = torch.optim.Adam(quick, lr=1e-3)
            for _ in range(k):
                for q, g in zip(quick, grads):
                    q.grad = torch.tensor(g)
                native.step()
            quick = [q.detach().numpy() for q in quick]

            rule = rules.lookahead(rules.adam(learning_rate=1e-3), sync_period=k,
                                   slow_step_size=alpha)
            params = [v.copy() for v in vals]
            state = rule.init(params)
            for _ in range(k):
                updates, state = rule.update(grads, state, params)
                params = [p + u for p, u in zip(params, updates)]
            for val, q, slow in zip(vals, quick, params):
                assert slow.dtype == np.dtype(dtype)
                expected = val + (q - val) * alpha
                np.testing.assert_allclose(slow, expected, rtol=tol, atol=tol)
                assert np.max(np.abs(q - val)) > 1e-4  # the inner optimizer moved


# --------------------------------------------------------------------------
# ranger


def lessw2020_ranger(problem, steps=STEPS, lr=1e-3, alpha=0.5, k=6, N_sma_threshhold=5,
                     betas=(0.95, 0.999), eps=1e-5, weight_decay=0.0, gc=True,
                     gc_conv_only=False):
    """A numpy transcription of Ranger.step of lessw2020/Ranger-Deep-Learning-Optimizer,
    ranger/ranger.py, version 20.4.11 (commit 81d386b): per parameter, gradient
    centralization if grad.dim() > gc_gradient_threshold (the code ignores
    use_gc: ``gc`` here is what use_gc=False means), moments, RAdam step size
    with ``N_sma > N_sma_threshhold``, decoupled decay of p before the step,
    eps on the raw sqrt(exp_avg_sq), and Lookahead when step % k == 0.
    (The original casts to float32 with .float(); this runs in float64.)"""
    beta1, beta2 = betas
    gc_gradient_threshold = 3 if gc_conv_only else 1
    params = problem.start()
    state = [dict(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p),
                  slow_buffer=p.copy()) for p in params]
    out = []
    for it in range(steps):
        grads = problem.grad(params, it)
        new = []
        for p, grad, st in zip(params, grads, state):
            if gc and grad.ndim > gc_gradient_threshold:
                grad = grad - grad.mean(axis=tuple(range(1, grad.ndim)), keepdims=True)
            st["step"] += 1
            st["exp_avg_sq"] = st["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
            st["exp_avg"] = st["exp_avg"] * beta1 + (1 - beta1) * grad
            step = st["step"]
            beta2_t = beta2 ** step
            N_sma_max = 2 / (1 - beta2) - 1
            N_sma = N_sma_max - 2 * step * beta2_t / (1 - beta2_t)
            if N_sma > N_sma_threshhold:
                step_size = math.sqrt((1 - beta2_t) * (N_sma - 4) / (N_sma_max - 4) * (
                    N_sma - 2) / N_sma * N_sma_max / (N_sma_max - 2)) / (1 - beta1 ** step)
            else:
                step_size = 1.0 / (1 - beta1 ** step)
            if weight_decay != 0:
                p = p + (-weight_decay * lr) * p
            if N_sma > N_sma_threshhold:
                denom = np.sqrt(st["exp_avg_sq"]) + eps
                p = p + (-step_size * lr) * (st["exp_avg"] / denom)
            else:
                p = p + (-step_size * lr) * st["exp_avg"]
            if step % k == 0:
                st["slow_buffer"] = st["slow_buffer"] + alpha * (p - st["slow_buffer"])
                p = st["slow_buffer"].copy()
            new.append(p)
        params = new
        out.append(params)
    return out


@pytest.mark.parametrize("options, ref_options", [
    ({}, {}),
    ({"learning_rate": 0.01, "weight_decay": 0.05}, {"lr": 0.01, "weight_decay": 0.05}),
    ({"learning_rate": 0.01, "gradient_centralization": False, "sync_period": 4,
      "slow_step_size": 0.7}, {"lr": 0.01, "gc": False, "k": 4, "alpha": 0.7}),
    ({"learning_rate": 0.01, "b1": 0.9, "eps": 1e-8, "threshold": 6.5},
     {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "N_sma_threshhold": 6.5}),
], ids=["defaults", "weight_decay", "no_gc_k4", "betas_eps_threshold"])
def test_ranger_matches_lessw2020(options, ref_options):
    problem = Problem(seed=2)
    got = run_rule(rules.ranger(**options), problem)
    want = lessw2020_ranger(problem, **ref_options)
    worst = max(max_rel(params, ref) for (params, _), ref in zip(got, want))
    print(f"ranger{options} vs lessw2020 transcription: max rel diff {worst:.3g}")
    assert worst <= 1e-12
    # not vacuous: the run crossed the rectification threshold and synced, and
    # gradient centralization changes the path
    assert max_rel(want[-1], problem.params0) > 1e-4
    if ref_options.get("gc", True):
        other = lessw2020_ranger(problem, **{**ref_options, "gc": False})
        assert max_rel(want[-1], other[-1]) > 1e-6


def test_ranger_gc_conv_only_is_centralize_min_ndim_4():
    problem = Problem(seed=2)
    rule = rules.lookahead(rules.chain(rules.centralize(min_ndim=4),
                                       rules.radam(learning_rate=0.01, b1=0.95, eps=1e-5)),
                           sync_period=6, slow_step_size=0.5)
    got = run_rule(rule, problem)
    want = lessw2020_ranger(problem, lr=0.01, gc_conv_only=True)
    assert_close("lookahead(chain(centralize(min_ndim=4), radam)) vs Ranger gc_conv_only",
                 got[-1][0], want[-1])


# --------------------------------------------------------------------------
# sam


def davda54_first_step(params, grads, rho, adaptive):
    """davda54/sam, sam.py (HEAD 3c3afdb), SAM.first_step and _grad_norm:
    norm = || [ ||(|p| if adaptive else 1) * g|| for p ] ||,
    e_w = (p^2 if adaptive else 1) * g * rho / (norm + 1e-12), p += e_w."""
    norms = [np.linalg.norm(((np.abs(p) if adaptive else 1.0) * g).ravel())
             for p, g in zip(params, grads)]
    grad_norm = np.linalg.norm(np.stack(norms))
    scale = rho / (grad_norm + 1e-12)
    return [p + (p ** 2 if adaptive else 1.0) * g * scale for p, g in zip(params, grads)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturb_matches_davda54_first_step(adaptive):
    rng = np.random.default_rng(4)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = [rng.normal(size=s) for s in SHAPES]
    rule = rules.sam(rules.sgd(), rho=0.07, adaptive=adaptive)
    got = rule.perturb(params, grads)
    want = davda54_first_step(params, grads, 0.07, adaptive)
    assert_close(f"sam.perturb adaptive={adaptive} vs davda54 first_step", got, want, 1e-14)
    # the eps is davda54's 1e-12: visible when the gradient is tiny
    tiny = [g * 1e-13 for g in grads]
    assert_close("sam.perturb tiny grads (eps 1e-12)", rule.perturb(params, tiny),
                 davda54_first_step(params, tiny, 0.07, adaptive), 1e-14)
    eps0 = rules.sam(rules.sgd(), rho=0.07, eps=0.0, adaptive=adaptive)
    assert max_rel(eps0.perturb(params, tiny), davda54_first_step(params, tiny, 0.07,
                                                                   adaptive)) > 1e-3
    # a zero gradient (optax: 0 / 0) leaves the params where they are
    for eps in (0.0, 1e-12):
        zero = rules.sam(rules.sgd(), rho=0.07, eps=eps, adaptive=adaptive)
        still = zero.perturb(params, [np.zeros_like(g) for g in grads])
        assert all(np.array_equal(a, b) for a, b in zip(still, params))
    # perturbation really of size rho (in the scaled norm)
    delta = [g - p for g, p in zip(got, params)]
    scale = [np.abs(p) if adaptive else 1.0 for p in params]
    norm = math.sqrt(sum(float(np.sum((d / s) ** 2)) for d, s in zip(delta, scale)))
    assert norm == pytest.approx(0.07, rel=1e-10)


def _logistic_data(seed=5, n=32, d=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ rng.normal(size=d)))).astype(np.float64)
    return x, y


def _logistic_grad(x, y, params):
    w, b = params
    z = x @ w + b
    prob = 1 / (1 + np.exp(-z))
    dz = (prob - y) / len(y)
    return [x.T @ dz, np.sum(dz)]


@pytest.mark.needs("torch")
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_two_pass_loop_matches_davda54_with_torch_sgd(adaptive):
    """The full loop of davda54's README (first_step at w, gradient at w + e,
    second_step restores w and runs the base optimizer), transcribed with torch
    autograd and torch.optim.SGD as the base; polyopt uses numpy gradients."""
    import torch

    x, y = _logistic_data()
    rng = np.random.default_rng(6)
    w0, b0 = rng.normal(size=5), np.asarray(0.3)
    rho, steps = 0.5, 30

    tw = torch.tensor(w0, requires_grad=True)
    tb = torch.tensor(b0, requires_grad=True)
    tx, ty = torch.tensor(x), torch.tensor(y)
    base = torch.optim.SGD([tw, tb], lr=0.5, momentum=0.9, weight_decay=1e-2)

    def closure():
        base.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(tx @ tw + tb, ty)
        loss.backward()

    reference = []
    for _ in range(steps):
        closure()
        with torch.no_grad():  # SAM.first_step
            norm = torch.norm(torch.stack([
                ((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2) for p in (tw, tb)]))
            scale = rho / (norm + 1e-12)
            old = [p.data.clone() for p in (tw, tb)]
            for p in (tw, tb):
                p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale)
        closure()
        with torch.no_grad():  # SAM.second_step
            for p, o in zip((tw, tb), old):
                p.data = o
        base.step()
        reference.append([tw.detach().numpy().copy(), tb.detach().numpy().copy()])

    rule = rules.sam(rules.sgd(learning_rate=0.5, momentum=0.9, weight_decay=1e-2), rho=rho,
                     adaptive=adaptive)
    params = [w0.copy(), b0.copy()]
    state = rule.init(params)
    worst = 0.0
    for ref in reference:
        perturbed = rule.perturb(params, _logistic_grad(x, y, params))
        updates, state = rule.update(_logistic_grad(x, y, perturbed), state, params)
        params = [p + u for p, u in zip(params, updates)]
        worst = max(worst, max_rel(params, ref))
    print(f"sam adaptive={adaptive} two-pass loop vs davda54 + torch SGD: max rel diff {worst:.3g}")
    assert worst <= 1e-12
    # not vacuous: SAM's path differs from plain SGD's
    plain = rules.sgd(learning_rate=0.5, momentum=0.9, weight_decay=1e-2)
    p2, s2 = [w0.copy(), b0.copy()], None
    s2 = plain.init(p2)
    for _ in range(steps):
        u, s2 = plain.update(_logistic_grad(x, y, p2), s2, p2)
        p2 = [p + v for p, v in zip(p2, u)]
    assert max_rel(params, p2) > 1e-3


@pytest.mark.needs("jax")
@pytest.mark.parametrize("sync_period", [2, 3])
@pytest.mark.parametrize("inner", ["sgd_l2", "adam"])
def test_sam_matches_optax_contrib_sam(inner, sync_period):
    """optax.contrib.sam(opt, chain(normalize(), sgd(rho)), sync_period=n) ==
    n - 1 chained perturb(eps=0) calls, then update at the original params."""
    import jax
    import optax

    x, y = _logistic_data(seed=7)
    rng = np.random.default_rng(8)
    start = [rng.normal(size=5), np.asarray(-0.2)]
    rho, steps = 0.3, 20
    if inner == "sgd_l2":
        mine = rules.sgd(learning_rate=0.5, momentum=0.9, weight_decay=1e-2)
        native = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.5, momentum=0.9))
    else:
        mine = rules.adam(learning_rate=0.05)
        native = optax.adam(0.05)
    rule = rules.sam(mine, rho=rho, eps=0.0)

    with jax.enable_x64(True):
        import jax.numpy as jnp

        opt = optax.contrib.sam(native, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                                sync_period=sync_period)
        nparams = [jnp.asarray(p) for p in start]
        nstate = opt.init(nparams)
        update = jax.jit(opt.update)

        params = [p.copy() for p in start]
        state = rule.init(params)
        worst_point = worst = 0.0
        for _ in range(steps):
            point = params
            for _ in range(sync_period - 1):  # adversarial calls
                point = rule.perturb(point, _logistic_grad(x, y, point))
                g = _logistic_grad(x, y, [np.asarray(p) for p in nparams])
                u, nstate = update([jnp.asarray(a) for a in g], nstate, nparams)
                nparams = optax.apply_updates(nparams, u)
                worst_point = max(worst_point, max_rel(point, nparams))
            updates, state = rule.update(_logistic_grad(x, y, point), state, params)
            params = [p + u for p, u in zip(params, updates)]
            g = _logistic_grad(x, y, [np.asarray(p) for p in nparams])
            u, nstate = update([jnp.asarray(a) for a in g], nstate, nparams)
            nparams = optax.apply_updates(nparams, u)
            assert nparams[0].dtype == jnp.float64
            worst = max(worst, max_rel(params, nparams))
    print(f"sam[{inner}] sync_period={sync_period} vs optax.contrib.sam: params {worst:.3g}, "
          f"perturbed points {worst_point:.3g}")
    assert worst <= 1e-12
    assert worst_point <= 1e-12
    assert max_rel(params, start) > 1e-2


# --------------------------------------------------------------------------
# clip_by_global_norm


def _grads(seed, norm):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=s) for s in SHAPES]
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    return [g * (norm / total) for g in grads]


@pytest.mark.needs("jax")
@pytest.mark.parametrize("norm", [0.25, 0.999, 1.001, 7.0, 1e4])
def test_clip_by_global_norm_matches_optax(norm):
    import jax
    import optax

    grads = _grads(9, norm)
    rule = rules.clip_by_global_norm(1.0)
    got, _ = rule.update(grads, rule.init(grads), grads)
    with jax.enable_x64(True):
        import jax.numpy as jnp

        native = optax.clip_by_global_norm(1.0)
        jg = [jnp.asarray(g) for g in grads]
        want, _ = native.update(jg, native.init(jg))
        want = [np.asarray(w) for w in want]
    assert_close(f"clip_by_global_norm(1.0) norm={norm} vs optax", got, want, 1e-15)
    if norm < 1:
        assert all(np.array_equal(g, w) for g, w in zip(got, grads))  # passed through
    else:
        assert math.sqrt(sum(float(np.sum(g * g)) for g in got)) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.needs("torch")
@pytest.mark.parametrize("norm", [0.25, 1.0, 1.0000005, 7.0])
def test_clip_by_global_norm_eps_matches_torch_clip_grad_norm(norm):
    import torch

    grads = _grads(10, norm)
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0)
    want = [t.grad.numpy() for t in tensors]
    rule = rules.clip_by_global_norm(1.0, eps=1e-6)
    got, _ = rule.update(grads, rule.init(grads), grads)
    assert_close(f"clip_by_global_norm(1.0, eps=1e-6) norm={norm} vs torch clip_grad_norm_",
                 got, want, 1e-15)
    if norm >= 1:  # the eps is torch's: without it the result is measurably different
        plain = rules.clip_by_global_norm(1.0)
        got0, _ = plain.update(grads, plain.init(grads), grads)
        assert max_rel(got0, want) > 1e-8


def test_clip_by_global_norm_edge_cases():
    zeros = [np.zeros((2, 2)), np.zeros(3)]
    rule = rules.clip_by_global_norm(0.0)
    got, _ = rule.update(zeros, rule.init(zeros), zeros)  # 0 / 0 would be NaN
    assert all(np.array_equal(g, z) for g, z in zip(got, zeros))
    grads = _grads(11, 3.0)
    got, _ = rule.update(grads, rule.init(grads), grads)
    assert all(not np.any(g) for g in got)
    # a 0-d array max_norm (e.g. from an adapter) behaves as the number
    as_array = rules.clip_by_global_norm(np.asarray(2.0))
    as_number = rules.clip_by_global_norm(2.0)
    a, _ = as_array.update(grads, as_array.init(grads), grads)
    b, _ = as_number.update(grads, as_number.init(grads), grads)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert math.sqrt(sum(float(np.sum(g * g)) for g in a)) == pytest.approx(2.0, rel=1e-14)
    # float32 stays float32
    g32 = [g.astype(np.float32) for g in grads]
    c32, _ = as_array.update(g32, as_array.init(g32), g32)
    assert all(c.dtype == np.float32 for c in c32)


# --------------------------------------------------------------------------
# centralize


@pytest.mark.parametrize("keep_axis", [0, -1, 1])
def test_centralize_is_a_mean_subtraction(keep_axis):
    rng = np.random.default_rng(12)
    grads = [rng.normal(size=s) + 3.0 for s in [(4, 3), (2, 3, 2, 2), (5,), ()]]
    rule = rules.centralize(keep_axis=keep_axis)
    got, _ = rule.update(grads, rule.init(grads), grads)
    want = []
    for g in grads:
        if g.ndim < 2:
            want.append(g)
            continue
        keep = keep_axis % g.ndim
        axes = tuple(a for a in range(g.ndim) if a != keep)
        want.append(g - g.mean(axis=axes, keepdims=True))
    assert_close(f"centralize(keep_axis={keep_axis}) vs numpy", got, want, 1e-15)
    for g in got[:2]:  # the kept axis's slices now average to 0
        keep = keep_axis % g.ndim
        axes = tuple(a for a in range(g.ndim) if a != keep)
        assert np.max(np.abs(g.mean(axis=axes))) < 1e-14
    assert np.array_equal(got[2], grads[2]) and np.array_equal(got[3], grads[3])


def test_centralize_explicit_layouts():
    g = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])  # torch (out=2, in=3)
    rule = rules.centralize(keep_axis=0)
    got, _ = rule.update([g], rule.init([g]), [g])
    np.testing.assert_array_equal(got[0], [[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]])
    rule = rules.centralize(keep_axis=-1)  # Keras (in=2, out=3)
    got, _ = rule.update([g], rule.init([g]), [g])
    np.testing.assert_array_equal(got[0], [[0.5, 1.0, 1.5], [-0.5, -1.0, -1.5]])
    rule = rules.centralize(min_ndim=4)  # conv kernels only
    got, _ = rule.update([g], rule.init([g]), [g])
    np.testing.assert_array_equal(got[0], g)


def test_centralize_refuses_an_axis_out_of_range():
    rule = rules.centralize(keep_axis=2)
    with pytest.raises(ValueError, match=r"centralize.init: keep_axis=2 is not an axis of "
                                         r"params\[1\], which has shape \(2, 3\)"):
        rule.init([np.zeros(3), np.zeros((2, 3))])
    state = rule.init([np.zeros((2, 3, 4))])
    with pytest.raises(ValueError, match=r"centralize.update: keep_axis=2"):
        rule.update([np.ones((2, 3))], state, [np.zeros((2, 3))])
    rules.centralize(keep_axis=-3).init([np.zeros((2, 3, 4)), np.zeros(5)])  # 1-D: not centralized


def _prefix_cases():
    return {
        "ranger": rules.ranger(learning_rate=0.1),
        "ranger reset_state": rules.lookahead(
            rules.chain(rules.centralize(keep_axis=-1), rules.radam(learning_rate=0.1)),
            sync_period=3, slow_step_size=0.5, reset_state=True),
        "chain(centralize, adam, decoupled decay)": rules.chain(
            rules.centralize(min_ndim=4), rules.adam(learning_rate=0.1),
            rules.decoupled_weight_decay(0.1, 0.1)),
    }


@pytest.mark.parametrize("case", sorted(_prefix_cases()))
def test_a_rule_with_a_per_tensor_prefix_is_its_transform_then_its_rest(case):
    """Rule.prefix = (transform, rest): rest is elementwise with the rule's
    state, and rest.update(transform(grads)) is the rule's update, bit for bit."""
    rule = _prefix_cases()[case]
    transform, rest = rule.prefix
    assert not rule.elementwise and rest.elementwise and not rest.uses_layout
    rng = np.random.default_rng(21)
    params = [rng.normal(size=s) for s in SHAPES]
    state = rule.init(params)
    a, b = (params, state), (params, rest.init(params))
    assert type(b[1]) is type(state)
    for _ in range(7):
        grads = [rng.normal(size=s) + 1.0 for s in SHAPES]
        ua, sa = rule.update(grads, a[1], a[0])
        ub, sb = rest.update(transform(grads, b[0]), b[1], b[0])
        a = ([p + u for p, u in zip(a[0], ua)], sa)
        b = ([p + u for p, u in zip(b[0], ub)], sb)
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    # the transform did something (a rest given the raw grads would differ)
    raw, _ = rest.update(grads, a[1], a[0])
    assert not all(np.array_equal(x, y) for x, y in zip(raw, rule.update(grads, a[1], a[0])[0]))


def test_a_prefix_is_declared_only_where_it_comes_first():
    """Only a per-tensor transform that the other rules follow elementwise is a
    prefix: not one after another rule, nor one before a per-tensor rule."""
    assert rules.centralize().prefix is not None
    assert rules.chain(rules.sgd(), rules.centralize()).prefix is None
    assert rules.chain(rules.centralize(), rules.lamb()).prefix is None
    assert rules.ranger(gradient_centralization=False).prefix is None
    assert rules.adam().prefix is None
    with pytest.raises(ValueError, match=r"centralize.update: keep_axis=2"):
        rules.centralize(keep_axis=2).prefix[0]([np.ones((2, 3))], [np.zeros((2, 3))])


# --------------------------------------------------------------------------
# chain, add_decayed_weights, decoupled_weight_decay


@pytest.mark.needs("jax")
def test_chain_matches_optax_chain_of_clip_decay_sgd():
    import jax
    import optax

    problem = Problem(seed=13, steps=50, scale=3.0)
    max_norm, wd, lr, m = 4.0, 1e-2, 0.02, 0.9
    rule = rules.chain(rules.clip_by_global_norm(max_norm), rules.add_decayed_weights(wd),
                       rules.sgd(learning_rate=lr, momentum=m))
    got = run_rule(rule, problem, steps=50)
    clipped = []
    with jax.enable_x64(True):
        import jax.numpy as jnp

        opt = optax.chain(optax.clip_by_global_norm(max_norm), optax.add_decayed_weights(wd),
                          optax.sgd(lr, momentum=m))
        params = [jnp.asarray(p) for p in problem.start()]
        state = opt.init(params)
        update = jax.jit(opt.update)
        worst = 0.0
        for t, (mine, _) in enumerate(got):
            grads = problem.grad([np.asarray(p) for p in params], t)
            clipped.append(math.sqrt(sum(float(np.sum(g * g)) for g in grads)) > max_norm)
            updates, state = update([jnp.asarray(g) for g in grads], state, params)
            params = optax.apply_updates(params, updates)
            worst = max(worst, max_rel(mine, params))
    print(f"chain(clip, add_decayed_weights, sgd) vs optax.chain, 50 steps: {worst:.3g}")
    assert worst <= 1e-12
    assert any(clipped) and not all(clipped)  # both branches of the clip were taken
    assert len(got[-1][1].inner) == 3


@pytest.mark.needs("torch")
@pytest.mark.parametrize("schedule", [False, True])
def test_adam_then_decoupled_weight_decay_is_torch_adamw(schedule):
    import torch

    problem = Problem(seed=14, steps=30)
    lr, wd = 0.01, 0.1
    lr_value = (lambda count: lr * 0.9 ** count) if schedule else lr
    rule = rules.chain(rules.adam(learning_rate=lr_value),
                       rules.decoupled_weight_decay(wd, learning_rate=lr_value))
    got = run_rule(rule, problem, steps=30)

    tensors = [torch.tensor(p, requires_grad=True) for p in problem.start()]
    native = torch.optim.AdamW(tensors, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(native, lambda e: 0.9 ** e) if schedule else None
    worst = 0.0
    for t, (mine, _) in enumerate(got):
        grads = problem.grad([x.detach().numpy() for x in tensors], t)
        for x, g in zip(tensors, grads):
            x.grad = torch.tensor(g)
        native.step()
        if sched is not None:
            sched.step()
        worst = max(worst, max_rel(mine, [x.detach().numpy() for x in tensors]))
    print(f"chain(adam, decoupled_weight_decay) schedule={schedule} vs torch AdamW: {worst:.3g}")
    assert worst <= 1e-12
    # the decay is really there
    plain = run_rule(rules.adam(learning_rate=lr_value), problem, steps=30)
    assert max_rel(got[-1][0], plain[-1][0]) > 1e-3


def test_add_decayed_weights_and_decoupled_weight_decay_by_hand():
    p, g = [np.array([2.0, -4.0])], [np.array([1.0, 1.0])]
    rule = rules.add_decayed_weights(0.5)
    np.testing.assert_array_equal(rule.update(g, rule.init(p), p)[0][0], [2.0, -1.0])
    rule = rules.decoupled_weight_decay(0.5, learning_rate=0.1)
    np.testing.assert_array_equal(rule.update(g, rule.init(p), p)[0][0], [0.9, 1.2])
    rule = rules.decoupled_weight_decay(0.5)  # default learning_rate 1: unscaled decay
    np.testing.assert_array_equal(rule.update(g, rule.init(p), p)[0][0], [0.0, 3.0])


# --------------------------------------------------------------------------
# apply_if_finite: skipped steps change nothing


NONFINITE_STEPS = {2, 3, 4, 7}  # steps whose first gradient holds a NaN or an inf


def _poisoned(problem, params, t):
    grads = problem.grad(params, t)
    if t in NONFINITE_STEPS:
        grads[0] = grads[0].copy()
        grads[0].flat[t % grads[0].size] = np.nan if t % 2 else -np.inf
    return grads


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the NaN let through
@pytest.mark.parametrize("limit", [math.inf, 2])
def test_apply_if_finite_skips_and_counts(limit):
    problem = Problem(seed=3, steps=10)
    rule = rules.apply_if_finite(rules.adam(learning_rate=0.05), max_consecutive_errors=limit)
    plain = rules.adam(learning_rate=0.05)
    params = problem.start()
    state = rule.init(params)
    ref_params, ref_state = problem.start(), plain.init(problem.start())
    for t in range(10):
        grads = _poisoned(problem, params, t)
        before = params
        updates, state = rule.update(grads, state, params)
        params = [p + u for p, u in zip(params, updates)]
        finite = t not in NONFINITE_STEPS
        assert bool(state.last_finite) == finite
        if limit == math.inf or finite or int(state.notfinite_count) <= limit:
            # the reference skips exactly the non-finite steps
            if finite:
                ref_updates, ref_state = plain.update(grads, ref_state, ref_params)
                ref_params = [p + u for p, u in zip(ref_params, ref_updates)]
            else:
                assert all(np.array_equal(p, b) for p, b in zip(params, before))
            assert_close(f"step {t}", params, ref_params, 0.0)
        else:  # gave up after `limit` consecutive skips: the NaN goes through
            assert t == 4 and not np.all(np.isfinite(params[0]))
            break
    assert int(state.count) == t + 1
    assert int(state.total_notfinite) == len([s for s in NONFINITE_STEPS if s <= t])
    if limit == math.inf:
        assert int(state.inner.count) == 10 - len(NONFINITE_STEPS)
        assert all(np.all(np.isfinite(m)) for m in state.inner.second_moment)


@pytest.mark.needs("jax")
@pytest.mark.parametrize("limit", [1, 3])
def test_apply_if_finite_matches_optax(limit):
    import jax
    import optax

    problem = Problem(seed=4, steps=10)
    got_params = problem.start()
    rule = rules.apply_if_finite(rules.sgd(learning_rate=0.05, momentum=0.9),
                                 max_consecutive_errors=limit)
    state = rule.init(got_params)
    with jax.enable_x64(True):
        import jax.numpy as jnp

        opt = optax.apply_if_finite(optax.sgd(0.05, momentum=0.9), max_consecutive_errors=limit)
        params = [jnp.asarray(p) for p in problem.start()]
        native_state = opt.init(params)
        update = jax.jit(opt.update)
        for t in range(10):
            with np.errstate(invalid="ignore"):  # once NaN went through, grads are NaN
                grads = _poisoned(problem, [np.asarray(p) for p in params], t)
            updates, native_state = update([jnp.asarray(g) for g in grads], native_state, params)
            params = optax.apply_updates(params, updates)
            mine, state = rule.update(grads, state, got_params)
            got_params = [p + u for p, u in zip(got_params, mine)]
            for name in ("notfinite_count", "last_finite", "total_notfinite"):
                assert np.asarray(getattr(state, name)) == np.asarray(
                    getattr(native_state, name)), (t, name)
            np.testing.assert_allclose(np.concatenate([np.ravel(p) for p in got_params]),
                                       np.concatenate([np.ravel(p) for p in params]),
                                       rtol=1e-12, atol=0, equal_nan=True, err_msg=f"step {t}")
    # three non-finite steps in a row: with limit 1 the third goes through
    assert bool(np.all(np.isfinite(got_params[0]))) == (limit >= 3)


# --------------------------------------------------------------------------
# array API: the new pieces agree in every namespace under test
# (numpy and array_api_strict always; torch and jax when POLYOPT_FRAMEWORKS names them)


@pytest.mark.parametrize("make", [
    lambda: rules.lookahead(rules.adam(learning_rate=0.05), sync_period=3, reset_state=True),
    lambda: rules.lookahead(rules.nadam(), sync_period=2, reset_state=True),
    lambda: rules.ranger(learning_rate=0.01, sync_period=4, reset_state=True),
    lambda: rules.chain(rules.clip_by_global_norm(np.asarray(2.0), eps=1e-6),
                        rules.centralize(keep_axis=-1), rules.sgd(learning_rate=0.1)),
    lambda: rules.sam(rules.adam(learning_rate=0.05), rho=0.1, adaptive=True),
    lambda: rules.apply_if_finite(rules.rmsprop(centered=True, momentum=0.5)),
], ids=["lookahead-adam-reset", "lookahead-nadam-reset", "ranger-reset", "clip-array-gc",
        "sam-adaptive", "apply-if-finite"])
def test_pieces_agree_across_namespaces(make, array_namespaces, to_namespace, to_numpy):
    problem = Problem(seed=15, steps=8)

    def run(name):
        rule = make()
        params = [to_namespace(name, p) for p in problem.start()]
        state = rule.init(params)
        for t in range(8):
            grads = [to_namespace(name, g)
                     for g in problem.grad([to_numpy(p) for p in params], t)]
            if hasattr(rule, "perturb"):
                point = rule.perturb(params, grads)
                grads = [to_namespace(name, g)
                         for g in problem.grad([to_numpy(p) for p in point], t)]
            updates, state = rule.update(grads, state, params)
            params = [p + u for p, u in zip(params, updates)]
        return [to_numpy(p) for p in params]

    want = run("numpy")
    assert max_rel(want, problem.params0) > 1e-3
    assert "array_api_strict" in array_namespaces
    for name in array_namespaces:
        got = run(name)
        assert all(g.dtype == np.float64 for g in got), name
        assert_close(f"{name} vs numpy", got, want, 1e-13)


# --------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("build, exception, match", [
    (lambda: rules.lookahead(42), TypeError, r"lookahead: inner must be a Rule .* got 42"),
    (lambda: rules.lookahead("adam"), TypeError, r"lookahead: inner must be a Rule"),
    (lambda: rules.sam(object()), TypeError, r"sam: inner must be a Rule"),
    (lambda: rules.chain(), ValueError, r"chain: needs at least one rule, got none"),
    (lambda: rules.chain(rules.sgd(), rules.adam), TypeError, r"chain: rules\[1\] must be a Rule"),
    (lambda: rules.lookahead(rules.sgd(), reset_state=1), TypeError, r"reset_state=1"),
    (lambda: rules.ranger(reset_state="no"), TypeError, r"ranger: reset_state"),
    (lambda: rules.centralize(min_ndim=0), ValueError, r"min_ndim=0"),
    (lambda: rules.clip_by_global_norm(eps=-1e-6), ValueError, r"eps=-1e-06"),
    (lambda: rules.apply_if_finite("adam"), TypeError, r"apply_if_finite: inner must be a Rule"),
    (lambda: rules.apply_if_finite(rules.adam(), max_consecutive_errors=-1), ValueError,
     r"max_consecutive_errors must be an integer in \[0, inf\], got max_consecutive_errors=-1"),
    (lambda: rules.apply_if_finite(rules.adam(), max_consecutive_errors=2.5), TypeError,
     r"max_consecutive_errors=2.5"),
])
def test_bad_construction(build, exception, match):
    with pytest.raises(exception, match=match):
        build()


def test_mismatched_states_are_refused():
    params = [np.ones((2, 2)), np.ones(3)]
    grads = [np.ones((2, 2)), np.ones(3)]
    look = rules.lookahead(rules.adam())
    with pytest.raises(TypeError, match=r"lookahead.update: state must be a LookaheadState"):
        look.update(grads, rules.adam().init(params), params)
    with pytest.raises(ValueError, match=r"lookahead.update: state holds 2 arrays per slot "
                                         r"for 1 params"):
        look.update(grads[:1], look.init(params), params[:1])
    with pytest.raises(ValueError, match=r"lookahead.update: state for params\[0\] has shape"):
        look.update([np.ones(5), np.ones(3)], look.init(params), [np.ones(5), np.ones(3)])
    # the inner state is the inner rule's: a lookahead around sgd refuses an adam inner state
    sgd_look = rules.lookahead(rules.sgd())
    bad = look.init(params)
    with pytest.raises(TypeError, match=r"sgd.update: state must be a SGDState"):
        sgd_look.update(grads, bad, params)

    two = rules.chain(rules.clip_by_global_norm(), rules.sgd())
    three = rules.chain(rules.centralize(), rules.clip_by_global_norm(), rules.sgd())
    with pytest.raises(ValueError, match=r"chain.update: state holds 3 states for 2 rules"):
        two.update(grads, three.init(params), params)
    with pytest.raises(TypeError, match=r"chain.update: state must be a ChainState"):
        two.update(grads, rules.sgd().init(params), params)
    swapped = rules.chain(rules.sgd(), rules.clip_by_global_norm())
    with pytest.raises(TypeError, match=r"clip_by_global_norm.update: state must be a CountState"):
        two.update(grads, swapped.init(params), params)
    with pytest.raises(TypeError, match=r"centralize.update: state must be a CountState"):
        rules.centralize().update(grads, rules.adam().init(params), params)


def test_sam_perturb_refuses_mismatched_grads_and_changes_nothing():
    rule = rules.sam(rules.sgd())
    params = [np.ones((2, 2)), np.ones(3)]
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"^sam.perturb: got 1 grads for 2 params"):
        rule.perturb(params, [np.ones((2, 2))])
    with pytest.raises(ValueError, match=r"^sam.perturb: grads\[1\] has shape \(4,\)"):
        rule.perturb(params, [np.ones((2, 2)), np.ones(4)])
    with pytest.raises(TypeError, match=r"^sam.perturb: grads must be a list of arrays"):
        rule.perturb(params, np.ones(3))
    grads = [np.ones((2, 2)), np.ones(3)]
    rule.perturb(params, grads)
    assert all(np.array_equal(p, b) for p, b in zip(params, before))


def test_wrappers_do_not_change_their_inputs():
    problem = Problem(seed=16, steps=7)
    for rule in (rules.ranger(sync_period=2, reset_state=True),
                 rules.chain(rules.centralize(), rules.clip_by_global_norm(0.1),
                             rules.add_decayed_weights(0.1), rules.adam(),
                             rules.decoupled_weight_decay(0.1))):
        params = problem.start()
        state = rule.init(params)
        for t in range(7):
            grads = problem.grad(params, t)
            snapshot = ([p.copy() for p in params], [g.copy() for g in grads])
            updates, state = rule.update(grads, state, params)
            assert all(np.array_equal(a, b) for a, b in zip(params, snapshot[0]))
            assert all(np.array_equal(a, b) for a, b in zip(grads, snapshot[1]))
            params = [p + u for p, u in zip(params, updates)]
