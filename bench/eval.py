"""kNN-LM eval throughput ÷ LM-only throughput, and peak RSS, at several datastore sizes.

    python bench/eval.py [--sizes 100000,1000000] [--tokens 3000]

Each size runs in its own process (so peak RSS is its own); within it the LM-only and the
kNN-LM passes alternate twice over the same tokens, and the ratio uses the sums. Keys are
random (the timing does not depend on what they encode); datastores are cached in
bench/results/ between runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent


def one_size(n: int, tokens: int) -> dict:
    """Measure at one datastore size (run in a child process)."""
    from common import BENCH_DEVICE, BENCH_MODEL, MemorySampler, peak_rss_mib, stdlib_texts
    from knnlm.datastore import open_datastore
    from knnlm.evaluate import Timer, score_documents
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    path = HERE / "results" / f"synthetic-{n}"
    ds = open_datastore(path)
    docs, total = [], 0
    for name, text in stdlib_texts(50, seed=1):
        docs.append((name, text))
        total += len(lm.encode(text))
        if total >= tokens:
            break
    retriever = Retriever(ds, RetrievalConfig())  # the defaults: k 1000, nprobe 8, re-rank on
    rss_before = peak_rss_mib()
    score_documents(lm, None, docs[:1], 512, 256)  # warm-up
    lm_s = knn_s = 0.0
    timer = Timer()
    with MemorySampler() as mem:
        for _ in range(2):
            t0 = time.perf_counter()
            s = score_documents(lm, None, docs, 512, 256)
            lm_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            score_documents(lm, retriever, docs, 512, 256, timer=timer)
            knn_s += time.perf_counter() - t0
    keys_mib = (path / "keys.npy").stat().st_size / 2**20
    return {"keys": n, "tokens": len(s), "lm_only_tokens_per_s": 2 * len(s) / lm_s,
            "knn_lm_tokens_per_s": 2 * len(s) / knn_s, "ratio": lm_s / knn_s,
            "retrieval_share_of_knn_time": timer.retrieval / knn_s, "keys_npy_mib": round(keys_mib),
            "index_mib": round((path / "index.faiss").stat().st_size / 2**20),
            "peak_rss_mib_after_load": round(rss_before), "peak_rss_mib": round(peak_rss_mib()),
            "peak_private_mib": round(mem.peak["RssAnon"]), "peak_mapped_file_mib": round(mem.peak["RssFile"])}


def prepare(n: int) -> None:
    """Create the synthetic datastore of n keys and its index (run in a process of its own)."""
    from common import BENCH_DEVICE, BENCH_MODEL, cached_synthetic
    from knnlm.lm import load_lm

    path = HERE / "results" / f"synthetic-{n}"
    if not (path / "index.faiss").exists():
        cached_synthetic(path, load_lm(BENCH_MODEL, BENCH_DEVICE), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare is not None:
        prepare(args.prepare)
        return
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.tokens)))
        return
    rows = []
    for n in map(int, args.sizes.split(",")):
        subprocess.run([sys.executable, __file__, "--prepare", str(n)], check=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("target: ratio >= 0.90 at 1M keys; peak RSS must not grow with keys.npy (peak_private_mib is the\n"
          "process's own memory; peak_mapped_file_mib counts keys.npy pages a search touched: page cache)")


if __name__ == "__main__":
    main()
