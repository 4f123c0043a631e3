"""Index choices on real keys: perplexity after exact re-ranking against queries/s.

    python bench/index_curves.py [--datastore bench/results/code] [--queries 4000] [--nprobe 4,8,16,32]
                                 [--factories "IVF512,PQ64;IVF512,PQ64x4fs;..."]

Keys: the code datastore bench/quality.py builds (SmolLM2, 576-d). Queries, targets and LM
log-probs: the first --queries tokens of its cached exact test scores (bench/results/code-test-exact.h5),
so the LM is not run. Every index is trained as `knnlm train-index --factory` trains it (same
sample size and PQ settings) and cached in bench/results/index-curves/. Each row: the kNN-LM
perplexity with the tuned fixed λ and T after re-ranking the k neighbours on the fp16 keys, its
change against exact search, and queries/s of the faiss search alone and with re-ranking (one
thread, one run: compare rows, not machines).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from common import code_bench_inputs
from knnlm.evaluate import report
from knnlm.index import PQ_CENTROIDS, load_index, make_factory_index, read_index_info
from knnlm.retrieval import exact_distances

FACTORIES = "IVF512,PQ64;IVF512,PQ64x4fs;OPQ64,IVF512,PQ64x4fs;PCAR288,IVF512,PQ32x4fs;IVF512_HNSW32,PQ64x4fs"


def trained(ds, factory: str, cache: Path, seed: int = 0):
    """The factory's index over the datastore's keys, trained like train_index, cached."""
    path = cache / (factory.replace(",", "_") + ".faiss")
    built = read_index_info(ds)
    if built and built["factory"] == factory:  # the datastore's own index (train_index): no need to train it again
        return load_index(ds), {"seconds": built["total_seconds"], "bytes_per_key": int(load_index(ds).sa_code_size())}
    if path.exists():
        return faiss.read_index(str(path)), json.loads(path.with_suffix(".json").read_text())
    index = make_factory_index(factory, ds.dim)
    ivf = faiss.try_extract_index_ivf(index)
    n = ds.count
    train = min(n, max(PQ_CENTROIDS, 64 * (ivf.nlist if ivf is not None else 1)))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=train, replace=False))
    if ivf is not None:
        ivf.cp.seed = seed
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.max_points_per_centroid, pq.cp.niter, pq.cp.seed = 64, 15, seed
    t0 = time.perf_counter()
    index.train(np.asarray(ds.keys[sample], dtype=np.float32))
    for lo in range(0, n, 65_536):
        index.add(np.asarray(ds.keys[lo: lo + 65_536], dtype=np.float32))
    info = {"seconds": round(time.perf_counter() - t0, 1), "bytes_per_key": int(index.sa_code_size())}
    cache.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    return index, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default="bench/results/code")
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--nprobe", default="4,8,16,32")
    ap.add_argument("--factories", default=FACTORIES)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    ds, scores, mix = code_bench_inputs(args.datastore, "test", args.threads)
    scores = scores.subset(np.arange(min(args.queries, len(scores))))
    q = scores.queries.astype(np.float32)

    def ppl(dists, ids) -> float:
        s = scores.subset(np.arange(len(scores)))
        s.dists = dists
        s.vals = ds.values_of(ids)
        s.searched = None
        return report(s, mix)["knn_lm_ppl"]

    exact = report(scores, mix)["knn_lm_ppl"]
    print(f"{ds.count} keys of width {ds.dim}; {len(q)} test queries; k {args.k}; λ {mix.lam:.3f}, "
          f"T {mix.temperature:.3g}; {args.threads} thread(s); exact search: {exact:.4f}\n")
    print("| index | bytes/key | train+add s | nprobe | perplexity, re-ranked | vs exact | queries/s search "
          "| queries/s search + re-rank |")
    print("|---|---|---|---|---|---|---|---|")
    cache = Path(args.datastore).parent / "index-curves"
    for factory in args.factories.split(";"):
        index, info = trained(ds, factory, cache)
        ivf = faiss.try_extract_index_ivf(index)
        for nprobe in [int(x) for x in args.nprobe.split(",")]:
            ivf.nprobe = nprobe
            t0 = time.perf_counter()
            _, ids = index.search(q, args.k)
            t_search = time.perf_counter() - t0
            t0 = time.perf_counter()
            dists = exact_distances(q, ds.keys, ids)
            order = np.argsort(dists, axis=1, kind="stable")
            dists, ids = np.take_along_axis(dists, order, 1), np.take_along_axis(ids, order, 1)
            t_rerank = time.perf_counter() - t0
            p = ppl(dists, ids)
            print(f"| {factory} | {info['bytes_per_key']} | {info['seconds']} | {nprobe} | {p:.4f} | "
                  f"{100 * (p / exact - 1):+.2f}% | {len(q) / t_search:.0f} | {len(q) / (t_search + t_rerank):.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
