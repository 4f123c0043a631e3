"""Corpora stored as tables: Parquet files and Hugging Face `datasets` folders, read with pyarrow.

A `save_to_disk` folder is read with pyarrow, not the `datasets` package: its data files are Arrow
IPC streams listed in state.json, which pyarrow memory-maps, so the (heavy) `datasets` package is
not needed to build from one. Parquet is read one record batch at a time, so a document costs one
batch read at most and memory stays bounded by the batch, whatever the file's size.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import KNNLMError

BATCH_ROWS = 1024  # Parquet rows decoded at a time


def _pyarrow():
    """pyarrow, or one sentence saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise KNNLMError("Reading Parquet or Hugging Face datasets needs pyarrow; install it with "
                         "`pip install 'knnlm[scale]'`.") from e
    return pyarrow


def _check_field(schema, field: str, where: str) -> None:
    """Refuse a table without a string column named field."""
    pa = _pyarrow()
    if field not in schema.names:
        raise KNNLMError(f"{where} has no column {field!r} (it has {', '.join(schema.names)}); "
                         "pass the right --text-field.")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise KNNLMError(f"Column {field!r} of {where} holds {t}, not text; pass the right --text-field.")


def parquet_refs(path: Path, field: str) -> list:
    """One DocRef per row of a Parquet file (read from its footer, no data decoded)."""
    from .corpus import DocRef

    pq = _pyarrow().parquet
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for a file that is not Parquet
        raise KNNLMError(f"{path} is not a readable Parquet file ({e}); fix or exclude it.") from e
    _check_field(pf.schema_arrow, field, str(path))
    return [DocRef(f"{path}:{i}", str(path), i, "parquet") for i in range(pf.metadata.num_rows)]


def hf_files(folder: Path) -> list[Path]:
    """The Arrow data files of a `datasets` save_to_disk folder, in order."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise KNNLMError(f"{folder} holds several splits ({', '.join(splits)}); pass one split's folder, "
                         f"e.g. {folder / (splits[0] if splits else 'train')}.")
    try:
        state = json.loads((folder / "state.json").read_text())
        return [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KNNLMError(f"{folder} is not a Hugging Face datasets folder written by save_to_disk (its "
                         f"state.json is missing or damaged: {e}); pass such a folder, or another --format.") from e


def _open_arrow(path: Path):
    """A memory-mapped Arrow table (IPC stream, as `datasets` writes, or IPC file)."""
    pa = _pyarrow()
    try:
        try:
            return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except Exception as e:  # ArrowInvalid, OSError, ...: one sentence
        raise KNNLMError(f"{path} is not a readable Arrow file ({e}); save the dataset again with save_to_disk.") from e


def arrow_refs(path: Path, field: str) -> list:
    """One DocRef per row of an Arrow data file."""
    from .corpus import DocRef

    table = _open_arrow(path)
    _check_field(table.schema, field, str(path))
    return [DocRef(f"{path}:{i}", str(path), i, "arrow") for i in range(table.num_rows)]


class Tables:
    """Reads rows of Parquet and Arrow files, keeping the last batch (Parquet) or mapped table (Arrow)."""

    def __init__(self, field: str):
        self.field = field
        self._batch: tuple | None = None  # (path, first row, texts) of the last Parquet batch read
        self._reader: tuple | None = None  # (path, next row, batch iterator) streaming a Parquet file
        self._arrow: tuple | None = None  # (path, column) of the last Arrow file opened

    def text(self, ref) -> str:
        """Text of the row a DocRef names; one sentence if it is null."""
        value = self._parquet(ref) if ref.kind == "parquet" else self._arrow_row(ref)
        if value is None:
            raise KNNLMError(f"{ref.name} has no text (its {self.field!r} is null); drop that row or ignore it.")
        return value

    def _parquet(self, ref):
        """Row ref.offset of a Parquet file, streamed a batch at a time (going back restarts the file)."""
        b = self._batch
        if b and b[0] == ref.path and b[1] <= ref.offset < b[1] + len(b[2]):
            return b[2][ref.offset - b[1]]
        r = self._reader
        if not (r and r[0] == ref.path and r[1] <= ref.offset):
            pf = _pyarrow().parquet.ParquetFile(ref.path)
            r = (ref.path, 0, pf.iter_batches(batch_size=BATCH_ROWS, columns=[self.field]))
        path, row, batches = r
        for batch in batches:
            texts = batch.column(0).to_pylist()
            row, first = row + len(texts), row
            if ref.offset < row:
                self._batch, self._reader = (path, first, texts), (path, row, batches)
                return texts[ref.offset - first]
        raise KNNLMError(f"{ref.name} is past the end of {path}; the file changed while it was read.")

    def _arrow_row(self, ref):
        """Row ref.offset of a memory-mapped Arrow file."""
        if not (self._arrow and self._arrow[0] == ref.path):
            self._arrow = (ref.path, _open_arrow(Path(ref.path)).column(self.field))
        return self._arrow[1][ref.offset].as_py()
