"""Test helpers: synthetic datastores without a model."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import numpy as np

from knnlm.arrays import write_json
from knnlm.datastore import FORMAT_VERSION, KEY_SOURCE


def build_corpus_store(root: Path, corpus_texts: dict, model_dir: Path, lm, context: int = 64, stride: int = 32):
    """The corpus files (root/corpus/NAME.txt) built with the tiny model into root/ds, a fifth held out for each of dev and test."""
    from knnlm.build import BuildConfig, build_datastore

    (root / "corpus").mkdir()
    for name, text in corpus_texts.items():
        (root / "corpus" / f"{name}.txt").write_text(text)
    cfg = BuildConfig(model=str(model_dir), context=context, stride=stride, holdout=0.2, glob="*.txt")
    return build_datastore(str(root / "corpus"), root / "ds", cfg, lm=lm)


def make_datastore(path: Path, keys: np.ndarray, vals: np.ndarray, model_fp: str = "m", tok_fp: str = "t") -> Path:
    """A datastore directory holding the given keys and values, with a meta.json that describes them."""
    path.mkdir(parents=True)
    np.save(path / "keys.npy", keys.astype(np.float16))
    np.save(path / "vals.npy", vals.astype(np.int32))
    write_json(path / "meta.json", {
        "format": FORMAT_VERSION, "model": {"name": "synthetic", "fingerprint": model_fp, "vocab_size": 100},
        "tokenizer": {"fingerprint": tok_fp}, "key_source": KEY_SOURCE, "dim": keys.shape[1],
        "dtype": {"keys": "float16", "vals": "int32"}, "count": len(keys), "context": 512, "stride": 256,
        "holdout": {"share": 0, "dev_documents": 0, "test_documents": 0}, "corpus": {"source": "synthetic",
        "files": []}, "documents": [["synthetic", 0, len(keys), 0]],
        "build": {"finished": "now", "seconds": 0, "tokens_per_s": None, "device": "cpu"}})
    return path


def clustered(n: int, d: int, seed: int = 0, centers: int = 50) -> np.ndarray:
    """n points of width d around a few Gaussian centres (like real hidden states, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 4, size=(centers, d))
    return (c[rng.integers(0, centers, n)] + rng.normal(0, 1, size=(n, d))).astype(np.float32)


def read_json(path) -> dict:
    """A JSON file."""
    return json.loads(Path(path).read_text())


@contextmanager
def without_polysemous_training():
    """train_index without faiss's polysemous training of IVF-PQ codes (on by default; it only reorders PQ
    centroids for Hamming filtering, which knnlm never uses, and costs ~50 s for 8 sub-quantizers on 2 cores)."""
    import faiss

    make = faiss.index_factory

    def factory(*args):
        index = make(*args)
        if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ):
            faiss.downcast_index(index).do_polysemous_training = False
        return index

    with patch.object(faiss, "index_factory", factory):
        yield
