"""How p_LM and the neighbours make one next-token distribution: the policies behind one interface.

Every policy answers three questions, for eval (over Scores), for decoding (one step of a
batch) and for reports:
- search_mask: which tokens need the search at all (the learned skip says no to some);
- target_log_probs: log p(target) of each scored token;
- distribution: the whole next-token distribution of a decoding step.
λ-mixing policies (fixed, tuned, adaptive, gate) differ only in λ per token; SPALM mixes the
hidden state instead and projects it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KNNLMError
from ..interpolate import adaptive_lambdas, interpolate, knn_log_prob, mix_log_distribution
from ..scores import Scores
from .features import post_features, pre_features
from .gate import LambdaGate
from .spalm import SpalmGate, spalm_log_probs, spalm_target_log_probs


def _queries(s: Scores) -> np.ndarray:
    """The scores' queries, refused in one sentence when they were not kept."""
    if s.queries is None:
        raise KNNLMError("These scores hold no queries, which SPALM needs; score again with this version "
                         "(`knnlm eval --save-scores`).")
    return s.queries


@dataclass(frozen=True)
class Skip:
    """Skip the search where the before-retrieval gate predicts λ below a threshold (λ = 0 there)."""

    gate: LambdaGate
    threshold: float  # 0 skips nothing (σ is never below 0)

    def keep(self, queries: np.ndarray, lm: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) True where the search runs."""
        if self.threshold <= 0:
            return np.ones(len(queries), dtype=bool)
        return self.gate.lambdas(pre_features(queries, lm), queries) >= self.threshold


class Combiner:
    """The base of every policy. kind names it, source says where its numbers came from."""

    kind = "base"

    def __init__(self, temperature: float | None, source: str, skip: Skip | None = None):
        self.temperature, self.source, self.skip = temperature, source, skip
        self.mismatch: str | None = None  # set when tuned values meet other search settings

    @property
    def reads_lm_stats(self) -> bool:
        """Whether the policy reads the LM's entropy, top probabilities and argmax (the gates do)."""
        return self.skip is not None or isinstance(self, GateLambda)

    @property
    def reads_queries(self) -> bool:
        """Whether the policy reads the queries (the gates and SPALM do)."""
        return self.reads_lm_stats

    def search_mask(self, queries: np.ndarray, lm: dict[str, np.ndarray]) -> np.ndarray | None:
        """(n,) True where the search must run; None: everywhere."""
        return None if self.skip is None else self.skip.keep(queries, lm)

    def lambdas(self, s: Scores) -> np.ndarray:
        """(n,) the weight of the memory per token (λ; for SPALM 1 − g)."""
        raise NotImplementedError

    def target_log_probs(self, s: Scores, head: torch.nn.Module | None = None,
                         lambdas: np.ndarray | None = None, knn_logp: np.ndarray | None = None) -> np.ndarray:
        """(n,) log p(target) of every scored token; lambdas: self.lambdas(s), knn_logp: knn_log_prob of s at
        self.temperature, if already computed."""
        raise NotImplementedError

    def distribution(self, s: Scores, lm_logp: np.ndarray, head: torch.nn.Module | None = None) -> np.ndarray:
        """(B, V) next-token log-probabilities of one decoding step (s holds its B rows), in lm_logp's dtype
        (float64 or float32) for the λ policies, float64 for SPALM."""
        raise NotImplementedError


class LambdaMix(Combiner):
    """p = λ·p_kNN + (1−λ)·p_LM with λ per token from `raw_lambdas`; skipped searches get λ = 0."""

    def raw_lambdas(self, s: Scores) -> np.ndarray:
        raise NotImplementedError

    def lambdas(self, s: Scores) -> np.ndarray:
        lam = self.raw_lambdas(s)
        return lam if s.searched is None else np.where(s.searched, lam, 0.0)

    def target_log_probs(self, s: Scores, head=None, lambdas=None, knn_logp=None) -> np.ndarray:
        knn = knn_log_prob(s.dists, s.vals, s.targets, self.temperature) if knn_logp is None else knn_logp
        return interpolate(s.lm_logp, knn, self.lambdas(s) if lambdas is None else lambdas)

    def distribution(self, s: Scores, lm_logp: np.ndarray, head=None) -> np.ndarray:
        # A row with no neighbour keeps p_LM: p_kNN would be all zeros and the mix would not sum to 1.
        lam = np.where(np.isfinite(s.nn_dist), self.lambdas(s), 0.0)
        return mix_log_distribution(lm_logp, s.dists, s.vals, lam, self.temperature)


class FixedLambda(LambdaMix):
    """One λ for every token: a number given, or the tuned one (kind "tuned")."""

    def __init__(self, lam: float, temperature, source, skip=None, kind: str = "fixed"):
        super().__init__(temperature, source, skip)
        self.lam, self.kind = float(lam), kind

    def raw_lambdas(self, s: Scores) -> np.ndarray:
        return np.full(len(s), self.lam)


class AdaptiveLambda(LambdaMix):
    """One λ per bin of nearest-neighbour distance (Drozdov et al. 2022)."""

    kind = "adaptive"

    def __init__(self, edges, lambdas, temperature, source, skip=None):
        super().__init__(temperature, source, skip)
        self.edges, self.bin_lambdas = tuple(map(float, edges)), tuple(map(float, lambdas))

    def raw_lambdas(self, s: Scores) -> np.ndarray:
        return adaptive_lambdas(s.nn_dist, np.asarray(self.edges), np.asarray(self.bin_lambdas))


class GateLambda(LambdaMix):
    """λ from a learned gate over features before ("gate-pre") or after ("gate") retrieval."""

    def __init__(self, gate: LambdaGate, after_retrieval: bool, temperature, source, skip=None):
        super().__init__(temperature, source, skip)
        self.gate, self.after = gate, after_retrieval
        self.kind = "gate" if after_retrieval else "gate-pre"

    def raw_lambdas(self, s: Scores) -> np.ndarray:
        lm = s.lm_stats()
        feats = post_features(s.queries, lm, s.dists, s.vals, self.temperature) if self.after \
            else pre_features(s.queries, lm)
        return self.gate.lambdas(feats, s.queries)


class SpalmMix(Combiner):
    """SPALM: z = (1 − g)·m + g·h, p = softmax(lm_head(z)); needs the model's output projection."""

    kind = "spalm"

    def __init__(self, gate: SpalmGate, temperature, source):
        super().__init__(temperature, source, None)
        self.gate = gate

    def _head(self, head):
        if head is None:
            raise KNNLMError("SPALM needs the model's output projection; pass the LM's head.")
        return head

    @property
    def reads_queries(self) -> bool:
        return True

    def lambdas(self, s: Scores) -> np.ndarray:
        _queries(s)
        with torch.no_grad():
            return 1.0 - self.gate(torch.as_tensor(np.asarray(s.queries, np.float32))).numpy()

    def target_log_probs(self, s: Scores, head=None, lambdas=None, knn_logp=None) -> np.ndarray:
        _queries(s)
        return spalm_target_log_probs(s.queries, s.vals, s.targets, self._head(head), self.gate)[0]

    def distribution(self, s: Scores, lm_logp: np.ndarray, head=None) -> np.ndarray:
        head = self._head(head)
        with torch.no_grad():
            h = torch.as_tensor(np.asarray(s.queries, np.float32))
            return spalm_log_probs(h, s.vals, head, self.gate(h)).double().numpy()
