"""Atomic file writes: every file detkit writes appears whole or not at all.

A file is written to a hidden temporary beside its target (the same directory, so the final ``os.replace`` is
an atomic rename on one file system), flushed and fsynced, given the permissions the user's umask gives any
new file (``0o666 & ~umask``: 0644 by default; the temporary itself starts at mkstemp's private 0600), and
only then renamed onto its name. On any exception the temporary is removed and the target keeps what it
held, so an interrupted run never leaves a half-written checkpoint, export, report or cache entry, and never
clobbers an earlier one. :func:`replace_directory` does the same for a folder built beside its target.
(No paper section: this is plumbing every command runs on.)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from detkit.config import ConfigError

_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """The permission bits a newly created file gets under the current umask: ``0o666 & ~umask``."""
    # The umask can only be read by setting it. The lock keeps two callers from reading each other's stand-in,
    # and the stand-in is 0o077 (private), so a file another thread creates meanwhile is never too open.
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


class WriteError(OSError):
    """A file could not be written (the disk is full, a file-size limit, a directory made read-only, ...); the
    message names the file and the cause. Nothing half-written is left: the temporary is removed."""


def _write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the system refusing a write (an OSError, or torch's zip writer reporting one)."""
    if isinstance(exc, WriteError):
        return False
    if isinstance(exc, OSError):
        return not isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text)


def _as_write_error(target: str, exc: BaseException) -> WriteError:
    reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return WriteError(f"{target}: could not be written ({reason[:200]}); nothing was left half-written")


class PendingFile:
    """A temporary file beside ``target`` that becomes ``target`` on :meth:`commit`.

    ``path`` is created empty (by mkstemp, so the name is new) as ``.<target name>.<pid>.<random><suffix>``
    (the pid lets :func:`remove_orphaned_temporaries` tell a dead writer's leftover from a live one's) unless a
    ``prefix`` is given (checkpoints use ``.tmp-``, which the next training run's clean-up looks for). A writer
    that takes a file name (``onnx.save``, ``torch.jit.save``, ``cv2.VideoWriter``, ``savefig``) writes to
    ``path``; give ``suffix`` the target's extension when the writer picks its format from it. A writer whose
    life spans several calls (``VideoSink``) keeps one; a block of code uses :func:`atomic_path`.
    """

    def __init__(self, target: str | os.PathLike, suffix: str = ".tmp", prefix: str | None = None):
        self.target = os.fspath(target)
        directory = os.path.dirname(os.path.abspath(self.target))
        os.makedirs(directory, exist_ok=True)
        if prefix is None:
            prefix = f".{os.path.basename(self.target)}.{os.getpid()}."
        try:
            fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
        except OSError as exc:
            if not _write_failure(exc):
                raise
            raise _as_write_error(self.target, exc) from None
        os.close(fd)

    def commit(self) -> None:
        """Flush what was written to ``path`` to the disk, set its permissions and rename it onto ``target``
        (the temporary is removed if any of that fails)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename must not become visible before the bytes do
            finally:
                os.close(fd)
            os.chmod(self.path, new_file_mode())
            os.replace(self.path, self.target)
        except BaseException as exc:
            self.discard()
            if _write_failure(exc):
                raise _as_write_error(self.target, exc) from None
            raise

    def discard(self) -> None:
        """Remove the temporary; ``target`` keeps whatever it held."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_temporaries(target: str | os.PathLike) -> list[str]:
    """Remove the temporaries of ``target`` (:class:`PendingFile`'s ``.<name>.<pid>.*``) whose writer is no
    longer running on this machine: what a writer killed outright (``kill -9``, a power cut) left behind.
    Returns the paths removed; a live writer's temporary is left alone."""
    directory = os.path.dirname(os.path.abspath(os.fspath(target)))
    start = f".{os.path.basename(os.fspath(target))}."
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = name[len(start):].split(".", 1)[0] if name.startswith(start) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            path = os.path.join(directory, name)
            try:
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, prefix: str | None = None) -> Iterator[str]:
    """The name of a temporary file for a writer that takes a file name; the file becomes ``path`` when the
    block ends without error. ``suffix`` defaults to ``.tmp`` plus ``path``'s extension, so that writers
    choosing a format by extension choose the right one."""
    if suffix is None:
        suffix = ".tmp" + os.path.splitext(os.fspath(path))[1]
    pending = PendingFile(path, suffix, prefix)
    try:
        yield pending.path
    except BaseException as exc:
        pending.discard()
        if _write_failure(exc):
            raise _as_write_error(pending.target, exc) from None
        raise
    pending.commit()


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", suffix: str = ".tmp",
                 prefix: str | None = None) -> Iterator[IO[Any]]:
    """An open file (``mode`` ``"wb"``, or ``"w"``: UTF-8 text) whose content becomes ``path`` when the block
    ends without error; on an exception ``path`` is untouched and no temporary is left."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r}: expected 'w' or 'wb'")
    with atomic_path(path, suffix, prefix) as tmp, open(tmp, mode, encoding="utf-8" if mode == "w" else None) as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as UTF-8 JSON atomically (a serialisation error leaves ``path`` untouched)."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode("utf-8"))


def replace_directory(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder ``staged`` (beside ``target``) at ``target`` by renames, so a reader sees the old
    folder or the new one, never a mix; an old ``target`` is moved to ``<staged>.old`` and deleted."""
    staged, target = os.fspath(staged), os.fspath(target)
    trash = f"{staged}.old"
    if os.path.lexists(trash):  # left by a run killed between the renames
        shutil.rmtree(trash)
    if not os.path.lexists(target):
        os.rename(staged, target)
        return
    os.rename(target, trash)
    os.rename(staged, target)
    shutil.rmtree(trash)


LOCK_NAME = ".detkit.lock"


@contextmanager
def directory_lock(directory: str | os.PathLike, key: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block: an ``fcntl.flock`` on ``<directory>/.detkit.lock``
    (created with the directory when missing), which the system releases when the process ends, however it
    ends. Another holder: ConfigError naming ``key``, the directory and the holder (pid, host, since when).

    The lock file is the one file not written through :func:`atomic_write`: the lock belongs to the open file,
    which a rename would replace. It says who holds the lock, is left behind when the block ends, and is read
    only while someone holds it. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "a process that has not said who"
            raise ConfigError(f"{key}={directory} is in use by another run ({holder}): two runs in one directory "
                              f"would interleave their checkpoints and logs; wait for it to end, or use another "
                              f"directory (--set {key}=NEW_DIR)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
