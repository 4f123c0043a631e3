"""`knnlm build-datastore` and `knnlm train-index`."""

from __future__ import annotations

import click

from knnlm.build import BuildConfig, build_datastore
from knnlm.corpus import DEFAULT_GLOB
from knnlm.datastore import DATASTORE_ENV, DEFAULT_DATASTORE, open_datastore
from knnlm.index import IndexConfig, train_index
from knnlm.lm import DEFAULT_MODEL

from .common import device_option, progress_bar, trust_option


def index_options(f):
    """--nlist, --code-size, --train-size, --exact, --seed, --factory."""
    f = click.option("--factory", default=None,
                     help="Any faiss index factory string, e.g. IVF1024,PQ64x4fs (L2; re-ranking stays on the "
                          "fp16 keys) [default: IVF{nlist},PQ{code-size} chosen from N].")(f)
    f = click.option("--seed", default=0, help="Seed of the training sample and k-means.")(f)
    f = click.option("--exact", is_flag=True, help="Exact (flat) index instead of IVF-PQ.")(f)
    f = click.option("--train-size", type=int, default=None,
                     help="Keys sampled to train, at least 256 and nlist [default: 64·nlist, at least 256].")(f)
    f = click.option("--code-size", default=64, help="PQ bytes per key (lowered to divide the key width).")(f)
    f = click.option("--nlist", type=int, default=None, help="IVF lists [default: power of two near 2·sqrt(N)].")(f)
    return f


@click.command("build-datastore")
@click.argument("corpus", type=click.Path(allow_dash=True))
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hub id, local directory or .gguf file.")
@click.option("--out", "-o", envvar=DATASTORE_ENV, default=DEFAULT_DATASTORE, show_envvar=True,
              type=click.Path(file_okay=False), help="Datastore directory to create.")
@click.option("--context", default=512, help="Tokens per window (left context of a key, itself included).")
@click.option("--stride", default=256, help="Tokens a window advances.")
@click.option("--batch-size", "-b", default=8, help="Windows per forward pass.")
@click.option("--holdout", default=0.05, help="Share of the corpus held out for each of dev and test.")
@click.option("--glob", default=DEFAULT_GLOB, help="Files of a folder corpus.")
@click.option("--format", "fmt", type=click.Choice(["auto", "text", "jsonl"]), default="auto",
              help="Corpus format (auto: JSONL by .jsonl suffix).")
@click.option("--text-field", default="text", help="JSONL field with the text.")
@click.option("--shuffle-seed", type=int, default=None, help="Shuffle document order with this seed.")
@click.option("--max-tokens", type=int, default=None, help="At most this many keys (the document that reaches it is cut).")
@click.option("--index/--no-index", "build_index", default=True, help="Train the index at the end.")
@index_options
@click.option("--overwrite", is_flag=True, help="Replace an existing datastore once the new one is whole.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build.")
@device_option
@trust_option
def build_datastore_cmd(corpus, model, out, context, stride, batch_size, holdout, glob, fmt, text_field,
                        shuffle_seed, max_tokens, build_index, nlist, code_size, train_size, exact, seed, factory,
                        overwrite, resume, device, trust_remote_code):
    """Run the LM over CORPUS (text file, folder, JSONL, or - for stdin) and store keys and values."""
    cfg = BuildConfig(
        model=model, device=device, trust_remote_code=trust_remote_code, context=context, stride=stride,
        batch_size=batch_size, holdout=holdout, glob=glob, fmt=fmt, text_field=text_field,
        shuffle_seed=shuffle_seed, max_tokens=max_tokens, build_index=build_index,
        index=IndexConfig(nlist=nlist, code_size=code_size, train_size=train_size, exact=exact, seed=seed,
                          factory=factory),
        overwrite=overwrite, resume=resume)
    with progress_bar(max_tokens, "building") as bar:
        try:
            ds = build_datastore(corpus, out, cfg, progress=bar.update)
        except KeyboardInterrupt:
            bar.close()
            click.echo("Interrupted; continue with the same command and --resume.", err=True)
            raise SystemExit(130)
    b = ds.meta["build"]
    click.echo(f"{ds.path}: {ds.count} keys of width {ds.dim} from {len(ds.documents)} documents "
               f"in {b['seconds']:.0f} s ({b['tokens_per_s']} tokens/s); "
               f"held out {ds.meta['holdout']['dev_documents']} dev and "
               f"{ds.meta['holdout']['test_documents']} test documents.")


@click.command("train-index")
@click.argument("datastore", type=click.Path(file_okay=False), default=DEFAULT_DATASTORE, envvar=DATASTORE_ENV)
@index_options
def train_index_cmd(datastore, nlist, code_size, train_size, exact, seed, factory):
    """(Re)build the FAISS index of DATASTORE."""
    ds = open_datastore(datastore)
    cfg = IndexConfig(nlist=nlist, code_size=code_size, train_size=train_size, exact=exact, seed=seed, factory=factory)
    with progress_bar(ds.count, "adding keys", unit="key") as bar:
        info = train_index(ds, cfg, progress=bar.update)
    click.echo(f"{ds.path}/index.faiss: {info['factory']} over {info['count']} keys in {info['total_seconds']} s.")


COMMANDS = [build_datastore_cmd, train_index_cmd]
