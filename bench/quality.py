"""The real-text check: kNN-LM perplexity on code, with the bundled SmolLM2.

    python bench/quality.py [--tokens 100000] [--holdout 0.15] [--out bench/results/code] [--skip-search]

Datastore: Python files under the installed transformers/models/ package, shuffled with a
fixed seed, up to --tokens keys; evaluation: the held-out test documents of the same stream
(other files of the same folder); tuning: the held-out dev documents. Prints markdown tables:
exact search over a grid of T and λ (from one cached scoring pass), IVF-PQ with and without
re-ranking against exact search, and every tuned policy (fixed, adaptive, the learned gate with
and without retrieval skipping, SPALM) on held-out tokens.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import transformers

from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.scores import load_scores
from knnlm.evaluate import EvalConfig, report, run_eval
from knnlm.lm import load_lm
from knnlm.retrieval import RetrievalConfig
from knnlm.combine import FixedLambda, resolve_combiner, save_lambda
from knnlm.combine.gate import GateConfig
from knnlm.tune import TuneConfig, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--holdout", type=float, default=0.15)
    ap.add_argument("--out", default="bench/results/code")
    ap.add_argument("--skip-search", action="store_true", help="leave out the IVF-PQ table (two test passes)")
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

    exact, scores = cached_scores(ds, lm, "test", out)
    print(f"test tokens: {exact['tokens']}; LM perplexity {exact['lm_ppl']:.3f}\n")
    lams, temps = [0.1, 0.25, 0.5, 0.75], [1, 10, 30, 100]
    print("exact search, k = 1000: kNN-LM perplexity (kNN-only in the last column)\n")
    print("| T \\ λ | " + " | ".join(f"{x:g}" for x in lams) + " | kNN only |")
    print("|---" * (len(lams) + 2) + "|")
    for t in temps:
        cells = [report(scores, FixedLambda(lam, t, "grid")) for lam in lams]
        print(f"| {t} | " + " | ".join(f"{c['knn_lm_ppl']:.3f}" for c in cells) + f" | {cells[0]['knn_only_ppl']:.2f} |")

    if args.skip_search:
        print("\n(IVF-PQ table skipped: --skip-search)")
    else:
        search_table(ds, lm, scores, exact)
    tuning_tables(ds, lm, scores, exact, out)


def cached_scores(ds, lm, split: str, out: Path):
    """Exact-search scores of a held-out split, cached beside the datastore (they take the longest)."""
    path = Path(f"{out}-{split}-exact.h5")
    if path.exists():
        try:
            scores = load_scores(str(path))
            return report(scores, FixedLambda(0.0, 1.0, "cache")) | {"tokens_per_s": float("nan")}, scores
        except KNNLMError:
            pass
    return run_eval(ds, cfg=EvalConfig(lam="0", retrieval=RetrievalConfig(exact=True), save_scores=str(path),
                                       overwrite=True), lm=lm, split=split)  # its own cache, damaged


def search_table(ds, lm, scores, exact) -> None:
    print("\nIVF-PQ (default index, nprobe 8) against exact search, T = 30, λ = 0.5\n")
    print("| search | kNN-LM perplexity | vs exact | tokens/s |")
    print("|---|---|---|---|")
    ref = report(scores, FixedLambda(0.5, 30.0, "grid"))
    print(f"| exact | {ref['knn_lm_ppl']:.3f} | | {exact['tokens_per_s']:.0f} |")
    for name, rc in [("IVF-PQ, re-ranked", RetrievalConfig()), ("IVF-PQ, PQ distances", RetrievalConfig(rerank=False))]:
        r, _ = run_eval(ds, cfg=EvalConfig(lam="0.5", temperature=30.0, retrieval=rc), lm=lm)
        print(f"| {name} | {r['knn_lm_ppl']:.3f} | {100 * (r['knn_lm_ppl'] / ref['knn_lm_ppl'] - 1):+.2f}% "
              f"| {r['tokens_per_s']:.0f} |")


def tuning_tables(ds, lm, scores, exact, out) -> None:
    _, dev = cached_scores(ds, lm, "dev", out)
    head = lm.model.get_output_embeddings()
    print(f"\nlearned gate: logistic regression against one hidden layer (dev, held-out half, {len(dev)} tokens)\n")
    print("| gate | before search | after search |")
    print("|---|---|---|")
    for hidden in (0, 32):
        r = tune(dev, TuneConfig(gate_config=GateConfig(hidden=hidden), skip=False, spalm=False))
        print(f"| {'logistic' if hidden == 0 else f'{hidden} hidden units'} | {r['heldout']['gate_pre_ppl']:.3f} "
              f"| {r['heldout']['gate_ppl']:.3f} |")
    result = tune(dev, TuneConfig(), description=f"dev part of {ds.path}", head=head)
    save_lambda(ds.path, result, result.pop("tensors"))
    h = result["heldout"]
    print(f"\ntuned on the dev part ({len(dev)} tokens; exact search); test: {len(scores)} tokens\n")
    print("| policy | λ | T | dev, held-out half | test | searches skipped (test) |")
    print("|---|---|---|---|---|---|")
    print(f"| base LM | 0 | - | {h['base_ppl']:.3f} | {exact['lm_ppl']:.3f} | |")
    rows = [("fixed", "tuned", {}, h["fixed_ppl"]), ("adaptive (32 bins)", "adaptive", {}, h["adaptive_ppl"]),
            ("gate, before search", "gate-pre", {}, h["gate_pre_ppl"]), ("gate, after search", "gate", {}, h["gate_ppl"]),
            ("gate + skip", "gate", {"skip_below": "tuned"}, h["skip"]["ppl"]),
            ("SPALM", "0.25", {"combine": "spalm"}, h["spalm_ppl"])]  # the default λ: SPALM reads none
    for name, spec, kw, held in rows:
        comb = resolve_combiner(spec, ds.path, **kw)
        test = scores
        if comb.skip is not None:  # the test scores searched everything: skipping leaves λ = 0 where it skips
            test = scores.subset(np.arange(len(scores)))
            test.searched = comb.search_mask(scores.queries, scores.lm_stats())
        r = report(test, comb, head)
        lam = {"tuned": f"{result['lambda']:.3f}", "adaptive": "per bin", "gate-pre": "learned", "gate": "learned",
               "0.25": "gate g"}[spec]
        t = "-" if spec == "0.25" else f"{comb.temperature:.3g}"
        skipped = f"{100 * r['searches_skipped']:.1f}%" if comb.skip is not None else ""
        print(f"| {name} | {lam} | {t} | {held:.3f} | {r['knn_lm_ppl']:.3f} | {skipped} |")
    print(f"\nskip threshold {h['skip']['threshold']:.4f}: skipped share against perplexity (dev, held-out half)\n")
    print("| threshold | searches skipped | perplexity |")
    print("|---|---|---|")
    for c in h["skip_curve"]:
        print(f"| {c['threshold']:.4f} | {100 * c['skipped']:.0f}% | {c['ppl']:.3f} |")


if __name__ == "__main__":
    main()
