"""Nearest-neighbour search over a datastore: faiss index or exact, with exact re-ranking."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .datastore import Datastore
from .errors import KNNLMError
from .index import load_index, read_index_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievalConfig:
    """How neighbours are found."""

    k: int = 1000  # neighbours per query
    nprobe: int = 8  # IVF lists visited per query
    rerank: bool = True  # recompute exact distances of the retrieved keys from keys.npy
    exact: bool = False  # brute-force search over keys.npy instead of the index (RAM: N·d·4 bytes)


def as_tensor(keys: np.ndarray) -> torch.Tensor:
    """A torch view of a (memory-mapped, read-only) array, without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the view is read-only; we only read it
        return torch.from_numpy(np.asarray(keys))


def exact_distances(queries: np.ndarray, keys: np.ndarray | torch.Tensor, ids: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Squared L2 from each query to its own candidate rows: (n, k); inf where ids < 0.

    Per chunk of queries, the candidates' rows are gathered once in sorted order by torch (three
    times faster than numpy's fancy indexing of a memmap, and a memmap is then read forwards),
    widened to float32, and faiss computes each query's distances to its own rows.
    """
    keys = keys if isinstance(keys, torch.Tensor) else as_tensor(keys)
    n, k = ids.shape
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (n, d)
    out = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, chunk):
        sub = ids[lo: lo + chunk]  # (c, k)
        flat = sub.reshape(-1)
        valid = flat >= 0
        uniq, inv = np.unique(flat[valid], return_inverse=True)
        rows = keys.index_select(0, torch.from_numpy(uniq)).float().numpy()  # (u, d)
        where = np.zeros(flat.shape[0], dtype=np.int64)
        where[valid] = inv
        qc, dc = q[lo: lo + chunk], np.empty(sub.shape, dtype=np.float32)
        if len(uniq):
            faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(dc), faiss.swig_ptr(qc), faiss.swig_ptr(rows),
                                    faiss.swig_ptr(where), q.shape[1], len(qc), k)
        out[lo: lo + chunk] = dc
    out[ids < 0] = np.inf
    return out


class Retriever:
    """Finds the k nearest stored keys of query vectors and their values."""

    def __init__(self, ds: Datastore, cfg: RetrievalConfig = RetrievalConfig()):
        self.ds, self.cfg = ds, cfg
        if cfg.k < 1:
            raise KNNLMError(f"--k {cfg.k} must be at least 1.")
        if cfg.exact:
            self.index = faiss.IndexFlatL2(ds.dim)
            for lo in range(0, ds.count, 65_536):
                self.index.add(np.asarray(ds.keys[lo: lo + 65_536], dtype=np.float32))
            self.kind = "exact"
        else:
            self.index = load_index(ds)
            self.kind = read_index_info(ds)["kind"]
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is not None:
                ivf.nprobe = cfg.nprobe
        # Also for exact search: faiss's float32 ‖q‖²+‖k‖²−2q·k loses digits that re-ranking restores.
        self.rerank = cfg.rerank
        self._keys = as_tensor(ds.keys) if self.rerank else None
        self.k = cfg.k

    @property
    def describe(self) -> dict:
        """What this search is, for reports and the scores cache."""
        return {"search": self.kind, "k": self.k, "nprobe": self.cfg.nprobe, "rerank": bool(self.rerank)}

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dists (n, k) ascending, ids (n, k), -1 where missing) for queries (n, d)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dists, ids = self.index.search(q, self.k)
        if self.rerank:
            dists = exact_distances(q, self._keys, ids)
            # Without this, every key page ever re-ranked would count towards this process's RSS.
            self.ds.release()
            order = np.argsort(dists, axis=1, kind="stable")
            dists = np.take_along_axis(dists, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        dists = np.where(ids < 0, np.inf, dists).astype(np.float32)
        return dists, ids

    def neighbors(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dists, ids, vals) for queries; vals are -1 where a neighbour is missing."""
        dists, ids = self.search(queries)
        vals = np.where(ids >= 0, np.asarray(self.ds.vals)[np.maximum(ids, 0)], -1).astype(np.int32)
        return dists, ids, vals
