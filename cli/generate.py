"""`knnlm generate`."""

from __future__ import annotations

import click

from knnlm.api import KNNLM
from knnlm.corpus import read_stdin
from knnlm.generate import generate

from .attention import attention_options
from .common import datastore_option, device_option, json_option, model_option, print_json, refuse_stray, trust_option
from .evaluate import (memory_config, memory_options, mixing_options, refuse_datastore_flags, refuse_spalm_lambda,
                       retomaton_options, retrieval_config, retrieval_options)


@click.command("generate")
@datastore_option
@click.option("--prompt", "-p", required=True, help="Text to continue ('-' reads it from stdin).")
@click.option("--max-new-tokens", "-n", default=64, help="Tokens to add.")
@mixing_options
@click.option("--sample/--greedy", default=False, help="Draw tokens from the distribution, or take the most likely.")
@click.option("--seed", default=0, help="Seed of the sampler.")
@click.option("--compare", is_flag=True, help="Also print the LM's own continuation (λ = 0).")
@retrieval_options
@retomaton_options
@attention_options
@memory_options
@model_option
@device_option
@trust_option
@json_option
def generate_cmd(datastore, prompt, max_new_tokens, lam, combine, skip_below, temperature, sample, seed, compare, k,
                 nprobe, rerank, rerank_depth, exact, search_device, retomaton, min_knns, max_candidates, memory,
                 memory_mix, memory_lambda, memory_temperature, memory_neighbors, no_datastore, model, device,
                 trust_remote_code, as_json, attention):
    """Continue a prompt with the kNN-LM's interpolated distribution."""
    refuse_stray(sample, "--sample", "seed", fix="greedy decoding draws nothing, so add --sample or leave it out")
    refuse_spalm_lambda(combine, lam)
    mem = memory_config(memory, memory_mix, memory_lambda, memory_temperature, memory_neighbors, no_datastore)
    if no_datastore:
        refuse_datastore_flags()  # before stdin is read: a refusal need not wait for it
    if prompt == "-":
        prompt = read_stdin()
    if no_datastore:
        knn = KNNLM.without_datastore(model, device, trust_remote_code)
    else:
        knn = KNNLM.open(datastore, model, device,
                         retrieval_config(k, nprobe, rerank, rerank_depth, exact, search_device, retomaton, min_knns,
                                          max_candidates),
                         trust_remote_code)
    out = generate(knn.lm, prompt, knn.retriever, lam, temperature, max_new_tokens, sample, seed, combine=combine,
                   skip_below=skip_below, memory=mem, attention=attention)
    # The LM alone decodes in the datastore's windows too, so the two see the same left context.
    window = (knn.datastore.meta["context"], knn.datastore.meta["stride"]) if knn.datastore else None
    plain = generate(knn.lm, prompt, None, 0.0, None, max_new_tokens, sample, seed, window) if compare else None
    if as_json:
        result = {"prompt": prompt, "text": out.text, "tokens": out.tokens, "lambda": lam, "sample": sample,
                  "seed": seed, "seconds": out.seconds, "retrieval_seconds": out.retrieval_seconds,
                  "tokens_per_s": len(out.tokens) / out.seconds, "combine": combine, "skip_below": skip_below,
                  "searches_skipped": out.searches_skipped, "searches_saved": out.searches_saved,
                  "tuned_settings_differ": out.tuned_settings_differ,
                  "memory": memory, "memory_mix": memory_mix if knn.retriever else None,
                  "attention_memory": attention.describe if attention is not None else None,
                  **(knn.retriever.describe if knn.retriever else {"search": "none"})}
        if plain is not None:
            result["lm_text"] = plain.text
        print_json(result)
        return
    if plain is None:
        click.echo(prompt + click.style(out.text, bold=True))
    else:
        click.echo(click.style("kNN-LM:", underline=True))
        click.echo(prompt + click.style(out.text, bold=True))
        click.echo(click.style("LM alone:", underline=True))
        click.echo(prompt + click.style(plain.text, bold=True))
    per_token = 1000 * out.retrieval_seconds / max(1, len(out.tokens))
    skipped = f"; {out.searches_skipped} searches skipped" if skip_below is not None else ""
    skipped += f"; {out.searches_saved} searches saved by RetoMaton" if retomaton else ""
    click.echo(f"{len(out.tokens)} tokens in {out.seconds:.1f} s (retrieval {per_token:.1f} ms/token{skipped})",
               err=True)
    if out.tuned_settings_differ:
        click.echo(f"note: {out.tuned_settings_differ}", err=True)


COMMANDS = [generate_cmd]
