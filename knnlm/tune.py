"""Tuning λ and the temperature from cached scores; the similarity-adaptive λ schedule; lambda.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arrays import write_json
from .errors import KNNLMError
from .interpolate import adaptive_lambdas, interpolate, knn_log_prob, perplexity
from .scores import Scores

LAMBDA_FORMAT = 1
LAMBDA_MAX = 0.99  # λ = 1 gives infinite NLL to any token whose target no neighbour carries


@dataclass(frozen=True)
class TuneConfig:
    """How `tune-lambda` searches."""

    temperatures: tuple = tuple(float(t) for t in np.logspace(-1, 3, 17))  # coarse T grid, log scale
    fine_steps: int = 9  # fine T grid: this many points spanning one coarse step each side of the best
    lambda_step: float = 0.05  # coarse λ grid step over [0, 0.99]
    lambda_fine_step: float = 0.0025  # fine λ grid step within one coarse step of the best
    adaptive: bool = True  # also fit a similarity-adaptive schedule
    bins: int = 32  # quantile bins of nearest-neighbour distance
    min_bin_tokens: int = 50  # a bin with fewer tuning tokens takes the global λ (too few to fit its own)
    heldout_fraction: float = 0.5  # share of tokens held out to measure overfitting
    seed: int = 0  # seeds the held-out split


def _lambda_grid(step: float) -> np.ndarray:
    """[0, step, 2·step, …] up to LAMBDA_MAX, LAMBDA_MAX included."""
    return np.unique(np.append(np.arange(0.0, LAMBDA_MAX, step), LAMBDA_MAX))


def _nll_sums(lm_logp: np.ndarray, knn_logp: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """Summed NLL for each λ: (L,)."""
    return np.array([-np.sum(interpolate(lm_logp, knn_logp, lam)) for lam in lams])


def best_lambda(lm_logp: np.ndarray, knn_logp: np.ndarray, cfg: TuneConfig) -> tuple[float, float]:
    """(λ, summed NLL) minimising NLL: a coarse grid, then a fine one around its best."""
    coarse = _lambda_grid(cfg.lambda_step)
    nll = _nll_sums(lm_logp, knn_logp, coarse)
    c = coarse[int(np.argmin(nll))]
    fine = np.arange(max(0.0, c - cfg.lambda_step), min(LAMBDA_MAX, c + cfg.lambda_step) + 1e-12, cfg.lambda_fine_step)
    fine = np.unique(np.clip(np.append(fine, c), 0.0, LAMBDA_MAX))
    nll = _nll_sums(lm_logp, knn_logp, fine)
    i = int(np.argmin(nll))
    return float(fine[i]), float(nll[i])


class _KnnCache:
    """log p_kNN(target) per temperature, computed once each (the costly part: n × k)."""

    def __init__(self, scores: Scores):
        self.scores, self.cache = scores, {}

    def __call__(self, t: float) -> np.ndarray:
        t = float(t)
        if t not in self.cache:
            s = self.scores
            self.cache[t] = knn_log_prob(s.dists, s.vals, s.targets, t)
        return self.cache[t]


def _fine_temperatures(best: float, cfg: TuneConfig) -> np.ndarray:
    """Log-spaced temperatures within one coarse step of best."""
    t = np.asarray(cfg.temperatures, dtype=float)
    ratio = float(np.exp(np.mean(np.diff(np.log(t))))) if len(t) > 1 else 2.0
    return best * np.logspace(-np.log10(ratio), np.log10(ratio), cfg.fine_steps)


def fit_fixed(scores: Scores, cfg: TuneConfig = TuneConfig(), knn: _KnnCache | None = None) -> tuple[float, float, float]:
    """The fixed (λ, T) minimising NLL on scores, and that mean NLL."""
    knn = knn or _KnnCache(scores)
    best = (0.0, float(cfg.temperatures[0]), np.inf)
    for grid in (cfg.temperatures, None):
        temps = grid if grid is not None else _fine_temperatures(best[1], cfg)
        for t in temps:
            lam, nll = best_lambda(scores.lm_logp, knn(t), cfg)
            if nll < best[2]:
                best = (lam, float(t), nll)
    return best[0], best[1], best[2] / max(len(scores), 1)


def _bin_edges(nn_dist: np.ndarray, bins: int) -> np.ndarray:
    """Inner edges of quantile bins of the finite distances (duplicates merged)."""
    finite = nn_dist[np.isfinite(nn_dist)]
    if bins <= 1 or finite.size == 0:
        return np.zeros(0)
    return np.unique(np.quantile(finite, np.arange(1, bins) / bins))


def _fit_bins(scores: Scores, knn_logp: np.ndarray, edges: np.ndarray, cfg: TuneConfig) -> tuple[np.ndarray, float]:
    """Per-bin λ (tiny bins take the global λ) and the summed NLL of the schedule."""
    bins = np.searchsorted(edges, scores.nn_dist, side="right")
    global_lam, _ = best_lambda(scores.lm_logp, knn_logp, cfg)
    lams = np.full(len(edges) + 1, global_lam)
    for b in range(len(edges) + 1):
        m = bins == b
        if m.sum() >= cfg.min_bin_tokens:
            lams[b], _ = best_lambda(scores.lm_logp[m], knn_logp[m], cfg)
    nll = -np.sum(interpolate(scores.lm_logp, knn_logp, lams[bins]))
    return lams, float(nll)


def fit_adaptive(scores: Scores, cfg: TuneConfig = TuneConfig(), knn: _KnnCache | None = None) -> dict:
    """The adaptive schedule: quantile bins of nearest-neighbour distance, a λ per bin, one T for all.

    Each candidate T (the coarse grid, then a fine one around the best) gets its own per-bin
    λs; the T whose schedule has the lowest total NLL wins.
    """
    knn = knn or _KnnCache(scores)
    edges = _bin_edges(scores.nn_dist, cfg.bins)
    best = (None, float(cfg.temperatures[0]), np.inf)
    for grid in (cfg.temperatures, None):
        temps = grid if grid is not None else _fine_temperatures(best[1], cfg)
        for t in temps:
            lams, nll = _fit_bins(scores, knn(t), edges, cfg)
            if nll < best[2]:
                best = (lams, float(t), nll)
    return {"edges": edges.tolist(), "lambdas": best[0].tolist(), "temperature": best[1],
            "nll": best[2] / max(len(scores), 1)}


def split_halves(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) token indices: a seeded random split, disjoint and covering 0..n-1."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = n - int(round(n * fraction))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _schedule_ppl(scores: Scores, schedule: dict) -> float:
    """Perplexity of an adaptive schedule on scores."""
    knn = knn_log_prob(scores.dists, scores.vals, scores.targets, schedule["temperature"])
    lams = adaptive_lambdas(scores.nn_dist, np.asarray(schedule["edges"]), np.asarray(schedule["lambdas"]))
    return perplexity(interpolate(scores.lm_logp, knn, lams))


def tune(scores: Scores, cfg: TuneConfig = TuneConfig(), description: str = "") -> dict:
    """Fit λ, T and (optionally) the adaptive schedule, and measure them on held-out tokens.

    The values stored are fitted on all tokens; the held-out figures come from fitting on
    one part of the tokens and scoring the other, so they show any overfitting.

    Args:
        scores: cached scores of the tuning text.
        cfg: search settings.
        description: what the scores are, for the record.

    Returns:
        The content of lambda.json.
    """
    if len(scores) < 2:
        raise KNNLMError("Too few tokens to tune on; pass more text with --corpus or --scores.")
    fit_idx, held_idx = split_halves(len(scores), cfg.heldout_fraction, cfg.seed)
    fit, held = scores.subset(fit_idx), scores.subset(held_idx)
    lam_a, t_a, _ = fit_fixed(fit, cfg)
    held_knn = knn_log_prob(held.dists, held.vals, held.targets, t_a)
    heldout = {"tokens": len(held), "fit_tokens": len(fit), "base_ppl": perplexity(held.lm_logp),
               "fixed_ppl": perplexity(interpolate(held.lm_logp, held_knn, lam_a)),
               "fixed": {"lambda": lam_a, "temperature": t_a}, "adaptive_ppl": None}
    if cfg.adaptive:
        sched_a = fit_adaptive(fit, cfg)
        heldout["adaptive_ppl"] = _schedule_ppl(held, sched_a)
        heldout["adaptive_temperature"] = sched_a["temperature"]
    knn = _KnnCache(scores)
    lam, t, nll = fit_fixed(scores, cfg, knn)
    return {
        "format": LAMBDA_FORMAT,
        "lambda": lam,
        "temperature": t,
        "nll": nll,
        "adaptive": fit_adaptive(scores, cfg, knn) if cfg.adaptive else None,
        "heldout": heldout,
        "tuned_on": {"description": description, "tokens": len(scores),
                     "scores": {k: v for k, v in scores.attrs.items() if isinstance(v, (str, int, float, bool))}},
        "config": {"bins": cfg.bins, "min_bin_tokens": cfg.min_bin_tokens, "heldout_fraction": cfg.heldout_fraction,
                   "seed": cfg.seed},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_lambda(datastore_dir, result: dict) -> Path:
    """Write lambda.json into a datastore directory (atomically)."""
    path = Path(datastore_dir) / "lambda.json"
    write_json(path, result)
    return path


def load_lambda(datastore_dir) -> dict | None:
    """lambda.json of a datastore directory, or None if it was never tuned."""
    path = Path(datastore_dir) / "lambda.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise KNNLMError(f"{path} is corrupt ({e}); run `knnlm tune-lambda` again.") from e


@dataclass(frozen=True)
class LambdaChoice:
    """The λ that eval applies: a number, the tuned fixed λ, or the adaptive schedule."""

    kind: str  # "fixed", "tuned" or "adaptive"
    lam: float | None = None  # the λ of fixed and tuned
    edges: tuple = ()  # adaptive: inner bin edges of nearest-neighbour distance
    lambdas: tuple = ()  # adaptive: λ per bin
    temperature: float | None = None  # the T tuned with it; None for a given number
    source: str = "given"  # where it came from, for reports

    def lambdas_for(self, nn_dist: np.ndarray) -> np.ndarray:
        """λ per token, given each token's nearest-neighbour distance."""
        if self.kind == "adaptive":
            return adaptive_lambdas(nn_dist, np.asarray(self.edges), np.asarray(self.lambdas))
        return np.full(np.shape(nn_dist), float(self.lam))


def resolve_lambda(spec, datastore_dir) -> LambdaChoice:
    """Turn `--lambda` (a number in [0, 1], "tuned" or "adaptive") into a LambdaChoice."""
    spec = str(spec).strip().lower()
    if spec in ("tuned", "adaptive"):
        tuned = load_lambda(datastore_dir)
        if tuned is None:
            raise KNNLMError(f"Datastore {datastore_dir} has no tuned λ (no lambda.json); run `knnlm tune-lambda` "
                             "first or pass a number, e.g. --lambda 0.25.")
        source = f"lambda.json of {tuned.get('created', '?')}"
        if spec == "tuned":
            return LambdaChoice("tuned", float(tuned["lambda"]), temperature=float(tuned["temperature"]),
                                source=source)
        ada = tuned.get("adaptive")
        if not ada:
            raise KNNLMError(f"{datastore_dir}/lambda.json has no adaptive schedule; run `knnlm tune-lambda "
                             "--adaptive` or pass --lambda tuned.")
        return LambdaChoice("adaptive", None, tuple(ada["edges"]), tuple(ada["lambdas"]),
                            float(ada["temperature"]), source)
    try:
        lam = float(spec)
    except ValueError:
        lam = float("nan")
    if not 0.0 <= lam <= 1.0:
        raise KNNLMError(f"--lambda {spec} is not a number in [0, 1], 'tuned' or 'adaptive'; pass e.g. --lambda 0.25.")
    return LambdaChoice("fixed", lam)


def heldout_curves(scores: Scores, temperatures, lambdas, cfg: TuneConfig = TuneConfig()) -> dict:
    """Perplexity on the held-out part of scores for each T and λ: {T: [ppl per λ]}."""
    _, held_idx = split_halves(len(scores), cfg.heldout_fraction, cfg.seed)
    held = scores.subset(held_idx)
    knn = _KnnCache(held)
    lams = np.asarray(lambdas, dtype=float)
    return {"lambdas": lams.tolist(),
            "curves": {float(t): [perplexity(interpolate(held.lm_logp, knn(t), lam)) for lam in lams]
                       for t in temperatures}}


def plot_curves(curves: dict, path, result: dict | None = None) -> None:
    """A PNG of held-out perplexity against λ, one line per temperature."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise KNNLMError("The plot needs matplotlib; install it with `pip install matplotlib` or pass --no-plot.") from e
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for t, ppl in curves["curves"].items():
        ax.plot(curves["lambdas"], ppl, label=f"T = {float(t):.3g}")
    if result and result.get("heldout"):
        h = result["heldout"]
        ax.axhline(h["base_ppl"], color="grey", ls=":", label="LM alone")
        if h.get("adaptive_ppl"):
            ax.axhline(h["adaptive_ppl"], color="black", ls="--", label="adaptive λ")
    ax.set_xlabel("λ")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("kNN-LM perplexity on held-out tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(result: dict) -> str:
    """The human summary of a tuning result."""
    h = result["heldout"]
    rows = [("tuned on", f"{result['tuned_on']['description']} ({result['tuned_on']['tokens']} tokens)"),
            ("fixed", f"λ = {result['lambda']:.4f}, T = {result['temperature']:.4g}")]
    if result.get("adaptive"):
        a = result["adaptive"]
        rows.append(("adaptive", f"{len(a['lambdas'])} bins, λ {min(a['lambdas']):.3f}…{max(a['lambdas']):.3f}, "
                                 f"T = {a['temperature']:.4g}"))
    rows += [("held-out tokens", f"{h['tokens']} (fitted on the other {h['fit_tokens']})"),
             ("  LM alone", f"{h['base_ppl']:.4f}"),
             ("  best fixed λ", f"{h['fixed_ppl']:.4f}  ({100 * (h['fixed_ppl'] / h['base_ppl'] - 1):+.2f}%)")]
    if h.get("adaptive_ppl"):
        rows.append(("  adaptive λ", f"{h['adaptive_ppl']:.4f}  ({100 * (h['adaptive_ppl'] / h['base_ppl'] - 1):+.2f}%)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
