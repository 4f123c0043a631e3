"""Sliding windows over a document, batched forward passes over them: shared by building and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from .errors import KNNLMError

if TYPE_CHECKING:
    from .lm import LM


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

    A position owned by a later window sees at least context − stride tokens before it. Every window
    owns at least one position: planning stops once position n_tokens − 2 is owned.
    """
    out: list[Window] = []
    if n_tokens < 2:
        return out
    begin, prev_end = 0, 0
    while True:
        end = min(begin + context, n_tokens)
        own_to = min(end, n_tokens - 1)
        out.append(Window(doc, len(out), begin, end, prev_end, own_to))
        if own_to >= n_tokens - 1:
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


def length_batches(lengths: list[int], batch_size: int, offsets: list[int] | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, to waste little on padding; with
    offsets (each window's first owned position within it), windows of one length that own the same
    tail batch together."""
    later = offsets if offsets is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -later[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Owned:
    """One window's owned rows of a forward pass."""

    item: int  # index into the given work list
    window: Window
    keys: torch.Tensor  # (n, d) float32: the lm_head inputs of the window's owned positions
    logits: torch.Tensor | None  # (n, V) float32 logits of those positions, None when logits=False


def forward_owned(lm: LM, work: list[tuple[Window, list[int]]], batch_size: int,
                  logits: bool) -> Iterator[list[Owned]]:
    """Length-batched forward passes over windows (token ids of [begin, end)); yields, per batch, each window's owned rows.

    Args:
        lm: the model.
        work: (window, token ids of the window's [begin, end)) pairs.
        batch_size: windows per forward pass.
        logits: also compute the logits (else only keys: the output projection is skipped).

    Yields:
        Per forward pass, an Owned per window in it (in batch order; `item` says which work entry). Rows
        are views of the batch's output, on the model's device: rows [own_from − begin, own_to − begin).
    """
    if batch_size < 1:
        raise KNNLMError(f"--batch-size {batch_size} must be at least 1 window per forward pass.")
    # With logits, the output projection runs from the batch's first owned position on (a later window
    # owns only its last `stride` positions), and windows owning the same tail are batched together.
    # Keys alone (building) keep the batches they always had.
    offsets = [w.own_from - w.begin for w, _ids in work] if logits else None
    for batch in length_batches([len(ids) for _w, ids in work], batch_size, offsets):
        ids, mask = pad_batch([work[i][1] for i in batch])
        first = min(offsets[i] for i in batch) if logits else 0
        keys, out = lm.forward(ids, mask, logits=logits, first=first)  # (B, T − first, d), (B, T − first, V) or None
        owned = []
        for j, i in enumerate(batch):
            w = work[i][0]
            lo, hi = w.own_from - w.begin - first, w.own_to - w.begin - first
            owned.append(Owned(i, w, keys[j, lo:hi], None if out is None else out[j, lo:hi]))
        yield owned
