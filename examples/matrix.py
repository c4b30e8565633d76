"""Run the experiment set in one framework (what ``nox -s torch``/``tf``/``jax`` run).

    python -m examples.matrix --framework torch            # full runs + float64 mode
    python -m examples.matrix --framework jax --quick      # CI: a few dozen steps each

Every run is its own process (``python -m examples.train``), so each starts
clean (jax's float64 switch, one framework per process). Runs:

- float32: every experiment, at its own number of epochs (``--quick``:
  :data:`QUICK_STEPS` steps, ResNet-20 :data:`QUICK_RESNET_STEPS`,
  evaluated on the first :data:`QUICK_TEST_SIZE` test images);
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


def runs(quick: bool, names: Sequence[str]) -> list[list[str]]:
    """The examples.train argument lists of the matrix."""
    out = []
    for name in names:
        experiment = experiments.get(name)
        args = ["--experiment", name, "--dtype", "float32"]
        if quick:
            steps = QUICK_RESNET_STEPS if experiment.model == "resnet20" else QUICK_STEPS
            args += ["--steps", str(steps), "--test-size", str(QUICK_TEST_SIZE)]
        out.append(args)
    for name in FLOAT64_EXPERIMENTS:
        if name in names:
            args = ["--experiment", name, "--dtype", "float64", "--steps", str(FLOAT64_STEPS)]
            out.append(args + (["--test-size", str(QUICK_TEST_SIZE)] if quick else []))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--quick", action="store_true", help="a few dozen steps per run (CI)")
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
    for run in runs(args.quick, names):
        command = [sys.executable, "-m", "examples.train", *common, *run]
        print("$ " + " ".join(command[1:]), flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(" ".join(run))
    print(f"{args.framework}: {len(runs(args.quick, names)) - len(failed)} runs done in "
          f"{time.perf_counter() - started:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
