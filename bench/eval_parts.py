"""The pieces around the search that issue 10's stop made cheaper, each timed against what it replaced.

    python bench/eval_parts.py [--datastore bench/results/real-1m-IVF2048-PQ64x4fs] [--rows 1024]

One process, the same inputs for both sides, the median of 3 runs each (2 threads on the development
machine); ratios are the steadier figures. Logits are random at SmolLM2's vocabulary (49,152): the
cost does not depend on their values.

- eval's log-softmax and LM statistics per row: LOGP_ROWS rows at a time with lm_stats(owned=True)
  (numpy's argmax and max) against a window's 256 rows at once with torch.topk (the code replaced);
  and the log-softmax alone, LOGP_ROWS rows at a time against 256;
- sorting re-ranked neighbours: arrays.row_order against np.argsort(kind="stable"), (rows, 1000);
- an IVF index's lists: the Retriever's search with retrieval.CoarseAssigner against faiss's own
  (parallel mode 0, its default), k 1000 without re-ranking, on --datastore (skipped if absent);
- a decoding step: log-softmax of (1, V) in float32 against float64, and mix_log_distribution of
  1000 neighbours with a float32 against a float64 p_LM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import median_seconds  # noqa: E402

HERE = Path(__file__).parent
VOCAB = 49_152


def per(seconds: float, n: int) -> float:
    """Microseconds per item."""
    return round(1e6 * seconds / n, 2)


def pair(name: str, new, old, n: int, unit: str) -> dict:
    """Both sides' µs per unit and old ÷ new."""
    a, b = median_seconds(new), median_seconds(old)
    row = {f"new_us_per_{unit}": per(a, n), f"old_us_per_{unit}": per(b, n), "speed-up": round(b / a, 2)}
    print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m-IVF2048-PQ64x4fs"))
    ap.add_argument("--rows", type=int, default=1024, help="logit rows, neighbour rows and queries")
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
    else:
        print(f"{path} is absent: no coarse timing (bench/eval.py --real builds it)", file=sys.stderr)

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


if __name__ == "__main__":
    main()
