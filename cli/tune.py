"""`knnlm tune-lambda`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from knnlm.datastore import open_datastore
from knnlm.evaluate import EvalConfig, dev_scores, run_eval
from knnlm.retrieval import RetrievalConfig
from knnlm.scores import load_scores
from knnlm.tune import TuneConfig, format_table, heldout_curves, plot_curves, save_lambda, tune

from .common import datastore_option, device_option, json_option, model_option, print_json, progress_bar, trust_option
from .evaluate import retrieval_options, window_options


@click.command("tune-lambda")
@datastore_option
@click.option("--scores", "scores_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Cached scores from `knnlm eval --save-scores` (no LM run).")
@click.option("--corpus", "-c", type=click.Path(exists=True), default=None,
              help="Tuning text [default: the datastore's held-out dev part].")
@click.option("--glob", default="**/*.txt", help="Files of a folder given as --corpus.")
@click.option("--adaptive/--no-adaptive", default=True, help="Also fit a similarity-adaptive λ schedule.")
@click.option("--bins", default=32, help="Quantile bins of nearest-neighbour distance for adaptive λ.")
@click.option("--min-bin-tokens", default=100, help="Bins with fewer tuning tokens are merged with a neighbour.")
@click.option("--seed", default=0, help="Seed of the fit/held-out split of the tuning tokens.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of held-out perplexity against λ [default: DATASTORE/lambda.png].")
@click.option("--no-plot", is_flag=True, help="Skip the plot.")
@retrieval_options
@window_options
@model_option
@device_option
@trust_option
@json_option
def tune_cmd(datastore, scores_path, corpus, glob, adaptive, bins, min_bin_tokens, seed, plot, no_plot, k, nprobe,
             rerank, exact, context, stride, batch_size, model, device, trust_remote_code, as_json):
    """Find λ, the temperature and an adaptive λ schedule; store them in DATASTORE/lambda.json."""
    if scores_path and corpus:
        raise click.UsageError("Pass --scores or --corpus, not both.")
    ds = open_datastore(datastore)
    ecfg = EvalConfig(lam="0", temperature=1.0, retrieval=RetrievalConfig(k=k, nprobe=nprobe, rerank=rerank,
                                                                          exact=exact),
                      context=context, stride=stride, batch_size=batch_size, model=model, device=device,
                      trust_remote_code=trust_remote_code, glob=glob)
    if scores_path:
        scores, what = load_scores(scores_path), scores_path
        if scores.attrs.get("datastore") != ds.fingerprint:
            raise click.ClickException(f"{scores_path} was scored against another datastore; score again with "
                                       f"`knnlm eval --datastore {ds.path} --save-scores`.")
    elif corpus:
        with progress_bar(None, "scoring") as bar:
            _, scores = run_eval(ds, corpus, ecfg, progress=bar.update)
        what = corpus
    else:
        with progress_bar(None, "scoring dev part") as bar:
            scores, cached = dev_scores(ds, ecfg, progress=bar.update)
        if cached:
            click.echo(f"using cached scores {ds.path / 'dev-scores.h5'}", err=True)
        what = f"dev part of {ds.path}"
    cfg = TuneConfig(adaptive=adaptive, bins=bins, min_bin_tokens=min_bin_tokens, seed=seed)
    result = tune(scores, cfg, description=str(what))
    save_lambda(ds.path, result)
    if not no_plot:
        t = result["temperature"]
        curves = heldout_curves(scores, cfg, [t / 10, t / 3, t, 3 * t, 10 * t], np.linspace(0, 0.95, 20))
        plot = plot or str(Path(ds.path) / "lambda.png")
        plot_curves(curves, plot, result)
        result["plot"] = plot
    if as_json:
        print_json(result)
    else:
        click.echo(format_table(result))
        click.echo(f"saved {ds.path}/lambda.json" + (f"; plot {result['plot']}" if "plot" in result else ""))


COMMANDS = [tune_cmd]
