"""A built datastore on disk: meta.json, keys.npy, vals.npy, held-out text; reading and checking it."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path

import numpy as np

from .arrays import own_names
from .errors import KNNLMError
from .journal import LOCK, recover

FORMAT_VERSION = 1
DEFAULT_DATASTORE = os.path.join("datastores", "default")  # used when neither a path nor $KNNLM_DATASTORE is given
DATASTORE_ENV = "KNNLM_DATASTORE"  # environment variable naming the datastore directory
KEY_SOURCE = "input of the output projection (lm_head): final hidden state after the final norm"
# Every name knnlm writes inside a datastore folder, the build's own bookkeeping included (removed once the build
# is whole, and arrays.atomic_path's temporaries): a build replaces a datastore holding nothing else
# (build._check_replaceable). Tests check that tuned datastores and one with an on-disk index hold nothing else.
DATASTORE_ENTRIES = ("meta.json", "keys.npy", "vals.npy", "holdout.jsonl", "index.faiss", "index.json",
                     "index-*.ivfdata", "lambda.json", "lambda.png", "mixing.safetensors", "dev-scores.h5", ".pending",
                     ".lock", ".added", ".added.partial", ".*.tmp-*", ".*.old-*", ".index.parts-*", "progress.json",
                     "settings.json", "docs.jsonl", "shards.json", "shards")


def foreign_entries(path: Path, names: list[str] | None = None) -> list[str]:
    """Sorted names in a folder (names: its listing, if already read) that are none of DATASTORE_ENTRIES."""
    names = os.listdir(path) if names is None else names
    return sorted(n for n in names if not any(fnmatch(n, pat) for pat in DATASTORE_ENTRIES))


def refuse_own_file(path: str | os.PathLike, root: str | os.PathLike, flag: str) -> None:
    """One sentence for an output file a user named that is one of a datastore's own (a DATASTORE_ENTRIES name in
    its folder): writing it, even with --overwrite, would break the datastore being read."""
    p = Path(os.path.abspath(path))
    if p.parent.resolve() == Path(root).resolve() and any(fnmatch(p.name, pat) for pat in DATASTORE_ENTRIES):
        raise KNNLMError(f"{flag} {path} is the datastore's own {p.name}, which writing there would replace; name a "
                         f"file outside {root}.")


def folder_of(datastore) -> Path:
    """The folder of a datastore given as a Datastore, a path, or None (the default one)."""
    return datastore.path if isinstance(datastore, Datastore) else datastore_path(datastore)


def check_unchanged(ds: "Datastore") -> None:
    """One sentence where the folder of an opened datastore now holds another build or revision (rebuilt with
    --overwrite, or changed by add, remove or compact since it was opened): for a command that took the datastore's
    lock after opening it, and would write what it made of the old keys into the new datastore."""
    try:
        now = open_datastore(ds.path).fingerprint
    except KNNLMError:
        now = None
    if now != ds.fingerprint:
        raise KNNLMError(f"{ds.path} was rebuilt or changed by another command after this one opened it; run this "
                         "command again.")


def partial_dir(out: Path) -> Path:
    """Where a build of the datastore out lives until it is whole."""
    return out.with_name(out.name + ".partial")


BUILD_FILES = ("settings.json", "shards.json", "progress.json")  # a build's own bookkeeping, in its work folder
_FINISHING: set[str] = set()  # work folders this process's builds are finishing (meta.json written, index next)


@contextmanager
def finishing(work: Path):
    """Let this process open the work folder of its own build as a datastore (to train its index) meanwhile."""
    key = str(Path(work).resolve())
    _FINISHING.add(key)
    try:
        yield
    finally:
        _FINISHING.discard(key)


def has_build_files(work: Path) -> bool:
    """Whether a folder holds a build's bookkeeping (BUILD_FILES)."""
    return any((work / name).exists() for name in BUILD_FILES)


def work_started(work: Path) -> bool:
    """Whether a build's work folder holds anything of a build: not only the lock a running build takes."""
    return work.is_dir() and any(name != LOCK for name in os.listdir(work))


def _interrupted_build(path: Path) -> bool:
    """Whether path is the work folder of a build (OUT.partial with a build's bookkeeping) no build here finishes."""
    return path.name.endswith(".partial") and has_build_files(path) and str(path.resolve()) not in _FINISHING


def datastore_path(path: str | os.PathLike | None) -> Path:
    """The datastore directory: the given one, $KNNLM_DATASTORE, or datastores/default."""
    return Path(path or os.environ.get(DATASTORE_ENV) or DEFAULT_DATASTORE)


@dataclass
class Datastore:
    """An opened datastore; arrays are memory-mapped, never read whole."""

    path: Path
    meta: dict
    _docs: np.ndarray | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Number of keys."""
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        """Key width."""
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str:
        """Identity of this build: model, tokenizer, count and build time."""
        m = self.meta
        fp = f"{m['model']['fingerprint']}-{m['tokenizer']['fingerprint']}-{m['count']}-{m['build']['finished']}"
        # Each add, remove or compact (knnlm.update) is a new revision: caches made before it are stale.
        return f"{fp}-r{m['revision']}" if m.get("revision") else fp

    @property
    def removed(self) -> list:
        """[name, first key row, key count] of each removed document whose rows `compact` has not yet dropped."""
        return self.meta.get("removed", [])

    @property
    def live_count(self) -> int:
        """Number of keys a search may return (count less the removed documents' rows)."""
        return self.count - sum(int(r[2]) for r in self.removed)

    @property
    def live_documents(self) -> list:
        """The document table's entries (see documents) not removed."""
        gone = {(r[0], r[1]) for r in self.removed}
        return [d for d in self.documents if (d[0], d[1]) not in gone]

    def live_ids(self) -> np.ndarray:
        """Row numbers a search may return, ascending."""
        keep = np.ones(self.count, dtype=bool)
        for _name, start, n in self.removed:
            keep[start: start + n] = False
        return np.flatnonzero(keep)

    @cached_property
    def keys(self) -> np.ndarray:
        """(N, d) float16 keys, memory-mapped."""
        return _open_array(self.path / "keys.npy", np.float16, (self.count, self.dim))

    @cached_property
    def vals(self) -> np.ndarray:
        """(N,) int32 next tokens, memory-mapped."""
        return _open_array(self.path / "vals.npy", np.int32, (self.count,))

    def values_of(self, ids: np.ndarray) -> np.ndarray:
        """int32 next tokens of key rows ids (any shape), -1 where an id is -1 (a missing neighbour)."""
        ids = np.asarray(ids)
        return np.where(ids >= 0, np.asarray(self.vals)[np.maximum(ids, 0)], -1).astype(np.int32)

    @property
    def documents(self) -> list:
        """[name, first key row, key count, first token] per stored document."""
        return self.meta["documents"]

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """Document number of each key row."""
        starts = np.array([d[1] for d in self.documents], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(rows), side="right") - 1

    def context_tokens(self, row: int, max_tokens: int = 64) -> tuple[str, int, list[int]]:
        """(document name, position, up to max_tokens token ids ending at key `row`'s token)."""
        d = int(self.locate(np.array([row]))[0])
        name, start, _count, first = self.documents[d]
        pos = row - start  # the key at `row` is the hidden state of token `pos` in its document
        lo = max(0, pos - max_tokens + 1)
        # Token j > 0 of a document is vals[start + j - 1]; token 0 is stored in the doc table.
        toks = [int(v) for v in self.vals[start + max(lo, 1) - 1: start + pos]]
        if lo == 0:
            toks = [first] + toks
        return name, pos, toks

    def heldout(self, split: str) -> list[tuple[str, str]]:
        """(name, text) of the held-out documents of a split ("dev" or "test")."""
        if split not in ("dev", "test"):
            raise KNNLMError(f"A datastore's held-out split is 'dev' or 'test', not {split!r}.")
        return [(name, text) for s, name, text in self.iter_heldout() if s == split]

    def heldout_names(self) -> dict[str, str]:
        """{name: split} of every held-out document, read a line at a time (no text kept)."""
        return {name: s for s, name, _ in self.iter_heldout()}

    def iter_heldout(self):
        """(split, name, text) of each held-out document, one at a time from holdout.jsonl (none without it)."""
        path = self.path / "holdout.jsonl"
        if not path.exists():
            return
        try:
            with open(path, "rb") as f:
                yield from iter_holdout(f)
        except ValueError as e:
            raise KNNLMError(f"{path} is damaged ({e}); rebuild the datastore with `knnlm build-datastore "
                             "--overwrite`, or pass --corpus.") from e

    def check_compatible(self, lm) -> None:
        """Refuse a model, tokenizer or key width other than the one this datastore was built with."""
        m = self.meta
        if lm.dim != self.dim:
            raise KNNLMError(f"Datastore {self.path} has keys of width {self.dim} but model {lm.name} gives "
                             f"{lm.dim}; use the model it was built with ({m['model']['name']}).")
        if lm.fingerprint != m["model"]["fingerprint"]:
            raise KNNLMError(f"Datastore {self.path} was built with another model ({m['model']['name']}, "
                             f"fingerprint {m['model']['fingerprint']}, not {lm.fingerprint}); "
                             "pass that model with --model, or rebuild the datastore.")
        then, now = m["model"].get("settings") or {}, lm.key_settings  # absent before settings were recorded
        for key in sorted(set(then) & set(now)):
            if not _same_setting(then[key], now[key]):
                raise KNNLMError(f"Datastore {self.path} was built with the same weights but {key} = "
                                 f"{json.dumps(then[key])}, not {json.dumps(now[key])}, which gives other keys; pass "
                                 f"the model as it was built with ({m['model']['name']}), or rebuild the datastore.")
        pipeline = m["tokenizer"].get("pipeline")  # absent before it was recorded
        if lm.tokenizer_fingerprint != m["tokenizer"]["fingerprint"] or (
                pipeline is not None and lm.tokenizer_pipeline != pipeline):
            raise KNNLMError(f"Datastore {self.path} was built with another tokenizer (another vocabulary, or another "
                             "normaliser, pre-tokeniser or merges); pass the model it was built with "
                             f"({m['model']['name']}) or rebuild the datastore.")


def _same_setting(a, b) -> bool:
    """Config values equal, numbers to float32's precision (a GGUF stores an epsilon as float32: 1e-05 reads back as
    9.999999747378752e-06). Dicts hold the same entries: rope_parameters names only what was set, and an entry on one
    side (YaRN's beta_fast, attention_factor) changes the keys."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_setting, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def parse_holdout(data: bytes) -> list[tuple[str, str, str]]:
    """(split, name, text) of each line of holdout.jsonl; ValueError naming the first line that is not one."""
    return list(iter_holdout(data.splitlines()))


def iter_holdout(lines):
    """(split, name, text) of each of holdout.jsonl's lines (an open file reads one at a time); ValueError naming
    the first line that is not one."""
    for lineno, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec["text"], str):
                raise TypeError(f"text is {type(rec['text']).__name__}, not a string")
            yield str(rec["split"]), str(rec["name"]), rec["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"line {lineno} is not a held-out document: {type(e).__name__}: {e}") from e


def _open_array(path: Path, dtype, shape: tuple) -> np.ndarray:
    """Memory-map a .npy file and check it has the dtype and shape meta.json promises."""
    if not path.exists():
        raise KNNLMError(f"{path} is missing; the datastore is incomplete: rebuild it with "
                         "`knnlm build-datastore --overwrite`.")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise KNNLMError(f"{path} is shorter than meta.json says ({shape[0]} rows) or damaged ({e}); "
                         "rebuild the datastore with `knnlm build-datastore --overwrite`.") from e
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise KNNLMError(f"{path} holds {arr.dtype} {arr.shape} but meta.json says {np.dtype(dtype)} {shape}; "
                         "rebuild the datastore with `knnlm build-datastore --overwrite`.")
    return arr


def read_meta(path: Path) -> dict:
    """meta.json of a datastore directory, checked for the fields readers rely on."""
    mp = path / "meta.json"
    if path.exists() and not path.is_dir():
        raise KNNLMError(f"{path} is a file, not a datastore folder; pass the folder `knnlm build-datastore` wrote "
                         "(its --out).")
    if not path.is_dir():
        resume = work_started(partial_dir(path))
        hint = " (an interrupted build can be continued with --resume)" if resume else ""
        kept = own_names(path, "old")  # set aside by a replacement cut short
        if kept:
            hint = (f" (a build replacing it was interrupted{': --resume finishes it, or' if resume else ';'} move "
                    f"{kept[0]} back to {path} to keep the old one)")
        raise KNNLMError(f"Datastore {path} does not exist{hint}; build one with `knnlm build-datastore CORPUS`"
                         " or name the folder of an existing one.")
    if _interrupted_build(path):
        out = path.with_name(path.name[:-len(".partial")])
        raise KNNLMError(f"{path} is an interrupted build of {out} (or one still running), not a datastore; once no "
                         f"build of {out} runs, finish it with `knnlm build-datastore CORPUS --out {out} --resume` (the "
                         "same corpus and settings), or remove it.")
    if not mp.exists():
        raise KNNLMError(f"{path} has no meta.json, so it is not a datastore; pass the folder of one, or build "
                         "one into a new folder with `knnlm build-datastore CORPUS --out NEW_FOLDER`.")
    try:
        meta = json.loads(mp.read_text())
        for key in ("format", "model", "tokenizer", "dim", "count", "documents", "build"):
            meta[key]
    except (ValueError, KeyError, TypeError) as e:
        raise KNNLMError(f"{mp} is corrupt ({e}); rebuild the datastore with `knnlm build-datastore --overwrite`.") from e
    if meta["format"] != FORMAT_VERSION:
        raise KNNLMError(f"{path} is a datastore of format {meta['format']}, this knnlm reads format "
                         f"{FORMAT_VERSION}; rebuild it with this version.")
    return meta


def open_datastore(path: str | os.PathLike | Datastore | None = None, check_arrays: bool = True) -> Datastore:
    """Open a datastore directory and check it is whole.

    Args:
        path: the directory (or an opened Datastore: its directory, read again as it now is); None means
            $KNNLM_DATASTORE or datastores/default.
        check_arrays: also check that keys.npy and vals.npy have the shape meta.json says.

    Returns:
        A Datastore; raises KNNLMError, with the fix, for anything missing or inconsistent.
    """
    if isinstance(path, Datastore):
        path = path.path
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise KNNLMError(f"A datastore is named by its folder (a str or Path) or an opened Datastore, not by "
                         f"{path!r} ({type(path).__name__}).")
    p = datastore_path(path)
    if p.is_dir():
        recover(p)  # an add, remove or compact killed halfway: finish it or undo it
    ds = Datastore(p, read_meta(p))
    if check_arrays:
        ds.keys, ds.vals  # noqa: B018 - opening them validates shape and dtype
    return ds
