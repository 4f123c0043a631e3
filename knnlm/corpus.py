"""Reading a corpus as a stream of documents, and choosing its held-out parts."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import KNNLMError

DEV, TEST, STORE = "dev", "test", "store"
DEFAULT_GLOB = "**/*.txt"  # files of a folder corpus, unless --glob says otherwise


@dataclass(frozen=True)
class DocRef:
    """Where one document lives; its text is read only when needed."""

    name: str  # file path, "path:line" for JSONL, or "<stdin>"
    path: str | None  # None for stdin
    offset: int = -1  # byte offset of the line in a JSONL file; -1 for a whole file


@dataclass
class Corpus:
    """The ordered documents of a corpus and how to read them."""

    source: str  # what the user passed
    docs: list[DocRef]
    files: list[dict]  # {"path", "size", "sha256"} of every file read
    text_field: str = "text"
    stdin_text: str | None = None

    def read(self, ref: DocRef) -> str:
        """Text of one document."""
        if ref.path is None:
            return self.stdin_text or ""
        if ref.offset < 0:
            return _read_text(Path(ref.path))
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            line = f.readline()
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise KNNLMError(f"{ref.name} is not valid JSON ({e}); fix that line or pass plain text.") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(self.text_field), str):
            raise KNNLMError(f"{ref.name} has no string field {self.text_field!r}; pass the right --text-field.")
        return obj[self.text_field]


def _read_text(path: Path) -> str:
    """A file's UTF-8 text, or one sentence saying it is not text."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise KNNLMError(f"{path} is not a text file (it contains NUL bytes); pass text, or exclude it with --glob.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KNNLMError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "convert it to UTF-8, or exclude it with --glob.") from e


def _file_record(path: Path) -> dict:
    """Path, size and sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": h.hexdigest()}


def _is_jsonl(path: Path, fmt: str) -> bool:
    """Whether a file is read as JSONL (one document per line)."""
    return fmt == "jsonl" or (fmt == "auto" and path.suffix in (".jsonl", ".ndjson"))


def _jsonl_refs(path: Path) -> list[DocRef]:
    """One DocRef per non-blank line of a JSONL file."""
    refs, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                refs.append(DocRef(f"{path}:{lineno}", str(path), offset))
            offset += len(line)
    return refs


def open_corpus(
    source: str, glob: str = DEFAULT_GLOB, fmt: str = "auto", text_field: str = "text",
    shuffle_seed: int | None = None,
) -> Corpus:
    """List a corpus's documents without reading their text.

    Args:
        source: a text file (one document), a folder (each file matching glob a document),
            a JSONL file (each line a document), or "-" for stdin.
        glob: file pattern inside a folder.
        fmt: "auto" (JSONL by suffix), "text" or "jsonl".
        text_field: the JSONL field holding a document's text.
        shuffle_seed: shuffle document order with this seed; None keeps sorted order.

    Returns:
        A Corpus; raises KNNLMError for a missing or empty source.
    """
    if source == "-":
        if fmt == "jsonl":
            raise KNNLMError("JSONL from stdin is not supported; save it to a file and pass its path.")
        text = sys.stdin.read()
        corpus = Corpus(source, [DocRef("<stdin>", None)], [{
            "path": "<stdin>", "size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}],
            text_field, stdin_text=text)
    else:
        path = Path(source)
        if not path.exists():
            raise KNNLMError(f"Corpus {source} does not exist; pass a text file, folder, JSONL file or - for stdin.")
        if path.is_dir():
            files = sorted(p for p in path.glob(glob) if p.is_file())
            if not files:
                raise KNNLMError(f"Folder {source} has no files matching {glob!r}; pass --glob, e.g. --glob '**/*.py'.")
        else:
            files = [path]
        docs = []
        for f in files:
            docs.extend(_jsonl_refs(f) if _is_jsonl(f, fmt) else [DocRef(str(f), str(f))])
        corpus = Corpus(source, docs, [_file_record(f) for f in files], text_field)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(corpus.docs)
    if not corpus.docs or all(f["size"] == 0 for f in corpus.files):
        raise KNNLMError(f"Corpus {source} is empty; pass a corpus with some text.")
    return corpus


def check_documents(corpus: Corpus) -> None:
    """Read every document once, so a file that is not text fails before any work is done."""
    for ref in corpus.docs:
        corpus.read(ref)


def split_of(index: int, holdout: float) -> str:
    """Which part document `index` of a multi-document corpus goes to: every round(1/h)-th to dev, the next to test."""
    if holdout <= 0:
        return STORE
    period = max(3, round(1.0 / holdout))
    return {0: DEV, 1: TEST}.get(index % period, STORE)


def split_tail(text: str, holdout: float) -> tuple[str, str, str]:
    """(store, dev, test) parts of a single document: dev and test are its tail, cut at line ends."""
    if holdout <= 0:
        return text, "", ""

    def cut(frac: float) -> int:
        at = int(len(text) * frac)
        nl = text.find("\n", at)
        return len(text) if nl < 0 else nl + 1

    a, b = cut(1 - 2 * holdout), cut(1 - holdout)
    return text[:a], text[a:b], text[b:]


def iter_documents(corpus: Corpus, holdout: float, start: int = 0) -> Iterator[tuple[int, str, str, str]]:
    """(seq, split, name, text) for each document from number `start` on, split by holdout.

    Several documents: whole documents are held out (split_of). One document: its tail is
    (split_tail), and its parts count as documents 0, 1, 2 (store, dev, test).
    """
    if len(corpus.docs) == 1:
        ref = corpus.docs[0]
        parts = zip((STORE, DEV, TEST), split_tail(corpus.read(ref), holdout))
        for seq, (split, text) in enumerate(parts):
            if seq >= start:
                yield seq, split, ref.name, text
        return
    for i in range(start, len(corpus.docs)):
        ref = corpus.docs[i]
        yield i, split_of(i, holdout), ref.name, corpus.read(ref)
