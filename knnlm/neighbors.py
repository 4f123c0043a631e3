"""What the datastore retrieves for one position of a text: the LM's guesses, p_kNN's, and the neighbours."""

from __future__ import annotations

import numpy as np
import torch

from .errors import KNNLMError
from .interpolate import knn_log_distribution
from .lm import LM
from .retrieval import Retriever
from .windows import pad_batch, plan_windows


def query_at(lm: LM, ids: list[int], position: int, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and LM logits of token `position`, computed in the window eval would use.

    The text is cut into the datastore's windows (context, stride), so when the text is a stored
    document (or its beginning), a position gets the very key stored for it.

    Returns:
        (key (d,), logits (V,)).
    """
    # A virtual next token lets the last position own a window too (plan_windows skips the final token).
    windows = plan_windows(0, len(ids) + 1, context, stride)
    w = next(w for w in windows if w.own_from <= position < w.own_to)
    end = min(w.end, len(ids))
    x, mask = pad_batch([ids[w.begin: end]])
    keys, logits = lm.forward(x, mask, logits=True)
    return keys[0, position - w.begin], logits[0, position - w.begin]


def _top(logp: torch.Tensor, n: int, lm: LM) -> list[dict]:
    """The n most likely tokens of a log-distribution."""
    vals, idx = torch.topk(logp, n)
    return [{"token": int(i), "text": lm.decode([int(i)]), "prob": float(np.exp(float(v)))}
            for v, i in zip(vals, idx) if np.isfinite(float(v))]


def check_top(top: int) -> None:
    """One sentence for a number of neighbours to show that is not positive."""
    if not top >= 1:
        raise KNNLMError(f"--top {top} is not a positive number of neighbours; pass e.g. --top 10.")


def neighbors(lm: LM, retriever: Retriever, text: str, position: int = -1, top: int = 10, predictions: int = 5,
              temperature: float = 1.0, context_tokens: int = 32, k: int | None = None) -> dict:
    """The neighbours retrieved for one position of a text.

    Args:
        lm: the datastore's model.
        retriever: search over the datastore.
        text: the text; its tokens are numbered from 0.
        position: the token whose hidden state is the query (it predicts the next token);
            negative counts from the end, -1 (the default) is the last token.
        top: neighbours to list.
        predictions: top tokens to list for the LM and for p_kNN.
        temperature: T of p_kNN.
        context_tokens: tokens of each neighbour's preceding context to show.
        k: the neighbours p_kNN is made of (the first k found; the kNN-LM's k), where the retriever searches more
            to list `top` of them; None: all it finds.

    Returns:
        {"position", "tokens", "context" (the text's tokens up to the position), "target" (the
        text's next token, or None at the end), "lm" and "knn" (top predictions), "corpus" (the
        datastore's source), "datastore" (its folder), "top" (as asked: "neighbors" may hold fewer,
        where the search reached no more keys), "neighbors": [{"rank", "distance", "row", "document",
        "offset", "context", "next_token", "next_text", "is_target"}]}.
    """
    check_top(top)
    ids = lm.encode(text)
    if not ids:
        raise KNNLMError("The text is empty; pass some text to look up.")
    pos = position + len(ids) if position < 0 else position
    if not 0 <= pos < len(ids):
        raise KNNLMError(f"--position {position} is outside the text's {len(ids)} tokens; "
                         f"pass a position from {-len(ids)} to {len(ids) - 1}.")
    ds = retriever.ds
    key, logits = query_at(lm, ids, pos, ds.meta["context"], ds.meta["stride"])
    dists, rows, vals = retriever.neighbors(key[None].cpu().numpy())
    knn = knn_log_distribution(dists[:, :k], vals[:, :k], logits.shape[-1], temperature)[0]
    target = ids[pos + 1] if pos + 1 < len(ids) else None
    out = []
    for rank, (d, row, v) in enumerate(zip(dists[0], rows[0], vals[0])):
        if row < 0 or rank >= top:
            break
        name, offset, ctx = ds.context_tokens(int(row), context_tokens)
        out.append({"rank": rank + 1, "distance": float(d), "row": int(row), "document": name, "offset": offset,
                    "context": lm.decode(ctx), "next_token": int(v), "next_text": lm.decode([int(v)]),
                    "is_target": target is not None and int(v) == target})
    return {
        "position": pos, "tokens": len(ids),
        "context": lm.decode(ids[max(0, pos - context_tokens + 1): pos + 1]),
        "target": None if target is None else {"token": target, "text": lm.decode([target])},
        "lm": _top(torch.log_softmax(logits.double(), -1), predictions, lm),
        "knn": _top(knn, predictions, lm),
        "temperature": temperature, "corpus": ds.meta.get("corpus", {}).get("source"), "datastore": str(ds.path),
        "top": top,
        **retriever.describe,
        "neighbors": out,
    }
