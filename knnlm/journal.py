"""Crash-safe changes to several files of a directory: stage them, commit with one rename, roll forward.

A change writes the new versions of whole files into DIR/.pending/, and may append rows to a .npy
file in place past the shape its header declares (readers take the header's shape, so the old
content still reads whole). Writing .pending/commit.json (atomically) is the one moment the change
happens: before it, recovery throws the staged files and appended tails away; after it, recovery
finishes the change (header shapes, then renames; each step can be redone). kill -9 at any point
thus leaves the old directory or the new one, once `recover` has run (opening a datastore runs it).
A change holds an exclusive lock on DIR/.lock from begin to commit, so a reader opening the directory
meanwhile leaves the change in progress alone (it reads the last committed state); the kernel drops the
lock of a killed process, and recovery then proceeds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .arrays import _HEADER_BYTES, _fsync, not_writable, npy_header, write_json
from .errors import KNNLMError

log = logging.getLogger(__name__)

PENDING = ".pending"  # staging folder inside the directory being changed
COMMIT = "commit.json"  # its presence in PENDING is the commit
LOCK = ".lock"  # flock()ed by the process changing the directory
_HELD: dict[str, int] = {}  # directories this process is changing -> the lock's file descriptor
_HOLDING: dict[str, int] = {}  # of those, the ones a hold() keeps locked past their commits -> its thread
_MUTEX = threading.Lock()  # _HELD and _HOLDING, between this process's threads


class ReadOnly(KNNLMError):
    """The directory cannot be written, so it cannot be changed (or a change in it finished)."""


def _try_lock(root: Path) -> int | None:
    """root's lock taken without waiting (its file descriptor), or None when another process holds it."""
    if not os.access(root, os.W_OK | os.X_OK):  # its .lock may still open read-write in a folder made read-only
        raise not_writable(root, "no write permission, or a read-only file system", ReadOnly)
    try:
        fd = os.open(Path(root) / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise not_writable(root, e.strerror or str(e), ReadOnly) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def holds_current_lock(root: Path) -> bool:
    """Whether the lock this process holds on root is root's .lock now (not one of a folder since removed or
    moved away, which a process that opened it just before took when its holder let go)."""
    fd = _HELD.get(str(Path(root).resolve()))
    try:
        return fd is not None and os.fstat(fd).st_ino == os.stat(Path(root) / LOCK).st_ino
    except FileNotFoundError:
        return False


def _unlock(fd: int) -> None:
    """Release a lock _try_lock took."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _busy(root: Path) -> KNNLMError:
    return KNNLMError(f"{root} is being changed by another process (knnlm add, remove, compact, train-index or "
                      "tune-lambda); wait for it to finish, then try again.")


def _lock(root: Path, key: str) -> None:
    """root's lock into _HELD (with _MUTEX held), or one sentence when another process, or another thread's
    hold, has it."""
    owner = _HOLDING.get(key)
    if owner is not None and owner != threading.get_ident():
        raise _busy(root)
    if key in _HELD:  # this thread's hold, or an earlier change of this process that failed before its commit
        return
    fd = _try_lock(Path(root))
    if fd is None:
        raise _busy(root)
    _HELD[key] = fd


@contextmanager
def hold(root: Path):
    """Keep root locked against other changes for a whole operation (an add's LM pass, its commit and its clean-up),
    not only from begin to commit."""
    key = str(Path(root).resolve())
    with _MUTEX:
        if _HOLDING.get(key) == threading.get_ident():  # nested in this thread's own hold
            nested = True
        else:
            _lock(root, key)
            _HOLDING[key], nested = threading.get_ident(), False
    if nested:
        yield
        return
    try:
        yield
    finally:
        with _MUTEX:
            del _HOLDING[key]
            fd = _HELD.pop(key, None)
            if fd is not None:
                _unlock(fd)


def begin(root: Path) -> Path:
    """An empty staging folder in root, after recovering from any earlier interrupted change; root stays
    locked against other changes (and other processes' recovery) until commit (or a hold's end)."""
    key = str(Path(root).resolve())
    with _MUTEX:
        _lock(root, key)
    recover(root)
    pending = Path(root) / PENDING
    pending.mkdir()
    return pending


def commit(root: Path, files: list[str], npy_rows: dict[str, int] | None = None) -> None:
    """Make the staged files (names in PENDING) and the in-place appends (.npy name -> new row count) the content.

    Args:
        root: the directory being changed.
        files: names of files staged in root/PENDING, each replacing root/name.
        npy_rows: .npy files in root grown in place past their header, and their new row counts.
    """
    pending = Path(root) / PENDING
    for name in files:
        _fsync(pending / name)
    write_json(pending / COMMIT, {"files": list(files), "npy_rows": dict(npy_rows or {})})
    _roll_forward(Path(root))
    key = str(Path(root).resolve())
    with _MUTEX:
        if key not in _HOLDING:  # a hold releases it when it ends
            fd = _HELD.pop(key, None)
            if fd is not None:
                _unlock(fd)


def recover(root: Path) -> None:
    """Finish a committed change or throw away an uncommitted one; nothing to do after a clean one."""
    root = Path(root)
    pending = root / PENDING
    if not pending.exists():
        return
    fd = None
    owner = _HOLDING.get(str(root.resolve()))
    if owner is not None and owner != threading.get_ident():  # another thread's change in progress
        log.info("%s is being changed by another thread; reading its last committed state", root)
        return
    if str(root.resolve()) not in _HELD:
        try:
            fd = _try_lock(root)
        except ReadOnly:
            if not (pending / COMMIT).exists():  # the headers still declare the last committed state: read that
                log.info("%s holds an interrupted change that only a user who can write there can undo; reading "
                         "its last committed state", root)
                return
            raise ReadOnly(f"{root} holds a change (knnlm add, remove, compact, train-index or tune-lambda) that was "
                           "interrupted after its commit and that only a user who can write there can finish; run "
                           f"`knnlm info {root}` once as such a user.") from None
        if fd is None:
            log.info("%s is being changed by another process; reading its last committed state", root)
            return
    try:
        if (pending / COMMIT).exists():
            log.info("finishing an interrupted change of %s", root)
            _roll_forward(root)
            return
        log.info("discarding an interrupted change of %s", root)
        for path in root.glob("*.npy"):
            _cut_to_header(path)
        shutil.rmtree(pending)
    finally:
        if fd is not None:
            _unlock(fd)


def _roll_forward(root: Path) -> None:
    """Apply a committed change; every step can be redone after a crash."""
    pending = root / PENDING
    rec = json.loads((pending / COMMIT).read_text())
    for name, rows in rec["npy_rows"].items():
        set_npy_rows(root / name, rows)
    for name in rec["files"]:
        if (pending / name).exists():
            os.replace(pending / name, root / name)
    _fsync(root)
    shutil.rmtree(pending)
    _fsync(root)


def npy_layout(path: Path) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, row shape, rows declared, header bytes) of a .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(f)
        return dtype, tuple(shape[1:]), int(shape[0]), f.tell()


def set_npy_rows(path: Path, rows: int) -> None:
    """Rewrite a .npy header in place to declare `rows` rows (the bytes must be there)."""
    dtype, row_shape, _rows, header = npy_layout(path)
    if header != _HEADER_BYTES:
        raise ValueError(f"{path} has a {header}-byte header, not {_HEADER_BYTES}")
    with open(path, "r+b") as f:
        f.write(npy_header(dtype, (rows, *row_shape)))
        f.flush()
        os.fsync(f.fileno())


def _cut_to_header(path: Path) -> None:
    """Drop bytes past the shape a .npy header declares (an append that was never committed)."""
    dtype, row_shape, rows, header = npy_layout(path)
    size = header + rows * dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    if path.stat().st_size > size:
        os.truncate(path, size)
