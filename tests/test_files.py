"""polyopt.files: atomic writes, proven by making them fail at every stage.

Each failure (creating the temporary file, writing, flushing to disk, the
rename) leaves the previous file byte for byte and no temporary file; OSErrors
come back naming the target's path. A real kernel refusal (the file size
limit, a read-only directory) is used where a test process can provoke one.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from polyopt import files, interop, rules

OLD = b"the last good checkpoint\n" * 40


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.npz"
    path.write_bytes(OLD)
    return path


def _assert_untouched(path: Path) -> None:
    assert path.read_bytes() == OLD
    assert _leftovers(path.parent) == []


# --------------------------------------------------------------------------
# what a successful write does


def test_writes_replace_the_target_and_leave_nothing_beside_it(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text(path, "one\n")
    assert path.read_text() == "one\n"
    files.write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    with files.atomic_write(path, "w") as out:
        out.write("three")
        assert path.read_bytes() == b"two"  # the target changes only at the end
    assert path.read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_existing_targets_permission_bits_are_kept(tmp_path):
    path = tmp_path / "shared.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    files.write_text(path, "[]")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh.json"
    files.write_text(fresh, "[]")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_write_to_writes_a_file_object_as_given():
    buffer = io.BytesIO(b"head:")
    buffer.seek(0, io.SEEK_END)
    files.write_to(buffer, io.BytesIO.write, b"body")
    assert buffer.getvalue() == b"head:body"


def test_save_state_writes_the_exact_path_atomically(tmp_path):
    """np.savez alone appends '.npz' to a path without it; save_state writes the path given."""
    params = [np.ones(3)]
    rule = rules.adam()
    path = tmp_path / "checkpoint"
    interop.save_state(path, rule.init(params), algorithm="adam", params=params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    loaded = interop.load_state(path, rule.init(params), algorithm="adam", params=params)
    assert int(loaded.state.count) == 0


def test_other_modes_are_refused_before_anything_is_created(tmp_path):
    with pytest.raises(ValueError, match=r"mode must be one of \('wb', 'w'\), got mode='ab'"):
        with files.atomic_write(tmp_path / "x", "ab"):
            pass
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# failure at every stage: the old file survives byte for byte, no temporary file


class Boom(RuntimeError):
    pass


def test_failure_while_opening_the_temporary_file(old_file, monkeypatch):
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if Path(path).parent == old_file.parent and Path(path).name.endswith(".tmp"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError, match=rf"{old_file}: could not create a temporary file in its "
                                      rf"directory \(Too many open files\); the previous file "
                                      rf"is unchanged") as caught:
        files.write_bytes(old_file, b"new")
    assert caught.value.errno == errno.EMFILE
    _assert_untouched(old_file)


@pytest.mark.parametrize("after", [0, 1, 1000], ids=lambda n: f"{n}-bytes-in")
def test_failure_mid_write_propagates_unchanged(old_file, after):
    with pytest.raises(Boom):
        with files.atomic_write(old_file) as out:
            out.write(b"x" * after)
            raise Boom
    _assert_untouched(old_file)


class _FillsUp(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, real, room: int) -> None:
        self.real, self.room = real, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            self.real.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """The temporary files of polyopt.files fill the disk after ``room`` bytes."""
    real_fdopen = os.fdopen

    def install(room: int) -> None:
        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, "wb", buffering=0)
            return io.BufferedWriter(_FillsUp(f, room)) if "b" in mode else io.TextIOWrapper(
                io.BufferedWriter(_FillsUp(f, room)), encoding=kwargs.get("encoding"))
        monkeypatch.setattr(os, "fdopen", fdopen)
    return install


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_full_disk_mid_write_names_the_path(old_file, full_disk, room):
    full_disk(room)
    with pytest.raises(OSError, match=rf"{old_file}: could not (write it|flush it to disk) "
                                      rf"\(No space left on device\); the previous file is "
                                      rf"unchanged") as caught:
        files.write_bytes(old_file, b"n" * 10_000)
    assert caught.value.errno == errno.ENOSPC
    _assert_untouched(old_file)


def test_a_full_disk_during_save_state_keeps_the_last_checkpoint(tmp_path, full_disk):
    params = [np.ones((4, 4)), np.zeros(3)]
    rule = rules.adam()
    state = rule.init(params)
    path = tmp_path / "adam.npz"
    interop.save_state(path, state, algorithm="adam", params=params)
    before = path.read_bytes()
    _, stepped = rule.update([np.ones((4, 4)), np.ones(3)], state, params)
    full_disk(len(before) // 2)
    with pytest.raises(OSError, match=rf"{path}: could not .*No space left on device"):
        interop.save_state(path, stepped, algorithm="adam", params=params)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert int(interop.load_state(path, state, algorithm="adam", params=params).state.count) == 0


def test_failure_at_fsync(old_file, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"{old_file}: could not flush it to disk "
                                      rf"\(Input/output error\)") as caught:
        files.write_bytes(old_file, b"new")
    assert caught.value.errno == errno.EIO
    _assert_untouched(old_file)


def test_failure_just_before_the_rename(old_file, monkeypatch):
    def replace(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=rf"{old_file}: could not rename the temporary file over "
                                      rf"it \(Invalid cross-device link\)"):
        files.write_bytes(old_file, b"new")
    _assert_untouched(old_file)


def test_an_interrupt_before_the_rename_leaves_no_temporary_file(old_file, monkeypatch):
    def replace(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.write_bytes(old_file, b"new")
    _assert_untouched(old_file)


def test_a_new_target_that_fails_says_no_file_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match=r"new\.json: could not rename .*; no file was written"):
        files.write_text(tmp_path / "new.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_named(tmp_path):
    target = tmp_path / "no-such-dir" / "state.npz"
    with pytest.raises(FileNotFoundError, match=rf"{target}: could not create a temporary file"):
        files.write_bytes(target, b"new")


# --------------------------------------------------------------------------
# real refusals by the kernel


def test_a_read_only_directory_names_the_path(old_file, monkeypatch):
    """chmod 0o555; a process running as root is not stopped by it, so there
    the refusal the kernel would give (EACCES on creating the file) is injected."""
    directory = old_file.parent
    directory.chmod(0o555)
    try:
        probe = directory / ".probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            real_open = os.open

            def refuse(path, flags, *args, **kwargs):
                if Path(path).parent == directory and flags & os.O_CREAT:
                    raise PermissionError(errno.EACCES, "Permission denied")
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refuse)
        except PermissionError:
            pass  # the directory really is read-only for this process
        with pytest.raises(PermissionError, match=rf"{old_file}: could not create a temporary "
                                                  rf"file in its directory \(Permission denied\)"):
            files.write_bytes(old_file, b"new")
    finally:
        directory.chmod(0o755)
    _assert_untouched(old_file)


def test_the_kernel_refusing_mid_write_keeps_the_old_file(old_file):
    """A real write(2) failure after the first bytes: RLIMIT_FSIZE in a child
    process makes the kernel refuse bytes past 4096 (EFBIG, SIGXFSZ ignored)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from polyopt import files
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            files.write_bytes({str(old_file)!r}, b"n" * 100_000)
        except OSError as error:
            print(error.errno, error)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(f"{errno.EFBIG} [Errno {errno.EFBIG}] {old_file}: could not ")
    assert "File too large" in done.stdout
    _assert_untouched(old_file)
