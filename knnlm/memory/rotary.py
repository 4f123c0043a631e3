"""Rotary positions (RoPE) of keys and queries: taking them off and putting them on at other positions.

Attention memory keeps keys without their rotation and rotates them again where they are read: at their
true positions (exact) or all at one fixed distance before the query (InfLLM). The cosines and sines
come from the model's own rotary module, so its base, scaling and rope type are the model's.
"""

from __future__ import annotations

import torch

from ..errors import KNNLMError


def find_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """The model's rotary-embedding module (the one transformers calls as `rotary_emb(x, position_ids)`)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            return module
    raise KNNLMError(f"{type(model).__name__} has no rotary position embedding (rotary_emb); attention memory "
                     "needs a RoPE model such as Llama, Qwen or SmolLM2.")


def cos_sin(rotary: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (N, D), of the rotary module at positions (N,) (negative ones too), in like's dtype."""
    cos, sin = rotary(like, positions.to(like.device)[None].long())  # (1, N, D) each
    return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The second half of the last axis, negated, before the first (RoPE's pairing of dimensions)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) rotated by the angles of cos, sin (N, R): what apply_rotary_pos_emb does to a key. With R < D
    (partial rotary, as Phi and GPT-NeoX) only the first R dimensions turn."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    return x * cos + rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of rotate: x (..., N, D) rotated back by cos, sin (N, R), also when they carry a scale."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([unrotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    # cos² + sin² is the squared attention scaling of scaled rope types (1 for plain RoPE).
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
