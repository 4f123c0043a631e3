"""Tune λ and the temperature T from cached scores (`knnlm tune-lambda`), without re-running the LM.

A grid search minimises the NLL of p = λ·p_kNN + (1−λ)·p_LM: a coarse (T, λ) grid, then a fine
grid around its best T, T on a log scale. Optionally a similarity-adaptive λ (Drozdov et al. 2022):
one λ per quantile bin of the distance to the nearest neighbour. Overfitting is measured, not
assumed: everything is also fitted on a seeded random share of the tokens and scored on the rest.
What is stored in lambda.json is fitted on all the tokens; the held-out figures ride along.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .arrays import write_json
from .errors import KNNLMError
from .interpolate import adaptive_lambdas, interpolate, knn_log_prob, perplexity
from .scores import Scores

log = logging.getLogger(__name__)

LAMBDA_FORMAT = 1
LAMBDA_FILE = "lambda.json"


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

    def __post_init__(self):
        t, lam = np.asarray(self.temperatures, float), np.asarray(self.lambdas, float)
        if t.size == 0 or np.any(t <= 0) or np.any(np.diff(t) <= 0):
            raise KNNLMError("Temperatures must be positive and increasing; pass e.g. 1,10,100.")
        if not 0 < self.max_lambda < 1 or lam.size == 0 or np.any(np.diff(lam) <= 0) \
                or lam[0] < 0 or lam[-1] > self.max_lambda:
            raise KNNLMError(f"The λ grid must increase within [0, {self.max_lambda}] and max_lambda "
                             "be below 1; pass e.g. 0,0.1,0.2.")
        if self.bins < 1 or self.fine_steps < 1 or self.min_bin_tokens < 0:
            raise KNNLMError("bins and fine_steps must be at least 1 and min_bin_tokens not negative; "
                             "pass e.g. --bins 32.")
        if not 0 < self.heldout_fraction < 1:
            raise KNNLMError(f"The held-out fraction must lie strictly between 0 and 1, not "
                             f"{self.heldout_fraction}; pass e.g. 0.5.")


@dataclass(frozen=True)
class LambdaChoice:
    """How eval picks λ: a fixed number, the tuned fixed λ, or the tuned adaptive schedule."""

    kind: str  # "fixed" (a number given), "tuned" (lambda.json's λ) or "adaptive" (its schedule)
    lam: float | None  # the one λ for "fixed" and "tuned"; None for "adaptive"
    edges: tuple[float, ...] | None  # inner nn-distance bin edges, "adaptive" only
    lambdas: tuple[float, ...] | None  # λ per bin (len(edges) + 1), "adaptive" only
    temperature: float | None  # T tuned along with this λ; None when λ was given as a number
    source: str  # where λ came from, for reports

    def lambdas_for(self, nn_dist: np.ndarray) -> np.ndarray:
        """λ per token.

        Args:
            nn_dist: (n,) distance of each token to its nearest neighbour (inf if none).

        Returns:
            (n,) float64 λ of each token.
        """
        nn_dist = np.asarray(nn_dist)
        if self.kind == "adaptive":
            return adaptive_lambdas(nn_dist, np.asarray(self.edges, float), np.asarray(self.lambdas, float))
        return np.full(nn_dist.shape, float(self.lam))


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


def _jsonable(value):
    """value as a JSON-native type (numpy scalars and arrays, bytes from HDF5 attrs)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def tune(scores: Scores, cfg: TuneConfig = TuneConfig(), description: str = "") -> dict:
    """Fit λ and T (and the adaptive schedule) on all the tokens, and measure the fit on held-out ones.

    Args:
        scores: per-token LM log-probs and neighbours of the tuning text.
        cfg: grids, adaptive settings and the held-out split.
        description: what the tokens are, e.g. "dev part of datastore, 4213 tokens".

    Returns:
        The content of lambda.json (see save_lambda).
    """
    cache = _KnnCache(scores)
    fit, held = split_tokens(len(scores), cfg.heldout_fraction, cfg.seed)
    log.info("Fitting on %d tokens, measuring on %d held out", fit.size, held.size)
    lm_h, nn_h = cache.lm[held], cache.nn[held]
    lam_h, t_h, _ = _fit_fixed(cache, fit, cfg)
    heldout = {"tokens": int(held.size), "fit_tokens": int(fit.size), "seed": cfg.seed,
               "base_ppl": perplexity(lm_h),
               "fixed_ppl": perplexity(interpolate(lm_h, cache(t_h)[held], lam_h)),
               "adaptive_ppl": None, "fixed": {"lambda": lam_h, "temperature": t_h}, "adaptive": None}
    if cfg.adaptive:
        ada_h = _fit_adaptive(cache, fit, cfg)
        lams = adaptive_lambdas(nn_h, np.asarray(ada_h["edges"]), np.asarray(ada_h["lambdas"]))
        heldout["adaptive_ppl"] = perplexity(interpolate(lm_h, cache(ada_h["temperature"])[held], lams))
        heldout["adaptive"] = {"temperature": ada_h["temperature"], "lambdas": ada_h["lambdas"]}
    log.info("Fitting on all %d tokens", len(scores))
    everything = np.arange(len(scores))
    lam, t, nll = _fit_fixed(cache, everything, cfg)
    return {
        "format": LAMBDA_FORMAT,
        "lambda": lam,
        "temperature": t,
        "nll": nll,
        "adaptive": _fit_adaptive(cache, everything, cfg) if cfg.adaptive else None,
        "heldout": heldout,
        "tuned_on": {"description": description, "tokens": len(scores), "attrs": _jsonable(scores.attrs)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": _jsonable(asdict(cfg)),
    }


def save_lambda(datastore_dir, result: dict) -> Path:
    """Write result to DATASTORE/lambda.json atomically (temp file, then rename); returns its path."""
    directory = Path(datastore_dir)
    if not directory.is_dir():
        raise KNNLMError(f"Datastore directory {directory} does not exist; pass the directory of a built datastore.")
    path = directory / LAMBDA_FILE
    write_json(path, result)
    return path


def load_lambda(datastore_dir) -> dict | None:
    """The content of DATASTORE/lambda.json, or None if it was never tuned."""
    path = Path(datastore_dir) / LAMBDA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KNNLMError(f"Cannot read {path} ({e}); run `knnlm tune-lambda` again.") from e
    if not isinstance(data, dict) or data.get("format") != LAMBDA_FORMAT:
        raise KNNLMError(f"{path} is not a knnlm λ file of format {LAMBDA_FORMAT}; run `knnlm tune-lambda` again.")
    return data


def resolve_lambda(spec: str, datastore_dir) -> LambdaChoice:
    """Turn a --lambda value into a LambdaChoice.

    Args:
        spec: "tuned", "adaptive" (both read DATASTORE/lambda.json) or a number in [0, 1].
        datastore_dir: the datastore directory (only read for "tuned" and "adaptive").

    Returns:
        The LambdaChoice; its temperature is the tuned T, or None for a number.

    Raises:
        KNNLMError: unparsable or out-of-range number, or no lambda.json / no adaptive schedule.
    """
    word = str(spec).strip().lower()
    if word not in ("tuned", "adaptive"):
        try:
            lam = float(word)
        except ValueError:
            raise KNNLMError(f"--lambda must be a number in [0, 1], 'tuned' or 'adaptive', not {spec!r}; "
                             "pass e.g. --lambda 0.25.") from None
        if not 0.0 <= lam <= 1.0:  # also refuses nan
            raise KNNLMError(f"--lambda {spec} is outside [0, 1]; pass a number in [0, 1], e.g. --lambda 0.25.")
        return LambdaChoice("fixed", lam, None, None, None, f"--lambda {spec}")
    data = load_lambda(datastore_dir) if datastore_dir is not None else None
    if data is None:
        raise KNNLMError(f"Datastore {datastore_dir} has no tuned λ (no {LAMBDA_FILE}); run `knnlm tune-lambda` "
                         "first or pass a number, e.g. --lambda 0.25.")
    path = Path(datastore_dir) / LAMBDA_FILE
    if word == "tuned":
        return LambdaChoice("tuned", float(data["lambda"]), None, None, float(data["temperature"]),
                            f"{path} (λ {data['lambda']:.4g}, tuned {data.get('created', '')})")
    ada = data.get("adaptive")
    if not ada:
        raise KNNLMError(f"{path} has no adaptive schedule (tuned with --no-adaptive); run `knnlm tune-lambda "
                         "--adaptive` or pass --lambda tuned.")
    return LambdaChoice("adaptive", None, tuple(map(float, ada["edges"])), tuple(map(float, ada["lambdas"])),
                        float(ada["temperature"]),
                        f"{path} (adaptive, {len(ada['lambdas'])} bins, tuned {data.get('created', '')})")


def pick_temperature(given: float | None, datastore_dir, choice: LambdaChoice | None = None) -> float:
    """T of p_kNN: the one given, else the one tuned with the chosen λ, else lambda.json's, else 1."""
    if given is not None:
        if not given > 0:
            raise KNNLMError(f"--temperature {given} must be positive; pass e.g. --temperature 1.")
        return float(given)
    if choice is not None and choice.temperature:
        return float(choice.temperature)
    tuned = (load_lambda(datastore_dir) or {}) if datastore_dir is not None else {}
    return float(tuned.get("temperature") or 1.0)


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


def plot_curves(curves: dict, path, result: dict | None = None) -> None:
    """Write a PNG of held-out perplexity against λ, one line per T, the base LM dashed.

    Args:
        curves: the output of heldout_curves.
        path: the PNG file to write.
        result: a tune result; if given, its held-out adaptive perplexity is drawn too.
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
    fig.savefig(str(path), format="png")


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
    stored = f"stored (all tokens): λ {result['lambda']:.3f}, T {result['temperature']:.3g}"
    if ada:
        stored += f"; adaptive {len(ada['lambdas'])} bins, λ {min(ada['lambdas']):.2f}-{max(ada['lambdas']):.2f}, " \
                  f"T {ada['temperature']:.3g}"
    return "\n".join(lines + ["", stored])
