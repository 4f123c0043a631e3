"""Document memory: the keys and next tokens of the current document's own earlier positions.

While a document is scored or continued, position t's query is also searched, exactly, among the keys
of positions j < t of the same document, whose values (token j + 1 ≤ t) are already known: the
continuous cache of Grave et al. (2017) with the kNN-LM's keys. The memory lives in RAM and is
cleared between documents. Two ways to use it:

- "joint": its neighbours join the datastore's, and one p_kNN (the datastore's λ and T) covers both;
- "separate": p = λ_m·p_mem + (1 − λ_m)·p, its own λ_m and T_m (tune-lambda --memory document fits them).

Without a datastore the two coincide: p = λ_m·p_mem + (1 − λ_m)·p_LM. A token whose memory is still
empty (a document's first) keeps the distribution it had.

In eval all of a document's keys are known after the forward, so the memory of every position comes
from one causal top-k over the document (`causal_neighbors`); in generation it grows a step at a time
(`DocumentMemory`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from ..arrays import sort_rows
from ..combine import load_lambda
from ..errors import KNNLMError, settle
from ..interpolate import interpolate, knn_log_prob, mix_log_distribution
from ..lm import QueryHook
from ..retrieval import exact_distances
from ..scores import Scores

log = logging.getLogger(__name__)

MEMORY_KINDS = ("none", "document")
MIX_KINDS = ("joint", "separate")
# Defaults measured by bench/memory.py (SmolLM2-135M, four stdlib packages of 8192 tokens, W = 256, k = 256):
# fitted on any three packages, λ_m was 0.15-0.225 and T_m 68 (with full 8k context λ_m fell to 0.05-0.075).
DEFAULT_MEMORY_LAMBDA = 0.2
DEFAULT_MEMORY_TEMPERATURE = 68.0
# tune-lambda's grids for p_mem: T log-spaced (memory distances are those of the datastore, tens to hundreds)
TUNE_TEMPERATURES = tuple(np.logspace(0, 3, 19).tolist())
TUNE_LAMBDAS = tuple(np.round(np.arange(0.0, 0.951, 0.025), 3).tolist())


@dataclass(frozen=True)
class MemoryConfig:
    """Settings of the document memory (eval, generate and the API: --memory and the --memory-* flags)."""

    memory: str = "none"  # "none": today's kNN-LM; "document": add the document's own past as a memory
    # "joint": one p_kNN over datastore + memory (the default: better than "separate" on every package of
    # bench/memory.py with a datastore); "separate": p_mem with its own λ_m, T_m. Without a datastore they coincide.
    mix: str = "joint"
    lam: str | None = None  # λ_m of "separate": a number in [0, 1] or "tuned" (lambda.json); None: tuned, else default
    temperature: float | None = None  # T_m of "separate"; None: the tuned one, else the default
    k: int = 256  # neighbours taken from the memory per token
    chunk: int = 512  # queries per block of eval's causal search (memory: chunk · n floats)

    def __post_init__(self):
        if self.memory not in MEMORY_KINDS:
            raise KNNLMError(f"--memory {self.memory!r} is not one of {', '.join(MEMORY_KINDS)}.")
        if self.mix not in MIX_KINDS:
            raise KNNLMError(f"--memory-mix {self.mix!r} is not one of {', '.join(MIX_KINDS)}.")
        settle(self, "temperature", (int, float), "temperature", "10.0", optional=True)
        settle(self, "k", int, "k", "256")
        settle(self, "chunk", int, "chunk", "512")
        if self.k < 1 or self.chunk < 1:
            raise KNNLMError(f"--memory-neighbors {self.k} must be at least 1.")
        if self.temperature is not None and not 0 < self.temperature < float("inf"):
            raise KNNLMError(f"--memory-temperature {self.temperature} must be a positive number; pass e.g. 10.")
        if self.lam is not None and self.lam != "tuned":
            try:
                value = float(self.lam)
            except ValueError:
                value = float("nan")
            if not 0 <= value <= 1:
                raise KNNLMError(f"--memory-lambda {self.lam!r} must be a number in [0, 1] or 'tuned'.")

    @property
    def on(self) -> bool:
        """Whether a memory is kept at all."""
        return self.memory == "document"

    def check_use(self, with_datastore: bool) -> None:
        """One sentence, before any work, for settings this memory would not read: any of the memory's own without
        a memory; λ_m and T_m (the separate mix's) where the joint mix takes the datastore's λ and T."""
        if not self.on:
            given = [f"{name}={getattr(self, name)!r}" for name in ("mix", "lam", "temperature", "k", "chunk")
                     if getattr(self, name) != getattr(MemoryConfig, name)]
            if given:
                raise KNNLMError(f"MemoryConfig(memory={self.memory!r}) keeps no memory, so {', '.join(given)} would do "
                                 "nothing; pass memory='document' or leave them out.")
        elif with_datastore and self.mix == "joint" and (self.lam is not None or self.temperature is not None):
            raise KNNLMError("The joint mix weighs the memory's neighbours with the datastore's λ and T, so the "
                             "memory's own λ_m and T_m (lam=, temperature=; --memory-lambda, --memory-temperature) "
                             "would do nothing; pass mix='separate' (--memory-mix separate) or leave them out.")


def resolve_memory(cfg: MemoryConfig, datastore_dir=None) -> tuple[float, float, str]:
    """(λ_m, T_m, where they came from): given numbers, else lambda.json's "memory" entry, else the defaults."""
    tuned = ((load_lambda(datastore_dir) or {}).get("memory") or {}) if datastore_dir is not None else {}
    if cfg.lam == "tuned" and not tuned:
        where = f"{datastore_dir}/lambda.json" if datastore_dir is not None else "a datastore (there is none)"
        raise KNNLMError(f"--memory-lambda tuned: {where} holds no tuned memory; run `knnlm tune-lambda --memory "
                         "document`, or pass a number.")
    if cfg.lam is not None and cfg.lam != "tuned":
        lam, source = float(cfg.lam), "given"
    elif tuned:
        lam, source = float(tuned["lambda"]), "tuned"
    else:
        lam, source = DEFAULT_MEMORY_LAMBDA, "default"
    if cfg.temperature is not None:
        t = float(cfg.temperature)
    else:
        t = float(tuned["temperature"]) if tuned else DEFAULT_MEMORY_TEMPERATURE
    return lam, t, source


def causal_neighbors(keys: np.ndarray, vals: np.ndarray, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Each position's k nearest keys among the positions before it (never itself or a later one).

    Args:
        keys: (n, d) the keys of one document's positions, in order.
        vals: (n,) the token that followed each position.
        k: neighbours per position.
        chunk: positions searched per block (a block compares with the chunk · n keys before it).

    Returns:
        (dists (n, k) float32 squared L2 ascending, inf where missing; vals (n, k) int32, -1 where
        missing). Row t's neighbours are rows j < t, so row 0 has none and row t at most t.
    """
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n = len(keys)
    out_d, out_v = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int32)
    if n < 2:
        return out_d, out_v
    kt = torch.from_numpy(keys)  # (n, d)
    sq = (kt * kt).sum(1)  # (n,)
    vals = np.asarray(vals, np.int32)
    for a in range(1, n, chunk):
        b = min(n, a + chunk)
        # Only keys before the block's last row can be anyone's neighbour: columns [0, b - 1).
        cols = b - 1
        d = sq[a:b, None] + sq[None, :cols] - 2.0 * (kt[a:b] @ kt[:cols].T)  # (b - a, cols)
        rows = torch.arange(a, b)[:, None]
        d.masked_fill_(torch.arange(cols)[None, :] >= rows, float("inf"))  # j ≥ t is the present or future
        kk = min(k, cols)
        _top, ids = torch.topk(d, kk, dim=1, largest=False, sorted=True)  # (b - a, kk)
        ids = ids.numpy().astype(np.int64)
        ids[ids >= np.arange(a, b)[:, None]] = -1  # rows with fewer than kk earlier positions
        # ‖q‖² + ‖k‖² − 2q·k loses digits in float32: the chosen rows' distances are computed again exactly.
        exact = exact_distances(keys[a:b], kt, ids)  # (b - a, kk), inf where ids < 0
        exact, ids = sort_rows(exact, ids)
        out_d[a:b, :kk] = exact
        out_v[a:b, :kk] = np.where(ids >= 0, vals[np.maximum(ids, 0)], -1)
    return out_d, out_v


def memory_neighbors(scores: Scores, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The document memory's neighbours of every scored token: (dists (n, k), vals (n, k)) in scores' row order.

    Row r (query: the key of position pos[r] − 1, predicting token pos[r]) searches the rows of its own
    document with a smaller pos, whose values (their targets) come at or before pos[r] − 1.
    """
    if scores.queries is None:
        raise KNNLMError("These scores hold no queries, which the document memory searches; score again with "
                         "this version (`knnlm eval --save-scores`).")
    n = len(scores)
    dists, vals = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int32)
    for doc in np.unique(scores.doc):
        rows = np.flatnonzero(scores.doc == doc)
        rows = rows[np.argsort(scores.pos[rows], kind="stable")]
        if np.any(np.diff(scores.pos[rows]) == 0):
            raise KNNLMError(f"Document {doc} of these scores scores one position twice; score it again.")
        dists[rows], vals[rows] = causal_neighbors(scores.queries[rows], scores.targets[rows], k, chunk)
    return dists, vals


def join_neighbors(dists: np.ndarray, vals: np.ndarray, mem_dists: np.ndarray, mem_vals: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The datastore's and the memory's neighbours as one list per row, by increasing distance: (n, k + k_m)."""
    d = np.concatenate([np.asarray(dists, np.float32), np.asarray(mem_dists, np.float32)], axis=1)
    v = np.concatenate([np.asarray(vals, np.int32), np.asarray(mem_vals, np.int32)], axis=1)
    d = np.where(v < 0, np.inf, d)
    return sort_rows(d, v)


def with_memory(scores: Scores, mem_dists: np.ndarray, mem_vals: np.ndarray) -> Scores:
    """A copy of scores whose neighbours are the datastore's and the memory's together ("joint")."""
    d, v = join_neighbors(scores.dists, scores.vals, mem_dists, mem_vals)
    extra = {name: getattr(scores, name) for name in ("queries", "lm_entropy", "lm_max", "lm_second", "lm_argmax",
                                                     "searched")}
    return Scores(scores.targets, scores.lm_logp, d, v, scores.doc, scores.pos, dict(scores.attrs), **extra)


def memory_lambdas(mem_vals: np.ndarray, lam: float) -> np.ndarray:
    """(n,) λ_m per token: 0 where the memory is still empty (the token keeps its distribution)."""
    return np.where(np.asarray(mem_vals)[:, 0] >= 0, float(lam), 0.0) if mem_vals.shape[1] else np.zeros(len(mem_vals))


def mix_memory(base_logp: np.ndarray, mem_dists: np.ndarray, mem_vals: np.ndarray, targets: np.ndarray,
               lam: float, temperature: float) -> np.ndarray:
    """(n,) log(λ_m·p_mem(target) + (1 − λ_m)·p(target)), p being base_logp's distribution ("separate")."""
    mem = knn_log_prob(mem_dists, mem_vals, targets, temperature)
    return interpolate(base_logp, mem, memory_lambdas(mem_vals, lam))


def fit_memory(base_logp: np.ndarray, mem_dists: np.ndarray, mem_vals: np.ndarray, targets: np.ndarray,
               temperatures=TUNE_TEMPERATURES, lambdas=TUNE_LAMBDAS) -> dict:
    """λ_m and T_m of the separate p_mem minimising the NLL of mix_memory over the tokens (grid search).

    Returns:
        {"lambda", "temperature", "nll" (mean, nats), "nll_without" (λ_m = 0), "tokens"}.
    """
    base = np.asarray(base_logp, np.float64)
    if len(base) == 0:
        raise KNNLMError("No tokens to fit the memory's λ and T on; pass more text.")
    has = np.asarray(mem_vals)[:, 0] >= 0 if mem_vals.shape[1] else np.zeros(len(base), bool)
    grid = np.asarray(lambdas, np.float64)
    best = (-np.inf, 0.0, float(temperatures[0]))
    for t in temperatures:
        mem = knn_log_prob(mem_dists[has], mem_vals[has], targets[has], t)  # (m,)
        ll = np.maximum(interpolate(base[has][None, :], mem[None, :], grid[:, None]), -1e300).sum(1)  # (L,)
        i = int(np.argmax(ll))
        if ll[i] > best[0]:
            best = (float(ll[i]), float(grid[i]), float(t))
    _, lam, t = best
    nll = -float(np.mean(mix_memory(base, mem_dists, mem_vals, targets, lam, t)))
    return {"lambda": lam, "temperature": t, "nll": nll, "nll_without": -float(np.mean(base)), "tokens": len(base)}


class DocumentMemory:
    """A growing memory of one document's (key, next token) pairs, searched exactly (generation).

    `step(q, last_token)` first stores the previous step's query with the token that followed it, then
    searches q: the current position is never in the memory when it is searched.
    """

    def __init__(self, dim: int, k: int):
        self.k, self.dim = k, dim
        self.keys = torch.zeros((0, dim), dtype=torch.float32)  # (m, d)
        self.vals = np.zeros(0, np.int32)  # (m,)
        self._pending: torch.Tensor | None = None  # (d,) the last searched query, whose next token is unknown yet

    def __len__(self) -> int:
        return len(self.vals)

    def add(self, keys: torch.Tensor | np.ndarray, vals) -> None:
        """Store keys (m, d) with the tokens that followed them (m,)."""
        keys = torch.as_tensor(np.asarray(keys, np.float32) if isinstance(keys, np.ndarray) else keys.float().cpu())
        self.keys = torch.cat([self.keys, keys.reshape(-1, self.dim)])
        self.vals = np.concatenate([self.vals, np.asarray(vals, np.int32).reshape(-1)])

    def search(self, query: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(dists (1, k), vals (1, k)) of one query (1, d) among the stored keys; inf / -1 where missing."""
        q = query.float().cpu().reshape(1, self.dim).numpy()
        kk = min(self.k, len(self))
        dists, vals = np.full((1, self.k), np.inf, np.float32), np.full((1, self.k), -1, np.int32)
        if kk:
            d = torch.cdist(torch.from_numpy(q), self.keys)[0] ** 2  # (m,)
            ids = torch.topk(d, kk, largest=False).indices.numpy()[None, :].astype(np.int64)  # (1, kk)
            exact = exact_distances(q, self.keys, ids)
            exact, ids = sort_rows(exact, ids)
            dists[:, :kk], vals[:, :kk] = exact, self.vals[ids]
        return dists, vals

    def check_continues(self, parents: np.ndarray | None) -> None:
        """Refuse a decoding step that does not continue the last one (QueryHook.take_query's parents None): the
        memory holds one prompt's positions and those generated after it."""
        if parents is None and self._pending is not None:
            raise KNNLMError("This document memory holds the positions of another prompt's decoding; make a new "
                             "memory (and processor) for each generate call.")

    def step(self, query: torch.Tensor, last_token: int) -> tuple[np.ndarray, np.ndarray]:
        """Store the previous query with last_token (the token chosen after it), then search query (1, d)."""
        if query.shape[0] != 1:
            raise KNNLMError("The document memory decodes one sequence at a time; pass a batch of one prompt.")
        if self._pending is not None:
            self.add(self._pending[None, :], [last_token])
        self._pending = query[0].detach().float().cpu()
        return self.search(query)


def prompt_memory(lm, ids: list[int], context: int, stride: int, k: int, batch_size: int = 4,
                  attention=None) -> DocumentMemory:
    """A DocumentMemory holding the prompt's positions but its last (whose next token is being chosen).

    Keys come from the decoding's own windows (context, stride), as eval's would: with attention memory
    (an AttentionMemoryConfig) read through it, window after window, as eval and the decoding's queries are.
    """
    from ..windows import forward_owned, plan_windows
    from .reading import forward_in_order

    memory = DocumentMemory(lm.dim, k)
    work = [(w, ids[w.begin: w.end]) for w in plan_windows(0, len(ids), context, stride)]
    parts: dict[int, torch.Tensor] = {}
    passes = forward_owned(lm, work, batch_size, logits=False) if attention is None else \
        forward_in_order(lm, work, attention, context)
    for owned in passes:
        for o in owned:
            parts[o.item] = o.keys.float().cpu()  # (n, d)
    if parts:
        memory.add(torch.cat([parts[i] for i in sorted(parts)]), ids[1:])
    return memory


class MemoryProcessor(QueryHook, LogitsProcessor):
    """Mixes p_mem into a decoding step's scores: log(λ_m·p_mem + (1 − λ_m)·p) ("separate", or no datastore).

    Takes each step's query with a forward-pre-hook on the model's output projection (as
    KNNLogitsProcessor does); put it after the kNN processor so that p is the kNN-LM's. In "joint"
    mode the kNN processor searches the memory itself and this one is not used. Close it (or use it
    as a context manager) to remove the hook.
    """

    def __init__(self, lm, memory: DocumentMemory, lam: float, temperature: float):
        self.memory, self.lam, self.temperature = memory, float(lam), float(temperature)
        self.seconds = 0.0
        QueryHook.__init__(self, lm)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores (1, V) in (logits or log-probabilities), log-probabilities (1, V) out."""
        query, parents, rows = self.take_query(input_ids)
        self.memory.check_continues(parents)
        t0 = time.perf_counter()
        dists, vals = self.memory.step(query, int(rows[0, -1]))
        logp = torch.log_softmax(scores.double().cpu(), dim=-1)  # (1, V)
        out = torch.from_numpy(mix_log_distribution(logp.numpy(), dists, vals, memory_lambdas(vals, self.lam),
                                                    self.temperature))
        self.seconds += time.perf_counter() - t0
        return out.to(scores.device, scores.dtype).masked_fill(scores == -float("inf"), -float("inf"))


def memory_report(scores: Scores, combiner, cfg: MemoryConfig, datastore_dir, head, ppl_without: float) -> dict:
    """eval's figures of the document memory over the scored tokens (the "memory" entry of its report).

    Args:
        scores: the evaluation's scores, with queries.
        combiner: the mixing policy of the datastore (λ = 0 without one).
        cfg: the memory's settings.
        datastore_dir: the datastore (its lambda.json may hold a tuned λ_m, T_m); None: no datastore.
        head: the model's output projection (SPALM reads it).
        ppl_without: the perplexity of the same tokens without the memory.

    Returns:
        mix, k, λ_m and T_m (or the datastore's in "joint" mode), the perplexity with the memory and
        without, the share of tokens whose target is among the memory's neighbours, search seconds.
    """
    from ..interpolate import perplexity

    t0 = time.perf_counter()
    md, mv = memory_neighbors(scores, cfg.k, cfg.chunk)
    seconds = time.perf_counter() - t0
    mix = cfg.mix if datastore_dir is not None else "separate"  # without a datastore the two coincide
    if mix == "joint":
        final = combiner.target_log_probs(with_memory(scores, md, mv), head)
        lam, t, source = None, combiner.temperature, f"the datastore's ({combiner.kind})"
    else:
        lam, t, source = resolve_memory(cfg, datastore_dir)
        final = mix_memory(combiner.target_log_probs(scores, head), md, mv, scores.targets, lam, t)
    ppl = perplexity(final)
    return {"memory": cfg.memory, "mix": mix, "k": cfg.k, "lambda": lam, "temperature": t, "source": source,
            "ppl": ppl, "ppl_without": ppl_without, "change": ppl / ppl_without - 1.0,
            "target_in_memory": float((mv == scores.targets[:, None]).any(1).mean()) if len(scores) else 0.0,
            "search_seconds": seconds}


def tune_memory(scores: Scores, tuned: dict, cfg: MemoryConfig = MemoryConfig()) -> dict:
    """λ_m and T_m of the separate p_mem, fitted on top of the tuned fixed-λ kNN-LM (tune-lambda --memory document).

    Args:
        scores: the tuning scores (with queries).
        tuned: tune-lambda's result (its fixed "lambda" and "temperature" make the kNN-LM that p_mem joins).
        cfg: the memory's k and search block.

    Returns:
        lambda.json's "memory" entry: {"lambda", "temperature", "nll", "nll_without", "tokens", "k"}.
    """
    md, mv = memory_neighbors(scores, cfg.k, cfg.chunk)
    knn = knn_log_prob(scores.dists, scores.vals, scores.targets, tuned["temperature"])
    base = interpolate(scores.lm_logp, knn, tuned["lambda"])
    fit = fit_memory(base, md, mv, scores.targets)
    log.info("document memory: λ_m %.3f, T_m %.3g, NLL %.4f → %.4f", fit["lambda"], fit["temperature"],
             fit["nll_without"], fit["nll"])
    return {**fit, "k": cfg.k, "mix": "separate"}
