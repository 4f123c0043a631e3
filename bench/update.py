"""What following a corpus costs: add, remove and compact against retraining the index, and reading
Parquet or a datasets folder against a folder of text files (ratios in one run).

    python bench/update.py [--keys 200000] [--dim 576] [--docs 100] [--changed 10] [--polysemous]

Retraining, the baseline, runs without faiss's polysemous training (on by default in IVF-PQ, it
only reorders PQ centroids for Hamming filtering, which knnlm does not use, and dominates training
time); --polysemous also times train_index as it is.

Keys are clustered synthetic ones (see tests/helpers.clustered) in `--docs` equal documents; `--changed`
documents are removed, the same number added (their keys already computed: the LM pass of `add` costs
what a build costs per token), then the arrays compacted. Results go to bench/results/update.json;
the datastore is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared machine: one thread for every timed step

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.common import stdlib_texts  # noqa: E402
from helpers import clustered, make_datastore, read_json, without_polysemous_training  # noqa: E402
from knnlm.arrays import write_json  # noqa: E402
from knnlm.corpus import iter_documents, open_corpus  # noqa: E402
from knnlm.datastore import open_datastore  # noqa: E402
from knnlm.index import IndexConfig, train_index  # noqa: E402
from knnlm.retrieval import RetrievalConfig, Retriever  # noqa: E402
from knnlm.update import apply_add, compact, remove_documents  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    """Seconds fn() takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def datastore(path: Path, n: int, d: int, docs: int, seed: int) -> Path:
    """A synthetic datastore of n keys in `docs` equal documents."""
    keys = clustered(n, d, seed=seed, centers=200)
    make_datastore(path, keys, np.random.default_rng(seed).integers(0, 1000, n))
    meta = read_json(path / "meta.json")
    per = n // docs
    meta["documents"] = [[f"doc{seed}-{i}", i * per, per if i < docs - 1 else n - i * per, 0] for i in range(docs)]
    write_json(path / "meta.json", meta)
    return path


def read_rate(corpus: str, **kw) -> float:
    """Documents per second listing and reading a corpus."""
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_documents(open_corpus(corpus, **kw), 0.0))
    return n / (time.perf_counter() - t0)


def bench_corpora(work: Path, files: int, copies: int) -> dict:
    """Reading the same stdlib text as a folder, a Parquet file and a datasets folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t for _, t in stdlib_texts(files)] * copies
    folder = work / "txt"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"{i:05d}.txt").write_text(t)
    pq.write_table(pa.table({"text": texts}), work / "c.parquet", row_group_size=4096)
    out = {"documents": len(texts), "folder_docs_per_s": read_rate(str(folder)),
           "parquet_docs_per_s": read_rate(str(work / "c.parquet"))}
    try:
        import datasets

        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(work / "hf"))
        out["hf_docs_per_s"] = read_rate(str(work / "hf"))
    except ImportError:
        out["hf_docs_per_s"] = None
    for k in ("parquet", "hf"):
        if out[f"{k}_docs_per_s"]:
            out[f"{k}_vs_folder"] = out[f"{k}_docs_per_s"] / out["folder_docs_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--changed", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--code-size", type=int, default=32)
    ap.add_argument("--files", type=int, default=300, help="stdlib files for the corpus-reading figures")
    ap.add_argument("--copies", type=int, default=20, help="times those files are repeated")
    ap.add_argument("--polysemous", action="store_true",
                    help="also time train_index as it is (faiss's polysemous training on: minutes)")
    a = ap.parse_args()
    work = RESULTS / "update-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        path = datastore(work / "ds", a.keys, a.dim, a.docs, seed=0)
        per = a.keys // a.docs
        extra = datastore(work / "extra", per * a.changed, a.dim, a.changed, seed=1)
        ds = open_datastore(path)
        cfg = IndexConfig(nlist=a.nlist, code_size=a.code_size)
        r = {"keys": a.keys, "dim": a.dim, "documents": a.docs, "changed_documents": a.changed,
             "changed_keys": per * a.changed, "index": f"IVF{a.nlist},PQ{a.code_size}"}
        if a.polysemous:
            r["train_index_polysemous_s"] = timed(lambda: train_index(ds, cfg))
        with without_polysemous_training():  # the fair baseline: that training buys knnlm nothing
            r["train_index_s"] = timed(lambda: train_index(ds, cfg))
        names = [d[0] for d in ds.documents[:: a.docs // a.changed][: a.changed]]
        r["remove_s"] = timed(lambda: remove_documents(path, names))
        r["add_s"] = timed(lambda: apply_add(open_datastore(path), open_datastore(extra)))
        r["compact_s"] = timed(lambda: compact(path))
        for k in ("remove", "add", "compact"):
            r[f"{k}_vs_train"] = r[f"{k}_s"] / r["train_index_s"]
        ds = open_datastore(path)
        q = np.asarray(ds.keys[:: max(1, ds.count // 200)], dtype=np.float32)
        ids = Retriever(ds, RetrievalConfig(k=1, nprobe=16)).search(q)[1]
        r["self_recall_at_1_after"] = float((ids[:, 0] == np.arange(0, ds.count, max(1, ds.count // 200))).mean())
        r["corpora"] = bench_corpora(work, a.files, a.copies)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "update.json").write_text(json.dumps(r, indent=1))
        print(json.dumps(r, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
