"""The real-text check: kNN-LM perplexity on code, with the bundled SmolLM2.

    python bench/quality.py [--tokens 100000] [--holdout 0.15] [--out bench/results/code]

Datastore: Python files under the installed transformers/models/ package, shuffled with a
fixed seed, up to --tokens keys; evaluation: the held-out test documents of the same stream
(other files of the same folder); tuning: the held-out dev documents. Prints markdown tables:
exact search over a grid of T and λ (from one cached scoring pass), IVF-PQ with and without
re-ranking against exact search, and the tuned fixed and adaptive λ on held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import transformers

from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import open_datastore
from knnlm.evaluate import EvalConfig, report, run_eval
from knnlm.lm import load_lm
from knnlm.retrieval import RetrievalConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--holdout", type=float, default=0.15)
    ap.add_argument("--out", default="bench/results/code")
    args = ap.parse_args()
    lm = load_lm("smollm2-135m", "cpu")
    out = Path(args.out)
    if not (out / "meta.json").exists():
        src = os.path.join(os.path.dirname(transformers.__file__), "models")
        cfg = BuildConfig(glob="**/*.py", shuffle_seed=0, max_tokens=args.tokens, holdout=args.holdout)
        build_datastore(src, out, cfg, lm=lm)
    ds = open_datastore(out)
    print(f"datastore: {ds.count} keys from {len(ds.documents)} files; test: "
          f"{len(ds.heldout('test'))} files, dev: {len(ds.heldout('dev'))} files\n")

    exact, scores = run_eval(ds, cfg=EvalConfig(lam="0", retrieval=RetrievalConfig(exact=True)), lm=lm)
    print(f"test tokens: {exact['tokens']}; LM perplexity {exact['lm_ppl']:.3f}\n")
    lams, temps = [0.1, 0.25, 0.5, 0.75], [1, 10, 30, 100]
    print("exact search, k = 1000: kNN-LM perplexity (kNN-only in the last column)\n")
    print("| T \\ λ | " + " | ".join(f"{x:g}" for x in lams) + " | kNN only |")
    print("|---" * (len(lams) + 2) + "|")
    for t in temps:
        cells = [report(scores, lam, t) for lam in lams]
        print(f"| {t} | " + " | ".join(f"{c['knn_lm_ppl']:.3f}" for c in cells) + f" | {cells[0]['knn_only_ppl']:.2f} |")

    print("\nIVF-PQ (default index) against exact search, T = 30, λ = 0.5\n")
    print("| search | kNN-LM perplexity | vs exact | tokens/s |")
    print("|---|---|---|---|")
    base = dict(lam="0.5", temperature=30.0)
    ref, _ = run_eval(ds, cfg=EvalConfig(**base, retrieval=RetrievalConfig(exact=True)), lm=lm)
    for name, rc in [("exact", None), ("IVF-PQ, re-ranked", RetrievalConfig()),
                     ("IVF-PQ, PQ distances", RetrievalConfig(rerank=False))]:
        r = ref if rc is None else run_eval(ds, cfg=EvalConfig(**base, retrieval=rc), lm=lm)[0]
        print(f"| {name} | {r['knn_lm_ppl']:.3f} | {100 * (r['knn_lm_ppl'] / ref['knn_lm_ppl'] - 1):+.2f}% "
              f"| {r['tokens_per_s']:.0f} |")

    try:
        from knnlm.tune import TuneConfig, save_lambda, tune
    except ImportError:
        return
    _, dev = run_eval(ds, cfg=EvalConfig(lam="0", retrieval=RetrievalConfig(exact=True)), lm=lm, split="dev")
    result = tune(dev, TuneConfig(), description=f"dev part of {ds.path}, {len(dev)} tokens")
    save_lambda(ds.path, result)
    print("\ntuned on the dev part, evaluated on the test part (exact search)\n")
    print("| λ | T | kNN-LM perplexity | vs LM |")
    print("|---|---|---|---|")
    print(f"| 0 (LM alone) | - | {exact['lm_ppl']:.3f} | |")
    for spec in ("tuned", "adaptive"):
        r, _ = run_eval(ds, cfg=EvalConfig(lam=spec, retrieval=RetrievalConfig(exact=True)), lm=lm)
        print(f"| {spec} (mean {r['mean_lambda']:.2f}) | {r['temperature']:.3g} | {r['knn_lm_ppl']:.3f} "
              f"| {100 * r['change']:+.1f}% |")
    print("\n" + json.dumps(result.get("heldout", {}), indent=1))


if __name__ == "__main__":
    main()
