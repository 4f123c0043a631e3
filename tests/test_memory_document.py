"""The document memory: causal exact search, no leaks, eval / generate / tune, flags (tiny model)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import knnlm.cli.evaluate as cli_eval
import knnlm.cli.generate as cli_generate
import knnlm.cli.tune as cli_tune
from knnlm.api import KNNLM
from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.generate import generate
from knnlm.interpolate import interpolate, knn_log_prob, perplexity
from knnlm.memory.document import (DocumentMemory, MemoryConfig, causal_neighbors, memory_neighbors, prompt_memory,
                                   resolve_memory)
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.scores import Scores
from knnlm.tune import TuneConfig

CTX, STRIDE = 64, 32
PLAIN_TUNE = TuneConfig(adaptive=False, gate=False, skip=False, spalm=False)
TIMING = ("seconds", "tokens_per_s", "lm_seconds", "retrieval_seconds", "mixing_seconds")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def store(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.2, glob="*.txt")
    return build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)


def brute_force(keys: np.ndarray, vals: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position t: (distances, values) of its k nearest among positions j < t, in float64 numpy."""
    out = []
    for t in range(len(keys)):
        d = ((keys[:t].astype(np.float64) - keys[t]) ** 2).sum(1)
        order = np.argsort(d, kind="stable")[:k]
        out.append((d[order], vals[:t][order]))
    return out


def test_causal_neighbors_equal_a_per_position_brute_force():
    rng = np.random.default_rng(0)
    keys, vals = rng.normal(size=(150, 8)).astype(np.float32), rng.integers(0, 1000, 150)
    dists, got = causal_neighbors(keys, vals, k=10, chunk=37)  # blocks that do not divide n
    for t, (ref_d, ref_v) in enumerate(brute_force(keys, vals, 10)):
        m = len(ref_v)
        assert (got[t, :m] == ref_v).all(), t
        np.testing.assert_allclose(dists[t, :m], ref_d, rtol=1e-5, atol=1e-5)
        assert (got[t, m:] == -1).all() and np.isinf(dists[t, m:]).all()
    assert (got[0] == -1).all()


def test_memory_never_holds_the_present_or_the_future():
    rng = np.random.default_rng(1)
    keys, vals = rng.normal(size=(120, 8)).astype(np.float32), rng.integers(0, 1000, 120)
    d0, v0 = causal_neighbors(keys, vals, k=16, chunk=32)
    # Each position's own key is at distance 0: had it leaked in, it would be every row's nearest.
    assert (d0[1:, 0] > 1e-3).all()
    # A future that is each earlier key again (distance 0 to every query) with new values changes
    # nothing before it.
    t = 60
    leaky_keys, leaky_vals = keys.copy(), vals.copy()
    leaky_keys[t + 1:] = keys[: len(keys) - t - 1]
    leaky_vals[t + 1:] = 5000 + np.arange(len(keys) - t - 1)
    d1, v1 = causal_neighbors(leaky_keys, leaky_vals, k=16, chunk=32)
    assert (v1[: t + 1] == v0[: t + 1]).all() and np.array_equal(d1[: t + 1], d0[: t + 1])
    assert (v1[: t + 1] < 5000).all()


def test_memory_neighbors_stay_within_each_document_in_position_order():
    rng = np.random.default_rng(2)
    n = 60
    keys = rng.normal(size=(n, 4)).astype(np.float32)
    doc = np.repeat([0, 1], n // 2).astype(np.int32)
    pos = np.concatenate([np.arange(1, n // 2 + 1)] * 2).astype(np.int32)
    targets = (doc * 1000 + pos).astype(np.int32)  # a document's values tell where they came from
    perm = rng.permutation(n)  # rows in any order: causality is by position
    s = Scores(targets[perm], np.zeros(n), np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int32), doc[perm],
               pos[perm], queries=keys[perm])
    dists, vals = memory_neighbors(s, k=8, chunk=7)
    for r in range(n):
        got = vals[r][vals[r] >= 0]
        assert (got // 1000 == s.doc[r]).all()  # same document
        assert (got % 1000 < s.pos[r]).all()  # earlier targets only
        own = (s.doc == s.doc[r]) & (s.pos < s.pos[r])
        ref = np.sort(((s.queries[own] - s.queries[r]) ** 2).sum(1))[:8]
        np.testing.assert_allclose(dists[r][: len(ref)], ref, rtol=1e-5, atol=1e-5)


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING}


def test_empty_memory_equals_todays_eval_exactly(store, tiny_lm):
    text = [store.heldout("test")[0][1][:1500]]
    cfg = EvalConfig(lam="0.3", temperature=5.0, retrieval=RetrievalConfig(k=16, exact=True))
    docs = [("a", t) for t in text]
    today, s0 = run_eval(store, cfg=cfg, lm=tiny_lm, documents=docs)
    none, s1 = run_eval(store, cfg=EvalConfig(**{**cfg.__dict__, "memory": MemoryConfig("none")}), lm=tiny_lm,
                        documents=docs)
    assert _without_timing(today) == _without_timing(none) and "memory" not in none
    assert np.array_equal(s0.lm_logp, s1.lm_logp) and np.array_equal(s0.dists, s1.dists)
    # λ_m = 0 leaves every token as it was, to the last digit.
    zero, _ = run_eval(store, cfg=EvalConfig(**{**cfg.__dict__, "memory": MemoryConfig("document", mix="separate", lam="0")}),
                       lm=tiny_lm, documents=docs)
    assert zero["memory"]["ppl"] == today["knn_lm_ppl"] == zero["knn_lm_ppl"]


@pytest.mark.parametrize("mix", ["separate", "joint"])
def test_eval_memory_equals_a_brute_force_per_position_reference(store, tiny_lm, corpus_texts, mix):
    text = corpus_texts["fnmatch.py"][:1600]
    docs = [("a", text), ("b", text[:800])]  # the second repeats the first's start: no memory across documents
    lam, t, lam_m, t_m, k_m = 0.3, 5.0, 0.4, 3.0, 12
    own = {"lam": str(lam_m), "temperature": t_m} if mix == "separate" else {}  # the joint mix takes λ and T
    mem = MemoryConfig("document", mix=mix, k=k_m, chunk=50, **own)
    cfg = EvalConfig(lam=str(lam), temperature=t, retrieval=RetrievalConfig(k=16, exact=True), memory=mem,
                     keep_features=True)
    out, s = run_eval(store, cfg=cfg, lm=tiny_lm, documents=docs)
    ref = []
    for r in range(len(s)):  # one position at a time, in numpy: the memory is what came before, same document
        own = (s.doc == s.doc[r]) & (s.pos < s.pos[r])
        d = ((s.queries[own].astype(np.float64) - s.queries[r]) ** 2).sum(1)
        order = np.argsort(d)[:k_m]
        md, mv = d[order][None, :], s.targets[own][order][None, :]
        tgt, knn_d, knn_v = s.targets[r: r + 1], s.dists[r: r + 1], s.vals[r: r + 1]
        if mix == "joint":
            allv = np.concatenate([knn_v, mv], 1)
            ref.append(interpolate(s.lm_logp[r], knn_log_prob(np.concatenate([knn_d, md], 1), allv, tgt, t)[0], lam))
        else:
            base = interpolate(s.lm_logp[r], knn_log_prob(knn_d, knn_v, tgt, t)[0], lam)
            p_mem = knn_log_prob(md, mv, tgt, t_m)[0] if len(order) else -np.inf
            ref.append(interpolate(base, p_mem, lam_m if len(order) else 0.0))
    assert out["memory"]["ppl"] == pytest.approx(perplexity(np.array(ref)), rel=1e-5)
    assert out["memory"]["mix"] == mix and out["memory"]["ppl_without"] == out["knn_lm_ppl"]


def test_no_datastore_eval_takes_the_lm_and_the_memory_only(tiny_lm, tiny_model_dir, corpus_texts, tmp_path):
    text = corpus_texts["bisect.py"][:1200]
    (tmp_path / "t.txt").write_text(text + text)  # a document that repeats itself
    cfg = EvalConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, use_datastore=False,
                     memory=MemoryConfig("document", lam="0.5", temperature=3.0))
    out, s = run_eval(None, str(tmp_path / "t.txt"), cfg)
    assert out["search"] == "none" and out["knn_lm_ppl"] == out["lm_ppl"]
    assert out["memory"]["ppl"] < 0.8 * out["lm_ppl"]  # the repeat is read off the memory
    assert out["memory"]["mix"] == "separate" and out["memory"]["source"] == "given"
    r = run("eval", "--no-datastore", "--model", tiny_model_dir, "--corpus", tmp_path / "t.txt", "--context", CTX,
            "--memory", "document", "--memory-lambda", 0.5, "--memory-temperature", 3, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["memory"]["ppl"] == pytest.approx(out["memory"]["ppl"], rel=1e-6)
    r = run("eval", "--no-datastore", "--model", tiny_model_dir, "--corpus", tmp_path / "t.txt", "--memory", "document")
    assert r.exit_code == 0 and "with document memory" in r.output and "kNN-LM" not in r.output
    r = run("eval", "--no-datastore", "--model", tiny_model_dir, "--memory", "document")
    assert r.exit_code == 1 and "--corpus" in r.output.splitlines()[-1]


def _periodic_prompt(lm, text: str, period: int, reps: int) -> tuple[str, list[int], int]:
    """A prompt of a passage Y (period tokens) said reps times, then Y's first m tokens, that encodes back to
    exactly those tokens: (prompt, Y, m)."""
    base = lm.encode(text)
    for off in range(0, 300, 7):
        y = base[off: off + period]
        for m in range(6, 14):
            ids = y * reps + y[:m]
            if lm.encode(lm.decode(ids)) == ids:
                return lm.decode(ids), y, m
    raise AssertionError("no prompt that encodes back to its tokens")


def test_generate_with_document_memory_repeats_a_passage_of_the_prompt(tiny_lm, tiny_model_dir):
    from conftest import STDLIB

    # Windows as long as the passage: each repeat starts a window, so a position of the last, cut repeat
    # sees what the same position of the first saw. The first repeats have left the window: the LM alone
    # cannot read them back, the memory can.
    prompt, y, m = _periodic_prompt(tiny_lm, (STDLIB / "copy.py").read_text()[3000:5000], 32, 3)
    n, window = 40, (32, 32)
    mem = MemoryConfig("document", lam="0.999", temperature=0.01, k=8)
    out = generate(tiny_lm, prompt, None, max_new_tokens=n, memory=mem, window=window)
    assert out.tokens == (y * 4)[m: m + n]
    alone = generate(tiny_lm, prompt, None, max_new_tokens=n, window=window)
    assert alone.tokens != out.tokens  # the random LM alone does not know the passage
    # The API decodes in one window as long as the model allows: the memory still finds the passage.
    api = KNNLM.without_datastore(lm=tiny_lm).generate(prompt, 8, memory=mem)
    assert tiny_lm.encode(api)[:4] == y[m: m + 4]
    r = run("generate", "--no-datastore", "--model", tiny_model_dir, "--prompt", prompt, "-n", 8, "--memory",
            "document", "--memory-lambda", 0.999, "--memory-temperature", 0.01, "--memory-neighbors", 8, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == api and json.loads(r.stdout)["search"] == "none"
    with pytest.raises(KNNLMError, match="needs a datastore"):
        KNNLM.without_datastore(lm=tiny_lm).neighbors(prompt)
    # The datastore's mixing settings, given without one, are refused (they did nothing), as the CLI refuses them.
    alone_api = KNNLM.without_datastore(lm=tiny_lm)
    with pytest.raises(KNNLMError, match=r"^lam=0.7, temperature=5.0, combine='spalm' mix the datastore's neighbours"):
        alone_api.generate(prompt, 4, lam=0.7, temperature=5.0, combine="spalm")
    with pytest.raises(KNNLMError, match=r"^skip_below='tuned' mix the datastore's neighbours in"):
        alone_api.evaluate(prompt, skip_below="tuned", memory=mem)
    assert alone_api.generate(prompt, 8, lam="0.25", memory=mem) == api  # the defaults, spelled out, are fine


def test_memory_settings_the_memory_would_not_read_are_refused(store, tiny_lm):
    knn = KNNLM.open(store.path, lm=tiny_lm, retrieval=RetrievalConfig(k=8, exact=True))
    text = store.heldout("test")[0][1][:400]
    joint = MemoryConfig("document", lam="0.9", temperature=3.0)  # the joint mix (the default) takes the datastore's
    for call in (lambda: knn.evaluate(text, memory=joint), lambda: knn.generate(text, 2, memory=joint)):
        with pytest.raises(KNNLMError, match=r"^The joint mix weighs the memory's neighbours with the datastore's"):
            call()
    with pytest.raises(KNNLMError, match=r"^MemoryConfig\(memory='none'\) keeps no memory, so lam='0.5' would do"):
        knn.evaluate(text, memory=MemoryConfig("none", lam="0.5"))
    # the separate mix reads them; without a datastore the two mixes coincide and read them too
    separate = knn.evaluate(text, memory=MemoryConfig("document", mix="separate", lam="0.9", temperature=3.0))
    assert separate["memory"]["lambda"] == 0.9 and separate["memory"]["temperature"] == 3.0
    alone = KNNLM.without_datastore(lm=tiny_lm).evaluate(text, memory=joint)
    assert alone["memory"]["lambda"] == 0.9


def test_generation_memory_holds_exactly_the_positions_before_the_query(tiny_lm, corpus_texts):
    ids = tiny_lm.encode(corpus_texts["glob.py"][:900])[:80]
    memory = prompt_memory(tiny_lm, ids, CTX, STRIDE, k=4)
    assert len(memory) == len(ids) - 1 and (memory.vals == np.asarray(ids[1:])).all()
    # Its keys are eval's keys of the same windows.
    from knnlm.evaluate import score_documents

    s = score_documents(tiny_lm, None, [("p", tiny_lm.decode(ids))], CTX, STRIDE, keep_queries=True)
    if tiny_lm.encode(tiny_lm.decode(ids)) == ids:
        np.testing.assert_allclose(memory.keys.numpy(), s.queries, atol=1e-4)
    # Decoding: each step first files the previous query under the token chosen after it.
    mem = DocumentMemory(dim=4, k=3)
    q = [torch.tensor([[float(i), 0, 0, 0]]) for i in range(4)]
    mem.step(q[0], last_token=-1)
    assert len(mem) == 0  # the first query is not its own memory
    _d, v = mem.step(q[1], last_token=7)
    assert len(mem) == 1 and v[0, 0] == 7
    d, v = mem.step(q[2], last_token=8)
    assert list(v[0, :2]) == [8, 7] and d[0, 0] == pytest.approx(1.0)
    with pytest.raises(KNNLMError, match="one sequence"):
        mem.step(torch.zeros(2, 4), last_token=1)


def test_prompt_memory_with_attention_memory_holds_evals_keys(tiny_lm, corpus_texts):
    """With --attention-memory the decoding's queries read through it, so the prompt's keys must too (before: read
    without it, up to 3.07 off eval's keys past the first window)."""
    from knnlm.evaluate import score_documents
    from knnlm.memory.attention import AttentionMemoryConfig

    ids = tiny_lm.encode(corpus_texts["glob.py"][:2000])[:150]
    ids = tiny_lm.encode(tiny_lm.decode(ids))  # a token list eval's text gives back
    cfg = AttentionMemoryConfig(k=8)
    memory = prompt_memory(tiny_lm, ids, CTX, STRIDE, k=4, attention=cfg)
    s = score_documents(tiny_lm, None, [("p", tiny_lm.decode(ids))], CTX, STRIDE, keep_queries=True, attention=cfg)
    np.testing.assert_allclose(memory.keys.numpy(), s.queries, atol=1e-4)
    plain = prompt_memory(tiny_lm, ids, CTX, STRIDE, k=4).keys.numpy()
    assert np.abs(plain - s.queries)[CTX:].max() > 1e-2  # past the first window the attention memory matters


def test_generate_with_a_datastore_and_the_memory_both_mixes(store, tiny_lm):
    from conftest import STDLIB

    # The datastore's windows (64, 32) and a passage of period 32: a repeat's positions see what the
    # previous repeat's saw.
    prompt, y, m = _periodic_prompt(tiny_lm, (STDLIB / "copy.py").read_text()[3000:5000], STRIDE, 3)
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    for mix, lam in (("joint", 0.999), ("separate", 0.1)):
        own = {"lam": "0.999", "temperature": 0.01} if mix == "separate" else {}  # the joint mix takes λ and T
        mem = MemoryConfig("document", mix=mix, k=8, **own)
        out = generate(tiny_lm, prompt, retriever, lam=lam, temperature=0.01, max_new_tokens=12, memory=mem)
        assert out.tokens == (y * 4)[m: m + 12], mix


def test_tuned_memory_round_trip(store, tiny_lm, corpus_texts):
    text = corpus_texts["keyword.py"] + corpus_texts["keyword.py"][:1500]
    knn = KNNLM(store, tiny_lm, Retriever(store, RetrievalConfig(k=16, exact=True)))
    result = knn.tune(text, PLAIN_TUNE, memory=MemoryConfig("document", k=16))
    m = json.loads((store.path / "lambda.json").read_text())["memory"]
    assert m["lambda"] == result["memory"]["lambda"] > 0 and m["nll"] <= m["nll_without"]
    lam, t, source = resolve_memory(MemoryConfig("document", lam="tuned"), store.path)
    assert (lam, t, source) == (m["lambda"], m["temperature"], "tuned")
    # eval with the tuned values on the tuning text gives the fitted NLL back.
    out = knn.evaluate(text, lam="tuned", memory=MemoryConfig("document", mix="separate", k=16))
    assert out["memory"]["lambda"] == m["lambda"] and out["memory"]["source"] == "tuned"
    assert np.log(out["memory"]["ppl"]) == pytest.approx(m["nll"], rel=1e-9)
    # The CLI fits the same.
    r = run("tune-lambda", "--datastore", store.path, "--corpus", _write(text), "--k", 16, "--exact", "--no-adaptive",
            "--no-gate", "--no-spalm", "--no-plot", "--memory", "document", "--memory-neighbors", 16, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["memory"]["lambda"] == pytest.approx(m["lambda"])


def _write(text: str) -> str:
    with open("tune.txt", "w") as f:
        f.write(text)
    return "tune.txt"


def test_bad_memory_settings_get_one_sentence(store):
    with pytest.raises(KNNLMError, match="--memory-lambda"):
        MemoryConfig("document", lam="2")
    with pytest.raises(KNNLMError, match="--memory-mix"):
        MemoryConfig("document", mix="both")
    with pytest.raises(KNNLMError, match="tune-lambda --memory document"):
        resolve_memory(MemoryConfig("document", lam="tuned"), store.path)
    r = run("eval", "--memory", "document", "--memory-mix", "separate", "--memory-temperature", -1,
            "--datastore", store.path)
    assert r.exit_code == 1 and "--memory-temperature" in r.output.splitlines()[-1]


def test_every_memory_flag_reaches_its_config(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_eval(datastore, corpus, cfg, progress=None):
        seen["eval"] = cfg
        raise Stop

    def fake_generate(lm, prompt, retriever, *args, **kw):
        seen["generate"] = (retriever, kw["memory"])
        raise Stop

    def fake_tune_memory(scores, result, cfg):
        seen["tune"] = cfg
        raise Stop

    class FakeKNNLM:
        @classmethod
        def without_datastore(cls, model, device, trust):
            seen["without"] = model
            return type("K", (), {"lm": None, "retriever": None, "datastore": None})()

    # without a datastore the memory is mixed on its own: --memory-mix is refused there, λ_m and T_m are read
    flags = ["--memory", "document", "--memory-lambda", "0.7", "--memory-temperature", 4, "--memory-neighbors", 9]
    monkeypatch.setattr(cli_eval, "run_eval", fake_eval)
    with pytest.raises(Stop):
        run("eval", *flags, "--no-datastore", "--corpus", "c.txt")
    c = seen["eval"]
    assert c.memory == MemoryConfig("document", "joint", "0.7", 4.0, 9) and c.use_datastore is False
    with pytest.raises(Stop):
        run("eval", *flags, "--memory-mix", "separate", "--datastore", "d")
    assert seen["eval"].memory == MemoryConfig("document", "separate", "0.7", 4.0, 9)
    monkeypatch.setattr(cli_generate, "generate", fake_generate)
    monkeypatch.setattr(cli_generate, "KNNLM", FakeKNNLM)
    with pytest.raises(Stop):
        run("generate", "--prompt", "x", *flags, "--no-datastore", "--model", "m")
    assert seen["without"] == "m" and seen["generate"] == (None, MemoryConfig("document", "joint", "0.7", 4.0, 9))
    monkeypatch.setattr(cli_tune, "tune_memory", fake_tune_memory)
    monkeypatch.setattr(cli_tune, "open_datastore", lambda path: type("D", (), {"path": path, "meta": {},
                                                                             "check_compatible": lambda self, lm: None})())
    monkeypatch.setattr(cli_tune, "tune", lambda *a, **k: {})
    monkeypatch.setattr(cli_tune, "dev_scores", lambda *a, **k: (None, False))
    monkeypatch.setattr(cli_tune, "datastore_lm", lambda *a, **k: None)
    monkeypatch.setattr(cli_tune, "check_writable", lambda path: None)  # the fake datastore "d" is no folder
    monkeypatch.setattr(cli_tune.journal, "hold", lambda path: contextlib.nullcontext())  # so it has no lock either
    monkeypatch.setattr(cli_tune, "check_unchanged", lambda ds: None)  # nor a build to compare with
    with pytest.raises(Stop):
        run("tune-lambda", "--datastore", "d", "--model", "m", "--no-spalm", "--memory", "document", "--memory-neighbors", 11)
    assert seen["tune"] == MemoryConfig("document", k=11)
