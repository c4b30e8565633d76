"""Is the matrix's verdict the same under changed arithmetic? (``nox -s arithmetic``)

    python -m examples.robustness runs runs-arithmetic [--markdown FILE]

``runs`` holds the default run records (the main command's); every
subdirectory of ``runs-arithmetic`` holds the float32 records of one
arithmetic profile (examples.matrix.ARITHMETIC), for some frameworks. Each
*mix* takes every framework's records (runs and twins) from one source: the
profile alone where it covers every framework, and each framework's profile
records beside the other frameworks' default ones. Every mix is compared with
polyopt.consistency's policy; the table gives each mix's verdict and smallest
margin (limit / observed). Exit 1 when a mix disagrees or is fragile (margin
under the policy's ``fragile_margin``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from polyopt import consistency


def mixes(default: list, profiles: dict[str, list]) -> dict[str, list]:
    """name -> records: each profile alone (when it has every framework) and each
    (profile, framework) beside the default records of the other frameworks."""
    frameworks = sorted({r.framework for r in default})
    out = {}
    for profile, records in sorted(profiles.items()):
        have = sorted({r.framework for r in records})
        if have == frameworks:
            out[f"{profile}: all"] = records
        for framework in have:
            out[f"{profile}: {framework}, others default"] = (
                [r for r in records if r.framework == framework]
                + [r for r in default if r.framework != framework])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir")
    parser.add_argument("arithmetic_dir")
    parser.add_argument("--markdown", metavar="FILE")
    args = parser.parse_args(argv)
    default = [r for r in consistency.read_runs(args.runs_dir) if r.dtype == "float32"]
    profiles = {d.name: consistency.read_runs(d)
                for d in sorted(Path(args.arithmetic_dir).iterdir()) if d.is_dir()}
    policy = consistency.DEFAULT_POLICY
    lines = ["| mix | experiments | smallest margin (where) | verdict |", "|---|---|---|---|"]
    bad = []
    for name, records in mixes(default, profiles).items():
        result = consistency.compare(records)
        row = min(result.rows, key=lambda r: r.margin)
        fragile = [r for r in result.rows if not r.margin >= policy.fragile_margin]
        verdict = "agree" if result.passed else "DISAGREE: " + "; ".join(
            f"{r.experiment}: {', '.join(r.reasons)}" for r in result.rows if not r.passed)
        if fragile and result.passed:
            verdict += " (fragile: " + ", ".join(r.experiment for r in fragile) + ")"
        if not result.passed or fragile:
            bad.append(name)
        lines.append(f"| {name} | {len(result.rows)} | {row.margin:.3g}x ({row.experiment}, "
                     f"{min(row.checks, key=lambda c: c.margin).name}) | {verdict} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(f"{len(lines) - 2 - len(bad)} of {len(lines) - 2} mixes agree with margins >= "
          f"{policy.fragile_margin:g}x" + (f"; not: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
