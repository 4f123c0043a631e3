"""Per-token features that the learned λ gate reads: pure functions over numpy arrays.

Before retrieval (the gate can then skip the search): the LM's entropy, its top probability,
the margin between its top two, and the key's norm. After retrieval, also: the nearest and the
k-th distance, the entropy of p_kNN, how many distinct tokens the neighbours carry, and whether
p_kNN and p_LM agree on the most likely token. The low-rank projection of the key is learned, so
it lives in the gate, not here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..arrays import row_order
from ..interpolate import MIX_BLOCK_ROWS, masked_distances, relative_weights

PRE_FEATURES = ("lm_entropy", "lm_max_logp", "lm_margin", "key_norm")
POST_FEATURES = PRE_FEATURES + ("log_nn_dist", "log_kth_dist", "knn_entropy", "log_distinct", "argmax_agree")


def lm_stats(logp: torch.Tensor, owned: bool = False) -> dict[str, np.ndarray]:
    """Entropy, top-two log-probabilities and argmax of each row of LM log-probabilities (n, V).

    Args:
        logp: (n, V) log-probabilities.
        owned: the caller owns logp and nothing else reads it meanwhile. Then, for a float32 or float64
            tensor on a CPU, the top two come from numpy's argmax and max, the second with the first
            masked in logp for a moment and then restored: a third of torch.topk's time at V 49,152.
            Otherwise torch.topk (ties may then name another argmax).
    """
    if owned and logp.device.type == "cpu" and logp.dtype in (torch.float32, torch.float64):
        a = logp.detach().numpy()  # shares logp's memory
        rows, argmax = np.arange(len(a)), a.argmax(axis=1)
        first = a[rows, argmax]  # a copy (fancy indexing)
        try:
            a[rows, argmax] = -np.inf
            second = a.max(axis=1)
        finally:
            a[rows, argmax] = first  # logp as it was
    else:
        top = torch.topk(logp, 2, dim=-1)  # values and indices (n, 2)
        first, second = top.values[:, 0].float().cpu().numpy(), top.values[:, 1].float().cpu().numpy()
        argmax = top.indices[:, 0].cpu().numpy()
    entropy = -logp.exp().mul_(logp).nansum(dim=-1)  # 0·log 0 is nan: it counts as 0
    return {"lm_entropy": entropy.float().cpu().numpy(), "lm_max": np.asarray(first, np.float32),
            "lm_second": np.asarray(second, np.float32), "lm_argmax": np.asarray(argmax, np.int32)}


def knn_value_stats(dists: np.ndarray, vals: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """p_kNN's entropy, argmax token and number of distinct tokens per row, without a (n, V) array.

    Each row's neighbours are sorted by stored token; equal tokens form a segment whose weights
    sum to that token's probability. Every row begins a segment, so np.add.reduceat sums the
    segments and then each row's segments.

    Args:
        dists: (n, k) squared L2 distances; inf where missing.
        vals: (n, k) stored next tokens; -1 where missing.
        temperature: T of softmax(-d/T).

    Returns:
        {"knn_entropy": (n,) (inf with no neighbour), "knn_argmax": (n,) int32 (-1 with no neighbour), "distinct": (n,) int32}.
        Ties for the argmax go to the smallest token. A row whose neighbours all weigh nothing (every
        distance inf or nan) has entropy 0 and the smallest token as its argmax.
    """
    vals = np.asarray(vals)
    n, k = vals.shape
    if n == 0 or k == 0:
        return {"knn_entropy": np.full(n, np.inf), "knn_argmax": np.full(n, -1, np.int32),
                "distinct": np.zeros(n, np.int32)}
    order = row_order(vals)  # missing neighbours (-1) first in each row, with weight 0
    sv = np.take_along_axis(vals, order, axis=1).reshape(-1)
    sw = np.take_along_axis(relative_weights(dists, vals, temperature), order, axis=1).reshape(-1)
    start = np.empty(n * k, dtype=bool)
    start[0] = True
    np.not_equal(sv[1:], sv[:-1], out=start[1:])
    start[::k] = True
    first = np.flatnonzero(start)  # (S,) each segment's first entry
    row = first // k  # (S,) its row
    row_first = np.searchsorted(first, np.arange(n) * k)  # (n,) each row's first segment
    mass = np.add.reduceat(sw, first)  # (S,) the segment's weight
    token = sv[first]
    valid = token >= 0
    distinct = np.add.reduceat(valid.astype(np.int32), row_first).astype(np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        mass /= np.add.reduceat(mass, row_first)[row]  # p_kNN of the segment's token (nan in a row of none)
        entropy = -np.add.reduceat(np.where(mass > 0, mass * np.log(mass), 0.0), row_first)
    p = np.where(valid, np.nan_to_num(mass, nan=0.0), -1.0)  # finite: every row attains its maximum
    best = np.flatnonzero(p == np.maximum.reduceat(p, row_first)[row])  # each row's top segments, in order
    first_of_row = np.ones(len(best), dtype=bool)
    first_of_row[1:] = row[best[1:]] != row[best[:-1]]
    best = best[first_of_row]
    argmax = np.full(n, -1, dtype=np.int32)
    argmax[row[best]] = token[best]  # a row of no neighbour: its one segment is token -1
    return {"knn_entropy": np.where(distinct == 0, np.inf, entropy), "knn_argmax": argmax, "distinct": distinct}


def pre_features(queries: np.ndarray, lm: dict[str, np.ndarray]) -> np.ndarray:
    """(n, len(PRE_FEATURES)) float64 features known before the search."""
    q = np.asarray(queries, dtype=np.float32)
    margin = np.exp(np.asarray(lm["lm_max"], np.float64)) - np.exp(np.asarray(lm["lm_second"], np.float64))
    return np.stack([np.asarray(lm["lm_entropy"], np.float64), np.asarray(lm["lm_max"], np.float64), margin,
                     np.linalg.norm(q, axis=1).astype(np.float64)], axis=1)


def post_features(queries: np.ndarray, lm: dict[str, np.ndarray], dists: np.ndarray, vals: np.ndarray,
                  temperature: float) -> np.ndarray:
    """(n, len(POST_FEATURES)) float64 features known after the search; inf where a row has no neighbour.

    MIX_BLOCK_ROWS rows at a time, so that their float64 (rows, k) arrays stay in cache."""
    queries, vals, dists = np.asarray(queries), np.asarray(vals), np.asarray(dists)
    parts = []
    for lo in range(0, len(vals), MIX_BLOCK_ROWS) if len(vals) else [0]:
        b = slice(lo, lo + MIX_BLOCK_ROWS)
        parts.append(_post_block(queries[b], {key: v[b] for key, v in lm.items()}, dists[b], vals[b], temperature))
    return np.concatenate(parts)


def _post_block(queries: np.ndarray, lm: dict[str, np.ndarray], dists: np.ndarray, vals: np.ndarray,
                temperature: float) -> np.ndarray:
    """post_features of a block of rows."""
    d = masked_distances(dists, vals)  # (n, k)
    kth = np.max(np.where(np.isfinite(d), d, -np.inf), axis=1)  # last neighbour found; -inf if none
    kth = np.where(np.isfinite(kth), kth, np.inf)
    stats = knn_value_stats(d, vals, temperature)
    with np.errstate(divide="ignore"):
        extra = np.stack([np.log1p(np.maximum(d[:, 0], 0)), np.log1p(np.maximum(kth, 0)), stats["knn_entropy"],
                          np.log(stats["distinct"].astype(np.float64)),
                          (stats["knn_argmax"] == np.asarray(lm["lm_argmax"])).astype(np.float64)], axis=1)
    extra[:, 3] = np.where(stats["distinct"] > 0, extra[:, 3], np.inf)  # no neighbour: like the distances
    return np.concatenate([pre_features(queries, lm), extra], axis=1)
