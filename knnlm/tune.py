"""Fit every mixing policy from cached scores (`knnlm tune-lambda`), without re-running the LM.

A grid search minimises the NLL of p = λ·p_kNN + (1−λ)·p_LM: a coarse (T, λ) grid, then a fine
grid around its best T, T on a log scale. Optionally a similarity-adaptive λ (Drozdov et al. 2022):
one λ per quantile bin of the distance to the nearest neighbour. Overfitting is measured, not
assumed: everything is also fitted on a seeded random share of the tokens and scored on the rest.
What is stored in lambda.json is fitted on all the tokens; the held-out figures ride along.
The learned gates (λ from features, before and after retrieval), the skip threshold and SPALM's
gate are fitted the same way (knnlm.combine holds the policies and their maths).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from .combine import LAMBDA_FORMAT
from .combine.features import POST_FEATURES, PRE_FEATURES, post_features, pre_features
from .combine.gate import GateConfig, fit_gate, gate_tensors
from .combine.spalm import fit_spalm, nll_grid, spalm_target_log_probs
from .arrays import atomic_path, json_safe
from .errors import KNNLMError, expect, settle
from .interpolate import adaptive_lambdas, interpolate, knn_log_prob, perplexity
from .scores import Scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneConfig:
    """Settings of `tune-lambda`."""

    # T of softmax(-d/T), coarse grid: 13 points log-spaced over 0.1..1000 (×2.15 apart). Squared
    # distances of real models are in the hundreds, and T ≈ 30 is known to work well for SmolLM2.
    temperatures: tuple[float, ...] = tuple(np.logspace(-1, 3, 13).tolist())
    # λ coarse grid; 1 is left out because one token the kNN misses makes the NLL at λ = 1 infinite.
    lambdas: tuple[float, ...] = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2).tolist())
    # fine grid: T between the coarse neighbours of the best coarse T, each coarse step split in this
    # many (log scale); λ over all of [0, max_lambda] at the coarse λ step / fine_steps
    fine_steps: int = 4
    max_lambda: float = 0.99  # largest λ tried: λ stays in [0, 1)
    adaptive: bool = True  # also fit a λ per bin of nearest-neighbour distance
    bins: int = 32  # quantile bins of the nn distance, before small bins are merged
    min_bin_tokens: int = 100  # a bin with fewer tuning tokens is merged into a neighbour
    heldout_fraction: float = 0.5  # share of the tokens held out to measure the fit honestly
    seed: int = 0  # seeds the random fit / held-out split of the tokens
    gate: bool = True  # fit the learned λ gates (before and after retrieval); needs scores with queries
    gate_config: GateConfig = GateConfig()  # the gates' shape and training
    skip: bool = True  # pick the skip threshold of the before-retrieval gate (needs gate)
    skip_tolerance: float = 0.01  # the largest threshold keeping perplexity within this share of no skipping
    spalm: bool = True  # fit SPALM's gate; needs scores with queries and the model's output projection
    spalm_grid: int = 17  # gate values at which SPALM's per-token loss is tabulated for training

    def __post_init__(self):
        for name in ("fine_steps", "bins", "min_bin_tokens", "seed", "spalm_grid"):
            settle(self, name, int, name, str(getattr(TuneConfig, name)))
        for name in ("max_lambda", "skip_tolerance", "heldout_fraction"):
            settle(self, name, (int, float), name, str(getattr(TuneConfig, name)))
        settle(self, "gate_config", GateConfig, "gate_config", "GateConfig()")
        try:
            t, lam = np.asarray(self.temperatures, float).reshape(-1), np.asarray(self.lambdas, float).reshape(-1)
        except (TypeError, ValueError):
            raise KNNLMError("temperatures and lambdas take sequences of numbers, e.g. (1.0, 10.0, 100.0).") from None
        if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(np.diff(t) <= 0):
            raise KNNLMError("Temperatures must be finite, positive and increasing; pass e.g. 1,10,100.")
        # held as tuples of floats, whatever was given (one number, a list, an array): iterable and hashable
        object.__setattr__(self, "temperatures", tuple(t.tolist()))
        object.__setattr__(self, "lambdas", tuple(lam.tolist()))
        if not 0 < self.max_lambda < 1 or lam.size == 0 or np.any(np.diff(lam) <= 0) \
                or lam[0] < 0 or lam[-1] > self.max_lambda:
            raise KNNLMError(f"The λ grid must increase within [0, {self.max_lambda}] and max_lambda "
                             "be below 1; pass e.g. 0,0.1,0.2.")
        if self.bins < 1 or self.fine_steps < 1 or self.min_bin_tokens < 0:
            raise KNNLMError("bins and fine_steps must be at least 1 and min_bin_tokens not negative; "
                             "pass e.g. --bins 32.")
        if self.skip and not self.gate:
            raise KNNLMError("The skip threshold needs the learned gate; pass --no-skip with --no-gate.")
        if not self.skip_tolerance >= 0 or self.spalm_grid < 2:
            raise KNNLMError("--skip-tolerance must be ≥ 0 and the SPALM grid at least 2 points.")
        if not 0 < self.heldout_fraction < 1:
            raise KNNLMError(f"The held-out fraction must lie strictly between 0 and 1, not "
                             f"{self.heldout_fraction}; pass e.g. 0.5.")


class _KnnCache:
    """log p_kNN(target) of every token, computed once per temperature: it is the expensive part."""

    def __init__(self, scores: Scores, chunk: int = 1024):
        if len(scores) < 2:
            raise KNNLMError(f"The scores hold {len(scores)} token(s), too few to tune on; "
                             "score more text with `knnlm eval --save-scores`.")
        if scores.dists.shape[1] == 0:
            raise KNNLMError("The scores hold no neighbours (k = 0); score again with k ≥ 1.")
        self.scores, self.chunk, self._by_t = scores, chunk, {}
        self.lm = np.asarray(scores.lm_logp, dtype=np.float64)  # (n,)
        self.nn = scores.nn_dist  # (n,)

    def __call__(self, temperature: float) -> np.ndarray:
        """(n,) log p_kNN at this T."""
        t = float(temperature)
        if t not in self._by_t:
            s, c = self.scores, self.chunk
            # Row chunks keep the (chunk, k) temporaries in cache: ~7x faster than one call at k = 1000.
            self._by_t[t] = np.concatenate([
                knn_log_prob(s.dists[i:i + c], s.vals[i:i + c], s.targets[i:i + c], t)
                for i in range(0, len(s), c)])
        return self._by_t[t]


def split_tokens(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of range(n) into (fit, held-out) sorted index arrays, both non-empty."""
    perm = np.random.default_rng(seed).permutation(n)
    n_held = min(max(int(round(n * heldout_fraction)), 1), n - 1)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def fit_bins(nn_dist: np.ndarray, bins: int, min_tokens: int) -> np.ndarray:
    """Inner edges of `bins` quantile bins of nn_dist, small bins merged into a neighbour.

    Tiny-bin rule: while some bin holds fewer than min_tokens tokens, the smallest bin is merged
    with its smaller neighbour (the edge between them is dropped). Merging rather than shrinking to
    the global λ keeps every stored λ fitted on enough tokens, and also removes the empty bins that
    tied distances (e.g. exact matches at d = 0) give duplicate quantiles. Tokens without a neighbour
    (inf) fall in the last bin, as they do at eval time.
    """
    nn_dist = np.asarray(nn_dist, dtype=np.float64)
    finite = nn_dist[np.isfinite(nn_dist)]
    edges = np.quantile(finite, np.arange(1, bins) / bins) if finite.size else np.zeros(0)
    counts = np.bincount(np.searchsorted(edges, nn_dist, side="right"), minlength=edges.size + 1)
    edges, counts = edges.tolist(), counts.tolist()
    while len(counts) > 1 and min(counts) < min_tokens:
        i = int(np.argmin(counts))
        j = i - 1 if i == len(counts) - 1 or (i > 0 and counts[i - 1] <= counts[i + 1]) else i + 1
        lo = min(i, j)
        counts[lo] += counts.pop(lo + 1)
        edges.pop(lo)
    return np.asarray(edges, dtype=np.float64)


def _fine_temperatures(temps: tuple[float, ...], i: int, steps: int) -> np.ndarray:
    """Log-spaced T between the coarse neighbours of temps[i], temps[i] itself included exactly."""
    lo, hi = temps[max(i - 1, 0)], temps[min(i + 1, len(temps) - 1)]
    return np.unique(np.concatenate([np.geomspace(lo, temps[i], steps + 1), np.geomspace(temps[i], hi, steps + 1)]))


def _fine_lambdas(cfg: TuneConfig) -> np.ndarray:
    """The coarse λ grid plus all of [0, max_lambda] at the coarse step / fine_steps."""
    # λ is cheap (no kNN recomputation), so the fine λ grid spans the whole range, not a window.
    coarse = np.asarray(cfg.lambdas, float)
    step = (np.min(np.diff(coarse)) if coarse.size > 1 else 0.05) / cfg.fine_steps
    dense = np.append(np.arange(0.0, cfg.max_lambda, step), cfg.max_lambda)
    return np.unique(np.round(np.concatenate([coarse, dense]), 6))


def _best_per_bin(lm: np.ndarray, knn: np.ndarray, onehot: np.ndarray, grid: np.ndarray):
    """(λ per bin, total log-likelihood) maximising each bin's log-likelihood over the λ grid."""
    ll = interpolate(lm[None, :], knn[None, :], grid[:, None])  # (L, m)
    # -inf (a kNN miss at λ = 1, or lm -inf) times a 0 in the one-hot would be nan: clip it.
    sums = np.maximum(ll, -1e300) @ onehot  # (L, B)
    best = np.argmax(sums, axis=0)  # (B,) first (smallest) λ on ties
    return grid[best], float(sums[best, np.arange(onehot.shape[1])].sum())


def _search(cache: _KnnCache, idx: np.ndarray, bin_of: np.ndarray, nbins: int, cfg: TuneConfig):
    """(T, λ per bin, mean NLL) on tokens idx: coarse (T, λ) grid, then the fine grid."""
    lm = cache.lm[idx]
    onehot = np.eye(nbins)[bin_of]  # (m, B)

    def at(t, grid):
        lams, total = _best_per_bin(lm, cache(t)[idx], onehot, grid)
        return total, float(t), lams

    coarse = [at(t, np.asarray(cfg.lambdas, float)) for t in cfg.temperatures]
    i = int(np.argmax([c[0] for c in coarse]))
    # At λ = 0 everywhere T does not matter, and the grid's end is no sign of a too narrow grid.
    if i in (0, len(coarse) - 1) and len(coarse) > 1 and np.any(coarse[i][2] > 0):
        log.warning("The best coarse temperature %.3g is at the end of the grid; widen the grid.", coarse[i][1])
    lam_grid = _fine_lambdas(cfg)
    fine = [at(t, lam_grid) for t in _fine_temperatures(cfg.temperatures, i, cfg.fine_steps)]
    _, t, lams = max(fine, key=lambda c: c[0])
    # The NLL is recomputed token by token so that it matches what eval reports to the last digit.
    nll = -float(np.mean(interpolate(lm, cache(t)[idx], lams[bin_of])))
    return t, lams, nll


def _fit_fixed(cache: _KnnCache, idx: np.ndarray, cfg: TuneConfig) -> tuple[float, float, float]:
    """fit_fixed on tokens idx."""
    t, lams, nll = _search(cache, idx, np.zeros(idx.size, dtype=np.intp), 1, cfg)
    return float(lams[0]), t, nll


def _fit_adaptive(cache: _KnnCache, idx: np.ndarray, cfg: TuneConfig) -> dict:
    """fit_adaptive on tokens idx."""
    nn = cache.nn[idx]
    edges = fit_bins(nn, cfg.bins, cfg.min_bin_tokens)
    bin_of = np.searchsorted(edges, nn, side="right")  # (m,) same rule as adaptive_lambdas
    t, lams, nll = _search(cache, idx, bin_of, edges.size + 1, cfg)
    counts = np.bincount(bin_of, minlength=edges.size + 1)
    return {"edges": edges.tolist(), "lambdas": lams.tolist(), "temperature": t, "nll": nll,
            "counts": counts.tolist()}


def fit_fixed(scores: Scores, cfg: TuneConfig = TuneConfig()) -> tuple[float, float, float]:
    """The one λ and T minimising the NLL of the interpolated distribution on all the tokens.

    Args:
        scores: per-token LM log-probs and neighbours (from `eval --save-scores`).
        cfg: grids and search settings.

    Returns:
        (λ, T, mean NLL in nats per token).
    """
    return _fit_fixed(_KnnCache(scores), np.arange(len(scores)), cfg)


def fit_adaptive(scores: Scores, cfg: TuneConfig = TuneConfig()) -> dict:
    """A λ per bin of nearest-neighbour distance, and the T that is best with them, on all the tokens.

    For each candidate T each bin gets its best λ; the T with the lowest total NLL is kept.

    Args:
        scores: per-token LM log-probs and neighbours.
        cfg: grids, number of bins and the tiny-bin threshold.

    Returns:
        {"edges": inner bin edges (B - 1), "lambdas": λ per bin (B), "temperature": T,
        "nll": mean NLL, "counts": tuning tokens per bin (B)}.
    """
    return _fit_adaptive(_KnnCache(scores), np.arange(len(scores)), cfg)


class _Mixing:
    """Everything the gates and SPALM are fitted from, computed once for all the tokens."""

    def __init__(self, scores: Scores, cache: _KnnCache, cfg: TuneConfig, head):
        lm = scores.lm_stats()  # refuses scores without queries in one sentence
        self.scores, self.cache, self.cfg, self.head = scores, cache, cfg, head
        self.keys = np.asarray(scores.queries, np.float32)  # (n, d)
        self.pre = pre_features(self.keys, lm)  # (n, F_pre)
        self.lm_stats, self._post = lm, {}
        self.table = None
        if cfg.spalm:
            if head is None:
                raise KNNLMError("Fitting SPALM needs the model's output projection; pass the LM (or --no-spalm).")
            log.info("Tabulating SPALM's loss at %d gate values for %d tokens", cfg.spalm_grid, len(scores))
            self.grid = np.linspace(0.0, 1.0, cfg.spalm_grid)
            self.table = nll_grid(self.keys, scores.vals, scores.targets, head, self.grid)  # (n, G)

    def post(self, t: float) -> np.ndarray:
        """(n, F_post) after-retrieval features at temperature t."""
        if t not in self._post:
            s = self.scores
            self._post[t] = post_features(self.keys, self.lm_stats, s.dists, s.vals, t)
        return self._post[t]

    def fit(self, idx: np.ndarray, t: float) -> dict:
        """Gates (pre, post), the skip threshold and SPALM's gate fitted on tokens idx only."""
        cfg, out = self.cfg, {}
        lm, knn = self.cache.lm[idx], self.cache(t)[idx]
        if cfg.gate:
            g = cfg.gate_config
            log.info("Training the λ gates (before and after search) on %d tokens", idx.size)
            out["pre"] = fit_gate(self.pre[idx], self.keys[idx], lm, knn, g)
            out["post"] = fit_gate(self.post(t)[idx], self.keys[idx], lm, knn, g)
            if cfg.skip:
                # The threshold is chosen on λ the gates predict for tokens they were not trained on
                # (two-fold cross-fitting inside idx): on their own training tokens they are too sure.
                log.info("Choosing the skip threshold (gates cross-fitted in two folds)")
                lams = {"pre": np.empty(idx.size), "post": np.empty(idx.size)}
                for train, other in _two_folds(idx.size, g.seed):
                    part = {"pre": fit_gate(self.pre[idx[train]], self.keys[idx[train]], lm[train], knn[train], g),
                            "post": fit_gate(self.post(t)[idx[train]], self.keys[idx[train]], lm[train], knn[train],
                                             g)}
                    for name, value in self.lambdas(part, idx[other], t).items():
                        lams[name][other] = value
                out["skip_below"] = pick_skip_threshold(lams, lm, knn, cfg.skip_tolerance)
        if self.table is not None:
            log.info("Training SPALM's gate on %d tokens", idx.size)
            out["spalm"] = fit_spalm(self.keys[idx], self.table[idx], cfg.gate_config)
        return out

    def lambdas(self, fitted: dict, idx: np.ndarray, t: float) -> dict:
        """λ of the pre and post gates on tokens idx."""
        return {"pre": fitted["pre"].lambdas(self.pre[idx], self.keys[idx]),
                "post": fitted["post"].lambdas(self.post(t)[idx], self.keys[idx])}


def _two_folds(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A seeded split of range(n) into two halves, as (train, other) both ways."""
    a, b = split_tokens(n, 0.5, seed + 1)
    return [(a, b), (b, a)]


def skipped_ppl(lams: dict, lm: np.ndarray, knn: np.ndarray, threshold: float) -> tuple[float, float]:
    """(share skipped, perplexity) when tokens whose pre-gate λ is below threshold skip the search (λ = 0)
    and the others take the post gate's λ."""
    keep = lams["pre"] >= threshold
    return float(1 - keep.mean()), perplexity(interpolate(lm, knn, np.where(keep, lams["post"], 0.0)))


def skip_curve(lams: dict, lm: np.ndarray, knn: np.ndarray, shares=np.arange(0.0, 1.0, 0.05)) -> list[dict]:
    """Perplexity when the tokens of lowest pre-gate λ skip the search (λ = 0), at several skipped shares.

    The thresholds are quantiles of the pre-gate λ; searched tokens take the post gate's λ.
    Returns [{"threshold", "skipped", "ppl"}], threshold 0 first (nothing skipped).
    """
    out = []
    for share in shares:
        x = 0.0 if share == 0 else float(np.quantile(lams["pre"], share))
        skipped, ppl = skipped_ppl(lams, lm, knn, x)
        out.append({"threshold": x, "skipped": skipped, "ppl": ppl})
    return out


def pick_skip_threshold(lams: dict, lm: np.ndarray, knn: np.ndarray, tolerance: float) -> float:
    """The largest threshold on the curve whose perplexity stays within tolerance of no skipping."""
    curve = skip_curve(lams, lm, knn)
    ok = [c["threshold"] for c in curve if c["ppl"] <= curve[0]["ppl"] * (1 + tolerance)]
    return max(ok)


def tune(scores: Scores, cfg: TuneConfig = TuneConfig(), description: str = "", head=None) -> dict:
    """Fit every mixing policy on all the tokens, and measure each fit on held-out ones.

    Fixed λ and T, the adaptive schedule, the learned gates (before and after retrieval), the skip
    threshold and SPALM's gate are each fitted on one share of the tokens and measured on the rest,
    then fitted again on all of them for storing.

    Args:
        scores: per-token LM log-probs and neighbours of the tuning text (with queries and LM
            statistics for the gate and SPALM).
        cfg: grids, which policies to fit, and the held-out split.
        description: what the tokens are, e.g. "dev part of datastore, 4213 tokens".
        head: the model's output projection (lm_head), needed for SPALM.

    Returns:
        The content of lambda.json, plus "tensors": the gates' weights that save_lambda writes to
        mixing.safetensors (absent when no gate was fitted).
    """
    expect(scores, Scores, "scores", "load_scores(path)")
    expect(cfg, TuneConfig, "cfg", "TuneConfig()")
    cache = _KnnCache(scores)
    fit, held = split_tokens(len(scores), cfg.heldout_fraction, cfg.seed)
    log.info("Fitting on %d tokens, measuring on %d held out", fit.size, held.size)
    lm_h, nn_h = cache.lm[held], cache.nn[held]
    lam_h, t_h, _ = _fit_fixed(cache, fit, cfg)
    heldout = {"tokens": int(held.size), "fit_tokens": int(fit.size), "seed": cfg.seed,
               "base_ppl": perplexity(lm_h),
               "fixed_ppl": perplexity(interpolate(lm_h, cache(t_h)[held], lam_h)),
               "adaptive_ppl": None, "fixed": {"lambda": lam_h, "temperature": t_h}, "adaptive": None}
    t_gate_h = t_h
    if cfg.adaptive:
        ada_h = _fit_adaptive(cache, fit, cfg)
        lams = adaptive_lambdas(nn_h, np.asarray(ada_h["edges"]), np.asarray(ada_h["lambdas"]))
        heldout["adaptive_ppl"] = perplexity(interpolate(lm_h, cache(ada_h["temperature"])[held], lams))
        heldout["adaptive"] = {"temperature": ada_h["temperature"], "lambdas": ada_h["lambdas"]}
        t_gate_h = ada_h["temperature"]
    mixing = _Mixing(scores, cache, cfg, head) if (cfg.gate or cfg.spalm) else None
    if mixing is not None:
        heldout.update(_measure_mixing(mixing, mixing.fit(fit, t_gate_h), held, t_gate_h))
    log.info("Fitting on all %d tokens", len(scores))
    everything = np.arange(len(scores))
    lam, t, nll = _fit_fixed(cache, everything, cfg)
    ada = _fit_adaptive(cache, everything, cfg) if cfg.adaptive else None
    result = {
        "format": LAMBDA_FORMAT,
        "lambda": lam,
        "temperature": t,
        "nll": nll,
        "adaptive": ada,
        "gate": None,
        "spalm": None,
        "heldout": heldout,
        "tuned_on": {"description": description, "tokens": len(scores), "attrs": json_safe(scores.attrs)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": json_safe(asdict(cfg)),
    }
    if mixing is not None:
        t_gate = ada["temperature"] if ada else t
        fitted = mixing.fit(everything, t_gate)
        tensors = {}
        if cfg.gate:
            shares = mixing.lambdas(fitted, everything, t_gate)["pre"]
            result["gate"] = {
                "temperature": t_gate,
                "pre": {"features": list(PRE_FEATURES), "shape": fitted["pre"].shape},
                "post": {"features": list(POST_FEATURES), "shape": fitted["post"].shape},
                "skip_below": fitted.get("skip_below"),
                "skipped_share": float(np.mean(shares < fitted["skip_below"])) if cfg.skip else None,
            }
            tensors.update(gate_tensors(fitted["pre"], "gate.pre"))
            tensors.update(gate_tensors(fitted["post"], "gate.post"))
        if "spalm" in fitted:
            result["spalm"] = {"dim": int(mixing.keys.shape[1]), "grid": cfg.spalm_grid}
            tensors.update({f"spalm.{k}": v for k, v in fitted["spalm"].state_dict().items()})
        result["tensors"] = tensors
    return result


def _measure_mixing(mixing: _Mixing, fitted: dict, held: np.ndarray, t: float) -> dict:
    """Held-out figures of gates, skipping and SPALM fitted on the other tokens."""
    out: dict = {"gate_temperature": t}
    lm, knn = mixing.cache.lm[held], mixing.cache(t)[held]
    if "pre" in fitted:
        lams = mixing.lambdas(fitted, held, t)
        out["gate_pre_ppl"] = perplexity(interpolate(lm, knn, lams["pre"]))
        out["gate_ppl"] = perplexity(interpolate(lm, knn, lams["post"]))
        if "skip_below" in fitted:
            x = fitted["skip_below"]
            skipped, ppl = skipped_ppl(lams, lm, knn, x)
            out["skip"] = {"threshold": x, "skipped": skipped, "ppl": ppl}
            out["skip_curve"] = skip_curve(lams, lm, knn)
    if "spalm" in fitted:
        s = mixing.scores
        logp, g = spalm_target_log_probs(mixing.keys[held], s.vals[held], s.targets[held], mixing.head,
                                         fitted["spalm"])
        out["spalm_ppl"] = perplexity(logp)
        out["spalm_mean_gate"] = float(np.mean(g))
    return out


def heldout_curves(scores: Scores, cfg: TuneConfig = TuneConfig(), temperatures=None, lambdas=None) -> dict:
    """Held-out perplexity for every (T, λ) pair, on the same held-out tokens as tune.

    Args:
        scores: per-token LM log-probs and neighbours.
        cfg: gives the held-out split (fraction and seed).
        temperatures: the T of each curve (default: the coarse grid).
        lambdas: the λ of each point (default: 0 to max_lambda in 34 steps); 1 is allowed.

    Returns:
        {"temperatures": [T], "lambdas": [λ], "ppl": [[ppl per λ] per T], "base_ppl", "tokens"}.
    """
    temps = list(cfg.temperatures if temperatures is None else temperatures)
    lams = np.asarray(np.linspace(0.0, cfg.max_lambda, 34) if lambdas is None else lambdas, dtype=np.float64)
    _, held = split_tokens(len(scores), cfg.heldout_fraction, cfg.seed)
    cache = _KnnCache(scores.subset(held))
    ppl = []
    for t in temps:
        ll = interpolate(cache.lm[None, :], cache(t)[None, :], lams[:, None])  # (L, m)
        ppl.append([perplexity(row) for row in ll])  # per row, so λ = 0 is the base LM to the last digit
    return {"temperatures": [float(t) for t in temps], "lambdas": lams.tolist(), "ppl": ppl,
            "base_ppl": perplexity(cache.lm), "tokens": int(held.size)}


def plot_curves(curves: dict, path, result: dict | None = None, overwrite: bool = True) -> None:
    """Write a PNG of held-out perplexity against λ, one line per T, the base LM dashed.

    Args:
        curves: the output of heldout_curves.
        path: the PNG file to write.
        result: a tune result; if given, its held-out adaptive perplexity is drawn too.
        overwrite: replace a file at path; without it, one another process wrote meanwhile is refused.
    """
    try:
        # Figure + the Agg canvas, not pyplot: no GUI backend, no global state touched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise KNNLMError("Plotting needs matplotlib, which is not installed; run `pip install matplotlib`.") from e
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ppl = np.asarray(curves["ppl"], dtype=np.float64)  # (T, L)
    ppl = np.where(np.isfinite(ppl), ppl, np.nan)  # λ = 1 can be infinite: leave a gap
    for t, row in zip(curves["temperatures"], ppl):
        ax.plot(curves["lambdas"], row, marker=".", label=f"T = {t:.3g}")
    base = curves["base_ppl"]
    ax.axhline(base, color="grey", linestyle="--", label=f"base LM ({base:.2f})")
    ada = ((result or {}).get("heldout") or {}).get("adaptive_ppl")
    if ada is not None:
        ax.axhline(ada, color="black", linestyle=":", label=f"adaptive λ ({ada:.2f})")
    if np.isfinite(ppl).any():
        # Perplexity explodes near λ = 1 at bad T; cap the axis so the minima stay readable.
        ax.set_ylim(0.97 * min(np.nanmin(ppl), base), max(min(np.nanmax(ppl), 1.5 * base), base) * 1.03)
    ax.set_xlabel("λ")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"kNN-LM held-out perplexity ({curves['tokens']} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path, exclusive=not overwrite) as tmp:  # a plot cut short never replaces the last one
        fig.savefig(str(tmp), format="png")


def format_table(result: dict) -> str:
    """A human-readable summary of a tune result (lambda.json content)."""
    h, on = result["heldout"], result["tuned_on"]
    what = on.get("description") or "scores"
    lines = [f"tuned on: {what} ({on['tokens']} tokens), {result['created']}",
             f"held out: {h['tokens']} tokens (fitted on the other {h['fit_tokens']}, seed {h['seed']})",
             "",
             f"{'':<22}{'λ':>14}{'T':>9}{'held-out ppl':>15}",
             f"{'base LM':<22}{0:>14.3f}{'-':>9}{h['base_ppl']:>15.3f}",
             f"{'fixed λ':<22}{h['fixed']['lambda']:>14.3f}{h['fixed']['temperature']:>9.3g}{h['fixed_ppl']:>15.3f}"]
    ada = result.get("adaptive")
    if h.get("adaptive") is not None:
        lams = h["adaptive"]["lambdas"]
        lines.append(f"{'adaptive (' + str(len(lams)) + ' bins)':<22}{f'{min(lams):.2f}-{max(lams):.2f}':>14}"
                     f"{h['adaptive']['temperature']:>9.3g}{h['adaptive_ppl']:>15.3f}")
    tg = h.get("gate_temperature")
    if h.get("gate_ppl") is not None:
        lines.append(f"{'gate, before search':<22}{'learned':>14}{tg:>9.3g}{h['gate_pre_ppl']:>15.3f}")
        lines.append(f"{'gate, after search':<22}{'learned':>14}{tg:>9.3g}{h['gate_ppl']:>15.3f}")
    if h.get("skip") is not None:
        sk = h["skip"]
        name, rule = f"gate + skip {100 * sk['skipped']:.0f}%", f"skip < {sk['threshold']:.3f}"
        lines.append(f"{name:<22}{rule:>14}{tg:>9.3g}{sk['ppl']:>15.3f}")
    if h.get("spalm_ppl") is not None:
        gate = f"mean g {h['spalm_mean_gate']:.2f}"
        lines.append(f"{'SPALM':<22}{gate:>14}{'-':>9}{h['spalm_ppl']:>15.3f}")
    stored = f"stored (all tokens): λ {result['lambda']:.3f}, T {result['temperature']:.3g}"
    if ada:
        stored += f"; adaptive {len(ada['lambdas'])} bins, λ {min(ada['lambdas']):.2f}-{max(ada['lambdas']):.2f}, " \
                  f"T {ada['temperature']:.3g}"
    return "\n".join(lines + ["", stored])
