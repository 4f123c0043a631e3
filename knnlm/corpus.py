"""Reading a corpus as a stream of documents, and choosing its held-out parts."""

from __future__ import annotations

import hashlib
import json
import random
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import KNNLMError
from .tables import Tables, arrow_refs, hf_files, parquet_refs

log = logging.getLogger(__name__)

DEV, TEST, STORE = "dev", "test", "store"
DEFAULT_GLOB = "**/*.txt"  # files of a folder corpus, unless --glob says otherwise


@dataclass(frozen=True)
class DocRef:
    """Where one document lives; its text is read only when needed."""

    name: str  # file path, "path:line" for JSONL, "path:row" for Parquet and HF datasets, or "<stdin>"
    path: str | None  # None for stdin
    offset: int = -1  # byte offset of the line in a JSONL file, row in a table; -1 for a whole file
    kind: str = "text"  # "text" (whole file or JSONL line by offset), "parquet" or "arrow" (HF datasets)


STDIN_NAME = "<stdin>"  # the name of the one document read from stdin
SKIP_WARNINGS = 10  # skipped documents named one warning each; the rest are counted (a bad JSONL file has many)


@dataclass
class Corpus:
    """The ordered documents of a corpus and how to read them."""

    source: str  # what the user passed
    docs: list[DocRef]
    files: list[dict]  # {"path", "size", "sha256"} of every file read
    text_field: str = "text"
    stdin_text: str | None = None
    strict: bool = True  # an unreadable document of a multi-document corpus fails; False: skipped, named here
    unreadable: list[str] = field(default_factory=list)  # names of documents (or files) skipped as unreadable
    first_skip: str | None = None  # why this run skipped its first (None: only a resumed build's earlier run skipped)
    _tables: Tables | None = field(default=None, repr=False)
    _warned: int = field(default=0, repr=False)  # documents this process skipped (the first SKIP_WARNINGS are named)

    def read(self, ref: DocRef) -> str:
        """Text of one document."""
        if ref.path is None:
            return self.stdin_text or ""
        if ref.kind != "text":
            self._tables = self._tables or Tables(self.text_field)
            return self._tables.text(ref)
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

    def skip(self, name: str, error: KNNLMError) -> None:
        """Record an unreadable document or file, or raise when strict."""
        if self.strict:
            raise error
        self._warned += 1
        if self._warned <= SKIP_WARNINGS:
            log.warning("skipping %s: %s", name, error)
        if self._warned == SKIP_WARNINGS:
            log.warning("further skipped documents are counted, not named, here (meta.json's corpus.unreadable "
                        "lists them all)")
        self.first_skip = self.first_skip or str(error)
        if name not in self.unreadable:
            self.unreadable.append(name)

    def no_tokens(self, holdout: float = 0.0) -> KNNLMError:
        """The error of a corpus that gave the datastore no token, naming the skipped documents' fault if any
        (holdout: the build's held-out share; none for `add`, which has no --holdout)."""
        held, fix = (", or held out", " or a smaller --holdout") if holdout else ("", "")
        n = len(self.unreadable)
        skipped = "1 document or file was" if n == 1 else f"{n} documents or files were"
        skipped_names = set(self.unreadable)
        if n and all(d.name in skipped_names for d in self.docs):  # none was readable: why is the fix
            why = self.first_skip.rstrip(".") if self.first_skip else \
                f"{self.unreadable[0]}; fix it or pass another corpus"
            return KNNLMError(f"Corpus {self.source} gave no tokens for the datastore: {skipped} skipped as unreadable "
                              f"and none was left (the first: {why}).")
        if n:
            return KNNLMError(f"Corpus {self.source} gave no tokens for the datastore ({skipped} skipped as "
                              f"unreadable, the first {self.unreadable[0]}, and the rest are empty or one token "
                              f"long{held}); pass a larger corpus{fix}.")
        return KNNLMError(f"Corpus {self.source} gave no tokens for the datastore (every document is empty or one "
                          f"token long{held}); pass a larger corpus{fix}.")


def not_utf8(text: str, what: str) -> KNNLMError | None:
    """The sentence for a str that cannot be written as UTF-8 (bytes that were not UTF-8, read from the command line
    or stdin, arrive as lone surrogates), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        shown = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        return KNNLMError(f"{what} is not UTF-8 ({shown} at character {e.start}); convert it to UTF-8.")
    return None


def read_stdin() -> str:
    """All of stdin as text, or one sentence where it is not UTF-8 (whichever way Python's locale decodes it)."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise KNNLMError(f"The text on stdin is not UTF-8 ({e.reason} at byte {e.start} of a block); convert it to "
                         "UTF-8.") from None
    if error := not_utf8(text, "The text on stdin"):
        raise error
    return text


def _not_text(path: Path, magic: bytes) -> KNNLMError:
    """The sentence for a file read as text that holds NUL bytes: a Parquet file (by its magic) is named as one."""
    if magic == b"PAR1":
        return KNNLMError(f"{path} is a Parquet file, read here as text; pass --format parquet, or exclude it with "
                          "--glob.")
    return KNNLMError(f"{path} is not a text file (it contains NUL bytes); pass text, or exclude it with --glob.")


def _read_text(path: Path) -> str:
    """A file's UTF-8 text, or one sentence saying it is not text."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise _not_text(path, data[:4])
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


FORMATS = ("auto", "text", "jsonl", "parquet", "hf")  # --format; auto: JSONL, Parquet, HF datasets by name
_SNIFF = 8192  # bytes of a text file checked for NUL when a folder corpus is listed


def _kind(path: Path, fmt: str) -> str:
    """How a file of the corpus is read: "jsonl" (one document per line), "parquet" or "text"."""
    if fmt in ("jsonl", "parquet"):
        return fmt
    if fmt == "auto" and path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "parquet" if fmt == "auto" and path.suffix == ".parquet" else "text"


def _is_hf(path: Path, fmt: str) -> bool:
    """Whether a folder is a Hugging Face datasets folder (save_to_disk)."""
    return fmt == "hf" or (fmt == "auto" and any((path / n).exists() for n in ("state.json", "dataset_dict.json")))


def _jsonl_refs(path: Path) -> list[DocRef]:
    """One DocRef per non-blank line of a JSONL file."""
    refs, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                refs.append(DocRef(f"{path}:{lineno}", str(path), offset))
            offset += len(line)
    return refs


def _file_refs(path: Path, kind: str, text_field: str) -> list[DocRef]:
    """The documents of one file; a text or JSONL file with NUL bytes near its start is refused as binary."""
    if kind == "parquet":
        return parquet_refs(path, text_field)
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if b"\x00" in head:
        raise _not_text(path, head[:4])
    return _jsonl_refs(path) if kind == "jsonl" else [DocRef(str(path), str(path))]


def working_folder() -> str | None:
    """This process's current folder, where relative document names start; None where it was deleted."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _dangling(path: Path) -> bool:
    """Whether path is a symbolic link to nothing."""
    return path.is_symlink() and not path.exists()


def _folder_files(path: Path, glob: str, fmt: str) -> list[Path]:
    """The files of a folder corpus; Parquet files when the format (or, by default, the folder) says so."""
    if fmt == "parquet" and glob == DEFAULT_GLOB:
        glob = "**/*.parquet"
    if not glob or glob.startswith(("/", "\\")) or ".." in Path(glob).parts:
        raise KNNLMError(f"--glob {glob!r} must be a pattern inside the folder {path}, e.g. --glob '**/*.py'.")
    try:
        files = sorted(p for p in path.glob(glob) if p.is_file() or _dangling(p))  # a dangling link: skipped, named
    except (ValueError, NotImplementedError) as e:  # pathlib's own refusals, e.g. '**' inside a name
        raise KNNLMError(f"--glob {glob!r} is not a pattern pathlib can match ({e}); pass one such as "
                         "--glob '**/*.py'.") from None
    if not files and fmt == "auto" and glob == DEFAULT_GLOB:  # a folder of Parquet files, found by default
        files = sorted(p for p in path.glob("**/*.parquet") if p.is_file())
    if not files:
        raise KNNLMError(f"Folder {path} has no files matching {glob!r}; pass --glob, e.g. --glob '**/*.py'.")
    return files


def open_corpus(
    source: str, glob: str = DEFAULT_GLOB, fmt: str = "auto", text_field: str = "text",
    shuffle_seed: int | None = None, strict: bool = True,
) -> Corpus:
    """List a corpus's documents without reading their text.

    Args:
        source: a text file (one document), a folder (each file matching glob a document), a JSONL
            file (each line a document), a Parquet file or folder of them (each row a document), a
            Hugging Face datasets folder written by save_to_disk (each row), or "-" for stdin.
        glob: file pattern inside a folder.
        fmt: "auto" (JSONL, Parquet by suffix; HF datasets by state.json), "text", "jsonl", "parquet" or "hf".
        text_field: the JSONL field, or table column, holding a document's text.
        shuffle_seed: shuffle document order with this seed; None keeps sorted order.
        strict: in a corpus of several files, fail on an unreadable one (False: skip it, named in
            corpus.unreadable, and skip documents that later prove unreadable; see iter_documents).

    Returns:
        A Corpus; raises KNNLMError for a missing or empty source.
    """
    if fmt not in FORMATS:
        raise KNNLMError(f"--format {fmt} is not one of {', '.join(FORMATS)}.")
    if source == "-":
        if fmt != "auto" and fmt != "text":
            raise KNNLMError(f"{fmt} from stdin is not supported; save it to a file and pass its path.")
        text = read_stdin()
        corpus = Corpus(source, [DocRef(STDIN_NAME, None)], [{
            "path": STDIN_NAME, "size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}],
            text_field, stdin_text=text)
    else:
        path = Path(source)
        if not path.exists():
            raise KNNLMError(f"Corpus {source} does not exist; pass a text file, folder, JSONL or Parquet file, "
                             "datasets folder, or - for stdin.")
        if fmt == "hf" and not path.is_dir():
            raise KNNLMError(f"--format hf reads a folder written by save_to_disk, and {source} is a file; "
                             "pass the folder.")
        corpus = Corpus(source, [], [], text_field, strict=strict)
        if path.is_dir() and _is_hf(path, fmt):
            files = hf_files(path)
            for f in files:
                corpus.docs.extend(arrow_refs(f, text_field))
        else:
            files = _folder_files(path, glob, fmt) if path.is_dir() else [path]
            dangling = {f for f in files if _dangling(f)}
            errors = []
            for f in files:
                try:
                    if f in dangling:
                        raise KNNLMError(f"{f} is a link to {os.readlink(f)}, which does not exist; fix the link, or "
                                         "exclude it with --glob.")
                    corpus.docs.extend(_file_refs(f, _kind(f, fmt), text_field))
                except KNNLMError as e:
                    if len(files) == 1:  # a lone file that cannot be read fails, whatever strict says
                        raise
                    errors.append(e)
                    corpus.skip(str(f), e)
            if errors and len(errors) == len(files):  # none readable: most likely a wrong flag, so say why
                raise errors[0]
            files = [f for f in files if f not in dangling]  # nothing to record of a link to nothing
        corpus.files = [_file_record(f) for f in files]
    if text_field != "text" and corpus.docs and all(r.kind == "text" and r.offset < 0 for r in corpus.docs):
        if source != "-" and Path(source).is_dir():
            raise KNNLMError(f"--text-field {text_field} names a JSONL field or a table's column, and the files of "
                             f"{source} matching --glob {glob!r} hold only plain text; leave it out, or pass the "
                             "files that have it, e.g. --glob '**/*.jsonl'.")
        raise KNNLMError(f"--text-field {text_field} names a JSONL field or a table's column, and {source} holds only "
                         "plain text; leave it out, or pass --format jsonl / parquet if that is what it holds.")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(corpus.docs)
    if not corpus.docs or all(f["size"] == 0 for f in corpus.files):
        raise KNNLMError(f"Corpus {source} is empty; pass a corpus with some text.")
    return corpus


def check_documents(corpus: Corpus) -> None:
    """Read every document once, so a file that is not text fails before any work is done.

    Only where a bad document fails the build anyway (strict, or a single document); otherwise
    iter_documents skips them as they come, and a bad file among thousands costs nothing up front.
    """
    if corpus.strict or len(corpus.docs) == 1:
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

    Several documents: whole documents are held out (split_of); an unreadable one is skipped
    (Corpus.skip: raised when strict) and keeps its number, so the split stays the same. One
    document: its tail is (split_tail), and its parts count as documents 0, 1, 2 (store, dev, test);
    with no holdout it is document 0 alone.
    """
    if len(corpus.docs) == 1:
        ref = corpus.docs[0]
        whole = corpus.read(ref)
        texts = split_tail(whole, holdout) if holdout > 0 else [whole]
        for seq, (split, text) in enumerate(zip((STORE, DEV, TEST), texts)):
            if seq >= start:
                yield seq, split, ref.name, text
        return
    for i in range(start, len(corpus.docs)):
        ref = corpus.docs[i]
        try:
            text = corpus.read(ref)
        except KNNLMError as e:  # raised again when strict
            corpus.skip(ref.name, e)
            continue
        yield i, split_of(i, holdout), ref.name, text
