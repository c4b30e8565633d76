"""The optimizer lab (python -m polyopt.lab): it runs, draws, and its numbers
say what the theory and the pictures say.

The command-line tests run the lab in a subprocess (as nox's ``lab`` session
does); the numeric tests call it in-process with the lab's own learning rates
and step count, so that a change to a rule that changes the story of the
pictures fails here.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyopt import lab

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PICTURES = [f"{kind}_{problem}.png" for problem in ("quadratic", "local_minima")
            for kind in ("trajectories", "lr_sweep")]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLCONFIGDIR", str(tmp_path / "mplconfig"))
    return env


def _python(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------
# the command


def test_quick_run_writes_pictures_and_prints_table(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pictures"
    proc = _python(tmp_path, "-m", "polyopt.lab", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in PICTURES:
        path = out / name
        assert path.is_file(), f"{name} not written; stdout:\n{proc.stdout}"
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 20_000, f"{name} is only {len(data)} bytes"
        assert str(path) in proc.stdout or name in proc.stdout
    text = proc.stdout
    assert "final f" in text and "steps to f-f*<" in text
    for opt in lab.OPTIMIZERS:  # one row per function: label, then the lr
        rows = re.findall(rf"^{re.escape(opt.label)}\s+\d[\d.e+-]*\s", text, re.MULTILINE)
        assert len(rows) == 2, (opt.label, text)
    assert "(a) ill-conditioned quadratic" in text and "(b) local minima" in text
    assert f"written to {out}" in text


def test_default_out_dir_and_steps_flag(tmp_path):
    pytest.importorskip("matplotlib")
    proc = _python(tmp_path, "-m", "polyopt.lab", "--steps", "5", "--points", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "lab-output").iterdir()) == sorted(PICTURES)
    assert "5 steps" in proc.stdout


def test_importing_the_lab_imports_no_framework_and_no_matplotlib(tmp_path):
    proc = _python(tmp_path, "-c", (
        "import sys, polyopt.lab\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'jax', 'jaxlib', 'tensorflow', 'keras', 'optax', 'matplotlib'))\n"
        "print(bad)\n"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "never"
    assert lab.main(["--quick", "--out", str(out)]) == 2
    assert "pip install polyopt[lab]" in capsys.readouterr().err
    assert not out.exists()
    # the table alone needs no matplotlib
    assert lab.main(["--quick", "--no-plots", "--out", str(out)]) == 0
    assert "final f" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--steps", "--points"])
def test_bad_counts_are_refused(flag):
    with pytest.raises(SystemExit) as e:
        lab.main([flag, "0", "--no-plots"])
    assert e.value.code == 2


# --------------------------------------------------------------------------
# the numbers


def _start_gap(problem: str) -> float:
    prob = lab.PROBLEMS[problem]
    return prob.f(*prob.start) - prob.f_min


def test_every_optimizer_makes_progress_on_the_quadratic():
    start = _start_gap("quadratic")  # 92.5
    for opt in lab.OPTIMIZERS:
        r = lab.run(opt.name, "quadratic")
        assert not r.diverged, opt.name
        assert len(r.points) == lab.DEFAULT_STEPS + 1
        if opt.name == "adadelta":
            # AdaDelta at its paper lr 1.0 starts with steps ~sqrt(eps): slow, but downhill
            assert r.gap < start / 2, r.gap
        else:
            assert r.gap < 1e-3 * start, (opt.name, r.gap)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_sweep_finds_the_theoretical_stability_limit(name):
    """Below the limit (L = 40) the method converges, above it it diverges."""
    limit = lab.STABILITY_LIMITS[name]
    lrs = np.round(np.arange(limit - 0.01, limit + 0.01, 0.0005), 6)
    gaps = lab.sweep("quadratic", lrs, optimizers=[name])[name]
    start = _start_gap("quadratic")
    below, above = lrs <= limit - 0.001, lrs >= limit + 0.002
    assert np.all(gaps[below] < 1e-3 * start), (lrs[below], gaps[below])
    assert np.all(gaps[above] > start), (lrs[above], gaps[above])
    # and the limits are the numbers the pictures quote
    assert lab.STABILITY_LIMITS["sgd"] == pytest.approx(0.05)
    assert lab.STABILITY_LIMITS["momentum"] == pytest.approx(0.095)
    assert lab.STABILITY_LIMITS["nesterov"] == pytest.approx(0.0339, abs=1e-4)


def test_sam_takes_the_second_gradient_at_the_perturbed_point():
    """With the ascent step, SAM(SGD) hovers at the radius-rho shell instead of
    converging like plain SGD at the same lr (the same update on the same
    gradient would give identical points)."""
    sgd = lab.run("sgd", "quadratic", learning_rate=0.02)
    sam = lab.run("sam", "quadratic", learning_rate=0.02)
    assert sgd.gap < 1e-10
    assert 1e-4 < sam.gap < 0.1
    assert np.linalg.norm(sam.final_point) < 0.1


def test_the_local_minima_function_has_four_minima():
    ys = [y for _, y in lab.LOCAL_MINIMA]
    assert ys == pytest.approx([-1.4473, -0.2908, 0.8713, 2.0120], abs=1e-4)
    prob = lab.PROBLEMS["local_minima"]
    for x, y in lab.LOCAL_MINIMA:
        assert np.abs(prob.grad(np.array([x, y]))).max() < 1e-9
        assert 20 - 250 * math.sin(5 * y) > 0  # curvature along y
    assert prob.f_min == pytest.approx(-9.0862, abs=1e-4)
    assert prob.f(0.0, -0.2908) == pytest.approx(prob.f_min, abs=1e-4)
    # nothing on a fine grid of the plotting window is lower
    X, Y = np.meshgrid(np.linspace(-2.5, 2.5, 501), np.linspace(-2.0, 3.0, 2001))
    assert prob.f(X, Y).min() >= prob.f_min - 1e-12


def test_plain_sgd_is_trapped_where_momentum_escapes():
    """From the start (-2, 2.5), SGD at every lr below its stability limit on
    this function (~2/270) falls into the nearest minimum, y = 2.01; heavy-ball
    momentum at the lab's lr carries over the ridges to the global minimum,
    and Adam at least out of the first trap."""
    for lr in (0.0005, 0.001, 0.002, 0.004, lab.LEARNING_RATES["local_minima"]["sgd"], 0.007):
        r = lab.run("sgd", "local_minima", learning_rate=lr)
        assert not r.diverged
        assert abs(r.final_point[1] - 2.0120) < 0.01, (lr, r.final_point)
        assert r.gap > 40
    for name in ("momentum", "lookahead"):
        r = lab.run(name, "local_minima")
        assert r.gap < 1e-6, (name, r.final_point)
        assert r.steps_to() is not None
    adam = lab.run("adam", "local_minima")
    assert abs(adam.final_point[1] - 0.8713) < 0.01  # one ridge over, not two
