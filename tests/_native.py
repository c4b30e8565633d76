"""Run native framework code in a separate Python process.

torch and tensorflow in one process can crash, so native Keras runs in a
child process: ``run_keras(script, payload)`` executes ``script`` with the
JSON ``payload`` bound to the name ``payload``; the script sets ``result``,
which comes back through JSON. Arrays travel as nested lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

_PRELUDE = """
import json, sys
import numpy as np
payload = json.loads(sys.stdin.read())
"""

_EPILOGUE = """
def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x
sys.stdout.write("\\n@@RESULT@@" + json.dumps(_plain(result)))
"""


def run_python(script: str, payload: Any = None, env: dict | None = None,
               timeout: float = 300) -> Any:
    """Run ``script`` in a fresh interpreter; return its ``result`` variable."""
    code = _PRELUDE + textwrap.dedent(script) + _EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        raise RuntimeError(
            f"child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


def run_keras(script: str, payload: Any = None, backend: str = "jax", float64: bool = True,
              timeout: float = 300) -> Any:
    """Run ``script`` with Keras on ``backend`` (jax by default: no tensorflow
    import); float64 enables jax x64 so that Keras variables can be float64."""
    env = {"KERAS_BACKEND": backend}
    if float64 and backend == "jax":
        env["JAX_ENABLE_X64"] = "1"
    return run_python(script, payload, env=env, timeout=timeout)


def run_ranks(script: str, payload: Any, world: int, rendezvous: str,
              timeout: float = 400) -> list:
    """Run ``script`` as ``run_python`` does, in ``world`` processes at once;
    each gets ``payload`` with its ``rank``, ``world`` and ``init`` (a
    ``file://`` rendezvous at the path ``rendezvous``, for
    ``torch.distributed.init_process_group``) added. Returns each rank's ``result``."""
    code = _PRELUDE + textwrap.dedent(script) + _EPILOGUE
    procs = []
    for rank in range(world):
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps({**payload, "rank": rank, "world": world,
                                     "init": f"file://{rendezvous}"}))
        proc.stdin.close()  # every rank starts now (each waits for the others)
        proc.stdin = None
        procs.append(proc)
    outs = []
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0 or "@@RESULT@@" not in stdout:
            for other in procs:
                if other.poll() is None:
                    other.kill()
            raise RuntimeError(f"rank {rank} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        outs.append(json.loads(stdout.rsplit("@@RESULT@@", 1)[1]))
    return outs
