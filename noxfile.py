"""nox sessions for polyopt.

    nox -s tests                 # the test suite (the default session; CI runs it)
    nox -s tests -- -k adam -x   # arguments after -- go to every pytest run
    nox -s lab -- --quick        # the optimizer lab: numpy + matplotlib only, no framework
    nox -s lint                  # ruff
    nox -s conformance           # the frameworks' own optimizer tests against polyopt
    nox -s distributed           # every optimizer sharded: torch FSDP2, JAX meshes, Keras
    nox -s torch tf jax compare  # the cross-framework matrix, then the agreement check
    nox -s torch tf jax compare -- --quick   # a few dozen steps per run
    nox -s bench                 # optimizer step benchmarks, one process per framework
    nox -s bench -- --sets resnet20-wide   # arguments after -- go to every script

Every install goes through constraints.txt, which pins the CPU build of torch
(a plain `pip install torch` would fetch a multi-GB CUDA build).

Environment of the tests session:

POLYOPT_FRAMEWORKS
    Frameworks under test in the main pytest run (default ``numpy,torch,jax``;
    numpy and array_api_strict are always tested). See tests/conftest.py.
POLYOPT_KERAS_BACKENDS
    Keras backends, one pytest process each, for the tests marked ``keras``
    (default ``tensorflow,jax,torch``; empty to skip them).
POLYOPT_TEST_LANES
    2 (default): the Keras processes run one after another beside the main
    run; 1: everything one after another.

torch and tensorflow must never share a process (it can segfault), so the
main run deselects the ``keras`` tests and runs with KERAS_BACKEND=jax, and
each Keras backend gets its own pytest process. Caches (matplotlib,
torch.compile, Keras config) live inside .nox, never in $HOME.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ROOT / "constraints.txt"

DEFAULT_FRAMEWORKS = "numpy,torch,jax"
DEFAULT_KERAS_BACKENDS = "tensorflow,jax,torch"
PYTEST_NO_TESTS_COLLECTED = 5

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "virtualenv"
nox.options.error_on_external_run = True
# Reuse environments locally (fast re-runs); CI always builds them anew
# (.ci/run also passes --reuse-venv=never).
nox.options.reuse_venv = "no" if os.environ.get("CI") else "yes"


def _install(session: nox.Session, *args: str) -> None:
    session.install("-c", str(CONSTRAINTS), *args)


def _base_env(session: nox.Session) -> dict[str, str]:
    """Environment shared by every session: caches inside the build area."""
    cache = Path(session.create_tmp()) / "cache"
    dirs = {
        "MPLCONFIGDIR": cache / "matplotlib",
        "TORCHINDUCTOR_CACHE_DIR": cache / "torchinductor",
        "KERAS_HOME": cache / "keras",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {name: str(path) for name, path in dirs.items()}
    env["RUFF_CACHE_DIR"] = str(cache / "ruff")
    env["MPLBACKEND"] = "Agg"
    # Explicit, and never tensorflow by accident: a process that also holds
    # torch must not import tensorflow through Keras's default backend.
    env["KERAS_BACKEND"] = "jax"
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _collect(session: nox.Session, marker: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """What ``pytest -m marker`` (plus posargs) selects: (test count, test files).

    Returns (-1, []) under ``nox --install-only``, where nothing runs.
    """
    output = session.run(
        "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker,
        *session.posargs, env=env, silent=True, success_codes=[0, PYTEST_NO_TESTS_COLLECTED],
    )
    if not isinstance(output, str):
        return -1, []
    files = sorted({
        line.split("::", 1)[0] for line in output.splitlines()
        if "::" in line and line.split("::", 1)[0].endswith(".py")
    })
    for line in reversed(output.splitlines()):
        found = re.match(r"(?:no tests|(\d+)(?:/\d+)? tests?) collected\b", line.strip())
        if found:
            return int(found.group(1) or 0), files
    session.error(f"cannot read pytest's collection summary:\n{output}")


class _KerasLane(threading.Thread):
    """The Keras pytest processes, one after another, in the background of the
    main run; their output goes to ``log``; ``failed`` names the backends
    whose run did not pass (pytest's exit code 5, no tests, included)."""

    def __init__(self, session: nox.Session, runs: list, log: Path) -> None:
        super().__init__(daemon=True)
        self.runs, self.log, self.failed = runs, log, []
        self.path = session.bin + os.pathsep + os.environ.get("PATH", "")
        self.virtualenv = session.virtualenv.location

    def run(self) -> None:
        with open(self.log, "w") as out:
            for backend, command, env in self.runs:
                out.write(f"nox > Keras tests, KERAS_BACKEND={backend}\n")
                out.flush()
                full_env = {**os.environ, **env, "PATH": self.path,
                            "VIRTUAL_ENV": self.virtualenv}
                code = subprocess.call(command, env=full_env, stdout=out,
                                       stderr=subprocess.STDOUT)
                if code != 0:
                    out.write(f"nox > KERAS_BACKEND={backend}: pytest exited with {code}\n")
                    self.failed.append(backend)


#: the tests session's two selections; the every-optimizer distributed matrix
#: (marked ``distributed``) has its own session
MAIN, KERAS = "not keras and not distributed", "keras and not distributed"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite: the main run and, beside it, one process per Keras
    backend (POLYOPT_TEST_LANES=1: one after another)."""
    started = time.monotonic()
    _install(session, "-e", ".[all,dev]")
    session.log(f"installed in {time.monotonic() - started:.0f} s")
    env = _base_env(session)
    env["POLYOPT_FRAMEWORKS"] = os.environ.get("POLYOPT_FRAMEWORKS", DEFAULT_FRAMEWORKS)
    backends = _split(os.environ.get("POLYOPT_KERAS_BACKENDS", DEFAULT_KERAS_BACKENDS))
    keras_env = {**env, "POLYOPT_FRAMEWORKS": "keras"}

    # Count first, so that an empty selection is an explicit decision: a run
    # whose selections are all empty fails; a legitimately empty one (no test
    # is marked keras yet, or posargs pick Keras tests only) is not started.
    # Collecting the Keras tests runs with KERAS_BACKEND=jax: no tensorflow.
    main_count, _ = _collect(session, MAIN, env)
    keras_count, keras_files = _collect(session, KERAS, keras_env) if backends else (0, [])
    if main_count < 0:  # nox --install-only
        return
    session.log(f"selected: {main_count} tests in the main run, {keras_count} Keras tests "
                f"x {len(backends)} backends ({','.join(backends) or 'none'})")
    if main_count == 0 and keras_count == 0:
        session.error("no test selected: nothing would be tested")

    # Only the files that hold Keras tests are imported: a tensorflow process
    # never imports the torch test modules.
    files = [f for f in keras_files if f not in session.posargs]
    keras_runs = [(backend, ["pytest", "-m", KERAS, *session.posargs, *files],
                   {**keras_env, "KERAS_BACKEND": backend})
                  for backend in (backends if keras_count else [])]
    lanes = int(os.environ.get("POLYOPT_TEST_LANES", "2"))
    if lanes > 1 and main_count and keras_runs:
        # Two lanes: the Keras processes (one after another) beside the main
        # run, each its own process as always; on 2 cores this nearly halves the
        # wall time. The Keras lane's output is shown when it ends.
        log = Path(session.create_tmp()) / "keras-lane.log"
        lane = _KerasLane(session, keras_runs, log)
        lane.start()
        try:
            session.run("pytest", "-m", MAIN, *session.posargs, env=env)
        finally:
            lane.join()
            print(log.read_text(), flush=True)
        if lane.failed:
            session.error(f"Keras tests failed: {', '.join(lane.failed)} (output above)")
    else:
        if main_count:
            # pytest's exit code 5 (no tests ran) fails the session here.
            session.run("pytest", "-m", MAIN, *session.posargs, env=env)
        for backend, command, run_env in keras_runs:
            session.log(f"Keras tests, KERAS_BACKEND={backend}")
            session.run(*command, env=run_env)
    session.log(f"tests session done in {time.monotonic() - started:.0f} s")


@nox.session
def distributed(session: nox.Session) -> None:
    """The every-optimizer distributed matrix (docs/distributed.md): torch FSDP2 / DDP /
    DCP over gloo and JAX meshes over host devices in one pytest run, the Keras
    distribution API (JAX backend) in another. Not part of `tests`, which runs a
    representative few of these settings."""
    started = time.monotonic()
    _install(session, "-e", ".[all,dev]")
    env = _base_env(session)
    env["POLYOPT_FRAMEWORKS"] = DEFAULT_FRAMEWORKS
    env["JAX_PLATFORMS"] = "cpu"
    keras_env = {**env, "POLYOPT_FRAMEWORKS": "keras", "KERAS_BACKEND": "jax"}
    counts = {marker: _collect(session, marker, run_env)
              for marker, run_env in (("distributed and not keras", env),
                                      ("distributed and keras", keras_env))}
    if any(count < 0 for count, _ in counts.values()):  # nox --install-only
        return
    if not any(count for count, _ in counts.values()):
        session.error("no distributed test selected: nothing would be tested")
    for (marker, (count, files)), run_env in zip(counts.items(), (env, keras_env)):
        if count:
            session.run("pytest", "-m", marker, *session.posargs,
                        *(files if "keras" in run_env["POLYOPT_FRAMEWORKS"] else []),
                        env=run_env)
    session.log(f"distributed session done in {time.monotonic() - started:.0f} s")


@nox.session
def conformance(session: nox.Session) -> None:
    """The frameworks' own optimizer tests against polyopt (docs/conformance.md): the
    test files of the optax and Keras wheels and torch's optimizer database, one
    process per suite. Offline; not part of `tests`. Arguments after -- go to
    `python -m conformance` (suite names, --update, -- pytest arguments)."""
    started = time.monotonic()
    _install(session, "-e", ".[all,dev,conformance]")
    env = _base_env(session)  # each suite sets its own KERAS_BACKEND (conformance/suite.py)
    env["JAX_PLATFORMS"] = "cpu"
    session.run("python", "-m", "conformance", *session.posargs, env=env)
    session.log(f"conformance session done in {time.monotonic() - started:.0f} s")


@nox.session
def lab(session: nox.Session) -> None:
    """The optimizer lab, with numpy and matplotlib only (no framework installed)."""
    _install(session, "-e", ".[lab]")
    session.run("python", "-m", "polyopt.lab", *session.posargs, env=_base_env(session))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (configuration in pyproject.toml)."""
    _install(session, "ruff")
    session.run("ruff", "check", *(session.posargs or ["."]), env=_base_env(session))


# ---------------------------------------------------------------------------
# The cross-framework matrix: one session per framework, each in its own
# environment holding only that framework (torch and tensorflow never meet),
# writing run records to ./runs; `compare` reads them all. Arguments after --
# go to examples.matrix (--quick, --full, --epochs N, --experiments a,b, --data-dir DIR).

MATRIX_EXTRAS = {"torch": "torch", "tf": "tf", "jax": "jax"}
RUNS_DIR = "runs"
ARITHMETIC_DIR = "runs-arithmetic"


def _matrix_env(session: nox.Session, framework: str) -> dict[str, str]:
    env = _base_env(session)
    env["KERAS_BACKEND"] = "tensorflow" if framework == "tf" else "jax"
    env["JAX_PLATFORMS"] = "cpu"  # no accelerator probing (and no warnings about it)
    return env


def _matrix(session: nox.Session, framework: str) -> None:
    _install(session, "-e", f".[{MATRIX_EXTRAS[framework]},examples]")
    session.run("python", "-m", "examples.matrix", "--framework", framework,
                "--runs-dir", RUNS_DIR, *session.posargs, env=_matrix_env(session, framework))


@nox.session(name="torch")
def matrix_torch(session: nox.Session) -> None:
    """The experiment set in PyTorch (run records in ./runs)."""
    _matrix(session, "torch")


@nox.session(name="tf")
def matrix_tf(session: nox.Session) -> None:
    """The experiment set in Keras 3 on TensorFlow (run records in ./runs)."""
    _matrix(session, "tf")


@nox.session(name="jax")
def matrix_jax(session: nox.Session) -> None:
    """The experiment set in JAX (run records in ./runs)."""
    _matrix(session, "jax")


@nox.session
def compare(session: nox.Session) -> None:
    """Agreement table and overlay plots of ./runs; fails when frameworks disagree."""
    _install(session, "-e", ".[lab]")
    session.run("python", "-m", "polyopt.consistency", RUNS_DIR,
                "--markdown", f"{RUNS_DIR}/agreement.md",
                env=_base_env(session))


@nox.session
def arithmetic(session: nox.Session) -> None:
    """The float32 matrix under changed arithmetic (one thread, oneDNN off, XLA fast-math),
    each framework in its own environment, then the verdict of every mix with the default
    runs of ./runs (run the main command first). Long: about two main commands."""
    for framework in MATRIX_EXTRAS:
        _install(session, "-e", f".[{MATRIX_EXTRAS[framework]},examples]")
    # one environment holds all three frameworks' extras; each run is its own process
    for profile, frameworks in (("strict", MATRIX_EXTRAS), ("xla-fast-math", ["jax"])):
        for framework in frameworks:
            session.run("python", "-m", "examples.matrix", "--framework", framework,
                        "--float32-only", "--arithmetic", profile,
                        "--runs-dir", f"{ARITHMETIC_DIR}/{profile}", *session.posargs,
                        env=_matrix_env(session, framework))
    session.run("python", "-m", "examples.robustness", RUNS_DIR, ARITHMETIC_DIR,
                "--markdown", f"{ARITHMETIC_DIR}/robustness.md", env=_base_env(session))


# ---------------------------------------------------------------------------
# Benchmarks (not tests): one process per framework.

#: framework -> (pyproject extra, script, extra environment). One process each
#: (torch and tensorflow never share one); a missing script is skipped with a message.
BENCHMARKS = {
    "torch": ("torch", "benchmarks/bench_torch.py", {}),
    "jax": ("jax", "benchmarks/bench_jax.py", {}),
    "keras": ("tf", "benchmarks/bench_keras.py", {"KERAS_BACKEND": "tensorflow"}),
    # epoch time of the CIFAR CNN, one process per framework (arguments after
    # the environment go to the script; the data: the CIFAR-10 subset shipped in examples/data)
    "epoch-torch": ("torch", "benchmarks/bench_epoch.py", {}, "--framework", "torch"),
    "epoch-tf": ("tf", "benchmarks/bench_epoch.py", {"KERAS_BACKEND": "tensorflow"},
                 "--framework", "tf"),
    "epoch-jax": ("jax", "benchmarks/bench_epoch.py", {}, "--framework", "jax"),
    # bytes of optimizer state per rule, polyopt next to the natives (one table,
    # benchmarks/results/memory.md, from the three memory-*.json)
    "memory-torch": ("torch", "benchmarks/bench_memory.py", {}, "--framework", "torch"),
    "memory-keras": ("tf", "benchmarks/bench_memory.py", {"KERAS_BACKEND": "tensorflow"},
                     "--framework", "keras"),
    "memory-optax": ("jax", "benchmarks/bench_memory.py", {}, "--framework", "optax"),
    # torch's compiled path under FSDP2 (2 ranks, gloo) beside eager and torch.optim,
    # and its first step with a cold and a warm inductor cache (tables of their own)
    "fsdp-torch": ("torch", "benchmarks/bench_torch.py", {}, "--fsdp"),
    "first-call-torch": ("torch", "benchmarks/bench_torch.py", {}, "--first-call",
                         "--algorithms", "Adam", "Ranger"),
}
#: benchmarks whose results are a table of their own (not step times)
MEMORY = "memory-"
OWN_TABLES = (MEMORY, "fsdp-", "first-call-")


@nox.session
def bench(session: nox.Session) -> None:
    """Optimizer step time, polyopt vs native, per framework (POLYOPT_BENCH_FRAMEWORKS,
    default all): writes benchmarks/results/<framework>.json and results.md; and the
    optimizer state memory per rule (memory-torch, memory-keras, memory-optax): memory.md."""
    started = time.monotonic()
    names = _split(os.environ.get("POLYOPT_BENCH_FRAMEWORKS", ",".join(BENCHMARKS)))
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        session.error(f"unknown POLYOPT_BENCH_FRAMEWORKS {sorted(unknown)}; known: "
                      f"{sorted(BENCHMARKS)}")
    _install(session, "-e", f".[{','.join(sorted({BENCHMARKS[n][0] for n in names}))}]")
    env = _base_env(session)  # KERAS_BACKEND stays explicit (jax) unless a script sets it
    results = ROOT / "benchmarks" / "results"
    written = []
    for name in names:
        _, script, extra, *args = BENCHMARKS[name]
        if not (ROOT / script).exists():
            session.log(f"{name}: {script} does not exist yet, skipped")
            continue
        out = results / f"{name}.json"
        session.run("python", script, *args, "--out", str(out), *session.posargs,
                    env={**env, **extra})
        written.append(str(out))
    timings = [w for w in written if not Path(w).name.startswith(OWN_TABLES)]
    memory = [w for w in written if Path(w).name.startswith(MEMORY)]
    if timings:
        session.run("python", "benchmarks/common.py", "--markdown", str(results / "results.md"),
                    *timings, env=env)
    if memory:
        session.run("python", "benchmarks/bench_memory.py", "--markdown",
                    str(results / "memory.md"), *memory, env=env)
    session.log(f"bench session done in {time.monotonic() - started:.0f} s")
