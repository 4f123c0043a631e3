"""The kNN-LM maths: p_kNN from neighbours, and its interpolation with p_LM.

Pure functions over numpy arrays, all in log space. Shapes: n tokens, k neighbours.
"""

from __future__ import annotations

import threading

import numpy as np


def masked_distances(dists: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """float64 distances with inf wherever faiss returned no neighbour (value -1): the one rule for a miss."""
    return np.where(np.asarray(vals) < 0, np.inf, np.asarray(dists, dtype=np.float64))


def neighbor_log_weights(dists: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax_i(-d_i / T) over each row; missing neighbours (d = inf) get -inf."""
    d = np.asarray(dists, dtype=np.float64)  # (n, k)
    logits = -d / float(temperature)
    top = np.max(logits, axis=1, keepdims=True)  # (n, 1)
    # A row with no neighbour at all has top = -inf; keep it -inf instead of nan.
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = top + np.log(np.sum(np.exp(logits - top), axis=1, keepdims=True))
        out = logits - lse  # (n, k)
    return np.where(np.isfinite(logits), out, -np.inf)


MIX_BLOCK_ROWS = 256  # rows mixed at a time: their float64 (rows, k) arrays (2 MB at k 1000) stay in cache
UNDERFLOW = 1e-290  # far above float64's subnormals (2.2e-308): 1000 of them add at most 5e-321 of error


def relative_weights(dists: np.ndarray, vals: np.ndarray, temperature: float) -> np.ndarray:
    """exp(−d/T − max(−d/T)) per neighbour: softmax(−d/T) before each row's normalisation.

    float64 (n, k); 1 at each row's nearest neighbour and 0 where a neighbour is missing (value -1), so
    a row with no neighbour is all 0. The same logits and shift as neighbor_log_weights.
    """
    x = masked_distances(dists, vals)  # a new float64 array: changed in place below
    if x.shape[1] == 0:
        return x
    np.divide(x, -float(temperature), out=x)
    top = np.max(x, axis=1, keepdims=True)  # (n, 1)
    top[~np.isfinite(top)] = 0.0  # a row with no neighbour: exp(-inf) = 0 everywhere
    np.subtract(x, top, out=x)
    return np.exp(x, out=x)


def knn_log_prob(
    dists: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """log p_kNN(target) per token: log Σ_i 1[v_i = y] softmax_i(-d_i / T).

    The weights relative to each row's nearest neighbour (relative_weights) are summed over the
    target's neighbours and over all. A row where that sum is under UNDERFLOW (the target's neighbours
    about 668·T farther than the nearest, or more) takes the log-sum-exp instead: subnormal weights
    lose digits, and past 745·T they are 0. MIX_BLOCK_ROWS rows at a time, so that their float64 (rows, k)
    arrays stay in cache.

    Args:
        dists: (n, k) squared L2 distances; inf where faiss returned no neighbour.
        vals: (n, k) stored next tokens; -1 where faiss returned no neighbour.
        targets: (n,) the token to score.
        temperature: T in softmax(-d / T).

    Returns:
        (n,) float64 log-probabilities; -inf where no neighbour carries the target.
    """
    dists, vals, targets = np.asarray(dists), np.asarray(vals), np.asarray(targets)
    out = np.empty(len(vals))
    for lo in range(0, len(vals), MIX_BLOCK_ROWS):
        hi = lo + MIX_BLOCK_ROWS
        out[lo:hi] = _knn_log_prob_block(dists[lo:hi], vals[lo:hi], targets[lo:hi], temperature)
    return out


def _knn_log_prob_block(dists: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """knn_log_prob of a block of rows."""
    w = relative_weights(dists, vals, temperature)  # (n, k)
    hit = vals == targets[:, None]  # (n, k)
    mass = np.einsum("ij,ij->i", w, hit)  # Σ of the target's relative weights
    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(mass) - np.log(total)
    out[total == 0] = -np.inf  # no neighbour at all
    under = (mass < UNDERFLOW) & hit.any(axis=1)
    if under.any():
        out[under] = _knn_log_prob_lse(dists[under], vals[under], targets[under], temperature)
    return out


def _knn_log_prob_lse(dists: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """knn_log_prob by a log-sum-exp over the target's log-weights: finite where its weights underflow."""
    logw = neighbor_log_weights(masked_distances(dists, vals), temperature)  # (n, k)
    masked = np.where(vals == targets[:, None], logw, -np.inf)
    top = np.max(masked, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.sum(np.exp(masked - safe), axis=1, keepdims=True))
    return out[:, 0]


def interpolate(lm_logp: np.ndarray, knn_logp: np.ndarray, lam) -> np.ndarray:
    """log(λ·p_kNN + (1−λ)·p_LM), exact at λ = 0 (gives lm_logp) and λ = 1 (knn_logp)."""
    lam = np.asarray(lam, dtype=np.float64)
    with np.errstate(divide="ignore"):
        a = np.log(lam) + knn_logp
        b = np.log1p(-lam) + lm_logp
    return np.logaddexp(a, b)


def perplexity(logp: np.ndarray) -> float:
    """exp of the mean negative log-probability."""
    logp = np.asarray(logp, dtype=np.float64)
    if logp.size == 0:
        return float("nan")
    return float(np.exp(-np.mean(logp)))


def adaptive_lambdas(nn_dist: np.ndarray, edges: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """λ per token from the bin its nearest-neighbour distance falls in.

    Args:
        nn_dist: (n,) distance to each token's nearest neighbour (inf if none).
        edges: (B - 1,) increasing inner bin edges fitted on tuning data.
        lambdas: (B,) the λ of each bin.

    Returns:
        (n,) λ per token.
    """
    bins = np.searchsorted(np.asarray(edges), np.asarray(nn_dist), side="right")
    return np.asarray(lambdas, dtype=np.float64)[bins]


def knn_log_distribution(dists: np.ndarray, vals: np.ndarray, vocab_size: int, temperature: float):
    """log p_kNN over the whole vocabulary: neighbour weights softmax(−d/T) scatter-added by stored token.

    Args:
        dists: (B, k) squared L2 distances; inf where a neighbour is missing.
        vals: (B, k) stored next tokens; -1 where a neighbour is missing.
        vocab_size: V, the width of the result.
        temperature: T.

    Returns:
        (B, V) float64 torch log-probabilities; -inf for tokens no neighbour carries (a whole row of
        -inf when a query has no neighbour at all).
    """
    import torch

    vals = np.asarray(vals)
    weights = np.exp(neighbor_log_weights(masked_distances(dists, vals), temperature))  # (B, k)
    p = torch.zeros(vals.shape[0], vocab_size, dtype=torch.float64)
    p.scatter_add_(1, torch.from_numpy(np.maximum(vals, 0).astype(np.int64)), torch.from_numpy(weights))
    return torch.log(p)  # log 0 = -inf


def mix_log_distribution(lm_logp: np.ndarray, dists: np.ndarray, vals: np.ndarray, lam, temperature: float
                         ) -> np.ndarray:
    """log(λ·p_kNN + (1−λ)·p_LM) over the whole vocabulary: interpolate(lm_logp, knn_log_distribution(...), λ).

    The same numbers without a dense p_kNN: every token gets log(1−λ) + log p_LM, and only the (at
    most k per row) tokens the neighbours carry are mixed, so a decoding step costs one pass over V
    instead of five.

    Args:
        lm_logp: (B, V) log p_LM, float64 (or float32: a decoding step's scores, which end in float32;
            then the untouched tokens stay float32 and those the neighbours carry are mixed in float64).
        dists: (B, k) squared L2 distances; inf where a neighbour is missing.
        vals: (B, k) stored next tokens; -1 where a neighbour is missing.
        lam: (B,) or a number: λ per row (0 for a row without neighbours keeps p_LM).
        temperature: T of softmax(−d/T).

    Returns:
        (B, V) log-probabilities in lm_logp's dtype.
    """
    lm_logp = np.asarray(lm_logp)
    if lm_logp.dtype != np.float32:
        lm_logp = lm_logp.astype(np.float64, copy=False)
    b, v = lm_logp.shape
    vals = np.asarray(vals)
    if vals.size and int(vals.max()) >= v:  # its weight would land on the next row's tokens
        raise ValueError(f"a neighbour's token {int(vals.max())} is past the vocabulary ({v} tokens)")
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64).reshape(-1), (b,))
    with np.errstate(divide="ignore"):
        keep_lm = np.log1p(-lam)  # log(1−λ) per row
        out = lm_logp + keep_lm[:, None].astype(lm_logp.dtype)  # tokens no neighbour carries: (1−λ)·p_LM
        weights = np.exp(neighbor_log_weights(masked_distances(dists, vals), temperature))  # (B, k)
        hit = vals >= 0
        if b == 1:  # a decoding step: _token_sums, without the sort
            t = vals[hit].astype(np.intp)
            r, p_knn = np.zeros(len(t), np.intp), _token_sums(t, weights[hit], v)
        else:
            rows = np.broadcast_to(np.arange(b)[:, None], vals.shape)[hit]
            flat, inverse = np.unique(rows.astype(np.int64) * v + vals[hit], return_inverse=True)
            p_knn = np.bincount(inverse, weights=weights[hit], minlength=len(flat))  # Σ weights per (row, token)
            r, t = flat // v, flat % v
        out[r, t] = np.logaddexp(np.log(lam[r]) + np.log(p_knn), lm_logp[r, t].astype(np.float64) + keep_lm[r])
    return out


_SUMS = threading.local()  # each thread's zeroed (V,) float64 accumulator for _token_sums


def _token_sums(tokens: np.ndarray, weights: np.ndarray, vocab_size: int) -> np.ndarray:
    """Σ weights over the entries of each token, given at every entry of tokens (a token's entries all get its sum).

    Sums into this thread's zeroed accumulator of the vocabulary in entry order, as np.bincount over np.unique's
    inverse does (the same bits), reads the sums back and zeroes what it touched. In place after the LM's forward
    pass, a decoding step's np.unique (a sort) cost more than this.
    """
    acc = getattr(_SUMS, "acc", None)
    if acc is None or len(acc) != vocab_size:
        acc = _SUMS.acc = np.zeros(vocab_size)
    try:
        np.add.at(acc, tokens, weights)
        return acc[tokens]
    finally:
        acc[tokens] = 0.0
