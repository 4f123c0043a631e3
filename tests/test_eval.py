"""Evaluation: exact identities, brute-force p_kNN, self-retrieval, re-ranking, refusals, scores cache."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import make_datastore
from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, run_eval, score_documents
from knnlm.interpolate import UNDERFLOW, interpolate, knn_log_prob, perplexity
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.scores import load_scores
import knnlm.windows as windows_module
from knnlm.windows import plan_windows

CTX, STRIDE = 64, 32


@pytest.fixture
def store(tiny_lm, tiny_model_dir, corpus_dir):
    """A datastore of 5 of the 7 corpus files (1 dev, 1 test held out), exact index."""
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.2, glob="*.txt")
    return build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)


def _reference_nll(lm, text, context, stride):
    """Summed NLL and token count from the model's own loss, grouping positions by their window start."""
    ids = lm.encode(text)
    starts = {}
    for p in range(len(ids) - 1):
        b = 0 if p < context else ((p - context) // stride + 1) * stride
        starts.setdefault(b, []).append(p)
    total, count = 0.0, 0
    for b, ps in starts.items():
        x = torch.tensor([ids[b: ps[-1] + 2]])
        labels = x.clone()
        labels[0, : ps[0] - b + 1] = -100  # only the positions this window owns are scored
        with torch.no_grad():
            loss = lm.model(input_ids=x, labels=labels).loss.item()
        total += loss * len(ps)
        count += len(ps)
    return total, count


def test_lambda_zero_is_exactly_the_lm(store, tiny_lm):
    cfg = EvalConfig(lam="0", retrieval=RetrievalConfig(k=16, exact=True))
    r, scores = run_eval(store, cfg=cfg, lm=tiny_lm)
    assert r["knn_lm_ppl"] == r["lm_ppl"]  # bit for bit
    total, count = 0.0, 0
    for _, text in store.heldout("test"):
        t, c = _reference_nll(tiny_lm, text, CTX, STRIDE)
        total, count = total + t, count + c
    assert r["tokens"] == count
    assert r["lm_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lambda_one_is_the_knn_alone(store, tiny_lm):
    # k = every key: each target the datastore holds at all is among the neighbours, so the figure is finite.
    (_, text), = store.heldout("test")[:1]
    ids, stored = tiny_lm.encode(text), set(np.load(store.path / "vals.npy").tolist())
    # Four windows of held-out text whose next tokens all occur in the datastore: a finite kNN-only figure.
    start = next(i for i in range(len(ids)) if set(ids[i + 1: i + 4 * CTX]) <= stored)
    text = tiny_lm.decode(ids[start: start + 4 * CTX])
    ids = tiny_lm.encode(text)
    assert len(ids) > 3 * CTX and set(ids[1:]) <= stored
    temp, n_keys = 5.0, store.count
    r, _ = run_eval(store, cfg=EvalConfig(lam="1", temperature=temp, retrieval=RetrievalConfig(k=n_keys, exact=True)),
                    lm=tiny_lm, documents=[("t", text)])
    # Reference: queries from each position's window (as _reference_nll groups them), p_kNN over all keys.
    keys = np.load(store.path / "keys.npy").astype(np.float64)  # (N, d)
    vals = np.load(store.path / "vals.npy")  # (N,)
    logp = []
    for p in range(len(ids) - 1):
        b = 0 if p < CTX else ((p - CTX) // STRIDE + 1) * STRIDE
        x = torch.tensor([ids[b: p + 1]])
        q = tiny_lm.forward(x, torch.ones_like(x), logits=False)[0][0, -1].double().numpy()  # (d,)
        z = -((keys - q) ** 2).sum(1) / temp  # (N,) log weights, unnormalised
        hit = z[vals == ids[p + 1]]
        logp.append(hit.max() + np.log(np.exp(hit - hit.max()).sum()) - z.max() - np.log(np.exp(z - z.max()).sum()))
    ref = math.exp(-np.mean(logp))
    assert math.isfinite(ref) and r["tokens"] == len(ids) - 1
    assert r["knn_only_ppl"] == pytest.approx(ref, rel=1e-4)
    assert r["knn_lm_ppl"] == pytest.approx(ref, rel=1e-4)
    assert r["knn_lm_ppl"] != pytest.approx(r["lm_ppl"], rel=1e-2)


def test_knn_probability_matches_brute_force(store, tiny_lm):
    (_, text), = store.heldout("test")[:1]
    ids = tiny_lm.encode(text)[:CTX]  # one window: every query is the plain forward's hidden state
    text = tiny_lm.decode(ids)
    ids = tiny_lm.encode(text)
    k, temp = 40, 3.0
    scores = score_documents(tiny_lm, Retriever(store, RetrievalConfig(k=k, exact=True)), [("t", text)], CTX, STRIDE)
    x = torch.tensor([ids])
    q = tiny_lm.forward(x, torch.ones_like(x), logits=False)[0][0, :-1].double().numpy()  # (n, d)
    keys = np.asarray(store.keys, dtype=np.float64)
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)  # (n, N) exact squared L2
    top = np.argsort(d, axis=1)[:, :k]
    dk = np.take_along_axis(d, top, 1)
    w = np.exp(-(dk - dk.min(1, keepdims=True)) / temp)
    w /= w.sum(1, keepdims=True)
    p = (w * (np.asarray(store.vals)[top] == np.array(ids[1:])[:, None])).sum(1)
    with np.errstate(divide="ignore"):
        ref = np.log(p)
    got = knn_log_prob(scores.dists, scores.vals, scores.targets, temp)
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-4, atol=1e-4)


def test_own_text_drives_knn_perplexity_to_one(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.0, glob="bisect*.txt")
    ds = build_datastore(str(corpus_dir), "own", cfg, lm=tiny_lm)
    r, _ = run_eval(ds, corpus=str(corpus_dir / "bisect.py.txt"),
                    cfg=EvalConfig(lam="0.5", temperature=0.01, retrieval=RetrievalConfig(k=8, exact=True)),
                    lm=tiny_lm)
    assert r["tokens"] == ds.count
    assert r["knn_only_ppl"] < 1.01
    assert r["target_in_neighbors"] == 1.0
    # tokens/s counts the LM, the search and the mixing; each part is timed apart
    assert 0 < r["mixing_seconds"] and r["lm_seconds"] + r["retrieval_seconds"] + r["mixing_seconds"] <= r["seconds"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])


@pytest.mark.slow  # builds an IVF-PQ index over the whole corpus
def test_ivfpq_with_rerank_is_close_to_exact(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.15, glob="*.txt")
    ds = build_datastore(str(corpus_dir), "big", cfg, lm=tiny_lm)
    assert (ds.path / "index.json").exists() and "IVF" in open(ds.path / "index.json").read()
    base = dict(lam="0.5", temperature=2.0)
    exact, _ = run_eval(ds, cfg=EvalConfig(**base, retrieval=RetrievalConfig(k=100, exact=True)), lm=tiny_lm)
    approx, _ = run_eval(ds, cfg=EvalConfig(**base, retrieval=RetrievalConfig(k=100, nprobe=32)), lm=tiny_lm)
    assert approx["search"] == "ivfpq" and approx["rerank"]
    assert abs(approx["knn_lm_ppl"] / exact["knn_lm_ppl"] - 1) < 0.01


def test_missing_neighbours_never_count():
    dists = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    vals = np.array([[-1, 5, 6], [5, 6, -1]])
    got = knn_log_prob(dists, vals, np.array([5, 5]), 1.0)
    # Row 0: the missing neighbour at distance 0 carries no weight: p(5) = e^-1 / (e^-1 + e^-2).
    assert got[0] == pytest.approx(np.log(np.exp(-1) / (np.exp(-1) + np.exp(-2))))
    assert got[1] == pytest.approx(np.log(1 / (1 + np.exp(-1))))
    assert knn_log_prob(np.full((1, 2), np.inf), np.full((1, 2), -1), np.array([3]), 1.0)[0] == -np.inf


def test_knn_log_prob_stays_finite_where_the_targets_weights_underflow():
    # The target's only neighbour is 2000·T beyond the nearest: exp underflows, the log-sum-exp does not.
    got = knn_log_prob(np.array([[0.0, 2000.0, 1.0]]), np.array([[1, 7, 2]]), np.array([7]), 1.0)[0]
    assert got == pytest.approx(-2000.0 - np.log(1 + np.exp(-1.0)), rel=1e-12)
    rng = np.random.default_rng(3)
    dists = np.sort(rng.uniform(0, 3000, (300, 20)), axis=1)
    vals = rng.integers(0, 5, (300, 20))
    vals[rng.random((300, 20)) < 0.2] = -1
    vals[:7] = -1  # rows without any neighbour
    dists[vals < 0] = np.inf
    targets = rng.integers(0, 5, 300)
    got = knn_log_prob(dists, vals, targets, 2.0)
    logw = -dists / 2.0  # a dense reference: log Σ over the target's neighbours of softmax(-d/T), all in logs
    with np.errstate(invalid="ignore"):
        lse = np.logaddexp.reduce(np.where(vals >= 0, logw, -np.inf), axis=1)
        want = np.logaddexp.reduce(np.where(vals == targets[:, None], logw, -np.inf), axis=1) - lse
    want[:7] = -np.inf
    assert np.array_equal(np.isfinite(got), np.isfinite(want)) and np.isfinite(got).sum() > 100
    assert (got[np.isfinite(got)] < np.log(UNDERFLOW)).sum() > 10  # some rows really take the log-sum-exp
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-12, atol=1e-12)


def test_more_neighbours_than_keys(tmp_path, tiny_lm):
    keys = np.random.default_rng(0).normal(size=(30, tiny_lm.dim))
    ds = open_datastore(make_datastore(tmp_path / "s", keys, np.arange(30), tiny_lm.fingerprint,
                                       tiny_lm.tokenizer_fingerprint))
    from knnlm.index import train_index

    train_index(ds)
    r, scores = run_eval(ds, corpus=_write(tmp_path, "def f(x):\n    return x\n"),
                         cfg=EvalConfig(lam="0.25", retrieval=RetrievalConfig(k=100), context=CTX, stride=STRIDE),
                         lm=tiny_lm)
    assert (scores.vals[:, 30:] == -1).all() and np.isinf(scores.dists[:, 30:]).all()
    assert math.isfinite(r["knn_lm_ppl"])


def _write(tmp_path, text):
    p = tmp_path / "eval.txt"
    p.write_text(text)
    return str(p)


def test_interpolation_identities():
    rng = np.random.default_rng(0)
    lm = np.log(rng.uniform(0.01, 1, 100))
    knn = np.log(rng.uniform(0.01, 1, 100))
    knn[::7] = -np.inf
    assert np.array_equal(interpolate(lm, knn, 0.0), lm)
    assert np.array_equal(interpolate(lm, knn, 1.0), knn)
    mid = interpolate(lm, knn, 0.3)
    np.testing.assert_allclose(np.exp(mid), 0.3 * np.exp(knn) + 0.7 * np.exp(lm))
    assert perplexity(lm) == pytest.approx(np.exp(-lm.mean()))


def test_other_model_tokenizer_or_width_is_refused(tmp_path, tiny_lm):
    keys = np.zeros((20, tiny_lm.dim))
    other = open_datastore(make_datastore(tmp_path / "a", keys, np.zeros(20), "other", tiny_lm.tokenizer_fingerprint))
    with pytest.raises(KNNLMError, match="another model"):
        other.check_compatible(tiny_lm)
    tok = open_datastore(make_datastore(tmp_path / "b", keys, np.zeros(20), tiny_lm.fingerprint, "other"))
    with pytest.raises(KNNLMError, match="another tokenizer"):
        tok.check_compatible(tiny_lm)
    wide = open_datastore(make_datastore(tmp_path / "c", np.zeros((20, tiny_lm.dim + 1)), np.zeros(20)))
    with pytest.raises(KNNLMError, match="width"):
        wide.check_compatible(tiny_lm)


def test_same_weights_with_another_rotation_or_tokenizer_pipeline_are_refused(store, tiny_lm, tiny_model_dir,
                                                                               tmp_path):
    """A model whose weights match but whose config turns keys otherwise (another rope base), or whose tokenizer has
    the same vocabulary but another normaliser, is refused (before: accepted, silently: other keys, other tokens)."""
    import json
    import shutil

    from knnlm.datastore import Datastore
    from knnlm.lm import load_lm

    assert store.meta["model"]["settings"]["rope_parameters"]["rope_theta"] == 10000.0
    assert store.meta["tokenizer"]["pipeline"] == tiny_lm.tokenizer_pipeline is not None
    store.check_compatible(load_lm(str(tiny_model_dir), device="cpu"))  # the same model, loaded again
    theta, lower = tmp_path / "theta", tmp_path / "lower"
    for d in (theta, lower):
        shutil.copytree(tiny_model_dir, d)
    config = json.loads((theta / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 1e6
    (theta / "config.json").write_text(json.dumps(config))
    spec = json.loads((lower / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    other = load_lm(str(theta), device="cpu")
    assert other.fingerprint == tiny_lm.fingerprint  # the weights alone cannot tell
    with pytest.raises(KNNLMError, match=r"same weights but rope_parameters = .*10000.0.*, not .*1000000.0"):
        store.check_compatible(other)
    other = load_lm(str(lower), device="cpu")
    assert other.tokenizer_fingerprint == tiny_lm.tokenizer_fingerprint
    with pytest.raises(KNNLMError, match="another tokenizer .*normaliser"):
        store.check_compatible(other)
    # what changes no token is no difference: an offsets-only flag of the pre-tokeniser; an epsilon read back from
    # float32 (as a GGUF stores it)
    spec["normalizer"] = None
    spec["pre_tokenizer"]["trim_offsets"] = not spec["pre_tokenizer"].get("trim_offsets", True)
    (lower / "tokenizer.json").write_text(json.dumps(spec))
    store.check_compatible(load_lm(str(lower), device="cpu"))
    near = json.loads(json.dumps(store.meta))
    near["model"]["settings"]["rms_norm_eps"] = float(np.float32(near["model"]["settings"]["rms_norm_eps"]))
    assert near["model"]["settings"]["rms_norm_eps"] != store.meta["model"]["settings"]["rms_norm_eps"]
    Datastore(store.path, near).check_compatible(tiny_lm)
    near["model"]["settings"]["rope_parameters"]["attention_factor"] = 1.0  # an entry on one side: YaRN's, say
    with pytest.raises(KNNLMError, match="rope_parameters"):
        Datastore(store.path, near).check_compatible(tiny_lm)


def test_scores_cache_round_trip(store, tiny_lm, tmp_path):
    path = str(tmp_path / "scores.h5")
    r, scores = run_eval(store, cfg=EvalConfig(lam="0.25", retrieval=RetrievalConfig(k=32, exact=True),
                                               save_scores=path), lm=tiny_lm)
    back = load_scores(path)
    for name in ("targets", "lm_logp", "dists", "vals", "doc", "pos"):
        assert np.array_equal(getattr(back, name), getattr(scores, name)), name
    assert back.attrs["k"] == 32 and back.attrs["datastore"] == store.fingerprint
    assert back.attrs["model"] == tiny_lm.name and bool(back.attrs["rerank"]) is True
    assert len(back) == r["tokens"]


def test_threaded_exact_distances_match_numpy():
    from unittest.mock import patch

    import knnlm.retrieval as retrieval
    from knnlm.retrieval import exact_distances

    rng = np.random.default_rng(1)
    keys = rng.normal(0, 3, size=(5000, 24)).astype(np.float16)
    q = rng.normal(0, 3, size=(300, 24)).astype(np.float32)
    ids = rng.integers(0, 5000, size=(300, 120))  # 36,000 candidate rows: over 4·RERANK_ROWS_PER_WORKER
    ids[::7, -5:] = -1  # missing neighbours
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # splits the 300 queries over 4 workers
    calls = []
    rows = retrieval._rerank_rows
    try:
        with patch.object(retrieval, "_rerank_rows", lambda q, *a: calls.append(len(q)) or rows(q, *a)):
            got = exact_distances(q, keys, ids)
    finally:
        torch.set_num_threads(threads)
    assert sorted(calls) == [75, 75, 75, 75]
    ref = ((keys.astype(np.float64)[np.maximum(ids, 0)] - q[:, None, :]) ** 2).sum(-1)
    ref[ids < 0] = np.inf
    assert np.allclose(got, ref, rtol=1e-5) and np.array_equal(np.isinf(got), ids < 0)


def test_exact_distances_reuse_their_buffers_across_shapes_and_dtypes():
    """Each thread keeps its gather and widening buffers between calls: calls with more, fewer and as many
    candidates, another width and float32 keys each match numpy, and a call like the first reuses its memory."""
    from unittest.mock import patch

    import knnlm.retrieval as retrieval

    rng = np.random.default_rng(4)
    cases = [(24, 40, np.float16), (24, 90, np.float16), (24, 7, np.float16), (40, 30, np.float16),
             (24, 40, np.float32), (24, 40, np.float16)]
    for d, k, dtype in cases:
        keys = rng.normal(0, 3, size=(2000, d)).astype(dtype)
        q = rng.normal(0, 3, size=(5, d)).astype(np.float32)
        ids = rng.integers(0, 2000, size=(5, k))
        ids[2, -3:] = -1
        got = retrieval.exact_distances(q, keys, ids)
        ref = ((keys.astype(np.float64)[np.maximum(ids, 0)] - q[:, None, :]) ** 2).sum(-1)
        ref[ids < 0] = np.inf
        assert np.allclose(got, ref, rtol=1e-5) and np.array_equal(np.isinf(got), ids < 0), (d, k, dtype)
    # exact_distances itself keeps them: a call with fewer candidates reuses the first call's memory
    keys = rng.normal(0, 3, size=(2000, 24)).astype(np.float16)
    q = rng.normal(0, 3, size=(2, 24)).astype(np.float32)
    retrieval.exact_distances(q, keys, rng.integers(0, 2000, size=(2, 40)))
    kept = retrieval._RERANK_BUFFERS.held[(torch.float16, 24)]
    original, spy = retrieval._rerank_buffers, []
    with patch.object(retrieval, "_rerank_buffers", lambda *a: spy.append(original(*a)) or spy[-1]):
        retrieval.exact_distances(q, keys, rng.integers(0, 2000, size=(2, 12)))
    assert spy[0][0].data_ptr() == kept[0].data_ptr() and spy[0][1].data_ptr() == kept[1].data_ptr()
    assert spy[0][0].shape == (12, 24) and spy[0][1].dtype == torch.float32
    # float32 keys gather straight into the float32 buffer; a pair past KEEP_BUFFER_BYTES is not kept
    g32, w32 = retrieval._rerank_buffers(10, 24, torch.float32)
    assert g32 is w32
    big = retrieval.KEEP_BUFFER_BYTES // (24 * 6) + 1
    retrieval._rerank_buffers(big, 24, torch.float16)
    assert retrieval._RERANK_BUFFERS.held[(torch.float16, 24)][0].shape[0] < big


def test_rerank_buffers_made_in_inference_mode_work_outside_it():
    """The buffers a first call makes under torch.inference_mode (as eval runs) serve later calls outside it."""
    import threading

    import knnlm.retrieval as retrieval

    rng = np.random.default_rng(5)
    keys = rng.normal(0, 3, size=(500, 16)).astype(np.float16)
    q = rng.normal(0, 3, size=(3, 16)).astype(np.float32)
    ids = rng.integers(0, 500, size=(3, 64))
    ref = ((keys.astype(np.float64)[ids] - q[:, None, :]) ** 2).sum(-1)
    got = {}

    def run():  # a new thread: its buffers are made by the first call below
        with torch.inference_mode():
            got["inside"] = retrieval.exact_distances(q, keys, ids)
        got["outside"] = retrieval.exact_distances(q, keys, ids)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert np.allclose(got["inside"], ref, rtol=1e-5) and np.allclose(got["outside"], ref, rtol=1e-5)


def test_rerank_splits_by_candidate_rows_not_queries():
    """A few queries with many candidates each (RetoMaton's steps) split over the threads; one query never does."""
    from unittest.mock import patch

    import knnlm.retrieval as retrieval

    rng = np.random.default_rng(6)
    keys = rng.normal(0, 3, size=(3000, 16)).astype(np.float16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    rows = retrieval._rerank_rows
    try:
        for n, k, expected in ((4, 4096, [2, 2]), (1, 50_000, [1]), (40, 100, [40])):
            q = rng.normal(0, 3, size=(n, 16)).astype(np.float32)
            ids = rng.integers(0, 3000, size=(n, k))
            calls = []
            with patch.object(retrieval, "_rerank_rows", lambda q, *a: calls.append(len(q)) or rows(q, *a)):
                got = retrieval.exact_distances(q, keys, ids)
            assert sorted(calls) == expected, (n, k)
            ref = ((keys.astype(np.float64)[ids] - q[:, None, :]) ** 2).sum(-1)
            assert np.allclose(got, ref, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_output_projection_runs_over_owned_tails_only_with_the_same_scores(store, tiny_lm, corpus_texts, monkeypatch):
    """Later windows own only their last `stride` positions: the output projection (through the model's own
    logits_to_keep) sees only those rows, and every score equals the full projection's, bit for bit; a model
    without logits_to_keep computes every row and has them cut, with the same scores."""
    docs = [(name, corpus_texts[name]) for name in ("textwrap.py", "shlex.py")]  # many windows of CTX each
    head = tiny_lm.model.get_output_embeddings()
    rows = []
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0] * args[0].shape[1]))
    results = {}
    batches = windows_module.length_batches
    try:
        for tail in (True, False, "before"):  # "before": every row projected, batches by length alone, as before
            monkeypatch.setattr(tiny_lm, "_projects_a_tail", tail is True)
            if tail == "before":
                monkeypatch.setattr(windows_module, "length_batches", lambda lengths, size, _offsets=None: batches(lengths, size))
            rows.clear()
            s = score_documents(tiny_lm, Retriever(store), docs, CTX, STRIDE, batch_size=3)
            results[tail] = (s, sum(rows))
    finally:
        handle.remove()
    (a, projected_tail), (b, projected_all) = results[True], results[False]
    windows = [w for d, (_n, text) in enumerate(docs) for w in plan_windows(d, len(tiny_lm.encode(text)), CTX, STRIDE)]
    assert projected_all >= sum(w.end - w.begin for w in windows)  # every position (and the batches' padding)
    assert projected_tail < 0.6 * projected_all  # later windows project STRIDE of their CTX rows
    for other in (b, results["before"][0]):
        for field in ("targets", "lm_logp", "dists", "vals", "pos", "doc"):
            assert np.array_equal(getattr(a, field), getattr(other, field)), field


def test_lm_forward_from_a_first_position_equals_the_full_forward_cut(tiny_lm):
    ids = torch.tensor([[5, 9, 13, 2, 7, 7, 1, 30], [4, 8, 15, 16, 23, 42, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    keys, logits = tiny_lm.forward(ids, mask)
    for tail in (True, False):
        tiny_lm._projects_a_tail = tail
        try:
            k3, l3 = tiny_lm.forward(ids, mask, first=3)
        finally:
            tiny_lm._projects_a_tail = None
        assert k3.shape == (2, 5, keys.shape[2]) and l3.shape == (2, 5, logits.shape[2])
        assert torch.allclose(k3, keys[:, 3:], atol=1e-6) and torch.allclose(l3, logits[:, 3:], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        tiny_lm.forward(ids, mask, first=8)


def test_k_above_the_key_count_is_every_key_not_k_wide_arrays(store, tiny_lm, caplog):
    # Asked for more neighbours than keys, the search returns every key once, in arrays as wide as the keys (not
    # k: with k 10⁶ those arrays filled the memory), with the same numbers as k = the key count.
    n = store.count
    with caplog.at_level("WARNING", logger="knnlm.retrieval"):
        wide = Retriever(store, RetrievalConfig(k=10**6, exact=True))
    assert wide.k == n and wide.describe["k"] == 10**6  # described as asked: tuned values and caches still match
    assert any(f"--k 1000000 is more than the {n} keys" in r.getMessage() for r in caplog.records)
    q = np.asarray(store.keys[:5], np.float32) + 0.5
    d_wide, i_wide = wide.search(q)
    d_all, i_all = Retriever(store, RetrievalConfig(k=n, exact=True)).search(q)
    assert d_wide.shape == (5, n) and np.array_equal(d_wide, d_all) and np.array_equal(i_wide, i_all)
    assert (np.sort(i_wide, axis=1) == np.arange(n)).all()  # every key, once
    (_, text), = store.heldout("test")[:1]
    cfg = EvalConfig(lam="0.5", temperature=5.0)
    r_wide, _ = run_eval(store, cfg=replace(cfg, retrieval=RetrievalConfig(k=10**6, exact=True)), lm=tiny_lm,
                         documents=[("t", text[:600])])
    r_all, _ = run_eval(store, cfg=replace(cfg, retrieval=RetrievalConfig(k=n, exact=True)), lm=tiny_lm,
                        documents=[("t", text[:600])])
    assert r_wide["knn_lm_ppl"] == r_all["knn_lm_ppl"]
    # A window of 0 is refused, not taken for "the datastore's".
    for field in ("context", "stride"):
        with pytest.raises(KNNLMError, match=f"--{field} 0"):
            run_eval(store, cfg=replace(cfg, **{field: 0}), lm=tiny_lm, documents=[("t", text[:600])])
