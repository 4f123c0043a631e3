"""Small file helpers: growable .npy files and atomic writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# A fixed-size .npy header (a multiple of 64 bytes, as numpy aligns them) leaves room to
# write the final shape in place once the row count is known, so rows stream straight to disk.
_HEADER_BYTES = 128


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


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temp file beside it, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
