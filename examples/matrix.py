"""Run the experiment set in one framework (what ``nox -s torch``/``tf``/``jax`` run).

    python -m examples.matrix --framework torch            # the main matrix (short runs)
    python -m examples.matrix --framework torch --full     # the posts' epochs (hours on a CPU)
    python -m examples.matrix --framework jax --quick      # a few dozen steps each
    python -m examples.matrix --framework jax --ci         # what the test suite runs

Every run is its own process (``python -m examples.train``), so each starts
clean (jax's float64 switch, one framework per process). Runs:

- float32: every experiment; by default :data:`MAIN_LENGTH` (MLP 2 epochs, CNN
  1 epoch, ResNet-20 10 steps: the whole matrix of three frameworks takes
  about 20 minutes on a 2-core CPU); ``--full``: the experiment's own epochs
  (the posts' lengths); ``--epochs N``: N epochs each; ``--quick``:
  :data:`QUICK_STEPS` steps, ResNet-20 :data:`QUICK_RESNET_STEPS`, evaluated
  on the first :data:`QUICK_TEST_SIZE` test images;
- float32 twins (not with ``--quick``): the experiments of
  :data:`TWIN_EXPERIMENTS` again from initial weights + 1 ulp, which measures
  the framework's own float32 spread (polyopt.consistency's policy);
- float64 (the exact check): the MLP and the CNN experiments of
  :data:`FLOAT64_EXPERIMENTS`, 100 steps each.

Then ``python -m polyopt.consistency runs`` compares the records.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from examples import experiments
from examples.optimizers import FRAMEWORKS

FLOAT64_EXPERIMENTS = ("mnist-adam", "cifar-ranger")
FLOAT64_STEPS = 100
QUICK_STEPS = 24
QUICK_RESNET_STEPS = 6
QUICK_TEST_SIZE = 500
#: model -> ("--epochs" or "--steps", value) of the default (main) matrix
MAIN_LENGTH = {"mlp": ("--epochs", 2), "cnn": ("--epochs", 1), "resnet20": ("--steps", 10)}
TWIN_EXPERIMENTS = ("cifar-adam", "resnet20-adam")


def runs(quick: bool, names: Sequence[str], full: bool = False,
         epochs: int | None = None) -> list[list[str]]:
    """The examples.train argument lists of the matrix."""
    out = []
    for name in names:
        experiment = experiments.get(name)
        args = ["--experiment", name, "--dtype", "float32"]
        if quick:
            steps = QUICK_RESNET_STEPS if experiment.model == "resnet20" else QUICK_STEPS
            args += ["--steps", str(steps), "--test-size", str(QUICK_TEST_SIZE)]
        elif epochs is not None:
            args += ["--epochs", str(epochs)]
        elif not full:
            flag, value = MAIN_LENGTH[experiment.model]
            args += [flag, str(value)]
        out.append(args)
        if not quick and name in TWIN_EXPERIMENTS:
            out.append(args + ["--twin"])
    for name in FLOAT64_EXPERIMENTS:
        if name in names:
            args = ["--experiment", name, "--dtype", "float64", "--steps", str(FLOAT64_STEPS)]
            out.append(args + (["--test-size", str(QUICK_TEST_SIZE)] if quick else []))
    return out


#: --ci: model -> (steps, batch size or None for the experiment's) of the float32 runs
CI_LENGTH = {"mlp": (24, None), "cnn": (12, None), "resnet20": (3, 32)}
#: --ci: float64 runs (steps); 12 Ranger steps cross two Lookahead synchronisations
CI_FLOAT64 = {"mnist-adam": 24, "cifar-ranger": 12}
CI_TEST_SIZE = 200


def run_ci(framework: str, runs_dir: str, names: Sequence[str] | None = None,
           data_dir: str | None = None) -> int:
    """The CI matrix of ``framework`` in this process (what the default test run checks):
    every experiment for a few steps in float32, then the float64 runs of
    :data:`CI_FLOAT64` (last, as they switch jax to x64). Returns the number of runs."""
    import dataclasses

    from examples import train

    names = list(experiments.EXPERIMENTS) if names is None else list(names)
    plan = []
    for name in names:
        experiment = experiments.get(name)
        steps, batch_size = CI_LENGTH[experiment.model]
        if batch_size:
            experiment = dataclasses.replace(experiment, batch_size=batch_size)
        plan.append((experiment, steps, "float32"))
    plan += [(experiments.get(name), steps, "float64")
             for name, steps in CI_FLOAT64.items() if name in names]
    for experiment, steps, dtype in plan:
        train.train(framework, experiment, steps=steps, dtype=dtype, data_dir=data_dir,
                    runs_dir=runs_dir, test_size=CI_TEST_SIZE, quiet=True)
    return len(plan)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a few dozen steps per run (CI)")
    length.add_argument("--full", action="store_true", help="the posts' epochs (hours)")
    length.add_argument("--epochs", type=int, help="this many epochs per float32 run")
    length.add_argument("--ci", action="store_true",
                        help="the CI matrix: fewer steps, small ResNet batches, one process")
    parser.add_argument("--experiments", default=",".join(experiments.EXPERIMENTS),
                        help="comma-separated subset (default: all)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    for name in names:
        experiments.get(name)  # unknown names fail before anything runs
    common = ["--framework", args.framework, "--runs-dir", args.runs_dir]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    started, failed = time.perf_counter(), []
    if args.ci:
        done = run_ci(args.framework, args.runs_dir, names, args.data_dir)
        print(f"{args.framework}: {done} CI runs done in {time.perf_counter() - started:.0f} s")
        return 0
    planned = runs(args.quick, names, args.full, args.epochs)
    for run in planned:
        command = [sys.executable, "-m", "examples.train", *common, *run]
        print("$ " + " ".join(command[1:]), flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(" ".join(run))
    print(f"{args.framework}: {len(planned) - len(failed)} runs done in "
          f"{time.perf_counter() - started:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
