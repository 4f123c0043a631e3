"""Re-rank depth: perplexity and re-ranking cost when only the first R of the k candidates get exact distances.

    python bench/rerank_depth.py [--datastore bench/results/real-1m] [--tokens 6000] [--depths 0,64,...,1000]

The datastore's index returns k = 1000 candidates ordered by their PQ distances. Re-ranking recomputes
all k distances from keys.npy; depth R recomputes the first R and keeps the PQ distances of the rest,
raised to the farthest re-ranked one (knnlm.retrieval.partial_rerank; R = 0: no re-ranking, R = k:
eval's default). Text: the real datastore's eval files (bench/eval.py's
eval_docs) scored once by the LM; λ and T: the datastore's tuned fixed ones (lambda.json). Time: the
re-ranking of the first R candidates per query (median of 3 over 2,048 queries, the pages warm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import BENCH_DEVICE, BENCH_MODEL, median_seconds  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m"))
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--depths", default="0,32,64,128,256,512,1000")
    args = ap.parse_args()

    from eval import eval_docs
    from knnlm.datastore import open_datastore
    from knnlm.evaluate import score_documents
    from knnlm.interpolate import interpolate, knn_log_prob, perplexity
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever, as_tensor, exact_distances, partial_rerank

    path = Path(args.datastore)
    if not (path / "lambda.json").exists():
        sys.exit(f"{path} has no lambda.json; tune it first (knnlm tune-lambda -d {path} ...).")
    ds = open_datastore(path)
    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    tuned = json.loads((path / "lambda.json").read_text())
    lam, temp = float(tuned["lambda"]), float(tuned["temperature"])
    docs = eval_docs(lm, args.tokens, path if "real" in path.name else None)
    s = score_documents(lm, None, docs, ds.meta["context"], ds.meta["stride"], keep_queries=True)
    retriever = Retriever(ds, RetrievalConfig(rerank=False))
    q = np.asarray(s.queries, np.float32)
    pq_d, ids = retriever.index.search(q, retriever.k)  # ordered by PQ distance
    keys = as_tensor(ds.keys)
    exact = exact_distances(q, keys, ids)
    vals = ds.values_of(ids)
    out = {"datastore": str(path), "tokens": len(s), "k": retriever.k, "lambda": lam, "temperature": temp,
           "lm_ppl": perplexity(s.lm_logp), "depths": {}}
    full = None
    sample = slice(0, min(len(q), 2048))
    for depth in map(int, args.depths.split(",")):
        d = partial_rerank(pq_d, exact[:, :depth]) if depth else pq_d
        ppl = perplexity(interpolate(s.lm_logp, knn_log_prob(d, vals, s.targets, temp), lam))
        full = ppl if depth >= retriever.k else full
        sec = median_seconds(lambda: exact_distances(q[sample], keys, ids[sample, :depth])) if depth else 0.0
        out["depths"][depth] = {"knn_lm_ppl": ppl, "rerank_ms_per_query": round(1000 * sec / len(q[sample]), 4)}
        print(json.dumps({depth: {**out["depths"][depth], "knn_lm_ppl": round(ppl, 4)}}), file=sys.stderr, flush=True)
    for row in out["depths"].values():
        if full is not None:
            row["vs_full_rerank"] = round(row["knn_lm_ppl"] / full - 1, 5)
        row["knn_lm_ppl"] = round(row["knn_lm_ppl"], 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
