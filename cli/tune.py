"""`knnlm tune-lambda`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from knnlm import journal
from knnlm.combine import PLOT_FILE, save_lambda
from knnlm.combine.gate import GateConfig
from knnlm.datastore import check_unchanged, open_datastore, refuse_own_file
from knnlm.arrays import check_writable, refuse_existing
from knnlm.evaluate import DEV_SCORES, EvalConfig, dev_scores, run_eval
from knnlm.lm import datastore_lm
from knnlm.memory.document import MemoryConfig, tune_memory
from knnlm.scores import load_scores
from knnlm.tune import TuneConfig, format_table, heldout_curves, plot_curves, tune

from .common import (datastore_option, device_option, json_option, model_option, print_json, progress_bar,
                     refuse_stray, trust_option, typed)
from .evaluate import corpus_format_options, refuse_corpus_flags, retrieval_config, retrieval_options, window_options

# Flags that say how to score; with --scores the scoring is already done, so they would do nothing.
_SCORING_FLAGS = ("corpus", "glob", "fmt", "text_field", "k", "nprobe", "rerank", "rerank_depth", "exact",
                  "search_device", "context", "stride", "batch_size")


@click.command("tune-lambda")
@datastore_option
@click.option("--scores", "scores_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Cached scores from `knnlm eval --save-scores` (no scoring pass).")
@click.option("--corpus", "-c", type=click.Path(exists=True), default=None,
              help="Tuning text [default: the datastore's held-out dev part].")
@corpus_format_options
@click.option("--adaptive/--no-adaptive", default=True, help="Also fit a similarity-adaptive λ schedule.")
@click.option("--bins", default=32, help="Quantile bins of nearest-neighbour distance for adaptive λ.")
@click.option("--min-bin-tokens", default=100, help="Bins with fewer tuning tokens are merged with a neighbour.")
@click.option("--gate/--no-gate", default=True, help="Fit the learned λ gates (before and after retrieval).")
@click.option("--gate-hidden", default=GateConfig.hidden, help="Hidden units of the gate (0: logistic regression).")
@click.option("--gate-rank", default=GateConfig.rank, help="Width of the gate's learned key projection.")
@click.option("--skip/--no-skip", default=True, help="Pick the retrieval-skip threshold of the before-retrieval gate.")
@click.option("--skip-tolerance", default=0.01,
              help="The skip threshold keeps perplexity within this share of no skipping.")
@click.option("--spalm/--no-spalm", default=True, help="Fit SPALM's gate (loads the model's output projection).")
@click.option("--seed", default=0, help="Seed of the fit/held-out split of the tuning tokens.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of held-out perplexity against λ [default: DATASTORE/lambda.png].")
@click.option("--no-plot", is_flag=True, help="Skip the plot.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file (the datastore's own lambda.png is "
                                                "always replaced).")
@click.option("--memory", type=click.Choice(["none", "document"]), default="none", show_default=True,
              help="document: also fit the document memory's λ_m and T_m (eval --memory document --memory-mix "
                   "separate), on top of the tuned λ and T.")
@click.option("--memory-neighbors", default=256, show_default=True, help="Neighbours from the document memory.")
@retrieval_options
@window_options
@model_option
@device_option
@trust_option
@json_option
@click.pass_context
def tune_cmd(ctx, datastore, scores_path, corpus, glob, fmt, text_field, adaptive, bins, min_bin_tokens, gate,
             gate_hidden, gate_rank, skip, skip_tolerance, spalm, seed, plot, no_plot, overwrite, memory,
             memory_neighbors, k, nprobe, rerank, rerank_depth, exact, search_device, context, stride, batch_size, model,
             device, trust_remote_code, as_json):
    """Fit every way of mixing the memory in (fixed λ and T, adaptive λ, the learned gates and their
    retrieval skip, SPALM) on the dev part; store them in DATASTORE/lambda.json and mixing.safetensors."""
    if scores_path:
        given = [name for name in _SCORING_FLAGS
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            flags = ", ".join("--" + name.replace("_", "-").replace("fmt", "format") for name in given)
            raise click.UsageError(f"--scores reuses finished scores, so {flags} would do nothing; drop them, or "
                                   "drop --scores to score again.")
    else:
        refuse_corpus_flags(corpus)
    refuse_stray(memory == "document", "--memory document", "memory_neighbors")
    refuse_stray(adaptive, "--adaptive", "bins", "min_bin_tokens", fix="drop --no-adaptive or leave {it} out")
    refuse_stray(gate, "--gate", "gate_hidden", "gate_rank", fix="drop --no-gate or leave {it} out")
    if skip and not gate and typed("skip"):
        raise click.UsageError("--skip picks the before-retrieval gate's threshold, so it needs --gate; drop --no-gate "
                               "or --skip.")
    refuse_stray(skip and gate, "--skip and --gate", "skip_tolerance", fix="drop --no-skip / --no-gate or leave it out")
    if plot and no_plot:
        raise click.UsageError("--plot names the plot that --no-plot skips; pass one of them.")
    refuse_stray(bool(plot), "--plot", "overwrite")
    named_plot = plot and Path(plot).resolve() != (Path(datastore) / PLOT_FILE).resolve()  # not tuning's own
    if named_plot:
        refuse_own_file(plot, datastore, "--plot")
        refuse_existing(plot, overwrite)
    ds = open_datastore(datastore)
    check_writable(ds.path)  # lambda.json and the dev scores' cache go there: refused now, not after the scoring
    cfg = TuneConfig(adaptive=adaptive, bins=bins, min_bin_tokens=min_bin_tokens, seed=seed, gate=gate,
                     gate_config=GateConfig(hidden=gate_hidden, rank=gate_rank, seed=seed), skip=skip and gate,
                     skip_tolerance=skip_tolerance, spalm=spalm)
    ecfg = EvalConfig(lam="0", temperature=1.0, retrieval=retrieval_config(k, nprobe, rerank, rerank_depth, exact,
                                                                          search_device),
                      context=context, stride=stride, batch_size=batch_size, model=model, device=device,
                      trust_remote_code=trust_remote_code, glob=glob, fmt=fmt, text_field=text_field, keep_features=True)
    # one tune of a datastore at a time, and no add, remove or compact under its scoring (refused in one sentence)
    with journal.hold(ds.path):
        check_unchanged(ds)  # not rebuilt or changed between its opening and the lock
        lm = None
        if spalm or not scores_path:  # SPALM projects hidden states with the model's own output layer
            lm = datastore_lm(ds, model, device, trust_remote_code)
            if spalm:
                lm.output_head.check()  # a model SPALM cannot project for: refused now, not after the scoring
        if scores_path:
            scores, what = load_scores(scores_path), scores_path
            if scores.attrs.get("datastore") != ds.fingerprint:
                raise click.ClickException(f"{scores_path} was scored against another datastore; score again with "
                                           f"`knnlm eval --datastore {ds.path} --save-scores`.")
        elif corpus:
            with progress_bar(None, "scoring") as bar:
                _, scores = run_eval(ds, corpus, ecfg, lm=lm, progress=bar.update)
            what = corpus
        else:
            with progress_bar(None, "scoring dev part") as bar:
                scores, cached = dev_scores(ds, ecfg, lm=lm, progress=bar.update)
            if cached:
                click.echo(f"using cached scores {ds.path / DEV_SCORES}", err=True)
            what = f"dev part of {ds.path}"
        result = tune(scores, cfg, description=str(what), head=lm.output_head if lm else None)
        if memory == "document":
            result["memory"] = tune_memory(scores, result, MemoryConfig(memory=memory, k=memory_neighbors))
        save_lambda(ds.path, result, result.pop("tensors", None))
    if not no_plot:
        t = result["temperature"]
        curves = heldout_curves(scores, cfg, [t / 10, t / 3, t, 3 * t, 10 * t], np.linspace(0, 0.95, 20))
        plot = plot or str(Path(ds.path) / PLOT_FILE)
        plot_curves(curves, plot, result, overwrite=overwrite or not named_plot)
        result["plot"] = plot
    if as_json:
        print_json(result)
    else:
        click.echo(format_table(result))
        if "memory" in result:
            m = result["memory"]
            click.echo(f"document memory: λ_m {m['lambda']:g}, T_m {m['temperature']:.3g}; NLL {m['nll_without']:.4f} "
                       f"→ {m['nll']:.4f} on {m['tokens']} tokens")
        click.echo(f"saved {ds.path}/lambda.json" + (f"; plot {result['plot']}" if "plot" in result else ""))


COMMANDS = [tune_cmd]
