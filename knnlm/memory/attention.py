"""kNN-augmented attention in a frozen model (Memorizing Transformers at inference time, without training).

At chosen layers every head's queries attend, in one softmax, to the local window (the model's own
keys) and to the top-k (key, value) pairs retrieved from a memory of that layer's keys and values that
have left the window. The memory holds keys without their rotary rotation, with their absolute
positions; a read rotates them at their true positions ("exact") or as if every one sat a window's
length before the query ("fixed", InfLLM's choice, which keeps distances inside the trained range).

It hooks into transformers through its attention interface: `attached(lm, cfg)` registers
`memory_attention` under a name, switches the model to it (`set_attn_implementation`) and back after.
Layers that do not retrieve, and any layer while its memory is empty, run the model's own attention
function unchanged, so an empty memory gives exactly today's numbers.

    with attached(lm, AttentionMemoryConfig(layers=(20, 25), k=64)) as memory:
        memory.start(window=256)
        memory.begin_forward(offset=0, positions=torch.arange(256), capture=True)
        lm.forward(ids, mask)
        memory.stash(0, 256)  # keep the window's keys and values
        memory.release(128)  # positions 0..127 leave the window: they join the memory
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import KNNLMError, settle
from ..lm import probe_ids
from .rotary import Rope, find_rotary, rotate_half, rotate_interleaved

if TYPE_CHECKING:
    from ..lm import LM


class Positions(str, Enum):
    """Where a retrieved key is rotated."""

    EXACT = "exact"  # at its true position (window + full memory is then exactly full attention)
    FIXED = "fixed"  # at one distance, the window's length, before every query (InfLLM)


class Retrieval(str, Enum):
    """Who retrieves."""

    HEAD = "head"  # every query head picks its own top-k
    GROUP = "group"  # the heads sharing a KV head pick one top-k by their summed scores (GQA)


@dataclass(frozen=True)
class AttentionMemoryConfig:
    """Settings of kNN-augmented attention (`--attention-memory`)."""

    # decoder layers that retrieve: "all", "top-third", "top-half", or "3,7,10-12". All by default: a
    # layer without memory sees the others' changed hidden states and loses its attention sink.
    layers: str = "all"
    k: int = 64  # (key, value) pairs each head (or KV group) retrieves per query
    positions: Positions = Positions.EXACT  # rotary positions of retrieved keys: exact or fixed (InfLLM)
    retrieval: Retrieval = Retrieval.GROUP  # top-k per query head, or per KV-head group

    def __post_init__(self):
        settle(self, "k", int, "k", "64")
        if self.k < 1:
            raise KNNLMError(f"--memory-k {self.k} must be at least 1 (key, value) pair per query.")
        try:
            object.__setattr__(self, "positions", Positions(self.positions))
            object.__setattr__(self, "retrieval", Retrieval(self.retrieval))
        except ValueError as e:
            raise KNNLMError(f"{e}; --memory-positions takes exact or fixed, --memory-retrieval head or group.") from e
        parse_layers(self.layers, None)  # syntax now; the range when a model is known

    @property
    def describe(self) -> dict:
        """Plain JSON of the settings."""
        return {"layers": self.layers, "k": self.k, "positions": self.positions.value,
                "retrieval": self.retrieval.value}


def parse_layers(spec: str, n_layers: int | None) -> tuple[int, ...]:
    """Layer numbers of a --memory-layers spec: "all", "top-third", "top-half", or numbers and ranges "3,7,10-12".
    n_layers None checks the spec alone, before a model is loaded, and returns ()."""
    spec = str(spec).strip()
    if spec in ("all", "top-third", "top-half") and n_layers is None:
        return ()
    if spec == "all":
        return tuple(range(n_layers))
    if spec in ("top-third", "top-half"):
        share = 3 if spec == "top-third" else 2
        return tuple(range(n_layers - max(1, n_layers // share), n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi if dash else lo) + 1))
    except ValueError:
        raise KNNLMError(f"--memory-layers {spec!r} is not a layer list; pass e.g. 'all', 'top-third' or "
                         "'20,24-29' (layers count from 0).") from None
    if not out:
        raise KNNLMError(f"--memory-layers {spec!r} names no layer (a range runs from its lower number to its higher, "
                         "as in '24-29'); pass e.g. 'all' or '20,24-29'.")
    if n_layers is None:
        return ()
    bad = sorted(x for x in out if not 0 <= x < n_layers)
    if bad:
        raise KNNLMError(f"--memory-layers {spec!r} names layers {bad}, but the model has layers "
                         f"0 to {n_layers - 1}; pass layers in that range.")
    return tuple(sorted(out))


class AttentionMemory:
    """One document's memory: per retrieving layer, keys before rotation and values, with absolute positions."""

    def __init__(self, cfg: AttentionMemoryConfig, layers: tuple[int, ...], rope: Rope):
        self.cfg, self.layers, self.rope = cfg, frozenset(layers), rope
        self.window = 0
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (H_kv, N, D) keys without rotation
        self.values: dict[int, torch.Tensor] = {}  # layer -> (H_kv, N, D)
        self.positions = torch.zeros(0, dtype=torch.long)  # (N,) absolute positions of the entries
        self.offset = 0  # absolute position of position 0 of the current forward pass
        self.frame = torch.zeros(0, dtype=torch.long)  # (T,) positions (as the model sees them) of its tokens
        self.capture = False  # keep this pass's new keys and values, for stash()
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> ((H_kv, T, D), (H_kv, T, D))
        # stashed, not yet left the window: (absolute positions (n,), {layer: (keys, values)}) per stash, in order
        self.pending: list[tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = []

    def __len__(self) -> int:
        return int(self.positions.numel())

    def start(self, window: int) -> None:
        """Empty the memory for a new document read in windows of `window` tokens."""
        self.window = window
        self.keys, self.values, self.captured, self.pending = {}, {}, {}, []
        self.positions = torch.zeros(0, dtype=torch.long)

    def begin_forward(self, offset: int, positions: torch.Tensor, capture: bool) -> None:
        """Say what the next forward pass is: its tokens' positions and the absolute position of position 0."""
        self.offset, self.frame, self.capture = offset, positions.long().cpu(), capture
        self.captured = {}

    def append(self, entries: dict[int, tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor) -> None:
        """Add keys (without rotation) and values, (H_kv, n, D) per layer, at absolute positions (n,)."""
        for layer, (k, v) in entries.items():
            old_k, old_v = self.keys.get(layer), self.values.get(layer)
            self.keys[layer] = k if old_k is None else torch.cat([old_k, k], dim=1)
            self.values[layer] = v if old_v is None else torch.cat([old_v, v], dim=1)
        self.positions = torch.cat([self.positions, positions.long().cpu()])

    def stash(self, lo: int, hi: int) -> None:
        """Keep tokens [lo, hi) of the last forward pass until they leave the window (see release); each stash holds
        later positions than the one before (a document is read forward).

        Eval stashes each window's owned tokens, the ones it saw with the most left context: a token
        at the very start of a window attends only to itself and becomes an attention sink, a key
        that retrieval would keep finding. Generation's cut cache stashes every pass's tokens.
        """
        if set(self.captured) != set(self.layers):
            raise KNNLMError("Attention memory captured nothing in the last forward pass; call begin_forward "
                             "with capture=True before the pass, inside `attached`.")
        if hi > lo:
            self.pending.append((self.frame[lo:hi] + self.offset, _part(self.captured, slice(lo, hi))))

    def release(self, before: int) -> None:
        """Move the stashed tokens at absolute positions before `before` (they left the window) into the memory:
        the oldest stashes', so only those are touched (a decoding step releases one token of a window's)."""
        gone = []
        while self.pending and self.pending[0][0][0] < before:
            positions, entries = self.pending.pop(0)
            n = int((positions < before).sum())  # a prefix: positions ascend
            if n < len(positions):  # the rest stays
                self.pending.insert(0, (positions[n:], _part(entries, slice(n, None))))
            gone.append((positions[:n], _part(entries, slice(n))))
        if gone:
            self.append({layer: tuple(torch.cat([g[1][layer][i] for g in gone], dim=1) for i in (0, 1))
                         for layer in gone[0][1]}, torch.cat([g[0] for g in gone]))


def _part(entries: dict[int, tuple[torch.Tensor, torch.Tensor]], part: slice) -> dict:
    """The entries' (keys, values) of each layer, cut to the tokens `part`."""
    return {layer: (k[:, part], v[:, part]) for layer, (k, v) in entries.items()}


@dataclass
class _Hooked:
    """What the attention function needs for one attention module of an attached model."""

    memory: AttentionMemory
    base: object  # the model's own attention function, run where nothing is retrieved
    thread: int  # the thread reading through the memory; the model's passes in other threads are not its document's


_HOOKED: dict[int, _Hooked] = {}  # id(attention module) -> its memory and base function
_NAME = "knnlm_memory"


def _base_function(implementation: str, module: torch.nn.Module):
    """The attention function the model ran before it was attached."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # eager is each model file's own eager_attention_forward
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise KNNLMError(f"Attention memory cannot run next to the model's {implementation!r} attention (its model "
                         "file has no eager_attention_forward); load it with attn_implementation='sdpa'.")
    return fn


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder of a causal LM (not a multimodal model's vision tower); the model itself where it names none."""
    try:
        decoder = model.get_decoder()
    except Exception:  # no get_decoder, or remote code's that raises
        return model
    return decoder if isinstance(decoder, torch.nn.Module) else model


def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer number -> self-attention module, for decoders whose attention modules carry layer_idx (and
    num_key_value_groups, or is_causal: GPT-NeoX's carry no groups; a decoder layer carries neither)."""
    found = [m for m in _decoder(model).modules() if isinstance(getattr(m, "layer_idx", None), int)
             and (hasattr(m, "num_key_value_groups") or getattr(m, "is_causal", None) is True)]
    modules = {m.layer_idx: m for m in found}
    if len(modules) < len(found):  # e.g. cross-attention beside self-attention in one layer
        raise KNNLMError(f"{type(model).__name__} has several attention modules with one layer number, so attention "
                         "memory cannot tell its self-attention apart; use a decoder-only Llama-style model.")
    return modules


def _probe_span(lm: LM, decoder: torch.nn.Module) -> tuple[int, int]:
    """(tokens, shift) of _pick_pairing's two passes: 8 tokens 37 positions apart, less where the model reads fewer
    positions or its rotation changes with the length read (longrope past original_max_position_embeddings)."""
    limits = [lm.max_positions or 8 + 37]
    params = getattr(decoder.config, "rope_parameters", None)
    for p in ([params] + list(params.values())) if isinstance(params, dict) else []:
        if isinstance(p, dict) and isinstance(p.get("original_max_position_embeddings"), int):
            limits.append(p["original_max_position_embeddings"])
    limit = min(limits)
    n = min(8, limit // 2)
    return n, min(37, limit - n)


def _pick_pairing(lm: LM, memory: AttentionMemory, decoder: torch.nn.Module, modules: dict[int, torch.nn.Module]
                  ) -> None:
    """Set memory.rope.pair to the pairing under which each retrieving layer's keys, rotation taken off, are the
    same for the same tokens at two positions (rotary attention is relative, so the model's states are). A layer
    the model does not rotate (no rotary there, or its own function), a model that never calls the attention
    function, or one that rotates another way is refused in one sentence rather than read with keys turned
    wrongly."""
    model = lm.model
    n, shift = _probe_span(lm, decoder)
    if n < 1:
        raise KNNLMError(f"{type(model).__name__} reads {lm.max_positions} position(s), too few for attention memory "
                         "to check how it rotates its keys; use a model with a longer context.")
    ids = probe_ids(n, model.get_input_embeddings().num_embeddings)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2  # bf16/fp16 round coarsely
    tried = []
    for pair in (rotate_half, rotate_interleaved):
        memory.rope.pair = pair
        keys = []
        for at in (0, shift):
            positions = torch.arange(n) + at
            memory.begin_forward(0, positions, capture=True)
            with torch.inference_mode():
                model(input_ids=ids[None].to(lm.device), position_ids=positions[None].to(lm.device), use_cache=False)
            keys.append(memory.captured)
        memory.begin_forward(0, torch.zeros(0, dtype=torch.long), capture=False)
        silent = sorted(set(memory.layers) - set(keys[0]))
        ran = sorted(set(keys[0]) | (set(modules) - set(memory.layers)))  # those that may
        if silent and ran:  # e.g. Mllama's cross-attention layers, which attend over image states only
            raise KNNLMError(f"Layer(s) {','.join(map(str, silent))} of {type(model).__name__} did not attend over the "
                             "text through transformers' attention interface (a cross-attention layer, or a layer of "
                             "another kind), so attention memory cannot take part there; leave them out with "
                             f"--memory-layers (e.g. --memory-layers {','.join(map(str, ran))}).")
        if silent:
            raise KNNLMError(f"{type(model).__name__} did not run its attention through transformers' attention "
                             "interface, so attention memory cannot take part in it; use a Llama-style decoder "
                             "such as Llama, Qwen, Gemma or SmolLM2.")
        gaps = {layer: float((keys[0][layer][0].float() - keys[1][layer][0].float()).norm()
                             / keys[0][layer][0].float().norm().clamp_min(1e-30)) for layer in memory.layers}
        if max(gaps.values()) <= tolerance:
            return
        tried.append(gaps)
    # the pairing most layers agree with (then the nearer one): name its first layer that does not turn so
    gaps = max(tried, key=lambda g: (sum(x <= tolerance for x in g.values()), -max(g.values())))
    layer = min(x for x, g in gaps.items() if g > tolerance)
    raise KNNLMError(f"{type(model).__name__}'s keys do not turn as attention memory turns them (layer {layer} "
                     "first: no rotary embedding there, or one of another kind), so its memory keys would sit at "
                     "wrong positions; leave such layers out of --memory-layers, or use a Llama-style decoder such "
                     "as Llama, Qwen, Gemma or SmolLM2.")


@contextmanager
def attached(lm: LM, cfg: AttentionMemoryConfig) -> Iterator[AttentionMemory]:
    """Run the model's attention through memory_attention inside the block; yields the (empty) memory.

    Args:
        lm: the model (a RoPE decoder whose attention goes through transformers' attention interface).
        cfg: layers, k, positions, retrieval.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    lm.check_causal()  # before the model's attention is ours: its probe runs the model as it is
    model = lm.model
    decoder = _decoder(model)
    rotary = find_rotary(decoder)  # first: a model without RoPE (GPT-2, OPT, Bloom) is told that
    modules = _attention_modules(model)
    if not modules:
        raise KNNLMError(f"{type(model).__name__}'s attention modules carry no layer_idx (with num_key_value_groups "
                         "or is_causal), so attention memory cannot route them; it needs a Llama-style transformers "
                         "decoder such as Llama, Qwen, Mistral, Gemma, GPT-NeoX or SmolLM2.")
    memory = AttentionMemory(cfg, parse_layers(cfg.layers, len(modules)), Rope(decoder, rotary, modules))
    before = model.config._attn_implementation
    if before.startswith(_NAME):
        raise KNNLMError("This model already has an attention memory attached (in this thread or another); use "
                         "one at a time, or a model loaded for each thread.")
    name = f"{_NAME}_{before}"
    AttentionInterface.register(name, memory_attention)
    # The masks stay those of the model's own implementation, so its function can run unchanged.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[before] if before in
                                    ALL_MASK_ATTENTION_FUNCTIONS else ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    for module in modules.values():
        _HOOKED[id(module)] = _Hooked(memory, _base_function(before, module), threading.get_ident())
    model.set_attn_implementation(name)
    try:
        _pick_pairing(lm, memory, decoder, modules)
        yield memory
    finally:
        model.set_attn_implementation(before)
        for module in modules.values():
            _HOOKED.pop(id(module), None)


def _allowed(mask: torch.Tensor | None, t: int, s: int, device) -> torch.Tensor:
    """Additive (…, T, S) float mask of the local keys from what the mask function gave: None means causal."""
    if mask is None:  # sdpa's is_causal skip: the last T of S keys are the queries'
        q = torch.arange(t, device=device)[:, None] + (s - t)
        return torch.where(torch.arange(s, device=device)[None] <= q, 0.0, float("-inf"))
    mask = mask[..., :s]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf"))
    return mask.float()


def _capped(scores: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Attention scores soft-capped as the model caps its own (softcap · tanh(scores / softcap), Gemma 2), or as
    they are."""
    softcap = kwargs.get("softcap")
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def memory_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers attention function: local keys plus the top-k retrieved from memory, in one softmax.

    Args:
        module: the attention module (its layer_idx picks the memory).
        query: (1, H, T, D) rotated queries.
        key, value: (1, H_kv, S, D) rotated keys and values of the local window (a cache's and this pass's).
        attention_mask: the mask the model's own implementation would get.
        scaling: the softmax scale, 1/√D.

    Returns:
        ((1, T, H, D) attention output, None).
    """
    hooked = _HOOKED.get(id(module))
    if hooked is None:
        now = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if now is None or now.startswith(_NAME):
            raise KNNLMError("The knnlm attention memory function ran outside `attached`; restore the model's "
                             "attention implementation with model.set_attn_implementation('sdpa').")
        # another thread's pass that looked this function up just before the memory was detached: the model's own
        return _base_function(now, module)(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, **kwargs)
    memory, layer = hooked.memory, module.layer_idx
    if layer not in memory.layers or threading.get_ident() != hooked.thread:
        return hooked.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise KNNLMError("Attention memory reads one document at a time; pass batches of one sequence.")
    b, h, t, d = query.shape
    h_kv, s, g = key.shape[1], key.shape[2], query.shape[1] // key.shape[1]
    if memory.capture:  # this pass's new keys are the last T: keep them without rotation
        cos, sin = memory.rope.cos_sin(layer, memory.frame, key)
        # values after a cache are copied: a view would keep the cache's whole tensor alive until released
        memory.captured[layer] = (memory.rope.unrotate(key[0, :, s - t:], cos, sin).detach(),
                                  value[0, :, s - t:].detach().contiguous())
    if len(memory) == 0 or layer not in memory.keys:
        return hooked.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    mem_k, mem_v = memory.keys[layer], memory.values[layer]  # (H_kv, N, D) each
    n = mem_k.shape[1]
    q = query[0].reshape(h_kv, g, t, d)  # (H_kv, g, T, D): query heads grouped by their KV head
    q_mem = q
    reach = int(memory.frame.max())  # memory keys turn by the frequencies of this pass's own keys
    if memory.cfg.positions == Positions.EXACT:  # keys at their true distance from the queries
        cos, sin = memory.rope.cos_sin(layer, memory.positions - memory.offset, mem_k, reach)
        mem_k = memory.rope.rotate(mem_k, cos, sin)
    else:  # queries moved to the pass's last position, keys W before it: every key a window's length before its query
        cos, sin = memory.rope.cos_sin(layer, memory.frame, q, reach)
        cr, sr = memory.rope.cos_sin(layer, torch.full_like(memory.frame, reach), q, reach)
        q_mem = memory.rope.rotate(memory.rope.unrotate(q, cos, sin), cr, sr)
        ck, sk = memory.rope.cos_sin(layer, torch.full((n,), reach - memory.window), mem_k, reach)
        mem_k = memory.rope.rotate(mem_k, ck, sk)  # rotated, not left at 0: scaled rope types scale keys too
    mem_scores = _capped(torch.matmul(q_mem, mem_k[:, None].transpose(-1, -2)) * scaling, kwargs)  # (H_kv, g, T, N)
    sliding = kwargs.get("sliding_window")
    if sliding:  # a layer that sees its last `sliding` tokens only: so from memory too
        query_at = memory.offset + memory.frame[-t:]  # (T,) absolute positions of the queries
        unseen = memory.positions[None, :] <= query_at[:, None] - sliding  # (T, N)
        mem_scores = mem_scores.masked_fill(unseen.to(mem_scores.device), float("-inf"))
    if memory.cfg.k < n:  # keep each query's top k; the rest get no weight
        by = mem_scores if memory.cfg.retrieval == Retrieval.HEAD else mem_scores.sum(1, keepdim=True)
        top = by.topk(memory.cfg.k, dim=-1).indices  # (H_kv, g or 1, T, k)
        keep = torch.zeros_like(by, dtype=torch.bool).scatter_(-1, top, True)
        mem_scores = mem_scores.masked_fill(~keep, float("-inf"))
    local = _capped(torch.matmul(q, key[0][:, None].transpose(-1, -2)) * scaling, kwargs)  # (H_kv, g, T, S)
    local = local + _allowed(attention_mask, t, s, local.device).reshape(-1, t, s)[0]
    weights = torch.softmax(torch.cat([local, mem_scores], dim=-1).float(), dim=-1).to(query.dtype)  # (H_kv, g, T, S+N)
    out = torch.matmul(weights[..., :s], value[0][:, None]) + torch.matmul(weights[..., s:], mem_v[:, None])
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), None  # (1, T, H, D)
