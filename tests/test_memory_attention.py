"""kNN-augmented attention: empty memory changes nothing; full memory at exact positions is full attention."""

from __future__ import annotations

import numpy as np
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
    window = max_gap(windowed(tiny_lm, ids, None), full)
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
        memory.commit(0, 4)
        assert len(memory) == 4 and memory.keys[0].shape[1] == 4
        batch = torch.tensor([ids[:8], ids[8:16]])
        memory.begin_forward(4, torch.arange(8), capture=False)
        with pytest.raises(KNNLMError, match="one document"):
            tiny_lm.forward(batch, torch.ones_like(batch))
    assert tiny_lm.model.config._attn_implementation == "sdpa"
    np.testing.assert_equal(len(ids), 200)
