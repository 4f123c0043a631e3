"""Levers tried on a default-index decoding step, and rejected: each one against the code as it is, in place.

    python bench/decode_levers.py [--datastore bench/results/real-1m] [--lever split-rerank] [--rounds 4]
    python bench/decode_levers.py --scan [--datastore bench/results/real-1m]

Greedy decoding of bench/generate.py's prompt, 64 tokens a round, the lever on and off alternating round by
round (ABBA) in one process; the continuations must be the same token for token. Reported per step: the whole
step (LM and kNN), the processor call, and the search (Retriever.search). The levers (none is in knnlm; each
is patched in here, for this measurement only):
- split-rerank: one query's re-ranking split over two threads (the pool takes the second half of its rows);
- touch-rows: one element of each candidate row read first (independent loads), then the gather;
- range-search: faiss's range_search_preassigned over every scanned code and a numpy top-k (ties by id),
  instead of faiss's k-heap (its ties by arrival and id cannot be reproduced: a real change would differ there);
- overlap-head: the step's search started from the lm_head pre-hook in a thread, to overlap the projection.
--scan times faiss's 8-bit scan of one query alone (its lists found as knnlm finds them), warm and after
reading 400 MB, at k 10 and k 1000, and counts the codes its lists hold.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import BENCH_DEVICE, BENCH_MODEL, stdlib_texts  # noqa: E402
from decode_parts import timed  # noqa: E402

HERE = Path(__file__).parent
LEVERS = ("split-rerank", "touch-rows", "range-search", "overlap-head")


def lever_patch(name: str, retriever):
    """(on, off): functions that patch the lever in and take it out again."""
    import numpy as np
    import torch

    import knnlm.retrieval as retrieval
    from knnlm.generate import KNNLogitsProcessor

    if name in ("split-rerank", "touch-rows"):
        plain = retrieval.exact_distances
        keys_np = np.asarray(retriever.ds.keys)

        def split(queries, keys, ids):
            if len(queries) != 1:
                return plain(queries, keys, ids)
            q = np.ascontiguousarray(queries, dtype=np.float32)
            out = np.empty(ids.shape, dtype=np.float32)
            rows = torch.from_numpy(np.maximum(ids, 0).astype(np.int64))
            half = ids.shape[1] // 2
            job = retrieval._rerank_pool(torch.get_num_threads()).submit(
                retrieval._rerank_rows, q, keys, rows[:, half:], out[:, half:])
            retrieval._rerank_rows(q, keys, rows[:, :half], out[:, :half])
            job.result()
            out[ids < 0] = np.inf
            return out

        def touch(queries, keys, ids):
            if len(queries) == 1:
                keys_np[np.maximum(ids[0], 0), 0].sum()
            return plain(queries, keys, ids)

        patched = split if name == "split-rerank" else touch
        return (lambda: setattr(retrieval, "exact_distances", patched),
                lambda: setattr(retrieval, "exact_distances", plain))
    if name == "range-search":
        cls = type(retriever.index)
        heap = cls.search_preassigned

        def ranged(self, q, k, lists, coarse):
            if len(q) != 1:
                return heap(self, q, k, lists, coarse)
            self.parallel_mode = 0  # faiss's range search refuses mode 3
            try:
                _, d, i = self.range_search_preassigned(q, 3.0e38, lists, coarse)
            finally:
                self.parallel_mode = 3
            if len(d) > k:  # those at or under the k-th distance, then in order
                near = np.flatnonzero(d <= np.partition(d, k - 1)[k - 1])
                d, i = d[near], i[near]
            o = np.lexsort((i, d))[:k]
            d = np.concatenate([d[o], np.full(k - len(o), np.inf, np.float32)])
            i = np.concatenate([i[o], np.full(k - len(o), -1, np.int64)])
            return d[None], i[None]

        return lambda: setattr(cls, "search_preassigned", ranged), lambda: setattr(cls, "search_preassigned", heap)
    if name == "overlap-head":
        capture, neighbors = KNNLogitsProcessor._capture, retrieval.Retriever.neighbors
        pool, pending = ThreadPoolExecutor(1), {}

        def early(self, module, args):
            capture(self, module, args)
            if self._query is not None and self._query.shape[0] == 1:
                q = self._query.float().cpu().numpy()
                pending["job"] = (q, pool.submit(neighbors, self.retriever, q))

        def waiting(self, queries, keep=None):
            job = pending.pop("job", None)
            if job is not None and keep is None and np.array_equal(job[0], queries):
                return job[1].result()
            return neighbors(self, queries, keep)

        def on():
            KNNLogitsProcessor._capture, retrieval.Retriever.neighbors = early, waiting

        def off():
            KNNLogitsProcessor._capture, retrieval.Retriever.neighbors = capture, neighbors
        return on, off
    raise SystemExit(f"--lever {name!r}: one of {', '.join(LEVERS)}.")


def levers(args) -> dict:
    import knnlm.retrieval as retrieval
    from knnlm.datastore import open_datastore
    from knnlm.generate import KNNLogitsProcessor, generate
    from knnlm.lm import load_lm

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    _, text = stdlib_texts(1, seed=2)[0]
    prompt = lm.decode(lm.encode(text)[:200])
    r = retrieval.Retriever(open_datastore(Path(args.datastore)))
    on, off = lever_patch(args.lever, r)
    on()
    with_lever = generate(lm, prompt, r, lam=0.25, max_new_tokens=64).tokens
    off()
    if with_lever != generate(lm, prompt, r, lam=0.25, max_new_tokens=64).tokens:
        raise SystemExit(f"{args.lever} changed the continuation: not comparable.")
    totals = {side: collections.Counter() for side in ("on", "off")}
    steps = collections.Counter()
    for i in range(2 * args.rounds):
        side = ("on", "off", "off", "on")[i % 4]
        (on if side == "on" else off)()
        undo = [(owner, name, timed(owner, name, totals[side], key))
                for owner, name, key in ((retrieval.Retriever, "search", "search"),
                                         (KNNLogitsProcessor, "__call__", "call"))]
        t0 = time.perf_counter()
        steps[side] += len(generate(lm, prompt, r, lam=0.25, max_new_tokens=64).tokens)
        totals[side]["step"] += time.perf_counter() - t0
        for owner, name, original in undo:
            setattr(owner, name, original)
        off()
    return {"lever": args.lever, "datastore": args.datastore, "steps_a_side": steps["on"],
            **{piece: {side: round(1e6 * totals[side][piece] / steps[side], 1) for side in ("on", "off")}
               for piece in ("step", "call", "search")}, "unit": "µs a step"}


def scan(args) -> dict:
    import numpy as np

    from knnlm.datastore import open_datastore
    from knnlm.retrieval import Retriever

    r = Retriever(open_datastore(Path(args.datastore)))
    index, coarse = r.index, r._coarse
    if coarse is None:
        raise SystemExit(f"{args.datastore}'s index is not an IVF index over a flat quantizer.")
    ds, rng = r.ds, np.random.default_rng(0)
    q = np.asarray(ds.keys[rng.integers(0, ds.count, 64)], dtype=np.float32)
    q += rng.normal(0, 0.05, q.shape).astype(np.float32) * np.abs(q).mean()  # near stored keys, as queries are
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    junk = np.ones(400_000_000 // 8)  # read between searches: caches as cold as after a forward pass, or colder
    out = {"datastore": args.datastore, "nprobe": int(index.nprobe)}
    codes = []
    for k in (10, 1000):
        for cold in (False, True):
            ts = []
            for x in q:
                d, lists = coarse.few(x[None], index.nprobe)
                codes.append(int(sizes[lists[0]].sum()))
                if cold:
                    junk.sum()
                t0 = time.perf_counter()
                index.search_preassigned(x[None], k, lists, d)
                ts.append(time.perf_counter() - t0)
            out[f"k{k}_{'cold' if cold else 'warm'}_us"] = round(1e6 * float(np.median(ts)), 1)
    out["codes_scanned_median"] = int(np.median(codes))
    out["list_size_mean"], out["list_size_max"] = round(float(sizes.mean()), 1), int(sizes.max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datastore", default=str(HERE / "results" / "real-1m"))
    ap.add_argument("--lever", default="split-rerank", choices=LEVERS)
    ap.add_argument("--rounds", type=int, default=4, help="rounds a side (64 tokens each)")
    ap.add_argument("--scan", action="store_true", help="time faiss's scan of one query instead")
    args = ap.parse_args()
    if not (Path(args.datastore) / "index.faiss").exists():
        sys.exit(f"{args.datastore} has no index: build it first (python bench/eval.py --real).")
    print(json.dumps(scan(args) if args.scan else levers(args), indent=1))


if __name__ == "__main__":
    main()
