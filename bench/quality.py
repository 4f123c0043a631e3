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
import os
from pathlib import Path

import transformers

from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import open_datastore
from knnlm.evaluate import EvalConfig, report, run_eval
from knnlm.lm import load_lm
from knnlm.retrieval import RetrievalConfig
from knnlm.tune import TuneConfig, resolve_lambda, save_lambda, tune


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

    print("\nIVF-PQ (default index, nprobe 8) against exact search, T = 30, λ = 0.5\n")
    print("| search | kNN-LM perplexity | vs exact | tokens/s |")
    print("|---|---|---|---|")
    ref = report(scores, 0.5, 30.0)
    print(f"| exact | {ref['knn_lm_ppl']:.3f} | | {exact['tokens_per_s']:.0f} |")
    for name, rc in [("IVF-PQ, re-ranked", RetrievalConfig()), ("IVF-PQ, PQ distances", RetrievalConfig(rerank=False))]:
        r, _ = run_eval(ds, cfg=EvalConfig(lam="0.5", temperature=30.0, retrieval=rc), lm=lm)
        print(f"| {name} | {r['knn_lm_ppl']:.3f} | {100 * (r['knn_lm_ppl'] / ref['knn_lm_ppl'] - 1):+.2f}% "
              f"| {r['tokens_per_s']:.0f} |")

    _, dev = run_eval(ds, cfg=EvalConfig(lam="0", retrieval=RetrievalConfig(exact=True)), lm=lm, split="dev")
    result = tune(dev, TuneConfig(), description=f"dev part of {ds.path}")
    save_lambda(ds.path, result)
    h = result["heldout"]
    print(f"\ntuned on the dev part ({len(dev)} tokens; exact search)\n")
    print("| λ | T | dev, held-out half | test |")
    print("|---|---|---|---|")
    print(f"| 0 (LM alone) | - | {h['base_ppl']:.3f} | {exact['lm_ppl']:.3f} |")
    for spec, held in (("tuned", h["fixed_ppl"]), ("adaptive", h["adaptive_ppl"])):
        choice = resolve_lambda(spec, ds.path)
        r = report(scores, choice.lambdas_for(scores.nn_dist), choice.temperature)
        lam = f"{choice.lam:.3f}" if choice.lam is not None else f"adaptive, {len(choice.lambdas)} bins"
        print(f"| {lam} | {choice.temperature:.3g} | {held:.3f} | {r['knn_lm_ppl']:.3f} |")


if __name__ == "__main__":
    main()
