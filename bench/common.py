"""Shared pieces of the benchmarks: real text, synthetic datastores, peak memory."""

from __future__ import annotations

import os
import random
import resource
import sysconfig
import threading
from pathlib import Path

import numpy as np

from knnlm.arrays import write_json
from knnlm.datastore import FORMAT_VERSION, KEY_SOURCE

# The model and device of the speed benchmarks. A GPU machine without the bundled GGUF can time a model of
# SmolLM2's shape with random weights (the cost does not depend on the weights' values).
BENCH_MODEL = os.environ.get("KNNLM_BENCH_MODEL", "smollm2-135m")
BENCH_DEVICE = os.environ.get("KNNLM_BENCH_DEVICE", "cpu")


def stdlib_texts(n_files: int, seed: int = 0) -> list[tuple[str, str]]:
    """(name, text) of n_files Python files of the standard library, picked with a seed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 2_000 < p.stat().st_size < 60_000)
    random.Random(seed).shuffle(files)
    return [(str(p), p.read_text(errors="replace")) for p in files[:n_files]]


def synthetic_datastore(path: Path, lm, n: int, seed: int = 0, chunk: int = 100_000) -> Path:
    """A datastore of n random keys (float16, written in chunks) that passes the compatibility check for lm."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = np.lib.format.open_memmap(path / "keys.npy", mode="w+", dtype=np.float16, shape=(n, lm.dim))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        keys[lo:hi] = rng.normal(0, 1, size=(hi - lo, lm.dim)).astype(np.float16)
    keys.flush()
    del keys
    np.save(path / "vals.npy", rng.integers(0, lm.vocab_size, n).astype(np.int32))
    write_json(path / "meta.json", {
        "format": FORMAT_VERSION, "model": {"name": lm.name, "fingerprint": lm.fingerprint,
                                            "vocab_size": lm.vocab_size},
        "tokenizer": {"fingerprint": lm.tokenizer_fingerprint}, "key_source": KEY_SOURCE, "dim": lm.dim,
        "dtype": {"keys": "float16", "vals": "int32"}, "count": n, "context": 512, "stride": 256,
        "holdout": {"share": 0, "dev_documents": 0, "test_documents": 0},
        "corpus": {"source": "synthetic", "files": []}, "documents": [["synthetic", 0, n, 0]],
        "build": {"finished": f"synthetic-{n}-{seed}", "seconds": 0, "tokens_per_s": None, "device": "cpu"}})
    return path


def cached_synthetic(path: Path, lm, n: int) -> Path:
    """The synthetic datastore of n keys at path, with its default index; made (and kept) if missing."""
    from knnlm.datastore import open_datastore
    from knnlm.index import train_index

    if not (path / "index.faiss").exists():
        synthetic_datastore(path, lm, n)
        train_index(open_datastore(path))
    return path


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemorySampler:
    """Peak anonymous (private) and file-backed resident memory of this process, sampled every 20 ms.

    ru_maxrss counts the pages of memory-mapped keys.npy that a search touched; those are clean
    page-cache pages the kernel can drop at any time, so private memory is reported apart.
    """

    def __init__(self, interval: float = 0.02):
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(rest.split()[0]) / 1024)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def code_bench_inputs(datastore: str, split: str, threads: int):
    """(datastore, cached exact scores of a split, its tuned fixed λ as a Combiner) for benchmarks that
    replay the code benchmark's queries (bench/quality.py makes the cache) on `threads` threads."""
    import json

    import faiss
    import torch

    from knnlm.combine import FixedLambda
    from knnlm.datastore import open_datastore
    from knnlm.scores import load_scores

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    lam = json.loads((Path(datastore) / "lambda.json").read_text())
    return (open_datastore(datastore), load_scores(f"{datastore}-{split}-exact.h5"),
            FixedLambda(float(lam["lambda"]), float(lam["temperature"]), "tuned"))


# A speed variant is "knn" (none) or some of these joined by "+"; "torch" is exact search in torch on
# KNNLM_BENCH_SEARCH_DEVICE (default: the LM's device), --search-device; "rerank-R" re-ranks the first R
# candidates only (--rerank-depth R); "nprobe-N" visits N lists (default 8); "k-N" takes N neighbours, not 1000
# (another model: its perplexity against the exact search at k 1000 says how far); "candidates-N" ranks N of
# RetoMaton's candidates (--max-candidates N, with retomaton).
FEATURES = ("skip", "retomaton", "no-rerank", "torch")
NUMBERED = ("rerank-", "nprobe-", "k-", "candidates-")  # FEATURES with a positive number after them
VARIANTS_HELP = (f"comma-separated: knn, or some of {', '.join(FEATURES)}, rerank-R, nprobe-N, k-N, candidates-N "
                 "joined by '+'")
BENCH_SEARCH_DEVICE = os.environ.get("KNNLM_BENCH_SEARCH_DEVICE", BENCH_DEVICE)


def _number(on: set[str], prefix: str) -> list[int]:
    """The numbers of the variant parts that start with prefix (e.g. 128 of "rerank-128")."""
    return [int(p[len(prefix):]) for p in on if p.startswith(prefix) and p[len(prefix):].isdigit()]


def variant_retrieval(on: set[str]):
    """The RetrievalConfig of a speed variant's features (defaults otherwise: k 1000, nprobe 8)."""
    from knnlm.retrieval import RetrievalConfig

    depth, nprobe, k, cands = (_number(on, p) for p in NUMBERED)
    more = {"max_candidates": cands[0]} if cands else {}
    return RetrievalConfig(k=k[0] if k else 1000, retomaton="retomaton" in on, rerank="no-rerank" not in on, **more,
                           rerank_depth=depth[0] if depth else None, nprobe=nprobe[0] if nprobe else 8,
                           search_device=BENCH_SEARCH_DEVICE if "torch" in on else None)


def parse_variant(name: str) -> set[str]:
    """The speed features a variant name turns on; an unknown one ends the benchmark with one sentence."""
    import sys

    parts = set() if name == "knn" else set(name.split("+"))
    if not all(p in FEATURES or any(n > 0 for prefix in NUMBERED for n in _number({p}, prefix)) for p in parts):
        sys.exit(f"Unknown variant {name!r}: {VARIANTS_HELP}.")
    if any(len(_number(parts, prefix)) > 1 for prefix in NUMBERED):
        sys.exit(f"Variant {name!r}: one rerank-R, one nprobe-N, one k-N and one candidates-N at most.")
    if _number(parts, "candidates-") and "retomaton" not in parts:
        sys.exit(f"Variant {name!r}: candidates-N is RetoMaton's (--max-candidates); add retomaton.")
    if _number(parts, "rerank-") and {"no-rerank", "torch"} & parts:
        sys.exit(f"Variant {name!r}: rerank-R not with no-rerank or torch.")
    if "torch" in parts and ("no-rerank" in parts or _number(parts, "nprobe-")):  # its search is exact: no lists
        sys.exit(f"Variant {name!r}: torch searches every key exactly, so no-rerank and nprobe-N do nothing there.")
    return parts


def median_seconds(fn, runs: int = 3) -> float:
    """Median wall time of fn() over runs, after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def threads() -> int:
    """CPU threads torch and faiss may use."""
    return os.cpu_count() or 1


LONG_DOC_PACKAGES = ("json", "logging", "http", "importlib")  # stdlib packages, each one long document


def long_documents(lm, max_tokens: int = 8192, packages=LONG_DOC_PACKAGES) -> list[tuple[str, list[int]]]:
    """(package, token ids) per package: its .py files in sorted order concatenated (headed by their
    relative paths), cut to max_tokens (the model's positions bound full-context attention)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for pkg in packages:
        parts = [f"# file: {p.relative_to(root)}\n{p.read_text(errors='replace')}"
                 for p in sorted((root / pkg).rglob("*.py"))]
        ids = lm.encode("\n".join(parts))[:max_tokens]
        docs.append((pkg, list(map(int, ids))))
    return docs


def fresh_rerank_rows(q, keys, rows_ids, out) -> None:
    """retrieval._rerank_rows as it was before its buffers were kept per thread (a new float32 block for each
    query's rows): the "old" side of bench/decode_parts.py's and bench/eval_parts.py's re-ranking pieces."""
    import faiss
    import torch

    k, d = rows_ids.shape[1], keys.shape[1]
    gathered = torch.empty((k, d), dtype=keys.dtype)
    for i in range(len(q)):
        torch.index_select(keys, 0, rows_ids[i], out=gathered)
        rows = gathered.float().numpy()
        faiss.fvec_L2sqr_ny(faiss.swig_ptr(out[i]), faiss.swig_ptr(q[i]), faiss.swig_ptr(rows), d, k)


def old_mixing(scores, combiner) -> tuple[float, float]:
    """(LM, kNN-LM) perplexities by evaluate.report's mixing as it was before the mixing's rewrite, for a learned
    gate: p_kNN(target) by a log-sum-exp over full-size float64 arrays, computed twice; the gate's token
    statistics by a bincount over (n·k) slots after a 64-bit row sort; all rows at once. The "old" side of
    bench/eval_parts.py's mixing piece."""
    import knnlm.combine.features as features
    from knnlm.interpolate import _knn_log_prob_lse, interpolate, perplexity

    s, t = scores, combiner.temperature
    _knn_log_prob_lse(s.dists, s.vals, s.targets, t)  # the kNN-only perplexity's
    kept = features.knn_value_stats
    features.knn_value_stats = _old_knn_value_stats
    try:
        feats = features._post_block(s.queries, s.lm_stats(), s.dists, s.vals, t)
    finally:
        features.knn_value_stats = kept
    lam = combiner.gate.lambdas(feats, s.queries)
    lam = lam if s.searched is None else np.where(s.searched, lam, 0.0)
    mixed = interpolate(s.lm_logp, _knn_log_prob_lse(s.dists, s.vals, s.targets, t), lam)
    return perplexity(s.lm_logp), perplexity(mixed)


def _old_knn_value_stats(dists, vals, temperature):
    """features.knn_value_stats before the rewrite (the same numbers, by a dense (n, k) mass matrix)."""
    from knnlm.interpolate import masked_distances, neighbor_log_weights

    vals = np.asarray(vals)
    n, k = vals.shape
    w = np.exp(neighbor_log_weights(masked_distances(dists, vals), temperature))
    key = (vals.view(np.uint32) ^ np.uint32(0x80000000)).astype(np.uint64) << np.uint64(32)
    packed = key | np.arange(k, dtype=np.uint64)  # the old row_order: 64-bit keys for int32 too
    packed.sort(axis=1)
    order = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
    sv, sw = np.take_along_axis(vals, order, axis=1), np.take_along_axis(w, order, axis=1)
    valid = sv >= 0
    start = valid.copy()
    start[:, 1:] &= sv[:, 1:] != sv[:, :-1]
    seg = np.cumsum(start, axis=1) - 1
    flat = (np.arange(n)[:, None] * k + seg)[valid]
    mass = np.bincount(flat, weights=sw[valid], minlength=n * k).reshape(n, k)
    seg_val = np.full((n, k), -1, dtype=np.int64)
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))
    seg_val[rows[start], seg[start]] = sv[start]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(mass > 0, mass * np.log(mass), 0.0), axis=1)
    entropy = np.where(valid.any(axis=1), entropy, np.inf)
    best = np.argmax(mass, axis=1)
    return {"knn_entropy": entropy, "knn_argmax": seg_val[np.arange(n), best].astype(np.int32),
            "distinct": start.sum(axis=1).astype(np.int32)}
