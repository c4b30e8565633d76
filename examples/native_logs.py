"""Keep the frameworks' start-up chatter on a CPU-only machine out of the output.

TensorFlow and XLA write, from C++ and before any Python logging is set up,
lines such as "failed call to cuInit", "Could not find cuda drivers", "All log
messages before absl::InitializeLog() is called..." and the oneDNN and CPU
instruction notices. None of them is about the user's work, and
``TF_CPP_MIN_LOG_LEVEL`` does not reach them (absl logs before TensorFlow
reads it). :func:`filter_native_noise` routes the process's file descriptor 2
through a thread that drops exactly the lines matching :data:`NOISE` and passes
every other byte on, so real errors from native code still show; Python's own
``sys.stderr`` (tracebacks, warnings, progress bars) keeps writing to the real
stderr directly.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

#: lines (from native code, on fd 2) that say nothing about the user's work on a CPU machine
NOISE = re.compile("|".join([
    r"failed call to cuInit",
    r"Could not find cuda drivers",
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"cpu_feature_guard\.cc",
    r"To enable the following instructions: .* rebuild TensorFlow",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib",
    r"util\.cc:\d+\] Not handling type DT_DOUBLE",  # grappler, on every float64 graph
]))

_installed = False


def keep(line: str) -> bool:
    """Whether a stderr line from native code is shown.

    >>> keep("E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)")
    False
    >>> keep("F0000 some_kernel.cc:10] Check failed: shape mismatch")
    True
    """
    return not NOISE.search(line)


def filter_native_noise() -> None:
    """Filter fd 2 of this process through :func:`keep` (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.stderr.flush()
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    # Python's writes go to the real stderr, unfiltered and unbuffered by the pipe
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding="utf-8",
                           errors="backslashreplace")

    def pump() -> None:
        pending = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if keep(line.decode("utf-8", "replace")):
                    os.write(original, line + b"\n")
        if pending and keep(pending.decode("utf-8", "replace")):
            os.write(original, pending)

    thread = threading.Thread(target=pump, name="native-stderr-filter", daemon=True)
    thread.start()

    def drain() -> None:  # at exit: end the pipe (fd 2 was its last writer), show the rest
        os.dup2(original, 2)
        thread.join(timeout=5)

    atexit.register(drain)


def quiet_retracing_warning(tf) -> None:
    """Drop TensorFlow's "triggered tf.function retracing" warning: the matrix trains
    one new model (with its own tf.functions) per run in one process, which is what
    the warning counts; every other TensorFlow log message still shows."""
    logger = tf.get_logger()
    if not any(isinstance(f, _RetracingFilter) for f in logger.filters):
        logger.addFilter(_RetracingFilter())


class _RetracingFilter:
    def filter(self, record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()
