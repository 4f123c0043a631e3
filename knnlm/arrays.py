"""Small helpers: growable .npy files, atomic writes, strict JSON, a fast stable row sort."""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
import socket
import struct
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import KNNLMError, os_error_fix

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # this machine, in own_name's names

# A fixed-size .npy header (a multiple of 64 bytes, as numpy aligns them) leaves room to
# write the final shape in place once the row count is known, so rows stream straight to disk.
_HEADER_BYTES = 128


ROW_ORDER_MIN_ROWS = 4  # fewer rows (a decoding step's) take np.argsort: its one call beats the packing's several


def row_order(a: np.ndarray) -> np.ndarray:
    """np.argsort(a, axis=1, kind="stable") of a 2-D float32 or int32 array, four times as fast.

    Each value becomes an unsigned key in the same order (floats: the sign bit flipped, or every bit for
    negatives; -0.0 counts as 0.0, and every NaN as one NaN past +inf, as numpy sorts them) with its
    column number in the low 32 bits, and numpy's SIMD sort of uint64 sorts the rows: equal values stay
    in column order. int32 values whose range and column number fit 32 bits together (token ids) sort as
    uint32 keys, twice as fast. Other dtypes, and fewer than ROW_ORDER_MIN_ROWS rows, take np.argsort.
    """
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.float32, np.int32) or len(a) < ROW_ORDER_MIN_ROWS:
        return np.argsort(a, axis=1, kind="stable")
    if a.dtype == np.float32:
        x = a + np.float32(0)  # a copy, with -0.0 turned into 0.0
        x[np.isnan(x)] = np.nan
        bits = x.view(np.uint32)
        key = bits ^ np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    else:
        lo, span = (int(a.min()), int(a.max()) - int(a.min()) + 1) if a.size else (0, 1)
        bits = max(1, (a.shape[1] - 1).bit_length())  # of a column number
        if span <= 1 << (32 - bits):  # e.g. token ids beside 1000 columns: half-width keys sort twice as fast
            small = (a - np.int32(lo)).view(np.uint32) << np.uint32(bits)
            small |= np.arange(a.shape[1], dtype=np.uint32)
            small.sort(axis=1)
            return (small & np.uint32((1 << bits) - 1)).astype(np.intp)
        key = a.view(np.uint32) ^ np.uint32(0x80000000)
    packed = (key.astype(np.uint64) << np.uint64(32)) | np.arange(a.shape[1], dtype=np.uint64)
    packed.sort(axis=1)
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)


def unique_sorted(a: np.ndarray) -> np.ndarray:
    """np.unique(a) of an integer array (flattened), by a sort and a mask of the changes: NumPy 2.4's
    np.unique of integers hashes, about 20 times as slow for 65k int64 values (7.8 against 0.4 ms)."""
    s = np.sort(np.asarray(a).reshape(-1))
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def sort_rows(key: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """key and each of others (2-D arrays of key's shape) with every row put in key's ascending order, ties in
    column order (row_order): e.g. dists, ids = sort_rows(dists, ids)."""
    order = row_order(key)
    if len(order) == 1:  # a decoding step's row: np.take, without take_along_axis' index arrays (40 µs in place)
        return tuple(np.take(a, order[0], axis=1) for a in (key, *others))
    return tuple(np.take_along_axis(a, order, axis=1) for a in (key, *others))


def npy_header(dtype, shape: tuple) -> bytes:
    """A version-1.0 .npy header of exactly _HEADER_BYTES bytes."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    body = repr(d).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + body + b" " * pad + b"\n"


class NpyAppender:
    """Rows appended to a .npy file whose header is fixed up by finish()."""

    def __init__(self, path: Path, dtype, row_shape: tuple = (), rows: int = 0):
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        if not self.path.exists():
            self.path.write_bytes(npy_header(self.dtype, (0, *self.row_shape)))
        # Resuming: drop whatever was written after the last checkpoint.
        os.truncate(self.path, _HEADER_BYTES + rows * self.row_bytes)
        self.rows = rows
        self._f = open(self.path, "r+b")
        self._f.seek(0, os.SEEK_END)

    def append(self, arr: np.ndarray) -> None:
        """Write rows (shape (n, *row_shape)) at the end."""
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {arr.shape[1:]} appended to {self.path} of rows {self.row_shape}")
        self._f.write(arr.tobytes())
        self.rows += arr.shape[0]

    def flush(self) -> None:
        """Push written rows to the OS so a checkpoint can count on them."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def finish(self) -> None:
        """Write the final shape into the header and close."""
        self.flush()
        self._f.seek(0)
        self._f.write(npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._f.close()

    def close(self) -> None:
        """Close without finishing (the file stays resumable)."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()


def json_safe(obj):
    """obj as JSON-native values: NaN and ±inf as None (JSON has neither), numpy values and bytes (HDF5
    attributes) as Python ones, through dicts and lists; anything else as its str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _fsync(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable (a no-op where the OS cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def own_name(path: Path, kind: str) -> Path:
    """A hidden name beside path for this process's work on it: .NAME.KIND-PID-HOSTRANDOM (see remove_dead)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{_HOST}{uuid.uuid4().hex[:8]}")


def own_names(path: Path, kind: str, here: bool = False) -> list[Path]:
    """What own_name(path, kind) named (sorted): any process's, or with here only this machine's."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*-{_HOST if here else ''}*"))


def remove_dead(path: Path, kind: str) -> None:
    """Delete what own_name(path, kind) named for processes of this machine that no longer run (killed before they
    cleaned up); names of live processes, and of other machines' (a shared folder), are left alone."""
    for leftover in own_names(path, kind, here=True):
        pid = leftover.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory src to dst, replacing a dst directory (set aside until src is in place; the set-aside
    copies of killed replacements go once a new one is in place)."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        old = own_name(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
    remove_dead(dst, "old")


def not_writable(folder: str | os.PathLike, reason: str, cls: type[KNNLMError] = KNNLMError) -> KNNLMError:
    """The sentence for a folder a command must write to and cannot."""
    return cls(f"{folder} cannot be written ({reason}), and this command writes there; {os_error_fix(errno.EACCES)}.")


def try_create(path: str | os.PathLike) -> None:
    """Make and remove the temporary file an atomic write of path makes (own_name(path, "tmp")); raises the OSError
    of a folder where it cannot be made (permissions, a read-only mount, /proc, a name too long)."""
    probe = own_name(Path(os.path.abspath(path)), "tmp")
    with open(probe, "x"):
        pass
    os.unlink(probe)


def check_writable(folder: str | os.PathLike) -> None:
    """Refuse, before any work, a folder this process cannot create files in (permissions, a read-only mount)."""
    try:
        try_create(Path(folder) / "probe")
    except OSError as e:
        raise not_writable(folder, e.strerror or str(e)) from None


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """One sentence, before any work, for a file a write would replace without --overwrite (scores, reports,
    plots: files a user named)."""
    if not overwrite and os.path.isfile(path):
        raise KNNLMError(f"{path} already exists; pass --overwrite to replace it.")


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or directory to; it replaces `path` only once whole.

    On leaving without an error, the written file is fsynced (when fsync; a directory's contents are
    not), renamed over `path` and the parent directory fsynced; on an error the temporary is removed.

    Args:
        path: the file or directory to write.
        fsync: make the new file durable before the rename.
        exclusive: a file is put in place only where none is (a hard link, which fails on an existing name, then the
            temporary unlinked; a plain rename where the file system has no links): a command told not to overwrite
            refuses a file another process wrote meanwhile, where checking first and renaming later would not.

    Yields:
        The temporary path (nothing exists there yet).
    """
    path = Path(path)
    remove_dead(path, "tmp")  # what a killed write of path left
    tmp = own_name(path, "tmp")
    try:
        yield tmp
        if fsync and tmp.is_file():
            _fsync(tmp)
        if tmp.is_dir():
            replace_dir(tmp, path)
        elif exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        _fsync(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    """Put the file tmp in place as path only if path does not exist (one sentence if it does), tmp gone after."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _written_meanwhile(path) from None
    except OSError:  # no hard links here (some network and FUSE file systems): the check before the work stands
        if os.path.exists(path):
            raise _written_meanwhile(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _written_meanwhile(path: Path) -> KNNLMError:
    return KNNLMError(f"{path} was written by another process while this one ran; pass --overwrite to replace it, or "
                      "another path.")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (see atomic_path); NaN and infinities are written as null (see json_safe)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)
        f.write("\n")
