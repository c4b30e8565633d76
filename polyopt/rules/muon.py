"""Muon: momentum orthogonalized by Newton-Schulz, with an Adam for the other params."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from polyopt import hyper
from polyopt._namespace import fused, namespace
from polyopt.rules import _base, _state
from polyopt.rules._base import Rule
from polyopt.rules._state import Slot


class MuonState(NamedTuple):
    count: Any
    momentum: list  # Muon params: the momentum buffer; the others: shape (0,)
    adam: Any  # the Adam rule's state: its slots shaped (0,) for the Muon params


def is_muon_param(shape: tuple, layout: Any, muon_params: str) -> bool:
    """Whether a param of ``shape`` and (checked) ``layout`` takes the Muon step under
    ``muon_params``: a layout of None (0-d and 1-D params) or ``NOT_A_MATRIX`` says
    it is not a matrix, and it takes the Adam step."""
    if muon_params == "none" or layout is None or _state.is_not_a_matrix(layout):
        return False
    return len(shape) == 2 if muon_params == "2d" else True


def as_matrix(xp, x, layout):
    """``x`` as the matrix (output axes, reduction axes), or with batch axes as the
    stack of them (batch, output, reduction), and how to undo it."""
    output, reduction = _state.matrix_axes(layout, x.ndim)
    batch = () if layout is None else tuple(layout.batch_axes)
    order = (*batch, *output, *reduction)
    shape = tuple([int(d) for d in x.shape])  # lists: torch.compile traces no generator
    rows = math.prod([shape[a] for a in output])
    cols = math.prod([shape[a] for a in reduction])
    permuted = tuple([shape[a] for a in order])
    moved = order != tuple(range(x.ndim))
    matrix = xp.reshape(xp.permute_dims(x, order) if moved else x,
                        (math.prod([shape[a] for a in batch]), rows, cols) if batch else
                        (rows, math.prod(shape) // max(rows, 1)))
    inverse = tuple([order.index(a) for a in range(x.ndim)])

    def back(m):
        m = xp.reshape(m, permuted)
        return xp.permute_dims(m, inverse) if moved else m

    return matrix, back


def _frobenius(xp, x):
    """||x||_F of a matrix, or of each matrix of a stack (kept as (..., 1, 1))."""
    squares = _base.abs_sq(xp, x)
    return xp.sqrt(xp.sum(squares) if x.ndim == 2 else
                   xp.sum(squares, axis=(-2, -1), keepdims=True))


def _like(xp, x, like):
    """``x`` (a real norm or scale) in ``like``'s dtype (complex for a complex ``like``)."""
    return x if x.dtype == like.dtype else xp.astype(x, like.dtype)


def _at_least(xp, x, floor: float):
    return xp.maximum(x, xp.full_like(x, floor))


#: the floor of the AOL row sums and of the Schatten norm (optax's, whatever its eps)
_PRECONDITIONING_FLOOR = 1e-8


def _conjugate(xp, x):
    """conj(x); a real ``x`` itself."""
    return xp.conj(x) if _base.is_complex(xp, x) else x


def newton_schulz(xp, x, coefficients, eps: float, eps_placement: str, dtype: Any = None,
                  preconditioning: str = "frobenius"):
    """The quintic Newton-Schulz iteration X <- a X + (b A + c A A) X, A = X X^H (X X^T
    for a real X), one (a, b, c) of ``coefficients`` per iteration, on the wide
    orientation of ``x`` (a tall matrix is transposed and back; a square one too with
    'aol', whose row scaling is optax's on (inputs, outputs)), after
    ``preconditioning``: 'frobenius' X / ||X||_F, 'spectral' X / ||X||_2 (``eps``
    added or clamped), 'aol' and 'schatten' (optax's) scale the first iteration
    instead. In ``dtype`` (None: x's); returns the result in ``dtype``."""
    kernels = fused(xp)
    if dtype is not None and x.dtype != dtype:
        x = xp.astype(x, dtype)
    rows, cols = x.shape[-2], x.shape[-1]
    flip = rows > cols or (rows == cols and preconditioning == "aol")
    if flip:
        x = xp.matrix_transpose(x)
    if preconditioning in ("frobenius", "spectral"):
        # an iteration in bfloat16 accumulates the norm in float32 (torch)
        bfloat16 = dtype is not None and _state.dtype_name(x) == "bfloat16"
        if preconditioning == "spectral":
            wide = xp.astype(x, xp.float32) if bfloat16 else x
            norm = xp.linalg.matrix_norm(wide, ord=2, keepdims=x.ndim > 2)
        elif bfloat16:
            norm = kernels.bfloat16_norm(xp, x, keepdims=x.ndim > 2)
        else:
            norm = _frobenius(xp, x)
        if eps_placement == "clamp":
            x = x / _at_least(xp, _like(xp, norm, x), eps)
        else:
            x = x / (_like(xp, norm, x) + eps)
    for k, (a, b, c) in enumerate(coefficients):
        gram = xp.matmul(x, xp.matrix_transpose(_conjugate(xp, x)))
        if k == 0 and preconditioning == "aol":  # each row by 1/sqrt(its row of |A|)
            scale = _like(xp, 1 / xp.sqrt(_at_least(
                xp, xp.sum(xp.abs(gram), axis=-1, keepdims=True), _PRECONDITIONING_FLOOR)), x)
            x = x * scale
            gram = gram * scale * xp.matrix_transpose(scale)
        elif k == 0 and preconditioning == "schatten":  # X / ||A||_F^(1/2): ||A||_S4 <= 1
            scale = _like(xp, 1 / xp.sqrt(_at_least(xp, _frobenius(xp, gram),
                                                    _PRECONDITIONING_FLOOR)), x)
            x = x * scale
            gram = gram * (scale * scale)
        poly = kernels.matmul_add(xp, gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = kernels.matmul_add(xp, x, poly, x, beta=a)  # a X + B X
    return xp.matrix_transpose(x) if flip else x


def _iteration_dtype(xp, name: str | None, like: Any, where: str = "muon") -> Any:
    """The dtype ``iteration_dtype`` names for a Muon param like ``like`` (None: its
    own); a complex param iterates in the complex dtype of that precision."""
    if name is None:
        return None
    what = f"iteration_dtype={name!r}"
    if _base.is_complex(xp, like):
        if name not in _state._COMPLEX_OF:
            raise TypeError(
                f"{where} is complex ({like.dtype}): {what} has no complex dtype; give "
                f"'float32' (complex64) or None")
        name = _state._COMPLEX_OF[name]
    return _state._named_dtype(xp, name, what)


def _coefficients(ns_steps: int, triple: tuple, table: tuple | None) -> tuple:
    """One (a, b, c) per Newton-Schulz iteration, from the checked ns_* options."""
    if table is None:
        return (triple,) * ns_steps
    standard = tuple(hyper.MUON[name].default for name in ("ns_a", "ns_b", "ns_c"))
    if triple != standard:
        raise ValueError(
            f"muon: ns_table (optax's ns_coeffs) replaces ns_a, ns_b, ns_c, got both "
            f"ns_table={table!r} and (ns_a, ns_b, ns_c)={triple!r}; give one of them")
    if isinstance(table[0], float):  # one triple: every iteration
        return (table,) * ns_steps
    if len(table) > ns_steps:
        raise ValueError(
            f"muon: ns_table (optax's ns_coeffs) holds {len(table)} triples, more than "
            f"ns_steps={ns_steps}: a table runs one iteration per triple, at most ns_steps "
            f"(optax refuses a longer one); give at most {ns_steps} triples or "
            f"ns_steps={len(table)}")
    return table


def _shape_scale(rows: int, cols: int, lr_scale: str, rms_scale: float,
                 shape: tuple = ()) -> float:
    if lr_scale == "spectral_last_two":  # the reference: the tensor's own last two axes
        return math.sqrt(max(1.0, shape[-2] / shape[-1]))
    if lr_scale == "spectral":
        return math.sqrt(max(1.0, rows / cols))
    if lr_scale == "rms":
        return rms_scale * math.sqrt(max(rows, cols))
    return 1.0


def _times(value: Any, factor: float) -> Any:
    """A learning rate (a number, a 0-d array or a schedule) times ``factor`` (a number
    or a 0-d array: optax.inject_hyperparams traces it)."""
    if isinstance(factor, (int, float)) and factor == 1:
        return value
    if callable(value) and not hasattr(value, "shape"):
        return lambda count: value(count) * factor
    return value * factor


def _adam_rule(lr, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_eps_placement,
               adam_nesterov, state_dtype) -> Rule:
    from polyopt.rules import adam_family

    common = dict(learning_rate=lr, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                  eps_root=adam_eps_root, weight_decay=0.0, state_dtype=state_dtype)
    if adam_nesterov:
        if adam_eps_placement != "outside":
            raise ValueError(
                f"muon: adam_nesterov=True takes adam_eps_placement='outside' (optax's "
                f"Nesterov Adam), got adam_eps_placement={adam_eps_placement!r}")
        return adam_family.nadam(momentum_schedule=False, **common)
    return adam_family.adamw(eps_placement=adam_eps_placement, **common)


@hyper.MUON.factory
def muon(learning_rate, momentum, nesterov, momentum_form, ns_steps, ns_a, ns_b, ns_c,
         ns_table, eps, preconditioning, eps_placement, lr_scale, rms_scale, adaptive,
         iteration_dtype, weight_decay, muon_params, adam_learning_rate, adam_lr_ratio,
         adam_b1, adam_b2, adam_eps, adam_eps_root, adam_eps_placement, adam_weight_decay,
         adam_nesterov, state_dtype) -> Rule:
    r"""Muon (Jordan et al., 2024): momentum, orthogonalized per matrix by Newton-Schulz.

    .. math::
        \begin{aligned}
        &B_t = \mu B_{t-1} + (1 - \mu) G_t, \quad
         \tilde B_t = \mu B_t + (1 - \mu) G_t \ \text{(nesterov)}\ \text{else}\ B_t\\
        &X_0 = \tilde B_t / (\lVert \tilde B_t \rVert_F + \epsilon), \quad
         X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \ A_k = X_k X_k^T\\
        &\theta_t = \theta_{t-1} - \gamma\,s(\text{rows}, \text{cols})\,X_{n}
            - \gamma \lambda \theta_{t-1}
        \end{aligned}

    Per tensor (``uses_layout``): each Muon param is seen as the matrix
    (output axes, reduction axes) of its layout, so a conv kernel gives the
    same update in torch's (out, in, kh, kw) and Keras's (kh, kw, in, out)
    layouts; a layout with ``batch_axes`` makes it a stack of matrices, each
    orthogonalized alone (optax's unnamed dimension-number axes). Params that
    are not Muon matrices (``muon_params``) take an AdamW step
    (``polyopt.rules.adamw``, or ``rules.nadam(momentum_schedule=False)`` with
    ``adam_nesterov``) with the ``adam_*`` options, as every native's hybrid does.

    Args:
      learning_rate: \gamma (default 0.02, the reference's; torch and Keras 1e-3).
      momentum: \mu in [0, 1) (default 0.95; optax ``beta``).
      nesterov: use \tilde B_t (default True).
      momentum_form: 'ema' (the reference, torch: B = lerp(B, G, 1 - mu)), 'sum'
        (Keras: B = mu B + G, G + mu B: the same matrix times 1/(1 - mu), which
        only eps sees), 'ema_debiased' (optax: B / (1 - mu^t), Nesterov
        mu B / (1 - mu^(t+1)) + (1 - mu) G / (1 - mu^t)).
      ns_steps: Newton-Schulz iterations (default 5).
      ns_a, ns_b, ns_c: the quintic's coefficients (default 3.4445, -4.7750, 2.0315).
      ns_table: the coefficients per iteration instead (optax's ``ns_coeffs``): None
        (default: ns_a, ns_b, ns_c), one triple (a, b, c) for each of the ns_steps
        iterations, or a table of n <= ns_steps triples, row k in iteration k: n
        iterations, as optax runs them (a longer table is refused). optax's names:
        ``ns_coeffs='standard'`` (the default triple) and ``'dion'``
        (``hyper.MUON_DION_TABLE``, Ahn et al.'s five rows).
      eps: \epsilon of the normalization (default 1e-7; optax 1e-8).
      preconditioning: what scales X_0 (optax's ``preconditioning``): 'frobenius'
        (default, every native: the box's), 'spectral' (\lVert \tilde B_t
        \rVert_2, the largest singular value, for the Frobenius norm), 'aol' (no
        normalization; the first iteration scales row i of X_0 by
        1/\sqrt{\max(\sum_j |A_{ij}|, 10^{-8})} and A_0 on both sides: Turbo-Muon)
        or 'schatten' (no normalization; the first iteration scales X_0 by
        1/\sqrt{\max(\lVert A_0 \rVert_F, 10^{-8})}). The 10^{-8} floor is optax's,
        whatever ``eps``. Complex params: A = X X^H throughout (optax 0.2.8's
        'schatten' takes X X^T in its first iteration, which is near 0 for a complex
        X: its update is NaN).
      eps_placement: 'add' (\lVert X \rVert + \epsilon: the reference, Keras, optax)
        or 'clamp' (\max(\lVert X \rVert, \epsilon): torch).
      lr_scale: s: 'spectral' (\sqrt{\max(1, rows/cols)}: torch 'original', optax),
        'spectral_last_two' (the same of the param's own last two axes, not its
        matrix's: the reference, whose conv kernel (out, in, kh, kw) gets
        \sqrt{\max(1, kh/kw)}), 'rms' (rms_scale \sqrt{\max(rows, cols)}: torch
        'match_rms_adamw', Keras, optax consistent_rms) or 'none'.
      rms_scale: the factor of 'rms' (default 0.2).
      adaptive: scale the orthogonalized matrix by <\tilde B_t, X_n> (optax).
      iteration_dtype: the Newton-Schulz dtype: None (the param's) or 'bfloat16'
        (the reference, torch) or 'float32'.
      weight_decay: \lambda, decoupled, times the learning rate (all natives).
      muon_params: which params take the Muon step: 'matrices' (default: 2 or
        more axes), '2d' (exactly 2: Keras, optax), 'all' (torch.optim.Muon: a
        0-d or 1-D param is refused), 'none'. Per param, a layout
        ``NOT_A_MATRIX`` (``layouts=``) gives it to the Adam part whatever its
        axes: Keras's ``exclude_layers`` and ``exclude_embeddings``, optax's
        ``None`` dimension numbers, a torch param group's ``"layout"``.
      adam_learning_rate: the Adam params' learning rate (default 3e-4, the
        reference's; None: learning_rate, as optax and Keras).
      adam_lr_ratio: the Adam step's learning rate is adam_learning_rate times
        this; their weight decay is not (Keras's ``adam_lr_ratio``; default 1).
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_eps_placement: the Adam
        step's (defaults: the reference's 0.9, 0.95, 1e-10).
      adam_weight_decay: decoupled, times the Adam learning rate.
      adam_nesterov: optax's Adam part follows ``nesterov`` (NAdam).
      state_dtype: dtype of the momentum and the Adam moments.

    Returns:
      A :class:`Rule` (``uses_layout``, not elementwise); state
      :class:`MuonState` (count, momentum, adam).

    Examples:
      >>> import numpy as np
      >>> from polyopt import rules
      >>> rule = rules.muon(learning_rate=0.1, nesterov=False, momentum=0.0)
      >>> params = [np.zeros((2, 2))]
      >>> updates, state = rule.update([np.eye(2)], rule.init(params), params)
      >>> bool(np.allclose(updates[0], -0.1 * np.eye(2), atol=0.2))   # ~ -lr * orthogonal
      True

    References:
      Jordan et al., "Muon: An optimizer for hidden layers in neural
      networks", 2024, https://kellerjordan.github.io/posts/muon/ ;
      Liu et al., "Muon is Scalable for LLM Training", 2025,
      https://arxiv.org/abs/2502.16982
    """
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    # the Adam part's decay is applied below, times adam_lr (not times adam_lr_ratio)
    adam = _adam_rule(_times(adam_lr, adam_lr_ratio), adam_b1, adam_b2, adam_eps, adam_eps_root,
                      adam_eps_placement, adam_nesterov, state_dtype)
    coefficients = _coefficients(ns_steps, (ns_a, ns_b, ns_c), ns_table)

    def momentum_shape(shape, layout):
        return shape if is_muon_param(shape, layout, muon_params) else (0,)

    slots = (Slot("momentum", momentum_shape),)

    def placeholders(xp, arrays, layouts):
        """Each Muon param's array replaced by a (0,)-shaped one (the Adam rule's view)."""
        return [xp.zeros((0,), dtype=a.dtype)
                if is_muon_param(tuple(a.shape), layout, muon_params) else a
                for a, layout in zip(arrays, layouts)]

    def check(owner, params, layouts):
        xp = namespace(*params)
        for i, (p, layout) in enumerate(zip(params, layouts)):
            if (iteration_dtype is not None and _base.is_complex(xp, p)
                    and is_muon_param(tuple(p.shape), layout, muon_params)):
                _iteration_dtype(xp, iteration_dtype, p, f"{owner}: params[{i}]")
        if muon_params != "all":
            return
        for i, (p, layout) in enumerate(zip(params, layouts)):
            if p.ndim < 2 or _state.is_not_a_matrix(layout):
                said = "" if p.ndim < 2 else " and its layout NOT_A_MATRIX"
                raise ValueError(
                    f"{owner}: params[{i}] has shape {tuple(p.shape)}{said}: Muon "
                    f"orthogonalizes matrices (2 or more axes); give it to the Adam part "
                    f"(muon_params='matrices') or to another optimizer")

    def extra(xp, params, layouts):
        check("muon.init", params, layouts)
        return (adam.init(placeholders(xp, params, layouts)),)

    def step(xp, grads, params, state, lr_value, layouts):
        check("muon.update", params, layouts)
        kernels = fused(xp)  # torch's own lerp, addmm, sub(alpha=) on torch arrays
        t = None
        updates, moms = [], []
        for i, (g, p) in enumerate(zip(grads, params)):
            if not is_muon_param(tuple(g.shape), layouts[i], muon_params):
                updates.append(None)
                moms.append(state.momentum[i])
                continue
            m = state.momentum[i]
            if momentum_form == "sum":
                m = momentum * m + g
                x = g + momentum * m if nesterov else m
            else:
                m = kernels.lerp(xp, m, g, 1 - momentum, momentum)
                x = kernels.lerp(xp, g, m, momentum, 1 - momentum) if nesterov else m
                if momentum_form == "ema_debiased":
                    if t is None:
                        t = _base.step_number(xp, state.count, g)
                    if nesterov:
                        x = (momentum * m / (1 - momentum ** (t + 1))
                             + (1 - momentum) * g / (1 - momentum ** t))
                    else:
                        x = m / (1 - momentum ** t)
            moms.append(m)
            matrix, back = as_matrix(xp, x, layouts[i])
            o = newton_schulz(xp, matrix, coefficients, eps, eps_placement,
                              _iteration_dtype(xp, iteration_dtype, g), preconditioning)
            o = kernels.row_major(xp, o)
            if o.dtype != g.dtype:
                o = xp.astype(o, g.dtype)
            if adaptive:  # <B, O>, conjugating B (optax)
                o = xp.sum(_conjugate(xp, matrix) * o) * o
            rows, cols = int(matrix.shape[-2]), int(matrix.shape[-1])
            lr = _base.scalar(xp, lr_value, g)
            scale = _shape_scale(rows, cols, lr_scale, rms_scale, tuple(int(d) for d in g.shape))
            u = -(lr * scale) * back(o)
            if not _base.is_zero(weight_decay):
                u = kernels.minus(xp, u, lr * weight_decay, p)
            updates.append(u)
        # the Adam part steps its own params only: a Muon param's (0,)-shaped Adam slots
        # pass through as they are (with no Adam param, one placeholder steps its counts)
        own = [i for i, u in enumerate(updates) if u is None] or [0]
        mine = [layouts[i] for i in own]
        stepped, adam_own = adam.update(placeholders(xp, [grads[i] for i in own], mine),
                                        _state.subset(state.adam, own),
                                        placeholders(xp, [params[i] for i in own], mine))
        muon_ones = [i for i, u in enumerate(updates) if u is not None]  # these win
        adam_state = _state.merge([(own, adam_own)] + (
            [(muon_ones, _state.subset(state.adam, muon_ones))] if muon_ones else []),
            len(grads))
        adam_updates = dict(zip(own, stepped))
        if not _base.is_zero(adam_weight_decay):  # decoupled, times adam_lr
            rate = _base.evaluate(adam_lr, state.count)
            adam_updates = {i: a - (_base.scalar(xp, rate, params[i]) * adam_weight_decay)
                            * params[i] for i, a in adam_updates.items() if updates[i] is None}
        updates = [adam_updates[i] if u is None else u for i, u in enumerate(updates)]
        return updates, (moms, adam_state), 0.0

    return _base.stateful_rule("muon", MuonState, slots, step, learning_rate=learning_rate,
                               weight_decay=0.0, weight_decay_mode="decoupled",
                               state_dtype=state_dtype, scalars=extra, uses_layout=True,
                               elementwise=False, complex_params=True)
