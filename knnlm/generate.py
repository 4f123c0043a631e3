"""Decoding with the kNN-LM: a transformers LogitsProcessor over the interpolated distribution.

The processor needs the query of each step: the lm_head's input at the last position. It takes
it with a forward-pre-hook on the model's output projection, so `model.generate` runs unchanged
(with its KV cache) and the processor only adds one search per step.

    with KNNLogitsProcessor(lm, retriever, lam=0.25, temperature=30) as knn:
        out = lm.model.generate(ids, logits_processor=LogitsProcessorList([knn]), max_new_tokens=32)
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from .errors import KNNLMError, expect
from .combine import Combiner, resolve_combiner
from .combine.features import lm_stats
from .lm import LM, QueryHook
from .memory.attention import AttentionMemoryConfig
from .memory.document import DocumentMemory, MemoryConfig, MemoryProcessor, join_neighbors, prompt_memory, resolve_memory
from .memory.reading import reading_with_memory
from .memory.rotary import longrope_switch
from .retomaton import next_pointers, open_automaton
from .retomaton import step as retomaton_step
from .retrieval import Retriever
from .scores import Scores
from .windows import check_window, plan_windows


class KNNLogitsProcessor(QueryHook, LogitsProcessor):
    """Replaces the model's next-token scores with log(λ·p_kNN + (1−λ)·p_LM).

    Usable with `model.generate(..., logits_processor=LogitsProcessorList([processor]))`, greedy
    or sampled. Returned scores are log-probabilities, so greedy picks the interpolated argmax
    and sampling draws from the interpolated distribution. A row whose query finds no neighbour
    keeps the LM's distribution; tokens an earlier processor set to -inf stay at -inf. λ mixing
    takes p_LM from the scores it is given (after earlier processors); SPALM projects its own
    mixed hidden state, so it keeps only their -inf masks (a repetition penalty is lost).

    With the retriever's RetoMaton on (RetrievalConfig.retomaton), the token chosen at a step (the
    last of input_ids at the next call) moves the pointers of that step's neighbours. Each row follows
    the row its input_ids extend (beam search reorders them); a call whose input_ids extend no row of
    the last one starts afresh with a search, so one processor serves several generate calls.
    Batches must be padded on the left (the query is the last position's). Classifier-free guidance
    and assisted or prompt-lookup decoding run forward passes the processor cannot tell from the
    step's; they are refused.

    Attach it to one model at a time; use it as a context manager (or call `close()`) to remove
    its hook from the model afterwards.

    Args:
        lm: the model the datastore was built with.
        retriever: search over that datastore.
        lam: a number in [0, 1], "tuned", "adaptive", "gate", "gate-pre" (read from the
            datastore's lambda.json), or a Combiner.
        temperature: T of softmax(−d/T); None takes the tuned T, else 1.
        combine: "mix" (λ-interpolation) or "spalm" (SPALM's gated memory).
        skip_below: skip the search where the before-retrieval gate predicts λ below this (a
            number, or "tuned"); those steps keep p_LM.
        memory: a document memory whose neighbours join the datastore's ("joint" mix); None: none.
    """

    def __init__(self, lm: LM, retriever: Retriever, lam: str | float | Combiner = 0.25,
                 temperature: float | None = None, combine: str = "mix", skip_below: str | float | None = None,
                 memory: DocumentMemory | None = None):
        from .evaluate import search_settings

        retriever.ds.check_compatible(lm)
        self.retriever = retriever
        self.combiner = resolve_combiner(lam, retriever.ds.path, combine, skip_below, temperature,
                                         search_settings(retriever.ds, retriever))
        self.temperature = self.combiner.temperature
        self.head = lm.output_head
        if self.combiner.kind == "spalm":
            self.head.check()  # its probe is a forward pass: before this processor's hook reads them
        self.retrieval_seconds = 0.0
        self.searches = self.skipped = 0  # queries searched and skipped so far
        self.saved = 0  # queries whose search RetoMaton's pointers saved
        self._automaton = open_automaton(retriever) if retriever.follows_pointers else None
        self.last: dict | None = None  # the last step's neighbours, for inspection
        self.memory, self._last_token = memory, -1
        QueryHook.__init__(self, lm)

    def distribution(self, queries: torch.Tensor, lm_logits: torch.Tensor, pointers: np.ndarray | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Next-token log-probabilities of the kNN-LM for given queries and LM scores.

        Args:
            queries: (B, d) keys of the positions being predicted (the lm_head's inputs).
            lm_logits: (B, V) the model's scores for those positions.
            pointers: (B, P) RetoMaton's pointers into the datastore (-1 padded), or None to search.
            dtype: float64, or float32 for a decoding step whose scores are float32 anyway: p_LM is then
                normalised in float32 (a third of the time over V) and the λ-mix keeps float32 for the
                tokens no neighbour carries (mixing those it carries in float64).

        Returns:
            (B, V) log-probabilities (SPALM's always float64).
        """
        lm_logp_t = torch.log_softmax(lm_logits.detach().cpu().to(dtype), dim=-1)  # (B, V)
        q = queries.float().cpu().numpy()  # (B, d)
        # Only the learned gate and the skip read the LM's statistics: spare the others the cost per step.
        stats = lm_stats(lm_logp_t) if self.combiner.reads_lm_stats else {}
        t0 = time.perf_counter()
        keep = self.combiner.search_mask(q, stats)
        if pointers is None:
            dists, ids, vals = self.retriever.neighbors(q, keep)
            saved = np.zeros(len(q), bool)
        else:
            dists, ids, vals, saved = retomaton_step(self.retriever, self._automaton, q, pointers, keep)
        searched = np.ones(len(q), bool) if keep is None else keep
        self.saved += int(saved.sum())
        self.searches += int((searched & ~saved).sum())
        self.skipped += int((~searched).sum())
        # The datastore's own neighbours (RetoMaton's pointers follow them), before any memory joins them.
        self.last = {"dists": dists, "ids": ids, "vals": vals, "searched": searched}
        if self.memory is not None:  # "joint": the memory's neighbours join the datastore's
            dists, vals = join_neighbors(dists, vals, *self.memory.step(queries, self._last_token))
        self.retrieval_seconds += time.perf_counter() - t0
        zeros = np.zeros(len(q), np.int32)
        view = Scores(zeros, np.zeros(len(q)), dists, vals, zeros, zeros, queries=q, searched=searched, **stats)
        return torch.from_numpy(self.combiner.distribution(view, lm_logp_t.numpy(), self.head))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The transformers LogitsProcessor hook: scores (B, V) in, log-probabilities (B, V) out."""
        q, parents, rows = self.take_query(input_ids)
        if self.memory is not None:
            self.memory.check_continues(parents)
        self._last_token = int(rows[0, -1])
        pointers = None
        if self._automaton is not None:
            # The token chosen last step (input_ids' last) drives the pointers of the neighbours of each row's
            # row in the last step; a new generation starts with a search.
            last = self.last
            if parents is not None and last is not None:
                pointers = next_pointers(last["ids"][parents], last["vals"][parents], rows[:, -1], self._automaton)
            else:
                pointers = np.full((q.shape[0], 1), -1, np.int64)
        work = torch.float64 if scores.dtype == torch.float64 else torch.float32  # what the scores can hold
        out = self.distribution(q, scores, pointers, work).to(scores.device, scores.dtype)
        # Tokens an earlier processor ruled out (suppressed tokens, min_new_tokens, ...) stay out (out is our own).
        if float(scores.amin()) > -math.inf:  # one reduction (NaN fails it too); the mask only where needed
            return out
        return out.masked_fill_(scores == -math.inf, -math.inf)


@dataclass
class Generation:
    """A continuation and what it cost."""

    text: str  # the new text only
    tokens: list[int]  # the new token ids
    seconds: float
    retrieval_seconds: float
    searches_skipped: int = 0  # steps whose search the learned skip left out
    searches_saved: int = 0  # steps whose search RetoMaton's pointers saved
    tuned_settings_differ: str | None = None  # tuned values used with other search settings: what differs


def generate(lm: LM, prompt: str, retriever: Retriever | None = None, lam: str | float | Combiner = 0.25,
             temperature: float | None = None, max_new_tokens: int = 64, sample: bool = False,
             seed: int = 0, window: tuple[int, int] | None = None, combine: str = "mix",
             skip_below: str | float | None = None, memory: MemoryConfig | None = None,
             attention: AttentionMemoryConfig | None = None) -> Generation:
    """Continue a prompt with the kNN-LM (or with the LM alone when retriever is None).

    Decoding runs in the datastore's windows (context, stride), the way build and eval cut a
    document: every position sees the tokens from the start of the window that owns it, so the
    query of each step is the key build would have stored for that position in a document that
    starts at the prompt's first token. Within a window a KV cache makes each step one token;
    when a position falls past the window's end, the next window is prefilled without a cache.

    Args:
        lm: the model.
        prompt: text to continue, encoded as it is (no chat template, no special tokens), the
            way the datastore's text was.
        retriever: search over the datastore; None decodes with the LM alone.
        lam: λ: a number, "tuned", "adaptive", "gate", "gate-pre" or a Combiner.
        temperature: T of p_kNN; None takes the tuned T, else 1.
        max_new_tokens: tokens to add.
        sample: draw from the distribution instead of taking its argmax.
        seed: seed of the sampler (a generator of its own: the caller's torch RNG is left alone).
        window: (context, stride) of the decoding windows. With a retriever it is the
            datastore's (None takes it; another is refused). For the LM alone pass the
            datastore's to compare the two fairly; None decodes in one window as long as the
            model allows.
        combine: "mix" (λ-interpolation) or "spalm" (SPALM's gated memory).
        skip_below: skip the search where the before-retrieval gate predicts λ below this (a
            number, or "tuned").
        memory: the document memory: the prompt's and the continuation's own positions, searched
            exactly at each step ("joint": beside the datastore's neighbours; "separate" or without a
            datastore: p_mem with its λ_m, T_m). None or memory "none": no memory.
        attention: kNN-augmented attention: the KV cache is cut to the window's context (the
            prompt read in chunks of its stride, then a token per step), and what leaves the cache
            joins the memory the chosen layers retrieve from. Without a window or datastore: eval's (512, 256), or
            (P, P // 2) for a model of P < 512 positions.

    Returns:
        The Generation.
    """
    expect(max_new_tokens, int, "max_new_tokens", "64")
    expect(seed, int, "seed", "0")
    expect(memory, MemoryConfig, "memory", "MemoryConfig('document')", optional=True)
    expect(attention, AttentionMemoryConfig, "attention_memory", "AttentionMemoryConfig()", optional=True)
    if max_new_tokens < 1:
        raise KNNLMError(f"--max-new-tokens {max_new_tokens} must be at least 1.")
    if seed != 0 and not sample:
        raise KNNLMError(f"seed {seed} seeds the sampler, and greedy decoding draws nothing; pass sample=True "
                         "(--sample), or leave the seed out.")
    if memory is not None:
        memory.check_use(retriever is not None)
    ids = lm.encode(prompt)
    if not ids:
        bos = getattr(lm.tokenizer, "bos_token_id", None)
        if bos is None:
            raise KNNLMError("The prompt is empty; pass some text with --prompt.")
        ids = [bos]
    if retriever is not None:
        stored = (int(retriever.ds.meta["context"]), int(retriever.ds.meta["stride"]))
        if window is not None and tuple(window) != stored:
            raise KNNLMError(f"Decoding windows {tuple(window)} differ from the datastore's (context, stride) "
                             f"{stored}; queries would not match the stored keys. Leave the window out.")
        window = stored
    limit = lm.max_positions
    if attention is not None and window is None:
        from .evaluate import NO_DATASTORE_WINDOW

        # attention memory reads through a window: eval's without a datastore, halved for a model of fewer positions
        context = min(NO_DATASTORE_WINDOW[0], limit or NO_DATASTORE_WINDOW[0])
        window = NO_DATASTORE_WINDOW if context == NO_DATASTORE_WINDOW[0] else (context, max(1, context // 2))
    if window is None:
        if limit and len(ids) + max_new_tokens > limit:
            raise KNNLMError(f"The prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                             f"model's {limit} positions; shorten the prompt or ask for fewer tokens.")
        context = stride = len(ids) + max_new_tokens  # one window: never restarted
    else:
        context, stride = window
        check_window(context, stride, limit)
    t0 = time.perf_counter()
    doc_memory = prompt_memory(lm, ids, context, stride, memory.k, attention=attention) \
        if memory is not None and memory.on else None
    joint = doc_memory is not None and retriever is not None and memory.mix == "joint"
    processor = KNNLogitsProcessor(lm, retriever, lam, temperature, combine, skip_below,
                                   doc_memory if joint else None) if retriever is not None else None
    mem_processor = MemoryProcessor(lm, doc_memory, *resolve_memory(memory, retriever.ds.path if retriever else None)[:2]) \
        if doc_memory is not None and not joint else None
    try:
        new = _decode(lm, ids, [p for p in (processor, mem_processor) if p], max_new_tokens,
                      context, stride, torch.Generator(device=lm.device).manual_seed(seed) if sample else None,
                      attention)
    finally:
        for p in (processor, mem_processor):
            if p is not None:
                p.close()
    return Generation(text=lm.decode(new, skip_special_tokens=True), tokens=new,
                      seconds=time.perf_counter() - t0,
                      retrieval_seconds=processor.retrieval_seconds if processor else 0.0,
                      searches_skipped=processor.skipped if processor else 0,
                      searches_saved=processor.saved if processor else 0,
                      tuned_settings_differ=processor.combiner.mismatch if processor else None)


def window_begin(position: int, context: int, stride: int) -> int:
    """First token of the window that owns `position` in plan_windows' plan of a document from token 0."""
    plan = plan_windows(0, position + 2, context, stride)  # position + 2 tokens: the position has a next token
    return next(w.begin for w in plan if w.own_from <= position < w.own_to)


def _eos_ids(lm: LM) -> set[int]:
    """Tokens that end a continuation, as model.generate would read them."""
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _decode(lm: LM, ids: list[int], processors: list[LogitsProcessor], max_new_tokens: int, context: int,
            stride: int, generator: torch.Generator | None,
            attention: AttentionMemoryConfig | None = None) -> list[int]:
    """New tokens after ids (extended in place), greedy or drawn with generator, in windows of (context, stride)
    (with attention memory: through a KV cache cut to the window)."""
    model, eos = lm.model, _eos_ids(lm)
    params = inspect.signature(model.forward).parameters
    # Only the last position's logits are needed; not every model's forward takes logits_to_keep.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
    new: list[int] = []
    begin, cache = -1, None
    switch = longrope_switch(model)  # a window's pass reading past it turns every key by other frequencies
    memory = reading_with_memory(lm, attention, context, stride) if attention is not None else nullcontext()
    with torch.inference_mode(), memory as reader:
        for _ in range(max_new_tokens):
            pos = len(ids) - 1  # its key is this step's query; it predicts token pos + 1
            if reader is not None:
                scores = reader.scores(ids)  # (1, V): a KV cache cut to the window, what left it in memory
            else:
                new_window = begin < 0 or pos - begin >= context
                if new_window:  # prefilled without a cache: positions count from its first token, as in build
                    begin = window_begin(pos, context, stride)
                if new_window or pos - begin == switch:  # (past a longrope switch: read again, as Phi-3's generate)
                    feed, cache = ids[begin:], None
                else:
                    feed = ids[-1:]
                out = model(input_ids=torch.tensor([feed], device=lm.device), use_cache=True, **{cache_arg: cache},
                            **keep)
                # "cache" since transformers 5 (asking a new output for "past_key_values" logs a deprecation)
                cache = out["cache"] if "cache" in out else out["past_key_values"]
                scores = out.logits[:, -1, :].float()  # (1, V)
            if processors:
                # each called as it is: LogitsProcessorList's call inspects every processor's signature every
                # step (65 µs a step in place); ours take (input_ids, scores) and nothing else
                input_ids = torch.tensor([ids], device=lm.device)
                for processor in processors:
                    scores = processor(input_ids, scores)
            if generator is not None:
                token = int(torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator))
            else:
                token = int(scores.argmax(dim=-1))
            ids.append(token)
            new.append(token)
            if token in eos:
                break
    return new
