"""Sliding windows over a document and batching them: shared by building and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import KNNLMError


@dataclass(frozen=True)
class Window:
    """One model input: tokens [begin, end) of a document, owning positions [own_from, own_to)."""

    doc: int  # document number in the stream
    index: int  # window number within the document
    begin: int
    end: int
    own_from: int  # first position whose prediction this window owns
    own_to: int  # one past the last; positions predict the token after them


def check_window(context: int, stride: int, max_positions: int | None = None) -> None:
    """Refuse window settings that cannot score every token once."""
    if context < 2:
        raise KNNLMError(f"--context {context} is too small; use at least 2 tokens.")
    if stride < 1 or stride > context:
        raise KNNLMError(f"--stride {stride} must be between 1 and --context ({context}), "
                         "or some tokens would never be scored.")
    if max_positions and context > max_positions:
        raise KNNLMError(f"--context {context} exceeds the model's {max_positions} positions; "
                         f"pass --context {max_positions} or less.")


def plan_windows(doc: int, n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows of up to `context` tokens advancing by `stride`; every position with a next token is owned once.

    A position owned by a later window sees at least context − stride tokens before it.
    """
    out: list[Window] = []
    if n_tokens < 2:
        return out
    begin, prev_end = 0, 0
    while True:
        end = min(begin + context, n_tokens)
        out.append(Window(doc, len(out), begin, end, prev_end, min(end, n_tokens - 1)))
        if end >= n_tokens:
            return out
        prev_end, begin = end, begin + stride


def pad_batch(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask), each (B, T_max)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, to waste little on padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
