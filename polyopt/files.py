"""Atomic file writes: the one way polyopt, its adapters, examples and benchmarks write a file.

A file written through this module is either the complete new version or
the previous one, never a mix, whatever happens during the write (an error,
a full disk, the process killed, the machine losing power after the call
returned): the bytes go to a temporary file in the target's directory,
which is flushed and fsync'ed, then renamed over the target
(``os.replace``, atomic on POSIX and Windows), and the directory is
fsync'ed so that the rename itself is durable (where the platform allows
opening a directory; elsewhere the rename is still atomic).

On failure the temporary file is removed, the target is left byte for byte
as it was, and the error (an ``OSError`` of the same kind: ``PermissionError``,
``errno.ENOSPC``, ...) names the target's path and the step that failed.

File objects passed by a user are written as given (:func:`write_to`):
where their bytes go is the caller's choice.

The temporary file is named ``.<name>.<random>.tmp``: hidden, and never
matched by a pattern such as ``*.json`` or ``*.npz``. A process killed
mid-write can leave one behind (nothing can remove it then); it is never
read, and the next write of the same target does not depend on it.

Examples:
  >>> import pathlib, tempfile
  >>> from polyopt import files
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
  >>> files.write_text(path, "first\\n")
  >>> with files.atomic_write(path, "w") as out:
  ...     _ = out.write("second\\n")
  >>> path.read_text()
  'second\\n'
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_bytes", "write_text", "write_to"]

_MODES = ("wb", "w")
_ATTEMPTS = 100  # names tried for the temporary file before giving up


def _temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, opened for writing.

    Created with mode 0o666 and the process's umask, as ``open(path, "w")``
    would create the target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_ATTEMPTS):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"{_ATTEMPTS} temporary names beside {path} are taken")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where directories can be opened
    (POSIX); a platform or file system that refuses gets no directory fsync."""
    try:
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _error(path: Path, action: str, error: OSError, existed: bool) -> OSError:
    """``error`` again (same errno, so the same OSError subclass), naming ``path``."""
    reason = error.strerror or str(error) or type(error).__name__
    left = "the previous file is unchanged" if existed else "no file was written"
    message = f"{path}: could not {action} ({reason}); {left}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` atomically when the block ends.

    Args:
      path: the target file; its directory must exist.
      mode: ``"wb"`` (bytes, the default) or ``"w"`` (text).
      encoding: the text encoding for ``"w"`` (default UTF-8).

    When the block raises, the temporary file is removed, ``path`` is left as
    it was and the exception propagates (an ``OSError`` from the block or
    from the write itself is raised again naming ``path``). An existing
    target's permission bits are kept.

    Raises:
      ValueError: another mode.
      OSError: the directory refuses a new file (missing, read-only, no
        permission), the disk is full, or the rename fails; the message
        names ``path``.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write: mode must be one of {_MODES}, got mode={mode!r}")
    path = Path(path)
    existed = path.exists()
    try:
        handle, temporary = _temporary(path)
    except OSError as error:
        raise _error(path, "create a temporary file in its directory", error, existed) from error
    action = "write it"
    try:
        text = mode == "w"
        with os.fdopen(handle, mode, encoding=(encoding or "utf-8") if text else None) as out:
            yield out
            action = "flush it to disk"
            out.flush()
            os.fsync(out.fileno())
        if existed:
            action = "keep its permissions"
            os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode))
        action = "rename the temporary file over it"
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _error(path, action, error, existed) from error
        raise
    _fsync_directory(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path``'s contents with ``data`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as out:
        out.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path``'s contents with ``text`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as out:
        out.write(text)


def write_to(file: str | os.PathLike | IO[bytes], write: Callable[..., Any], /,
             *args: Any, **kwargs: Any) -> None:
    """``write(handle, *args, **kwargs)`` into ``file``: atomically for a path (see
    :func:`atomic_write`); a file object is written as given.

    A path is the exact target: ``np.savez("ckpt", ...)`` alone would write
    ``ckpt.npz``, ``write_to("ckpt", np.savez, ...)`` writes ``ckpt``.
    """
    if isinstance(file, (str, os.PathLike)):
        with atomic_write(file) as out:
            write(out, *args, **kwargs)
    else:
        write(file, *args, **kwargs)
