"""Exact search in torch (--search-device) against faiss: recall of the true k nearest, and queries/s.

    python bench/torch_search.py [--datastore DIR | --keys 1000000] [--queries 4096] [--device cuda]
                                 [--oversample 1,1.25,1.5,2] [--threads N] [--fp16]

Keys are a datastore's (default: the synthetic one bench/eval.py caches, random keys; --datastore
for real ones). Queries are stored keys plus noise (their neighbours are close: the precise end)
and, as many, fresh random vectors of the keys' scale (every distance alike: the hard end for fp16
scores). Recall is against faiss's exact flat search on the CPU over the first 512 queries of each
kind; time is the median of 3 runs over all queries, for the torch search on --device and for the
datastore's own faiss index (k 1000, nprobe 8, re-ranked, on --threads CPU threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import BENCH_DEVICE, BENCH_MODEL, cached_synthetic, median_seconds, threads  # noqa: E402

HERE = Path(__file__).parent


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true neighbours (truth) among the ids found."""
    return round(float(np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(ids, truth)])), 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--device", default=BENCH_DEVICE)
    ap.add_argument("--oversample", default="1,1.25,1.5,2")
    ap.add_argument("--fp16", action="store_true", help="fp16 scores on a CPU device too (a GPU's path; slow there)")
    ap.add_argument("--threads", type=int, default=threads())
    args = ap.parse_args()

    import faiss
    import torch

    from knnlm.datastore import open_datastore
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever, exact_index
    from knnlm.torch_search import TorchExactIndex, parse_search_device

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    path = Path(args.datastore) if args.datastore else \
        cached_synthetic(HERE / "results" / f"synthetic-{args.keys}", load_lm(BENCH_MODEL, "cpu"), args.keys)
    ds = open_datastore(path)
    rng = np.random.default_rng(0)
    half = args.queries // 2
    rows = np.sort(rng.choice(ds.count, half, replace=False))
    stored = np.asarray(ds.keys[rows], np.float32)
    scale = float(stored.std())
    near = stored + rng.normal(0, 0.1 * scale, stored.shape).astype(np.float32)
    far = (rng.normal(0, scale, (args.queries - half, ds.dim)) + stored.mean(0)).astype(np.float32)
    queries = {"stored+noise": near, "random": far}

    flat = exact_index(ds)
    truth = {name: flat.search(q[:512], args.k)[1] for name, q in queries.items()}
    del flat
    device = parse_search_device(args.device)
    out = {"datastore": str(path), "keys": ds.count, "k": args.k, "queries": args.queries, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cpu_threads": args.threads, "fp16_scores": device.type == "cuda" or args.fp16, "torch": {}}
    t0 = time.perf_counter()
    index = TorchExactIndex(ds.keys, device, half=True if args.fp16 else None)
    out["torch_load_seconds"] = round(time.perf_counter() - t0, 2)
    both = np.concatenate(list(queries.values()))
    for over in map(float, args.oversample.split(",")):
        index.oversample = over
        row = {}
        for name, q in queries.items():
            row[f"recall_{name}"] = recall(index.search(q[:512], args.k)[1], truth[name])
        sec = median_seconds(lambda: index.search(both, args.k))
        row["us_per_query"] = round(1e6 * sec / len(both), 2)
        out["torch"][f"oversample {over:g}"] = row
        print(json.dumps({f"torch, oversample {over:g}": row}), file=sys.stderr, flush=True)
    index = None  # the GPU memory goes back before faiss runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    retriever = Retriever(ds, RetrievalConfig(k=args.k))
    sample = both[:: max(1, len(both) // 1024)]
    sec = median_seconds(lambda: retriever.search(sample))
    out["faiss_index"] = {"kind": retriever.kind, "us_per_query": round(1e6 * sec / len(sample), 2),
                          "recall_stored+noise": recall(retriever.search(queries["stored+noise"][:512])[1],
                                                        truth["stored+noise"])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
