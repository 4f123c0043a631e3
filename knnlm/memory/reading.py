"""Reading a document through a window with attention memory: in eval's windows, and in generation with a cut cache.

Eval scores a document's windows one after another (batched windows of several documents cannot share
one memory): each token's keys and values are the ones of the window that owns (scores) it, and they
join the memory when the token leaves the window, i.e. before the first window that starts after it.
Generation keeps a KV cache of at most W tokens; what leaves the cache goes to the memory.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from ..windows import Owned, Window
from .attention import AttentionMemory, AttentionMemoryConfig, attached
from .rotary import longrope_switch

if TYPE_CHECKING:
    from ..lm import LM


def forward_in_order(lm: LM, work: list[tuple[Window, list[int]]], cfg: AttentionMemoryConfig,
                     context: int) -> Iterator[list[Owned]]:
    """forward_owned with attention memory: one window per pass, each document's windows in order.

    Args:
        lm: the model.
        work: (window, token ids of the window's [begin, end)) pairs, grouped by document, windows in order.
        cfg: the attention memory's settings.
        context: the window length W (fixed positions put retrieved keys W tokens before the query).

    Yields:
        A one-element list per window: its Owned rows (as forward_owned yields them).
    """
    with attached(lm, cfg) as memory:
        for i, (w, ids) in enumerate(work):
            if i == 0 or work[i - 1][0].doc != w.doc:
                memory.start(context)
            elif work[i - 1][0].index + 1 != w.index:
                raise ValueError("attention memory needs each document's windows in order")
            nxt = work[i + 1][0] if i + 1 < len(work) and work[i + 1][0].doc == w.doc else None
            memory.begin_forward(w.begin, torch.arange(len(ids)), capture=nxt is not None)
            batch = torch.tensor([ids])  # (1, T)
            keys, logits = lm.forward(batch, torch.ones_like(batch))  # (1, T, d), (1, T, V)
            lo, hi = w.own_from - w.begin, w.own_to - w.begin
            if nxt is not None:  # the tokens before the next window's start leave the window now
                memory.stash(lo, hi)
                memory.release(nxt.begin)
            yield [Owned(i, w, keys[0, lo:hi], logits[0, lo:hi])]


class CutCacheReader:
    """Feeds a growing token list to the model with a KV cache of at most `context` tokens.

    The prompt goes in chunks of `stride` tokens, then one token per step; before each chunk the
    cache's oldest entries are cut so that no query sees more than `context` local tokens, and the
    cut keys (rotation taken off) and values of the retrieving layers join the memory. Positions are
    absolute: the cache's keys keep the rotation of their true positions. Each pass takes the rotation
    off its own new keys as it runs (the memory's capture), so that a key leaves the cache turned back
    by the very frequencies that turned it, also where a rope type picks them by the length a pass
    reads (longrope, dynamic NTK).
    """

    def __init__(self, lm: LM, memory: AttentionMemory, context: int, stride: int):
        if not 0 < stride <= context:
            raise ValueError(f"stride {stride} must be in 1..context ({context})")
        self.lm, self.memory, self.context, self.stride = lm, memory, context, stride
        params = inspect.signature(lm.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        # Only the last position's logits are needed; not every model's forward takes logits_to_keep.
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.switch = longrope_switch(lm.model)
        self._restart()

    def _restart(self) -> None:
        """Nothing read yet: the next pass reads from the first token."""
        from transformers import DynamicCache

        # Plain layers only: a model's sliding cache layers (Mistral's, Gemma's) keep a count of their own that
        # cut() would not move, which shifts their masks. The cut already bounds what a layer sees, and the
        # model's mask still slides within the cache.
        self.cache = DynamicCache()
        self.fed = 0  # tokens read so far: the absolute position of the next one
        self.first = 0  # absolute position of the cache's oldest entry
        self.memory.start(self.context)  # each pass's entries wait in its stash until the cut (see cut)

    def scores(self, ids: list[int]) -> torch.Tensor:
        """(1, V) float logits of the token after ids, reading the tokens not read yet."""
        out = None
        while self.fed < len(ids):
            n = min(self.stride if self.fed < len(ids) - 1 else 1, len(ids) - self.fed)
            if self.switch is not None and 0 < self.fed <= self.switch < self.fed + n:
                # the first pass past a longrope model's switch: its keys turn by the long frequencies now
                if self.first == 0 and self.fed + n <= self.context:
                    # all read so far fits the window: read it again in this one pass, as the model's own
                    # generate recomputes its cache there (Phi-3)
                    n += self.fed
                    self._restart()
                else:
                    self._turn_cache(self.fed + n - 1)
            self.cut(self.context - n)
            positions = torch.arange(self.fed, self.fed + n)
            self.memory.begin_forward(0, positions, capture=True)
            out = self.lm.model(input_ids=torch.tensor([ids[self.fed: self.fed + n]], device=self.lm.device),
                                position_ids=positions[None].to(self.lm.device), use_cache=True,
                                **{self.cache_arg: self.cache}, **self.keep)
            self.memory.stash(0, n)  # its keys with the rotation this pass gave them taken off, until the cut
            self.fed += n
        return out.logits[:, -1, :].float()

    def _turn_cache(self, reach: int) -> None:
        """Turn the cache's keys, all turned by passes before a longrope switch (short frequencies), by the
        frequencies of a pass reading to `reach` (long), so that local keys sit where this pass's queries expect
        them. Their states (computed through short-frequency attention) stay: recomputing them would mean reading
        past the window."""
        positions = torch.arange(self.first, self.fed)
        for layer, cached in enumerate(self.cache.layers):
            keys = cached.keys[0]  # (H_kv, S, D)
            cos, sin = self.memory.rope.cos_sin(layer, positions, keys, self.fed - 1)
            unturned = self.memory.rope.unrotate(keys, cos, sin)
            cos, sin = self.memory.rope.cos_sin(layer, positions, keys, reach)
            cached.keys = self.memory.rope.rotate(unturned, cos, sin)[None]

    def cut(self, keep: int) -> None:
        """Cut the cache to its newest `keep` entries; the retrieving layers' cut entries go to the memory."""
        drop = self.fed - self.first - keep
        if drop <= 0:
            return
        for cached in self.cache.layers:
            cached.keys, cached.values = cached.keys[:, :, drop:], cached.values[:, :, drop:]
        self.first += drop
        self.memory.release(self.first)


@contextmanager
def reading_with_memory(lm: LM, cfg: AttentionMemoryConfig, context: int, stride: int) -> Iterator[CutCacheReader]:
    """A CutCacheReader whose model attends through attention memory inside the block."""
    with attached(lm, cfg) as memory:
        yield CutCacheReader(lm, memory, context, stride)
