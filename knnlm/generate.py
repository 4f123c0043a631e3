"""Decoding with the kNN-LM: a transformers LogitsProcessor over the interpolated distribution.

The processor needs the query of each step: the lm_head's input at the last position. It takes
it with a forward-pre-hook on the model's output projection, so `model.generate` runs unchanged
(with its KV cache) and the processor only adds one search per step.

    with KNNLogitsProcessor(lm, retriever, lam=0.25, temperature=30) as knn:
        out = lm.model.generate(ids, logits_processor=LogitsProcessorList([knn]), max_new_tokens=32)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .errors import KNNLMError
from .interpolate import interpolate, neighbor_log_weights
from .lm import LM
from .retrieval import Retriever
from .tune import LambdaChoice, pick_temperature, resolve_lambda


def knn_log_distribution(dists: np.ndarray, vals: np.ndarray, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p_kNN over the whole vocabulary: neighbour weights softmax(−d/T) scatter-added by stored token.

    Args:
        dists: (B, k) squared L2 distances; inf where a neighbour is missing.
        vals: (B, k) stored next tokens; -1 where a neighbour is missing.
        vocab_size: V, the width of the result.
        temperature: T.

    Returns:
        (B, V) float64 log-probabilities; -inf for tokens no neighbour carries (a whole row of
        -inf when a query has no neighbour at all).
    """
    vals = np.asarray(vals)
    weights = np.exp(neighbor_log_weights(np.where(vals < 0, np.inf, np.asarray(dists)), temperature))  # (B, k)
    p = torch.zeros(vals.shape[0], vocab_size, dtype=torch.float64)
    p.scatter_add_(1, torch.from_numpy(np.maximum(vals, 0).astype(np.int64)), torch.from_numpy(weights))
    return torch.log(p)  # log 0 = -inf


class KNNLogitsProcessor(LogitsProcessor):
    """Replaces the model's next-token scores with log(λ·p_kNN + (1−λ)·p_LM).

    Usable with `model.generate(..., logits_processor=LogitsProcessorList([processor]))`, greedy
    or sampled. Returned scores are log-probabilities, so greedy picks the interpolated argmax
    and sampling draws from the interpolated distribution. A row whose query finds no neighbour
    keeps the LM's distribution; tokens an earlier processor set to -inf stay at -inf.

    Attach it to one model at a time; use it as a context manager (or call `close()`) to remove
    its hook from the model afterwards.

    Args:
        lm: the model the datastore was built with.
        retriever: search over that datastore.
        lam: a number in [0, 1], "tuned", "adaptive" (read from the datastore's lambda.json), or
            a LambdaChoice.
        temperature: T of softmax(−d/T); None takes the tuned T, else 1.
    """

    def __init__(self, lm: LM, retriever: Retriever, lam: str | float | LambdaChoice = 0.25,
                 temperature: float | None = None):
        retriever.ds.check_compatible(lm)
        self.retriever = retriever
        self.choice = lam if isinstance(lam, LambdaChoice) else resolve_lambda(str(lam), retriever.ds.path)
        self.temperature = pick_temperature(temperature, retriever.ds.path, self.choice)
        self.retrieval_seconds = 0.0
        self.last: dict | None = None  # the last step's neighbours, for inspection
        self._query: torch.Tensor | None = None
        self._handle = lm.model.get_output_embeddings().register_forward_pre_hook(self._capture)

    def _capture(self, _module, args) -> None:
        # The lm_head's input; generate computes logits for the last position only.
        self._query = args[0][:, -1, :].detach()

    def close(self) -> None:
        """Remove the hook from the model."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "KNNLogitsProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def distribution(self, queries: torch.Tensor, lm_logits: torch.Tensor) -> torch.Tensor:
        """Interpolated next-token log-probabilities for given queries and LM scores.

        Args:
            queries: (B, d) keys of the positions being predicted (the lm_head's inputs).
            lm_logits: (B, V) the model's scores for those positions.

        Returns:
            (B, V) float64 log-probabilities.
        """
        t0 = time.perf_counter()
        dists, ids, vals = self.retriever.neighbors(queries.float().cpu().numpy())
        self.retrieval_seconds += time.perf_counter() - t0
        self.last = {"dists": dists, "ids": ids, "vals": vals}
        knn = knn_log_distribution(dists, vals, lm_logits.shape[-1], self.temperature).numpy()
        lm_logp = torch.log_softmax(lm_logits.cpu().double(), dim=-1).numpy()
        nearest = dists[:, 0]  # k >= 1; inf when a query found no neighbour, which then keeps p_LM
        lambdas = np.where(np.isfinite(nearest), self.choice.lambdas_for(nearest), 0.0)
        return torch.from_numpy(interpolate(lm_logp, knn, lambdas[:, None]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The transformers LogitsProcessor hook: scores (B, V) in, log-probabilities (B, V) out."""
        q = self._query
        if q is None or q.shape[0] != scores.shape[0]:
            raise KNNLMError("KNNLogitsProcessor saw no query for this step; use it with the model it was "
                             "created for (lm.model.generate) and do not close it before generating.")
        self._query = None
        out = self.distribution(q, scores).to(scores.device, scores.dtype)
        # Tokens an earlier processor ruled out (suppressed tokens, min_new_tokens, ...) stay out.
        return out.masked_fill(scores == -math.inf, -math.inf)


@dataclass
class Generation:
    """A continuation and what it cost."""

    text: str  # the new text only
    tokens: list[int]  # the new token ids
    seconds: float
    retrieval_seconds: float


def generate(lm: LM, prompt: str, retriever: Retriever | None = None, lam: str | float | LambdaChoice = 0.25,
             temperature: float | None = None, max_new_tokens: int = 64, sample: bool = False,
             seed: int = 0) -> Generation:
    """Continue a prompt with the kNN-LM (or with the LM alone when retriever is None).

    Args:
        lm: the model.
        prompt: text to continue, encoded as it is (no chat template, no special tokens), the
            way the datastore's text was.
        retriever: search over the datastore; None decodes with the LM alone.
        lam: λ: a number, "tuned", "adaptive" or a LambdaChoice.
        temperature: T of p_kNN; None takes the tuned T, else 1.
        max_new_tokens: tokens to add.
        sample: draw from the distribution instead of taking its argmax.
        seed: seed of the sampler.

    Returns:
        The Generation.
    """
    if max_new_tokens < 1:
        raise KNNLMError(f"--max-new-tokens {max_new_tokens} must be at least 1.")
    ids = lm.encode(prompt)
    if not ids:
        bos = getattr(lm.tokenizer, "bos_token_id", None)
        if bos is None:
            raise KNNLMError("The prompt is empty; pass some text with --prompt.")
        ids = [bos]
    limit = lm.max_positions
    if limit and len(ids) + max_new_tokens > limit:
        raise KNNLMError(f"The prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                         f"model's {limit} positions; shorten the prompt or ask for fewer tokens.")
    input_ids = torch.tensor([ids], device=lm.device)
    eos = lm.tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, repetition_penalty=1.0,
              pad_token_id=eos if eos is not None else 0)
    if sample:
        # Only our processor shapes the distribution: no model-default temperature, top-k or top-p.
        kw.update(temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0)
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    processor = None
    try:
        if retriever is not None:
            processor = KNNLogitsProcessor(lm, retriever, lam, temperature)
            kw["logits_processor"] = LogitsProcessorList([processor])
        with torch.inference_mode():
            out = lm.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    finally:
        if processor is not None:
            processor.close()
    new = out[0, len(ids):].tolist()
    return Generation(text=lm.tokenizer.decode(new, skip_special_tokens=True), tokens=new,
                      seconds=time.perf_counter() - t0,
                      retrieval_seconds=processor.retrieval_seconds if processor else 0.0)
