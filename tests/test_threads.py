"""One loaded model used from several threads: each thread's hooks take its own passes only.

The model's passes in one thread reach every hook on it, so a hook must not take another thread's pass
(before: LM.forward took another thread's keys, silently; a keys-only call's hook stopped another thread's
pass, which then had no logits; attention memory read another thread's batch as its document). Each test makes
the bad interleaving happen for sure: a hook pauses one thread at a chosen point while the other runs.
"""

from __future__ import annotations

import threading

import pytest
import torch

from knnlm.errors import KNNLMError
from knnlm.lm import QueryHook
from knnlm.memory.attention import AttentionMemoryConfig, attached


def _run(fn):
    """fn() in another thread, to its end; returns its result (or raises its exception here)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def batches(tiny_lm, corpus_texts):
    """Two different batches: (ids, mask) of 1 × 40 and 2 × 24 tokens."""
    ids = tiny_lm.encode(corpus_texts["textwrap.py"])
    a = torch.tensor([ids[:40]])
    b = torch.tensor([ids[100:124], ids[200:224]])
    return (a, torch.ones_like(a)), (b, torch.ones_like(b))


@pytest.mark.parametrize("logits", [True, False])
def test_another_threads_pass_during_a_forward_leaves_both_results_alone(tiny_lm, batches, logits):
    """Thread A is paused right after its lm_head has run; thread B runs a whole forward meanwhile."""
    (a, am), (b, bm) = batches
    alone_a, alone_b = tiny_lm.forward(a, am, logits=logits), tiny_lm.forward(b, bm)
    head = tiny_lm.model.get_output_embeddings()
    main, got_b = threading.get_ident(), {}

    def pause(_module, _args, _out):
        if threading.get_ident() == main and not got_b:
            got_b["value"] = _run(lambda: tiny_lm.forward(b, bm))

    handle = head.register_forward_hook(pause) if logits else head.register_forward_pre_hook(
        lambda m, args: pause(m, args, None))
    try:
        got_a = tiny_lm.forward(a, am, logits=logits)
    finally:
        handle.remove()
    assert torch.equal(got_a[0], alone_a[0]) and (got_a[1] is None) == (not logits)
    if logits:
        assert torch.equal(got_a[1], alone_a[1])
    assert torch.equal(got_b["value"][0], alone_b[0]) and torch.equal(got_b["value"][1], alone_b[1])


def test_attention_memory_reads_only_its_own_threads_passes(tiny_lm, batches):
    """While one thread reads a document through attention memory (a full memory), another thread's batches go
    through the model's own attention (before: 'reads one document at a time', or the memory's keys in its
    softmax)."""
    (a, am), (b, bm) = batches
    alone = tiny_lm.forward(b, bm)
    with attached(tiny_lm, AttentionMemoryConfig(layers="all", k=8)) as memory:
        memory.start(16)
        memory.begin_forward(0, torch.arange(40), capture=True)
        tiny_lm.forward(a, am)
        memory.stash(0, 40)
        memory.release(40)  # 40 entries per layer: every later pass of this thread retrieves
        assert len(memory) == 40
        got = _run(lambda: tiny_lm.forward(b, bm))
        with pytest.raises(KNNLMError, match="already has an attention memory attached"):
            _run(lambda: attached(tiny_lm, AttentionMemoryConfig()).__enter__())
    assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])


def test_query_hook_takes_its_own_threads_passes_and_serves_one_thread(tiny_lm, batches):
    (a, _), (b, _) = batches
    with QueryHook(tiny_lm) as hook, QueryHook(tiny_lm) as reference, torch.inference_mode():
        tiny_lm.model(input_ids=a)
        _run(lambda: tiny_lm.model(input_ids=b))  # another thread's pass between the step and its processor
        query, parents, _ = hook.take_query(a)
        assert torch.equal(query, reference.take_query(a)[0]) and parents is None
        tiny_lm.model(input_ids=a)
        with pytest.raises(KNNLMError, match="serves the generation of the thread that first used it"):
            _run(lambda: hook.take_query(a))


def test_a_processor_made_in_one_thread_generates_in_another(tiny_lm, batches):
    """The thread of its first step is the one it serves (a processor made by one thread, used by a worker)."""
    (a, _), _ = batches
    hook = QueryHook(tiny_lm)
    try:
        def step():
            with torch.inference_mode():
                tiny_lm.model(input_ids=a)
            return hook.take_query(a)[0]

        with QueryHook(tiny_lm) as reference:
            got = _run(step)
            with torch.inference_mode():
                tiny_lm.model(input_ids=a)
            assert torch.equal(got, reference.take_query(a)[0])
    finally:
        hook.close()


def test_the_memory_function_called_after_detaching_runs_the_models_own(tiny_lm):
    """Another thread's pass that looked the memory's attention function up just before the memory was detached
    gets the model's own attention (before: a sentence telling it to restore an implementation already restored)."""
    from knnlm.memory.attention import _attention_modules, _base_function, memory_attention

    module = _attention_modules(tiny_lm.model)[0]
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, heads, 6, 8, generator=g) for heads in (4, 2, 2))
    with attached(tiny_lm, AttentionMemoryConfig()):
        pass
    own = _base_function(tiny_lm.model.config._attn_implementation, module)
    want = own(module, query, key, value, None, scaling=8 ** -0.5)[0]
    got = memory_attention(module, query, key, value, None, scaling=8 ** -0.5)[0]
    assert torch.equal(got, want)
    before = tiny_lm.model.config._attn_implementation
    tiny_lm.model.config._attn_implementation = "knnlm_memory_sdpa"  # left switched, outside any attach
    try:
        with pytest.raises(KNNLMError, match="ran outside `attached`"):
            memory_attention(module, query, key, value, None, scaling=8 ** -0.5)
    finally:
        tiny_lm.model.config._attn_implementation = before
