"""Building a datastore: run the frozen LM over a corpus, stream keys and values to disk, resumably."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, journal
from .arrays import NpyAppender, json_safe, npy_header, replace_dir, write_json
from .corpus import DEFAULT_GLOB, STORE, Corpus, check_documents, iter_documents, open_corpus, working_folder
from .datastore import (FORMAT_VERSION, KEY_SOURCE, Datastore, datastore_path, finishing, foreign_entries,
                        has_build_files, open_datastore, parse_holdout, partial_dir, work_started)
from .errors import KNNLMError, settle, settle_text_fields
from .index import IndexConfig, train_index
from .lm import DEFAULT_MODEL, LM, load_lm, model_reference
from .windows import check_window, forward_owned, plan_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """Settings of `build-datastore`."""

    model: str = DEFAULT_MODEL  # hub id, local directory, .gguf file or the bundled default
    device: str | None = None  # torch device; None: cuda when available, else cpu
    trust_remote_code: bool = False  # run the model repository's own code (off unless asked)
    context: int = 512  # tokens per window: a key sees up to this many tokens, itself included
    stride: int = 256  # tokens a window advances; later windows own their last `stride` positions
    batch_size: int = 8  # windows per forward pass
    holdout: float = 0.05  # share of the corpus for each of the dev and test parts (0 turns it off)
    glob: str = DEFAULT_GLOB  # files of a folder corpus
    fmt: str = "auto"  # "auto" (by suffix / folder), "text", "jsonl", "parquet" or "hf" (corpus.FORMATS)
    text_field: str = "text"  # JSONL field or table column with a document's text
    strict: bool = False  # fail on the first unreadable file of a folder corpus; False: skip it, named in meta.json
    shuffle_seed: int | None = None  # shuffle document order with this seed; None: sorted order
    max_tokens: int | None = None  # at most this many keys (>= 1): the document that reaches it is cut; None: all
    block_windows: int = 64  # windows between checkpoints (sorted by length within a block)
    build_index: bool = True  # train the index at the end
    index: IndexConfig = field(default_factory=IndexConfig)  # index settings
    overwrite: bool = False  # replace an existing datastore (only once the new one is whole)
    resume: bool = False  # continue an interrupted build

    def __post_init__(self):
        # Refused here, before the model is loaded or any document read.
        for name in ("context", "stride", "batch_size", "block_windows"):
            settle(self, name, int, name, str(getattr(BuildConfig, name)))
        settle(self, "holdout", (int, float), "holdout", "0.05")
        settle(self, "max_tokens", int, "max_tokens", "100000", optional=True)
        settle(self, "shuffle_seed", int, "shuffle_seed", "0", optional=True)
        settle(self, "index", IndexConfig, "index", "IndexConfig()")
        settle_text_fields(self)
        check_window(self.context, self.stride)
        if not 0 <= self.holdout < 0.34:
            raise KNNLMError(f"--holdout {self.holdout} must be in [0, 0.34): it is the share of each of dev and test.")
        if self.batch_size < 1:
            raise KNNLMError(f"--batch-size {self.batch_size} must be at least 1 window per forward pass.")
        if self.block_windows < 1:
            raise KNNLMError(f"block_windows {self.block_windows} must be at least 1 window between checkpoints.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise KNNLMError(f"--max-tokens {self.max_tokens} must be at least 1; leave it out to store every token.")
        if self.build_index and self.max_tokens is not None:
            self.index.check_keys(self.max_tokens)


# Settings that must match for --resume to continue a build (the rest may change, e.g. batch size).
_RESUME_KEYS = ("context", "stride", "holdout", "glob", "fmt", "text_field", "shuffle_seed", "max_tokens",
                "block_windows")


_RESUME_NAMES = {"fmt": "--format", "block_windows": "block_windows", "model": "the model",
                 "corpus": "the corpus's files"}


class CannotResume(KNNLMError):
    """An interrupted build that --resume cannot continue (other settings, damaged files)."""


def check_resume_settings(work: Path, settings: dict) -> None:
    """Refuse to resume the build in work with other settings than it began with, naming each that differs."""
    then, now = _read_json(work, "settings.json"), json.loads(json.dumps(json_safe(settings)))  # as write_json wrote
    if then == now:
        return
    differ = []
    for key in [*now, *(k for k in then if k not in now)]:  # in the order the settings are written
        if then.get(key) != now.get(key):
            name = _RESUME_NAMES.get(key, "--" + key.replace("_", "-"))
            shown = "" if key in ("model", "corpus") else f" ({then.get(key)} then, {now.get(key)} now)"
            differ.append(name + shown)
    raise CannotResume(f"The interrupted build in {work} used other settings: {', '.join(differ)}; pass the same ones "
                       "to --resume, or --overwrite to start over.")


def _check_replaceable(out: Path) -> bool:
    """Refuse an out a build must not replace, even with --overwrite: a link, or a folder that is neither empty nor
    a datastore holding only what datastores hold (DATASTORE_ENTRIES): its files are not ours to lose. Returns
    whether out holds anything (a datastore, then)."""
    if out.is_symlink():
        raise KNNLMError(f"{out} is a symbolic link; pass --out the folder itself ({out.resolve()}).")
    if not out.exists():
        return False
    try:
        if not out.is_dir():
            raise KNNLMError(f"{out} is a file, not a folder; pass --out a folder.")
        names = os.listdir(out)
        foreign, meta = foreign_entries(out, names), (out / "meta.json").is_file()
    except OSError as e:
        raise KNNLMError(f"{out} cannot be read ({e.strerror}); pass --out a folder you can read and write.") from None
    if foreign:
        more = ", ..." if len(foreign) > 3 else ""
        raise KNNLMError(f"{out} holds files no datastore holds ({', '.join(foreign[:3])}{more}), so a build will not "
                         "replace it; pass --out a new folder, or move them out first.")
    if names and not meta:
        raise KNNLMError(f"{out} is not a datastore (it has no meta.json), so a build will not replace it; pass --out "
                         "a new folder, or remove it yourself first.")
    return bool(names)


@contextmanager
def claimed(out: Path):
    """Hold the work folder of a build of out (OUT.partial, made if missing) for the whole build, its index
    training included, so that a second build of out, or --resume of this one, is refused while this one runs
    (a killed build's hold ends with its process). A work folder left holding nothing but its lock is removed."""
    work = partial_dir(out)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KNNLMError(f"{work} cannot be made ({e.strerror}); pass --out a folder in a place you can write.") from None
    with ExitStack() as stack:
        busy = KNNLMError(f"Another build of {out} is running (it holds {work}); wait for it to finish, or build "
                          "into another --out.")
        try:
            stack.enter_context(journal.hold(work))
        except journal.ReadOnly:
            raise
        except KNNLMError:
            raise busy from None
        if not journal.holds_current_lock(work):  # taken as a build that held it let go: it moved or removed it
            raise busy
        try:
            yield work
        finally:
            if work.is_dir() and not work_started(work):  # nothing built: leave nothing behind
                shutil.rmtree(work)


WHOLE = {"whole": True}  # _prepare_dirs' checkpoint of a build killed after its last step but before its move


def _prepare_dirs(out: Path, cfg: BuildConfig, sharded: bool = False) -> tuple[Path, dict | None]:
    """Check what exists at out, changing nothing (its refusals need no model), and return (work dir, checkpoint,
    or WHOLE, or None: start afresh, see _fresh); a sharded build's checkpoint is its plan. Called inside
    claimed(out)."""
    work = partial_dir(out)
    if _check_replaceable(out) and not cfg.overwrite:  # an empty folder holds nothing to lose
        raise KNNLMError(f"{out} already exists; pass --overwrite to replace it (the old one is kept until "
                         "the new one is whole) or --out for another place.")
    started = work_started(work)
    if cfg.resume and started and (work / "meta.json").is_file() and not has_build_files(work):
        return work, WHOLE  # its bookkeeping already gone: the datastore is whole, only its move is left
    if started:
        ckpt = work / ("shards.json" if sharded else "progress.json")
        other = work / ("progress.json" if sharded else "shards.json")  # the other kind of build's checkpoint
        if cfg.resume and other.exists() and not ckpt.exists():
            raise CannotResume(f"The interrupted build in {work} was {'not ' if sharded else ''}sharded; resume "
                               f"it {'without' if sharded else 'with the same'} --shards, or pass --overwrite to "
                               "start over.")
        if cfg.resume and ckpt.exists():
            return work, _read_json(work, ckpt.name) if sharded else _read_progress(work)
        if not cfg.resume and not cfg.overwrite:
            raise KNNLMError(f"An interrupted build is in {work}; pass --resume to continue it or "
                             "--overwrite to start over.")
    elif cfg.resume:
        log.info("nothing to resume in %s; starting a new build", work)
    return work, None


def clear_work(work: Path) -> None:
    """Empty a claimed work folder but for its lock (removing the folder would end claimed()'s hold): a build
    started afresh (_prepare_dirs' checkpoint None) does so once its model is loaded."""
    for name in os.listdir(work):
        if name != journal.LOCK:
            path = work / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


_PROGRESS_KEYS = ("seq", "window", "rows", "scheduled", "docs_bytes", "holdout_bytes", "skipped", "heldout", "seconds")


def _damaged(work: Path, what: str) -> KNNLMError:
    """The error for an interrupted build whose files cannot be trusted."""
    return CannotResume(f"The interrupted build in {work} is damaged ({what}); pass --overwrite instead of --resume "
                        "to start over.")


def _read_json(work: Path, name: str):
    """A JSON file of a build in progress."""
    try:
        return json.loads((work / name).read_bytes())
    except FileNotFoundError as e:
        raise _damaged(work, f"{name} is missing") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(work, f"{name} is not valid JSON: {e}") from e


def _read_progress(work: Path) -> dict:
    """progress.json, checked for the fields and types resuming relies on."""
    s = _read_json(work, "progress.json")
    if not isinstance(s, dict):
        raise _damaged(work, "progress.json is not a JSON object")

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    # A build stopped inside a document needs where that document's keys began (to apply --max-tokens).
    counts = [k for k in _PROGRESS_KEYS if k not in ("heldout", "seconds")] + (["doc_start"] if s.get("window") else [])
    ok = (all(count(s.get(k)) for k in counts) and isinstance(s.get("seconds"), (int, float))
          and isinstance(s.get("heldout"), dict) and all(count(s["heldout"].get(k)) for k in ("dev", "test")))
    if not ok:
        raise _damaged(work, f"progress.json lacks or garbles some of {', '.join(_PROGRESS_KEYS)}")
    return s


def _check_partial(work: Path, s: dict, dim: int) -> None:
    """Refuse to resume from files shorter than the checkpoint says, or from a garbled document table."""
    header = len(npy_header(np.float16, (0, dim)))
    sizes = {"keys.npy": header + s["rows"] * dim * 2, "vals.npy": header + s["rows"] * 4,
             "docs.jsonl": s["docs_bytes"], "holdout.jsonl": s["holdout_bytes"]}
    for name, size in sizes.items():
        have = (work / name).stat().st_size if (work / name).is_file() else None
        if have is None or have < size:
            raise _damaged(work, f"{name} is {'missing' if have is None else f'{have} bytes'}, the checkpoint "
                                 f"needs {size}")
    _read_docs(work, s["docs_bytes"])
    with open(work / "holdout.jsonl", "rb") as f:
        try:
            parse_holdout(f.read(s["holdout_bytes"]))
        except ValueError as e:
            raise _damaged(work, f"holdout.jsonl {e}") from e


def _read_docs(work: Path, size: int | None = None) -> list:
    """The document table of a build: [name, first row, count, first token] per line (the first `size` bytes)."""
    with open(work / "docs.jsonl", "rb") as f:
        data = f.read() if size is None else f.read(size)
    docs = []
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            doc = json.loads(line)
            ok = (isinstance(doc, list) and len(doc) == 4 and isinstance(doc[0], str)
                  and all(isinstance(x, int) for x in doc[1:]))
        except ValueError:
            ok = False
        if not ok:
            raise _damaged(work, f"docs.jsonl line {lineno} is not [name, first row, count, first token]")
        docs.append(doc)
    return docs


def _new_state() -> dict:
    """The checkpoint state of a build that has not started."""
    return {"seq": 0, "window": 0, "rows": 0, "scheduled": 0, "docs_bytes": 0, "holdout_bytes": 0,
            "skipped": 0, "heldout": {"dev": 0, "test": 0}, "seconds": 0.0}


class _Writer:
    """The files of a build in progress, and its checkpoints."""

    def __init__(self, work: Path, dim: int, ckpt: dict | None):
        s = ckpt or _new_state()
        self.state, self.work = s, work
        self.keys = NpyAppender(work / "keys.npy", np.float16, (dim,), s["rows"])
        self.vals = NpyAppender(work / "vals.npy", np.int32, (), s["rows"])
        self.docs = self._open_log("docs.jsonl", s["docs_bytes"])
        self.holdout = self._open_log("holdout.jsonl", s["holdout_bytes"])
        self.t0 = time.time() - s["seconds"]

    def _open_log(self, name: str, size: int):
        """A JSONL file cut back to its checkpointed size, open for appending."""
        path = self.work / name
        path.touch()
        os.truncate(path, size)
        return open(path, "a")

    def checkpoint(self, seq: int, window: int) -> None:
        """Make everything written so far durable and record where to continue."""
        for a in (self.keys, self.vals):
            a.flush()
        for f in (self.docs, self.holdout):
            f.flush()
            os.fsync(f.fileno())
        self.state.update(seq=seq, window=window, rows=self.keys.rows, docs_bytes=self.docs.tell(),
                          holdout_bytes=self.holdout.tell(), seconds=time.time() - self.t0)
        write_json(self.work / "progress.json", self.state)

    def close(self) -> None:
        """Close files, leaving them resumable."""
        for a in (self.keys, self.vals):
            a.close()
        for f in (self.docs, self.holdout):
            f.close()


def _run_block(lm: LM, block: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys (fp16) and values of a block's owned positions, in block order; block items are (window, ids, labels)."""
    outs: list = [None] * len(block)
    for owned in forward_owned(lm, [(w, ids) for w, ids, _labels in block], batch_size, logits=False):
        for o in owned:
            outs[o.item] = o.keys.cpu().numpy()  # (n, d)
    k = np.concatenate(outs) if outs else np.zeros((0, lm.dim), np.float32)
    v = np.concatenate([labels for _w, _ids, labels in block]) if block else np.zeros(0, np.int32)
    k16 = k.astype(np.float16)
    if not np.isfinite(k16).all():
        raise KNNLMError("Some keys overflow float16 (|x| > 65504); this model's hidden states are too large "
                         "for the float16 datastore format.")
    return k16, v


def open_build(corpus: str | Corpus, out, cfg: BuildConfig, lm: LM | None) -> tuple[Path, Corpus, LM]:
    """(datastore path, corpus, model) of a build, with every check that can fail before any work; a corpus already
    opened (by `add`, which reads stdin once) is taken as it is."""
    out = datastore_path(out)
    src = corpus if isinstance(corpus, Corpus) else \
        open_corpus(corpus, cfg.glob, cfg.fmt, cfg.text_field, cfg.shuffle_seed, cfg.strict)
    check_documents(src)
    lm = lm or load_lm(cfg.model, cfg.device, cfg.trust_remote_code)
    check_window(cfg.context, cfg.stride, lm.max_positions)
    if cfg.build_index:
        cfg.index.check_factory(lm.dim)
    return out, src, lm


def build_datastore(corpus: str | Corpus, out: str | os.PathLike | None = None, cfg: BuildConfig = BuildConfig(),
                    lm: LM | None = None, progress=None) -> Datastore:
    """Build a datastore from a corpus.

    Args:
        corpus: a text file, a folder, a JSONL file, or "-" for stdin (see corpus.open_corpus); or a Corpus
            already opened with cfg's glob, format and text field.
        out: the datastore directory; None means $KNNLM_DATASTORE or datastores/default.
        cfg: build settings.
        lm: an already loaded model (else cfg.model is loaded).
        progress: optional callable taking the number of tokens just stored.

    Returns:
        The opened datastore. Interrupted, it leaves OUT.partial/ for `resume=True`.
    """
    path = datastore_path(out)
    with claimed(path):
        work, ckpt = _prepare_dirs(path, cfg)  # before the model loads
        out, src, lm = open_build(corpus, out, cfg, lm)
        if ckpt is WHOLE:
            return _move_in(check_whole(work, cfg, src, lm), out)
        return _build(lm, src, cfg, work, ckpt, out, progress)


def check_whole(work: Path, cfg: BuildConfig, src: Corpus, lm: LM) -> Path:
    """Refuse to move in the whole build in work (its bookkeeping gone: see _move_in) where its meta.json says it was
    of other settings, documents or another model than this build's; returns work."""
    meta = json.loads((work / "meta.json").read_text())
    c = meta["corpus"]
    then = {"context": meta["context"], "stride": meta["stride"], "holdout": meta["holdout"]["share"],
            "glob": c["glob"], "fmt": c["format"], "text_field": c["text_field"], "shuffle_seed": c["shuffle_seed"],
            "max_tokens": c["max_tokens"], "model": meta["model"]["fingerprint"], "corpus": c["files"]}
    now = json.loads(json.dumps(json_safe({k: getattr(cfg, k) for k in then if hasattr(cfg, k)}
                                          | {"model": lm.fingerprint, "corpus": src.files})))
    differ = [_RESUME_NAMES.get(k, "--" + k.replace("_", "-")) for k in then if then[k] != now.get(k)]
    if differ:
        raise CannotResume(f"The finished build in {work} used other settings: {', '.join(differ)}; pass the same "
                           "ones to --resume, or --overwrite to start over.")
    return work


def _build(lm: LM, src: Corpus, cfg: BuildConfig, work: Path, ckpt: dict | None, out: Path, progress) -> Datastore:
    """build_datastore's work, inside claimed(out), from _prepare_dirs' work dir and checkpoint."""
    settings = {k: getattr(cfg, k) for k in _RESUME_KEYS} | {"model": lm.fingerprint, "corpus": src.files}
    if ckpt is not None:
        check_resume_settings(work, settings)
        _check_partial(work, ckpt, lm.dim)
        if ckpt.get("done"):
            log.info("arrays already complete; finishing")
    else:
        clear_work(work)
        write_json(work / "settings.json", settings)

    w = _Writer(work, lm.dim, ckpt)
    s = w.state
    # Documents skipped before the checkpoint are not read again; those found at listing time are.
    src.unreadable[:] = list(dict.fromkeys([*s.get("unreadable", []), *src.unreadable]))
    try:
        if not s.get("done"):
            _fill(lm, src, cfg, w, progress)
        w.state["done"] = True
        w.checkpoint(w.state["seq"], w.state["window"])
    finally:
        w.close()
    if s["rows"] == 0:
        clear_work(work)
        raise src.no_tokens(cfg.holdout)
    return _finish(lm, src, cfg, w.work, w.state, out)


def _stream(lm: LM, src, cfg: BuildConfig, s: dict, write_doc, write_holdout):
    """(seq, window, token ids, labels) of every window from checkpoint state s on, in build order.

    Document and held-out records go to write_doc / write_holdout, counts into s. A dry run (sharding's
    plan) passes writers that drop them.
    """
    start_seq, start_win = s["seq"], s["window"]
    for seq, split, name, text in iter_documents(src, cfg.holdout, start_seq):
        if split != STORE:
            if text.strip():
                write_holdout(json.dumps({"split": split, "name": name, "text": text}) + "\n")
                s["heldout"][split] += 1
            continue
        resumed = seq == start_seq and start_win > 0
        if not resumed and cfg.max_tokens is not None and s["scheduled"] >= cfg.max_tokens:
            return
        ids = lm.encode(text)
        if len(ids) < 2:
            s["skipped"] += 1
            continue
        if not resumed:
            s["doc_start"] = s["scheduled"]
        if cfg.max_tokens is not None:  # the document that reaches --max-tokens is cut there
            ids = ids[: cfg.max_tokens - s["doc_start"] + 1]
        if not resumed:
            # Token j > 0 of this document is vals[start + j - 1]; token 0 is kept here.
            write_doc(json.dumps([name, s["scheduled"], len(ids) - 1, int(ids[0])]) + "\n")
            s["scheduled"] += len(ids) - 1
        for win in plan_windows(seq, len(ids), cfg.context, cfg.stride):
            if resumed and win.index < start_win:
                continue
            # A window's last position predicts the token just past it, so labels come from the document.
            labels = np.asarray(ids[win.own_from + 1: win.own_to + 1], dtype=np.int32)
            yield seq, win, ids[win.begin: win.end], labels


def _fill(lm: LM, src, cfg: BuildConfig, w: _Writer, progress, stop: tuple[int, int] | None = None) -> None:
    """Stream documents through the LM into the writer, checkpointing every block; a shard ends at checkpoint `stop`."""
    block: list = []

    def flush(seq: int, window: int) -> None:
        w.state["unreadable"] = list(src.unreadable)
        if block:
            k, v = _run_block(lm, block, cfg.batch_size)
            w.keys.append(k)
            w.vals.append(v)
            if progress:
                progress(len(v))
            block.clear()
        w.checkpoint(seq, window)

    for seq, win, ids, labels in _stream(lm, src, cfg, w.state, w.docs.write, w.holdout.write):
        block.append((win, ids, labels))
        # Blocks start every block_windows windows of the whole build, so a shard's forward passes are the
        # unsharded build's, and their keys equal to the bit.
        if len(block) >= cfg.block_windows:
            flush(seq, win.index + 1)
            if stop is not None and (seq, win.index + 1) == tuple(stop):
                return
    flush(len(src.docs) + 3, 0)


def _finish(lm: LM, src, cfg: BuildConfig, work: Path, s: dict, out: Path, index_runner=None) -> Datastore:
    """Seal the arrays in work (s: the build's counts), write meta.json, train the index, move it all to out."""
    import faiss
    import torch
    import transformers

    NpyAppender(work / "keys.npy", np.float16, (lm.dim,), s["rows"]).finish()
    NpyAppender(work / "vals.npy", np.int32, (), s["rows"]).finish()
    docs = _read_docs(work)
    seconds = s["seconds"]
    meta = {
        "format": FORMAT_VERSION,
        "model": {"name": model_reference(cfg.model), "fingerprint": lm.fingerprint, "vocab_size": lm.vocab_size,
                  "settings": lm.key_settings},
        "tokenizer": {"fingerprint": lm.tokenizer_fingerprint, "pipeline": lm.tokenizer_pipeline},
        "key_source": KEY_SOURCE,
        "dim": lm.dim,
        "dtype": {"keys": "float16", "vals": "int32"},
        "count": s["rows"],
        "context": cfg.context,
        "stride": cfg.stride,
        "holdout": {"share": cfg.holdout, "dev_documents": s["heldout"]["dev"],
                    "test_documents": s["heldout"]["test"],
                    "rule": "one document: its tail; several: every round(1/share)-th to dev, the next to test"},
        # cwd: where relative document names start (update.py compares names as paths from there)
        "corpus": {"source": src.source, "cwd": working_folder(), "glob": cfg.glob, "format": cfg.fmt,
                   "text_field": cfg.text_field, "shuffle_seed": cfg.shuffle_seed, "max_tokens": cfg.max_tokens,
                   "files": src.files,
                   "documents_skipped": s["skipped"],
                   "unreadable": {"count": len(src.unreadable), "names": src.unreadable}},
        "documents": docs,
        "build": {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
                  "tokens_per_s": round(s["rows"] / seconds, 1) if seconds else None,
                  "device": lm.device, "batch_size": cfg.batch_size, "shards": s.get("shards", 1),
                  "versions": {"knnlm": __version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "faiss": faiss.__version__}},
    }
    write_json(work / "meta.json", meta)
    with finishing(work):  # a datastore to this process alone until it is moved to out
        ds = open_datastore(work)
        if cfg.build_index:
            try:
                train_index(ds, cfg.index, runner=index_runner, fallback=True)
            except KNNLMError as e:
                raise KNNLMError(f"{e} The keys are kept in {work}: rerun with --resume and other index settings, "
                                 "or --no-index and `knnlm train-index` later.") from e
    return _move_in(work, out)


def _move_in(work: Path, out: Path) -> Datastore:
    """Make the finished build in work the datastore out. A datastore it replaces is locked for the move (refused
    while add, remove, compact, train-index or tune-lambda changes it: their work would land in the new one)."""
    kept = f"The new datastore is kept in {work}: rerun with --resume to finish it there."
    try:
        replaces = _check_replaceable(out)  # again: files may have appeared there during the build
    except KNNLMError as e:
        raise KNNLMError(f"{e} {kept}") from None
    with ExitStack() as stack:
        if replaces:  # the datastore it replaces: locked for the move, against add, remove, compact, train-index and
            try:  # tune-lambda, whose work would land in the new one
                stack.enter_context(journal.hold(out))
            except journal.ReadOnly as e:
                raise KNNLMError(f"{e} {kept}") from None
            except KNNLMError:
                raise KNNLMError(f"{out} is being changed by another process (knnlm add, remove, compact, train-index "
                                 "or tune-lambda); once it finishes, rerun with --resume to move in the new datastore "
                                 f"kept in {work}.") from None
        # Before the move, a datastore never holds them (a reader takes them for an interrupted build); settings.json
        # last: until it goes, readers refuse the folder, and once it has, --resume only moves it.
        for name in ("docs.jsonl", "shards.json", "progress.json", "settings.json"):
            (work / name).unlink(missing_ok=True)
        replace_dir(work, out)
    return open_datastore(out)
