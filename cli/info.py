"""`knnlm info`."""

from __future__ import annotations

import click

from knnlm.datastore import DATASTORE_ENV, DEFAULT_DATASTORE, open_datastore
from knnlm.index import read_index_info
from knnlm.combine import load_lambda
from knnlm.update import describe_updates

from .common import json_option, print_json, print_table


def _mib(path) -> str:
    """File size in MiB, or '-' if absent."""
    return f"{path.stat().st_size / 2**20:.1f} MiB" if path.exists() else "-"


def _documents(ds) -> list[dict]:
    """The document table: name, first key row, key count, and whether it was removed (its rows await compact)."""
    live = {(d[0], d[1]) for d in ds.live_documents}
    return [{"name": name, "first_row": start, "keys": count, "removed": (name, start) not in live}
            for name, start, count, _first in ds.documents]


@click.command("info")
@click.argument("datastore", type=click.Path(file_okay=False), default=DEFAULT_DATASTORE, envvar=DATASTORE_ENV)
@click.option("--documents", "list_documents", is_flag=True,
              help="List the stored documents (the names `knnlm remove` takes) and their keys instead.")
@json_option
def info_cmd(datastore, list_documents, as_json):
    """Describe DATASTORE: model, size, corpus, index, tuned λ."""
    ds = open_datastore(datastore)
    if list_documents:
        docs = _documents(ds)
        if as_json:
            print_json({"path": str(ds.path), "documents": docs})
            return
        for d in docs:
            removed = "\tremoved, awaiting `knnlm compact`" if d["removed"] else ""
            click.echo(f"{d['name']}\t{d['keys']} keys{removed}")
        return
    index, lam = read_index_info(ds), load_lambda(ds.path)
    m = {k: v for k, v in ds.meta.items() if k != "documents"}
    live = len(ds.live_documents)
    if as_json:
        print_json({"path": str(ds.path), "meta": m, "documents": live, "documents_removed": len(ds.removed),
                    "index": index, "lambda": lam, "updates": describe_updates(ds.meta)})
        return
    c, b = m["corpus"], m["build"]
    rows = [
        ("datastore", ds.path),
        ("model", f"{m['model']['name']} (fingerprint {m['model']['fingerprint']})"),
        ("tokenizer", m["tokenizer"]["fingerprint"]),
        ("keys", f"{ds.count} × {ds.dim} float16, {_mib(ds.path / 'keys.npy')}"),
        ("values", f"{ds.count} int32, {_mib(ds.path / 'vals.npy')}"),
        ("key source", m["key_source"]),
        ("windows", f"context {m['context']}, stride {m['stride']}"),
        ("corpus", f"{c['source']} ({len(c['files'])} files at the build; {live} documents stored"
                   + (f", {len(ds.removed)} more removed" if ds.removed else "") + "; `--documents` lists them)"),
        ("held out", f"{m['holdout']['dev_documents']} dev, {m['holdout']['test_documents']} test documents "
                     f"(share {m['holdout']['share']} each)"),
        ("built", f"{b['finished']} in {b['seconds']} s, {b['tokens_per_s']} tokens/s on {b['device']}"
                  + (f", in {b['shards']} shards" if b.get("shards", 1) > 1 else "")),
    ]
    if ds.meta.get("updates"):
        u = describe_updates(ds.meta)
        rows.append(("updates", f"revision {u['revision']}: added {u['add']['documents']} documents "
                                f"({u['add']['keys']} keys), removed {u['remove']['documents']} "
                                f"({u['remove']['keys']} keys); {u['awaiting_compact']['keys']} removed keys "
                                f"await `knnlm compact`"))
    if index:
        codes = f"{index['code_size']} 4-bit fast-scan codes" if index["factory"].endswith("x4fs") \
            else f"{index['code_size']} bytes/key"
        detail = (f"ivfpq ({index['factory']}): nlist {index['nlist']}, PQ {codes}, "
                  f"trained on {index['train_size']} keys ({index['reason']})"
                  if index["kind"] == "ivfpq" else f"{index['factory']} (--factory): nlist {index['nlist']}, "
                  f"{index['code_size']} bytes/key, trained on {index['train_size']} keys"
                  if index["kind"] == "factory" else f"exact (Flat): {index['reason']}")
        if index.get("lists") == "on-disk":
            detail += f"; inverted lists on disk ({index['ivfdata']}, {_mib(ds.path / index['ivfdata'])}, memory-mapped)"
        elif index["kind"] == "ivfpq":
            detail += "; inverted lists in RAM"
        rows.append(("index", f"{detail}; {_mib(ds.path / 'index.faiss')}, built in {index['total_seconds']} s"))
    else:
        rows.append(("index", "none (run `knnlm train-index`)"))
    if lam:
        ada = " and an adaptive schedule" if lam.get("adaptive") else ""
        rows.append(("tuned", f"λ {lam['lambda']:.3f}, T {lam['temperature']:.3g}{ada} ({lam.get('created', '')})"))
    print_table(rows)


COMMANDS = [info_cmd]
