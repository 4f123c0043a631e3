"""RetoMaton (Alon et al. 2022): the datastore read as an automaton whose pointers save searches.

Entry i's successor is entry i+1 of the same document. After position t, the neighbours whose
stored value is the token that actually came next hand their successors to t+1 as pointers. With
at least `min_knns` pointers the search at t+1 is skipped: the pointers and the other members of
their IVF lists (the lists whose centroids are nearest the query first) are the candidates, ranked
by exact distance from keys.npy. With fewer, t+1 is searched as plain kNN-LM would (so `min_knns`
above k gives plain kNN-LM exactly).

Pure functions over numpy arrays; id arrays are (B, width) padded with -1. A chain is the
sequence of positions one pointer state runs over (a window's owned positions in eval, the
decoded tokens in generation); `chain_neighbors` steps over positions with all chains together.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import faiss
import numpy as np
import torch
from faiss.contrib.inspect_tools import get_invlist

from .arrays import sort_rows, unique_sorted
from .retrieval import Retriever, exact_distances


@dataclass(frozen=True)
class Automaton:
    """What the pointers need of a datastore: where its documents start, and the index's clusters."""

    count: int  # N, keys in the datastore
    starts: np.ndarray  # (D,) int64 sorted first rows of the documents that hold keys
    list_of: np.ndarray | None  # (N,) int32 IVF list of each key; None: no clusters (exact index)
    offsets: np.ndarray | None  # (nlist + 1,) int64: list l's members are members[offsets[l]:offsets[l+1]]
    members: np.ndarray | None  # (N,) int32 key ids grouped by list (those the index holds)
    # (nlist, d') float32: list l's centroid, where the index's quantizer gives them; None: lists by pointers held
    centroids: np.ndarray | None = None
    # the faiss IndexPreTransform whose chain (a PCA, OPQ) takes a query into the centroids' space, or None; held
    # here, as its chain's transforms live only as long as it does
    pretransform: object = None

    @cached_property
    def centroid_norms(self) -> torch.Tensor:
        """(nlist,) ‖c‖² of each list's centroid, computed once (each saved step reads some)."""
        cents = torch.from_numpy(self.centroids)
        return (cents * cents).sum(dim=1)


def document_starts(documents: list) -> np.ndarray:
    """Sorted first key rows of the documents that hold at least one key (meta.json's [name, row, count, token])."""
    return np.unique(np.array([int(d[1]) for d in documents if int(d[2]) > 0], dtype=np.int64))


def invlist_members(index, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(list_of (count,), offsets (nlist + 1,), members) from an IVF index's inverted lists; None if not IVF.

    Keys in no list (removed from the index) get list -1.
    """
    ivf = faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None
    if ivf is None:
        return None
    ids = [get_invlist(ivf.invlists, lst)[0] for lst in range(ivf.nlist)]
    sizes = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    members = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)  # 4 bytes a key
    list_of = np.full(count, -1, dtype=np.int32)
    list_of[members] = np.repeat(np.arange(ivf.nlist, dtype=np.int32), sizes)
    return list_of, offsets, members


def list_centroids(index, coarse=None) -> tuple[np.ndarray, object] | None:
    """(centroids (nlist, d') float32, the IndexPreTransform in front of the IVF index or None) of an IVF index whose
    quantizer holds its centroids (flat, or HNSW over flat storage); None otherwise. coarse: the retriever's
    CoarseAssigner, whose copy of the centroids is shared rather than made again."""
    ivf = faiss.try_extract_index_ivf(index) if isinstance(index, faiss.Index) else None
    if ivf is None:
        return None
    if coarse is not None:  # it applies only to a bare IVF index: no transform in front
        return coarse.centroids.numpy(), None
    try:
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    except RuntimeError:  # a quantizer that keeps codes, not vectors
        return None
    pretransform = index if isinstance(index, faiss.IndexPreTransform) else None
    return np.ascontiguousarray(centroids, dtype=np.float32), pretransform


_AUTOMATA: "weakref.WeakKeyDictionary[Retriever, Automaton]" = weakref.WeakKeyDictionary()


def open_automaton(retriever: Retriever) -> Automaton:
    """The automaton of a retriever's datastore, clustered by its index's inverted lists (if IVF); made once per retriever."""
    if retriever in _AUTOMATA:
        return _AUTOMATA[retriever]
    clusters = invlist_members(retriever.index, retriever.ds.count)
    list_of, offsets, members = clusters if clusters is not None else (None, None, None)
    centroids, pretransform = ((list_centroids(retriever.index, retriever._coarse) or (None, None))
                               if clusters is not None else (None, None))
    auto = Automaton(retriever.ds.count, document_starts(retriever.ds.documents), list_of, offsets, members,
                     centroids, pretransform)
    _AUTOMATA[retriever] = auto
    return auto


def successors(ids: np.ndarray, count: int, starts: np.ndarray) -> np.ndarray:
    """ids + 1 where that entry exists and belongs to the same document, else -1 (also where ids < 0)."""
    ids = np.asarray(ids, dtype=np.int64)
    nxt = ids + 1
    j = np.minimum(np.searchsorted(starts, nxt), max(len(starts) - 1, 0))
    new_doc = starts[j] == nxt if len(starts) else np.zeros(ids.shape, bool)
    return np.where((ids >= 0) & (nxt < count) & ~new_doc, nxt, -1)


def next_pointers(ids: np.ndarray, vals: np.ndarray, targets: np.ndarray, auto: Automaton) -> np.ndarray:
    """(B, k) successors of the neighbours whose value is the token that came next; -1 elsewhere."""
    hit = (np.asarray(vals) == np.asarray(targets)[:, None]) & (np.asarray(ids) >= 0)
    return successors(np.where(hit, ids, -1), auto.count, auto.starts)


def pack_rows(row: np.ndarray, ids: np.ndarray, n_rows: int) -> np.ndarray:
    """(n_rows, width) array holding each row's ids (given flat, grouped by row in order), padded with -1."""
    counts = np.bincount(row, minlength=n_rows)
    out = np.full((n_rows, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[row, np.arange(len(row)) - first[row]] = ids
    return out


def list_distances(queries: np.ndarray, auto: Automaton, row: np.ndarray, lst: np.ndarray) -> np.ndarray:
    """‖c‖² − 2 q·c of each (row, list) pair: the squared distance from row's query to the list's centroid, less
    ‖q‖² (the same for every list of a row, so the lists' order is the distances' order)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if auto.pretransform is not None:
        chain = auto.pretransform.chain
        for i in range(chain.size()):
            q = faiss.downcast_VectorTransform(chain.at(i)).apply(q)
    lists, at = np.unique(lst, return_inverse=True)
    cents = torch.from_numpy(np.ascontiguousarray(auto.centroids[lists]))  # (U, d'): only the lists some row names
    dots = (torch.from_numpy(q) @ cents.T).numpy()  # torch's: numpy's would wake OpenBLAS's threads against torch's
    return auto.centroid_norms.numpy()[lists][at] - 2 * dots[row, at]


def expand_candidates(pointers: np.ndarray, auto: Automaton, cap: int, queries: np.ndarray | None = None
                      ) -> np.ndarray:
    """(B, C) the pointers and the other members of their IVF lists, unique, at most max(cap, pointers) per row.

    Whole lists are taken until the cap is reached, the last one cut: the lists whose centroids are nearest the
    row's query first (queries (B, d), where the automaton has the centroids), else the lists holding more of the
    row's pointers. Without clusters the candidates are the pointers.

    On the code benchmark (100,000 keys, 512 lists, 53,356 tokens) the nearest lists first gave the full search's
    perplexity or better at 1000 candidates (bench/retomaton.py), where more pointers first was 0.4-1.1% worse.
    """
    b, p = np.nonzero(pointers >= 0)  # flat (row, pointer) pairs, grouped by row
    ptr = pointers[b, p]
    if auto.list_of is None or len(ptr) == 0:
        return pack_rows(b, ptr, len(pointers))
    n_lists = len(auto.offsets) - 1
    listed = auto.list_of[ptr] >= 0  # a key in no list (removed from the index) brings no members
    pair, counts = np.unique(b[listed] * n_lists + auto.list_of[ptr[listed]], return_counts=True)
    row, lst = pair // n_lists, pair % n_lists
    if queries is not None and auto.centroids is not None:
        order = np.lexsort((list_distances(queries, auto, row, lst), row))  # by row, then nearest lists first
    else:
        order = np.lexsort((-counts, row))  # by row, then lists with more pointers first
    row, lst = row[order], lst[order]
    size = auto.offsets[lst + 1] - auto.offsets[lst]
    room = np.maximum(cap - np.bincount(b, minlength=len(pointers)), 0)[row]  # candidates left after the pointers
    # members in this row's earlier lists: all earlier lists' sizes less those of the earlier rows
    before = np.cumsum(size) - size
    before -= np.concatenate([[0], np.cumsum(np.bincount(row, weights=size, minlength=len(pointers)))])[row].astype(np.int64)
    take = np.clip(room - before, 0, size)  # whole lists while there is room, the last one cut
    start = np.repeat(auto.offsets[lst] - (np.cumsum(take) - take), take)  # + output position = member index
    member = auto.members[start + np.arange(int(take.sum()))]
    rows = np.concatenate([b, np.repeat(row, take)])
    ids = np.concatenate([ptr, member])
    uniq = unique_sorted(rows * auto.count + ids)  # sorted by row: pack_rows' grouping
    return pack_rows(uniq // auto.count, uniq % auto.count, len(pointers))


def rank_candidates(queries: np.ndarray, keys, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each row's candidates by exact distance: (dists (B, k) ascending, ids (B, k), -1 where missing)."""
    dists = exact_distances(queries, keys, cand)  # (B, C), inf where cand < 0
    if dists.shape[1] < k:
        pad = k - dists.shape[1]
        dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)
        cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
    dists, ids = sort_rows(dists, cand)
    return dists[:, :k].astype(np.float32), np.where(ids[:, :k] >= 0, ids[:, :k], -1)


def step(retriever: Retriever, auto: Automaton, queries: np.ndarray, pointers: np.ndarray,
         keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours of one position of each chain: (dists, ids, vals) (B, k), and (B,) where the pointers saved the search.

    A row with at least min_knns pointers ranks their candidates; the others are searched, as
    plain kNN-LM would. keep: (B,) bool or None; rows left out get no neighbour (a learned skip).
    """
    cfg, k = retriever.cfg, retriever.k
    q = np.asarray(queries)
    run = np.ones(len(q), bool) if keep is None else np.asarray(keep, bool)
    saved = run & ((pointers >= 0).sum(axis=1) >= cfg.min_knns)
    search = run & ~saved
    dists, ids = np.full((len(q), k), np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    if search.any():
        dists[search], ids[search] = retriever.search(q[search])
    if saved.any():
        cand = expand_candidates(pointers[saved], auto, max(cfg.max_candidates, k), q[saved])
        dists[saved], ids[saved] = rank_candidates(q[saved], retriever.ds.keys, cand, k)
    return dists, ids, retriever.ds.values_of(ids), saved


# Eval restarts a pointer chain every this many positions. Chains step together, one position of
# each per step, so a batch of 4 windows of 256 positions is 32 steps of 32 rows instead of 256
# steps of 4: a search or ranking per step costs about as much for 4 rows as for 32. A restart
# costs one search (at most 1/32 of the savings).
EVAL_CHAIN = 32


def split_chains(lengths, chain: int) -> np.ndarray:
    """First rows of chains of at most `chain` positions covering segments of the given lengths laid end to end."""
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate([np.arange(a, b, chain, dtype=np.int64) for a, b in zip(bounds[:-1], bounds[1:])]
                          + [np.zeros(0, np.int64)])


def chain_neighbors(retriever: Retriever, auto: Automaton, queries: np.ndarray, targets: np.ndarray,
                    chain_starts: np.ndarray, keep: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours of every position of several chains, stepping over positions with all chains together.

    Args:
        retriever: the search (its cfg gives k, min_knns and max_candidates).
        auto: the datastore's automaton.
        queries: (n, d) the positions' queries, chain after chain, each chain in order.
        targets: (n,) the token that came after each position (drives the pointers).
        chain_starts: (c,) first row of each chain in queries, increasing, the first 0.
        keep: (n,) bool, or None for all: rows left out get no neighbour (a learned skip), so
            their chain starts again after them.

    Returns:
        (dists (n, k), ids (n, k), vals (n, k), saved (n,)): saved is True where the pointers
        replaced the search.
    """
    n, k = len(queries), retriever.k
    bounds = np.append(np.asarray(chain_starts, dtype=np.int64), n)
    first, length = bounds[:-1], np.diff(bounds)
    dists, ids = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
    vals, saved = np.full((n, k), -1, np.int32), np.zeros(n, bool)
    pointers = np.full((len(first), k), -1, np.int64)  # (c, k): every chain starts with a search
    for t in range(int(length.max(initial=0))):
        live = np.nonzero(length > t)[0]  # chains that have a position t
        rows = first[live] + t
        dists[rows], ids[rows], vals[rows], saved[rows] = step(
            retriever, auto, queries[rows], pointers[live], None if keep is None else keep[rows])
        pointers[live] = next_pointers(ids[rows], vals[rows], targets[rows], auto)
    return dists, ids, vals, saved
