"""RetoMaton: pointers within documents, candidates from IVF lists, searches saved, eval and generation."""

from __future__ import annotations

import json
from dataclasses import replace

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from transformers import LogitsProcessorList

import knnlm.cli.evaluate as cli_eval
import knnlm.evaluate as evaluate_mod
from knnlm.api import KNNLM
from knnlm.cli.main import cli
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.generate import KNNLogitsProcessor, generate
from knnlm.index import IndexConfig, train_index
from knnlm.retomaton import (Automaton, chain_neighbors, document_starts, expand_candidates, list_centroids,
                             list_distances, next_pointers, open_automaton, split_chains, successors)
from knnlm.retrieval import RetrievalConfig, Retriever, exact_distances

from helpers import build_corpus_store, clustered, make_datastore

CTX, STRIDE = 64, 32


def _with_documents(path, documents):
    """Rewrite a synthetic datastore's document table."""
    meta = json.loads((path / "meta.json").read_text())
    meta["documents"] = documents
    (path / "meta.json").write_text(json.dumps(meta))


def test_successors_never_cross_a_document_or_pass_the_end():
    # documents of rows [0, 3), an empty one, [3, 7), [7, 9); N = 9
    starts = document_starts([["a", 0, 3, 1], ["empty", 3, 0, 1], ["b", 3, 4, 1], ["c", 7, 2, 1]])
    assert starts.tolist() == [0, 3, 7]
    got = successors(np.array([0, 1, 2, 3, 6, 7, 8, -1]), 9, starts)
    assert got.tolist() == [1, 2, -1, 4, -1, 8, -1, -1]
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 9, size=(50, 7))
    nxt = successors(ids, 9, starts)
    doc = np.searchsorted(starts, np.maximum(ids, 0), side="right")
    ok = nxt >= 0
    assert (nxt[ok] == ids[ok] + 1).all() and (nxt < 9).all()
    assert (np.searchsorted(starts, nxt[ok], side="right") == doc[ok]).all()  # the same document
    # a successor is given wherever one exists
    assert ((ids >= 0) & (ids + 1 < 9) & ~np.isin(ids + 1, starts) == ok).all()


def test_next_pointers_follow_only_neighbours_that_predicted_the_target():
    auto = Automaton(9, np.array([0, 3, 7]), None, None, None)
    ids = np.array([[0, 2, 5, 8, -1], [6, 4, 1, 7, 3]])
    vals = np.array([[4, 4, 4, 4, -1], [9, 9, 8, 9, 9]])
    got = next_pointers(ids, vals, np.array([4, 9]), auto)
    assert got.tolist() == [[1, -1, 6, -1, -1], [-1, 5, -1, 8, 4]]


def _fake_lists(n: int, nlist: int, seed: int = 0) -> Automaton:
    """An automaton over n keys whose IVF lists are a random partition."""
    rng = np.random.default_rng(seed)
    list_of = rng.integers(0, nlist, n).astype(np.int32)
    members = np.argsort(list_of, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(list_of, minlength=nlist))])
    return Automaton(n, np.array([0]), list_of, offsets, members)


def test_candidates_are_the_pointers_and_their_lists_members():
    auto = _fake_lists(200, 12)
    rng = np.random.default_rng(1)
    pointers = np.full((5, 6), -1, np.int64)
    for b in range(4):  # row 4 has no pointer
        pointers[b, : b + 2] = rng.choice(200, b + 2, replace=False)
    cand = expand_candidates(pointers, auto, cap=10_000)
    for b in range(5):
        ptr = pointers[b][pointers[b] >= 0]
        ref = set(ptr.tolist()) | {int(i) for i in np.nonzero(np.isin(auto.list_of, auto.list_of[ptr]))[0]}
        got = cand[b][cand[b] >= 0]
        assert len(got) == len(set(got.tolist())) and set(got.tolist()) == ref
    # A cap: the pointers always, whole lists with more pointers first, at most cap candidates.
    lst = np.nonzero(np.bincount(auto.list_of) > 15)[0][:2]
    a, b = np.nonzero(auto.list_of == lst[0])[0], np.nonzero(auto.list_of == lst[1])[0]
    pointers = np.array([[b[0], a[0], a[1]]])
    cand = expand_candidates(pointers, auto, cap=len(a) + 5)
    got = set(cand[0][cand[0] >= 0].tolist())
    assert set(a.tolist()) | {int(b[0])} <= got and len(got) <= len(a) + 5 and len(got) > len(a) + 1


def test_a_cap_takes_the_lists_nearest_the_query_first():
    """Where the automaton has the lists' centroids, whole lists are taken nearest the row's query first, whatever
    the pointers they hold (before: lists holding more pointers first, 0.4-0.7% worse on the code benchmark)."""
    auto = _fake_lists(200, 12)
    rng = np.random.default_rng(2)
    centroids = rng.normal(0, 1, (12, 4)).astype(np.float32)
    auto = Automaton(auto.count, auto.starts, auto.list_of, auto.offsets, auto.members, centroids)
    lst = np.nonzero(np.bincount(auto.list_of, minlength=12) > 15)[0][:2]
    a, b = np.nonzero(auto.list_of == lst[0])[0], np.nonzero(auto.list_of == lst[1])[0]
    pointers = np.array([[b[0], a[0], a[1]], [b[0], a[0], a[1]]])
    queries = centroids[[lst[1], lst[0]]] + 0.01  # row 0 by b's list, row 1 by a's
    cand = expand_candidates(pointers, auto, len(b) + 5, queries)
    assert set(b.tolist()) | {int(a[0]), int(a[1])} <= set(cand[0][cand[0] >= 0].tolist())  # b's list first
    assert set(a.tolist()) | {int(b[0])} <= set(cand[1][cand[1] >= 0].tolist())  # a's (more pointers too)
    assert (cand >= 0).sum(axis=1).max() <= max(len(a), len(b)) + 5
    # without the queries (or the centroids): more pointers first, a's list for both rows
    cand = expand_candidates(pointers, auto, len(b) + 5)
    assert set(a.tolist()) <= set(cand[0][cand[0] >= 0].tolist())


def test_list_distances_are_the_quantizers_own_through_a_transform():
    """Behind a PCA the centroids live in the reduced space: each query goes through the index's transform first,
    so the lists come in the order the index's own quantizer ranks them."""
    rng = np.random.default_rng(3)
    x = clustered(3000, 16, seed=3)
    index = faiss.index_factory(16, "PCA8,IVF16,Flat")
    index.train(x)
    centroids, pretransform = list_centroids(index)
    assert centroids.shape == (16, 8) and pretransform is index
    auto = Automaton(3000, np.array([0]), None, None, None, centroids, pretransform)
    q = x[:5] + rng.normal(0, 0.1, (5, 16)).astype(np.float32)
    row, lst = np.repeat(np.arange(5), 16), np.tile(np.arange(16), 5)
    got = list_distances(q, auto, row, lst).reshape(5, 16)
    qt = faiss.downcast_VectorTransform(index.chain.at(0)).apply(q)
    ref_d, ref_lists = faiss.extract_index_ivf(index).quantizer.search(qt, 16)
    assert (np.argsort(got, axis=1, kind="stable") == ref_lists).all()
    np.testing.assert_allclose(np.take_along_axis(got, ref_lists, 1) + (qt * qt).sum(1, keepdims=True), ref_d,
                               rtol=1e-4, atol=1e-4)
    assert list_centroids(faiss.IndexFlatL2(16)) is None


@pytest.fixture
def hand_made(tmp_path):
    """12 keys in two documents, rows [0, 5) and [5, 12); every value distinct, so only the exact row matches."""
    rng = np.random.default_rng(0)
    keys = rng.normal(0, 1, size=(12, 8)).astype(np.float32)
    path = make_datastore(tmp_path / "hand", keys, np.arange(100, 112))
    _with_documents(path, [["a", 0, 5, 1], ["b", 5, 7, 1]])
    return open_datastore(path)


def test_searches_saved_on_a_hand_made_datastore(hand_made):
    ds = hand_made
    keys = np.asarray(ds.keys, np.float32)
    r = Retriever(ds, RetrievalConfig(k=3, exact=True, retomaton=True, min_knns=1))
    auto = open_automaton(r)
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    targets = np.asarray(ds.vals)[rows].copy()
    targets[7] = 0  # the text leaves the stored one after row 7: no neighbour predicted it
    dists, ids, vals, saved = chain_neighbors(r, auto, keys[rows], targets, np.array([0]))
    # 0: first, searched; 5: row 4 ends document a, no successor; 8: the chain broke at 7.
    assert saved.tolist() == [False, True, True, True, True, False, True, True, False, True]
    assert (ids[:, 0] == rows).all() and np.allclose(dists[:, 0], 0, atol=1e-5)
    # two chains side by side: each starts with a search
    _, _, _, saved2 = chain_neighbors(r, auto, keys[rows], targets, np.array([0, 3]))
    assert saved2.tolist() == [False, True, True, False, True, False, True, True, False, True]
    # rows a learned skip leaves out get no neighbour and break the chain
    keep = np.ones(10, bool)
    keep[2] = False
    _, ids3, _, saved3 = chain_neighbors(r, auto, keys[rows], targets, np.array([0]), keep)
    assert (ids3[2] == -1).all() and saved3.tolist()[:5] == [False, True, False, False, True]


def test_eval_chains_restart_every_eval_chain_positions(hand_made):
    assert split_chains([5, 0, 70, 3], 32).tolist() == [0, 5, 37, 69, 75]
    assert split_chains([], 32).tolist() == [] and split_chains([0, 0], 4).tolist() == []
    # split chains of the hand-made text: each piece's first row is searched, as a fresh chain's is
    ds = hand_made
    r = Retriever(ds, RetrievalConfig(k=3, exact=True, retomaton=True, min_knns=1))
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    targets = np.asarray(ds.vals)[rows]
    _, _, _, saved = chain_neighbors(r, open_automaton(r), np.asarray(ds.keys, np.float32)[rows], targets,
                                     split_chains([10], 3))
    assert saved.tolist() == [False, True, True, False, True, False, False, True, True, False]


@pytest.fixture(scope="module")
def ivf_store(tmp_path_factory):
    """10 000 clustered keys in 20 documents with an IVF-PQ index, values a small vocabulary."""
    path = tmp_path_factory.mktemp("ivf") / "ds"
    n = 10_000
    rng = np.random.default_rng(0)
    make_datastore(path, clustered(n, 16, seed=0), rng.integers(0, 20, n))
    _with_documents(path, [[f"d{i}", i * 500, 500, 1] for i in range(20)])
    ds = open_datastore(path)
    train_index(ds, IndexConfig(factory="IVF64,Flat"))  # IVF lists are all RetoMaton reads; Flat trains at once
    return ds


def test_min_knns_above_k_equals_plain_knn_lm(ivf_store):
    ds = ivf_store
    rng = np.random.default_rng(1)
    rows = np.arange(1200, 1500)  # a stretch of one document, queried near its own keys
    q = np.asarray(ds.keys[rows], np.float32) + rng.normal(0, 0.3, (len(rows), 16)).astype(np.float32)
    targets = np.asarray(ds.vals)[rows]
    plain = Retriever(ds, RetrievalConfig(k=20, nprobe=4))
    ref = plain.neighbors(q)
    r = Retriever(ds, RetrievalConfig(k=20, nprobe=4, retomaton=True, min_knns=21))
    dists, ids, vals, saved = chain_neighbors(r, open_automaton(r), q, targets, np.array([0, 100]))
    assert not saved.any()
    assert np.array_equal(dists, ref[0]) and np.array_equal(ids, ref[1]) and np.array_equal(vals, ref[2])
    # With a low threshold most searches are saved, and a saved row holds the k nearest candidates exactly.
    r = Retriever(ds, RetrievalConfig(k=20, nprobe=4, retomaton=True, min_knns=2, max_candidates=300))
    auto = open_automaton(r)
    dists, ids, vals, saved = chain_neighbors(r, auto, q, targets, np.array([0, 100]))
    assert saved.mean() > 0.5 and not saved[0] and not saved[100]
    t = int(np.nonzero(saved[:100])[0][5])
    _, prev_ids, prev_vals, _ = chain_neighbors(r, auto, q[:t], targets[:t], np.array([0]))
    ptr = next_pointers(prev_ids[-1:], prev_vals[-1:], targets[t - 1: t], auto)
    cand = expand_candidates(ptr, auto, 300, q[t: t + 1])
    d_ref = exact_distances(q[t: t + 1], ds.keys, cand)[0]
    order = np.argsort(d_ref, kind="stable")[:20]
    assert set(ids[t].tolist()) == set(cand[0][order].tolist())
    assert np.allclose(dists[t], d_ref[order], rtol=1e-5)
    assert (vals[t] == np.asarray(ds.vals)[ids[t]]).all()
    # every pointer is the successor, in the same document, of a neighbour that predicted the target
    p = ptr[ptr >= 0]
    assert len(p) and np.isin(p - 1, prev_ids[-1][prev_vals[-1] == targets[t - 1]]).all()
    assert (p // 500 == (p - 1) // 500).all()


def test_bad_min_knns_is_one_sentence():
    with pytest.raises(KNNLMError, match="--min-knns 0 must be at least 1"):
        RetrievalConfig(min_knns=0)


@pytest.fixture(scope="module")
def store(tiny_lm, tiny_model_dir, corpus_texts, tmp_path_factory):
    """A datastore of the corpus files, built once for the module (exact index: too few keys for IVF)."""
    return build_corpus_store(tmp_path_factory.mktemp("reto-store"), corpus_texts, tiny_model_dir, tiny_lm, CTX, STRIDE)


def test_eval_reports_searches_saved_and_equals_plain_above_k(store, tiny_lm, monkeypatch):
    name, text = store.heldout("test")[0]
    docs = [(name, text[:1500]), ("again", text[:800])]  # short: two documents of a few windows each
    base = EvalConfig(lam="0.5", temperature=2.0, retrieval=RetrievalConfig(k=16, exact=True), batch_size=16)
    plain, ps = run_eval(store, cfg=base, lm=tiny_lm, documents=docs)
    above = EvalConfig(**{**base.__dict__, "retrieval": RetrievalConfig(k=16, exact=True, retomaton=True, min_knns=17)})
    with monkeypatch.context() as m:  # above k eval searches as plain eval does: no pointer chains at all
        m.setattr(evaluate_mod, "chain_neighbors", lambda *a, **k: pytest.fail("pointer chains above k"))
        same, ss = run_eval(store, cfg=above, lm=tiny_lm, documents=docs)
    assert same["searches_saved"] == 0 and plain["searches_saved"] == 0
    # Above k no step can skip, so the steps search as plain eval does, in its batches (the pointer chains' one-step
    # batches could part near-ties of an IVF index's codes: the audit found 1 in 5,218 rows)
    assert not Retriever(store, above.retrieval).follows_pointers
    assert Retriever(store, replace(above.retrieval, min_knns=16)).follows_pointers
    with KNNLogitsProcessor(tiny_lm, Retriever(store, above.retrieval), "0.5", 2.0) as p:  # decoding too
        assert p._automaton is None
    assert same["knn_lm_ppl"] == plain["knn_lm_ppl"] and np.array_equal(ss.dists, ps.dists)
    low = EvalConfig(**{**base.__dict__, "retrieval": RetrievalConfig(k=16, exact=True, retomaton=True, min_knns=1)})
    r, _ = run_eval(store, cfg=low, lm=tiny_lm, documents=docs)
    assert 0 < r["searches_saved"] < 1 and r["tokens"] == plain["tokens"]
    assert "RetoMaton" in cli_eval.format_report(r) and "searches saved" in cli_eval.format_report(r)
    # the API: RetoMaton is a search setting
    knn = KNNLM(store, tiny_lm, Retriever(store, RetrievalConfig(k=16, exact=True)))
    api = knn.with_retrieval(retomaton=True, min_knns=1).evaluate(text[:1200], lam=0.5, temperature=2.0)
    assert api["searches_saved"] > 0 and knn.evaluate(text[:1200], lam=0.5, temperature=2.0)["searches_saved"] == 0
    # eval cuts its chains every EVAL_CHAIN positions: chains of one position never save a search
    monkeypatch.setattr(evaluate_mod, "EVAL_CHAIN", 1)
    assert run_eval(store, cfg=low, lm=tiny_lm, documents=docs)[0]["searches_saved"] == 0


def test_generation_with_retomaton_continues_stored_text_verbatim(store, tiny_lm):
    name = store.documents[0][0]
    text = open(name).read() if name.startswith("/") else (store.path.parent / "corpus" / name).read_text()
    ids = tiny_lm.encode(text)
    n = next(n for n in range(16, 30) if tiny_lm.encode(tiny_lm.decode(ids[:n])) == ids[:n])
    r = Retriever(store, RetrievalConfig(k=8, exact=True, retomaton=True, min_knns=1))
    out = generate(tiny_lm, tiny_lm.decode(ids[:n]), r, lam=0.999, temperature=0.01, max_new_tokens=40)
    assert out.tokens == ids[n: n + len(out.tokens)] and len(out.tokens) == 40
    # After the first step each chosen token was the stored one, so its successor carried the next step.
    assert out.searches_saved >= 35


def test_retomaton_flags_reach_their_configs(monkeypatch, tiny_model_dir):
    import knnlm.api as api

    seen = {}

    class Stop(Exception):
        pass

    def fake_eval(datastore, corpus, cfg, progress=None):
        seen.update(cfg=cfg.retrieval)
        raise Stop

    def fake_open(datastore, model, device, retrieval, trust_remote_code):
        seen.update(cfg=retrieval)
        raise Stop

    monkeypatch.setattr(cli_eval, "run_eval", fake_eval)
    monkeypatch.setattr(api.KNNLM, "open", staticmethod(fake_open))
    runner = CliRunner()
    for cmd in (["eval"], ["generate", "--prompt", "x"]):
        r = runner.invoke(cli, cmd + ["--retomaton", "--min-knns", 7, "--max-candidates", 500])
        assert isinstance(r.exception, Stop), r.output
        assert (seen["cfg"].retomaton, seen["cfg"].min_knns, seen["cfg"].max_candidates) == (True, 7, 500)
        r = runner.invoke(cli, cmd + ["--no-retomaton"])
        assert isinstance(r.exception, Stop) and seen["cfg"].retomaton is False


def test_factory_builds_any_faiss_index_and_a_bad_one_is_one_sentence(ivf_store, tmp_path):
    info = json.loads((ivf_store.path / "index.json").read_text())
    assert (info["factory"], info["kind"], info["nlist"]) == ("IVF64,Flat", "factory", 64)
    r = Retriever(ivf_store, RetrievalConfig(k=10, nprobe=64))  # every list: an exact search
    q = clustered(20, 16, seed=5)
    ref = Retriever(ivf_store, RetrievalConfig(k=10, exact=True)).search(q)
    assert (r.search(q)[1] == ref[1]).mean() > 0.99
    for bad, words in [("IVFxx,PQ", "could not parse"), ("IVF64,PQ7", "multiple")]:
        with pytest.raises(KNNLMError) as e:
            IndexConfig(factory=bad).check_factory(16)
        msg = str(e.value)
        assert msg.count("\n") == 0 and f"--factory {bad!r}" in msg and words in msg and "IVF1024,PQ64x4fs" in msg
    # the CLI refuses it before building anything, and train-index too
    (tmp_path / "c.txt").write_text("x = 1\n" * 50)
    r = CliRunner().invoke(cli, ["train-index", str(ivf_store.path), "--factory", "IVF64,PQ7"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: --factory 'IVF64,PQ7'")
    assert json.loads((ivf_store.path / "index.json").read_text())["factory"] == "IVF64,Flat"  # untouched


def test_factory_flag_reaches_its_config(monkeypatch, tmp_path, tiny_model_dir, corpus_dir):
    import knnlm.cli.build as cli_build

    seen = {}

    class Stop(Exception):
        pass

    monkeypatch.setattr(cli_build, "build_datastore", lambda corpus, out, cfg, progress=None: (
        seen.update(cfg=cfg), (_ for _ in ()).throw(Stop)))
    (tmp_path / "c.txt").write_text("x")
    r = CliRunner().invoke(cli, ["build-datastore", str(tmp_path / "c.txt"), "--factory", "IVF8,PQ4x4fs"])
    assert isinstance(r.exception, Stop) and seen["cfg"].index.factory == "IVF8,PQ4x4fs"
    monkeypatch.undo()
    r = CliRunner().invoke(cli, ["build-datastore", str(corpus_dir), "--model", str(tiny_model_dir), "--glob", "*.txt",
                                 "--factory", "IVF8,PQ7"])
    assert r.exit_code == 1 and "--factory 'IVF8,PQ7'" in r.output and not (tmp_path / "datastores").exists()


def test_candidates_leave_out_a_removed_document(tmp_path):
    """After `knnlm remove`, the removed document's keys are in no IVF list: never a candidate."""
    from knnlm.update import remove_documents

    n = 10_000
    rng = np.random.default_rng(2)
    path = make_datastore(tmp_path / "rm", clustered(n, 16, seed=3), rng.integers(0, 20, n))
    _with_documents(path, [[f"d{i}", i * 500, 500, 1] for i in range(20)])
    train_index(open_datastore(path), IndexConfig(factory="IVF64,Flat"))
    remove_documents(path, ["d3"])
    ds = open_datastore(path)
    r = Retriever(ds, RetrievalConfig(k=20, nprobe=4, retomaton=True, min_knns=1, max_candidates=5000))
    auto = open_automaton(r)
    assert (auto.list_of[1500:2000] == -1).all() and (auto.list_of[:1500] >= 0).all()
    rows = np.arange(4000, 4200)
    q = np.asarray(ds.keys[rows], np.float32)
    _, ids, _, saved = chain_neighbors(r, auto, q, np.asarray(ds.vals)[rows], np.array([0]))
    assert saved.mean() > 0.5 and not ((ids >= 1500) & (ids < 2000)).any()


def test_search_settings_that_would_do_nothing_are_refused_in_the_api():
    for kwargs, words in (({"exact": True, "nprobe": 16}, r"--nprobe picks the faiss index's lists, and --exact"),
                          ({"search_device": "cpu", "nprobe": 4}, r"--nprobe .* and --search-device searches"),
                          ({"search_device": "cpu", "exact": True}, r"--search-device already searches exactly"),
                          ({"search_device": "cpu", "rerank": False}, r"--search-device already searches exactly"),
                          ({"min_knns": 5}, r"only apply with --retomaton"),
                          ({"max_candidates": 500}, r"only apply with --retomaton")):
        with pytest.raises(KNNLMError, match=words):
            RetrievalConfig(**kwargs)
    RetrievalConfig(retomaton=True, min_knns=5, max_candidates=500)  # read there
    RetrievalConfig(exact=True, rerank=False)  # exact search re-ranks to restore faiss's lost digits: it reads it


def test_with_retrieval_turning_a_search_off_takes_its_defaults_back(store, tiny_lm):
    knn = KNNLM(store, tiny_lm, Retriever(store, RetrievalConfig(k=16, nprobe=4, retomaton=True, min_knns=5)))
    off = knn.with_retrieval(retomaton=False)
    assert (off.retriever.cfg.retomaton, off.retriever.cfg.min_knns, off.retriever.cfg.nprobe) == (False, 50, 4)
    exact = knn.with_retrieval(exact=True, retomaton=False)
    assert exact.retriever.cfg.exact and exact.retriever.cfg.nprobe == RetrievalConfig.nprobe
    with pytest.raises(KNNLMError, match="--nprobe picks the faiss index's lists"):
        knn.with_retrieval(exact=True, nprobe=2, retomaton=False)  # given: still refused
    torch_search = knn.with_retrieval(search_device="cpu", retomaton=False)  # from nprobe 4: taken back
    assert torch_search.retriever.cfg.search_device == "cpu" and torch_search.retriever.cfg.nprobe == 8
    back = torch_search.with_retrieval(exact=True)  # torch's exact search to faiss's
    assert back.retriever.cfg.exact and back.retriever.cfg.search_device is None
    with pytest.raises(KNNLMError, match=r"so --no-rerank would do nothing; leave it out"):
        RetrievalConfig(search_device="cpu", rerank=False)



def _stored_ids(store, lm, doc: int) -> list[int]:
    name = store.documents[doc][0]
    return lm.encode(open(name).read() if name.startswith("/") else (store.path.parent / "corpus" / name).read_text())


def test_continued_rows_finds_each_rows_parent():
    from knnlm.lm import continued_rows

    last = np.array([[1, 2], [3, 4], [1, 2]])
    assert continued_rows(last, np.array([[3, 4, 9], [1, 2, 9], [1, 2, 7]])).tolist() in ([1, 2, 2], [1, 0, 0])
    assert continued_rows(None, np.array([[1, 2, 3]])) is None
    assert continued_rows(last, np.array([[3, 4, 9], [5, 6, 9]])) is None  # a row extends none: a new generation
    assert continued_rows(last, np.array([[1, 2]])) is None and continued_rows(last, np.array([[1, 2, 3, 4]])) is None


def test_processor_follows_each_row_from_the_row_it_extends(store, tiny_lm):
    """Beam search reorders rows between steps: a row's pointers come from the row its input_ids extend."""
    import torch

    a, b = _stored_ids(store, tiny_lm, 0), _stored_ids(store, tiny_lm, 1)
    n = 20
    r = Retriever(store, RetrievalConfig(k=8, exact=True, retomaton=True, min_knns=1))

    def two_steps(second):
        with KNNLogitsProcessor(tiny_lm, r, 0.5, 1.0) as p:
            for rows in ([a[:n], b[:n]], second):
                x = torch.tensor(rows)
                with torch.inference_mode():
                    out = p(x, tiny_lm.model(input_ids=x).logits[:, -1])
            return out, p.saved

    kept, saved = two_steps([a[:n + 1], b[:n + 1]])  # each row goes on with its stored next token
    swapped, saved_swapped = two_steps([b[:n + 1], a[:n + 1]])
    assert saved == saved_swapped == 2  # both rows followed their own pointers at the second step
    assert torch.allclose(swapped, kept[[1, 0]], atol=1e-6)
    # transformers' beam search, which reorders its rows, runs through
    with KNNLogitsProcessor(tiny_lm, r, 0.999, 0.01) as p:
        out = tiny_lm.model.generate(torch.tensor([a[:n]]), logits_processor=LogitsProcessorList([p]), num_beams=3,
                                     do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert out[0, n:].tolist() == a[n:n + 8] and p.saved > 0


def test_a_retomaton_processor_starts_each_generate_call_afresh(store, tiny_lm):
    """A call whose input_ids extend no row of the last step searches: no pointers left from another generation."""
    import torch

    a, b = _stored_ids(store, tiny_lm, 0), _stored_ids(store, tiny_lm, 1)
    r = Retriever(store, RetrievalConfig(k=8, exact=True, retomaton=True, min_knns=1))

    def step(p, rows):
        x = torch.tensor(rows)
        with torch.inference_mode():
            return p(x, tiny_lm.model(input_ids=x).logits[:, -1])

    with KNNLogitsProcessor(tiny_lm, r, 0.999, 0.01) as p:
        ids = a[:20]
        for _ in range(4):
            ids = ids + [int(step(p, [ids]).argmax())]
        assert ids[20:] == a[20:24] and p.saved == 3
        # another prompt ending in the token just chosen: the last step's neighbours carry it
        prompt = b[:10] + [ids[-1]]
        again = step(p, [prompt])
        assert p.saved == 3
    with KNNLogitsProcessor(tiny_lm, r, 0.999, 0.01) as fresh:
        assert torch.equal(again, step(fresh, [prompt]))


def test_retomaton_beside_the_torch_search_describes_itself(hand_made):
    """The torch search is no faiss index (before: describe handed it to faiss, a TypeError traceback in eval,
    generate and the API); it has no lists, so its description names no list order, and the chains still run."""
    r = Retriever(hand_made, RetrievalConfig(k=3, retomaton=True, min_knns=1, search_device="cpu"))
    assert r.describe["retomaton"] == "min_knns 1, candidates 1000"
    exact = Retriever(hand_made, RetrievalConfig(k=3, exact=True, retomaton=True, min_knns=1))
    assert exact.describe["retomaton"] == "min_knns 1, candidates 1000"  # no lists either
    keys = np.asarray(hand_made.keys, np.float32)
    _, ids, _, saved = chain_neighbors(r, open_automaton(r), keys[:5], np.asarray(hand_made.vals)[:5], np.array([0]))
    assert (ids[:, 0] == np.arange(5)).all() and saved[1:].all()
