"""What the report needs beyond the scores: neighbour rows, their contexts and the LM's top tokens, for the detailed tokens only."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..datastore import Datastore
from ..errors import KNNLMError
from ..lm import LM
from ..retrieval import Retriever
from ..scores import Scores
from ..windows import forward_owned, plan_windows

log = logging.getLogger(__name__)


def neighbor_ids(retriever: Retriever, scores: Scores, m: int) -> np.ndarray:
    """(m, k) datastore rows of the first m tokens' neighbours, by searching their stored queries again."""
    if m == 0:
        return np.zeros((0, 0), np.int64)
    if scores.queries is None:
        raise KNNLMError("These scores hold no queries, which the report needs to find the neighbours again; "
                         "score the text again with this version.")
    keep = None if scores.searched is None else np.asarray(scores.searched[:m], bool)
    _d, ids, vals = retriever.neighbors(scores.queries[:m], keep)
    k = min(vals.shape[1], scores.vals.shape[1])
    if not np.array_equal(vals[:, :k], scores.vals[:m, :k]):
        log.warning("the search, run again with the scores' fp16 queries, found other neighbours than the scores "
                    "hold for %d of %d tokens (near-ties, or their order): the page shows those found again",
                    int((vals[:, :k] != scores.vals[:m, :k]).any(1).sum()), m)
    return ids


def neighbor_contexts(ds: Datastore, rows: np.ndarray,
                      max_tokens: int = 20) -> dict[int, tuple[str, int, list[int], int]]:
    """row → (document name, offset, up to max_tokens token ids ending at the row's token, the token after it: the
    row's value), one locate for all rows."""
    rows = np.asarray(rows, np.int64)
    docs = ds.documents
    vals = ds.vals
    out = {}
    for row, d in zip(rows.tolist(), ds.locate(rows).tolist()):
        name, start, _count, first = docs[d]
        pos = row - start  # the key at `row` is the hidden state of token `pos` of its document
        lo = max(0, pos - max_tokens + 1)
        # Token j > 0 of a document is vals[start + j - 1]; token 0 is stored in the document table.
        toks = [int(v) for v in vals[start + max(lo, 1) - 1: start + pos]]
        out[row] = (str(name), int(pos), [int(first)] + toks if lo == 0 else toks, int(vals[row]))
    return out


def lm_top_tokens(lm: LM, docs: list[tuple[str, list[int]]], scores: Scores, m: int, context: int, stride: int,
                  batch_size: int = 4, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(ids (m, top), probabilities (m, top)) of p_LM's most likely tokens for the first m scored tokens.

    Runs the LM again over the windows that own those tokens, in the windows eval used.
    """
    want = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(scores.doc[:m], scores.pos[:m]))}
    work = []
    for d in sorted({d for d, _ in want}):
        ids = docs[d][1]
        for w in plan_windows(d, len(ids), context, stride):
            if any((d, p) in want for p in range(w.own_from + 1, w.own_to + 1)):
                work.append((w, ids[w.begin: w.end]))
    out_ids, out_p = np.zeros((m, top), np.int64), np.zeros((m, top))
    for owned in forward_owned(lm, work, batch_size, logits=True):
        for o in owned:
            logp = torch.log_softmax(o.logits.double(), dim=-1)  # (n, V)
            p, t = torch.topk(logp, top, dim=-1)  # (n, top)
            for r in range(logp.shape[0]):
                i = want.get((o.window.doc, o.window.own_from + 1 + r))
                if i is not None:
                    out_ids[i], out_p[i] = t[r].cpu().numpy(), np.exp(p[r].cpu().numpy())
    return out_ids, out_p
