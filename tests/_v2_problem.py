"""The parameters the contract-v2 parity tests run on: a matrix with both
dimensions >= 128, a vector, a 4-D conv kernel and a scalar, and 200 steps of
gradients of a smooth per-step loss (numpy, float64; cast by each test)."""

from __future__ import annotations

import numpy as np

STEPS = 200
SHAPES = [(160, 128), (96,), (3, 3, 8, 16), ()]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def initial(dtype: str, zero: bool = False) -> list[np.ndarray]:
    """The starting params; ``zero``: the vector starts at 0 (trust ratios
    special-case a tensor of norm 0)."""
    rng = np.random.default_rng(11)
    params = [np.asarray(rng.normal(size=s) * 0.5, dtype) for s in SHAPES]
    if zero:
        params[1] = np.zeros_like(params[1])
    return params


def targets(dtype: str) -> list[list[np.ndarray]]:
    """Per step and param, the point the step's quadratic pulls toward; the gradient
    at p is (p - target) * scale, so each optimizer's gradient follows its own params."""
    rng = np.random.default_rng(12)
    return [[np.asarray(rng.normal(size=s), dtype) for s in SHAPES] for _ in range(STEPS)]


def scale(i: int) -> float:
    return (1.0, 2.0, 0.5, 4.0)[i]


def max_rel(a: list, b: list) -> float:
    """max over params of max |a - b| / max |b|."""
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30))
               for x, y in zip(a, b))


def assert_parity(label: str, got: list, want: list, dtype: str,
                  tolerance: float | None = None) -> None:
    """polyopt's params ``got`` within TOLERANCE of the native's ``want``, in
    ``dtype``, and the native moved the params well beyond it. ``tolerance``
    replaces TOLERANCE only where the caller documents a measured reason."""
    assert all(np.asarray(g).dtype == np.dtype(dtype) for g in got)
    worst = max_rel(got, want)
    print(f"\nPARITY {label} | {dtype} | {worst:.2g}")
    assert worst <= (TOLERANCE[dtype] if tolerance is None else tolerance)
    assert max_rel(initial(dtype), want) > 1e-2
