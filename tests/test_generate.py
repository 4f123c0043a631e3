"""Decoding with the kNN-LM, the neighbours view and the Python API (tiny model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import LogitsProcessor, LogitsProcessorList

from knnlm.api import KNNLM
from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.errors import KNNLMError
from knnlm.evaluate import score_documents
from knnlm.generate import KNNLogitsProcessor, generate
from knnlm.interpolate import interpolate, knn_log_distribution, knn_log_prob, mix_log_distribution
from knnlm.neighbors import neighbors
from knnlm.retrieval import RetrievalConfig, Retriever

CTX, STRIDE = 64, 32


@pytest.fixture
def store(tiny_lm, tiny_model_dir, corpus_dir):
    """A datastore of the corpus files (exact index: too few keys for IVF-PQ)."""
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.2, glob="*.txt")
    return build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)


def _stored_document(store, corpus_dir) -> tuple[str, int]:
    """Text of the first document in the datastore, and its first key row."""
    name, start, _count, _first = store.documents[0]
    return (corpus_dir / name).read_text() if not name.startswith("/") else open(name).read(), start


def test_full_vocabulary_knn_matches_per_target():
    rng = np.random.default_rng(0)
    dists = rng.uniform(0, 5, size=(6, 20)).astype(np.float32)
    vals = rng.integers(0, 30, size=(6, 20)).astype(np.int32)
    vals[0, 5:] = -1  # missing neighbours never count
    dists[0, 5:] = np.inf
    full = knn_log_distribution(torch.from_numpy(dists), torch.from_numpy(vals), 30, 2.0).numpy()
    assert np.allclose(np.exp(full).sum(1), 1.0)
    for y in range(30):
        ref = knn_log_prob(dists, vals, np.full(6, y), 2.0)
        assert np.allclose(full[:, y], ref, atol=1e-12)


def test_sparse_mix_equals_dense_interpolation():
    """mix_log_distribution gives interpolate(p_LM, dense p_kNN, λ): repeated tokens, misses, λ 0 and 1."""
    rng = np.random.default_rng(1)
    b, k, v = 5, 40, 50
    lm = torch.log_softmax(torch.from_numpy(rng.normal(size=(b, v)) * 3), -1).numpy()
    dists = np.sort(rng.uniform(0, 9, size=(b, k)), 1).astype(np.float32)
    vals = rng.integers(0, 12, size=(b, k)).astype(np.int32)  # few tokens: many neighbours share one
    vals[1, 30:], dists[1, 30:] = -1, np.inf
    vals[2], dists[2] = -1, np.inf  # no neighbour at all: λ 0 keeps p_LM
    lam = np.array([0.3, 0.7, 0.0, 1.0, 0.0])
    got = mix_log_distribution(lm, dists, vals, lam, 2.5)
    dense = knn_log_distribution(dists, vals, v, 2.5).numpy()
    ref = interpolate(lm, dense, lam[:, None])
    assert got.shape == (b, v)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert np.allclose(got[fin], ref[fin], rtol=0, atol=1e-12)
    assert np.array_equal(got[[2, 4]], lm[[2, 4]])  # λ = 0: the LM's numbers exactly
    assert np.allclose(np.exp(got).sum(1), 1.0)
    # float32 p_LM (a decoding step's): float32 out, the same numbers to float32's precision
    lm32 = lm.astype(np.float32)
    got32 = mix_log_distribution(lm32, dists, vals, lam, 2.5)
    assert got32.dtype == np.float32 and np.array_equal(np.isneginf(got32), np.isneginf(ref))
    assert np.allclose(got32[fin], ref[fin], rtol=1e-6, atol=1e-6)
    assert np.array_equal(got32[[2, 4]], lm32[[2, 4]])
    # one row at a time (a decoding step: summed per token without np.unique): the same bits as in the batch,
    # and the accumulator it sums into is left zeroed
    import knnlm.interpolate as interpolate_mod

    for p_lm, batch in ((lm, got), (lm32, got32)):
        for i in range(b):
            alone = mix_log_distribution(p_lm[i:i + 1], dists[i:i + 1], vals[i:i + 1], lam[i:i + 1], 2.5)
            assert np.array_equal(alone, batch[i:i + 1])
    assert not interpolate_mod._SUMS.acc.any()


def test_processor_equals_eval_interpolation(store, tiny_lm):
    retriever = Retriever(store, RetrievalConfig(k=32, exact=True))
    name, text = store.heldout("test")[0]
    scores = score_documents(tiny_lm, retriever, [(name, text)], CTX, STRIDE)
    ids = tiny_lm.encode(text)
    lam, temp = 0.3, 2.0
    ref = interpolate(scores.lm_logp, knn_log_prob(scores.dists, scores.vals, scores.targets, temp), lam)
    with KNNLogitsProcessor(tiny_lm, retriever, lam, temp) as proc:
        mixed = []  # the dtype of the p_LM each mix is given
        mix = proc.combiner.distribution
        proc.combiner.distribution = lambda s, lm_logp, head=None: mixed.append(lm_logp.dtype) or mix(s, lm_logp, head)
        for p in (0, 7, 30, CTX - 2):  # positions the first window owns: the same context as eval
            x = torch.tensor([ids[: p + 1]])
            with torch.inference_mode():
                logits = tiny_lm.model(input_ids=x).logits[:, -1]  # the hook takes the query
            query = proc.seen()[0]
            mixed.clear()
            out = proc(x, logits)
            assert out.dtype == logits.dtype and mixed == [np.float32]
            # the call works in float32 (its scores' dtype): the float64 distribution to float32's precision
            full = proc.distribution(query, logits)
            assert full.dtype == torch.float64 and torch.allclose(out.double(), full, rtol=1e-6, atol=1e-6)
            assert torch.exp(out.double()).sum().item() == pytest.approx(1.0, abs=1e-5)
            j = int(np.flatnonzero(scores.pos == p + 1)[0])
            assert scores.targets[j] == ids[p + 1]
            assert out[0, ids[p + 1]].item() == pytest.approx(ref[j], abs=1e-4)


def test_greedy_with_lambda_zero_is_plain_generate(store, tiny_lm):
    retriever = Retriever(store, RetrievalConfig(k=32, exact=True))
    prompt = "def split(s):\n    "
    x = torch.tensor([tiny_lm.encode(prompt)])
    with torch.inference_mode():
        plain = tiny_lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                                       pad_token_id=0)[0, x.shape[1]:].tolist()
    ours = generate(tiny_lm, prompt, retriever, lam=0.0, max_new_tokens=20)
    assert ours.tokens == plain
    assert ours.retrieval_seconds > 0  # the processor did run


def test_lambda_near_one_continues_stored_text_verbatim(store, tiny_lm, corpus_dir):
    text, _ = _stored_document(store, corpus_dir)
    ids = tiny_lm.encode(text)
    n = next(n for n in range(16, 30) if tiny_lm.encode(tiny_lm.decode(ids[:n])) == ids[:n])
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    out = generate(tiny_lm, tiny_lm.decode(ids[:n]), retriever, lam=0.999, temperature=0.01,
                   max_new_tokens=CTX - n - 1)
    assert out.tokens == ids[n: n + len(out.tokens)]
    # The LM alone (random weights) does not know the text.
    alone = generate(tiny_lm, tiny_lm.decode(ids[:n]), None, max_new_tokens=CTX - n - 1)
    assert alone.tokens != out.tokens


def test_sampling_is_seeded(store, tiny_lm):
    retriever = Retriever(store, RetrievalConfig(k=32, exact=True))
    a = generate(tiny_lm, "import os\n", retriever, lam=0.5, temperature=1.0, max_new_tokens=15, sample=True, seed=3)
    b = generate(tiny_lm, "import os\n", retriever, lam=0.5, temperature=1.0, max_new_tokens=15, sample=True, seed=3)
    c = generate(tiny_lm, "import os\n", retriever, lam=0.5, temperature=1.0, max_new_tokens=15, sample=True, seed=4)
    assert a.tokens == b.tokens and len(a.tokens) == 15 and c.tokens != a.tokens


def test_sampling_leaves_the_callers_rng_alone(store, tiny_lm):
    retriever = Retriever(store, RetrievalConfig(k=32, exact=True))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(tiny_lm, "import os\n", retriever, lam=0.5, temperature=1.0, max_new_tokens=10, sample=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # and the draws do not depend on it
    b = generate(tiny_lm, "import os\n", retriever, lam=0.5, temperature=1.0, max_new_tokens=10, sample=True, seed=3)
    assert a.tokens == b.tokens


def _reencodable_prefix(lm, ids: list[int], at_least: int) -> int:
    """The first n >= at_least whose prefix ids[:n] survives decode → encode unchanged."""
    return next(n for n in range(at_least, at_least + 40) if lm.encode(lm.decode(ids[:n])) == ids[:n])


def _window_begin_reference(p: int, context: int, stride: int) -> int:
    """Begin of the window owning position p: the first window, else the first begin with p < begin + context."""
    return 0 if p < context else ((p - context) // stride + 1) * stride


@pytest.mark.parametrize("prompt_tokens", [20, 2 * CTX + 5])  # ends in the first window; starts past it
def test_generation_queries_are_the_stored_keys(store, tiny_lm, corpus_dir, monkeypatch, prompt_tokens):
    text, start = _stored_document(store, corpus_dir)
    ids = tiny_lm.encode(text)
    n, new = _reencodable_prefix(tiny_lm, ids, prompt_tokens), 3 * CTX
    assert n + new < store.documents[0][2]
    steps = []  # (position of the query, nearest row, its distance), one per step
    call = KNNLogitsProcessor.__call__

    def recording(self, input_ids, scores):
        out = call(self, input_ids, scores)
        steps.append((input_ids.shape[1] - 1, int(self.last["ids"][0, 0]), float(self.last["dists"][0, 0])))
        return out

    monkeypatch.setattr(KNNLogitsProcessor, "__call__", recording)
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    out = generate(tiny_lm, tiny_lm.decode(ids[:n]), retriever, lam=0.999, temperature=0.01, max_new_tokens=new)
    assert out.tokens == ids[n: n + new]  # it quotes the document, so positions stay aligned with it
    assert [p for p, _, _ in steps] == list(range(n - 1, n - 1 + new))
    for p, row, d in steps:  # every step, past the context too, finds its own stored key
        assert (row, p) == (start + p, p) and d < 1e-3, (p, d)


def test_lm_alone_decodes_in_the_given_windows(store, tiny_lm, corpus_dir):
    text, _ = _stored_document(store, corpus_dir)
    ids = tiny_lm.encode(text)
    n = _reencodable_prefix(tiny_lm, ids, CTX - 10)
    out = generate(tiny_lm, tiny_lm.decode(ids[:n]), None, max_new_tokens=2 * CTX, window=(CTX, STRIDE))
    seq = ids[:n] + out.tokens
    for p in range(n - 1, len(seq) - 1):  # each token is the argmax of a fresh forward over its window
        b = _window_begin_reference(p, CTX, STRIDE)
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=torch.tensor([seq[b: p + 1]])).logits[0, -1]
        assert int(logits.argmax()) == seq[p + 1], p
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    with pytest.raises(KNNLMError, match="differ from the datastore"):
        generate(tiny_lm, "import os", retriever, window=(CTX, STRIDE // 2))


def test_neighbors_of_a_stored_position_include_itself(store, tiny_lm, corpus_dir):
    text, start = _stored_document(store, corpus_dir)
    retriever = Retriever(store, RetrievalConfig(k=16, exact=True))
    ids = tiny_lm.encode(text)
    for p in (5, CTX + 10, 3 * CTX + 7):  # the first window and later ones
        r = neighbors(tiny_lm, retriever, text, position=p, top=5)
        first = r["neighbors"][0]
        assert first["row"] == start + p
        assert first["distance"] < 1e-3
        assert first["next_token"] == ids[p + 1] and first["is_target"]
        assert r["target"]["token"] == ids[p + 1]
        assert first["offset"] == p
        assert tiny_lm.decode(ids[: p + 1]).endswith(first["context"])
        assert [n["distance"] for n in r["neighbors"]] == sorted(n["distance"] for n in r["neighbors"])
        assert sum(t["prob"] for t in r["knn"]) <= 1 + 1e-9


def test_predictions_past_the_tokenizer_are_marked(tiny_lm):
    """An output layer with rows past the tokenizer's vocabulary (padding): those ids decode to nothing, so neighbors
    names them instead of showing an empty token."""
    from knnlm.neighbors import _top

    known = len(tiny_lm.tokenizer)
    logp = torch.full((known + 12,), -10.0, dtype=torch.float64)
    logp[known + 3], logp[5] = -0.1, -1.0
    top = _top(logp, 2, tiny_lm)
    assert [t["token"] for t in top] == [known + 3, 5]
    assert top[0]["text"] == f"<id {known + 3}: past the tokenizer's {known} tokens>"
    assert top[1]["text"] == tiny_lm.tokenizer.decode([5]) and top[1]["text"]
    assert tiny_lm.decode([5, known, 6]) == (f"{tiny_lm.tokenizer.decode([5])}<id {known}: past the tokenizer's "
                                             f"{known} tokens>{tiny_lm.tokenizer.decode([6])}")


def test_generated_ids_past_the_tokenizer_are_named_in_the_text(tiny_lm, monkeypatch):
    """A continuation naming an output row past the tokenizer's vocabulary shows it as a mark (before: the text left
    it out, silently); special tokens are still left out."""
    import knnlm.generate as gen

    known, eos = len(tiny_lm.tokenizer), tiny_lm.tokenizer.eos_token_id
    picked = [5, known + 3, 6] + ([eos] if eos is not None else [])
    monkeypatch.setattr(gen, "_decode", lambda lm, ids, *a, **k: ids.extend(picked) or list(picked))
    out = gen.generate(tiny_lm, "import os", None, max_new_tokens=len(picked))
    assert out.tokens == picked
    assert out.text == (f"{tiny_lm.tokenizer.decode([5])}<id {known + 3}: past the tokenizer's {known} tokens>"
                        f"{tiny_lm.tokenizer.decode([6])}")


def test_neighbors_bad_position(store, tiny_lm):
    retriever = Retriever(store, RetrievalConfig(k=4, exact=True))
    with pytest.raises(KNNLMError, match="outside the text"):
        neighbors(tiny_lm, retriever, "abc", position=50)
    with pytest.raises(KNNLMError, match="empty"):
        neighbors(tiny_lm, retriever, "")
    assert neighbors(tiny_lm, retriever, "import os", position=-1)["target"] is None


def test_api_object(store, tiny_lm, corpus_dir):
    knn = KNNLM.open("ds", lm=tiny_lm, retrieval=RetrievalConfig(k=16, exact=True))
    name, text = store.heldout("test")[0]
    r0 = knn.evaluate(text, lam=0)
    assert r0["knn_lm_ppl"] == r0["lm_ppl"]
    r = knn.evaluate([text, text], lam=0.5)
    assert r["tokens"] == 2 * r0["tokens"] and r["lm_ppl"] == pytest.approx(r0["lm_ppl"])
    x = torch.tensor([tiny_lm.encode("import os\n")])
    with knn.logits_processor(lam=0.25) as proc, torch.inference_mode():  # transformers' own decoding loop
        ref = tiny_lm.model.generate(x, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([proc]),
                                     max_new_tokens=5, do_sample=False, pad_token_id=0)[0, x.shape[1]:].tolist()
    assert knn.generate("import os\n", max_new_tokens=5) == tiny_lm.tokenizer.decode(ref, skip_special_tokens=True)
    doc, start = _stored_document(store, corpus_dir)
    assert knn.neighbors(doc, position=10, top=3)["neighbors"][0]["row"] == start + 10
    result = knn.tune()
    assert (store.path / "lambda.json").exists() and 0 <= result["lambda"] < 1
    tuned = knn.evaluate(text, lam="tuned")
    assert tuned["temperature"] == pytest.approx(result["temperature"])
    with knn.logits_processor(lam="tuned") as proc:
        assert proc.temperature == pytest.approx(result["temperature"])


def test_generate_and_neighbors_commands(store, tiny_lm, tiny_model_dir, corpus_dir):
    run = CliRunner().invoke
    r = run(cli, ["generate", "-d", "ds", "--prompt", "import os\n", "-n", "6", "--exact", "--json", "--compare"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = generate(tiny_lm, "import os\n", Retriever(store, RetrievalConfig(exact=True)), "0.25", None, 6)
    assert (out["tokens"], out["text"], out["search"]) == (ref.tokens, ref.text, "exact")
    x = torch.tensor([tiny_lm.encode("import os\n")])
    with torch.inference_mode():
        plain = tiny_lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                       pad_token_id=0)[0, x.shape[1]:]
    assert out["lm_text"] == tiny_lm.tokenizer.decode(plain, skip_special_tokens=True)
    r = run(cli, ["generate", "-d", "ds", "--prompt", "import os\n", "-n", "4", "--sample", "--seed", "1"])
    drawn = generate(tiny_lm, "import os\n", Retriever(store, RetrievalConfig()), "0.25", None, 4, True, 1)
    assert r.exit_code == 0 and r.stdout == "import os\n" + drawn.text + "\n"
    doc, start = _stored_document(store, corpus_dir)
    r = run(cli, ["neighbors", "-d", "ds", doc[:300], "--position", "20", "--top", "3", "--json", "--exact"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["neighbors"][0]["row"] == start + 20 and len(out["neighbors"]) == 3
    r = run(cli, ["neighbors", "-d", "ds", doc[:300], "--top", "3"])
    listed = json.loads(run(cli, ["neighbors", "-d", "ds", doc[:300], "--top", "3", "--json"]).stdout)
    assert r.exit_code == 0 and listed["position"] == listed["tokens"] - 1
    lines = [line for line in r.stdout.splitlines() if " @ token " in line]
    assert len(lines) == 3
    for line, n in zip(lines, listed["neighbors"]):  # rank, distance and offset of each neighbour, in order
        assert line.startswith(f"{n['rank']:>3}  d {n['distance']:<9.4g}") and f"@ token {n['offset']}" in line
    r = run(cli, ["neighbors", "-d", "ds", "abc", "--position", "99"])
    assert r.exit_code == 1 and "outside the text" in r.output
    r = run(cli, ["generate", "-d", "ds", "--prompt", "x", "--lambda", "adaptive"])
    assert r.exit_code == 1 and "tune-lambda" in r.output
    r = run(cli, ["generate", "-d", "nowhere", "--prompt", "x"])
    assert r.exit_code == 1


def test_every_generate_and_neighbors_flag_arrives(store, tiny_model_dir, monkeypatch):
    import knnlm.api as api
    import knnlm.cli.generate as cli_generate
    import knnlm.lm as lm_module

    seen = {}

    class Stop(Exception):
        pass

    def fake_generate(lm, prompt, retriever, lam, temperature, max_new_tokens, sample, seed, combine="mix",
                      skip_below=None, attention=None, memory=None):
        seen.update(lm=lm.name, prompt=prompt, cfg=retriever.cfg, lam=lam, t=temperature, n=max_new_tokens,
                    sample=sample, seed=seed, combine=combine, skip=skip_below)
        raise Stop

    def fake_neighbors(lm, retriever, text, position, top, temperature, k=None):
        seen.update(text=text, cfg=retriever.cfg, position=position, top=top, t=temperature, k=k)
        raise Stop

    real_load_lm = lm_module.load_lm

    def recording_load_lm(name, device, trust_remote_code):
        seen.update(load=(name, device, trust_remote_code))
        return real_load_lm(name, device, trust_remote_code)

    monkeypatch.setattr(cli_generate, "generate", fake_generate)
    monkeypatch.setattr(api, "neighbors", fake_neighbors)
    monkeypatch.setattr(lm_module, "load_lm", recording_load_lm)  # datastore_lm's

    def run(_cli, args, input=None):
        return CliRunner().invoke(_cli, [str(x) for x in args], input=input)

    r = run(cli, ["generate", "--datastore", "ds", "--prompt", "-", "--max-new-tokens", 7,
                  "--temperature", 3, "--sample", "--seed", 5, "--k", 9, "--no-rerank", "--exact",
                  "--model", str(tiny_model_dir), "--device", "cpu", "--trust-remote-code", "--combine", "spalm",
                  "--skip-below", "0.3"], input="hello")
    assert isinstance(r.exception, Stop), r.output
    assert (seen["prompt"], seen["lam"], seen["t"], seen["n"], seen["sample"], seen["seed"]) == \
        ("hello", "0.25", 3.0, 7, True, 5)
    assert (seen["combine"], seen["skip"]) == ("spalm", "0.3")
    assert (seen["cfg"].k, seen["cfg"].nprobe, seen["cfg"].rerank, seen["cfg"].exact) == (9, 8, False, True)
    assert seen["lm"] == str(tiny_model_dir) and seen["load"] == (str(tiny_model_dir), "cpu", True)
    r = run(cli, ["generate", "--datastore", "ds", "--prompt", "x", "--lambda", "0.7", "--model", str(tiny_model_dir)])
    assert isinstance(r.exception, Stop), r.output
    assert (seen["lam"], seen["combine"]) == ("0.7", "mix")
    r = run(cli, ["neighbors", "-d", "ds", "some text", "--position", -3, "--top", 4, "--temperature", 2,
                  "--k", 20, "--nprobe", 3, "--no-rerank", "--model", tiny_model_dir, "--device", "cpu"])
    assert isinstance(r.exception, Stop), r.output
    assert (seen["text"], seen["position"], seen["top"], seen["t"], seen["cfg"].k, seen["cfg"].nprobe) == \
        ("some text", -3, 4, 2.0, 20, 3)
    assert (seen["cfg"].exact, seen["cfg"].rerank) == (False, False)
    assert seen["load"] == (str(tiny_model_dir), "cpu", False)
    r = run(cli, ["neighbors", "-d", "ds", "some text", "--k", 5, "--model", tiny_model_dir])  # --k alone bounds --top
    assert isinstance(r.exception, Stop), r.output
    assert (seen["top"], seen["cfg"].k) == (5, 5)
    r = run(cli, ["neighbors", "-d", "ds", "some text", "--rerank"])  # the defaults, for contrast
    assert isinstance(r.exception, Stop), r.output
    assert (seen["cfg"].exact, seen["cfg"].rerank, seen["cfg"].k) == (False, True, 1000)
    assert seen["load"] == (str(tiny_model_dir), None, False)  # the datastore's model, default device


# The last check puts a NaN in the scores on purpose; numpy warns where it meets the mix.
@pytest.mark.filterwarnings("ignore:invalid value encountered in logaddexp:RuntimeWarning")
def test_processor_adaptive_lambda_missing_neighbours_and_masks(store, tiny_lm):
    from knnlm.combine import AdaptiveLambda

    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    choice = AdaptiveLambda((1.0,), (0.9, 0.1), 2.0, "test")  # near: 0.9, far: 0.1
    x = torch.tensor([tiny_lm.encode("import os\nimport sys\n")])
    with KNNLogitsProcessor(tiny_lm, retriever, choice, 2.0) as proc:
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=x).logits[:, -1]  # the hook takes the query
        q = proc.seen()[0]
        out = proc.distribution(q, logits)
        nearest = proc.last["dists"][0, 0]
        lam = 0.9 if nearest < 1.0 else 0.1
        knn = knn_log_distribution(torch.from_numpy(proc.last["dists"]), torch.from_numpy(proc.last["vals"]),
                                   logits.shape[-1], 2.0)
        ref = torch.log(lam * knn.exp() + (1 - lam) * torch.softmax(logits.double(), -1))
        assert torch.allclose(out, ref, atol=1e-9)
        # A query with no neighbour at all keeps the LM's distribution.
        proc.retriever = type("Nothing", (), {"k": 8, "neighbors": staticmethod(lambda qq, keep=None: (
            np.full((1, 8), np.inf, np.float32), np.full((1, 8), -1), np.full((1, 8), -1, np.int32)))})()
        alone = proc.distribution(q, logits)
        assert torch.allclose(alone, torch.log_softmax(logits.double(), -1))
        # Tokens an earlier processor removed stay removed.
        proc.retriever = retriever
        masked = logits.clone()
        masked[0, :5] = -math.inf
        with torch.inference_mode():
            tiny_lm.model(input_ids=x)  # each call takes the query of a forward pass
        assert torch.isinf(proc(x, masked)[0, :5]).all()
        masked[0, 7] = math.nan  # an earlier processor's NaN must not hide the removed tokens
        with torch.inference_mode():
            tiny_lm.model(input_ids=x)
        assert torch.isneginf(proc(x, masked)[0, :5]).all()


def test_decoding_asks_transformers_for_nothing_deprecated(tiny_lm, caplog):
    import logging

    getattr(logging.Logger, "warning_once", None) and logging.Logger.warning_once.cache_clear()  # once per process
    with caplog.at_level("WARNING"):
        generate(tiny_lm, "def f(x):\n", None, max_new_tokens=3)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the causal probe's hook, compiled
def test_a_processor_made_after_the_forward_was_compiled_names_the_compilation(store, tiny_model_dir):
    """Compiled code runs no forward hook added after it was compiled, so the processor sees no pass: it says so
    (before: it blamed assisted or prompt-lookup decoding). The eager backend compiles in seconds, with the same
    hook rule."""
    from knnlm.lm import load_lm

    lm = load_lm(str(tiny_model_dir), device="cpu")  # a copy of its own: its forward stays compiled
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    x = torch.tensor([lm.encode("import os\n")])
    lm.model.forward = torch.compile(lm.model.forward, backend="eager")
    lm.model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with KNNLogitsProcessor(lm, retriever, 0.5, 2.0) as p:
        with pytest.raises(KNNLMError, match="forward was compiled .* before the processor's hook was added"):
            lm.model.generate(x, logits_processor=LogitsProcessorList([p]), max_new_tokens=2, do_sample=False,
                              pad_token_id=0)


def test_processor_refuses_forward_passes_it_cannot_tell_from_the_steps(store, tiny_lm):
    """Classifier-free guidance runs a forward pass of its own; prompt lookup scores several positions in one pass;
    a closed processor takes no query (before: the first two used the wrong query, the last a stale one)."""
    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    ids = tiny_lm.encode("import os\nimport sys\nimport os\nimport sys\nimport os\n")
    x = torch.tensor([ids])
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p:
        with pytest.raises(KNNLMError, match="classifier-free guidance"):  # its pass over the negative prompt
            tiny_lm.model.generate(x, logits_processor=LogitsProcessorList([p]), max_new_tokens=4, do_sample=False,
                                   guidance_scale=1.5, negative_prompt_ids=torch.tensor([ids[:3]]), pad_token_id=0)
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p:
        with pytest.raises(KNNLMError, match="classifier-free guidance"):  # over the last token: at the second step
            tiny_lm.model.generate(x, logits_processor=LogitsProcessorList([p]), max_new_tokens=4, do_sample=False,
                                   guidance_scale=1.5, pad_token_id=0)
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p:
        with pytest.raises(KNNLMError, match="prompt-lookup"):
            tiny_lm.model.generate(x, logits_processor=LogitsProcessorList([p]), max_new_tokens=8, do_sample=False,
                                   prompt_lookup_num_tokens=3, pad_token_id=0)
    p = KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0)
    with torch.inference_mode():
        logits = tiny_lm.model(input_ids=x).logits[:, -1]
    p.close()
    with pytest.raises(KNNLMError, match="is closed"):
        p(x, logits)
    # a processor of the user's, before ours, that runs the model on other text at the first step (before: its pass's
    # query was taken for the step's, silently); a prefill in chunks, the last ending where the step does, is not
    class Side(LogitsProcessor):
        def __init__(self, side):
            self.side = torch.tensor([side])

        def __call__(self, input_ids, scores):
            tiny_lm.forward(self.side, torch.ones_like(self.side))
            return scores

    other = ids[2:5] + ids[-1:]  # other text ending in the prompt's last token (a newline, as most prompts)
    assert other != ids[-4:]
    for side in (ids[:7], other):
        with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p:
            with pytest.raises(KNNLMError, match="before its first step, the last of other tokens than the step's"):
                tiny_lm.model.generate(x, logits_processor=LogitsProcessorList([Side(side), p]), max_new_tokens=1,
                                       do_sample=False, pad_token_id=0)
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p, KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) \
            as whole, torch.inference_mode():
        out = tiny_lm.model(input_ids=x[:, :5], use_cache=True)
        named = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5
        logits = tiny_lm.model(input_ids=x[:, 5:], **{named: out[named]}).logits[:, -1]
        chunked = p(x, logits)
        p.close()
        assert torch.allclose(chunked, whole(x, tiny_lm.model(input_ids=x).logits[:, -1]), atol=1e-5)
    # the plain case, one forward pass a step, as the processor's own distribution
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0) as p:
        out = tiny_lm.model.generate(x, logits_processor=LogitsProcessorList([p]), max_new_tokens=3, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        with torch.inference_mode():
            first = tiny_lm.model(input_ids=x)
        want = p.distribution(p.take_query(x)[0], first.logits[:, -1], dtype=torch.float32)
    assert torch.allclose(out.scores[0].double(), want.double(), atol=1e-6)


def test_document_memory_of_one_prompt_refuses_another(store, tiny_lm):
    from knnlm.memory.document import prompt_memory

    retriever = Retriever(store, RetrievalConfig(k=8, exact=True))
    a, b = tiny_lm.encode("import os\nimport sys\n"), tiny_lm.encode("def f(x):\n    return")
    memory = prompt_memory(tiny_lm, a, CTX, STRIDE, 16)
    with KNNLogitsProcessor(tiny_lm, retriever, 0.5, 2.0, memory=memory) as p:
        for rows in ([a], [a + [5]]):  # a prompt and its next step
            x = torch.tensor(rows)
            with torch.inference_mode():
                p(x, tiny_lm.model(input_ids=x).logits[:, -1])
        x = torch.tensor([b])
        with torch.inference_mode():
            logits = tiny_lm.model(input_ids=x).logits[:, -1]
        with pytest.raises(KNNLMError, match="another prompt"):
            p(x, logits)
