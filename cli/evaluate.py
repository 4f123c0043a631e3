"""`knnlm eval`."""

from __future__ import annotations

import click

from knnlm.combine import spalm_lambda_error
from knnlm.corpus import DEFAULT_GLOB, FORMATS
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.memory.document import MIX_KINDS, MemoryConfig
from knnlm.report import REPORT_TOKENS, report_eval
from knnlm.report.render import check_report_path
from knnlm.retrieval import RetrievalConfig

from .attention import attention_options
from .common import (datastore_option, device_option, json_option, model_option, print_json, progress_bar,
                     refuse_stray, trust_option, typed)


def retrieval_options(f):
    """--k, --nprobe, --rerank/--no-rerank, --rerank-depth, --exact, --search-device."""
    f = click.option("--search-device", default=None, metavar="DEVICE",
                     help="Exact search in torch on this device (e.g. cuda) instead of the faiss index; keys.npy "
                          "is copied there (N·d·2 bytes on a GPU) [default: the faiss index, on the CPU].")(f)
    f = click.option("--exact", is_flag=True, help="Brute-force search over keys.npy instead of the index.")(f)
    f = click.option("--rerank-depth", type=int, default=None, metavar="R",
                     help="Re-rank only the first R candidates; the rest keep the index's distances, "
                          "raised to the farthest re-ranked one [default: all k].")(f)
    f = click.option("--rerank/--no-rerank", default=True,
                     help="Recompute exact distances of the retrieved keys from keys.npy.")(f)
    f = click.option("--nprobe", default=8, help="IVF lists visited per query.")(f)
    f = click.option("--k", "k", default=1000, help="Neighbours per token.")(f)
    return f


def retomaton_options(f):
    """--retomaton/--no-retomaton, --min-knns, --max-candidates."""
    d = RetrievalConfig()
    f = click.option("--max-candidates", default=d.max_candidates, show_default=True,
                     help="RetoMaton: pointers plus their IVF lists' members ranked instead of a search.")(f)
    f = click.option("--min-knns", default=d.min_knns, show_default=True,
                     help="RetoMaton: pointers needed to skip a search (above --k: never skips).")(f)
    f = click.option("--retomaton/--no-retomaton", default=d.retomaton, show_default=True,
                     help="Follow the neighbours that predicted the actual next token to their successors in "
                          "the datastore, and skip the search where at least --min-knns remain.")(f)
    return f


def retrieval_config(k, nprobe, rerank, rerank_depth, exact, search_device, retomaton=RetrievalConfig.retomaton,
                     min_knns=RetrievalConfig.min_knns,
                     max_candidates=RetrievalConfig.max_candidates) -> RetrievalConfig:
    """The RetrievalConfig of the search flags (and of eval's and generate's RetoMaton flags); one sentence for a
    flag the chosen search would not read."""
    refuse_stray(retomaton, "--retomaton", "min_knns", "max_candidates")
    if search_device is not None:  # its distances are the keys' own: it neither re-ranks nor needs --exact
        given = [name.replace("--rerank", "--rerank/--no-rerank") for name in typed("rerank", "exact")]
        if given:
            raise click.UsageError(f"--search-device already searches exactly, so {' and '.join(given)} would do "
                                   f"nothing; leave {'it' if len(given) == 1 else 'them'} out.")
    refuse_stray(not exact and search_device is None, "the faiss index", "nprobe",
                 fix=f"{'--exact' if exact else '--search-device'} searches every key, so leave it out")
    return RetrievalConfig(k=k, nprobe=nprobe, rerank=rerank, rerank_depth=rerank_depth, exact=exact,
                           search_device=search_device, retomaton=retomaton, min_knns=min_knns,
                           max_candidates=max_candidates)


def window_options(f):
    """--context, --stride, --batch-size."""
    f = click.option("--batch-size", "-b", default=4, help="Windows per forward pass.")(f)
    f = click.option("--stride", type=int, default=None, help="Tokens a window advances [default: the datastore's].")(f)
    f = click.option("--context", type=int, default=None,
                     help="Tokens of left context per window [default: the datastore's].")(f)
    return f


def mixing_options(f):
    """--lambda, --combine, --skip-below, --temperature."""
    f = click.option("--temperature", "-t", type=float, default=None,
                     help="T in softmax(-d/T) [default: the tuned T, else 1].")(f)
    f = click.option("--skip-below", default=None,
                     help="Skip the search where the before-retrieval gate predicts λ below this number, or "
                          "'tuned' (tune-lambda's threshold); those tokens keep p_LM.")(f)
    f = click.option("--combine", type=click.Choice(["mix", "spalm"]), default="mix",
                     help="mix: λ·p_kNN + (1−λ)·p_LM; spalm: SPALM's gated memory (fitted by tune-lambda).")(f)
    f = click.option("--lambda", "lam", default="0.25",
                     help="λ: a number in [0, 1], 'tuned', 'adaptive', 'gate' or 'gate-pre' (from tune-lambda).")(f)
    return f


def memory_options(f):
    """--memory, --memory-mix, --memory-lambda, --memory-temperature, --memory-neighbors, --no-datastore."""
    f = click.option("--no-datastore", is_flag=True,
                     help="No datastore: the LM (--model, else the bundled one) with the document memory alone.")(f)
    f = click.option("--memory-neighbors", default=256, show_default=True,
                     help="Neighbours taken from the document memory per token.")(f)
    f = click.option("--memory-temperature", type=float, default=None,
                     help="T_m of p_mem (separate mix) [default: the tuned T_m, else the measured default].")(f)
    f = click.option("--memory-lambda", default=None,
                     help="λ_m of p_mem (separate mix): a number in [0, 1] or 'tuned' [default: tuned, else the "
                          "measured default].")(f)
    f = click.option("--memory-mix", type=click.Choice(MIX_KINDS), default=MemoryConfig.mix, show_default=True,
                     help="joint: one p_kNN over datastore and memory; separate: λ_m·p_mem + (1 − λ_m)·p_kNN-LM.")(f)
    f = click.option("--memory", type=click.Choice(["none", "document"]), default="none", show_default=True,
                     help="document: the document's own earlier positions are a memory too (exact search).")(f)
    return f


# Flags only a datastore's search or mix reads: given with --no-datastore they would do nothing.
DATASTORE_ONLY = ("datastore", "lam", "combine", "skip_below", "temperature", "k", "nprobe", "rerank", "rerank_depth",
                  "exact", "search_device", "retomaton", "min_knns", "max_candidates")


def refuse_spalm_lambda(combine: str, lam: str) -> None:
    """--lambda typed with --combine spalm, even as the default's value (resolve_combiner refuses any other)."""
    if combine == "spalm" and typed("lam"):
        raise spalm_lambda_error(lam)


def refuse_datastore_flags() -> None:
    """One sentence, not silence, for --no-datastore with a flag that only the datastore reads."""
    given = typed(*DATASTORE_ONLY)
    if given:
        raise click.UsageError(f"{', '.join(given)} only change{'s' if len(given) == 1 else ''} the datastore's "
                               f"search or mix; drop {'it' if len(given) == 1 else 'them'} with --no-datastore.")


def memory_config(memory, memory_mix, memory_lambda, memory_temperature, memory_neighbors,
                  no_datastore: bool) -> MemoryConfig:
    """The MemoryConfig of memory_options' flags; one sentence for a flag the chosen memory would not read."""
    refuse_stray(memory == "document", "--memory document", "memory_mix", "memory_lambda", "memory_temperature",
                 "memory_neighbors")
    refuse_stray(not no_datastore, "a datastore (without one the memory is mixed on its own)", "memory_mix")
    # "joint" mixes the memory's neighbours with the datastore's λ and T: λ_m and T_m are the separate mix's
    refuse_stray(no_datastore or memory_mix == "separate", "--memory-mix separate or --no-datastore",
                 "memory_lambda", "memory_temperature")
    return MemoryConfig(memory=memory, mix=memory_mix, lam=memory_lambda, temperature=memory_temperature,
                        k=memory_neighbors)


def refuse_corpus_flags(corpus) -> None:
    """One sentence, not silence, for --glob, --format or --text-field without the --corpus they would read."""
    refuse_stray(corpus is not None, "--corpus", "glob", "fmt", "text_field",
                 fix="without it the datastore's held-out text is read, so leave {it} out or pass --corpus")


def corpus_format_options(f):
    """--glob, --format, --text-field for a --corpus."""
    f = click.option("--text-field", default="text", help="JSONL field or table column with the text.")(f)
    f = click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto",
                     help="Corpus format (auto: .jsonl, .parquet by suffix; a datasets folder by state.json).")(f)
    f = click.option("--glob", default=DEFAULT_GLOB, help="Files of a folder corpus.")(f)
    return f


def format_report(r: dict) -> str:
    """The human table of an evaluation."""
    lam = r["lam"] if r["lambda_kind"] == "fixed" else f"{r['lam']} ({r['lambda_source']}, mean {r['mean_lambda']:.3f})"
    if r.get("combine") == "spalm":
        lam = f"SPALM ({r['lambda_source']}, mean memory weight 1 − g {r['mean_lambda']:.3f})"
    search = f"{r['search']}, k {r['k']}" + (f", nprobe {r['nprobe']}" if r["search"] in ("ivfpq", "factory") else "") + \
        ("" if not r["rerank"] else ", re-ranked" if r["rerank"] is True else f", re-ranked ({r['rerank']})") + \
        (f", torch on {r['search_device']}" if r.get("search_device") else "")
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
                  f"retrieval {r['retrieval_seconds']:.1f} s, mixing {r['mixing_seconds']:.1f} s"),
    ]
    if r["search"] == "none":  # --no-datastore: no kNN rows, no λ
        rows = [row for row in rows if row[0] in ("text", "tokens", "LM perplexity", "speed")]
    m = r.get("memory")
    if m:
        mixed = f"λ_m {m['lambda']:g}, T_m {m['temperature']:g} ({m['source']})" if m["mix"] == "separate" \
            else f"joint with the datastore's neighbours, T {m['temperature']:g}"
        rows.append(("with document memory", f"{m['ppl']:.4f}  ({100 * m['change']:+.2f}%; {mixed}; target among its "
                                             f"{m['k']} neighbours for {100 * m['target_in_memory']:.1f}% of tokens; "
                                             f"search {m['search_seconds']:.1f} s)"))
    if r.get("retomaton"):
        rows.append(("searches saved", f"{100 * r['searches_saved']:.1f}% (RetoMaton: {r['retomaton']})"))
    if r.get("skip_below") is not None:
        rows.append(("searches skipped", f"{100 * r['searches_skipped']:.1f}% (--skip-below {r['skip_below']})"))
    if r.get("attention_memory"):
        a = r["attention_memory"]
        rows.append(("attention memory", f"layers {a['layers']}, k {a['k']}, {a['positions']} positions, "
                                         f"per {a['retrieval']}"))
    if r.get("tuned_settings_differ"):
        rows.append(("note", r["tuned_settings_differ"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@click.command("eval")
@datastore_option
@click.option("--corpus", "-c", type=click.Path(allow_dash=True), default=None,
              help="Text to evaluate [default: the datastore's held-out test part].")
@corpus_format_options
@mixing_options
@retrieval_options
@retomaton_options
@window_options
@attention_options
@click.option("--save-scores", type=click.Path(dir_okay=False), default=None,
              help="Write per-token scores (HDF5) for tune-lambda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --save-scores or --report file.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False), default=None,
              help="Write an interactive HTML report (one self-contained file) of the scored tokens.")
@click.option("--report-tokens", default=REPORT_TOKENS, show_default=True,
              help="Tokens (the first ones) given full detail in the --report page.")
@memory_options
@model_option
@device_option
@trust_option
@json_option
def eval_cmd(datastore, corpus, glob, fmt, text_field, lam, combine, skip_below, temperature, k, nprobe, rerank,
             rerank_depth, exact, search_device, retomaton, min_knns, max_candidates, context, stride, batch_size,
             save_scores, overwrite, report_file, report_tokens, memory, memory_mix, memory_lambda, memory_temperature,
             memory_neighbors, no_datastore, model, device, trust_remote_code, as_json, attention):
    """Perplexity of the LM alone and of the kNN-LM on the same tokens."""
    if no_datastore:
        refuse_datastore_flags()
    refuse_corpus_flags(corpus)
    refuse_spalm_lambda(combine, lam)
    cfg = EvalConfig(lam=lam, temperature=temperature,
                     retrieval=retrieval_config(k, nprobe, rerank, rerank_depth, exact, search_device, retomaton,
                                                min_knns, max_candidates),
                     context=context, stride=stride, batch_size=batch_size, model=model, device=device,
                     trust_remote_code=trust_remote_code, glob=glob, fmt=fmt, text_field=text_field,
                     save_scores=save_scores, combine=combine, skip_below=skip_below,
                     memory=memory_config(memory, memory_mix, memory_lambda, memory_temperature, memory_neighbors,
                                          no_datastore),
                     use_datastore=not no_datastore, attention=attention, overwrite=overwrite)
    report = report_file is not None  # an empty path is refused, not taken for no --report
    if no_datastore and report:
        raise click.UsageError("--report shows the datastore's neighbours; drop it with --no-datastore.")
    if report:
        check_report_path(report_file)  # before the progress bar (report_eval checks again, for the API's callers)
    refuse_stray(report, "--report", "report_tokens")
    refuse_stray(report or bool(save_scores), "--save-scores or --report", "overwrite")
    if report_tokens < 0:
        raise click.BadParameter(f"{report_tokens} is negative; pass a number of tokens, e.g. 5000.",
                                 param_hint="--report-tokens")
    with progress_bar(None, "scoring") as bar:
        if report:
            result, _ = report_eval(datastore, corpus, cfg, report_file, report_tokens, progress=bar.update)
        else:
            result, _ = run_eval(datastore, corpus, cfg, progress=bar.update)
    if as_json:
        print_json(result)
    else:
        click.echo(format_report(result))
        if report:
            click.echo(f"report written to {result['report_file']} ({result['report_bytes'] / 1e6:.2f} MB)")


COMMANDS = [eval_cmd]
