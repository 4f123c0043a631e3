"""Nearest-neighbour search over a datastore: faiss index or exact, with exact re-ranking."""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .arrays import ROW_ORDER_MIN_ROWS, row_order, sort_rows
from .datastore import Datastore
from .errors import KNNLMError, expect, settle
from .index import flat_l2, load_index, read_index_info
from .torch_search import TorchExactIndex, parse_search_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalConfig:
    """How neighbours are found."""

    k: int = 1000  # neighbours per query
    nprobe: int = 8  # IVF lists visited per query
    rerank: bool = True  # recompute exact distances of the retrieved keys from keys.npy
    # re-rank only the first R candidates (by the index's distances; the rest keep those, raised to the
    # farthest re-ranked one: partial_rerank); None: all k. bench/rerank_depth.py gives the curve
    rerank_depth: int | None = None
    exact: bool = False  # brute-force search over keys.npy instead of the index (RAM: N·d·4 bytes)
    # exact search in torch on this device (a GPU) instead of the faiss index: keys.npy is copied there
    # (N·d·2 bytes on a GPU, N·d·4 on a CPU); None: faiss on the CPU (knnlm/torch_search.py)
    search_device: str | None = None
    # RetoMaton (knnlm/retomaton.py): follow the neighbours that predicted the actual next token to
    # their successors, and skip the search where at least min_knns of them remain.
    retomaton: bool = False
    min_knns: int = 50  # pointers needed to skip a search; above k it never skips (plain kNN-LM)
    # pointers plus their IVF lists' members ranked when skipping (at least k). 1000, not 2048, since the lists
    # nearest the query come first: on the code benchmark 1000 gave -0.03% against a full search, 2048 +0.02%
    max_candidates: int = 1000

    def __post_init__(self):
        for name in ("k", "nprobe", "min_knns", "max_candidates"):
            settle(self, name, int, name, str(getattr(RetrievalConfig, name)))
        settle(self, "rerank_depth", int, "rerank_depth", "128", optional=True)
        if self.min_knns < 1:
            raise KNNLMError(f"--min-knns {self.min_knns} must be at least 1 (pointers needed to skip a search).")
        if self.max_candidates < 1:
            raise KNNLMError(f"max_candidates {self.max_candidates} must be at least 1.")
        # Refused here: faiss takes nprobe 0 silently and visits no list, so every search finds nothing.
        if self.nprobe < 1:
            raise KNNLMError(f"--nprobe {self.nprobe} must be at least 1 (IVF lists visited per query).")
        if self.rerank_depth is not None and self.rerank_depth < 1:
            raise KNNLMError(f"--rerank-depth {self.rerank_depth} must be at least 1 (--no-rerank re-ranks none).")
        if self.rerank_depth is not None and (not self.rerank or self.search_device is not None):
            raise KNNLMError("--rerank-depth re-ranks part of the index's candidates; leave it out with "
                             f"{'--no-rerank' if not self.rerank else '--search-device'}.")
        if self.search_device is not None:
            parse_search_device(self.search_device)  # a bad name is refused before the model loads
        # Settings the chosen search would not read (the CLI refuses them as typed; here, as other than the default)
        if self.search_device is not None and (self.exact or not self.rerank):
            given = " and ".join(name for name, on in (("--exact", self.exact), ("--no-rerank", not self.rerank)) if on)
            raise KNNLMError(f"--search-device already searches exactly, so {given} would do nothing; leave "
                             f"{'them' if ' and ' in given else 'it'} out.")
        if (self.exact or self.search_device is not None) and self.nprobe != RetrievalConfig.nprobe:
            every = "--exact" if self.exact else "--search-device"
            raise KNNLMError(f"--nprobe picks the faiss index's lists, and {every} searches every key, so it would do "
                             "nothing; leave it out.")
        if not self.retomaton and (self.min_knns, self.max_candidates) != (RetrievalConfig.min_knns,
                                                                            RetrievalConfig.max_candidates):
            raise KNNLMError("--min-knns and --max-candidates only apply with --retomaton; add it or leave them out.")


def as_tensor(keys: np.ndarray) -> torch.Tensor:
    """A torch view of a (memory-mapped, read-only) array, without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the view is read-only; we only read it
        return torch.from_numpy(np.asarray(keys))


# Candidate rows (queries × candidates) per re-ranking thread: a batch splits over torch's threads once each
# gets this many (about 1.6 ms of work, against ~50 µs to hand it over); one query is never split.
RERANK_ROWS_PER_WORKER = 8192
_RERANK_BUFFERS = threading.local()  # each thread's gather and float32 widening buffers, kept between calls
KEEP_BUFFER_BYTES = 32 * 2**20  # a thread keeps buffers up to this size (k 2048 at d 576: 7 MB); larger are made per call


def _rerank_buffers(k: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's (k, d) buffers: the gathered rows in the keys' dtype, and their float32 widening (the same
    tensor for float32 keys).

    Kept from call to call, one pair per (dtype, d) (the document memory's float32 keys beside a datastore's
    float16 ones), grown when needed up to KEEP_BUFFER_BYTES: a fresh 2.3 MB float32 block per query (k 1000,
    d 576) cost about 40 µs of a 270 µs re-ranking, the allocator handing back new pages each time. They are
    made outside inference mode: a tensor made under torch.inference_mode cannot be written outside it.
    """
    held = getattr(_RERANK_BUFFERS, "held", None)
    if held is None:
        held = _RERANK_BUFFERS.held = {}
    pair = held.get((dtype, d))
    if pair is None or pair[0].shape[0] < k:
        with torch.inference_mode(False):  # ordinary tensors: writable in and out of inference mode
            widened = torch.empty((k, d), dtype=torch.float32)
            pair = (widened if dtype == torch.float32 else torch.empty((k, d), dtype=dtype), widened)
        if k * d * (4 + (0 if dtype == torch.float32 else pair[0].element_size())) <= KEEP_BUFFER_BYTES:
            held[(dtype, d)] = pair
    widened = pair[1][:k]
    return (widened if pair[0] is pair[1] else pair[0][:k]), widened


def _rerank_rows(q: np.ndarray, keys: torch.Tensor, rows_ids: torch.Tensor, out: np.ndarray) -> None:
    """Fill out (n, k) with squared L2 from each query to its own k rows (ids >= 0), one query at a time."""
    k, d = rows_ids.shape[1], keys.shape[1]
    gathered, widened = _rerank_buffers(k, d, keys.dtype)
    rows = widened.numpy()  # (k, d), shares widened's memory
    for i in range(len(q)):
        torch.index_select(keys, 0, rows_ids[i], out=gathered)
        if gathered is not widened:
            widened.copy_(gathered)
        faiss.fvec_L2sqr_ny(faiss.swig_ptr(out[i]), faiss.swig_ptr(q[i]), faiss.swig_ptr(rows), d, k)


_POOL: dict[int, ThreadPoolExecutor] = {}  # by size, made on first use
_POOL_LOCK = threading.Lock()  # two threads re-ranking at once must not both make (and leak) a pool


def _rerank_pool(size: int) -> ThreadPoolExecutor:
    """The shared pool of `size` threads, made once. exact_distances asks for torch's thread count, whatever
    share of it a batch uses, so that one pool (and its threads' buffers) serves every batch size."""
    with _POOL_LOCK:
        pool = _POOL.get(size)
        if pool is None:
            pool = _POOL[size] = ThreadPoolExecutor(size, thread_name_prefix="knnlm-rerank")
        return pool


_FORKED = False  # this process is a fork's child: torch ops fail on threads it starts (below)


def _forget_pools() -> None:
    """After fork, in the child: the parent's pool threads are gone (jobs would wait forever), its lock maybe held.

    And torch cannot start its thread state on the child's new threads once the parent set its thread
    count ("Invalid thread pool!"), so the child re-ranks in the calling thread.
    """
    global _POOL_LOCK, _FORKED
    _POOL_LOCK = threading.Lock()
    _POOL.clear()
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def exact_distances(queries: np.ndarray, keys: np.ndarray | torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """Squared L2 from each query to its own candidate rows: (n, k); inf where ids < 0.

    One query at a time: torch gathers its k rows (a memmap read in place, five times faster than
    numpy's fancy indexing), widened to float32 they stay in cache (k·d·4 bytes), and faiss computes
    the distances with SIMD; batching queries was slower, their rows no longer fit in cache. Batches
    of at least 2·RERANK_ROWS_PER_WORKER candidate rows are split over torch's threads (the gather
    and faiss release the GIL).
    """
    keys = keys if isinstance(keys, torch.Tensor) else as_tensor(keys)
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (n, d)
    out = np.empty(ids.shape, dtype=np.float32)
    rows_ids = torch.from_numpy(np.maximum(ids, 0).astype(np.int64))  # missing (-1) read row 0, then inf
    workers = 1 if _FORKED else max(1, min(torch.get_num_threads(), len(q), ids.size // RERANK_ROWS_PER_WORKER))
    if workers == 1:
        _rerank_rows(q, keys, rows_ids, out)
    else:
        pool = _rerank_pool(torch.get_num_threads())
        bounds = np.linspace(0, len(q), workers + 1).astype(int)
        parts = zip(bounds, bounds[1:])
        for job in [pool.submit(_rerank_rows, q[a:b], keys, rows_ids[a:b], out[a:b]) for a, b in parts]:
            job.result()
    out[ids < 0] = np.inf
    return out


def partial_rerank(index_dists: np.ndarray, head: np.ndarray) -> np.ndarray:
    """(n, k) distances: the first R columns (head, exact) re-ranked, the rest the index's own, raised to each
    row's farthest re-ranked distance: the index's distances run low (coarse codes much more so), and its
    tail must not outrank the candidates the index itself put first."""
    out = np.array(index_dists, dtype=np.float32)
    r = head.shape[1]
    out[:, :r] = head
    floor = np.max(np.where(np.isfinite(head), head, -np.inf), axis=1, keepdims=True)
    out[:, r:] = np.maximum(out[:, r:], floor)
    return out


def sort_partial_rerank(dists: np.ndarray, ids: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """sort_rows(dists, ids) of partial_rerank's rows, sorting only their first `depth` columns where the rest
    already follow them in order: the index's own ascending distances, raised to the farthest re-ranked one.

    A row whose tail is not ascending, or starts below one of its re-ranked distances (an inf or NaN among
    them), is sorted whole. Equal distances keep column order either way, so the result is sort_rows' to the
    bit; at k 1000 and depth 128, in eval's batches, it costs a third to a sixth of it. Fewer rows than
    ROW_ORDER_MIN_ROWS (a decoding step's one) take sort_rows itself: there the copies cost more than they save.
    """
    if not 0 < depth < dists.shape[1]:
        raise ValueError(f"depth {depth} must leave both a head and a tail of the {dists.shape[1]} columns")
    if len(dists) < ROW_ORDER_MIN_ROWS:
        return sort_rows(dists, ids)
    head = dists[:, :depth]
    tail = dists[:, depth:]
    whole = ~((tail[:, 0] >= head.max(axis=1)) & (tail[:, 1:] >= tail[:, :-1]).all(axis=1))
    order = row_order(head)
    dists, ids = dists.copy(), ids.copy()
    dists[:, :depth] = np.take_along_axis(head, order, axis=1)
    ids[:, :depth] = np.take_along_axis(ids[:, :depth], order, axis=1)
    if whole.any():
        dists[whole], ids[whole] = sort_rows(dists[whole], ids[whole])
    return dists, ids


def exact_index(ds: Datastore) -> faiss.Index:
    """A flat index over the datastore's keys, less removed documents' (their rows keep their numbers)."""
    flat = faiss.IndexFlatL2(ds.dim)
    live = ds.live_ids() if ds.removed else None
    index = flat if live is None else faiss.IndexIDMap2(flat)
    for lo in range(0, ds.count if live is None else len(live), 65_536):
        if live is None:
            index.add(np.asarray(ds.keys[lo: lo + 65_536], dtype=np.float32))
        else:
            ids = live[lo: lo + 65_536]
            index.add_with_ids(np.asarray(ds.keys[ids], dtype=np.float32), ids.astype(np.int64))
    return index


COARSE_MIN_QUERIES = 32  # batches from this size find their IVF lists in torch (CoarseAssigner); fewer, by few()
COARSE_BLOCK = 4 * 2**20  # query-to-centroid scores held at once (16 MiB), as faiss's flat search blocks them
COARSE_AXES = 64  # principal axes of the centroids whose projections bound a few queries' distances (few())
COARSE_FIRST = 32  # centroids of lowest bound measured first, for a k-th distance to prune the rest with
COARSE_BOUND_SLACK = 1e-4  # of ‖q‖² + max ‖c‖²: taken off the bound, for float32 rounding (d·2⁻²⁴ at d 576: 3.4e-5)
COARSE_MIN_REST = 1e-2  # a query with less of ‖q‖² outside the axes is measured against every centroid


class CoarseAssigner:
    """An IVF index's nearest lists found in torch: one matrix product and a top-k.

    faiss's flat quantizer keeps a heap per query over all nlist distances: at nlist 2048 and d 576 that costs
    three times the product itself. In batches (eval) this takes 20 µs a query (a fifth to a quarter) off the
    search of SmolLM2's 1M real keys. For a few queries (decoding) torch's overhead made it slower; few() finds
    their lists by a bound instead, reading a tenth of the centroids.
    """

    def __init__(self, ivf):
        flat = faiss.downcast_index(ivf.quantizer)
        self.centroids = torch.from_numpy(flat.reconstruct_n(0, flat.ntotal))  # (nlist, d) float32
        self.sq_norms = (self.centroids * self.centroids).sum(dim=1)  # (nlist,)
        self._max_sq_norm = float(self.sq_norms.max()) if len(self.sq_norms) else 0.0
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None  # few()'s, made on first use

    @staticmethod
    def applies(index) -> bool:
        """Whether index is an IVF index searched as it is (no transform or id map in front) over a flat L2 quantizer."""
        return isinstance(index, faiss.IndexIVF) and index.metric_type == faiss.METRIC_L2 and flat_l2(index.quantizer)

    def __call__(self, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances (n, nprobe) float32 ascending, list numbers (n, nprobe) int64) of queries (n, d);
        list -1 (none) for a query that is not finite, as faiss's quantizer gives it."""
        nprobe = min(nprobe, len(self.centroids))
        near, lists = np.empty((len(q), nprobe), np.float32), np.empty((len(q), nprobe), np.int64)
        step = max(1, COARSE_BLOCK // len(self.centroids))  # queries per block: (step, nlist) scores at a time
        for lo in range(0, len(q), step):
            qt = as_tensor(q[lo:lo + step])
            # ‖q‖² + ‖c‖² − 2 q·c in faiss's own order of operations, so that its distances round the same way
            dists = torch.addmm((qt * qt).sum(dim=1, keepdim=True) + self.sq_norms, qt, self.centroids.T, alpha=-2)
            d, i = torch.topk(dists, nprobe, dim=1, largest=False, sorted=True)
            near[lo:lo + step], lists[lo:lo + step] = d.numpy(), i.numpy()
        lists[~np.isfinite(near)] = -1
        return near, lists

    def _bound_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """(P (m, d): the centroids' first m principal axes, orthonormal; (nlist, m + 1): each centroid's
        projection Pc and the norm ‖Rc‖ of the part P leaves out), float32, computed in float64."""
        if self._bounds is None:
            c = self.centroids.double()
            centred = c - c.mean(dim=0)
            m = min(COARSE_AXES, c.shape[1])
            axes = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -m:].T.contiguous()  # (m, d)
            proj = c @ axes.T  # (nlist, m)
            rest = (c - proj @ axes).norm(dim=1, keepdim=True)  # ‖c − PᵀPc‖
            self._bounds = tuple(np.ascontiguousarray(x.float().numpy()) for x in (axes, torch.cat([proj, rest], 1)))
        return self._bounds

    def few(self, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances (n, nprobe) ascending, list numbers (n, nprobe)) of a few queries (decoding), found
        by reading a fraction of the centroids.

        One query's scan of every centroid is memory-bound (4.7 MB at nlist 2048, d 576, cold after the LM's
        forward pass). A lower bound first: with P the centroids' first m principal axes (orthonormal),
        ‖q − c‖² = ‖P(q − c)‖² + ‖R(q − c)‖² ≥ ‖Pq − Pc‖² + (‖Rq‖ − ‖Rc‖)², R = I − PᵀP, from (nlist, m + 1)
        numbers. The exact distances of the `first` lowest bounds give a k-th distance; every centroid
        whose bound is under it is then measured exactly, so the lists are those of a full scan, with
        faiss's fvec_L2sqr distances: bit for bit what faiss's flat search of one query gives, below the
        10,000 centroids from which faiss 1.15 scans one query's centroids by BLAS (other rounding, so
        near-ties may part). A query almost inside P's span, where ‖Rq‖ is lost to rounding, is measured
        against every centroid.
        """
        axes, proj = self._bound_parts()
        (nlist, d), m = self.centroids.shape, len(axes)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != d:
            raise ValueError(f"queries of shape {q.shape} for an index of width {d}")
        nprobe = min(nprobe, nlist)
        first = min(nlist, max(COARSE_FIRST, nprobe))
        cents = self.centroids.numpy()
        near, lists = np.full((len(q), nprobe), np.inf, np.float32), np.full((len(q), nprobe), -1, np.int64)
        qp, bound = np.empty(m + 1, np.float32), np.empty(nlist, np.float32)
        for i, x in enumerate(q):
            if not np.isfinite(x).all():
                continue  # faiss's quantizer gives such a query no list
            faiss.fvec_inner_products_ny(faiss.swig_ptr(qp), faiss.swig_ptr(x), faiss.swig_ptr(axes), d, m)
            # faiss's own norms: numpy's dot would wake OpenBLAS's threads, which then spin against torch's
            qq, pq = faiss.fvec_norm_L2sqr(faiss.swig_ptr(x), d), faiss.fvec_norm_L2sqr(faiss.swig_ptr(qp), m)
            if first < nlist and qq - pq >= COARSE_MIN_REST * qq:  # else ‖Rq‖² would be mostly rounding
                qp[m] = math.sqrt(qq - pq)  # ‖Rq‖
                # ‖(Pq, ‖Rq‖) − (Pc, ‖Rc‖)‖² is the bound; less the float32 rounding of its parts and distances
                faiss.fvec_L2sqr_ny(faiss.swig_ptr(bound), faiss.swig_ptr(qp), faiss.swig_ptr(proj), m + 1, nlist)
                bound -= COARSE_BOUND_SLACK * (qq + self._max_sq_norm)
                ids = np.argpartition(bound, first - 1)[:first]
                kth = np.partition(self._exact(x, cents, ids), nprobe - 1)[nprobe - 1]
                ids = np.flatnonzero(bound <= kth)  # every centroid that can be nearer than the k-th found
            else:
                ids = np.arange(nlist)
            dist = self._exact(x, cents, ids)
            order = np.lexsort((ids, dist))[:nprobe]  # ascending distance, ties by list number as faiss's heap
            near[i, :len(order)], lists[i, :len(order)] = dist[order], ids[order]
        lists[~np.isfinite(near)] = -1
        return near, lists

    @staticmethod
    def _exact(x: np.ndarray, cents: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """fvec_L2sqr from x to the centroids ids (gathered first: faiss's fvec_L2sqr_by_idx opens an OpenMP
        region, whose threads then spin against torch's). exact_distances computes the same numbers, but its
        torch gather and its handling of missing ids cost a decoding step 90 µs more in place
        (bench/decode_parts.py: the lists 254 against 341 µs)."""
        rows = np.take(cents, ids, axis=0)
        out = np.empty(len(ids), np.float32)
        faiss.fvec_L2sqr_ny(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(rows), x.shape[0], len(ids))
        return out


def check_ids(ds: Datastore, ids: np.ndarray) -> None:
    """Refuse ids past the keys: faiss reads an index.faiss with garbled ids without complaint."""
    if ids.size and int(ids.max()) >= ds.count:
        raise KNNLMError(f"{ds.path / 'index.faiss'} is damaged (it returns key {int(ids.max())} of "
                         f"{ds.count}); rebuild it with `knnlm train-index {ds.path}`.")


class Retriever:
    """Finds the k nearest stored keys of query vectors and their values."""

    def __init__(self, ds: Datastore, cfg: RetrievalConfig = RetrievalConfig()):
        expect(cfg, RetrievalConfig, "retrieval", "RetrievalConfig(k=1000)")
        self.ds, self.cfg = ds, cfg
        if cfg.k < 1:
            raise KNNLMError(f"--k {cfg.k} must be at least 1.")
        if ds.live_count == 0:  # every search would find nothing, and p_kNN would be silently absent
            raise KNNLMError(f"Datastore {ds.path} holds no keys a search may return (every document was removed); "
                             "add documents with `knnlm add`, or pass another datastore.")
        self._coarse: CoarseAssigner | None = None  # an IVF index's lists found in torch
        if cfg.search_device is not None:
            self.index = TorchExactIndex(ds.keys, parse_search_device(cfg.search_device),
                                         ds.live_ids() if ds.removed else None)
            self.kind = "exact"
        elif cfg.exact:
            self.index = exact_index(ds)
            self.kind = "exact"
        else:
            self.index = load_index(ds)
            self.kind = read_index_info(ds)["kind"]
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is not None:
                ivf.nprobe = min(cfg.nprobe, ivf.nlist)  # faiss's search takes no more; search_preassigned wants it so
            if CoarseAssigner.applies(self.index):
                self._coarse = CoarseAssigner(self.index)
                # search_preassigned runs on one thread in faiss's default mode 0; mode 3 splits the queries
                self.index.parallel_mode = 3
        # Also for exact search: faiss's float32 ‖q‖²+‖k‖²−2q·k loses digits that re-ranking restores.
        # The torch search's distances are already the keys' own (it ranks its candidates by them).
        self.rerank = cfg.rerank and cfg.search_device is None
        self._keys = as_tensor(ds.keys) if self.rerank else None
        # More neighbours than keys find nothing more, but every (queries, k) array would still be k wide.
        self.k = int(min(cfg.k, ds.count))
        if self.k < cfg.k:  # a warning where asked for; the default k on a small datastore is no news
            (log.info if cfg.k == RetrievalConfig.k else log.warning)(
                "--k %d is more than the %d keys of %s; searching for k %d (every key) instead", cfg.k, ds.count,
                ds.path, self.k)
        self.depth = min(cfg.rerank_depth or self.k, self.k)  # candidates re-ranked

    @property
    def follows_pointers(self) -> bool:
        """RetoMaton on and able to skip a search. With --min-knns above k no step can hold enough pointers (at most
        one per neighbour), so every step searches: the plain kNN-LM, run as it (bit for bit, without the pointer
        work, whose one-step batches also search in other groups than eval's, where near-ties may part)."""
        return self.cfg.retomaton and self.cfg.min_knns <= self.k

    @property
    def describe(self) -> dict:
        """What this search is, for reports and the scores cache: as asked (a k above the key count finds what
        k = the count finds, and is described as asked, so tuned values and caches made with it still match)."""
        # The torch search's distances are the keys' own, as re-ranked ones are (nothing left to re-rank): it is
        # described as re-ranked, which its setting says (a search device with --no-rerank is refused).
        k = self.cfg.k
        out = {"search": self.kind, "k": k, "nprobe": self.cfg.nprobe,
               "rerank": bool(self.cfg.rerank)}
        if self.rerank and (self.cfg.rerank_depth or k) < k:  # a partial re-ranking is another search
            out["rerank"] = f"first {self.cfg.rerank_depth}"
        if self.cfg.search_device is not None:  # only when set: the faiss searches' descriptions stay as they were
            out["search_device"] = str(self.index.device)
        if self.cfg.retomaton:  # only when on: caches made before RetoMaton existed still match a full search
            out["retomaton"] = f"min_knns {self.cfg.min_knns}, candidates {self.cfg.max_candidates}"
            # IVF lists nearest the query first (knnlm/retomaton.py): another ranking than the earlier "more pointers
            # first", so scores and tuned values made with that one no longer match
            if isinstance(self.index, faiss.Index) and faiss.try_extract_index_ivf(self.index) is not None:
                out["retomaton"] += ", nearest lists first"
        return out

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dists (n, k) ascending, ids (n, k), -1 where missing) for queries (n, d)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self._coarse is not None and self.index.nprobe <= self.index.nlist:
            many = len(q) >= COARSE_MIN_QUERIES
            coarse_dists, lists = (self._coarse if many else self._coarse.few)(q, self.index.nprobe)
            self.index.invlists.prefetch_lists(faiss.swig_ptr(lists), lists.size)  # on-disk lists: read ahead
            dists, ids = self.index.search_preassigned(q, self.k, lists, coarse_dists)
        else:
            dists, ids = self.index.search(q, self.k)
        check_ids(self.ds, ids)
        if self.rerank:
            if self.depth < ids.shape[1]:  # the first `depth` by the index's order
                dists = partial_rerank(dists, exact_distances(q, self._keys, ids[:, :self.depth]))
                dists, ids = sort_partial_rerank(dists, ids, self.depth)
            else:  # exact_distances gives float32 with inf where an id is missing: nothing left to mask
                return sort_rows(exact_distances(q, self._keys, ids), ids)
        dists = np.where(ids < 0, np.inf, dists).astype(np.float32)
        return dists, ids

    def neighbors(self, queries: np.ndarray, keep: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dists, ids, vals) for queries; vals are -1 where a neighbour is missing.

        keep: (n,) bool, or None for all: rows left out are not searched and get no neighbour
        (dist inf, id and value -1), the way a learned skip leaves them.
        """
        if keep is not None and not keep.all():
            n = len(queries)
            dists, ids = np.full((n, self.k), np.inf, np.float32), np.full((n, self.k), -1, np.int64)
            vals = np.full((n, self.k), -1, np.int32)
            if keep.any():
                dists[keep], ids[keep], vals[keep] = self.neighbors(np.asarray(queries)[keep])
            return dists, ids, vals
        dists, ids = self.search(queries)
        return dists, ids, self.ds.values_of(ids)
