"""`knnlm add`, `knnlm remove` and `knnlm compact`: a datastore that follows its corpus."""

from __future__ import annotations

import click

from knnlm.datastore import open_datastore
from knnlm.update import AddConfig, add_documents, compact, remove_documents

from .build import strict_option, unreadable_note
from .common import device_option, progress_bar, trust_option
from .evaluate import corpus_format_options

_DATASTORE = click.argument("datastore", type=click.Path(file_okay=False, exists=True))


@click.command("add")
@_DATASTORE
@click.argument("corpus", type=click.Path(allow_dash=True))
@click.option("--model", "-m", default=None, help="The datastore's model [default: the one it was built with].")
@click.option("--batch-size", "-b", default=8, help="Windows per forward pass.")
@corpus_format_options
@strict_option
@device_option
@trust_option
def add_cmd(datastore, corpus, model, batch_size, glob, fmt, text_field, strict, device, trust_remote_code):
    """Append CORPUS's documents to DATASTORE (keys, values, index; no retraining)."""
    cfg = AddConfig(model=model, device=device, trust_remote_code=trust_remote_code, batch_size=batch_size,
                    glob=glob, fmt=fmt, text_field=text_field, strict=strict)
    with progress_bar(None, "adding", lazy=True) as bar:  # not before add's checks pass
        r = add_documents(datastore, corpus, cfg, progress=bar.update)
    ds = open_datastore(datastore)
    click.echo(f"{ds.path}: added {r['documents']} documents, {r['keys']} keys; {ds.live_count} keys searchable."
               + unreadable_note({"corpus": {"unreadable": r["unreadable"]}}))


@click.command("remove")
@_DATASTORE
@click.argument("docs", nargs=-1, required=True)
def remove_cmd(datastore, docs):
    """Remove documents DOCS (names as stored, or any spelling of their paths; a JSONL or table file: all its
    documents) from DATASTORE's searches; `compact` drops their rows."""
    r = remove_documents(datastore, list(docs))
    click.echo(f"{datastore}: removed {r['documents']} documents, {r['keys']} keys (run `knnlm compact "
               f"{datastore}` to free their space).")


@click.command("compact")
@_DATASTORE
def compact_cmd(datastore):
    """Rewrite DATASTORE's arrays and index without the rows of removed documents."""
    r = compact(datastore)
    click.echo(f"{datastore}: dropped {r['keys']} keys of {r['documents']} removed documents; {r['count']} remain.")


COMMANDS = [add_cmd, remove_cmd, compact_cmd]
