"""The mixing policies: the learned λ gate, retrieval skipping and SPALM, against exact identities
and brute-force references, on a datastore of the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.combine import FixedLambda, GateLambda, SpalmMix, resolve_combiner, save_lambda
from knnlm.combine.features import POST_FEATURES, knn_value_stats, lm_stats, post_features, pre_features
from knnlm.combine.gate import GateConfig, LambdaGate, fit_gate, mix_nll
from knnlm.combine.spalm import SpalmGate, memory_vectors, nll_grid, spalm_log_probs
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.generate import KNNLogitsProcessor
from knnlm.interpolate import knn_log_prob
from knnlm.lm import LM, QueryHook
from knnlm.datastore import foreign_entries
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.scores import load_scores, save_scores
from knnlm.tune import TuneConfig, _KnnCache, _Mixing, split_tokens, tune

CTX, STRIDE = 64, 32
FAST = TuneConfig(temperatures=(0.3, 1.0, 3.0, 10.0), bins=4, gate_config=GateConfig(steps=40), spalm_grid=9)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""
    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def _build(root, tiny_lm, tiny_model_dir, corpus_texts):
    """A datastore of the corpus files (1 dev, 1 test held out), exact index."""
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in corpus_texts.items():
        (corpus / f"{name}.txt").write_text(text)
    cfg = BuildConfig(model=str(tiny_model_dir), context=CTX, stride=STRIDE, holdout=0.2, glob="*.txt")
    return build_datastore(str(corpus), root / "ds", cfg, lm=tiny_lm)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm, tiny_model_dir, corpus_texts):
    """One datastore for the module, tuned once by `tuned` (tests that change its files build their own)."""
    return _build(tmp_path_factory.mktemp("combine"), tiny_lm, tiny_model_dir, corpus_texts)


@pytest.fixture
def fresh_store(tmp_path, tiny_lm, tiny_model_dir, corpus_texts):
    """A datastore of this test's own."""
    return _build(tmp_path, tiny_lm, tiny_model_dir, corpus_texts)


@pytest.fixture(scope="module")
def dev(store, tiny_lm):
    """Scores of the dev part with k = 50 and every feature."""
    cfg = EvalConfig(lam="0", temperature=1.0, retrieval=RetrievalConfig(k=50), keep_features=True)
    return run_eval(store, cfg=cfg, lm=tiny_lm, split="dev")[1]


@pytest.fixture(scope="module")
def tuned(store, tiny_lm, dev):
    """The datastore tuned with every policy (quick training settings)."""
    result = tune(dev, FAST, "dev", head=tiny_lm.model.get_output_embeddings())
    tensors = result.pop("tensors")
    save_lambda(store.path, result, tensors)
    return result, tensors


def test_scores_carry_the_features_and_round_trip(dev, tmp_path):
    assert dev.queries.shape == (len(dev), 32) and dev.queries.dtype == np.float32
    assert np.all(dev.lm_max >= dev.lm_second) and np.all(dev.lm_entropy >= 0) and dev.searched.all()
    save_scores(str(tmp_path / "s.h5"), dev)
    back = load_scores(str(tmp_path / "s.h5"))
    assert np.array_equal(back.queries, dev.queries.astype(np.float16).astype(np.float32))
    for name in ("targets", "lm_logp", "dists", "vals", "lm_entropy", "lm_max", "lm_second", "lm_argmax", "searched"):
        assert np.array_equal(getattr(back, name), getattr(dev, name)), name


@pytest.mark.parametrize("dtype,owned", [(torch.float32, True), (torch.float64, True), (torch.float32, False),
                                         (torch.bfloat16, True), (torch.bfloat16, False)])
def test_lm_stats_match_torch_references_and_leave_logp_alone(dtype, owned):
    """Against torch.topk and the entropy's definition, with a zero-probability token (0·log 0 counts as 0) and a
    tie for the top (the owned path names the first); logp is as it was afterwards."""
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(37, 1000, dtype=torch.float64, generator=gen) * 4, dim=-1).to(dtype)
    logp[3, 17] = float("-inf")
    logp[5, 40] = logp[5, 900] = logp[5].max() + 0.5
    before = logp.clone()
    got = lm_stats(logp, owned=owned)
    assert torch.equal(logp, before)
    top = torch.topk(logp, 2, dim=-1)
    p = logp.double().exp()
    entropy = -(torch.where(p > 0, p * logp.double(), torch.zeros_like(p))).sum(-1)
    assert got["lm_argmax"].dtype == np.int32 and got["lm_argmax"][5] in (40, 900)
    if owned and dtype != torch.bfloat16:
        assert np.array_equal(got["lm_argmax"], logp.numpy().argmax(axis=1)) and got["lm_argmax"][5] == 40
    else:
        assert np.array_equal(got["lm_argmax"], top.indices[:, 0].numpy())
    assert np.array_equal(got["lm_max"], top.values[:, 0].float().numpy())
    assert np.array_equal(got["lm_second"], top.values[:, 1].float().numpy()) and got["lm_second"][5] == got["lm_max"][5]
    tol = dict(rtol=0.05, atol=0.05) if dtype == torch.bfloat16 else dict(rtol=1e-5)  # bf16 sums in bf16
    assert np.allclose(got["lm_entropy"], entropy.numpy(), **tol) and np.isfinite(got["lm_entropy"]).all()


def test_old_or_incomplete_scores_files_are_refused(dev, tmp_path):
    import h5py

    path = tmp_path / "s.h5"
    save_scores(str(path), dev)
    with h5py.File(path, "a") as f:
        f.attrs["format"] = 1
    with pytest.raises(KNNLMError, match=r"format 1, made by an older knnlm.*write it again"):
        load_scores(str(path))
    with pytest.raises(KNNLMError, match=r"s.h5 already exists; pass --overwrite"):
        save_scores(str(path), dev)  # nothing replaced unasked
    save_scores(str(path), dev, overwrite=True)
    with h5py.File(path, "a") as f:
        del f["dist"]
    with pytest.raises(KNNLMError, match=r"lacks the dataset\(s\) dist; write it again"):
        load_scores(str(path))


@pytest.mark.parametrize("dtype", [np.int64, np.int32])  # int32: token ids sort as narrow keys (row_order)
def test_knn_value_stats_match_a_dense_reference(dtype):
    rng = np.random.default_rng(0)
    dists = np.sort(rng.uniform(0, 5, (40, 12)), axis=1)
    vals = rng.integers(0, 6, (40, 12))
    vals[3] = vals[4] = -1  # no neighbour at all, twice in a row: segments must not run across rows
    vals[5, 7:] = -1
    vals[10], vals[11] = [4] * 12, [4] + [5] * 11  # a token ending one row and starting the next
    vals[12], dists[12] = [2, 1, 2, 1] + [-1] * 8, [1.0] * 4 + [np.inf] * 8  # a tie: tokens 1 and 2 weigh the same
    dists[vals < 0] = np.inf
    got = knn_value_stats(dists, vals.astype(dtype), 2.0)
    assert got["distinct"].dtype == np.int32 and got["knn_argmax"].dtype == np.int32
    assert got["knn_argmax"][12] == 1  # ties go to the smallest token
    for i in range(40):
        p = np.zeros(6)
        ok = vals[i] >= 0
        w = np.exp(-dists[i][ok] / 2.0)
        np.add.at(p, vals[i][ok], w / w.sum() if ok.any() else w)
        assert got["distinct"][i] == len(set(vals[i][ok].tolist()))
        nz = p[p > 0]
        want = -(nz * np.log(nz)).sum() if ok.any() else np.inf
        assert got["knn_entropy"][i] == pytest.approx(want, abs=1e-12)
        assert got["knn_argmax"][i] == (np.argmax(p) if ok.any() else -1)


@pytest.mark.parametrize("d", [np.inf, np.nan], ids=["inf", "nan"])
def test_knn_value_stats_of_neighbours_that_weigh_nothing(d):
    """Neighbours present but every distance inf or nan (a query that overflowed): no crash, even on one row."""
    for rows in (1, 5):
        got = knn_value_stats(np.full((rows, 3), d), np.tile([7, 3, 7], (rows, 1)), 1.0)
        assert list(got["distinct"]) == [2] * rows and list(got["knn_argmax"]) == [3] * rows
        assert list(got["knn_entropy"]) == [0.0] * rows
    q = np.zeros((1, 4), np.float32)
    lm = {"lm_entropy": np.ones(1), "lm_max": np.zeros(1), "lm_second": -np.ones(1), "lm_argmax": np.array([3])}
    assert post_features(q, lm, np.array([[d, 1.0]]), np.array([[5, 6]]), 1.0).shape == (1, len(POST_FEATURES))


def test_features_and_knn_log_probs_in_blocks_equal_one_row_at_a_time():
    """post_features and knn_log_prob work MIX_BLOCK_ROWS rows at a time: the same numbers as row by row."""
    from knnlm.interpolate import MIX_BLOCK_ROWS

    rng = np.random.default_rng(5)
    n = 2 * MIX_BLOCK_ROWS + 3
    dists = np.sort(rng.uniform(0, 50, (n, 30)), axis=1).astype(np.float32)
    vals = rng.integers(0, 9, (n, 30)).astype(np.int32)
    vals[MIX_BLOCK_ROWS - 1] = -1  # a row without neighbours at a block's end
    dists[vals < 0] = np.inf
    q = rng.normal(size=(n, 8)).astype(np.float32)
    lm = {"lm_entropy": rng.uniform(0, 5, n), "lm_max": -rng.uniform(0, 1, n), "lm_second": -rng.uniform(1, 2, n),
          "lm_argmax": rng.integers(0, 9, n).astype(np.int32)}
    got = post_features(q, lm, dists, vals, 3.0)
    one = np.concatenate([post_features(q[i:i + 1], {k: v[i:i + 1] for k, v in lm.items()}, dists[i:i + 1],
                                        vals[i:i + 1], 3.0) for i in range(n)])
    assert got.shape == (n, len(POST_FEATURES)) and np.array_equal(got, one)
    targets = rng.integers(0, 9, n)
    row_by_row = np.concatenate([knn_log_prob(dists[i:i + 1], vals[i:i + 1], targets[i:i + 1], 3.0) for i in range(n)])
    assert np.array_equal(knn_log_prob(dists, vals, targets, 3.0), row_by_row)
    empty = post_features(q[:0], {k: v[:0] for k, v in lm.items()}, dists[:0], vals[:0], 3.0)
    assert empty.shape == (0, len(POST_FEATURES))


def test_a_constant_gate_is_exactly_a_fixed_lambda(dev):
    gate = LambdaGate(len(POST_FEATURES), dev.queries.shape[1], rank=4, hidden=0)
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.net.bias.fill_(-1.2)
    gated = GateLambda(gate, True, 3.0, "test")
    lam = gated.lambdas(dev)
    assert np.all(lam == lam[0]) and 0 < lam[0] < 1
    assert np.array_equal(gated.target_log_probs(dev), FixedLambda(lam[0], 3.0, "test").target_log_probs(dev))


def test_gate_loss_gradient():
    torch.manual_seed(0)
    gate = LambdaGate(5, 7, rank=3, hidden=4)
    feats, keys = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 7, dtype=torch.float64)
    lm, knn = -torch.rand(20, dtype=torch.float64) * 5, -torch.rand(20, dtype=torch.float64) * 5
    knn[3] = -torch.inf  # a kNN miss must keep the gradient finite
    gate.standardise_from(feats, keys)
    names = [name for name, _ in gate.named_parameters()]

    def loss(*ps):
        logit = torch.func.functional_call(gate, dict(zip(names, ps)), (feats, keys))
        return mix_nll(logit, lm, knn)

    start = tuple(p.detach().clone().requires_grad_(True) for p in gate.parameters())
    assert torch.autograd.gradcheck(loss, start)
    # and against the closed form d/ds of -log(σ(s)a + (1-σ(s))b) at one token
    s = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    a, b = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    mix_nll(s, b, a).backward()
    sig = 1 / (1 + np.exp(-0.3))
    pa, pb = np.exp(-1.0), np.exp(-2.0)
    assert s.grad.item() == pytest.approx(-(sig * (1 - sig) * (pa - pb)) / (sig * pa + (1 - sig) * pb), rel=1e-10)


@pytest.mark.slow
def test_the_gate_never_sees_a_heldout_token(dev, tiny_lm):
    cfg = FAST
    fit, held = split_tokens(len(dev), cfg.heldout_fraction, cfg.seed)
    poisoned = dev.subset(np.arange(len(dev)))
    rng = np.random.default_rng(1)
    poisoned.lm_logp[held] = rng.uniform(-20, 0, held.size)
    poisoned.queries[held] = rng.normal(0, 9, poisoned.queries[held].shape)
    poisoned.dists[held] = np.sort(rng.uniform(0, 1e3, poisoned.dists[held].shape), axis=1)
    poisoned.targets[held] = rng.integers(0, 50, held.size)
    head = tiny_lm.model.get_output_embeddings()
    fitted = [_Mixing(s, _KnnCache(s), cfg, head).fit(fit, 2.0) for s in (dev, poisoned)]
    for name in ("pre", "post", "spalm"):
        a, b = fitted[0][name].state_dict(), fitted[1][name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert fitted[0]["skip_below"] == fitted[1]["skip_below"]
    # and through tune() itself: what it chose on the fitting half does not move
    a, b = (tune(s, cfg, "dev", head=head)["heldout"] for s in (dev, poisoned))
    assert a["gate_temperature"] == b["gate_temperature"] and a["fixed"] == b["fixed"]
    assert a["skip"]["threshold"] == b["skip"]["threshold"] and a["adaptive"] == b["adaptive"]
    assert a["gate_ppl"] != b["gate_ppl"]  # the held-out half itself did change


def test_gate_learns_where_the_memory_helps():
    """Synthetic: the kNN is right exactly where the LM is unsure; the gate must find that."""
    rng = np.random.default_rng(0)
    n = 4000
    entropy = rng.uniform(0, 4, n)
    helps = entropy > 2
    lm = np.where(helps, -4.0, -0.5)
    knn = np.where(helps, -0.2, -6.0)
    feats = np.stack([entropy, -entropy, rng.normal(size=n), rng.normal(size=n)], axis=1)
    gate = fit_gate(feats, rng.normal(size=(n, 3)), lm, knn, GateConfig(steps=300, rank=0))
    lam = gate.lambdas(feats, np.zeros((n, 3)))
    assert lam[helps].mean() > 0.8 and lam[~helps].mean() < 0.2


def test_tune_fits_and_stores_every_policy(store, tuned, dev):
    result, tensors = tuned
    h = result["heldout"]
    for key in ("fixed_ppl", "adaptive_ppl", "gate_pre_ppl", "gate_ppl", "spalm_ppl"):
        assert np.isfinite(h[key]) and h[key] > 1, key
    assert 0 <= h["skip"]["skipped"] < 1 and h["skip_curve"][0] == {**h["skip_curve"][0], "threshold": 0.0,
                                                                      "skipped": 0.0}
    saved = strict_json((store.path / "lambda.json").read_text())
    assert saved["gate"]["pre"]["shape"]["n_features"] == 4 and saved["spalm"]["dim"] == 32
    assert (store.path / "mixing.safetensors").is_file() and foreign_entries(store.path) == []
    # the stored gates load back to identical outputs
    for word, which in (("gate", "post"), ("gate-pre", "pre")):
        loaded = resolve_combiner(word, store.path)
        t = result["gate"]["temperature"]
        feats = post_features(dev.queries, dev.lm_stats(), dev.dists, dev.vals, t) if which == "post" \
            else pre_features(dev.queries, dev.lm_stats())
        from knnlm.combine.gate import gate_from_tensors
        original = gate_from_tensors(tensors, f"gate.{which}", result["gate"][which]["shape"])
        assert np.array_equal(loaded.lambdas(dev), original.lambdas(feats, dev.queries))
        assert loaded.temperature == t


def test_threshold_zero_is_no_skipping_bit_for_bit(store, tiny_lm, tuned):
    rc = RetrievalConfig(k=50)
    plain, s0 = run_eval(store, cfg=EvalConfig(lam="gate", retrieval=rc), lm=tiny_lm)
    zero, s1 = run_eval(store, cfg=EvalConfig(lam="gate", retrieval=rc, skip_below="0"), lm=tiny_lm)
    assert zero["knn_lm_ppl"] == plain["knn_lm_ppl"] and zero["searches_skipped"] == 0.0
    assert np.array_equal(s0.dists, s1.dists) and np.array_equal(s0.vals, s1.vals)


def test_skipped_tokens_keep_the_lm_and_are_not_searched(store, tiny_lm, tuned):
    rc = RetrievalConfig(k=50)
    r, s = run_eval(store, cfg=EvalConfig(lam="0.5", retrieval=rc, skip_below="0.5"), lm=tiny_lm)
    skipped = ~s.searched
    assert 0 < skipped.mean() < 1 and r["searches_skipped"] == pytest.approx(skipped.mean())
    assert np.all(s.vals[skipped] == -1) and np.all(np.isinf(s.dists[skipped]))
    comb = resolve_combiner("0.5", store.path, skip_below="0.5")
    assert np.array_equal(comb.target_log_probs(s)[skipped], s.lm_logp[skipped])
    # the searched ones are exactly what a full search gives them
    full = run_eval(store, cfg=EvalConfig(lam="0.5", retrieval=rc), lm=tiny_lm)[1]
    assert np.array_equal(full.dists[~skipped], s.dists[~skipped])


def test_spalm_memory_matches_numpy_and_g_one_is_the_lm(dev, tiny_lm):
    head = tiny_lm.model.get_output_embeddings()
    E = head.weight.detach().numpy().astype(np.float64)
    h = torch.as_tensor(dev.queries[:30])
    vals = dev.vals[:30].copy()
    vals[2] = -1  # no neighbour: m = h
    vals[4, 10:] = -1
    m = memory_vectors(h, vals, head.weight).numpy()
    for t in range(30):
        ok = vals[t] >= 0
        if not ok.any():
            ref = dev.queries[t]
        else:
            e = E[vals[t][ok]]  # (k', d)
            s = e @ dev.queries[t].astype(np.float64)
            w = np.exp(s - s.max())
            ref = (w / w.sum()) @ e
        assert np.allclose(m[t], ref, rtol=1e-4, atol=1e-5), t
    with torch.no_grad():
        g1 = spalm_log_probs(h, vals, head, torch.ones(30))
        assert torch.equal(g1, torch.log_softmax(head(h), dim=-1))
    gate = SpalmGate(32)
    with torch.no_grad():
        gate.linear.bias.fill_(torch.inf)  # g ≡ 1
    logp = SpalmMix(gate, 1.0, "test").target_log_probs(dev, head)
    assert np.allclose(logp, dev.lm_logp, atol=1e-5, rtol=0)


def _after_head(kind: str, tokenizer) -> LM:
    """A seeded 2-layer model that changes its logits after lm_head: Gemma 2 caps them (3 · tanh(x / 3), below the
    raw scores' reach), Cohere scales them by 0.25, Granite divides them by 4."""
    import transformers

    torch.manual_seed(0)
    size = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    name, settings = {
        "gemma2": ("Gemma2", dict(head_dim=8, final_logit_softcapping=3.0)),
        "cohere": ("Cohere", dict(logit_scale=0.25, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
        "granite": ("Granite", dict(logits_scaling=4.0)),
    }[kind]
    config = getattr(transformers, f"{name}Config")(**size, **settings)
    model = getattr(transformers, f"{name}ForCausalLM")._from_config(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)  # raw scores of several units: the cap and scales bite
    return LM(model=model, tokenizer=tokenizer, name=kind, device="cpu")


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_spalm_projects_through_what_the_model_does_after_its_head(kind, tiny_lm, corpus_texts):
    """SPALM at g = 1 is the model's own distribution, soft-capped or scaled as the model does it, in its mixing
    and in the table tuning fits on; the bare lm_head is far from it."""
    lm = _after_head(kind, tiny_lm.tokenizer)
    ids = torch.tensor([lm.encode(corpus_texts["textwrap.py"])[:64]])
    keys, logits = lm.forward(ids, torch.ones_like(ids))
    h, want = keys[0], torch.log_softmax(logits[0], dim=-1)
    assert float((torch.log_softmax(lm.model.get_output_embeddings()(h), -1) - want).abs().max()) > 0.5
    no_neighbours = -np.ones((len(h), 4), np.int64)  # m = h: any g gives p_LM
    with torch.no_grad():
        got = spalm_log_probs(h, no_neighbours, lm.output_head, torch.ones(len(h)))
    assert float((got - want).abs().max()) < 1e-5
    targets = ids[0, 1:].numpy()
    table = nll_grid(h[:-1].numpy(), no_neighbours[:-1], targets, lm.output_head, np.linspace(0, 1, 3))
    assert np.allclose(table, -want[:-1].gather(1, torch.as_tensor(targets)[:, None]).numpy(), atol=1e-5)


def test_spalm_refuses_a_model_whose_logits_it_cannot_follow(tiny_model_dir):
    """A model that changes its logits in a way its config does not name (here a hook doubling them): SPALM is
    refused in one sentence, at its first use, and the head is not taken for checked."""
    from knnlm.lm import load_lm

    lm = load_lm(str(tiny_model_dir), device="cpu")

    def double(_module, _args, out):
        out.logits = out.logits * 2
        return out

    handle = lm.model.register_forward_hook(double)
    try:
        for _ in range(2):
            with pytest.raises(KNNLMError, match=r"^Model .* in a way knnlm cannot follow .* leave SPALM out "
                                                 r"\(--combine mix; tune-lambda --no-spalm\)\.$"):
                lm.output_head.check()
    finally:
        handle.remove()
    lm.output_head.check()  # the model as it is: its own lm_head, nothing after
    assert (lm.output_head.scale, lm.output_head.softcap) == (1.0, None)


def test_spalm_refuses_a_model_that_masks_logits_after_its_head(tiny_model_dir):
    """Logits the model sets to −inf after its lm_head (a mask SPALM's projection would not make) are a mismatch,
    not a tolerance made infinite."""
    from knnlm.lm import load_lm

    lm = load_lm(str(tiny_model_dir), device="cpu")

    def mask(_module, _args, out):
        out.logits[..., :5] = -torch.inf
        return out

    handle = lm.model.register_forward_hook(mask)
    try:
        with pytest.raises(KNNLMError, match="in a way knnlm cannot follow"):
            lm.output_head.check()
    finally:
        handle.remove()


def test_spalm_checks_its_head_before_any_forward_pass_is_read(store, tuned, tiny_model_dir, corpus_texts,
                                                               monkeypatch):
    """On a model loaded afresh the head's probe is a forward pass of its own: a SPALM processor runs it before its
    hook reads the model's passes (else generation saw three passes for one step), and eval refuses a model it
    cannot follow before scoring anything."""
    import knnlm.evaluate
    from knnlm.generate import generate
    from knnlm.lm import load_lm

    fresh = load_lm(str(tiny_model_dir), device="cpu")
    prompt = corpus_texts["textwrap.py"][:300]
    with KNNLogitsProcessor(fresh, Retriever(store), combine="spalm"):
        pass
    assert fresh.output_head.checked
    out = generate(load_lm(str(tiny_model_dir), device="cpu"), prompt, Retriever(store), combine="spalm",
                   max_new_tokens=4)
    assert len(out.tokens) == 4
    odd = load_lm(str(tiny_model_dir), device="cpu")
    odd.model.register_forward_hook(lambda _m, _a, out: setattr(out, "logits", out.logits * 2) or out)

    def never(*_args, **_kwargs):
        raise AssertionError("scored before the head was checked")

    monkeypatch.setattr(knnlm.evaluate, "score_documents", never)
    with pytest.raises(KNNLMError, match="in a way knnlm cannot follow"):
        run_eval(store, None, EvalConfig(combine="spalm"), lm=odd)


def test_eval_and_api_with_gate_spalm_and_tuned_skip(store, tiny_lm, tuned):
    from knnlm.api import KNNLM

    knn = KNNLM.open(store.path, lm=tiny_lm, retrieval=RetrievalConfig(k=50))
    text = store.heldout("test")[0][1][:1500]
    base = knn.evaluate(text, lam=0)
    assert "lm_entropy" not in base and knn.evaluate(text, lam=0.3)["lm_ppl"] == base["lm_ppl"]
    for kw in ({"lam": "gate"}, {"lam": "gate-pre"}, {"combine": "spalm"}, {"lam": "gate", "skip_below": "tuned"}):
        r = knn.evaluate(text, **kw)
        assert np.isfinite(r["knn_lm_ppl"]) and r["lm_ppl"] == base["lm_ppl"], kw
        assert r["knn_lm_ppl"] < 1.5 * r["lm_ppl"], kw
    # the gate's perplexity against a numpy mix of a brute-force p_kNN with the stored gate's λ
    cfg = EvalConfig(lam="gate", retrieval=knn.retriever.cfg)
    r, s = run_eval(store, cfg=cfg, lm=tiny_lm, documents=[("t", text)])
    comb = resolve_combiner("gate", store.path)
    lam = comb.lambdas(s)
    ref = []
    for i in range(len(s)):
        ok = s.vals[i] >= 0
        w = np.exp(-(s.dists[i][ok].astype(np.float64) - s.dists[i][ok].min()) / comb.temperature)
        p_knn = w[s.vals[i][ok] == s.targets[i]].sum() / w.sum()
        ref.append(np.log(lam[i] * p_knn + (1 - lam[i]) * np.exp(s.lm_logp[i])))
    assert r["knn_lm_ppl"] == pytest.approx(np.exp(-np.mean(ref)), rel=1e-9)
    assert knn.evaluate(text, lam="gate", skip_below=1.0)["searches_skipped"] == 1.0
    # skipping every search leaves the LM alone, step for step
    from knnlm.generate import generate
    window = (store.meta["context"], store.meta["stride"])
    alone = generate(tiny_lm, "def f(", None, 0.0, None, 12, window=window).text
    assert knn.generate("def f(", max_new_tokens=12, lam="gate", skip_below=1.0) == alone


def test_processor_with_gate_skip_and_spalm_gives_distributions(store, tiny_lm, tuned):
    retriever = Retriever(store, RetrievalConfig(k=50))
    q = torch.as_tensor(load_queries(store, tiny_lm))
    logits = tiny_lm.model.get_output_embeddings()(q)
    for kw in ({"lam": "gate", "skip_below": "0.5"}, {"combine": "spalm"}):
        with KNNLogitsProcessor(tiny_lm, retriever, **kw) as p:
            out = p.distribution(q, logits)
        assert torch.allclose(out.exp().sum(-1), torch.ones(len(q), dtype=torch.float64), atol=1e-6)
        if "skip_below" in kw:
            skipped = ~p.last["searched"]
            assert skipped.any() and p.skipped == skipped.sum()
            lm = torch.log_softmax(logits.double(), -1)
            assert torch.allclose(out[skipped], lm[skipped], atol=1e-6)
        else:  # SPALM against numpy: softmax(W((1 − g)·m + g·h)), m from the neighbours' embeddings
            W = tiny_lm.model.get_output_embeddings().weight.detach().numpy().astype(np.float64)
            with torch.no_grad():
                g = p.combiner.gate(q).numpy()
            for i in range(len(q)):
                h = q[i].numpy().astype(np.float64)
                e = W[p.last["vals"][i][p.last["vals"][i] >= 0]]
                a = e @ h
                m = (np.exp(a - a.max()) / np.exp(a - a.max()).sum()) @ e
                z = W @ ((1 - g[i]) * m + g[i] * h)
                want = z - z.max() - np.log(np.exp(z - z.max()).sum())
                assert np.allclose(out[i].numpy(), want, atol=1e-4), i


def load_queries(store, lm) -> np.ndarray:
    """Eight stored keys (they are queries of stored positions)."""
    return np.asarray(store.keys[:8], np.float32)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def _sentence(result, *words):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error: ") and "Traceback" not in result.output
    for w in words:
        assert w in msg, msg


def test_untuned_datastore_refuses_gate_spalm_and_tuned_skip(fresh_store, tiny_model_dir):
    store = fresh_store
    common = ["eval", "--datastore", store.path, "--model", tiny_model_dir]
    _sentence(run(*common, "--lambda", "gate"), "never tuned", "tune-lambda")
    _sentence(run(*common, "--combine", "spalm"), "never tuned", "--combine spalm", "or pass --combine mix")
    _sentence(run(*common, "--skip-below", "tuned"), "never tuned", "--skip-below tuned", "or leave out --skip-below")
    _sentence(run(*common, "--skip-below", "2"), "--skip-below must be a number in [0, 1]")
    # tuned without the gate and SPALM: each asks for its own refit
    r = run("tune-lambda", "--datastore", store.path, "--model", tiny_model_dir, "--k", 50, "--no-gate",
            "--no-spalm", "--no-plot", "--json")
    assert r.exit_code == 0, r.output
    out = strict_json(r.stdout)
    assert out["gate"] is None and out["spalm"] is None and "tensors" not in out
    _sentence(run(*common, "--lambda", "gate"), "no learned gate", "tune-lambda")
    _sentence(run(*common, "--combine", "spalm"), "no SPALM gate")
    _sentence(run(*common, "--skip-below", "tuned"), "no tuned skip threshold")


@pytest.mark.slow
def test_cli_tune_then_eval_every_policy(fresh_store, tiny_model_dir):
    store = fresh_store
    r = run("tune-lambda", "--datastore", store.path, "--model", tiny_model_dir, "--k", 50, "--no-plot")
    assert r.exit_code == 0, r.output
    for row in ("gate, before search", "gate, after search", "gate + skip", "SPALM"):
        assert row in r.output
    common = ["eval", "--datastore", store.path, "--model", tiny_model_dir, "--k", 50, "--json"]
    for extra in (["--lambda", "gate"], ["--combine", "spalm"], ["--lambda", "gate", "--skip-below", "tuned"]):
        r = run(*common, *extra)
        assert r.exit_code == 0, r.output
        out = strict_json(r.stdout)
        assert "searches_skipped" in out and out["tuned_settings_differ"] is None
    # tuned with k 50 and re-ranking; used with k 20, no re-rank: said once, in the JSON and the table
    r = run(*common, "--lambda", "adaptive", "--k", 20, "--no-rerank")
    assert "k 50 → 20" in strict_json(r.stdout)["tuned_settings_differ"]
    r = run("eval", "--datastore", store.path, "--model", tiny_model_dir, "--lambda", "tuned")
    assert "other search settings" in r.output
    for extra in (["--lambda", "gate", "--skip-below", "1"], ["--combine", "spalm"]):
        r = run("generate", "--datastore", store.path, "--model", tiny_model_dir, "--k", 50, "--prompt", "def f(",
                "-n", 5, "--json", *extra)
        assert r.exit_code == 0, r.output
        out = strict_json(r.stdout)
        assert len(out["tokens"]) == 5 and out["searches_skipped"] == (5 if "--skip-below" in extra else 0)


def test_scores_with_scoring_flags_is_refused(store, tiny_model_dir, tmp_path, dev):
    save_scores(str(tmp_path / "s.h5"), dev)
    r = run("tune-lambda", "--datastore", store.path, "--scores", tmp_path / "s.h5", "--k", 10, "--context", 32)
    assert r.exit_code == 2 and "--k, --context would do nothing" in r.output


def test_every_new_eval_and_tune_flag_arrives(monkeypatch, fresh_store, tiny_model_dir, tmp_path):
    store = fresh_store
    import knnlm.cli.evaluate as cli_eval
    import knnlm.cli.tune as cli_tune

    seen = {}
    monkeypatch.setattr(cli_eval, "run_eval", lambda ds, corpus, cfg, progress=None: seen.update(cfg=cfg) or
                        (_ for _ in ()).throw(KNNLMError("stop")))
    (tmp_path / "c.jsonl").write_text('{"body": "x = 1"}\n')
    run("eval", "--corpus", tmp_path / "c.jsonl", "--combine", "spalm", "--skip-below", "tuned",
        "--format", "jsonl", "--text-field", "body")
    c = seen["cfg"]
    assert (c.combine, c.skip_below, c.lam, c.fmt, c.text_field) == ("spalm", "tuned", "0.25", "jsonl", "body")
    run("eval", "--corpus", tmp_path / "c.jsonl", "--lambda", "gate")
    assert seen["cfg"].lam == "gate"

    def fake_tune(scores, cfg, description="", head=None):
        seen["tune"] = cfg
        raise KNNLMError("stop")

    def fake_eval(ds, corpus, cfg, lm=None, progress=None):
        seen["ecfg"] = cfg
        return {}, None

    monkeypatch.setattr(cli_tune, "tune", fake_tune)
    monkeypatch.setattr(cli_tune, "run_eval", fake_eval)
    run("tune-lambda", "--datastore", store.path, "--model", tiny_model_dir, "--corpus", tmp_path / "c.jsonl",
        "--format", "jsonl", "--text-field", "body", "--glob", "*.md", "--bins", 7,
        "--min-bin-tokens", 3, "--gate-hidden", 5, "--gate-rank", 2,
        "--skip-tolerance", 0.05, "--no-spalm", "--seed", 4, "--k", 9, "--nprobe", 3, "--no-rerank",
        "--context", 40, "--stride", 20, "--batch-size", 2, "--device", "cpu")
    t, e = seen["tune"], seen["ecfg"]
    assert (t.adaptive, t.bins, t.min_bin_tokens, t.gate, t.skip, t.skip_tolerance, t.spalm, t.seed) == \
        (True, 7, 3, True, True, 0.05, False, 4)
    assert (t.gate_config.hidden, t.gate_config.rank, t.gate_config.seed) == (5, 2, 4)
    assert (e.fmt, e.text_field, e.glob, e.context, e.stride, e.batch_size, e.device, e.model) == \
        ("jsonl", "body", "*.md", 40, 20, 2, "cpu", str(tiny_model_dir))
    assert e.retrieval == RetrievalConfig(k=9, nprobe=3, rerank=False)
    # the switches that turn those numbers off (which then may not be given: they would do nothing)
    run("tune-lambda", "--datastore", store.path, "--model", tiny_model_dir, "--corpus", tmp_path / "c.jsonl",
        "--format", "jsonl", "--text-field", "body", "--no-adaptive", "--no-gate", "--no-skip", "--exact")
    t, e = seen["tune"], seen["ecfg"]
    assert (t.adaptive, t.gate, t.skip) == (False, False, False)
    assert e.retrieval == RetrievalConfig(exact=True)


def test_gate_refuses_another_temperature(store, tuned):
    t = tuned[0]["gate"]["temperature"]
    assert resolve_combiner("gate", store.path, temperature=t).temperature == t
    with pytest.raises(KNNLMError, match="was trained at temperature .*drop --temperature"):
        resolve_combiner("gate", store.path, temperature=t * 2)


def test_spalm_refuses_a_lambda_it_would_not_read(store, tuned):
    assert resolve_combiner("0.25", store.path, "spalm").kind == resolve_combiner(combine="spalm",
                                                                                datastore_dir=store.path).kind
    for lam in ("0.7", "gate", "tuned", 0.25001):
        with pytest.raises(KNNLMError, match=rf"^--combine spalm gates the memory with SPALM's own gate, so --lambda "
                                             rf"{lam} would do nothing"):
            resolve_combiner(lam, store.path, "spalm")
    for lam in ("0.7", "0.25"):  # typed, even the default's value is refused (the CLI knows it was typed)
        for command in (["eval"], ["generate", "-p", "x"]):
            r = run(*command, "--datastore", store.path, "--combine", "spalm", "--lambda", lam)
            assert r.exit_code == 1 and f"--lambda {lam} would do nothing" in r.output, r.output


def test_lambda_files_of_format_one_still_give_their_lambda(store, tuned, tmp_path):
    old = {"format": 1, "lambda": 0.3, "temperature": 7.0, "adaptive": None, "created": "before"}
    (tmp_path / "lambda.json").write_text(json.dumps(old))
    c = resolve_combiner("tuned", tmp_path)
    assert (c.lam, c.temperature) == (0.3, 7.0)
    assert resolve_combiner("0.25", tmp_path).temperature == 7.0
    with pytest.raises(KNNLMError, match="no learned gate"):
        resolve_combiner("gate", tmp_path)


def test_spalm_beside_another_processor_on_the_model(store, tiny_lm, tuned):
    """SPALM's own projections of (n, d) rows are no forward pass: another hook on the model neither breaks on them
    nor counts them (before: an IndexError in the other hook)."""
    retriever = Retriever(store, RetrievalConfig(k=50))
    x = torch.tensor([tiny_lm.encode("import os\nimport sys\n")])
    with torch.inference_mode():
        logits = tiny_lm.model(input_ids=x).logits[:, -1]
    outs = []
    for beside in (False, True):
        with KNNLogitsProcessor(tiny_lm, retriever, combine="spalm") as spalm:
            other = KNNLogitsProcessor(tiny_lm, retriever, lam="0.25", temperature=2.0) if beside else None
            try:
                with QueryHook(tiny_lm) as reference, torch.inference_mode():
                    tiny_lm.model(input_ids=x)
                    outs.append(spalm(x, logits))
                    if other is not None:  # its query is still the forward pass's, the only pass it saw
                        assert other.seen()[1] == 1 and torch.equal(other.take_query(x)[0], reference.take_query(x)[0])
            finally:
                if other is not None:
                    other.close()
    assert torch.equal(outs[0], outs[1])


def test_tuned_files_change_together_and_one_tune_at_a_time(store, tuned, tiny_lm, tiny_model_dir, monkeypatch):
    """lambda.json and mixing.safetensors are one change of the datastore: a save that fails between the two
    leaves both as they were, and a tune while another process changes (or tunes) the datastore is refused
    before any work (before: a second tune-lambda could leave lambda.json naming the other run's weights, and
    every gate unusable; mixing.safetensors was readable by its owner only)."""
    import os

    import knnlm.combine as combine
    from knnlm.api import KNNLM
    from knnlm.journal import PENDING, _try_lock, _unlock

    umask = os.umask(0)
    os.umask(umask)
    files = {name: (store.path / name).read_bytes() for name in ("lambda.json", "mixing.safetensors")}
    assert (store.path / "mixing.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    def boom(*args):
        raise OSError("disk full")

    result, tensors = tuned
    monkeypatch.setattr(combine, "write_json", boom)  # lambda.json's write fails after the weights were staged
    with pytest.raises(OSError, match="disk full"):
        save_lambda(store.path, result, {k: v + 1 for k, v in tensors.items()})
    monkeypatch.undo()
    assert {name: (store.path / name).read_bytes() for name in files} == files and not (store.path / PENDING).exists()
    assert resolve_combiner("gate", store.path).kind == "gate"  # still the pair tune-lambda wrote
    import knnlm.api as api
    import knnlm.cli.tune as cli_tune

    def scored(*args, **kwargs):
        raise AssertionError("scored the dev part under another process's change")

    monkeypatch.setattr(api, "dev_scores", scored)  # refused before any work: the scoring never starts
    monkeypatch.setattr(cli_tune, "dev_scores", scored)
    fd = _try_lock(store.path)  # another process changing the datastore: an add, or another tune-lambda
    try:
        _sentence(run("tune-lambda", "--datastore", store.path, "--model", tiny_model_dir, "--no-plot"),
                  "is being changed by another process", "tune-lambda")
        with pytest.raises(KNNLMError, match="being changed by another process"):
            KNNLM.open(store.path, lm=tiny_lm).tune()
    finally:
        _unlock(fd)
    seen = {}  # and the tune holds the lock while it scores: an add then is refused

    def scoring(ds, *args, **kwargs):
        from knnlm.journal import _try_lock as try_lock

        seen["other"] = try_lock(ds.path)
        raise AssertionError("stop after the check")

    monkeypatch.setattr(api, "dev_scores", scoring)
    with pytest.raises(AssertionError, match="stop after the check"):
        KNNLM.open(store.path, lm=tiny_lm).tune()
    assert seen["other"] is None  # another process's lock attempt fails while the tune scores
    assert {name: (store.path / name).read_bytes() for name in files} == files
