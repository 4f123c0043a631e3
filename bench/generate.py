"""Per-token decode cost with kNN ÷ without, at a 1M-key datastore.

    python bench/generate.py [--keys 1000000] [--new-tokens 64] [--rounds 3]
    python bench/generate.py --datastore bench/results/real-1m [--variants knn,retomaton,skip]

Greedy decoding of the same prompt with the LM alone and with the kNN-LM (default index,
k 1000, nprobe 8, re-ranking on), alternating, in one process; the ratio uses summed
seconds per generated token. Keys are random (the cost does not depend on what they
encode); the datastore is shared with bench/eval.py in bench/results/. --datastore times a
real one (bench/eval.py --real builds bench/results/real-1m) with each speed-feature variant:
RetoMaton (its pointers follow the chosen tokens), the learned skip (where tuned) and "torch", exact
search in torch on $KNNLM_BENCH_SEARCH_DEVICE (default: the LM's device).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (BENCH_DEVICE, BENCH_MODEL, VARIANTS_HELP, cached_synthetic, parse_variant,  # noqa: E402
                    stdlib_texts, variant_retrieval)
from knnlm.datastore import open_datastore  # noqa: E402
from knnlm.generate import generate  # noqa: E402
from knnlm.lm import load_lm  # noqa: E402
from knnlm.retrieval import Retriever  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datastore", help="a real datastore to time [default: synthetic keys]")
    ap.add_argument("--variants", default="knn",
                    help=VARIANTS_HELP + " (skip: tuned datastores)")
    args = ap.parse_args()
    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    path = Path(args.datastore) if args.datastore else \
        cached_synthetic(HERE / "results" / f"synthetic-{args.keys}", lm, args.keys)
    ds = open_datastore(path)
    _, text = stdlib_texts(1, seed=2)[0]
    prompt = lm.decode(lm.encode(text)[: args.prompt_tokens])
    window = (ds.meta["context"], ds.meta["stride"])
    variants = {name: parse_variant(name) for name in args.variants.split(",") if name}
    for name, on in variants.items():
        retriever = Retriever(ds, variant_retrieval(on))
        lam, skip = ("gate", "tuned") if "skip" in on else (0.25, None)
        generate(lm, prompt, retriever, lam=lam, skip_below=skip, max_new_tokens=4)  # warm-up: index, pages
        lm_s = lm_n = knn_s = knn_n = retrieval_s = 0.0
        for _ in range(args.rounds):
            plain = generate(lm, prompt, None, max_new_tokens=args.new_tokens, window=window)
            lm_s, lm_n = lm_s + plain.seconds, lm_n + len(plain.tokens)
            mixed = generate(lm, prompt, retriever, lam=lam, skip_below=skip, max_new_tokens=args.new_tokens)
            knn_s, knn_n = knn_s + mixed.seconds, knn_n + len(mixed.tokens)
            retrieval_s += mixed.retrieval_seconds
        lm_ms, knn_ms = 1000 * lm_s / lm_n, 1000 * knn_s / knn_n
        print(json.dumps({"variant": name, "keys": ds.count, "datastore": str(path),
                          "prompt_tokens": args.prompt_tokens, "tokens": int(knn_n),
                          "lm_ms_per_token": round(lm_ms, 2), "knn_lm_ms_per_token": round(knn_ms, 2),
                          "retrieval_ms_per_token": round(1000 * retrieval_s / knn_n, 2),
                          "extra_cost": round(knn_ms / lm_ms - 1, 4), "target": "<= 0.05"}), flush=True)


if __name__ == "__main__":
    main()
