"""`knnlm eval`."""

from __future__ import annotations

import click

from knnlm.evaluate import EvalConfig, run_eval
from knnlm.retrieval import RetrievalConfig

from .common import datastore_option, device_option, json_option, model_option, print_json, progress_bar, trust_option


def retrieval_options(f):
    """--k, --nprobe, --rerank/--no-rerank, --exact."""
    f = click.option("--exact", is_flag=True, help="Brute-force search over keys.npy instead of the index.")(f)
    f = click.option("--rerank/--no-rerank", default=True,
                     help="Recompute exact distances of the retrieved keys from keys.npy.")(f)
    f = click.option("--nprobe", default=8, help="IVF lists visited per query.")(f)
    f = click.option("--k", "k", default=1000, help="Neighbours per token.")(f)
    return f


def window_options(f):
    """--context, --stride, --batch-size."""
    f = click.option("--batch-size", "-b", default=4, help="Windows per forward pass.")(f)
    f = click.option("--stride", type=int, default=None, help="Tokens a window advances [default: the datastore's].")(f)
    f = click.option("--context", type=int, default=None,
                     help="Tokens of left context per window [default: the datastore's].")(f)
    return f


def format_report(r: dict) -> str:
    """The human table of an evaluation."""
    lam = r["lam"] if r["lambda_kind"] == "fixed" else f"{r['lam']} ({r['lambda_source']}, mean {r['mean_lambda']:.3f})"
    search = f"{r['search']}, k {r['k']}" + (f", nprobe {r['nprobe']}" if r["search"] == "ivfpq" else "") + \
        (", re-ranked" if r["rerank"] else "")
    rows = [
        ("text", f"{r['corpus']} ({r['documents']} documents)"),
        ("tokens", f"{r['tokens']}"),
        ("LM perplexity", f"{r['lm_ppl']:.4f}"),
        ("kNN-LM perplexity", f"{r['knn_lm_ppl']:.4f}  ({100 * r['change']:+.2f}%)"),
        ("kNN-only perplexity", f"{r['knn_only_ppl']:.4f}  (target among neighbours for "
                                f"{100 * r['target_in_neighbors']:.1f}% of tokens)"),
        ("λ", lam),
        ("temperature", f"{r['temperature']:g}"),
        ("search", search),
        ("speed", f"{r['tokens_per_s']:.0f} tokens/s; LM {r['lm_seconds']:.1f} s, "
                  f"retrieval {r['retrieval_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@click.command("eval")
@datastore_option
@click.option("--corpus", "-c", type=click.Path(allow_dash=True), default=None,
              help="Text to evaluate [default: the datastore's held-out test part].")
@click.option("--glob", default="**/*.txt", help="Files of a folder given as --corpus.")
@click.option("--lambda", "lam", default="0.25", help="λ: a number in [0, 1], 'tuned' or 'adaptive'.")
@click.option("--temperature", "-t", type=float, default=None,
              help="T in softmax(-d/T) [default: the tuned T, else 1].")
@retrieval_options
@window_options
@click.option("--save-scores", type=click.Path(dir_okay=False), default=None,
              help="Write per-token scores (HDF5) for tune-lambda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --save-scores file.")
@model_option
@device_option
@trust_option
@json_option
def eval_cmd(datastore, corpus, glob, lam, temperature, k, nprobe, rerank, exact, context, stride, batch_size,
             save_scores, overwrite, model, device, trust_remote_code, as_json):
    """Perplexity of the LM alone and of the kNN-LM on the same tokens."""
    import os

    if save_scores and os.path.exists(save_scores) and not overwrite:
        raise click.ClickException(f"{save_scores} already exists; pass --overwrite to replace it.")
    cfg = EvalConfig(lam=lam, temperature=temperature,
                     retrieval=RetrievalConfig(k=k, nprobe=nprobe, rerank=rerank, exact=exact),
                     context=context, stride=stride, batch_size=batch_size, model=model, device=device,
                     trust_remote_code=trust_remote_code, glob=glob, save_scores=save_scores)
    with progress_bar(None, "scoring") as bar:
        result, _ = run_eval(datastore, corpus, cfg, progress=bar.update)
    if as_json:
        print_json(result)
    else:
        click.echo(format_report(result))


COMMANDS = [eval_cmd]
