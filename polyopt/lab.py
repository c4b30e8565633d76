r"""The optimizer lab: every rule on two toy functions of two variables.

``python -m polyopt.lab [--out DIR] [--steps N] [--points N] [--quick] [--no-plots]``

The default run (200 steps, 30 learning rates per sweep range) takes about
15 s of CPU; ``--quick`` (60 steps, 8 learning rates) a few seconds.

Runs each optimizer of the zoo, with the learning rate of :data:`LEARNING_RATES`,
from one fixed start point for a fixed number of steps on

(a) ``quadratic``: the ill-conditioned bowl :math:`f(x, y) = 20x^2 + 2y^2`.
    Curvatures 40 and 4 (condition number 10), one minimum f = 0 at the
    origin. Plain gradient descent is stable only for lr < 2/40 = 0.05.
(b) ``local_minima``: :math:`f(x, y) = 2x^2 + 10y^2 + 10\sin(5y)`, exactly as
    the "optimizer zoo" post writes it. It is a bowl in x; along y the sine
    makes four local minima, all on x = 0 (computed here by Newton's method,
    see :data:`LOCAL_MINIMA`):

    ========  ==========  ====================
    y         f           curvature d2f/dy2
    ========  ==========  ====================
    -1.4473    12.793     ~ 256
    -0.2908    -9.086     ~ 268  (global)
     0.8713    -1.782     ~ 252
     2.0120    34.548     ~ 174
    ========  ==========  ====================

    The curvature along y at the minima (20 - 250 sin 5y) is 170-270, so
    plain SGD must use lr below ~0.0075 to settle in any of them.

Both start at :data:`START` = (-2, 2.5): on (b) the start lies on the slope
of the highest minimum (y = 2.01), which plain SGD falls into and stays in,
while momentum and a large-enough adaptive step carry other optimizers over
the ridges to lower minima.

Gradients are analytic, in numpy float64; params are ``[np.array([x, y])]``.
SAM takes its second gradient at ``rule.perturb(params, grads)``.

It writes, into ``--out`` (default ``./lab-output``):

- ``trajectories_<function>.png``: one small panel per optimizer, its path over
  the contours of the function;
- ``lr_sweep_<function>.png``: final ``f - f*`` (log scale, clipped; diverged
  runs drawn at the top) against the learning rate on linear grids: (0, 0.5]
  and (0, 5] for both functions, plus a fine grid around plain SGD's stability
  limit ((0, 0.1] on the quadratic, (0, 0.02] on the local-minima function);
  one row per optimizer family;

and prints a table per function: optimizer, lr, final loss, final point, the
step at which ``f - f*`` first fell below :data:`TOLERANCE`, and the minimum
the run ends in.

Only numpy, matplotlib (imported when the pictures are drawn) and polyopt are
imported.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from polyopt import files, rules

__all__ = [
    "Problem", "Optimizer", "Run", "PROBLEMS", "OPTIMIZERS", "LEARNING_RATES", "START",
    "STABILITY_LIMITS", "SWEEP_RANGES",
    "TOLERANCE", "LOCAL_MINIMA", "run", "sweep", "sweep_grid", "main",
]

START = (-2.0, 2.5)
TOLERANCE = 1e-3
DEFAULT_STEPS = 200
QUICK_STEPS = 60
DEFAULT_SWEEP_POINTS = 30  # per range
QUICK_SWEEP_POINTS = 8
#: The learning-rate grids of the sweeps, (0, high] for each high: the ranges
#: (0, 0.5] and (0, 5] for every function, and a fine one around the stability
#: limit of plain SGD (0.05 on the quadratic, ~0.0075 on the local-minima function).
SWEEP_RANGES = {"quadratic": (0.1, 0.5, 5.0), "local_minima": (0.02, 0.5, 5.0)}
DIVERGED = 1e6  # |x| or |y| beyond this (or non-finite): the run diverged and stops
CLIP_LOW, CLIP_HIGH = 1e-12, 1e4  # f - f* clipped to this band in the sweep plots


# --------------------------------------------------------------------------
# the functions


def _quadratic(x, y):
    return 20.0 * x * x + 2.0 * y * y


def _quadratic_grad(p):
    return np.array([40.0 * p[0], 4.0 * p[1]])


def _local_minima(x, y):
    return 2.0 * x * x + 10.0 * y * y + 10.0 * np.sin(5.0 * y)


def _local_minima_grad(p):
    return np.array([4.0 * p[0], 20.0 * p[1] + 50.0 * np.cos(5.0 * p[1])])


def _minima_along_y() -> list[float]:
    """The y of every minimum of 10y^2 + 10 sin(5y): roots of 20y + 50 cos(5y)
    with positive curvature, bracketed on a grid and polished by Newton.
    (|y| <= 2.5 holds at every root, since |50 cos| <= 50.)"""
    y = np.linspace(-3.0, 3.0, 6001)
    d = 20.0 * y + 50.0 * np.cos(5.0 * y)
    roots = []
    for i in np.nonzero(np.sign(d[:-1]) != np.sign(d[1:]))[0]:
        r = y[i]
        for _ in range(50):
            r -= (20.0 * r + 50.0 * math.cos(5.0 * r)) / (20.0 - 250.0 * math.sin(5.0 * r))
        if 20.0 - 250.0 * math.sin(5.0 * r) > 0:
            roots.append(float(r))
    return roots


#: (x, y) of the local minima of the local-minima function, lowest y first.
LOCAL_MINIMA: list[tuple[float, float]] = [(0.0, y) for y in _minima_along_y()]


@dataclass(frozen=True)
class Problem:
    """A function of (x, y) with its gradient, its minima and a plotting window."""

    name: str
    title: str  # matplotlib mathtext
    text: str  # the same, plain
    f: Callable  # f(x, y), elementwise on arrays
    grad: Callable  # grad(p) for p = np.array([x, y])
    minima: tuple  # ((x, y), ...)
    xlim: tuple
    ylim: tuple
    start: tuple = START

    @property
    def f_min(self) -> float:
        return min(self.f(x, y) for x, y in self.minima)

    def loss(self, p) -> float:
        return float(self.f(p[0], p[1]))


PROBLEMS: dict[str, Problem] = {
    "quadratic": Problem(
        "quadratic", "(a) ill-conditioned quadratic  $f = 20x^2 + 2y^2$",
        "(a) ill-conditioned quadratic  f = 20x^2 + 2y^2",
        _quadratic, _quadratic_grad, ((0.0, 0.0),), (-2.5, 2.5), (-1.5, 3.0)),
    "local_minima": Problem(
        "local_minima", r"(b) local minima  $f = 2x^2 + 10y^2 + 10\sin(5y)$",
        "(b) local minima  f = 2x^2 + 10y^2 + 10 sin(5y)",
        _local_minima, _local_minima_grad, tuple(LOCAL_MINIMA), (-2.5, 2.5), (-2.0, 3.0)),
}


# --------------------------------------------------------------------------
# the optimizers


class Optimizer(NamedTuple):
    name: str
    label: str
    family: str
    make: Callable  # lr -> rule


OPTIMIZERS: list[Optimizer] = [
    Optimizer("sgd", "SGD", "sgd", lambda lr: rules.sgd(learning_rate=lr)),
    Optimizer("momentum", "SGD momentum 0.9", "sgd",
              lambda lr: rules.sgd(learning_rate=lr, momentum=0.9)),
    Optimizer("nesterov", "SGD Nesterov 0.9", "sgd",
              lambda lr: rules.sgd(learning_rate=lr, momentum=0.9, nesterov=True)),
    Optimizer("lookahead", "Lookahead(SGD mom.)", "sgd",
              lambda lr: rules.lookahead(rules.sgd(learning_rate=lr, momentum=0.9))),
    Optimizer("sam", "SAM(SGD) rho 0.05", "sgd",
              lambda lr: rules.sam(rules.sgd(learning_rate=lr))),
    Optimizer("adagrad", "AdaGrad", "adaptive", lambda lr: rules.adagrad(learning_rate=lr)),
    Optimizer("rmsprop", "RMSprop", "adaptive", lambda lr: rules.rmsprop(learning_rate=lr)),
    Optimizer("adadelta", "AdaDelta", "adaptive", lambda lr: rules.adadelta(learning_rate=lr)),
    Optimizer("adam", "Adam", "adam", lambda lr: rules.adam(learning_rate=lr)),
    Optimizer("adamw", "AdamW", "adam", lambda lr: rules.adamw(learning_rate=lr)),
    Optimizer("amsgrad", "AMSGrad", "adam", lambda lr: rules.amsgrad(learning_rate=lr)),
    Optimizer("adamax", "Adamax", "adam", lambda lr: rules.adamax(learning_rate=lr)),
    Optimizer("nadam", "NAdam", "adam", lambda lr: rules.nadam(learning_rate=lr)),
    Optimizer("radam", "RAdam", "adam", lambda lr: rules.radam(learning_rate=lr)),
    Optimizer("ranger", "Ranger", "adam", lambda lr: rules.ranger(learning_rate=lr)),
]
_BY_NAME = {o.name: o for o in OPTIMIZERS}
FAMILIES = {"sgd": "SGD and its wrappers", "adaptive": "AdaGrad, RMSprop, AdaDelta",
            "adam": "the Adam family"}

#: The learning rate of each optimizer on each function (hand-picked: stable on
#: that function and making progress within the default 200 steps; every other
#: hyperparameter is polyopt's default). The sweep pictures show the rest.
#: The adaptive methods use the same lr on both; the SGD family, whose step
#: scales with the gradient, needs a smaller lr on the local-minima function,
#: whose curvature along y reaches ~270 (vs 40).
LEARNING_RATES: dict[str, dict[str, float]] = {
    "quadratic": {
        "sgd": 0.04, "momentum": 0.01, "nesterov": 0.01, "lookahead": 0.01, "sam": 0.02,
        "adagrad": 0.5, "rmsprop": 0.02, "adadelta": 1.0,
        "adam": 0.1, "adamw": 0.1, "amsgrad": 0.1, "adamax": 0.1, "nadam": 0.1,
        "radam": 0.04, "ranger": 0.1,
    },
    "local_minima": {
        "sgd": 0.005, "momentum": 0.002, "nesterov": 0.002, "lookahead": 0.002, "sam": 0.005,
        "adagrad": 0.5, "rmsprop": 0.02, "adadelta": 1.0,
        "adam": 0.1, "adamw": 0.1, "amsgrad": 0.1, "adamax": 0.1, "nadam": 0.1,
        "radam": 0.04, "ranger": 0.1,
    },
}


#: Theory for the quadratic (largest curvature L = 40, momentum m = 0.9): the
#: learning rate above which each gradient-scaled method diverges. Gradient
#: descent: 2/L. Heavy ball (torch buffer b = m b + g, p -= lr b): 2(1+m)/L.
#: Nesterov (p -= lr (g + m b)): 2(1+m)/((1+2m) L). The sweep finds them.
STABILITY_LIMITS: dict[str, float] = {
    "sgd": 2 / 40, "momentum": 2 * 1.9 / 40, "nesterov": 2 * 1.9 / (2.8 * 40),
}


# --------------------------------------------------------------------------
# running


@dataclass
class Run:
    """One optimizer's run: the points visited (start included) and their losses."""

    optimizer: str
    problem: str
    learning_rate: float
    points: np.ndarray  # (n + 1, 2)
    losses: np.ndarray  # (n + 1,)
    diverged: bool
    f_min: float = 0.0
    steps: int = 0  # steps asked for (a diverged run stops early)

    @property
    def final_point(self) -> np.ndarray:
        return self.points[-1]

    @property
    def final_loss(self) -> float:
        return math.inf if self.diverged else float(self.losses[-1])

    @property
    def gap(self) -> float:
        """final f - f* (inf when diverged)."""
        return self.final_loss - self.f_min

    def steps_to(self, tolerance: float = TOLERANCE) -> int | None:
        """The first step after which f - f* < tolerance, or None."""
        hit = np.nonzero(self.losses - self.f_min < tolerance)[0]
        return int(hit[0]) if hit.size else None


def run(optimizer: str | Optimizer, problem: str | Problem, learning_rate: float | None = None,
        steps: int = DEFAULT_STEPS, start: Sequence[float] | None = None) -> Run:
    """Run one optimizer on one problem; learning_rate defaults to LEARNING_RATES.

    A run that leaves the box |x|, |y| < 1e6 (or reaches nan) is marked
    diverged and stops there.

    Examples:
      >>> r = run("sgd", "quadratic", steps=50)          # lr 0.04 < 2/L = 0.05
      >>> r.diverged, r.gap < 1e-6, r.steps_to()
      (False, True, 28)
      >>> run("sgd", "quadratic", learning_rate=0.06).diverged
      True
      >>> run("momentum", "local_minima").final_point.round(4).tolist()
      [0.0, -0.2908]
    """
    opt = _BY_NAME[optimizer] if isinstance(optimizer, str) else optimizer
    prob = PROBLEMS[problem] if isinstance(problem, str) else problem
    lr = LEARNING_RATES[prob.name][opt.name] if learning_rate is None else float(learning_rate)
    rule = opt.make(lr)
    is_sam = isinstance(rule, rules.SAMRule)
    params = [np.array(prob.start if start is None else start, dtype=np.float64)]
    state = rule.init(params)
    points = [params[0]]
    diverged = False
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            grads = [prob.grad(params[0])]
            if is_sam:
                grads = [prob.grad(rule.perturb(params, grads)[0])]
            updates, state = rule.update(grads, state, params)
            params = [p + u for p, u in zip(params, updates)]
            x, y = params[0].tolist()
            if not (abs(x) < DIVERGED and abs(y) < DIVERGED):  # False for nan too
                diverged = True
                break
            points.append(params[0])
    points = np.array(points)
    losses = prob.f(points[:, 0], points[:, 1])
    return Run(opt.name, prob.name, lr, points, losses, diverged, prob.f_min, steps)


def sweep_grid(high: float, points: int = DEFAULT_SWEEP_POINTS) -> np.ndarray:
    """``points`` learning rates evenly spaced on (0, high] (lr = 0 does nothing)."""
    return np.linspace(0.0, high, points + 1)[1:]


def sweep(problem: str | Problem, learning_rates: Sequence[float], steps: int = DEFAULT_STEPS,
          optimizers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Final f - f* of each optimizer at each learning rate (inf when diverged)."""
    names = [o.name for o in OPTIMIZERS] if optimizers is None else list(optimizers)
    return {name: np.array([run(name, problem, lr, steps).gap for lr in learning_rates])
            for name in names}


# --------------------------------------------------------------------------
# the table


def _nearest_minimum(prob: Problem, point) -> str:
    if len(prob.minima) == 1:
        return "-"
    dist = [math.hypot(point[0] - x, point[1] - y) for x, y in prob.minima]
    i = int(np.argmin(dist))
    if dist[i] > 0.05:
        return "none (moving)"
    x, y = prob.minima[i]
    tag = "global" if prob.f(x, y) == prob.f_min else "local"
    return f"{tag} y={y:+.2f}"


def table(prob: Problem, runs: Sequence[Run]) -> str:
    head = (f"{'optimizer':21s} {'lr':>6s} {'final f':>11s} {'f - f*':>9s} "
            f"{'final (x, y)':>21s} {'steps to f-f*<' + format(TOLERANCE, 'g'):>17s}  ends at")
    lines = [head, "-" * len(head)]
    for r in runs:
        label = _BY_NAME[r.optimizer].label
        if r.diverged:
            lines.append(f"{label:21s} {r.learning_rate:6g} {'diverged':>11s} {'inf':>9s} "
                         f"{'-':>21s} {'-':>17s}  -")
            continue
        x, y = r.final_point
        hit = r.steps_to()
        lines.append(
            f"{label:21s} {r.learning_rate:6g} {r.final_loss:11.4g} {r.gap:9.2e} "
            f"{f'({x:+.4f}, {y:+.4f})':>21s} {'-' if hit is None else str(hit):>17s}  "
            f"{_nearest_minimum(prob, r.final_point)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# pictures


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "polyopt.lab draws its pictures with matplotlib, which is not installed: "
            "pip install polyopt[lab]  (or run with --no-plots for the table only)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",   # sgd family
            "#8c564b", "#e377c2", "#555555",                            # adaptive
            "#bcbd22", "#17becf", "#1a1a80", "#b8860b", "#006d5b", "#c51b7d", "#7f2704"]


def _colors(plt) -> dict[str, str]:
    """One strong colour per optimizer, the same in every picture."""
    return {o.name: _PALETTE[i % len(_PALETTE)] for i, o in enumerate(OPTIMIZERS)}


def _background(prob: Problem, n: int = 200):
    """(X, Y, f - f*) on an n x n grid over the plotting window."""
    X, Y = np.meshgrid(np.linspace(*prob.xlim, n), np.linspace(*prob.ylim, n))
    return X, Y, prob.f(X, Y) - prob.f_min


def _contours(ax, prob: Problem, background) -> None:
    X, Y, Z = background
    # shade by log(f - f*), light at the minimum; contour lines on a log scale
    ax.imshow(np.log10(Z + 0.05), extent=(*prob.xlim, *prob.ylim), origin="lower",
              cmap="Greys", alpha=0.45, aspect="auto", interpolation="bilinear")
    ax.contour(X, Y, Z, levels=np.geomspace(0.05, float(Z.max()), 18), colors="0.45",
               linewidths=0.4)
    for mx, my in prob.minima:
        best = prob.f(mx, my) == prob.f_min
        ax.plot(mx, my, marker="*" if best else "o", ms=9 if best else 4,
                color="gold" if best else "white", mec="black", mew=0.6, zorder=5)
    ax.set_xlim(*prob.xlim)
    ax.set_ylim(*prob.ylim)
    ax.set_aspect("equal")


def plot_trajectories(prob: Problem, runs: Sequence[Run], path: str) -> None:
    plt = _pyplot()
    colors = _colors(plt)
    ncols = 5
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.3 * nrows + 0.6),
                             sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    background = _background(prob)
    for ax, r in zip(axes.flat, runs):
        _contours(ax, prob, background)
        pts = r.points
        ax.plot(pts[:, 0], pts[:, 1], "-", color=colors[r.optimizer], lw=1.3, zorder=3)
        ax.plot(pts[:, 0], pts[:, 1], ".", color=colors[r.optimizer], ms=2.5, zorder=3)
        ax.plot(*pts[0], "o", color="tab:red", ms=5, mec="black", mew=0.5, zorder=6)
        if not r.diverged:
            ax.plot(*pts[-1], "X", color=colors[r.optimizer], ms=8, mec="black", mew=0.7,
                    zorder=6)
        if r.diverged:
            end = "diverged"
        else:
            end = f"f-f* {r.gap:.1e}"
            where = _nearest_minimum(prob, r.final_point)
            if where != "-":
                end += f", {where}"
        ax.set_title(f"{_BY_NAME[r.optimizer].label}\nlr {r.learning_rate:g}, {end}",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    steps = max(r.steps for r in runs)
    fig.suptitle(f"{prob.title}: {steps} steps from {prob.start} (red dot)\n"
                 f"X = end point; star = global minimum"
                 + ("; white dots = other local minima" if len(prob.minima) > 1 else ""),
                 fontsize=11)
    fig.subplots_adjust(left=0.035, right=0.99, bottom=0.035, top=0.885, wspace=0.1, hspace=0.3)
    files.write_to(path, fig.savefig, format="png", dpi=90)
    plt.close(fig)


def plot_sweep(prob: Problem, grids: Sequence[np.ndarray], results: Sequence[dict],
               steps: int, path: str) -> None:
    plt = _pyplot()
    colors = _colors(plt)
    families = list(FAMILIES)
    styles = ["-", "--", "-.", ":"]
    markers = "osD^v<>"
    fig, axes = plt.subplots(len(families), len(grids), figsize=(4.6 * len(grids) + 1.4,
                                                                 3.3 * len(families)),
                             squeeze=False, sharey=True)
    start_gap = prob.f(*prob.start) - prob.f_min
    local_minima = [((x, y), prob.f(x, y) - prob.f_min) for x, y in prob.minima
                    if prob.f(x, y) != prob.f_min]
    for col, (grid, res) in enumerate(zip(grids, results)):
        for row, fam in enumerate(families):
            ax = axes[row, col]
            members = [o for o in OPTIMIZERS if o.family == fam and o.name in res]
            for i, o in enumerate(members):
                gaps = res[o.name]
                shown = np.clip(np.where(np.isfinite(gaps), gaps, CLIP_HIGH), CLIP_LOW, CLIP_HIGH)
                ax.plot(grid, shown, styles[i % len(styles)], marker=markers[i % len(markers)],
                        ms=3, lw=1.2, color=colors[o.name], label=o.label)
                bad = ~np.isfinite(gaps) | (gaps >= CLIP_HIGH)
                if bad.any():
                    ax.plot(grid[bad], np.full(bad.sum(), CLIP_HIGH), "x", color=colors[o.name],
                            ms=6, mew=1.5)
            ax.axhline(start_gap, color="tab:red", lw=0.8, ls=":")
            for _, g in local_minima:
                ax.axhline(g, color="0.5", lw=0.6, ls="--")
            if prob.name == "quadratic" and fam == "sgd" and grid[-1] <= 0.2:
                for name, limit in STABILITY_LIMITS.items():
                    ax.axvline(limit, color=colors[name], lw=0.9, ls=":")
                fig.text(0.07, 0.005, "vertical dotted lines, top left: the stability limits "
                         "in theory (L = 40, m = 0.9): SGD 2/L = 0.05, heavy ball 2(1+m)/L = "
                         "0.095, Nesterov 2(1+m)/((1+2m)L) = 0.034", fontsize=8, va="bottom")
            ax.set_yscale("log")
            ax.set_ylim(CLIP_LOW / 3, CLIP_HIGH * 5)
            ax.set_xlim(0, grid[-1] * 1.01)
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(f"lr in (0, {grid[-1]:g}]", fontsize=10)
            if row == len(families) - 1:
                ax.set_xlabel("learning rate")
            if col == 0:
                ax.set_ylabel(f"final f - f*\n({FAMILIES[fam]})", fontsize=9)
            if col == len(grids) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    extra = "; grey dashes: f - f* at the local minima" if local_minima else ""
    fig.suptitle(f"{prob.title}: final f - f* after {steps} steps vs learning rate\n"
                 f"clipped to [{CLIP_LOW:g}, {CLIP_HIGH:g}]; x at the top = diverged; "
                 f"red dots: f - f* at the start{extra}", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.85, bottom=0.07, top=0.9, wspace=0.12, hspace=0.12)
    files.write_to(path, fig.savefig, format="png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polyopt.lab",
        description="The optimizer lab: every polyopt rule on two toy functions; "
                    "prints a table and writes trajectory and learning-rate sweep pictures.")
    parser.add_argument("--out", default="lab-output",
                        help="directory for the pictures (default ./lab-output, created)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per run (default {DEFAULT_STEPS}; "
                             f"{QUICK_STEPS} with --quick)")
    parser.add_argument("--points", type=int, default=None,
                        help=f"learning rates per sweep range (default {DEFAULT_SWEEP_POINTS}; "
                             f"{QUICK_SWEEP_POINTS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sweep points")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    points = args.points if args.points is not None else (
        QUICK_SWEEP_POINTS if args.quick else DEFAULT_SWEEP_POINTS)
    if steps < 1 or points < 1:
        parser.error("--steps and --points must be at least 1")
    if not args.no_plots:
        try:
            _pyplot()
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        os.makedirs(args.out, exist_ok=True)

    began = time.perf_counter()
    written = []
    for prob in PROBLEMS.values():
        runs = [run(o, prob, steps=steps) for o in OPTIMIZERS]
        print(f"\n{prob.text}\n  start {prob.start}, {steps} steps, "
              f"f* = {prob.f_min:.6g}")
        print(table(prob, runs))
        if args.no_plots:
            continue
        grids = [sweep_grid(high, points) for high in SWEEP_RANGES[prob.name]]
        results = [sweep(prob, grid, steps) for grid in grids]
        path = os.path.join(args.out, f"trajectories_{prob.name}.png")
        plot_trajectories(prob, runs, path)
        written.append(path)
        path = os.path.join(args.out, f"lr_sweep_{prob.name}.png")
        plot_sweep(prob, grids, results, steps, path)
        written.append(path)
    print(f"\n{len(written)} pictures written to {os.path.abspath(args.out)}:" if written
          else "\nno pictures (--no-plots)")
    for path in written:
        print(f"  {path}")
    print(f"({time.perf_counter() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
