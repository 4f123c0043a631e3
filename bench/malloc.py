"""Eval with glibc's default handling of large blocks against the blocks held (README: "Holding freed memory"),
in fresh processes, alternating.

    python bench/malloc.py [--datastore bench/results/real-1m-IVF2048-PQ64x4fs] [--pairs 3] [--tokens 6000]

"held" runs with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB: glibc then serves blocks up to
1 GiB from its heap and keeps up to 1 GiB of it when freed, instead of mapping each block above its
threshold (at most 32 MiB) afresh and handing freed heap back, so that a forward pass's blocks fault their
pages in again, batch after batch. "default" runs without any MALLOC_* variable or GLIBC_TUNABLES.

Each process times the LM alone and the kNN-LM (the first 128 candidates re-ranked, the learned gate where the
datastore is tuned, else λ 0.25; the report counted) twice each over the same eval files as bench/eval.py's
--real, alternating as bench/eval.py does (eval.alternate), and reports ms per token, their ratio, its minor
page faults and its peak private memory. An allocator
setting holds for a whole process, so the two sides cannot share one: they alternate process by process
(default, held, default, ...), and the speed-ups are taken over the sums.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
HELD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def child(datastore: Path, tokens: int) -> dict:
    """One process's timings, under whatever allocator settings its environment gives."""
    import resource

    sys.path.insert(0, str(HERE))
    from common import BENCH_DEVICE, BENCH_MODEL
    from eval import alternate, default_lambda, eval_docs

    from knnlm.combine import resolve_combiner
    from knnlm.datastore import open_datastore
    from knnlm.evaluate import report, score_documents
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    ds = open_datastore(datastore)
    docs = eval_docs(lm, tokens, datastore)
    combiner = resolve_combiner(default_lambda(datastore), datastore)
    retriever = Retriever(ds, RetrievalConfig(rerank_depth=128))
    score_documents(lm, retriever, docs[:1], 512, 256, combiner=combiner)  # warm-up
    lm_s, knn_s, scores, _timer, mem, _mix_s, _per_round = alternate(lm, retriever, docs, combiner, rounds=2)
    r = report(scores, combiner)
    n = 2 * r["tokens"]
    return {"held": all(os.environ.get(k) == v for k, v in HELD.items()), "tokens": r["tokens"],
            "lm_ms_per_token": 1e3 * lm_s / n, "knn_lm_ms_per_token": 1e3 * knn_s / n, "ratio": lm_s / knn_s,
            "knn_lm_ppl": r["knn_lm_ppl"], "lm_s": lm_s, "knn_s": knn_s,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
            "peak_private_mib": round(mem.peak["RssAnon"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m-IVF2048-PQ64x4fs"))
    ap.add_argument("--pairs", type=int, default=3, help="(default, held) process pairs")
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--child", choices=("default", "held"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.datastore)
    if args.child:
        print(json.dumps(child(path, args.tokens)))
        return
    if platform.libc_ver()[0] != "glibc":
        sys.exit("These settings are glibc's; this Python does not run on glibc: nothing to compare.")
    if not (path / "index.faiss").exists():
        sys.exit(f"{path} has no index: build it first (python bench/eval.py --real --factory IVF2048,PQ64x4fs).")
    if args.pairs < 1:
        sys.exit("--pairs must be 1 or more.")
    runs = {"default": [], "held": []}
    for _ in range(args.pairs):
        for mode in runs:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
            out = subprocess.run([sys.executable, __file__, "--datastore", str(path), "--tokens", str(args.tokens),
                                  "--child", mode], capture_output=True, text=True,
                                 env={**env, **HELD} if mode == "held" else env)
            if out.returncode:
                sys.exit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"the {mode} process failed")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({mode: runs[mode][-1]}), file=sys.stderr, flush=True)
    total = {m: {k: sum(r[k] for r in rs) for k in ("lm_s", "knn_s")} for m, rs in runs.items()}
    summary = {
        "pairs": args.pairs,
        "lm_speedup": round(total["default"]["lm_s"] / total["held"]["lm_s"], 3),
        "knn_lm_speedup": round(total["default"]["knn_s"] / total["held"]["knn_s"], 3),
        "ratio": {m: round(total[m]["lm_s"] / total[m]["knn_s"], 3) for m in runs},
        "minor_faults": {m: [r["minor_faults"] for r in rs] for m, rs in runs.items()},
        "peak_private_mib": {m: [r["peak_private_mib"] for r in rs] for m, rs in runs.items()},
        "knn_lm_ppl": {m: sorted({round(r["knn_lm_ppl"], 6) for r in rs}) for m, rs in runs.items()},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
