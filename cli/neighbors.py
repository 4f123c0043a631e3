"""`knnlm neighbors`."""

from __future__ import annotations

import os

import click

from knnlm.api import KNNLM
from knnlm.corpus import read_stdin
from knnlm.datastore import datastore_path, refuse_own_file
from knnlm.arrays import refuse_existing
from knnlm.neighbors import check_top
from knnlm.report import write_neighbors_html
from knnlm.report.render import check_report_path

from .common import (datastore_option, device_option, json_option, model_option, print_json, refuse_stray,
                     trust_option, typed)
from .evaluate import retrieval_config, retrieval_options


def _one_line(text: str, width: int) -> str:
    """Text on one line (newlines shown as ⏎), cut from the left to its last `width` characters."""
    flat = text.replace("\n", "⏎").replace("\t", " ")
    return flat if len(flat) <= width else "…" + flat[-(width - 1):]


def format_neighbors(r: dict, width: int = 72) -> str:
    """The human view: the query, the LM's and p_kNN's guesses, then each neighbour in its context."""
    target = f"{r['target']['text']!r}" if r["target"] else "(end of text)"
    lines = [f"position {r['position']} of {r['tokens']} tokens: {_one_line(r['context'], width)}",
             f"next token in the text: {target}", "",
             "LM   " + "  ".join(f"{p['text']!r} {p['prob']:.3f}" for p in r["lm"]),
             "kNN  " + "  ".join(f"{p['text']!r} {p['prob']:.3f}" for p in r["knn"]) + f"   (T {r['temperature']:g})",
             ""]
    root = os.path.abspath(r["corpus"]) if r.get("corpus") and r["corpus"] != "-" else ""
    for n in r["neighbors"]:
        mark = click.style(f"[{_one_line(n['next_text'], 20)}]", fg="green" if n["is_target"] else "yellow", bold=True)
        doc = n["document"]
        if root and os.path.abspath(doc).startswith(root + os.sep):
            doc = os.path.relpath(os.path.abspath(doc), root)
        lines.append(f"{n['rank']:>3}  d {n['distance']:<9.4g} {doc} @ token {n['offset']}"
                     + ("  ✓ target" if n["is_target"] else ""))
        lines.append(f"     {_one_line(n['context'], width)}{mark}")
    if not r["neighbors"]:
        lines.append("no neighbours found")
    elif len(r["neighbors"]) < r["top"]:
        lines.append(f"{len(r['neighbors'])} neighbours found, fewer than --top {r['top']}: the search reached no "
                     "more keys")
    return "\n".join(lines)


@click.command("neighbors")
@datastore_option
@click.argument("text")
@click.option("--position", default=-1, help="Token whose next token is predicted; negative counts from the end.")
@click.option("--top", default=10, help="Neighbours to show.")
@click.option("--temperature", "-t", type=float, default=None,
              help="T of p_kNN for its top predictions [default: the tuned T, else 1].")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the neighbour panel as a self-contained HTML page.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --html file.")
@retrieval_options
@model_option
@device_option
@trust_option
@json_option
def neighbors_cmd(datastore, text, position, top, temperature, html_file, overwrite, k, nprobe, rerank, rerank_depth,
                  exact, search_device, model, device, trust_remote_code, as_json):
    """Show what the datastore retrieves for one position of TEXT ('-' reads stdin)."""
    if html_file is not None:  # before the model loads; an empty path is refused, not taken for no --html
        check_report_path(html_file)
        refuse_own_file(html_file, datastore_path(datastore), "--html")
        refuse_existing(html_file, overwrite)
    refuse_stray(html_file is not None, "--html", "overwrite")
    check_top(top)
    if typed("k") and top > k:  # a typed --k is what is searched: --top shows no more than it finds
        if typed("top"):
            raise click.UsageError(f"--top {top} is more than --k {k}, the neighbours searched; pass --k {top} or "
                                   f"more, or --top {k} or less.")
        top = k
    if text == "-":
        text = read_stdin()
    knn = KNNLM.open(datastore, model, device, retrieval_config(k, nprobe, rerank, rerank_depth, exact, search_device),
                     trust_remote_code)
    r = knn.neighbors(text, position, top, temperature)
    if html_file is not None:
        write_neighbors_html(html_file, r, overwrite)
    if as_json:
        print_json(r)
    else:
        click.echo(format_neighbors(r))


COMMANDS = [neighbors_cmd]
