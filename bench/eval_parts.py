"""The pieces around the search that issue 10's stop made cheaper, each timed against what it replaced.

    python bench/eval_parts.py [--datastore bench/results/real-1m-IVF2048-PQ64x4fs] [--rows 1024]

One process, the same inputs for both sides, the median of 6 runs each, the sides alternating (2 threads
on the development machine); ratios are the steadier figures. Logits are random at SmolLM2's vocabulary (49,152): the
cost does not depend on their values.

- eval's log-softmax and LM statistics per row: LOGP_ROWS rows at a time with lm_stats(owned=True)
  (numpy's argmax and max) against a window's 256 rows at once with torch.topk (the code replaced);
  and the log-softmax alone, LOGP_ROWS rows at a time against 256;
- sorting re-ranked neighbours: arrays.row_order against np.argsort(kind="stable"), (rows, 1000);
- an IVF index's lists: the Retriever's search with retrieval.CoarseAssigner against faiss's own
  (parallel mode 0, its default), k 1000 without re-ranking, on --datastore (skipped if absent);
- a decoding step: log-softmax of (1, V) in float32 against float64, and mix_log_distribution of
  1000 neighbours with a float32 against a float64 p_LM.

The latest stop's pieces:
- RetoMaton's candidate ids deduplicated (a chain step: 32 rows of ~2,100 ids): arrays.unique_sorted
  against np.unique (NumPy 2.4 hashes integers);
- re-ranking a RetoMaton step's candidates (32 queries × 2048 rows of --datastore's keys):
  split over the threads by candidate rows (RERANK_ROWS_PER_WORKER) against the old rule (one thread
  under 64 queries);
- re-ranking one query's 1000 rows: the thread's kept buffers against a fresh float32 block per query;
- the LM side of eval over --lm-tokens of the real eval files (bench/eval.py's, beside --datastore's
  documents): the output projection over owned positions (logits_to_keep, windows of one tail batched
  together) against every position with batches by length alone (0 skips it: it loads the model).

This stop's piece:
- eval's mixing with the learned gate (--datastore's tuned one), on those tokens' scores (fast-scan, the
  first 128 re-ranked): evaluate.report against the mixing it replaced (common.old_mixing: p_kNN(target)
  twice by a log-sum-exp over full-size arrays, the gate's token statistics by a bincount after a 64-bit
  sort, all rows at once). The two sides' perplexities must agree to 1e-9 first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent
VOCAB = 49_152


def per(seconds: float, n: int) -> float:
    """Microseconds per item."""
    return round(1e6 * seconds / n, 2)


def pair(name: str, new, old, n: int, unit: str, rounds: int = 6) -> dict:
    """Both sides' µs per unit (the median of `rounds` timings each, after a warm-up of each, the sides
    alternating new, old, old, new, ... so that a drift in the machine's state falls on both) and old ÷ new."""
    new(), old()
    times = {new: [], old: []}
    for i in range(rounds):
        for fn in ((new, old) if i % 2 == 0 else (old, new)):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    a, b = statistics.median(times[new]), statistics.median(times[old])
    row = {f"new_us_per_{unit}": per(a, n), f"old_us_per_{unit}": per(b, n), "speed-up": round(b / a, 2)}
    print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m-IVF2048-PQ64x4fs"))
    ap.add_argument("--rows", type=int, default=1024, help="logit rows, neighbour rows and queries")
    ap.add_argument("--lm-tokens", type=int, default=6000, help="eval tokens for the LM-side piece (0: skip it)")
    args = ap.parse_args()

    from knnlm.arrays import row_order
    from knnlm.combine.features import lm_stats
    from knnlm.evaluate import LOGP_ROWS
    from knnlm.interpolate import mix_log_distribution

    rng = np.random.default_rng(0)
    out = {"rows": args.rows, "threads": torch.get_num_threads()}
    logits = torch.from_numpy(rng.normal(0, 3, (args.rows, VOCAB)).astype(np.float32))

    def stats_now():
        for lo in range(0, args.rows, LOGP_ROWS):
            lm_stats(torch.log_softmax(logits[lo: lo + LOGP_ROWS], dim=-1), owned=True)

    def stats_before():  # the code this stop replaced: a window's 256 rows at once, torch.topk
        for lo in range(0, args.rows, 256):
            logp = torch.log_softmax(logits[lo: lo + 256], dim=-1)
            top = torch.topk(logp, 2, dim=-1)
            (-(logp.exp() * logp).nansum(dim=-1)).numpy(), top.values.numpy(), top.indices.numpy()

    out["log_softmax_and_lm_stats"] = pair("log_softmax_and_lm_stats", stats_now, stats_before, args.rows, "row")

    def softmax(rows: int):
        for lo in range(0, args.rows, rows):
            torch.log_softmax(logits[lo: lo + rows], dim=-1)

    out["log_softmax_pieces"] = pair("log_softmax_pieces", lambda: softmax(LOGP_ROWS), lambda: softmax(256),
                                     args.rows, "row")

    dists = rng.random((args.rows, 1000), dtype=np.float32) * 1000
    out["row_order"] = pair("row_order", lambda: row_order(dists),
                            lambda: np.argsort(dists, axis=1, kind="stable"), args.rows, "row")

    path = Path(args.datastore)
    if (path / "index.faiss").exists():
        from knnlm.datastore import open_datastore
        from knnlm.retrieval import RetrievalConfig, Retriever

        ds = open_datastore(path)
        stored = np.asarray(ds.keys[np.sort(rng.choice(ds.count, args.rows, replace=False))], np.float32)
        q = stored + rng.normal(0, 1, stored.shape).astype(np.float32)
        torch_lists = Retriever(ds, RetrievalConfig(rerank=False))
        faiss_lists = Retriever(ds, RetrievalConfig(rerank=False))
        faiss_lists._coarse, faiss_lists.index.parallel_mode = None, 0
        out["coarse"] = {"datastore": str(path),
                         **pair("coarse", lambda: torch_lists.search(q), lambda: faiss_lists.search(q), args.rows,
                                "query")}
        out.update(latest_stop_datastore_pieces(ds, rng, args.lm_tokens))
    else:
        print(f"{path} is absent: no coarse, re-ranking or LM timing (bench/eval.py --real builds it)", file=sys.stderr)

    from knnlm.arrays import unique_sorted

    step_ids = (np.repeat(np.arange(32), 2100) * 1_000_000 + rng.integers(0, 1_000_000, 32 * 2100)).astype(np.int64)
    out["retomaton_dedup"] = pair("retomaton_dedup", lambda: unique_sorted(step_ids), lambda: np.unique(step_ids),
                                  1, "step")

    one = logits[:1]
    out["step_log_softmax"] = pair("step_log_softmax", lambda: torch.log_softmax(one, -1),
                                   lambda: torch.log_softmax(one.double(), -1), 1, "step")
    lp32 = torch.log_softmax(one, -1).numpy()
    lp64 = lp32.astype(np.float64)
    d = np.sort(dists[:1], axis=1)
    v = rng.integers(0, VOCAB, (1, 1000)).astype(np.int32)
    out["step_mix"] = pair("step_mix", lambda: mix_log_distribution(lp32, d, v, 0.25, 30.0),
                           lambda: mix_log_distribution(lp64, d, v, 0.25, 30.0), 1, "step")
    print(json.dumps(out, indent=1))


def latest_stop_datastore_pieces(ds, rng, lm_tokens: int) -> dict:
    """The re-ranking pieces on ds's keys, and the LM side of eval on the files beside its documents."""
    import knnlm.retrieval as retrieval
    import knnlm.windows as windows
    from common import fresh_rerank_rows

    out = {}
    keys = retrieval.as_tensor(ds.keys)
    cand = np.sort(rng.integers(0, ds.count, (32, 2048)), axis=1)
    q = np.asarray(ds.keys[cand[:, 0]], np.float32)
    split = retrieval.RERANK_ROWS_PER_WORKER

    def one_thread():  # the old rule: 32 queries (< 2 x 32) stayed on the calling thread
        retrieval.RERANK_ROWS_PER_WORKER = 1 << 62
        try:
            retrieval.exact_distances(q, keys, cand)
        finally:
            retrieval.RERANK_ROWS_PER_WORKER = split

    out["rerank_retomaton_step"] = pair("rerank_retomaton_step", lambda: retrieval.exact_distances(q, keys, cand),
                                        one_thread, 1, "step")
    kept = retrieval._rerank_rows

    singles = [(q[i:i + 1], cand[i:i + 1, :1000]) for i in range(len(q))]

    def rerank_singles(rows_fn):
        retrieval._rerank_rows = rows_fn
        try:
            for x, ids in singles:
                retrieval.exact_distances(x, keys, ids)
        finally:
            retrieval._rerank_rows = kept

    out["rerank_one_query"] = pair("rerank_one_query", lambda: rerank_singles(kept),
                                   lambda: rerank_singles(fresh_rerank_rows), len(singles), "query")
    if lm_tokens <= 0:
        return out
    from common import BENCH_DEVICE, BENCH_MODEL
    from eval import eval_docs
    from knnlm.evaluate import score_documents
    from knnlm.lm import load_lm

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    docs = eval_docs(lm, lm_tokens, ds.path)
    n = sum(len(lm.encode(text)) - 1 for _name, text in docs)
    batches = windows.length_batches

    def lm_side(tail: bool):
        lm._projects_a_tail = tail
        if not tail:  # as before: batches by length alone
            windows.length_batches = lambda lengths, size, _offsets=None: batches(lengths, size)
        try:
            score_documents(lm, None, docs, ds.meta["context"], ds.meta["stride"])
        finally:
            lm._projects_a_tail, windows.length_batches = None, batches

    out["lm_side_of_eval"] = pair("lm_side_of_eval", lambda: lm_side(True), lambda: lm_side(False), n, "token")
    if not (ds.path / "lambda.json").exists():
        print(f"{ds.path} has no tuned gate: no mixing piece (bench/eval.py --real tunes one)", file=sys.stderr)
        return out
    from common import old_mixing
    from knnlm.combine import resolve_combiner
    from knnlm.evaluate import report
    from knnlm.retrieval import RetrievalConfig, Retriever

    gate = resolve_combiner("gate", ds.path)
    scores = score_documents(lm, Retriever(ds, RetrievalConfig(rerank_depth=128)), docs, ds.meta["context"],
                             ds.meta["stride"], combiner=gate)
    r, before = report(scores, gate), old_mixing(scores, gate)
    if abs(r["knn_lm_ppl"] / before[1] - 1) > 1e-9 or r["lm_ppl"] != before[0]:
        sys.exit(f"the mixing's perplexities differ: {r['lm_ppl']}, {r['knn_lm_ppl']} against {before}")
    out["mixing"] = pair("mixing", lambda: report(scores, gate), lambda: old_mixing(scores, gate), len(scores), "token")
    return out


if __name__ == "__main__":
    main()
