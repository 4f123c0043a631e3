"""Training the FAISS index over a datastore's keys, and loading it."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from . import journal
from .arrays import write_json
from .datastore import Datastore, folder_of, open_datastore
from .errors import USER_ERRNOS, KNNLMError, expect, settle

log = logging.getLogger(__name__)

# Below this many keys an IVF-PQ index is not worth training (and k-means would be starved).
MIN_IVF_KEYS = 10_000
# Each PQ sub-quantizer is a k-means with 2^8 centroids, and faiss refuses to train one on fewer points.
PQ_CENTROIDS = 256
# Fields of index.json that readers use.
_INFO_KEYS = ("kind", "factory", "nlist", "code_size", "train_size", "reason", "count", "dim", "datastore",
              "total_seconds")


# IVF-PQ's precomputed table with on-disk lists: up to nlist 8192 at PQ64 (about 16M keys). At 10M keys it
# takes eval's retrieval from 0.71 to 0.48-0.59 ms per token (bench/eval.py) for 512 MiB, and search memory
# stays within 1 GB of the model's (800 MiB); larger indexes go without it, so memory stays bounded (load_index)
ON_DISK_TABLE_MAX_BYTES = 512 * 2**20


@dataclass(frozen=True)
class IndexConfig:
    """How to build the index; None fields are chosen from the number of keys."""

    nlist: int | None = None  # IVF lists; None: the power of two nearest 2·sqrt(N)
    code_size: int = 64  # PQ sub-quantizers: bytes per key (half that with fast_scan); lowered to divide d
    train_size: int | None = None  # keys sampled to train (>= 256 and >= nlist); None: min(N, max(256, 64·nlist))
    seed: int = 0  # seeds the training sample and k-means
    add_chunk: int = 65_536  # keys converted and added per step, bounding RAM
    exact: bool = False  # force an exact (flat) index whatever N
    on_disk: bool = False  # IVF inverted lists in a file beside index.faiss, memory-mapped at search time
    # any faiss index_factory string, e.g. "IVF1024,PQ64x4fs" or "OPQ64,IVF1024_HNSW32,PQ64" (metric L2;
    # re-ranking stays on the full fp16 keys); None: IVF{nlist},PQ{code_size}[x4fs] chosen from N, exact when N is small
    factory: str | None = None
    # the default index with 4-bit fast-scan PQ codes (IVF{nlist},PQ{m}x4fs: SIMD lookups, half the bytes):
    # with SmolLM2's keys 2-3x the queries/s at the same re-ranked perplexity, but coarser candidates
    # (with a small test model's keys 2% off exact search where 8-bit codes are within 1%), so not the
    # default; in RAM only (faiss's on-disk lists cannot hold its blocks)
    fast_scan: bool = False

    def __post_init__(self):
        for name in ("code_size", "seed", "add_chunk"):
            settle(self, name, int, name, str(getattr(IndexConfig, name)))
        for name, example in (("nlist", "1024"), ("train_size", "65536")):
            settle(self, name, int, name, example, optional=True)
        if self.seed < 0:
            raise KNNLMError(f"--seed {self.seed} must not be negative.")
        if self.factory is not None and self.on_disk and not self.exact:
            raise KNNLMError(f"--on-disk keeps the default IVF-PQ index's lists on disk, not a --factory index's "
                             f"({self.factory!r}); leave out one of the two.")
        if self.factory is not None and not self.exact and (self.nlist is not None
                                                            or self.code_size != IndexConfig.code_size):
            raise KNNLMError(f"--nlist and --code-size shape the default index; the --factory string {self.factory!r} "
                             "names its own lists and codes, so they would do nothing; leave them out.")
        if self.factory is not None and self.fast_scan and not self.exact:
            raise KNNLMError(f"--fast-scan chooses the default index's codes; the --factory string {self.factory!r} "
                             "names its own (fast-scan ends in x4fs); leave out one of the two.")
        if self.fast_scan and self.on_disk and not self.exact:
            raise KNNLMError("--fast-scan codes cannot live in faiss's on-disk inverted lists; leave out --fast-scan "
                             "or --on-disk.")
        if self.code_size < 1:
            raise KNNLMError(f"--code-size {self.code_size} must be at least 1 (PQ bytes per key).")
        if self.nlist is not None and self.nlist < 1:
            raise KNNLMError(f"--nlist {self.nlist} must be at least 1.")
        if self.add_chunk < 1:
            raise KNNLMError(f"add_chunk {self.add_chunk} must be at least 1.")
        if self.train_size is not None and not self.exact:
            need = max(PQ_CENTROIDS, self.nlist or 0)
            if self.train_size < need:
                raise KNNLMError(f"--train-size {self.train_size} is too small: training IVF-PQ needs at least "
                                 f"{need} keys ({_needs(self.nlist)}); pass --train-size {need} or more.")

    def check_factory(self, dim: int) -> None:
        """Refuse, before any work, a --factory string faiss cannot build for keys of width dim."""
        if self.factory is not None and not self.exact:
            make_factory_index(self.factory, dim)

    def check_count(self, n: int, what: str = "this datastore has", more: str = "") -> None:
        """Refuse an explicit --nlist that n keys cannot train: choose_params would take an exact index instead.
        what: how n reads in the sentence; more: another way out, e.g. ", a larger --max-tokens"."""
        if self.nlist is None or self.exact or self.factory is not None or n >= ivf_min_keys(self.nlist):
            return
        if n < MIN_IVF_KEYS:
            raise KNNLMError(f"--nlist {self.nlist} asks for an IVF-PQ index, which needs at least {MIN_IVF_KEYS} "
                             f"keys; {what} {n} keys: leave out --nlist{more} (so few keys take an exact index).")
        raise KNNLMError(f"--nlist {self.nlist} needs at least {ivf_min_keys(self.nlist)} keys to train (39 a list); "
                         f"{what} {n} keys: pass --nlist {n // 39} or less{more}, or leave it out.")

    def check_keys(self, n_max: int) -> None:
        """Refuse, before any keys exist, settings whose index could not be trained on up to n_max keys."""
        if self.factory is not None and not self.exact:
            return  # a --factory index is checked by check_factory once the key width is known
        self.check_count(n_max, "--max-tokens allows at most", ", a larger --max-tokens")
        p = choose_params(n_max, 1, self, check=False)
        if p["kind"] == "ivfpq" and self.train_size is not None and p["train_size"] < p["nlist"]:
            raise KNNLMError(f"--train-size {self.train_size} is too small for the index of up to {n_max} keys "
                             f"(--max-tokens): IVF{p['nlist']} needs at least {p['nlist']} training keys; pass "
                             f"--train-size {p['nlist']} or more, or a smaller --nlist.")


FACTORY_EXAMPLE = "IVF1024,PQ64x4fs"


def make_factory_index(factory: str, dim: int):
    """faiss.index_factory(dim, factory) under L2, or one sentence naming the bad string and an example."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except (RuntimeError, ValueError, TypeError) as e:
        lines = str(e).strip().splitlines() or [""]
        reason = lines[-1].rsplit(": ", 1)[-1] if "Error in" in lines[-1] else lines[-1]  # faiss's own words
        raise KNNLMError(f"--factory {factory!r} is not a faiss index factory string for keys of width {dim} "
                         f"({reason.rstrip('.')}); pass one such as --factory {FACTORY_EXAMPLE}.") from None


def _factory_params(n: int, d: int, cfg: IndexConfig) -> dict:
    """Parameters of a --factory index over n keys of width d: nlist (if IVF), code size, training sample."""
    index = make_factory_index(cfg.factory, d)
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else None
    train = 0 if index.is_trained else min(n, cfg.train_size or max(PQ_CENTROIDS, 64 * (nlist or 1)))
    if nlist and train and train < nlist:
        raise KNNLMError(f"--factory {cfg.factory!r} has {nlist} IVF lists but only {train} keys to train them on; "
                         f"pass a smaller IVF (e.g. IVF{max(1, train // 39)}) or --train-size {nlist} or more.")
    try:
        code_size = int(index.sa_code_size())
    except RuntimeError:  # graph indexes (HNSW) have no standalone code
        code_size = None
    return {"factory": cfg.factory, "kind": "factory", "nlist": nlist, "code_size": code_size,
            "train_size": train, "reason": "--factory"}


def ivf_min_keys(nlist: int) -> int:
    """Keys an IVF-PQ index of nlist lists is trained from at the least; fewer take an exact index."""
    return max(MIN_IVF_KEYS, 39 * nlist)


def _needs(nlist: int | None) -> str:
    """Why training needs that many keys, in words."""
    pq = f"{PQ_CENTROIDS} for the PQ codebooks"
    return f"{pq} and {nlist} for the IVF lists" if nlist and nlist > PQ_CENTROIDS else pq


def choose_params(n: int, d: int, cfg: IndexConfig, check: bool = True) -> dict:
    """Factory string and parameters for n keys of width d; refuses (when check) a training sample too small."""
    if cfg.factory is not None and not cfg.exact:
        return _factory_params(n, d, cfg)
    nlist = cfg.nlist or max(16, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))
    if cfg.exact or n < ivf_min_keys(nlist):
        reason = ("forced by --exact" if cfg.exact  # the count when trained: adds and removes change it since
                  else f"trained over {n} keys, too few for IVF-PQ (needs {ivf_min_keys(nlist)})")
        return {"factory": "Flat", "kind": "exact", "reason": reason, "nlist": None, "code_size": None,
                "train_size": 0}
    m = max(c for c in range(1, min(cfg.code_size, d) + 1) if d % c == 0)
    # 64 keys per list, but never fewer than PQ's codebooks need.
    train = min(n, cfg.train_size or max(PQ_CENTROIDS, 64 * nlist))
    if check and train < max(nlist, PQ_CENTROIDS):
        need = max(nlist, PQ_CENTROIDS)
        raise KNNLMError(f"--train-size {cfg.train_size} is too small for IVF{nlist},PQ{m} over {n} keys: training "
                         f"needs at least {need} keys ({_needs(nlist)}); pass --train-size {need} or more, "
                         "or a smaller --nlist.")
    return {"factory": f"IVF{nlist},PQ{m}" + ("x4fs" if cfg.fast_scan else ""), "kind": "ivfpq", "nlist": nlist,
            "code_size": m, "train_size": train, "reason": "chosen from N" if cfg.nlist is None else "as given"}


def _chunks(n: int, size: int):
    """(lo, hi) ranges covering [0, n)."""
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _refuse_removed(ds: Datastore) -> None:
    if ds.removed:  # the index would hold their keys again
        raise KNNLMError(f"Datastore {ds.path} has removed documents whose keys are still in its arrays; run "
                         f"`knnlm compact {ds.path}` first, then train the index.")


def check_retrain(ds: Datastore, cfg: IndexConfig) -> None:
    """Refuse, before any work, an index train_index would not make as asked of this datastore: one with removed
    documents, a bad --factory, or an --nlist its keys cannot train (train_index itself would take an exact
    index then, as a build of unknown size must)."""
    _refuse_removed(ds)
    cfg.check_factory(ds.dim)
    cfg.check_count(ds.count)


def train_index(ds: Datastore, cfg: IndexConfig = IndexConfig(), progress=None, runner=None,
                fallback: bool = False) -> dict:
    """Train and fill the index for a datastore; writes index.faiss and index.json atomically.

    Args:
        ds: an opened datastore.
        cfg: index settings.
        progress: optional callable taking the number of keys just added.
        runner: adds the keys in parts sharing the trained quantizer (knnlm.scale.engines, e.g. Ray
            tasks); None: in this process (in one part when cfg.on_disk).
        fallback: take an exact index, with a warning, where cfg's --nlist is more than the keys can train (a
            build that could not know its size); False: refuse it (check_retrain), before any work.

    Returns:
        The content of index.json.
    """
    expect(cfg, IndexConfig, "cfg", "IndexConfig()")
    path = folder_of(ds)  # a folder, as every other function takes
    with journal.hold(path):  # no add, remove or compact meanwhile: the index covers the keys it was trained on
        ds = open_datastore(path)  # as the last change before the hold left it
        if fallback:
            _refuse_removed(ds)
        else:
            check_retrain(ds, cfg)
        return _train_index(ds, cfg, progress, runner)


def _train_index(ds: Datastore, cfg: IndexConfig, progress, runner) -> dict:
    from .scale.ivf import Adder, train_ivf

    n, d = ds.count, ds.dim
    p = choose_params(n, d, cfg)
    t0 = time.time()
    index = make_factory_index(p["factory"], d)
    if p["kind"] == "exact":  # louder where --nlist asked for IVF (a build of unknown size may not reach it)
        (log.warning if cfg.nlist is not None and not cfg.exact else log.info)("exact (flat) index: %s", p["reason"])
    elif p["train_size"]:
        rng = np.random.default_rng(cfg.seed)
        # Sorted rows read the memmap sequentially.
        sample = np.sort(rng.choice(n, size=p["train_size"], replace=False))
        xt = np.asarray(ds.keys[sample], dtype=np.float32)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.seed = cfg.seed
        # faiss trains each 9-dim PQ sub-quantizer with up to 65k points and 25 iterations by
        # default: 50 s on 2 cores for 64 of them. 16k points and 15 iterations cost a quarter, and
        # exact re-ranking makes up the small loss in code quality.
        pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
        if pq is not None:
            pq.cp.max_points_per_centroid, pq.cp.niter, pq.cp.seed = 64, 15, cfg.seed
            # faiss warns (one stderr line per sub-quantizer, up to 64) below 39 points a centroid; that sample is
            # chosen here. The setting does nothing else (faiss's Clustering reads it for that warning only).
            pq.cp.min_points_per_centroid = 1
        # faiss's factory turns on polysemous training (an annealing that renumbers PQ centroids for
        # Hamming pre-filtering, which no search here uses): most of the training time, for nothing.
        if hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
            faiss.downcast_index(ivf).do_polysemous_training = False
        log.info("training %s on %d keys", p["factory"], len(xt))
        train_ivf(index, xt, cfg.seed)
        del xt
    t_train = time.time() - t0
    lists = {"lists": "in RAM"}
    if p["kind"] == "ivfpq" and (cfg.on_disk or runner is not None):
        from .scale.engines import LocalRunner
        from .scale.ivf import fill_in_parts

        lists = fill_in_parts(index, ds, cfg, runner or LocalRunner(), progress)
    else:
        if cfg.on_disk:
            log.info("--on-disk applies to IVF indexes; this exact index stays in RAM")
        adder = Adder(index)
        for lo, hi in _chunks(n, cfg.add_chunk):
            adder.add(np.asarray(ds.keys[lo:hi], dtype=np.float32), lo)
            if progress:
                progress(hi - lo)
    info = {**p, **lists, "metric": "L2", "count": n, "dim": d, "seed": cfg.seed, "config": asdict(cfg),
            "train_seconds": round(t_train, 2), "total_seconds": round(time.time() - t0, 2),
            "datastore": ds.fingerprint,
            # Caches and tuned values name the index they were made with: a retrain is a new index.
            "trained": f"{datetime.now(timezone.utc).isoformat()} {uuid.uuid4().hex[:12]}"}
    pending = journal.begin(ds.path)
    try:
        staged = stage_index(pending, index, info)
    except BaseException:
        journal.recover(ds.path)  # uncommitted: thrown away
        raise
    journal.commit(ds.path, staged)
    for old in ds.path.glob("index-*.ivfdata"):  # lists of an index just replaced, or of a killed training
        if old.name != info.get("ivfdata"):
            old.unlink()
    return info


def stage_index(pending: Path, index, info: dict) -> list[str]:
    """Write index.faiss and index.json into a journal's staging folder, to be committed together (caches and tuned
    values know an index by index.json's stamp); the names staged."""
    write_index_file(index, pending / "index.faiss")
    write_json(pending / "index.json", info)
    return ["index.faiss", "index.json"]


def write_index_file(index, path: str | os.PathLike) -> None:
    """faiss.write_index, with a full disk or a refused write raised as the OSError it is (faiss raises a
    RuntimeError)."""
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as e:
        code = next((c for c in USER_ERRNOS if os.strerror(c) in str(e)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def read_index_info(ds: Datastore) -> dict | None:
    """index.json of a datastore, or None if it has no index; a damaged one is refused."""
    path = ds.path / "index.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not an object")
        missing = [k for k in _INFO_KEYS if k not in info]
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise KNNLMError(f"{path} is damaged ({e}); rebuild the index with `knnlm train-index {ds.path}`.") from e
    if missing or info["kind"] not in ("exact", "ivfpq", "factory"):
        raise KNNLMError(f"{path} is damaged (it lacks {', '.join(missing) or 'a known kind'}); rebuild the index "
                         f"with `knnlm train-index {ds.path}`.")
    return info


def flat_l2(index) -> bool:
    """Whether index (an IVF's quantizer, say) is a flat L2 index: every centroid ranked exactly."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat) and index.metric_type == faiss.METRIC_L2


@contextmanager
def _c_stdout_silenced():
    """Drop what C code prints to stdout (fd 1) meanwhile: faiss prints "IO_FLAG_ONDISK_SAME_DIR: updating ondisk
    filename ..." there at every read of on-disk lists (its errors come as exceptions), and stdout belongs to
    --json's output. Best effort: with stdout closed or missing there is nothing to protect."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # a closed stdout, or no fd 1
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no /dev/null: to stderr, as stdout is --json's
        null = os.dup(2)
    libc = ctypes.CDLL(None)
    try:
        libc.fflush(None)
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)  # C's buffered stdout, before fd 1 is stdout again
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def load_index(ds: Datastore):
    """The datastore's faiss index, checked against its keys."""
    info = read_index_info(ds)
    path = ds.path / "index.faiss"
    if info is None or not path.exists():
        raise KNNLMError(f"Datastore {ds.path} has no index; build one with `knnlm train-index {ds.path}` "
                         "or search exactly with --exact.")
    if info.get("datastore") != ds.fingerprint or info.get("count") != ds.count:
        raise KNNLMError(f"The index in {ds.path} was built for other keys; rebuild it with "
                         f"`knnlm train-index {ds.path}`.")
    # IVF-PQ's precomputed distance table (nlist·M·256 floats, made when the index is read) grows with
    # nlist: 128 MiB at 1M keys, 512 MiB at 10M. It speeds the search. An on-disk index is the choice
    # of bounded memory, so past this bound faiss computes those terms per query instead (searches
    # about 1.5x slower); in RAM faiss's own bound (2 GiB) holds.
    table_max = faiss.cvar.precomputed_table_max_bytes
    if info.get("lists") == "on-disk":
        faiss.cvar.precomputed_table_max_bytes = min(table_max, ON_DISK_TABLE_MAX_BYTES)
    try:
        # On-disk inverted lists are found beside index.faiss, wherever the datastore has moved.
        with _c_stdout_silenced() if info.get("lists") == "on-disk" else nullcontext():
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
            except (RuntimeError, MemoryError, ValueError, OSError) as e:  # a garbled size: MemoryError
                raise KNNLMError(f"{path} is damaged (faiss cannot read it); rebuild it with "
                                 f"`knnlm train-index {ds.path}`.") from e
    finally:
        faiss.cvar.precomputed_table_max_bytes = table_max
    if index.ntotal != ds.live_count or index.d != ds.dim:  # removed documents' keys have left the index
        raise KNNLMError(f"{path} holds {index.ntotal} keys of width {index.d}, the datastore "
                         f"{ds.live_count} of width {ds.dim}; rebuild it with `knnlm train-index {ds.path}`.")
    return index
