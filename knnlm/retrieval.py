"""Nearest-neighbour search over a datastore: faiss index or exact, with exact re-ranking."""

from __future__ import annotations

import logging
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


def exact_distances(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Squared L2 from each query to its own candidate rows: (n, k); inf where ids < 0.

    Rows are gathered once, in sorted order, so a memory-mapped keys array is read sequentially.
    """
    n, k = ids.shape
    flat = ids.reshape(-1)
    valid = flat >= 0
    uniq, inv = np.unique(flat[valid], return_inverse=True)
    rows = torch.from_numpy(np.asarray(keys[uniq], dtype=np.float32))  # (u, d)
    where = np.zeros(flat.shape[0], dtype=np.int64)
    where[valid] = inv
    where = torch.from_numpy(where.reshape(n, k))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (n, d)
    out = torch.empty((n, k), dtype=torch.float32)
    if len(uniq):
        for lo in range(0, n, chunk):
            cand = rows[where[lo: lo + chunk]]  # (c, k, d)
            out[lo: lo + chunk] = ((cand - q[lo: lo + chunk, None, :]) ** 2).sum(-1)
    d = out.numpy()
    d[ids < 0] = np.inf
    return d


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
            dists = exact_distances(q, self.ds.keys, ids)
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
