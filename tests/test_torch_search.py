"""Exact search in torch (--search-device): numpy brute force, the fp16 scores' scaling, removed keys, eval."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helpers import build_corpus_store, clustered, make_datastore
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.torch_search import TorchExactIndex
from knnlm.update import remove_documents


def _brute_force(q: np.ndarray, keys: np.ndarray, k: int, live: np.ndarray | None = None):
    """(dists, ids) of the k nearest by float64 squared L2 over the float16 keys, as numpy finds them."""
    d = ((q[:, None, :].astype(np.float64) - keys.astype(np.float64)[None]) ** 2).sum(-1)
    if live is not None:
        dead = np.ones(len(keys), bool)
        dead[live] = False
        d[:, dead] = np.inf
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI has no GPU; a GPU machine runs both


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [False, True])
def test_equals_numpy_brute_force_over_chunks_and_batches(half, device):
    """Several key chunks and query batches; keys so long that unscaled fp16 scores would overflow."""
    n, d, k = 3000, 24, 50
    keys = (clustered(n, d, seed=1) * 60).astype(np.float16)  # ‖k‖²/2 ≈ 1e6, far past fp16's 65,504
    q = clustered(300, d, seed=2) * 60
    index = TorchExactIndex(keys, device, half=half, score_bytes=128 * 4 * 700)  # chunks of ~700 keys
    assert float(index.half_norms.max()) > 65504
    dists, ids = index.search(q, k)
    ref_d, ref_i = _brute_force(q, keys, k)
    assert (ids == ref_i).mean() > 0.999  # float32 distances may order a rare near-tie differently
    assert np.allclose(dists, ref_d, rtol=1e-5)
    assert np.all(np.diff(dists, axis=1) >= 0)
    assert ids.dtype == np.int64 and dists.dtype == np.float32


def test_short_keys_and_long_queries_do_not_overflow_fp16():
    """The scale bounds the scaled queries too: keys of norm ~0.01 against queries of norm ~1 would scale
    the queries past fp16's range if only the scores' terms were bounded."""
    keys = (clustered(2000, 24, seed=7) * 0.0003).astype(np.float16)
    q = clustered(50, 24, seed=8)
    dists, ids = TorchExactIndex(keys, "cpu", half=True).search(q, 20)
    ref_d, _ = _brute_force(q, keys, 20)
    # Every key is about ‖q‖² away, so wrong neighbours would have nearly right distances: check that the
    # keys returned are among the 20 nearest (up to float32 rounding of that distance), by their true distance.
    true = ((q[:, None, :].astype(np.float64) - keys.astype(np.float64)[ids]) ** 2).sum(-1)
    assert np.mean(true <= ref_d[:, -1:] * (1 + 1e-6)) > 0.99


def test_non_finite_queries_are_refused():
    index = TorchExactIndex(clustered(100, 8).astype(np.float16), "cpu", half=True)
    with pytest.raises(KNNLMError, match="inf or NaN"):
        index.search(np.full((2, 8), np.inf, np.float32), 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [False, True])
def test_removed_keys_never_returned_and_missing_past_the_live_ones(device, half):
    keys = clustered(500, 16, seed=3).astype(np.float16)
    live = np.arange(0, 500, 4)  # 125 keys may be returned
    q = clustered(20, 16, seed=4)
    dists, ids = TorchExactIndex(keys, device, live=live, half=half).search(q, 200)
    ref_d, ref_i = _brute_force(q, keys, 125, live)
    assert np.array_equal(ids[:, :125], ref_i)
    assert np.allclose(dists[:, :125], ref_d, rtol=1e-5)
    assert np.all(ids[:, 125:] == -1) and np.all(np.isinf(dists[:, 125:]))
    empty_d, empty_i = TorchExactIndex(keys, "cpu").search(q[:0], 5)
    assert empty_d.shape == (0, 5) and empty_i.shape == (0, 5)


def test_retriever_on_search_device_equals_exact_search(tmp_path):
    keys = clustered(2000, 32, seed=5)
    ds = open_datastore(make_datastore(tmp_path / "ds", keys, np.arange(2000) % 100))
    q = clustered(40, 32, seed=6)
    on_device = Retriever(ds, RetrievalConfig(k=64, search_device="cpu"))
    exact = Retriever(ds, RetrievalConfig(k=64, exact=True))
    d1, i1, v1 = on_device.neighbors(q)
    d2, i2, v2 = exact.neighbors(q)
    assert np.array_equal(i1, i2) and np.array_equal(v1, v2)
    assert np.allclose(d1, d2, rtol=1e-5)
    assert on_device.describe["search_device"] == "cpu" and "search_device" not in exact.describe


def test_eval_on_search_device_equals_exact_eval_and_skips_removed_documents(tmp_path, tiny_lm, tiny_model_dir,
                                                                             corpus_texts):
    store = build_corpus_store(tmp_path, corpus_texts, tiny_model_dir, tiny_lm)
    base = dict(lam="0.5", temperature=2.0)
    exact, _ = run_eval(store, cfg=EvalConfig(**base, retrieval=RetrievalConfig(k=32, exact=True)), lm=tiny_lm)
    torch_r, _ = run_eval(store, cfg=EvalConfig(**base, retrieval=RetrievalConfig(k=32, search_device="cpu")),
                          lm=tiny_lm)
    assert torch_r["search_device"] == "cpu"  # the torch search ran (the store's own index is exact too)
    assert torch_r["knn_lm_ppl"] == pytest.approx(exact["knn_lm_ppl"], rel=1e-6)
    assert torch_r["knn_only_ppl"] == pytest.approx(exact["knn_only_ppl"], rel=1e-6)
    assert torch_r["lm_ppl"] == exact["lm_ppl"]

    copy = tmp_path / "removed"
    shutil.copytree(store.path, copy)
    gone = open_datastore(copy).documents[0]
    remove_documents(copy, [gone[0]])
    ds = open_datastore(copy)
    q = np.asarray(ds.keys[gone[1]: gone[1] + 5], dtype=np.float32)  # the removed rows' own keys
    d1, i1, _ = Retriever(ds, RetrievalConfig(k=16, search_device="cpu")).neighbors(q)
    d2, i2, _ = Retriever(ds, RetrievalConfig(k=16, exact=True)).neighbors(q)
    assert not np.isin(i1, np.arange(gone[1], gone[1] + gone[2])).any()
    # Repeated text gives identical keys, so ties may come in either order: the distances must agree,
    # and each returned id must be at its returned distance.
    assert np.allclose(d1, d2, rtol=1e-5, atol=1e-6)
    own = ((np.asarray(ds.keys[i1], np.float64) - q[:, None, :]) ** 2).sum(-1)
    assert np.allclose(d1, own, rtol=1e-5, atol=1e-6)


def test_bad_search_device_is_one_sentence():
    with pytest.raises(KNNLMError, match="is not a torch device"):
        RetrievalConfig(search_device="gpu0")
    with pytest.raises(KNNLMError, match="cuda, cuda:N or cpu, not meta"):
        RetrievalConfig(search_device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(KNNLMError, match="no CUDA device"):
            RetrievalConfig(search_device="cuda")
