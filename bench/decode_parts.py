"""A decoding step's pieces timed in place, after the LM's forward pass as they run: this code against what it replaced.

    python bench/decode_parts.py [--datastore bench/results/real-1m-IVF2048-PQ64x4fs] [--variant rerank-128]
                                 [--rounds 4]

Greedy decoding of bench/generate.py's prompt, 64 tokens a round, the two sides alternating round by round
(ABBA) in one process. Each side's pieces are wrapped in timers:
- search: Retriever.search of the step's one query. New: its IVF lists by CoarseAssigner.few (a bound over
  the centroids' principal axes), then faiss's search_preassigned; old: faiss's own search (its flat
  quantizer scans every centroid). "coarse" is few() alone (new side only);
- sort: arrays.sort_rows of the re-ranked row. New: np.argsort below ROW_ORDER_MIN_ROWS rows; old: the
  packed uint64 sort for any number of rows;
- mix: interpolate.mix_log_distribution of the step's row. New: each token's weights summed into a zeroed
  vocabulary-wide accumulator (_token_sums); old: np.unique's inverse and np.bincount, as before;
- rerank: retrieval.exact_distances of the step's candidates, as Retriever.search calls it (RetoMaton's and
  the document memory's own calls are not counted). New: the rows gathered and widened to float32 in this
  thread's kept buffers; old: a fresh float32 block per query (torch's .float());
- call: the whole processor step (KNNLogitsProcessor.__call__).
The caches a step meets are the LM's leftovers; sweeping 64 MB between calls did not reproduce them on the
development machine (its L3 is 300 MB): there both sides of each piece timed the same.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (BENCH_DEVICE, BENCH_MODEL, fresh_rerank_rows, parse_variant, stdlib_texts,  # noqa: E402
                    variant_retrieval)

HERE = Path(__file__).parent


def timed(owner, name: str, totals: collections.Counter, key: str):
    """Replace owner.name by a wrapper adding its seconds to totals[key]; returns the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    return original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m-IVF2048-PQ64x4fs"))
    ap.add_argument("--variant", default="rerank-128", help="one bench variant (see bench/generate.py)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds a side (64 tokens each)")
    args = ap.parse_args()

    import numpy as np

    import knnlm.arrays as arrays
    import knnlm.combine.policies as policies
    import knnlm.interpolate as interpolate
    import knnlm.retrieval as retrieval
    from knnlm.datastore import open_datastore
    from knnlm.generate import KNNLogitsProcessor, generate
    from knnlm.lm import load_lm

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    ds = open_datastore(Path(args.datastore))
    _, text = stdlib_texts(1, seed=2)[0]
    prompt = lm.decode(lm.encode(text)[:200])
    r = retrieval.Retriever(ds, variant_retrieval(parse_variant(args.variant)))
    if r._coarse is None:
        sys.exit(f"{args.datastore}'s index is not an IVF index over a flat quantizer: nothing to compare.")
    coarse, min_rows, token_sums = r._coarse, arrays.ROW_ORDER_MIN_ROWS, interpolate._token_sums
    rerank_rows = retrieval._rerank_rows

    def unique_sums(tokens, weights, vocab_size):  # the old way: np.unique's inverse, np.bincount
        _, inverse = np.unique(tokens, return_inverse=True)
        return np.bincount(inverse, weights=weights)[inverse]

    totals = {side: collections.Counter() for side in ("new", "old")}
    steps = {"new": 0, "old": 0}
    generate(lm, prompt, r, lam=0.25, max_new_tokens=4)  # warm-up: index, pages, few()'s axes
    for i in range(2 * args.rounds):
        side = ("new", "old", "old", "new")[i % 4]
        t = totals[side]
        r._coarse = coarse if side == "new" else None  # None: faiss's own search, as before
        arrays.ROW_ORDER_MIN_ROWS = min_rows if side == "new" else 0
        interpolate._token_sums = token_sums if side == "new" else unique_sums
        retrieval._rerank_rows = rerank_rows if side == "new" else fresh_rerank_rows
        undo = [(retrieval.Retriever, "search", timed(retrieval.Retriever, "search", t, "search")),
                (retrieval, "sort_rows", timed(retrieval, "sort_rows", t, "sort")),
                (retrieval, "exact_distances", timed(retrieval, "exact_distances", t, "rerank")),
                (KNNLogitsProcessor, "__call__", timed(KNNLogitsProcessor, "__call__", t, "call")),
                (policies, "mix_log_distribution", timed(policies, "mix_log_distribution", t, "mix")),
                (coarse, "few", timed(coarse, "few", t, "coarse"))]
        try:
            steps[side] += len(generate(lm, prompt, r, lam=0.25, max_new_tokens=64).tokens)
        finally:
            for owner, name, original in undo:
                if owner is coarse:
                    del coarse.few  # the instance attribute: back to the class's method
                else:
                    setattr(owner, name, original)
            r._coarse, arrays.ROW_ORDER_MIN_ROWS, interpolate._token_sums = coarse, min_rows, token_sums
            retrieval._rerank_rows = rerank_rows
    out = {"datastore": args.datastore, "variant": args.variant, "steps_a_side": steps["new"]}
    for piece in ("call", "search", "coarse", "rerank", "sort", "mix"):
        new, old = (1e6 * totals[s][piece] / steps[s] for s in ("new", "old"))
        out[piece] = {"new_us_per_step": round(new, 1), "old_us_per_step": round(old, 1)}
        if old:
            out[piece]["old_over_new"] = round(old / new, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
