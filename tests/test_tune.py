"""tune-lambda: grid search, adaptive λ, held-out split, lambda.json, plot. Synthetic scores, no LM."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from knnlm.errors import KNNLMError
from knnlm.interpolate import perplexity
from knnlm.scores import Scores
from knnlm.combine import FixedLambda, load_lambda, resolve_combiner, save_lambda
from knnlm.tune import (
    TuneConfig, fit_adaptive, fit_bins, fit_fixed, format_table, heldout_curves, plot_curves, split_tokens, tune,
)

# These synthetic scores carry no queries: the λ policies only (tests/test_combine.py covers the rest).
LAMBDA_ONLY = dict(gate=False, skip=False, spalm=False)

V = 40  # vocabulary of the synthetic tokens


def make_scores(n: int, k: int, seed: int, lam_of_d, temperature: float, scale: float = 1.0) -> Scores:
    """Tokens drawn from λ(d0)·p_kNN + (1−λ(d0))·p_LM: the true mixture, so (λ, T) are known."""
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    p_lm = rng.dirichlet(np.full(V, 0.3), size=n)  # (n, V)
    d0 = rng.uniform(0, 50, n) * scale  # (n,) distance to the nearest neighbour
    dists = d0[:, None] + np.sort(rng.uniform(0, 60 * scale, (n, k)), axis=1)
    dists[:, 0] = d0
    dists = dists.astype(np.float32)
    vals = rng.integers(0, V, (n, k)).astype(np.int32)
    w = np.exp(-(dists - dists[:, :1]) / temperature)
    w /= w.sum(axis=1, keepdims=True)  # (n, k)
    p_knn = np.zeros((n, V))
    np.add.at(p_knn, (np.repeat(rows, k), vals.ravel()), w.ravel())
    lam = lam_of_d(d0)[:, None]
    p = lam * p_knn + (1 - lam) * p_lm
    targets = (p.cumsum(axis=1) > rng.uniform(size=n)[:, None] * p.sum(axis=1, keepdims=True)).argmax(axis=1)
    return Scores(targets.astype(np.int32), np.log(p_lm[rows, targets]), dists, vals,
                  np.zeros(n, np.int32), rows.astype(np.int32),
                  {"k": np.int64(k), "model": b"synthetic", "datastore": "abc123"})


@pytest.fixture(scope="module")
def off_grid():
    """λ* = 0.37 at T* = 30, between coarse grid points, distances ×3 (real ones are in the hundreds)."""
    return make_scores(6000, 16, 3, lambda d: np.full(d.shape, 0.37), 30.0, scale=3.0)


@pytest.fixture(scope="module")
def known():
    """6000 tokens whose true mixture is λ* = 0.3 at T* = 10."""
    return make_scores(6000, 16, 0, lambda d: np.full(d.shape, 0.3), 10.0)


@pytest.fixture(scope="module")
def split_by_distance():
    """Tokens whose true λ is 0.9 near their nearest neighbour and 0.02 far from it."""
    return make_scores(6000, 16, 1, lambda d: np.where(d < 25, 0.9, 0.02), 10.0)


@pytest.fixture(scope="module")
def tuned(split_by_distance):
    """tune() on split_by_distance, 8 bins."""
    return tune(split_by_distance, TuneConfig(bins=8, **LAMBDA_ONLY), description="synthetic, 6000 tokens")


def reference_p_knn(scores: Scores, t: float) -> np.ndarray:
    """(n,) p_kNN(target) from the definition, in plain numpy: Σ_i 1[v_i = y]·softmax_i(−d_i/T)."""
    d = np.where(scores.vals < 0, np.inf, scores.dists.astype(np.float64))  # (n, k); missing: no weight
    w = np.exp(-(d - d.min(axis=1, keepdims=True)) / t)
    w /= w.sum(axis=1, keepdims=True)
    return (w * (scores.vals == scores.targets[:, None])).sum(axis=1)


def reference_nll(scores: Scores, lam, t: float, idx=slice(None)) -> float:
    """Mean −log(λ·p_kNN + (1−λ)·p_LM) over tokens idx; λ one number or one per token (all n)."""
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (len(scores),))
    p = lam * reference_p_knn(scores, t) + (1 - lam) * np.exp(scores.lm_logp.astype(np.float64))
    return float(-np.mean(np.log(p[idx])))


def reference_bins(nn: np.ndarray, edges) -> np.ndarray:
    """Bin of each distance: how many inner edges lie at or below it (inf: the last bin)."""
    return (np.asarray(nn, dtype=np.float64)[:, None] >= np.asarray(edges, dtype=np.float64)[None, :]).sum(axis=1)


def brute_force(scores: Scores, temps: np.ndarray, lams: np.ndarray, idx=slice(None)):
    """(λ, T, NLL) minimising the mean NLL of tokens idx over a dense (T, λ) grid, in plain numpy."""
    best = (np.inf, None, None)
    p_lm = np.exp(scores.lm_logp.astype(np.float64))[idx]
    for t in temps:
        p_knn = reference_p_knn(scores, t)[idx]
        nll = -np.log(lams[:, None] * p_knn[None] + (1 - lams[:, None]) * p_lm[None]).mean(axis=1)  # (L,)
        j = int(np.argmin(nll))
        best = min(best, (float(nll[j]), float(lams[j]), float(t)))
    return best[1], best[2], best[0]


def check_bins_optimal(scores: Scores, edges, lambdas, t: float, idx: np.ndarray, step: float = 0.0125):
    """Each bin's λ is, within the tuner's fine λ step, the best λ for the bin's tokens idx at T (dense scan)."""
    bins = reference_bins(scores.nn_dist[idx], edges)
    assert len(lambdas) == len(edges) + 1
    dense = np.linspace(0, 0.99, 496)  # step 0.002
    for b, lam in enumerate(lambdas):
        mine = idx[bins == b]
        assert mine.size > 0
        best, _, _ = brute_force(scores, [t], dense, mine)
        # The NLL is convex in λ: the best point of a grid with step h lies within h of the optimum.
        assert abs(lam - best) <= step + 0.002, (b, lam, best)


@pytest.mark.parametrize("data,lam_true,t_true", [("known", 0.3, 10.0), ("off_grid", 0.37, 30.0)])
def test_grid_finds_the_true_optimum(request, data, lam_true, t_true):
    scores = request.getfixturevalue(data)
    lam, t, nll = fit_fixed(scores)
    assert abs(lam - lam_true) < 0.06
    assert t_true / 1.5 < t < t_true * 1.5
    temps = np.geomspace(t_true / 5, t_true * 5, 57)  # log step 0.058
    b_lam, b_t, b_nll = brute_force(scores, temps, np.linspace(0, 0.7, 141))
    # Coarse-then-fine loses next to nothing against a dense scan, and lands within fine-grid resolution
    # (λ step 0.0125, T step ×10^(1/12)), which the coarse grid alone (×10^(1/3)) would miss.
    assert b_nll - 1e-4 <= nll <= b_nll + 1e-4
    assert abs(lam - b_lam) <= 0.0125 + 0.005
    assert abs(np.log(t / b_t)) <= np.log(10) / 12 + 0.058
    assert nll == pytest.approx(reference_nll(scores, lam, t), rel=1e-9)


def test_adaptive_with_one_bin_is_the_fixed_lambda(known):
    lam, t, nll = fit_fixed(known)
    assert nll == pytest.approx(reference_nll(known, lam, t), rel=1e-9)
    check_bins_optimal(known, [], [lam], t, np.arange(len(known)))
    for cfg in (TuneConfig(bins=1), TuneConfig(bins=8, min_bin_tokens=len(known) + 1)):
        sched = fit_adaptive(known, cfg)
        assert sched["edges"] == [] and sched["lambdas"] == [lam]
        assert sched["temperature"] == t and sched["nll"] == nll
        assert sched["counts"] == [len(known)]


@pytest.mark.parametrize("n,fraction,seed", [(2, 0.5, 0), (7, 0.5, 3), (1000, 0.3, 1), (1001, 0.99, 2)])
def test_split_is_disjoint_and_covers_all_tokens(n, fraction, seed):
    fit, held = split_tokens(n, fraction, seed)
    assert np.intersect1d(fit, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(n))
    assert fit.size >= 1 and held.size >= 1
    assert abs(held.size - n * fraction) <= 1 or n < 10
    assert np.array_equal(split_tokens(n, fraction, seed)[1], held)  # seeded


def test_heldout_tokens_never_reach_the_fit(split_by_distance, tuned):
    s = split_by_distance
    _, held = split_tokens(len(s), 0.5, 0)
    # Scramble everything about the held-out tokens: the held-out fit must not move.
    rng = np.random.default_rng(9)
    lm, dists, vals = s.lm_logp.copy(), s.dists.copy(), s.vals.copy()
    lm[held] = np.log(rng.uniform(1e-4, 1, held.size))
    dists[held] = np.sort(rng.uniform(0, 500, (held.size, dists.shape[1])), axis=1)
    vals[held] = rng.integers(0, V, (held.size, vals.shape[1]))
    other = tune(Scores(s.targets, lm, dists, vals, s.doc, s.pos, s.attrs), TuneConfig(bins=8, **LAMBDA_ONLY))
    assert other["heldout"]["fixed"] == tuned["heldout"]["fixed"]
    assert other["heldout"]["adaptive"] == tuned["heldout"]["adaptive"]
    assert other["heldout"]["fixed_ppl"] != tuned["heldout"]["fixed_ppl"]
    assert other["lambda"] != tuned["lambda"] or other["temperature"] != tuned["temperature"] \
        or other["nll"] != tuned["nll"]  # the stored fit does use every token


def test_heldout_figures_match_a_reference(split_by_distance, tuned):
    s, h, cfg = split_by_distance, tuned["heldout"], TuneConfig(bins=8, **LAMBDA_ONLY)
    fit, held = split_tokens(len(s), cfg.heldout_fraction, cfg.seed)
    temps, lams = np.geomspace(1, 100, 81), np.linspace(0, 0.99, 496)  # dense scan: log step 0.058, λ step 0.002
    # Fixed: the (λ, T) fitted on the fit tokens is as good there as a dense scan; its held-out perplexity.
    lam, t = h["fixed"]["lambda"], h["fixed"]["temperature"]
    assert reference_nll(s, lam, t, fit) <= brute_force(s, temps, lams, fit)[2] + 1e-4
    assert h["fixed_ppl"] == pytest.approx(np.exp(reference_nll(s, lam, t, held)), rel=1e-9)
    # Adaptive: quantile bins of the fit tokens, each λ the best for its bin; its held-out perplexity.
    edges, t_ada = fit_bins(s.nn_dist[fit], cfg.bins, cfg.min_bin_tokens), h["adaptive"]["temperature"]
    check_bins_optimal(s, edges, h["adaptive"]["lambdas"], t_ada, fit)
    per_token = np.asarray(h["adaptive"]["lambdas"])[reference_bins(s.nn_dist, edges)]
    assert h["adaptive_ppl"] == pytest.approx(np.exp(reference_nll(s, per_token, t_ada, held)), rel=1e-9)
    # What is stored is fitted on every token, the same way.
    assert reference_nll(s, tuned["lambda"], tuned["temperature"]) <= brute_force(s, temps, lams)[2] + 1e-4
    assert tuned["nll"] == pytest.approx(reference_nll(s, tuned["lambda"], tuned["temperature"]), rel=1e-9)
    ada = tuned["adaptive"]
    check_bins_optimal(s, ada["edges"], ada["lambdas"], ada["temperature"], np.arange(len(s)))


def test_lambda_zero_is_the_lm_and_one_the_knn(known):
    s = Scores(known.targets, known.lm_logp, known.dists, known.vals.copy(), known.doc, known.pos)
    s.vals[:, -1] = s.targets  # every target among its neighbours: kNN-only perplexity is finite
    cfg = TuneConfig(**LAMBDA_ONLY)
    _, held = split_tokens(len(s), cfg.heldout_fraction, cfg.seed)
    curves = heldout_curves(s, cfg, temperatures=[3.0, 30.0], lambdas=[0.0, 0.5, 1.0])
    base = float(np.exp(-np.mean(s.lm_logp[held].astype(np.float64))))
    assert curves["base_ppl"] == pytest.approx(base, rel=1e-12)
    for t, row in zip(curves["temperatures"], curves["ppl"]):
        assert row[0] == curves["base_ppl"]  # λ = 0 is the LM to the last digit
        assert row[1] == pytest.approx(np.exp(reference_nll(s, 0.5, t, held)), rel=1e-9)
        assert row[2] == pytest.approx(np.exp(reference_nll(s, 1.0, t, held)), rel=1e-9)
        assert np.isfinite(row[2]) and row[2] != row[0]
    assert tune(s, TuneConfig(adaptive=False, **LAMBDA_ONLY))["heldout"]["base_ppl"] == perplexity(s.lm_logp[held])


def test_tiny_bins_are_merged():
    rng = np.random.default_rng(0)
    # 300 exact matches (d = 0) give duplicate quantile edges; 5 tokens have no neighbour at all.
    nn = np.concatenate([np.zeros(300), rng.uniform(1, 2, 695), np.full(5, np.inf)])
    edges = fit_bins(nn, 32, 50)
    counts = np.bincount(np.searchsorted(edges, nn, side="right"), minlength=edges.size + 1)
    assert 1 < edges.size + 1 < 32
    assert np.all(np.diff(edges) > 0) and counts.min() >= 50 and counts.sum() == nn.size
    unmerged = fit_bins(nn, 32, 0)
    assert unmerged.size == 31  # the rule only acts on small bins
    assert fit_bins(nn, 32, nn.size + 1).size == 0  # too few tokens for two bins: one global λ
    assert fit_bins(np.full(10, np.inf), 4, 1).size == 0  # no neighbours at all


def test_adaptive_schedule_respects_min_bin_tokens(split_by_distance):
    sched = fit_adaptive(split_by_distance, TuneConfig(bins=64, min_bin_tokens=200))
    assert min(sched["counts"]) >= 200 and len(sched["lambdas"]) == len(sched["edges"]) + 1 <= 64


def test_adaptive_beats_fixed_when_lambda_depends_on_distance(tuned):
    h = tuned["heldout"]
    assert h["adaptive_ppl"] < 0.99 * h["fixed_ppl"] < h["base_ppl"]
    sched = tuned["adaptive"]
    mids = np.concatenate([[-np.inf], sched["edges"]])
    near = [lam for lo, lam in zip(mids, sched["lambdas"]) if lo < 20]
    far = [lam for lo, lam in zip(mids, sched["lambdas"]) if lo > 30]
    assert min(near) > 0.7 and max(far) < 0.15


def test_result_schema(tuned):
    r = tuned
    assert r["format"] == 2 and 0 <= r["lambda"] < 1 and r["temperature"] > 0
    assert set(r["adaptive"]) >= {"edges", "lambdas", "temperature"}
    assert set(r["heldout"]) >= {"tokens", "base_ppl", "fixed_ppl", "adaptive_ppl", "fixed"}
    assert r["heldout"]["tokens"] == 3000 and r["heldout"]["fit_tokens"] == 3000
    assert r["tuned_on"] == {"description": "synthetic, 6000 tokens", "tokens": 6000,
                             "attrs": {"k": 16, "model": "synthetic", "datastore": "abc123"}}
    assert "T" in r["created"]
    json.dumps(r, allow_nan=False)
    table = format_table(r)
    assert "synthetic, 6000 tokens" in table and f"{r['heldout']['adaptive_ppl']:.3f}" in table
    assert tune(tuned_scores := make_scores(300, 4, 2, lambda d: d * 0 + 0.3, 10.0),
                TuneConfig(adaptive=False, **LAMBDA_ONLY))["adaptive"] is None
    assert "adaptive" not in format_table(tune(tuned_scores, TuneConfig(adaptive=False, **LAMBDA_ONLY)))


def test_save_load_round_trip(tmp_path, tuned, split_by_distance):
    assert load_lambda(tmp_path) is None
    path = save_lambda(tmp_path, tuned)
    assert path == tmp_path / "lambda.json" and load_lambda(tmp_path) == tuned
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "lambda.json"]  # no temp file left (.lock: the
    # journal's, which every datastore holds)
    fixed = resolve_combiner("tuned", tmp_path)
    assert (fixed.kind, fixed.lam, fixed.temperature) == ("tuned", tuned["lambda"], tuned["temperature"])
    nn = split_by_distance.nn_dist
    assert np.array_equal(fixed.lambdas(split_by_distance), np.full(nn.size, tuned["lambda"]))
    ada = resolve_combiner(" Adaptive ", tmp_path)
    assert ada.kind == "adaptive" and ada.temperature == tuned["adaptive"]["temperature"]
    bins = reference_bins(nn, tuned["adaptive"]["edges"])
    assert np.array_equal(ada.lambdas(split_by_distance), np.asarray(tuned["adaptive"]["lambdas"])[bins])


def test_resolve_combiner_numbers(tmp_path, known):
    for spec, lam in [("0", 0.0), ("1", 1.0), ("0.25", 0.25), (" .5 ", 0.5)]:
        c = resolve_combiner(spec, tmp_path)  # never tuned: numbers need no lambda.json
        assert isinstance(c, FixedLambda) and (c.kind, c.lam, c.temperature) == ("fixed", lam, 1.0)
        assert np.array_equal(c.lambdas(known), np.full(len(known), lam))


@pytest.mark.parametrize("spec,match", [("1.5", "outside"), ("-0.1", "outside"), ("nan", "outside"),
                                        ("abc", "must be a number"), ("", "must be a number")])
def test_resolve_combiner_bad_numbers(tmp_path, spec, match):
    with pytest.raises(KNNLMError, match=match):
        resolve_combiner(spec, tmp_path)


@pytest.mark.parametrize("spec", ["tuned", "adaptive"])
def test_resolve_combiner_never_tuned(tmp_path, spec):
    with pytest.raises(KNNLMError,
                       match=r"never tuned \(no lambda.json\), which --lambda \w+ needs; run `knnlm tune-lambda`"):
        resolve_combiner(spec, tmp_path)


def test_resolve_combiner_without_adaptive_schedule(tmp_path, tuned):
    save_lambda(tmp_path, dict(tuned, adaptive=None))
    assert resolve_combiner("tuned", tmp_path).lam == tuned["lambda"]
    with pytest.raises(KNNLMError, match="no adaptive schedule"):
        resolve_combiner("adaptive", tmp_path)
    (tmp_path / "lambda.json").write_text("{not json")
    with pytest.raises(KNNLMError, match="tune-lambda"):
        resolve_combiner("tuned", tmp_path)


def test_bad_config_is_a_sentence():
    with pytest.raises(KNNLMError, match="held-out fraction"):
        TuneConfig(heldout_fraction=1.0)
    with pytest.raises(KNNLMError, match="Temperatures"):
        TuneConfig(temperatures=(10.0, 1.0))


def test_plot_writes_a_png(tmp_path, known):
    curves = heldout_curves(known, TuneConfig(), temperatures=[3.0, 10.0, 30.0], lambdas=np.linspace(0, 1, 11))
    assert np.array(curves["ppl"]).shape == (3, 11)
    plot_curves(curves, tmp_path / "curves.png")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_without_matplotlib(tmp_path, monkeypatch, known):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    curves = heldout_curves(known, TuneConfig(), temperatures=[10.0], lambdas=[0.0, 0.5])
    with pytest.raises(KNNLMError, match="pip install matplotlib"):
        plot_curves(curves, tmp_path / "x.png")
