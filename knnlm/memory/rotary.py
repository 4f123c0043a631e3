"""Rotary positions (RoPE) of keys and queries: taking them off and putting them on at other positions.

Attention memory keeps keys without their rotation and rotates them again where they are read: at their
true positions (exact) or all at one fixed distance before the query (InfLLM). The cosines and sines
come from the model's own rotary module, so its base, scaling and rope type are the model's; the pairing
of dimensions (halves, as Llama's; interleaved, as Cohere's) is the one under which the model's own keys
turn, found when the memory is attached.
"""

from __future__ import annotations

import torch

from ..errors import KNNLMError


def find_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary-embedding module (the one transformers calls as `rotary_emb(x, position_ids)`, or
    `rotary_emb(x, position_ids, layer_type)` where layer types have rotations of their own, as Gemma 3's)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and (hasattr(module, "inv_freq") or hasattr(module, "layer_types")):
            return module
    raise KNNLMError(f"{type(model).__name__} has no rotary-embedding module (rotary_emb) of the kind transformers' "
                     "Llama-style decoders share; attention memory needs a RoPE model such as Llama, Qwen, Gemma, "
                     "GPT-NeoX or SmolLM2.")


def longrope_switch(model: torch.nn.Module) -> int | None:
    """The length past which a longrope model (Phi-3, Phi-3.5, Phi-4-mini, PhiMoE) turns by its long frequencies
    (original_max_position_embeddings), or None for any other rotation. Keys a KV cache holds from passes that read
    no further were turned by the short ones, so the model's own generate recomputes its cache there."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and getattr(module, "rope_type", None) == "longrope":
            params = getattr(module.config, "rope_parameters", None) or {}
            original = params.get("original_max_position_embeddings") if isinstance(params, dict) else None
            original = original or getattr(module.config, "original_max_position_embeddings", None)
            return int(original) if original else None
    return None


def cos_sin(rotary: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor, layer_type: str | None = None,
            reach: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (N, D), of the rotary module at positions (N,) (negative ones too), in like's dtype; for
    the layer type's own rotation where the module has one per type.

    reach: the last position of the forward pass these rotations go with. Some rope types pick their frequencies
    by the largest position a call is given (longrope's long factors past original_max_position_embeddings,
    dynamic NTK's base), so it is given with the positions: memory keys then turn as the pass's own keys do.
    """
    extra = (layer_type,) if hasattr(rotary, "layer_types") else ()
    n = positions.numel()
    if reach is not None:
        positions = torch.cat([positions.reshape(-1).long(), torch.tensor([reach])])
    cos, sin = rotary(like, positions.to(like.device)[None].long(), *extra)  # (1, N[+1], D) each
    return cos[0, :n], sin[0, :n]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The second half of the last axis, negated, before the first (Llama's pairing of dimensions)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Each pair of neighbouring dimensions (x1, x2) turned to (−x2, x1) (Cohere's pairing)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pair=rotate_half) -> torch.Tensor:
    """x (..., N, D) rotated by the angles of cos, sin (N, R): what apply_rotary_pos_emb does to a key. With R < D
    (partial rotary, as Phi and GPT-NeoX) only the first R dimensions turn."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rotate(x[..., :r], cos, sin, pair), x[..., r:]], dim=-1)
    return x * cos + pair(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pair=rotate_half) -> torch.Tensor:
    """The inverse of rotate: x (..., N, D) rotated back by cos, sin (N, R), also when they carry a scale."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([unrotate(x[..., :r], cos, sin, pair), x[..., r:]], dim=-1)
    # cos² + sin² is the squared attention scaling of scaled rope types (1 for plain RoPE).
    return (x * cos - pair(x) * sin) / (cos * cos + sin * sin)


class Rope:
    """A model's rotation of keys: its rotary module, each layer's type where types turn differently (Gemma 3,
    OLMo 3), and its pairing of dimensions (`pair`: rotate_half, or rotate_interleaved where the model pairs
    neighbours; attention.attached picks the one under which the model's keys turn as it computes them)."""

    def __init__(self, model: torch.nn.Module, rotary: torch.nn.Module, attention: dict[int, torch.nn.Module]):
        """model: the text decoder (its config's layer_types); rotary: its find_rotary; attention: its attention
        modules by layer."""
        self.module, self.pair = rotary, rotate_half
        self.layer_types: dict[int, str] = {}
        if hasattr(self.module, "layer_types"):  # the decoder picks each layer's rotation by config.layer_types
            types = list(getattr(model.config, "layer_types", None) or [])
            self.layer_types = {i: types[i] for i in attention if i < len(types)}
            if len(self.layer_types) < len(attention) or not set(self.layer_types.values()) <= set(
                    self.module.layer_types):
                raise KNNLMError(f"{type(model).__name__} turns each layer type by a rotation of its own, but its "
                                 "config's layer_types do not name one for every attention layer; attention memory "
                                 "cannot rotate their keys as the model does.")

    def cos_sin(self, layer: int, positions: torch.Tensor, like: torch.Tensor,
                reach: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N, R), of the layer's rotation at positions (N,), in like's dtype, with the frequencies
        of a pass that reads to position `reach` (see cos_sin)."""
        return cos_sin(self.module, positions, like, self.layer_types.get(layer), reach)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (..., N, D) rotated as the model rotates a key (see rotate)."""
        return rotate(x, cos, sin, self.pair)

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The inverse of self.rotate."""
        return unrotate(x, cos, sin, self.pair)
