"""Run the experiment set in one framework (what ``nox -s torch``/``tf``/``jax`` run).

    python -m examples.matrix --framework torch            # the main matrix (minutes)
    python -m examples.matrix --framework torch --full     # the posts' epochs (hours on a CPU)
    python -m examples.matrix --framework jax --quick      # a few dozen steps each
    python -m examples.matrix --framework jax --ci         # what the test suite runs
    python -m examples.matrix --framework tf --arithmetic one-thread   # changed float32 arithmetic

All runs of one framework share one process (float32 first, then float64,
which switches jax to x64); torch and tensorflow never meet in one. Runs:

- float32, every experiment, at :data:`MAIN_LENGTH` (MLP 2 epochs, CNN 1
  epoch, ResNet-20 10 steps); ``--full``: the experiment's own epochs; ``--epochs N``;
  ``--quick``: :data:`QUICK_STEPS` steps (ResNet-20 :data:`QUICK_RESNET_STEPS`)
  on the first :data:`QUICK_TEST_SIZE` test images;
- a float32 *twin* of every float32 run (not with ``--quick``/``--ci``): the
  same run from initial weights moved by one ulp, which measures how far
  float32 rounding alone moves that experiment (polyopt.consistency's policy
  turns it into the tolerance);
- float64, every experiment, :data:`FLOAT64_LENGTH`: exact arithmetic in
  every framework, so any optimizer difference shows (the policy allows 1e-9).

``--arithmetic`` runs the float32 experiments under changed arithmetic
(:data:`ARITHMETIC`: one thread, oneDNN off, XLA fast-math), to show that the
verdict does not depend on the machine. Progress: one bar for the whole set
(with an ETA) and one per run, on a terminal. Then
``python -m polyopt.consistency runs`` compares the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from examples import experiments
from examples.optimizers import FRAMEWORKS

MAIN_LENGTH = {"mlp": ("epochs", 2), "cnn": ("epochs", 1), "resnet20": ("steps", 10)}
#: float64 runs: model -> (steps, batch size or None for the experiment's); float64
#: convolutions are slow on a CPU (no oneDNN), and any optimizer difference shows in
#: the first steps, 12 CNN steps cross two Ranger synchronisations
FLOAT64_LENGTH = {"mlp": (100, None), "cnn": (12, None), "resnet20": (3, 32)}
FLOAT64_TEST_SIZE = {"mlp": None, "cnn": 200, "resnet20": 200}
QUICK_STEPS = 24
QUICK_RESNET_STEPS = 6
QUICK_TEST_SIZE = 500
#: --ci: model -> (steps, batch size or None for the experiment's) of the float32 runs
CI_LENGTH = {"mlp": (24, None), "cnn": (12, None), "resnet20": (3, 32)}
#: --ci: float64 steps per model; 12 Ranger steps cross two Lookahead synchronisations
CI_FLOAT64 = {"mlp": 24, "cnn": 12, "resnet20": 2}
CI_TEST_SIZE = 200
#: relative cost of one step per model (for the overall progress bar's ETA)
STEP_COST = {"mlp": 1, "cnn": 4, "resnet20": 60}

_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
#: --arithmetic profiles: environment set before the framework is imported
ARITHMETIC = {
    "default": {},
    "one-thread": _ONE_THREAD,
    "no-onednn": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "xla-fast-math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "strict": {**_ONE_THREAD, "TF_ENABLE_ONEDNN_OPTS": "0",
               "XLA_FLAGS": _ONE_THREAD["XLA_FLAGS"] + " --xla_cpu_enable_fast_math=false"},
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the matrix (arguments of examples.train.train)."""

    experiment: str
    dtype: str = "float32"
    epochs: int | None = None
    steps: int | None = None
    twin: bool = False
    test_size: int | None = None
    batch_size: int | None = None

    def cost(self) -> int:
        """Rough cost (step-cost units) for the progress bar's ETA."""
        experiment = self.experiment_object()
        steps = self.steps or (self.epochs or experiment.epochs) * 60
        return STEP_COST[experiment.model] * steps * (2 if self.dtype == "float64" else 1)

    def experiment_object(self) -> experiments.Experiment:
        experiment = experiments.get(self.experiment)
        if self.batch_size:
            experiment = dataclasses.replace(experiment, batch_size=self.batch_size)
        return experiment

    def label(self) -> str:
        return f"{self.experiment} {self.dtype}" + (" twin" if self.twin else "")


def plan(names: Sequence[str], *, quick: bool = False, full: bool = False,
         epochs: int | None = None, ci: bool = False) -> list[Run]:
    """The runs of the matrix for ``names``: float32 (and twins), then float64."""
    runs, float64 = [], []
    for name in names:
        model = experiments.get(name).model
        if ci:
            steps, batch_size = CI_LENGTH[model]
            runs.append(Run(name, steps=steps, batch_size=batch_size, test_size=CI_TEST_SIZE))
            float64.append(Run(name, "float64", steps=CI_FLOAT64[model],
                               batch_size=batch_size, test_size=CI_TEST_SIZE))
            continue
        if quick:
            steps = QUICK_RESNET_STEPS if model == "resnet20" else QUICK_STEPS
            runs.append(Run(name, steps=steps, test_size=QUICK_TEST_SIZE))
        else:
            if full:
                run = Run(name)
            elif epochs is not None:
                run = Run(name, epochs=epochs)
            else:
                kind, value = MAIN_LENGTH[model]
                run = Run(name, **{kind: value})
            runs += [run, dataclasses.replace(run, twin=True)]
        steps, batch_size = FLOAT64_LENGTH[model]
        test_size = FLOAT64_TEST_SIZE[model] or (QUICK_TEST_SIZE if quick else None)
        float64.append(Run(name, "float64", steps=steps, batch_size=batch_size,
                           test_size=test_size))
    return runs + float64


def execute(framework: str, runs: Sequence[Run], runs_dir: str,
            data_dir: str | None = None, arithmetic: str = "default",
            progress: bool = True) -> list:
    """Train ``runs`` in ``framework`` in this process; returns their run records."""
    from tqdm import tqdm

    from examples import train

    records = []
    overall = tqdm(total=sum(r.cost() for r in runs), desc=f"{framework}: {len(runs)} runs",
                   unit="", bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
                   dynamic_ncols=True, disable=None if progress else True)
    for run in runs:
        experiment = run.experiment_object()
        bar = train.StepBar(run.label(), position=1, disable=None if progress else True)
        started = time.perf_counter()
        record = train.train(framework, experiment, epochs=run.epochs, steps=run.steps,
                             dtype=run.dtype, data_dir=data_dir, runs_dir=runs_dir,
                             test_size=run.test_size, quiet=True, twin=run.twin,
                             on_step=bar, arithmetic=arithmetic)
        bar.close()
        overall.update(run.cost())
        records.append(record)
        accuracy = 100 * record.final_value("test_accuracy")
        seconds = time.perf_counter() - started
        overall.write(f"  {framework:5s} {run.label():32s} {len(record.step_loss):4d} steps  "
                      f"test acc {accuracy:5.2f}%  test loss "
                      f"{record.final_value('test_loss'):.4f}  {seconds:5.1f} s")
    overall.close()
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a few dozen steps per run")
    length.add_argument("--full", action="store_true", help="the posts' epochs (hours)")
    length.add_argument("--epochs", type=int, help="this many epochs per float32 run")
    length.add_argument("--ci", action="store_true",
                        help="the CI matrix: fewer steps, small ResNet batches")
    parser.add_argument("--experiments", default=",".join(experiments.EXPERIMENTS),
                        help="comma-separated subset (default: all)")
    parser.add_argument("--float32-only", action="store_true",
                        help="leave out the float64 runs (e.g. with --arithmetic)")
    parser.add_argument("--arithmetic", default="default", choices=list(ARITHMETIC),
                        help="float32 arithmetic profile (environment set before the "
                             "framework is imported)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    for name in names:
        try:
            experiments.get(name)  # unknown names fail before anything runs
        except ValueError as error:
            parser.error(str(error))
    os.environ.update(ARITHMETIC[args.arithmetic])

    from examples import native_logs

    native_logs.filter_native_noise()
    runs = plan(names, quick=args.quick, full=args.full, epochs=args.epochs, ci=args.ci)
    if args.float32_only:
        runs = [run for run in runs if run.dtype == "float32"]
    started = time.perf_counter()
    print(f"{args.framework}: {len(runs)} runs ({args.arithmetic} arithmetic) -> "
          f"{args.runs_dir}", flush=True)
    execute(args.framework, runs, args.runs_dir, args.data_dir, args.arithmetic)
    print(f"{args.framework}: {len(runs)} runs done in {time.perf_counter() - started:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
