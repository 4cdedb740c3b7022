"""The -o file of a batch job: never one of the inputs, locked against a second writer, checked
before the model loads, resumable, and write failures reported with the file's name; no torch."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aigc_cli.core.errors import OutputError, UsageError

RESUME_HINT = "rerun the same command with --resume to continue from {path}"


class OutputFile:
    """An open, exclusively locked -o file. Records are appended line by line with one write each,
    so what is complete is in the file at once; a half-written last line (a kill, a full disk) is
    cut by the next `--resume`."""

    def __init__(self, path: str, fd: int, resume: bool) -> None:
        self.path, self.fd, self.resume = path, fd, resume
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.lines = 0  # complete lines written by this run

    @classmethod
    def open(cls, path: str, resume: bool, inputs: Sequence[str | int] = ()) -> OutputFile:
        """Open (without truncating) and lock; UsageError naming the flag when that cannot be done.
        `inputs` are paths or file descriptors the job reads: the output must be none of them."""
        _refuse_same_file(path, inputs)
        if os.path.isdir(path):
            raise UsageError(f"--output {path}: is a directory")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            try:  # a write-only target such as /dev/full or a FIFO
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
            except OSError:
                raise UsageError(f"--output {path}: cannot open for writing ({exc.strerror})") from None
        out = cls(path, fd, resume)
        if resume and not out.regular:
            os.close(fd)
            raise UsageError(f"--resume: {path} is not a regular file; there is nothing to continue")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return out  # a file system without locks: go on unlocked
            holder = _lock_holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise UsageError(
                f"--output {path}: {who} is writing this file; wait for it to finish or use another -o file"
            ) from None
        return out

    def read_existing(self) -> bytes:
        """The file's complete lines so far; a half-written last line is cut off the file."""
        if not self.regular:
            return b""
        data = _read_fd(self.fd)
        end = data.rfind(b"\n") + 1
        if end < len(data):
            os.ftruncate(self.fd, end)
        return data[:end]

    def start(self) -> None:
        """Called once the model is loaded: a new run (no --resume) replaces the file's contents now."""
        if not self.resume and self.regular:
            os.ftruncate(self.fd, 0)

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            hint = RESUME_HINT.format(path=self.path) if self.regular else None
            raise OutputError(
                f"--output {self.path}: cannot write ({exc.strerror}); {self.lines} records were written", hint=hint
            ) from None
        self.lines += text.count("\n")
        return len(text)

    def flush(self) -> None:
        """Every write goes straight to the file."""

    def isatty(self) -> bool:
        return False

    def replace(self, data: bytes) -> None:
        """Make the file hold exactly `data`, atomically: a temporary file beside it, locked,
        written, synced and renamed over it, so that a crash leaves either the old file or the new
        one, never a mix; this object then holds the new file (and its lock)."""
        if not self.regular:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".aigc-", suffix=".tmp", dir=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, os.fstat(self.fd).st_mode & 0o777)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OutputError(f"--output {self.path}: cannot rewrite ({exc.strerror}); the file is as it was") from None
        _sync_directory(directory)
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


def _refuse_same_file(path: str, inputs: Sequence[str | int]) -> None:
    try:
        out = os.stat(path)
    except OSError:
        return  # not there yet: it cannot be an input
    for source in inputs:
        try:
            st = os.fstat(source) if isinstance(source, int) else os.stat(source)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            name = "standard input" if isinstance(source, int) else source
            raise UsageError(f"--output {path}: is the same file as the input ({name}); writing it would destroy the input")


def _lock_holder(fd: int) -> int | None:
    """The pid holding an flock on this file, from /proc/locks (Linux); None when unknown."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and ident in fields and "->" not in fields:
            try:
                return int(fields[fields.index(ident) - 1])
            except ValueError:
                return None
    return None


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _sync_directory(directory: str) -> None:
    """A rename is durable once its directory is synced (where the file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
