"""tune-lambda: grid search, adaptive λ, held-out split, lambda.json, plot. Synthetic scores, no LM."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from knnlm.errors import KNNLMError
from knnlm.interpolate import adaptive_lambdas, interpolate, knn_log_prob, perplexity
from knnlm.scores import Scores
from knnlm.tune import (
    LambdaChoice, TuneConfig, fit_adaptive, fit_bins, fit_fixed, format_table, heldout_curves, load_lambda,
    plot_curves, resolve_lambda, save_lambda, split_tokens, tune,
)

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
    return tune(split_by_distance, TuneConfig(bins=8), description="synthetic, 6000 tokens")


def brute_force(scores: Scores, temps: np.ndarray, lams: np.ndarray):
    """(λ, T, NLL) minimising the NLL over a dense grid, straight from knn_log_prob."""
    best = (np.inf, None, None)
    for t in temps:
        knn = knn_log_prob(scores.dists, scores.vals, scores.targets, t)
        nll = -interpolate(scores.lm_logp[None], knn[None], lams[:, None]).mean(axis=1)
        j = int(np.argmin(nll))
        best = min(best, (float(nll[j]), float(lams[j]), float(t)))
    return best[1], best[2], best[0]


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
    assert nll == -np.mean(interpolate(scores.lm_logp, knn_log_prob(scores.dists, scores.vals, scores.targets, t), lam))


def test_adaptive_with_one_bin_is_the_fixed_lambda(known):
    lam, t, nll = fit_fixed(known)
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
    other = tune(Scores(s.targets, lm, dists, vals, s.doc, s.pos, s.attrs), TuneConfig(bins=8))
    assert other["heldout"]["fixed"] == tuned["heldout"]["fixed"]
    assert other["heldout"]["adaptive"] == tuned["heldout"]["adaptive"]
    assert other["heldout"]["fixed_ppl"] != tuned["heldout"]["fixed_ppl"]
    assert other["lambda"] != tuned["lambda"] or other["temperature"] != tuned["temperature"] \
        or other["nll"] != tuned["nll"]  # the stored fit does use every token


def test_heldout_figures_match_a_reference(split_by_distance, tuned):
    s, h, cfg = split_by_distance, tuned["heldout"], TuneConfig(bins=8)
    fit, held = split_tokens(len(s), cfg.heldout_fraction, cfg.seed)
    lam, t, _ = fit_fixed(s.subset(fit), cfg)
    sched = fit_adaptive(s.subset(fit), cfg)
    assert h["fixed"] == {"lambda": lam, "temperature": t}
    assert h["adaptive"] == {"temperature": sched["temperature"], "lambdas": sched["lambdas"]}
    knn = knn_log_prob(s.dists, s.vals, s.targets, t)[held]
    assert h["fixed_ppl"] == pytest.approx(perplexity(interpolate(s.lm_logp[held], knn, lam)), rel=1e-12)
    knn = knn_log_prob(s.dists, s.vals, s.targets, sched["temperature"])[held]
    lams = adaptive_lambdas(s.nn_dist[held], np.array(sched["edges"]), np.array(sched["lambdas"]))
    assert h["adaptive_ppl"] == pytest.approx(perplexity(interpolate(s.lm_logp[held], knn, lams)), rel=1e-12)
    assert (tuned["lambda"], tuned["temperature"], tuned["nll"]) == fit_fixed(s, cfg)
    assert tuned["adaptive"] == fit_adaptive(s, cfg)


def test_lambda_zero_is_the_lm_and_one_the_knn(known):
    s = Scores(known.targets, known.lm_logp, known.dists, known.vals.copy(), known.doc, known.pos)
    s.vals[:, -1] = s.targets  # every target among its neighbours: kNN-only perplexity is finite
    cfg = TuneConfig()
    _, held = split_tokens(len(s), cfg.heldout_fraction, cfg.seed)
    curves = heldout_curves(s, cfg, temperatures=[3.0, 30.0], lambdas=[0.0, 0.5, 1.0])
    assert curves["base_ppl"] == perplexity(s.lm_logp[held])
    for t, row in zip(curves["temperatures"], curves["ppl"]):
        assert row[0] == perplexity(s.lm_logp[held])
        assert row[2] == perplexity(knn_log_prob(s.dists, s.vals, s.targets, t)[held])
        assert np.isfinite(row[2]) and row[2] != row[0]
    assert tune(s, TuneConfig(adaptive=False))["heldout"]["base_ppl"] == perplexity(s.lm_logp[held])


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
    assert r["format"] == 1 and 0 <= r["lambda"] < 1 and r["temperature"] > 0
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
                TuneConfig(adaptive=False))["adaptive"] is None
    assert "adaptive" not in format_table(tune(tuned_scores, TuneConfig(adaptive=False)))


def test_save_load_round_trip(tmp_path, tuned, split_by_distance):
    assert load_lambda(tmp_path) is None
    path = save_lambda(tmp_path, tuned)
    assert path == tmp_path / "lambda.json" and load_lambda(tmp_path) == tuned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lambda.json"]  # no temp file left
    fixed = resolve_lambda("tuned", tmp_path)
    assert (fixed.kind, fixed.lam, fixed.temperature) == ("tuned", tuned["lambda"], tuned["temperature"])
    nn = split_by_distance.nn_dist
    assert np.array_equal(fixed.lambdas_for(nn), np.full(nn.size, tuned["lambda"]))
    ada = resolve_lambda(" Adaptive ", tmp_path)
    assert ada.kind == "adaptive" and ada.temperature == tuned["adaptive"]["temperature"]
    assert np.array_equal(ada.lambdas_for(nn), adaptive_lambdas(nn, np.array(tuned["adaptive"]["edges"]),
                                                                np.array(tuned["adaptive"]["lambdas"])))


def test_resolve_lambda_numbers(tmp_path):
    for spec, lam in [("0", 0.0), ("1", 1.0), ("0.25", 0.25), (" .5 ", 0.5)]:
        c = resolve_lambda(spec, tmp_path)  # never tuned: numbers need no lambda.json
        assert c == LambdaChoice("fixed", lam, None, None, None, c.source)
        assert np.array_equal(c.lambdas_for(np.array([0.0, np.inf])), [lam, lam])


@pytest.mark.parametrize("spec,match", [("1.5", "outside"), ("-0.1", "outside"), ("nan", "outside"),
                                        ("abc", "must be a number"), ("", "must be a number")])
def test_resolve_lambda_bad_numbers(tmp_path, spec, match):
    with pytest.raises(KNNLMError, match=match):
        resolve_lambda(spec, tmp_path)


@pytest.mark.parametrize("spec", ["tuned", "adaptive"])
def test_resolve_lambda_never_tuned(tmp_path, spec):
    with pytest.raises(KNNLMError, match=r"has no tuned λ \(no lambda.json\); run `knnlm tune-lambda`"):
        resolve_lambda(spec, tmp_path)


def test_resolve_lambda_without_adaptive_schedule(tmp_path, tuned):
    save_lambda(tmp_path, dict(tuned, adaptive=None))
    assert resolve_lambda("tuned", tmp_path).lam == tuned["lambda"]
    with pytest.raises(KNNLMError, match="no adaptive schedule"):
        resolve_lambda("adaptive", tmp_path)
    (tmp_path / "lambda.json").write_text("{not json")
    with pytest.raises(KNNLMError, match="tune-lambda"):
        resolve_lambda("tuned", tmp_path)


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
