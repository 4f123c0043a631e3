"""Attention memory on long documents: how much of the window → full-context gap it recovers, and its cost.

Each document is a whole stdlib package (bench/common.py long_documents) cut to --tokens tokens, read
by SmolLM2 in windows of W = --context tokens advancing by --stride. Perplexity is over the tokens past
the first window (every one of them has lost some context to the window), for: the window alone; the
window with attention memory (exact or fixed positions, several layer choices, k, per head or per KV
group); and full context (one pass over the whole document, the upper bound). Cost per token is the
CPU time of a run over the window-only run's, in the same one-thread process (wall time is kept too).

    OMP_NUM_THREADS=1 python bench/attention_memory.py --tokens 8192 --packages json,logging

Results (merged into, so runs can be split and resumed): bench/results/attention_memory.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LONG_DOC_PACKAGES, long_documents  # noqa: E402
from knnlm.arrays import write_json  # noqa: E402
from knnlm.lm import load_lm  # noqa: E402
from knnlm.memory.attention import AttentionMemoryConfig  # noqa: E402
from knnlm.memory.reading import forward_in_order  # noqa: E402
from knnlm.windows import forward_owned, plan_windows  # noqa: E402

log = logging.getLogger("bench.attention_memory")
OUT = Path(__file__).resolve().parent / "results" / "attention_memory.json"

# (name, config) of the runs: the default settings first, so an interrupted run still has them.
CORE = [
    ("exact all k64 group", AttentionMemoryConfig("all", 64, "exact", "group")),
    ("fixed all k64 group", AttentionMemoryConfig("all", 64, "fixed", "group")),
]
ABLATIONS = [
    CORE[0],
    CORE[1],
    ("exact all k64 head", AttentionMemoryConfig("all", 64, "exact", "head")),
    ("exact top-half k64 group", AttentionMemoryConfig("top-half", 64, "exact", "group")),
    ("exact all k16 group", AttentionMemoryConfig("all", 16, "exact", "group")),
]


def target_logp(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """log p(target) per row of hidden (n, d), projecting chunk rows at a time (full logits are n·V floats)."""
    out = []
    for lo in range(0, len(hidden), chunk):
        logp = torch.log_softmax(head(hidden[lo: lo + chunk]).float(), dim=-1)  # (chunk, V)
        out.append(logp.gather(1, targets[lo: lo + chunk, None].to(logp.device))[:, 0])
    return torch.cat(out).double().cpu().numpy()


def score_windows(lm, ids: list[int], context: int, stride: int, cfg) -> np.ndarray:
    """log p of each token past the first window, read in windows (with attention memory cfg, or none)."""
    work = [(w, ids[w.begin: w.end]) for w in plan_windows(0, len(ids), context, stride)]
    batches = forward_owned(lm, work, 1, logits=True) if cfg is None else forward_in_order(lm, work, cfg, context)
    parts = {}
    for batch in batches:
        for o in batch:
            if o.window.index == 0:
                continue
            tgt = torch.tensor(ids[o.window.own_from + 1: o.window.own_to + 1])
            logp = torch.log_softmax(o.logits.float(), dim=-1)  # (n, V)
            parts[o.window.index] = logp.gather(1, tgt[:, None].to(logp.device))[:, 0].double().cpu().numpy()
    return np.concatenate([parts[i] for i in sorted(parts)])


def score_full(lm, ids: list[int], context: int) -> np.ndarray:
    """log p of each token past the first window with the whole document as context (one pass)."""
    batch = torch.tensor([ids])
    hidden, _ = lm.forward(batch, torch.ones_like(batch), logits=False)  # (1, T, d)
    with torch.inference_mode():
        return target_logp(lm.model.get_output_embeddings(), hidden[0, context: len(ids) - 1],
                           torch.tensor(ids[context + 1:]))


def ppl(logp: np.ndarray) -> float:
    """Perplexity of log-probabilities."""
    return float(math.exp(-logp.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per document (package)")
    ap.add_argument("--packages", default=",".join(LONG_DOC_PACKAGES))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128)
    ap.add_argument("--runs", default="core", help="default (the default settings), core, ablations or all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device of the model")
    ap.add_argument("--out", default=str(OUT), help="results (JSON), updated run by run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    lm = load_lm(device=args.device)
    runs = {"default": CORE[:1], "core": CORE, "ablations": ABLATIONS, "all": ABLATIONS}[args.runs]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    setting = f"context {args.context}, stride {args.stride}, {args.tokens} tokens"
    docs = long_documents(lm, args.tokens, tuple(args.packages.split(",")))
    for pkg, ids in docs:
        key = f"{pkg} | {setting}"
        entry = results.setdefault(key, {"package": pkg, "tokens": len(ids), "context": args.context,
                                         "stride": args.stride, "model": lm.name, "runs": {}})
        todo = [("window", None), ("full", "full")] + runs
        for name, cfg in todo:
            if name in entry["runs"]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            logp = score_full(lm, ids, args.context) if cfg == "full" else \
                score_windows(lm, ids, args.context, args.stride, cfg)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            entry["runs"][name] = {"ppl": ppl(logp), "scored": len(logp), "seconds": seconds, "cpu_seconds": cpu,
                                   "settings": None if cfg in (None, "full") else cfg.describe}
            summarise(entry)
            write_json(out, results)
            log.info("%s %s: ppl %.4f, %.1f s", pkg, name, entry["runs"][name]["ppl"], seconds)


def summarise(entry: dict) -> None:
    """Share of the window → full gap each run recovers, and its time over window-only's: CPU seconds of
    this one-thread process where recorded (the machine is shared; wall time follows its load), else wall."""
    runs = entry["runs"]
    if "window" not in runs:
        return
    base = runs["window"]
    for r in runs.values():
        clock = "cpu_seconds" if "cpu_seconds" in r and "cpu_seconds" in base else "seconds"
        r["cost_vs_window"], r["cost_clock"] = r[clock] / base[clock], clock
        if "full" in runs:
            gap = base["ppl"] - runs["full"]["ppl"]
            r["gap_recovered"] = (base["ppl"] - r["ppl"]) / gap if gap else None


if __name__ == "__main__":
    main()
