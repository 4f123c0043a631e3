"""RetoMaton on the code benchmark: searches saved and perplexity against a full search every step.

    python bench/retomaton.py [--datastore bench/results/code] [--split test] [--min-knns 1,10,50,200]
                              [--candidates 1000,2048] [--tokens N]

Reads the datastore bench/quality.py builds (SmolLM2 keys of Python code) and its cached exact
scores (bench/results/code-{split}-exact.h5): their queries, targets and LM log-probs are what
`knnlm eval` computes for the held-out part, so the LM is not run again. Both columns use the same
index (the datastore's), k, nprobe, λ and T (the tuned fixed λ of lambda.json). RetoMaton chains
restart at each window's first owned position (as `knnlm eval` steps them, windows batched by
length) and, for comparison, run across a document's windows in order.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import code_bench_inputs
from knnlm.evaluate import report
from knnlm.retomaton import chain_neighbors, open_automaton
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.windows import plan_windows


def chain_starts(doc: np.ndarray, pos: np.ndarray, context: int, stride: int, per_window: bool) -> np.ndarray:
    """First row of each chain: each window's first owned target (per_window) or each document's first."""
    starts = []
    for d in np.unique(doc):
        rows = np.nonzero(doc == d)[0]
        if not per_window:
            starts.append(rows[0])
            continue
        firsts = {w.own_from + 1 for w in plan_windows(int(d), int(pos[rows].max()) + 1, context, stride)}
        starts.extend(rows[np.isin(pos[rows], list(firsts))])
    return np.array(sorted(starts), dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default="bench/results/code")
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-knns", default="1,10,50,200")
    ap.add_argument("--candidates", default="1000,2048")
    ap.add_argument("--chains", default="window,document", help="chains per window, per document, or both")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None, help="only the first N tokens (whole documents)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ds, scores, mix = code_bench_inputs(args.datastore, args.split, args.threads)
    if args.tokens:
        last_doc = scores.doc[min(args.tokens, len(scores)) - 1]
        scores = scores.subset(np.nonzero(scores.doc <= last_doc)[0])
    q = scores.queries.astype(np.float32)
    context, stride = int(scores.attrs["context"]), int(scores.attrs["stride"])
    print(f"{ds.count} keys; {args.split}: {len(scores)} tokens in {len(np.unique(scores.doc))} documents; "
          f"λ {mix.lam:.3f}, T {mix.temperature:.3g}; k {args.k}, nprobe {args.nprobe}; {args.threads} thread(s)\n")

    def ppl(dists, vals) -> float:
        s = scores.subset(np.arange(len(scores)))
        s.dists, s.vals, s.searched = dists, vals, None
        return report(s, mix)["knn_lm_ppl"]

    print("| search | chains | min_knns | candidates | searches saved | kNN-LM perplexity | vs full search "
          "| retrieval s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| exact (cached) | | | | | {ppl(scores.dists, scores.vals):.4f} | | |")
    full = Retriever(ds, RetrievalConfig(k=args.k, nprobe=args.nprobe))
    t0 = time.perf_counter()
    parts = [full.neighbors(q[a: a + 512]) for a in range(0, len(q), 512)]
    t_full = time.perf_counter() - t0
    ref = ppl(np.concatenate([p[0] for p in parts]), np.concatenate([p[2] for p in parts]))
    print(f"| full search every step | | | | 0% | {ref:.4f} | | {t_full:.1f} |", flush=True)
    auto = open_automaton(full)
    for per_window in [c == "window" for c in args.chains.split(",")]:
        starts = chain_starts(scores.doc, scores.pos, context, stride, per_window)
        for cand in [int(x) for x in args.candidates.split(",")]:
            for m in [int(x) for x in args.min_knns.split(",")]:
                r = Retriever(ds, RetrievalConfig(k=args.k, nprobe=args.nprobe, retomaton=True, min_knns=m,
                                                  max_candidates=cand))
                t0 = time.perf_counter()
                dists, _ids, vals, saved = chain_neighbors(r, auto, q, scores.targets, starts)
                t = time.perf_counter() - t0
                p = ppl(dists, vals)
                print(f"| RetoMaton | {'per window' if per_window else 'per document'} ({len(starts)}) | {m} | "
                      f"{cand} | {100 * saved.mean():.1f}% | {p:.4f} | {100 * (p / ref - 1):+.2f}% "
                      f"| {t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
