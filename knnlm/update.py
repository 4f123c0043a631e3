"""A datastore that follows its corpus: add documents, remove them by name, compact the arrays.

Every change goes through knnlm.journal: the new meta.json, index.faiss and index.json (and, for
compact, the new arrays) are staged, appended keys go past the arrays' declared shape, and one
commit makes them the datastore; kill -9 anywhere leaves the old datastore or the new one.
Removed documents' keys leave the index at once (faiss remove_ids); their rows stay in the arrays,
listed in meta.json's "removed", until `compact` rewrites the arrays without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from .arrays import NpyAppender, write_json
from .corpus import DEFAULT_GLOB, STDIN_NAME, open_corpus, working_folder
from .datastore import Datastore, open_datastore, partial_dir
from .errors import KNNLMError, settle, settle_text_fields
from .index import load_index, read_index_info, stage_index
from .journal import PENDING, begin, commit, hold

log = logging.getLogger(__name__)

_CHUNK = 65_536  # rows copied or added per step, bounding RAM
_ADDED = ".added"  # the keys of an `add` in progress, built as a datastore inside the datastore


@dataclass(frozen=True)
class AddConfig:
    """Settings of `knnlm add`; context and stride are the datastore's own."""

    model: str | None = None  # hub id, directory or .gguf; None: the model the datastore was built with
    device: str | None = None  # torch device; None: cuda when available, else cpu
    trust_remote_code: bool = False  # run the model repository's own code (off unless asked)
    batch_size: int = 8  # windows per forward pass
    glob: str = DEFAULT_GLOB  # files of a folder corpus
    fmt: str = "auto"  # corpus format, as for build-datastore
    text_field: str = "text"  # field with a document's text (JSONL, Parquet, HF datasets)
    strict: bool = False  # fail on the first unreadable file of a folder instead of skipping it

    def __post_init__(self):
        settle(self, "batch_size", int, "batch_size", "8")
        settle_text_fields(self)
        if self.batch_size < 1:
            raise KNNLMError(f"--batch-size {self.batch_size} must be at least 1 window per forward pass.")


def _stamp() -> str:
    """Now, as meta.json writes times."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _live_names(ds: Datastore) -> set[str]:
    """Names of the stored documents not removed."""
    return {d[0] for d in ds.live_documents}


def _next_meta(ds: Datastore, record: dict) -> dict:
    """A copy of meta.json for the next revision, with `record` appended to its history."""
    meta = dict(ds.meta)
    meta["revision"] = int(meta.get("revision", 0)) + 1
    meta["updates"] = [*meta.get("updates", []), {"time": _stamp(), **record}]
    return meta


def _stage_index(ds: Datastore, index, new: Datastore, pending: Path) -> list[str]:
    """Write index.faiss and index.json for the datastore `new` into pending; the names staged."""
    info = read_index_info(ds)
    return stage_index(pending, index, {**info, "count": new.count, "datastore": new.fingerprint, "updated": _stamp()})


def _index_or_none(ds: Datastore):
    """The datastore's index, or None when it has none (then only the arrays change)."""
    if read_index_info(ds) is None or not (ds.path / "index.faiss").exists():
        return None
    index = load_index(ds)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None and not isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexIDMap2)):
        # faiss cannot remove ids from e.g. HNSW, and compact renumbers IVF ids only.
        raise KNNLMError(f"The index of {ds.path} ({type(faiss.downcast_index(index)).__name__}) is neither IVF nor "
                         f"flat, which add, remove and compact cannot change; delete index.faiss and index.json, make "
                         f"the change, then run `knnlm train-index {ds.path}` again.")
    in_ram = (faiss.ArrayInvertedLists, faiss.BlockInvertedLists)  # 8-bit PQ's lists, fast-scan's blocks
    if ivf is not None and not isinstance(faiss.downcast_InvertedLists(ivf.invlists), in_ram):
        # Lists kept in a file of their own would change in place, not through the journal.
        raise KNNLMError(f"The index of {ds.path} keeps its lists on disk, which add, remove and compact cannot "
                         f"change crash-safely; delete index.faiss and index.json, make the change, then run "
                         f"`knnlm train-index {ds.path}` again.")
    return index


def add_documents(datastore: str | os.PathLike, corpus: str, cfg: AddConfig = AddConfig(), lm=None,
                  progress=None) -> dict:
    """Append a corpus's documents to a datastore: keys, values, document table and index (no retraining).

    Args:
        datastore: the datastore directory.
        corpus: a text file, folder, JSONL, Parquet file or folder, or HF datasets folder.
        cfg: settings.
        lm: an already loaded model (else cfg.model or the datastore's model is loaded).
        progress: optional callable taking the number of tokens just stored.

    Returns:
        The update record written to meta.json ("documents", "keys", "unreadable", ...).
    """
    path = open_datastore(datastore).path
    with hold(path):  # the whole add, its LM pass included: a remove or compact meanwhile would undo its keys' rows
        return _add(open_datastore(path), corpus, cfg, lm, progress)


def _add(ds: Datastore, corpus: str, cfg: AddConfig, lm, progress) -> dict:
    """add_documents' work, with ds locked."""
    from .build import BuildConfig, CannotResume, build_datastore
    from .lm import datastore_lm

    src = open_corpus(corpus, cfg.glob, cfg.fmt, cfg.text_field, strict=cfg.strict)  # the build takes it as it is
    spell = _Paths(ds)
    paths = {r.name: spell.given(r.name) for r in src.docs if r.name != STDIN_NAME}  # compared as paths, as remove does
    live = spell.all_stored(_live_names(ds))
    dup = sorted(name for name, p in paths.items() if p in live)
    if dup:
        many = f" ({len(dup)} documents are)" if len(dup) > 1 else ""
        raise KNNLMError(f"{dup[0]} is already in {ds.path}{many}; remove {'them' if many else 'it'} first with "
                         f"`knnlm remove {ds.path} DOC...`, or add other documents.")
    held, held_texts = {}, {}  # the held-out documents by path and by text, from one read of holdout.jsonl
    for split, name, text in ds.iter_heldout():
        held.update(dict.fromkeys(spell.stored(name), split))
        held_texts[_digest(text)] = split
    mixed = sorted(name for name, p in paths.items() if p in held)
    if mixed:  # its neighbours would be its own text: eval's held-out perplexity would mean nothing
        many = f" ({len(mixed)} documents are)" if len(mixed) > 1 else ""
        raise KNNLMError(f"{mixed[0]} is held out of {ds.path} as its {held[paths[mixed[0]]]} text{many}; a "
                         "datastore never holds what eval and tune-lambda score, so add other documents.")
    copies = _heldout_copies(held_texts, src)  # the same text under another name (a copy, a boilerplate file): left out
    if copies:
        for name, split in copies:
            log.warning("skipping %s: its text is a held-out (%s) document's, and a datastore never holds what eval "
                        "and tune-lambda score", name, split)
        left_out = {name for name, _ in copies}
        src.docs = [r for r in src.docs if r.name not in left_out]
        if not src.docs:
            raise KNNLMError(f"{copies[0][0]} holds the text of a document held out of {ds.path} as its "
                             f"{copies[0][1]} text{' (every document does)' if len(copies) > 1 else ''}; a datastore "
                             "never holds what eval and tune-lambda score, so add other documents.")
    _index_or_none(ds)  # an index add cannot change is refused now, not after the LM pass
    lm = datastore_lm(ds, cfg.model, cfg.device, cfg.trust_remote_code, lm)
    # The new keys are built as a small datastore inside this one (an interrupted add resumes its LM pass).
    leftover = ds.path / _ADDED
    if leftover.is_dir() and not (leftover / "meta.json").is_file():  # a removal of ours cut short: not a datastore
        shutil.rmtree(leftover)
    bcfg = BuildConfig(model=ds.meta["model"]["name"], device=cfg.device, context=ds.meta["context"],
                       stride=ds.meta["stride"], batch_size=cfg.batch_size, holdout=0, glob=cfg.glob,
                       fmt=cfg.fmt, text_field=cfg.text_field, strict=cfg.strict, build_index=False,
                       overwrite=True, resume=partial_dir(ds.path / _ADDED).exists())
    try:
        added = build_datastore(src, ds.path / _ADDED, bcfg, lm=lm, progress=progress)  # stdin is read once
    except CannotResume as e:  # an interrupted add of other documents (or a damaged one): ours to start over
        log.info("starting the add afresh: %s", e)
        added = build_datastore(src, ds.path / _ADDED, replace(bcfg, resume=False), lm=lm, progress=progress)
    record = apply_add(ds, added, [name for name, _ in copies])
    shutil.rmtree(added.path)
    return record


def apply_add(ds: Datastore, added: Datastore, heldout_copies: list[str] = ()) -> dict:
    """Append a built datastore's rows and documents to ds, crash-safely; returns the update record (naming
    heldout_copies, the documents left out as copies of held-out text, where there are any)."""
    n0, n = ds.count, added.count
    index = _index_or_none(ds)
    pending = begin(ds.path)
    for name, arr, row in (("keys.npy", added.keys, (ds.dim,)), ("vals.npy", added.vals, ())):
        out = NpyAppender(ds.path / name, arr.dtype, row, n0)  # past the declared shape until the commit
        for lo in range(0, n, _CHUNK):
            out.append(arr[lo: lo + _CHUNK])
        out.flush()
        out.close()
    docs = [[_name_to_store(ds, added, name), start + n0, count, first]
            for name, start, count, first in added.documents]
    unreadable = added.meta["corpus"].get("unreadable", [])
    files = [{**f, "path": _name_to_store(ds, added, f["path"])} for f in added.meta["corpus"]["files"]]
    record = {"op": "add", "corpus": added.meta["corpus"]["source"], "documents": len(docs), "keys": n,
              "files": files, "unreadable": unreadable}
    if heldout_copies:
        record["heldout_copies"] = list(heldout_copies)
    meta = {**_next_meta(ds, record), "count": n0 + n, "documents": [*ds.documents, *docs]}
    new = Datastore(ds.path, meta)
    staged = []
    if index is not None:
        from .scale.ivf import Adder

        adder = Adder(index)
        for lo in range(0, n, _CHUNK):  # ids are the new row numbers (after a removal, ntotal is not)
            adder.add(np.asarray(added.keys[lo: lo + _CHUNK], dtype=np.float32), n0 + lo)
        staged = _stage_index(ds, index, new, pending)
    write_json(pending / "meta.json", meta)
    commit(ds.path, ["meta.json", *staged], {"keys.npy": n0 + n, "vals.npy": n0 + n})
    log.info("added %d documents, %d keys to %s", len(docs), n, ds.path)
    return record


class _Paths:
    """Document names as the paths they spell, links in their folders resolved, each folder once (a table of a
    million names has a few folders; a linked file itself is a name of its own, as a build stores it)."""

    def __init__(self, ds: Datastore):
        # Stored relative names start in the folder the build ran in (meta.json's corpus "cwd"; an add run from
        # another folder stores its names absolute), and are also read from this command's folder (a datastore built
        # before that folder was recorded, or moved with its corpus: a different file of the same relative name is
        # then taken for the stored one).
        self.here = working_folder()
        self.roots = [r for r in dict.fromkeys([ds.meta["corpus"].get("cwd"), self.here]) if r is not None]
        self._folders: dict[str, str] = {}

    def _real(self, path: str) -> str:
        head, tail = os.path.split(os.path.normpath(path))
        if head not in self._folders:
            self._folders[head] = os.path.realpath(head)
        return os.path.join(self._folders[head], tail)

    def given(self, name: str) -> str:
        """The path a name given to this command spells (relative or absolute, ./ or not, through a linked folder or
        not: the same file)."""
        if os.path.isabs(name):
            return self._real(name)
        return self._real(os.path.join(self.here, name)) if self.here else os.path.normpath(name)

    def stored(self, name: str) -> list[str]:
        """The paths a stored name may spell; none for stdin's document."""
        if name == STDIN_NAME:
            return []
        if os.path.isabs(name):
            return [self._real(name)]
        return [self._real(os.path.join(root, name)) for root in self.roots]

    def all_stored(self, names) -> set[str]:
        return {p for n in names for p in self.stored(n)}


def _name_to_store(ds: Datastore, added: Datastore, name: str) -> str:
    """An added document's (or file's) name as ds stores it: as given where the add ran in the build's folder, else
    absolute (so that it names the same file from the build's folder, or wherever a datastore built before that
    folder was recorded was built)."""
    root, here = ds.meta["corpus"].get("cwd"), added.meta["corpus"].get("cwd")
    if name == STDIN_NAME or os.path.isabs(name) or here is None or here == root:
        return name
    return os.path.normpath(os.path.join(here, name))


def _files(ds: Datastore) -> set[str]:
    """The files the build and every add read, as stored."""
    records = [ds.meta["corpus"], *(u for u in ds.meta.get("updates", []) if u.get("op") == "add")]
    return {f["path"] for r in records for f in r.get("files", [])}


def _file_of(name: str, files: set[str]) -> str | None:
    """The file of a JSONL line's or a table row's document name ("path:N", path one of files), else None."""
    file, sep, n = name.rpartition(":")
    return file if sep and n.isdigit() and file in files else None


def _heldout_copies(held: dict[bytes, str], src) -> list[tuple[str, str]]:
    """(name, split) of each of src's documents whose text is a held-out document's (held: _digest(text) → split),
    under whatever name."""
    if not held:
        return []
    copies = []
    for ref in src.docs:
        try:
            text = src.read(ref)
        except (KNNLMError, OSError):  # unreadable: the build skips it (or fails, with --strict)
            continue
        if (split := held.get(_digest(text))) is not None:
            copies.append((ref.name, split))
    return copies


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _resolve(ds: Datastore, names: list[str]) -> list[list]:
    """The live document entries named (exactly, or as the same path), in table order."""
    spell = _Paths(ds)
    by_name: dict[str, list] = {}
    by_file: dict[str, list] = {}  # a JSONL or table file: all its documents
    files = _files(ds)
    for d in ds.live_documents:
        for key in dict.fromkeys([d[0], *spell.stored(d[0])]):
            by_name.setdefault(key, []).append(d)
        if (file := _file_of(d[0], files)) is not None:
            for key in dict.fromkeys([file, *spell.stored(file)]):
                by_file.setdefault(key, []).append(d)
    picked: dict[tuple, list] = {}
    for name in names:
        path = spell.given(name)
        hits = by_name.get(name) or by_name.get(path) or by_file.get(name) or by_file.get(path)
        if not hits and path in spell.all_stored(r[0] for r in ds.removed):
            raise KNNLMError(f"{name} was removed from {ds.path} already; `knnlm compact {ds.path}` drops its keys.")
        if not hits:
            raise KNNLMError(f"{name} is not a stored document of {ds.path}; `knnlm info {ds.path} --documents` "
                             "lists them.")
        for d in hits:
            picked[(d[0], d[1])] = d
    return sorted(picked.values(), key=lambda d: d[1])


def remove_documents(datastore: str | os.PathLike, names: list[str]) -> dict:
    """Remove documents by name: their ids leave the index and no search returns their rows again.

    Args:
        datastore: the datastore directory.
        names: document names as stored (a file path, "path:line", "path:row"), or any spelling of a stored
            file's path; a JSONL or table file's path names all its documents.

    Returns:
        The update record written to meta.json ("documents", "keys").
    """
    ds = open_datastore(datastore)
    if isinstance(names, (str, os.PathLike)):  # its characters are no names
        raise KNNLMError(f"names takes a list of document names, e.g. [{str(names)!r}], not one name.")
    if not names:
        raise KNNLMError("Name at least one document to remove.")
    docs = _resolve(ds, names)
    ids = np.concatenate([np.arange(d[1], d[1] + d[2], dtype=np.int64) for d in docs])
    index = _index_or_none(ds)
    pending = begin(ds.path)
    record = {"op": "remove", "documents": len(docs), "keys": int(ids.size), "names": [d[0] for d in docs]}
    meta = {**_next_meta(ds, record), "removed": [*ds.removed, *[[d[0], d[1], d[2]] for d in docs]]}
    new = Datastore(ds.path, meta)
    staged = []
    if index is not None:
        index = _removable(index)
        removed = index.remove_ids(faiss.IDSelectorBatch(ids))
        if removed != ids.size:
            raise KNNLMError(f"The index of {ds.path} held {removed} of the {ids.size} keys removed; rebuild it "
                             f"with `knnlm compact {ds.path}` and `knnlm train-index {ds.path}`.")
        staged = _stage_index(ds, index, new, pending)
    write_json(pending / "meta.json", meta)
    commit(ds.path, ["meta.json", *staged])
    log.info("removed %d documents, %d keys from %s", len(docs), ids.size, ds.path)
    return record


def _removable(index):
    """An index whose remove_ids keeps the other ids: a flat index renumbers, so it moves under an IDMap."""
    if not isinstance(index, faiss.IndexFlat):
        return index
    out = faiss.IndexIDMap2(faiss.IndexFlatL2(index.d))
    for lo in range(0, index.ntotal, _CHUNK):
        hi = min(index.ntotal, lo + _CHUNK)
        out.add_with_ids(index.reconstruct_n(lo, hi - lo), np.arange(lo, hi, dtype=np.int64))
    return out


def compact(datastore: str | os.PathLike) -> dict:
    """Rewrite the arrays without removed documents' rows, renumbering the index's ids to match.

    Args:
        datastore: the datastore directory.

    Returns:
        The update record written to meta.json ("documents", "keys" dropped, "count" after).
    """
    ds = open_datastore(datastore)
    if not ds.removed:
        return {"op": "compact", "documents": 0, "keys": 0, "count": ds.count}
    live = ds.live_ids()  # (n_live,) ascending
    index = _index_or_none(ds)
    pending = begin(ds.path)
    for name, arr, row in (("keys.npy", ds.keys, (ds.dim,)), ("vals.npy", ds.vals, ())):
        out = NpyAppender(pending / name, arr.dtype, row)
        for lo in range(0, len(live), _CHUNK):
            out.append(arr[live[lo: lo + _CHUNK]])
        out.finish()
    docs, start = [], 0
    for name, _old, count, first in ds.live_documents:
        docs.append([name, start, count, first])
        start += count
    record = {"op": "compact", "documents": len(ds.removed), "keys": ds.count - len(live), "count": len(live)}
    meta = {**_next_meta(ds, record), "count": len(live), "documents": docs, "removed": []}
    new = Datastore(ds.path, meta)
    staged = []
    if index is not None:
        index = _renumbered(index, live, new)
        staged = _stage_index(ds, index, new, pending)
    write_json(pending / "meta.json", meta)
    commit(ds.path, ["keys.npy", "vals.npy", "meta.json", *staged])
    log.info("compacted %s: dropped %d keys, %d remain", ds.path, record["keys"], len(live))
    return record


def _renumbered(index, live: np.ndarray, new: Datastore):
    """The index with old row ids replaced by their place in `live` (the compacted arrays)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # flat (under an IDMap after a removal): the compacted keys, in order
        flat = faiss.IndexFlatL2(new.dim)
        keys = np.load(new.path / PENDING / "keys.npy", mmap_mode="r")
        for lo in range(0, new.count, _CHUNK):
            flat.add(np.asarray(keys[lo: lo + _CHUNK], dtype=np.float32))
        return flat
    invlists = ivf.invlists  # in memory (_index_or_none refuses others)
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)  # a writable view of the list's ids
            ids[:] = np.searchsorted(live, ids)  # every id here is live, so this is its new row number
    return index


def describe_updates(meta: dict) -> dict:
    """Documents and keys added and removed over a datastore's history, and rows awaiting compact."""
    ups = meta.get("updates", [])
    total = {op: {"documents": sum(u["documents"] for u in ups if u["op"] == op),
                  "keys": sum(u["keys"] for u in ups if u["op"] == op)} for op in ("add", "remove")}
    pending = meta.get("removed", [])
    return {**total, "revision": meta.get("revision", 0),
            "awaiting_compact": {"documents": len(pending), "keys": sum(int(r[2]) for r in pending)}}

