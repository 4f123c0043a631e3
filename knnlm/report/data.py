"""What the HTML report shows, as plain JSON-ready data: a pure function of the scores and what was looked up.

The scored text is given as each token's share of the decoded text (`pieces`), so that a character
split across tokens (an emoji in a byte-level vocabulary) shows whole; a neighbour's context is its
decoded text. Elsewhere (top tokens, next tokens) tokens are referred to by id, and `vocab` maps each id
the page shows to its text, so a token that recurs costs its text once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..arrays import json_safe
from ..interpolate import masked_distances, neighbor_log_weights
from ..scores import Scores

GAIN_CLIP = 30.0  # nats: a gain beyond this (λ = 1 with the target missing gives −inf) is shown as ±30
HIST_BINS = 12  # bars of each histogram


def detail_count(n: int, detail_tokens: int) -> int:
    """How many tokens (the first ones) get the full panel."""
    return max(0, min(n, detail_tokens))


def shown_count(n: int, detail_tokens: int) -> int:
    """How many tokens (the first ones) are shown coloured: ten times the detailed ones, at least 1,000."""
    return min(n, max(10 * detail_tokens, 1000))


def token_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Each token's share of decode(ids), in order; joined, they are the decoded text (for decoders whose text of a
    token does not depend on what follows: byte-level BPE, byte fallback). A token that ends inside a character
    gives what it completes, and the token that ends the character gives it whole (a run whose text ends in
    "\ufffd" waits for up to 3 more tokens: UTF-8 takes at most 4 bytes). Each run of tokens is decoded after
    the run before it, so a decoder that drops a leading space sees that it is not leading, and one that decodes
    raw bytes together sees whole characters before it. A literal "\ufffd" in the text followed within 3 tokens
    by a split character is the one case where the pieces may not join to the text."""
    pieces: list[str] = []
    prev = start = given = 0  # ids[prev:start]: the last finished run (context); ids[start:]: the open run
    for i in range(len(ids)):
        base, text = decode(ids[prev:start]), decode(ids[prev:i + 1])
        run = text[len(base):] if text.startswith(base) else decode(ids[start:i + 1])
        waiting = run.endswith("\ufffd") and i + 1 < len(ids) and i - start < 3
        upto = len(run.rstrip("\ufffd")) if waiting else len(run)
        pieces.append(run[given:upto])
        given = upto
        if not waiting:  # the run is given out whole: the next token starts one
            prev, start, given = start, i + 1, 0
    return pieces


def shown_rows(neighbor_ids: np.ndarray, neighbors: int = 8) -> np.ndarray:
    """The distinct datastore rows the page shows: the first `neighbors` of each token, misses left out."""
    ids = np.asarray(neighbor_ids)[:, :neighbors]
    return np.unique(ids[ids >= 0])


def knn_top(dists: np.ndarray, vals: np.ndarray, temperature: float, top: int = 5) -> list[tuple[int, float]]:
    """p_kNN's `top` most likely tokens for one token's neighbours (d, v): [(token, probability)]."""
    d = masked_distances(dists[None], vals[None])  # (1, k)
    w = np.exp(neighbor_log_weights(d, temperature)[0])  # (k,)
    ok = vals >= 0
    if not ok.any():
        return []
    toks, inv = np.unique(vals[ok], return_inverse=True)
    p = np.bincount(inv, weights=w[ok], minlength=len(toks))
    order = np.argsort(-p, kind="stable")[:top]
    return [(int(toks[j]), float(p[j])) for j in order]


def gain_histogram(x: np.ndarray, gain: np.ndarray, edges: np.ndarray) -> dict:
    """Mean gain and token count per bin of x (bins [e_i, e_i+1), the last one closed)."""
    ok = np.isfinite(x)
    b = np.clip(np.searchsorted(edges, x[ok], side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(b, minlength=len(edges) - 1)
    total = np.bincount(b, weights=gain[ok], minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return {"edges": edges.tolist(), "count": count.tolist(), "mean_gain": mean.tolist(), "missing": int((~ok).sum())}


def _edges(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """HIST_BINS equal bins over the finite values of x (or over [lo, hi])."""
    f = x[np.isfinite(x)]
    lo = float(f.min()) if lo is None and f.size else (lo or 0.0)
    hi = float(f.max()) if hi is None and f.size else (hi if hi is not None else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, HIST_BINS + 1)


def build_report_data(scores: Scores, docs: list[tuple[str, list[int]]], mixed: np.ndarray, lambdas: np.ndarray,
                      neighbor_ids: np.ndarray, contexts: Mapping[int, tuple[str, int, list[int]]],
                      decode: Callable[[list[int]], str], temperature: float,
                      lm_top: tuple[np.ndarray, np.ndarray] | None = None, summary: dict | None = None,
                      tuned: dict | None = None, detail_tokens: int = 5000, neighbors: int = 8) -> dict:
    """The report page's data.

    Args:
        scores: the evaluation's per-token scores (n tokens, in document order).
        docs: (name, token ids) of the scored documents; scores.doc indexes this list.
        mixed: (n,) log p_kNN-LM(target), as the combiner mixed it.
        lambdas: (n,) λ per token.
        neighbor_ids: (m, ≥ neighbors) datastore rows of the first m ≥ detail tokens' neighbours, in
            the order of scores.dists (−1 where missing).
        contexts: row → (document name, offset, context token ids ending at the row's token, the token
            after it), for at least the rows of `shown_rows(neighbor_ids[:detail], neighbors)`.
        decode: token ids → text.
        temperature: T of p_kNN (for its top 5).
        lm_top: (ids (m, 5), probabilities (m, 5)) of p_LM's top tokens for the detailed tokens, or None.
        summary: the run's report (perplexities, λ, T, search, speed).
        tuned: the datastore's lambda.json, or None.
        detail_tokens: tokens (the first ones) given the full panel.
        neighbors: neighbours listed per token.

    Returns:
        JSON-ready dict: docs [{name, first (ids before the first scored token), first_text, start, end}],
        tokens (ids of the shown targets), pieces (their text: token_pieces of each document), gain (nats, per
        shown token), detail {lam, lm_p, mix_p, lm_top, knn_top, nbrs [[row index, distance (4 significant
        digits), ✓ as 1/0: the row's next token is the target]], searched}, rows [[document, offset, context
        text, next id]], hist, vocab {id: text}.
    """
    n = len(scores)
    detail, shown = detail_count(n, detail_tokens), shown_count(n, detail_tokens)
    gain = np.clip(np.asarray(mixed, np.float64) - scores.lm_logp, -GAIN_CLIP, GAIN_CLIP)  # (n,)
    lambdas = np.asarray(lambdas, np.float64)
    used: set[int] = set()

    out_docs = []
    for i in range(shown):
        d = int(scores.doc[i])
        if not out_docs or out_docs[-1]["doc"] != d:
            name, ids = docs[d]
            first = ids[: int(scores.pos[i])]  # tokens before the first scored one (the document's first)
            out_docs.append({"doc": d, "name": name, "first": [int(t) for t in first], "start": i, "end": i + 1})
        else:
            out_docs[-1]["end"] = i + 1
    targets = [int(t) for t in scores.targets[:shown]]
    used.update(targets)
    pieces: list[str] = []
    for doc in out_docs:  # the text of each document's tokens before and among the shown ones, split by token
        n_first = len(doc["first"])
        split = token_pieces(decode, doc["first"] + targets[doc["start"]: doc["end"]])
        doc["first_text"] = "".join(split[:n_first])
        pieces.extend(split[n_first:])

    ids8 = np.asarray(neighbor_ids)[:detail, :neighbors]  # (detail, ≤ neighbors)
    rows = [int(r) for r in shown_rows(ids8, neighbors)]
    row_index = {r: j for j, r in enumerate(rows)}
    row_table, next_of = [], {}
    for r in rows:
        name, offset, ctx, nxt = contexts[r]
        next_of[r] = int(nxt)  # the datastore's own: a search again may order tied neighbours otherwise
        used.add(int(nxt))
        row_table.append([name, int(offset), decode([int(t) for t in ctx]), int(nxt)])

    searched = scores.searched if scores.searched is not None else np.ones(n, bool)
    nbrs, knn_tops, lm_tops = [], [], []
    for i in range(detail):
        ids, d = neighbor_ids[i, :neighbors], scores.dists[i, :neighbors]
        tgt = int(scores.targets[i])
        nbrs.append([[row_index[int(r)], _sig(dist), int(next_of[int(r)] == tgt)]
                     for r, dist in zip(ids, d) if r >= 0])
        top = knn_top(scores.dists[i], scores.vals[i], temperature)
        used.update(t for t, _ in top)
        knn_tops.append([[t, round(p, 4)] for t, p in top])
        if lm_top is not None:
            pair = [[int(t), round(float(p), 4)] for t, p in zip(lm_top[0][i], lm_top[1][i])]
            used.update(t for t, _ in pair)
            lm_tops.append(pair)

    nn = scores.nn_dist
    hist = {"distance": gain_histogram(nn, gain, _edges(nn)),
            "lambda": gain_histogram(lambdas, gain, _edges(lambdas, 0.0, 1.0))}
    vocab = {t: decode([t]) for t in sorted(used) if t >= 0}
    return json_safe({
        "summary": summary or {}, "tuned": _tuned_view(tuned),
        "tokens_scored": n, "tokens_shown": shown, "tokens_detailed": detail, "neighbors": neighbors,
        "temperature": temperature, "mean_gain": float(gain.mean()) if n else 0.0,
        "docs": out_docs, "tokens": targets, "pieces": pieces, "gain": np.round(gain[:shown], 3).tolist(),
        "detail": {"lam": np.round(lambdas[:detail], 4).tolist(),
                   "lm_p": np.round(np.exp(scores.lm_logp[:detail]), 5).tolist(),
                   "mix_p": np.round(np.exp(np.asarray(mixed[:detail], np.float64)), 5).tolist(),
                   "searched": [bool(s) for s in searched[:detail]],
                   "lm_top": lm_tops if lm_top is not None else None, "knn_top": knn_tops, "nbrs": nbrs},
        "rows": row_table, "hist": hist, "vocab": {str(k): v for k, v in vocab.items()},
    })


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (the page shows no more; it keeps the file small)."""
    return float(f"{float(x):.{digits}g}")


def _tuned_view(tuned: dict | None) -> dict | None:
    """What the page shows of lambda.json: held-out figures, the stored λ and T, the adaptive schedule, the skip curve."""
    if not tuned:
        return None
    h = tuned.get("heldout") or {}
    keep = ("tokens", "base_ppl", "fixed_ppl", "adaptive_ppl", "gate_pre_ppl", "gate_ppl", "spalm_ppl", "fixed",
            "adaptive", "skip", "skip_curve")
    return {"lambda": tuned.get("lambda"), "temperature": tuned.get("temperature"),
            "adaptive": tuned.get("adaptive"), "heldout": {k: h.get(k) for k in keep if k in h},
            "tuned_on": (tuned.get("tuned_on") or {}).get("description"), "created": tuned.get("created")}
