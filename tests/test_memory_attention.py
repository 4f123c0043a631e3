"""kNN-augmented attention: empty memory changes nothing; full memory at exact positions is full attention."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from knnlm.errors import KNNLMError
from knnlm.memory.attention import AttentionMemoryConfig, attached, parse_layers
from knnlm.memory.reading import forward_in_order
from knnlm.windows import forward_owned, plan_windows

W, STRIDE = 48, 16


@pytest.fixture(scope="module")
def ids(tiny_lm, corpus_texts) -> list[int]:
    """A document of 200 tokens: four to eleven windows of W."""
    return tiny_lm.encode(corpus_texts["textwrap.py"])[:200]


def full_logits(lm, ids) -> torch.Tensor:
    """(T, V) logits of one forward pass over the whole document."""
    batch = torch.tensor([ids])
    return lm.forward(batch, torch.ones_like(batch))[1][0]


def windowed(lm, ids, cfg) -> list:
    """Owned rows of each window of the document, read with attention memory (cfg) or without (None)."""
    work = [(w, ids[w.begin: w.end]) for w in plan_windows(0, len(ids), W, STRIDE)]
    if cfg is None:
        return sorted((o for batch in forward_owned(lm, work, 3, logits=True) for o in batch), key=lambda o: o.item)
    return [o for batch in forward_in_order(lm, work, cfg, W) for o in batch]


def max_gap(owned, reference) -> float:
    """Largest difference between the windows' logits and the reference's at the same positions."""
    return max(float((o.logits - reference[o.window.own_from: o.window.own_to]).abs().max()) for o in owned)


@pytest.mark.parametrize("retrieval", ["head", "group"])
def test_exact_positions_with_all_past_tokens_is_full_attention(tiny_lm, ids, retrieval):
    full = full_logits(tiny_lm, ids)
    assert max_gap(windowed(tiny_lm, ids, None), full) > 1e-2  # the window alone differs clearly
    cfg = AttentionMemoryConfig(layers="all", k=len(ids), positions="exact", retrieval=retrieval)
    assert max_gap(windowed(tiny_lm, ids, cfg), full) < 1e-4


def test_fewer_neighbours_or_fixed_positions_differ_from_full_attention(tiny_lm, ids):
    full = full_logits(tiny_lm, ids)
    for cfg in (AttentionMemoryConfig(layers="all", k=4, positions="exact"),
                AttentionMemoryConfig(layers="all", k=len(ids), positions="fixed"),
                AttentionMemoryConfig(layers="1", k=len(ids), positions="exact")):
        gap = max_gap(windowed(tiny_lm, ids, cfg), full)
        assert 1e-4 < gap, cfg


def test_empty_memory_is_exactly_todays_attention(tiny_lm, ids):
    """Windows that never leave memory anything (one window per document) give bit-identical logits."""
    work = [(w, ids[w.begin: w.end]) for w in plan_windows(0, len(ids), len(ids), len(ids))]
    assert len(work) == 1
    plain = next(forward_owned(tiny_lm, work, 1, logits=True))[0]
    with_memory = next(forward_in_order(tiny_lm, work, AttentionMemoryConfig(layers="all"), len(ids)))[0]
    assert torch.equal(plain.logits, with_memory.logits) and torch.equal(plain.keys, with_memory.keys)
    # and the model is given back its own attention afterwards
    assert tiny_lm.model.config._attn_implementation == "sdpa"


def test_first_window_is_unchanged_and_memory_only_helps_later_ones(tiny_lm, ids):
    plain = windowed(tiny_lm, ids, None)
    mem = windowed(tiny_lm, ids, AttentionMemoryConfig(layers="all", k=8))
    assert torch.equal(plain[0].logits, mem[0].logits)
    assert not torch.allclose(plain[-1].logits, mem[-1].logits)


def test_parse_layers():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("top-third", 30) == tuple(range(20, 30))
    assert parse_layers("top-half", 2) == (1,)
    assert parse_layers("0, 2-3", 4) == (0, 2, 3)
    for bad in ("4", "x", "1-", ""):
        with pytest.raises(KNNLMError, match="--memory-layers"):
            parse_layers(bad, 4)
    # before a model is known: the syntax only, in words that name no layer count (before: "layers 0 to 9999")
    assert parse_layers("10000", None) == parse_layers("all", None) == ()
    with pytest.raises(KNNLMError, match=r"'1-0' names no layer \(a range runs from its lower number"):
        AttentionMemoryConfig(layers="1-0")
    with pytest.raises(KNNLMError, match="--memory-k"):
        AttentionMemoryConfig(k=0)
    with pytest.raises(KNNLMError, match="exact or fixed"):
        AttentionMemoryConfig(positions="near")


def test_one_memory_per_model_and_batches_of_one(tiny_lm, ids):
    with attached(tiny_lm, AttentionMemoryConfig(layers="all")) as memory:
        with pytest.raises(KNNLMError, match="already"):
            with attached(tiny_lm, AttentionMemoryConfig()):
                pass
        memory.start(W)
        memory.begin_forward(0, torch.arange(8), capture=True)
        batch = torch.tensor([ids[:8]])
        tiny_lm.forward(batch, torch.ones_like(batch))
        memory.stash(0, 8)
        memory.release(4)
        assert len(memory) == 4 and memory.keys[0].shape[1] == 4
        batch = torch.tensor([ids[:8], ids[8:16]])
        memory.begin_forward(4, torch.arange(8), capture=False)
        with pytest.raises(KNNLMError, match="one document"):
            tiny_lm.forward(batch, torch.ones_like(batch))
    assert tiny_lm.model.config._attn_implementation == "sdpa"


# --- generation: a KV cache cut to the window, what leaves it in memory --------------------------------------


def test_cut_cache_with_full_memory_decodes_as_full_context(tiny_lm, ids):
    from knnlm.generate import generate

    prompt = tiny_lm.decode(ids[:120])
    full = generate(tiny_lm, prompt, None, max_new_tokens=12)  # one window: the whole prompt in context
    windowed_only = generate(tiny_lm, prompt, None, max_new_tokens=12, window=(24, 8))
    cfg = AttentionMemoryConfig(layers="all", k=1000, positions="exact")
    with_memory = generate(tiny_lm, prompt, None, max_new_tokens=12, window=(24, 8), attention=cfg)
    assert with_memory.tokens == full.tokens
    assert windowed_only.tokens != full.tokens  # the test can tell a window from full context
    fixed = generate(tiny_lm, prompt, None, max_new_tokens=12, window=(24, 8),
                     attention=AttentionMemoryConfig(layers="all", k=4, positions="fixed"))
    assert len(fixed.tokens) == 12


def test_cut_cache_reader_keeps_the_window_and_matches_full_logits(tiny_lm, ids):
    from knnlm.memory.reading import reading_with_memory

    full = full_logits(tiny_lm, ids[:100])
    cfg = AttentionMemoryConfig(layers="all", k=1000, positions="exact")
    with torch.inference_mode(), reading_with_memory(tiny_lm, cfg, 24, 8) as reader:
        scores = reader.scores(ids[:90])  # the prompt, in chunks of 8
        for n in range(91, 101):  # then a token per step
            assert reader.cache.get_seq_length() <= 24 and len(reader.memory) == n - 1 - reader.cache.get_seq_length()
            torch.testing.assert_close(scores[0], full[n - 2], atol=1e-4, rtol=1e-4)
            scores = reader.scores(ids[:n])
        assert reader.memory.positions.tolist() == list(range(len(reader.memory)))


def test_attention_memory_without_a_window_reads_through_eval_s(tiny_lm, corpus_texts):
    from knnlm.evaluate import NO_DATASTORE_WINDOW
    from knnlm.generate import generate

    prompt = corpus_texts["bisect.py"] * 2
    assert len(tiny_lm.encode(prompt)) > NO_DATASTORE_WINDOW[0]  # longer than the window: the memory fills
    cfg = AttentionMemoryConfig(k=8)
    got = generate(tiny_lm, prompt, None, max_new_tokens=3, attention=cfg)
    assert got.tokens == generate(tiny_lm, prompt, None, max_new_tokens=3, window=NO_DATASTORE_WINDOW,
                                  attention=cfg).tokens


def test_attention_memory_without_a_window_fits_a_model_of_fewer_positions(tiny_lm, corpus_texts):
    """generate has no --context: a model of 128 positions reads through (128, 64), not a refusal naming --context;
    a model with no rotation is refused for that, not for its window."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from knnlm.generate import generate
    from knnlm.lm import LM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_lm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    lm = LM(model=LlamaForCausalLM(config).eval().requires_grad_(False), tokenizer=tiny_lm.tokenizer, name="short",
            device="cpu")
    prompt = corpus_texts["bisect.py"][:3000]
    assert len(lm.encode(prompt)) > 128  # past the window: the memory fills
    cfg = AttentionMemoryConfig(k=8)
    got = generate(lm, prompt, None, max_new_tokens=3, attention=cfg)
    assert got.tokens == generate(lm, prompt, None, max_new_tokens=3, window=(128, 64), attention=cfg).tokens
    gpt2 = _tiny_of("gpt2", tiny_lm.tokenizer)
    gpt2.model.config.n_positions = 128  # max_position_embeddings reads it
    with pytest.raises(KNNLMError, match="no rotary-embedding module"):
        generate(gpt2, prompt, None, max_new_tokens=3, attention=cfg)


# --- eval, the API and the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_lm, corpus_texts):
    """A datastore of two short documents, built with the tiny model."""
    from knnlm.build import BuildConfig, build_datastore

    root = tmp_path_factory.mktemp("store")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(__import__("json").dumps({"text": t[:2500]}) for t in corpus_texts.values()))
    build_datastore(str(corpus), root / "ds", BuildConfig(context=64, stride=32, holdout=0), lm=tiny_lm)
    return root / "ds"


def test_eval_with_attention_memory(small_store, tiny_lm, corpus_texts):
    from knnlm.api import KNNLM

    knn = KNNLM.open(small_store, lm=tiny_lm)
    texts = [corpus_texts["glob.py"][:600], corpus_texts["shlex.py"][:500]]  # under 500 tokens each
    plain = knn.evaluate(texts, lam=0.25, context=64, stride=32)
    assert plain["attention_memory"] is None and all(len(tiny_lm.encode(t)) < 500 for t in texts)
    # A window longer than every document leaves nothing to memory: exactly today's numbers.
    long = knn.evaluate(texts, lam=0.25, context=500, stride=500)
    empty = knn.evaluate(texts, lam=0.25, context=500, stride=500, attention_memory=AttentionMemoryConfig())
    assert (empty["lm_ppl"], empty["knn_lm_ppl"], empty["tokens"]) == (long["lm_ppl"], long["knn_lm_ppl"],
                                                                      long["tokens"])
    # Full memory at exact positions: the LM scores as with the whole document in context.
    cfg = AttentionMemoryConfig(layers="all", k=10_000, positions="exact")
    full = knn.evaluate(texts, lam=0.25, context=64, stride=32, attention_memory=cfg)
    assert full["tokens"] == plain["tokens"] and full["attention_memory"] == cfg.describe
    assert full["lm_ppl"] == pytest.approx(long["lm_ppl"], rel=1e-5)
    assert abs(plain["lm_ppl"] - long["lm_ppl"]) > 1e-3


def test_every_attention_flag_reaches_its_config(monkeypatch):
    from click.testing import CliRunner

    import knnlm.cli.evaluate as cli_eval
    import knnlm.cli.generate as cli_generate
    from knnlm.cli.main import cli
    from knnlm.memory.attention import Positions, Retrieval

    seen = {}

    class Stop(Exception):
        pass

    def fake_eval(datastore, corpus, cfg, progress=None):
        seen["eval"] = cfg.attention
        raise Stop

    def fake_open(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(cli_eval, "run_eval", fake_eval)
    flags = ["--attention-memory", "--memory-layers", "3,5-7", "--memory-k", "9", "--memory-positions", "fixed",
             "--memory-retrieval", "head"]
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["eval", "--corpus", "c.txt", *flags], catch_exceptions=False)
    a = seen["eval"]
    assert (a.layers, a.k, a.positions, a.retrieval) == ("3,5-7", 9, Positions.FIXED, Retrieval.HEAD)
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["eval", "--corpus", "c.txt", "--attention-memory"], catch_exceptions=False)
    assert seen["eval"] == AttentionMemoryConfig()
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["eval", "--corpus", "c.txt"], catch_exceptions=False)
    assert seen["eval"] is None
    r = CliRunner().invoke(cli, ["eval", "--corpus", "c.txt", "--memory-k", "9"])
    assert r.exit_code != 0 and "--memory-k only applies with --attention-memory; add it or leave it out" in r.output

    def fake_generate(lm, prompt, retriever, *args, attention=None, **kwargs):
        seen["generate"] = attention
        raise Stop

    class FakeKNN:
        lm = retriever = None

    monkeypatch.setattr(cli_generate.KNNLM, "open", lambda *a, **k: FakeKNN())
    monkeypatch.setattr(cli_generate, "generate", fake_generate)
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["generate", "-p", "x", *flags], catch_exceptions=False)
    a = seen["generate"]
    assert (a.layers, a.k, a.positions, a.retrieval) == ("3,5-7", 9, Positions.FIXED, Retrieval.HEAD)


@pytest.mark.parametrize("retrieval", ["head", "group"])
@pytest.mark.parametrize("positions", ["exact", "fixed"])
@pytest.mark.parametrize("kind", ["llama", "llama-yarn", "phi3-longrope", "llama-dynamic"])
def test_memory_attention_matches_a_loop_reference(tiny_lm, retrieval, positions, kind):
    """One call of the attention function against a query-by-query reference: top-k by score, one softmax; keys
    turned by the rotation the model gives the pass's own tokens (YaRN's scale included; longrope's long
    frequencies and dynamic NTK's larger base, as the pass reads past position 32) (before: fixed positions left
    YaRN's scale off memory keys, and longrope and dynamic NTK turned them by their short frequencies, silently)."""
    from knnlm.memory.attention import _attention_modules, memory_attention
    from knnlm.memory.rotary import cos_sin, rotate

    lm = tiny_lm if kind == "llama" else _tiny_of(kind, tiny_lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    h, h_kv, t, d, n, k, offset, window = 4, 2, 5, 8, 30, 6, 40, 48
    frame = torch.arange(t) + window - t  # the pass's tokens: the last of a window that reads past position 32
    query, key, value = (torch.randn(1, heads, t, d, generator=g) for heads in (h, h_kv, h_kv))
    mem_k, mem_v = torch.randn(h_kv, n, d, generator=g), torch.randn(h_kv, n, d, generator=g)
    mem_pos = torch.arange(n) + 3  # absolute positions, all before the window's start at `offset`
    cfg = AttentionMemoryConfig(layers="0", k=k, positions=positions, retrieval=retrieval)
    with attached(lm, cfg) as memory:
        memory.start(window)
        memory.append({0: (mem_k, mem_v)}, mem_pos)
        memory.begin_forward(offset, frame, capture=False)
        got = memory_attention(_attention_modules(lm.model)[0], query, key, value, None, scaling=d ** -0.5)[0]
        rotary = memory.rope.module

    def turned(x, positions):  # x rotated as the pass's own keys are: the frequencies of a pass reading to its end
        cos, sin = cos_sin(rotary, torch.cat([positions, frame[-1:]]), x)
        return rotate(x, cos[:-1], sin[:-1])

    scale, group = d ** -0.5, h // h_kv
    if positions == "exact":  # each key at its position relative to the window's start
        rot_k = turned(mem_k, mem_pos - offset)
    for kv in range(h_kv):
        mem_scores = {}
        for head in range(kv * group, (kv + 1) * group):
            for i in range(t):
                q = query[0, head, i]
                if positions == "fixed":  # the key W positions before the query: its rotation there
                    keys = turned(mem_k, torch.full((n,), int(frame[i]) - window))
                else:
                    keys = rot_k
                mem_scores[head, i] = keys[kv] @ q * scale  # (n,)
        for head in range(kv * group, (kv + 1) * group):
            for i in range(t):
                by = mem_scores[head, i] if retrieval == "head" else \
                    sum(mem_scores[x, i] for x in range(kv * group, (kv + 1) * group))
                top = torch.argsort(by, descending=True)[:k]
                local = key[0, kv, : i + 1] @ query[0, head, i] * scale
                p = torch.softmax(torch.cat([local, mem_scores[head, i][top]]), dim=0)
                want = p[: i + 1] @ value[0, kv, : i + 1] + p[i + 1:] @ mem_v[kv, top]
                torch.testing.assert_close(got[0, i, head], want, atol=1e-5, rtol=1e-5)


def _tiny_of(kind: str, tokenizer):
    """A seeded 2-layer model of another architecture, with the tests' tokenizer."""
    import transformers

    from knnlm.lm import LM

    torch.manual_seed(0)
    size = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=512)
    configs = {  # kind: (config class, model class, settings)
        # Gemma 2 caps its attention scores (tanh) and alternates sliding and global layers
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(size, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=1.0, sliding_window=4096,
                        final_logit_softcapping=None)),
        # Gemma 3: a sliding layer (40 tokens back) and a global one, each turned by a rotation of its own
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(size, num_key_value_heads=2, head_dim=8, sliding_window=40,
                        layer_types=["sliding_attention", "full_attention"])),
        "mistral-sliding": ("MistralConfig", "MistralForCausalLM",
                            dict(size, num_key_value_heads=2, sliding_window=40)),  # sees 40 tokens back
        "phi": ("PhiConfig", "PhiForCausalLM", dict(size, partial_rotary_factor=0.5)),
        # Cohere pairs neighbouring dimensions (Llama pairs the two halves of a head)
        "cohere": ("CohereConfig", "CohereForCausalLM", dict(size, num_key_value_heads=2, pad_token_id=0,
                                                               bos_token_id=0, eos_token_id=0)),
        # OLMo 3: each layer's type (config.layer_types) picks its rotation (bases 10^4 and 10^6 here)
        "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
                  dict(size, num_key_value_heads=2, sliding_window=40, pad_token_id=0, bos_token_id=0,
                       eos_token_id=0, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                        "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
        # SmolLM3 leaves every fourth layer without rotary positions (NoPE)
        "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                    dict(size, num_hidden_layers=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                         eos_token_id=0)),
        # the same with 8 positions only: the probe's two passes must still be apart
        "smollm3-short": ("SmolLM3Config", "SmolLM3ForCausalLM",
                          dict(size, num_hidden_layers=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                               eos_token_id=0, max_position_embeddings=8)),
        # longrope: another set of frequencies for any pass that reads past position 32
        "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM",
                          dict(size, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                               original_max_position_embeddings=32,
                               rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                                "long_factor": [4.0] * 4, "original_max_position_embeddings": 32})),
        # YaRN: every rotation scaled by its attention factor (1.14 here), so the scale must reach memory keys too
        "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                       dict(size, num_key_value_heads=2,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                             "original_max_position_embeddings": 32})),
        # dynamic NTK: a larger base for any pass that reads past max_position_embeddings (32), grown with the
        # longest pass so far until a shorter one resets it
        "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM",
                          dict(size, num_key_value_heads=2, max_position_embeddings=32,
                               rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0})),
        # longrope in a Llama (separate key projection): long frequencies for a pass reading past position 32
        "llama-longrope": ("LlamaConfig", "LlamaForCausalLM",
                           dict(size, num_key_value_heads=2,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                                 "long_factor": [4.0] * 4, "original_max_position_embeddings": 32})),
        # Mllama's text model: layer 1 is a cross-attention layer, which attends over image states only
        "mllama": ("MllamaTextConfig", "MllamaForCausalLM",
                   dict(size, num_hidden_layers=3, num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0,
                        bos_token_id=0, eos_token_id=0)),
        # Falcon's attention is its own code, not transformers' attention interface
        "falcon": ("FalconConfig", "FalconForCausalLM",
                   dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
        # GPT-NeoX (Pythia): half of each head turns; its attention modules carry no num_key_value_groups
        "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(size, rotary_pct=0.5)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512)),
        # GPT-J turns interleaved pairs of dimensions inside its attention, with no rotary module of its own
        "gptj": ("GPTJConfig", "GPTJForCausalLM",
                 dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512, rotary_dim=4)),
    }
    config_cls, model_cls, kw = configs[kind]
    config = getattr(transformers, config_cls)(**kw)
    # eager, but Falcon as it loads by default: sdpa, which it runs in code of its own
    model = getattr(transformers, model_cls)._from_config(
        config, attn_implementation="sdpa" if kind == "falcon" else "eager").eval()
    if kind in ("gemma2", "gemma3", "cohere", "olmo3", "phi3-longrope"):  # scores of a few units, as a trained
        # model's: Gemma 2's cap of 1 bites, and a wrong rotation shows
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                if hasattr(attn, "q_norm"):  # queries and keys RMS-normed after the projection: scale the norms
                    attn.q_norm.weight.fill_(3.0)
                    attn.k_norm.weight.fill_(3.0)
                elif hasattr(attn, "qkv_proj"):  # one projection for all three (Phi-3)
                    attn.qkv_proj.weight.mul_(20)
                else:
                    attn.q_proj.weight.mul_(20)
                    attn.k_proj.weight.mul_(20)
    return LM(model=model, tokenizer=tokenizer, name=kind, device="cpu")


@pytest.mark.parametrize("kind", ["gemma2", "mistral-sliding", "phi", "gemma3", "gpt-neox", "cohere", "olmo3",
                                  "phi3-longrope", "llama-yarn"])
def test_full_memory_is_full_attention_with_capped_scores_sliding_windows_and_partial_rotary(tiny_lm, ids, kind):
    """The memory's scores are capped as the model caps its own (Gemma 2), a sliding-window layer sees no memory key
    farther back than its window, a partial rotary turns only its dimensions, each layer type turns by its own
    rotation (Gemma 3, OLMo 3) and dimensions pair as the model pairs them (Cohere) (before: 5.7e-4 and −2.9% of
    perplexity off full attention, silently, and a traceback; later Cohere 0.37 off, silently; Gemma 3, OLMo 3 and
    GPT-NeoX were refused)."""
    lm = _tiny_of(kind, tiny_lm.tokenizer)
    full = full_logits(lm, ids)
    assert max_gap(windowed(lm, ids, None), full) > 1e-3  # the window alone differs
    cfg = AttentionMemoryConfig(layers="all", k=len(ids), positions="exact")
    assert max_gap(windowed(lm, ids, cfg), full) < 1e-4


@pytest.mark.parametrize("kind", ["mistral-sliding", "gemma2", "gemma3", "gpt-neox", "olmo3"])
@pytest.mark.parametrize("context", [24, 64])
def test_cut_cache_with_full_memory_is_full_attention_with_sliding_layers(tiny_lm, ids, kind, context):
    """Generation's cut KV cache, with every cut entry in memory, gives the full-context logits also where layers
    slide (a window of 40, shorter and longer than the cache's) (before: the model's sliding cache layers kept
    their own count of what they hold, so cutting them shifted the mask: up to 0.04 off, silently)."""
    from knnlm.memory.reading import reading_with_memory

    lm = _tiny_of(kind, tiny_lm.tokenizer)
    full = full_logits(lm, ids[:140])
    cfg = AttentionMemoryConfig(layers="all", k=len(ids), positions="exact")
    with torch.inference_mode(), reading_with_memory(lm, cfg, context, 8) as reader:
        scores = reader.scores(ids[:90])  # the prompt, in chunks of 8
        for n in range(91, 141):  # then a token per step
            assert reader.cache.get_seq_length() <= context
            torch.testing.assert_close(scores[0], full[n - 2], atol=1e-4, rtol=1e-4)
            scores = reader.scores(ids[:n])


@contextmanager
def _read_at_layer_1(kind: str, tokenizer, context: int, stride: int):
    """(a cut-cache reader of a tiny model of the kind, with attention memory at layer 1; the keys layer 1 projects,
    before rotation, in each pass made inside the block), inference mode on."""
    from knnlm.memory.reading import reading_with_memory

    lm = _tiny_of(kind, tokenizer)
    projected = []
    cfg = AttentionMemoryConfig(layers="1", k=8, positions="exact")
    with torch.inference_mode(), reading_with_memory(lm, cfg, context, stride) as reader:
        hook = lm.model.model.layers[1].self_attn.k_proj.register_forward_hook(
            lambda m, args, out: projected.append(out[0].detach()))
        try:
            yield reader, projected
        finally:
            hook.remove()


@pytest.mark.parametrize("kind", ["llama-longrope", "llama-dynamic"])
def test_cut_cache_takes_off_the_rotation_each_key_was_given(tiny_lm, ids, kind):
    """Keys cut from generation's cache reach the memory exactly as the model projected them, before rotation, also
    where a pass's frequencies depend on how far it reads: the prompt's one pass reads to position 39 (long
    frequencies; dynamic NTK's base then grows with every later pass), the cut keys sit before position 32 (before:
    they were turned back by the short frequencies, silently)."""
    with _read_at_layer_1(kind, tiny_lm.tokenizer, 40, 40) as (reader, projected):
        reader.scores(ids[:40])  # the prompt in one pass
        reader.scores(ids[:52])  # then a token per pass: cuts the first 12 to the memory, one at a time
        kept = reader.memory.keys[1]  # (H_kv, 12, D)
        assert reader.memory.positions.tolist() == list(range(12))
    raw = torch.cat(projected)[:12].reshape(12, 2, 8).transpose(0, 1)  # (H_kv, 12, D)
    assert kept.shape == raw.shape
    torch.testing.assert_close(kept, raw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", [False, True])
def test_generation_with_longrope_is_the_models_own_greedy_decoding(tiny_lm, ids, attention):
    """A longrope model (original length 32) turns every key by other frequencies once a pass reads past position
    32; its own generate recomputes its cache there (Phi-3), and so do knnlm's decoding windows and attention
    memory's cut cache (before: the cached keys kept the short frequencies: another continuation, silently)."""
    from knnlm.generate import generate

    lm = _tiny_of("phi3-longrope", tiny_lm.tokenizer)
    prompt = lm.decode(ids[:18])
    x = torch.tensor([lm.encode(prompt)])
    with torch.inference_mode():
        own = lm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=30,
                                min_new_tokens=30, pad_token_id=0)[0, x.shape[1]:].tolist()
    cfg = AttentionMemoryConfig(layers="all", k=len(ids), positions="exact") if attention else None
    out = generate(lm, prompt, None, max_new_tokens=30, window=(64, 32), attention=cfg)
    assert x.shape[1] < 32 < x.shape[1] + 30 and len(own) == 30
    assert out.tokens == own[: len(out.tokens)] and len(out.tokens) >= 15


def test_cut_cache_past_a_longrope_switch_turns_its_keys_by_the_long_frequencies(tiny_lm, ids):
    """Where the tokens read no longer fit the window at the switch (context 24 < 32), the cache's keys, turned by
    short-frequency passes, are turned by the long frequencies, so that local keys sit where the queries expect
    them (before: the queries turned long, the cached keys short: 0.04-0.67 of a logit off, silently)."""
    from knnlm.memory.rotary import cos_sin, rotate

    with _read_at_layer_1("llama-longrope", tiny_lm.tokenizer, 24, 8) as (reader, projected):
        reader.scores(ids[:40])  # passes of 8: the last (positions 32-39) is the first past the switch
        cached = reader.cache.layers[1].keys[0]  # (H_kv, 24, D): positions 16-39
        assert reader.first == 16
        raw = torch.cat(projected)[16:40].reshape(24, 2, 8).transpose(0, 1)
        cos, sin = cos_sin(reader.memory.rope.module, torch.arange(16, 40), raw, reach=39)
        torch.testing.assert_close(cached, rotate(raw, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, words", [("gpt2", "no rotary-embedding module"), ("gptj", "no rotary-embedding module"),
                                         ("smollm3", "layer 3 first"), ("smollm3-short", "layer 3 first"),
                                         ("falcon", "attention interface"),
                                         ("mllama", r"Layer\(s\) 1 of .*--memory-layers 0,2\)")])
def test_attention_memory_refuses_what_it_cannot_reproduce(tiny_lm, ids, kind, words):
    lm = _tiny_of(kind, tiny_lm.tokenizer)
    with pytest.raises(KNNLMError, match=words):
        windowed(lm, ids, AttentionMemoryConfig(layers="all", k=8))


def test_a_refusal_of_layers_that_attend_over_no_text_names_the_others(tiny_lm, ids):
    """Mllama's layer 1 attends over image states only: named alone, the refusal says which layers may serve (before:
    "use a Llama-style decoder"), and those do."""
    lm = _tiny_of("mllama", tiny_lm.tokenizer)
    with pytest.raises(KNNLMError, match=r"Layer\(s\) 1 of .*--memory-layers 0,2\)"):
        windowed(lm, ids, AttentionMemoryConfig(layers="1", k=8))
    windowed(lm, ids, AttentionMemoryConfig(layers="0,2", k=8))


def test_the_rotation_check_stays_where_the_rotation_does_not_depend_on_length(tiny_lm):
    """longrope turns by other frequencies in a pass that reads past original_max_position_embeddings (32 here): the
    check's two passes stay inside it, so the model is not refused for that."""
    from knnlm.memory.rotary import rotate_half

    lm = _tiny_of("phi3-longrope", tiny_lm.tokenizer)
    with attached(lm, AttentionMemoryConfig(layers="all", k=8)) as memory:
        assert memory.rope.pair is rotate_half and len(memory) == 0 and not memory.captured


def test_attention_memory_refuses_a_rotation_it_does_not_reproduce(tiny_lm, ids, monkeypatch):
    """A model file whose apply_rotary_pos_emb pairs dimensions in neither known way is refused before any pass,
    rather than read with keys rotated wrongly."""
    import transformers.models.llama.modeling_llama as llama

    def reversed_rotation(q, k, cos, sin, unsqueeze_dim=1):  # Llama's, on the dimensions in reverse order
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return tuple((x.flip(-1) * cos + llama.rotate_half(x.flip(-1)) * sin).flip(-1) for x in (q, k))

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", reversed_rotation)
    with pytest.raises(KNNLMError, match="keys do not turn as attention memory turns them"):
        windowed(tiny_lm, ids, AttentionMemoryConfig(layers="all", k=8))
    assert tiny_lm.model.config._attn_implementation == "sdpa"  # left as it was
