#!/usr/bin/env python3
"""nox, with nothing installed first: ``python3 noxw.py -s tests`` (any nox arguments).

A fresh machine has python3 but not nox. This creates a virtual environment
in ``.nox/.bootstrap`` (inside the git-ignored build area), installs nox
there through constraints.txt the first time, and then runs nox with the
arguments given. Later calls reuse it. Standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BOOTSTRAP = ROOT / ".nox" / ".bootstrap"


def nox_executable() -> Path:
    """The bootstrap environment's nox, installed on first use."""
    bindir = BOOTSTRAP / ("Scripts" if os.name == "nt" else "bin")
    nox = bindir / ("nox.exe" if os.name == "nt" else "nox")
    if not nox.exists():
        print(f"noxw: installing nox into {BOOTSTRAP.relative_to(ROOT)}", file=sys.stderr,
              flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(BOOTSTRAP)
        subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--quiet",
                        "-c", str(ROOT / "constraints.txt"), "nox"], check=True)
    return nox


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    return subprocess.run([str(nox_executable()), *argv]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
