"""`knnlm build-datastore` and `knnlm train-index`."""

from __future__ import annotations

import click

from knnlm import journal
from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import DATASTORE_ENV, DEFAULT_DATASTORE, open_datastore
from knnlm.index import IndexConfig, check_retrain, train_index
from knnlm.lm import DEFAULT_MODEL
from knnlm.scale import Engine, ShardConfig, build_sharded

from .common import device_option, progress_bar, refuse_stray, trust_option, typed
from .evaluate import corpus_format_options


def index_options(f):
    """--nlist, --code-size, --fast-scan, --train-size, --exact, --seed, --on-disk, --factory."""
    f = click.option("--factory", default=None,
                     help="Any faiss index factory string, e.g. IVF1024,PQ64x4fs (L2; re-ranking stays on the "
                          "fp16 keys) [default: IVF{nlist},PQ{code-size} chosen from N].")(f)
    f = click.option("--fast-scan", is_flag=True,
                     help="4-bit fast-scan PQ codes in the default index (IVF{nlist},PQ{code-size}x4fs): faster "
                          "searches, coarser candidates (keep re-ranking and k 1000); in RAM only.")(f)
    f = click.option("--on-disk", is_flag=True,
                     help="Keep the IVF inverted lists in a file, memory-mapped at search time.")(f)
    f = click.option("--seed", default=0, help="Seed of the training sample and k-means.")(f)
    f = click.option("--exact", is_flag=True, help="Exact (flat) index instead of IVF-PQ.")(f)
    f = click.option("--train-size", type=int, default=None,
                     help="Keys sampled to train, at least 256 and nlist [default: 64·nlist, at least 256].")(f)
    f = click.option("--code-size", default=64,
                     help="PQ bytes per key, half that with --fast-scan (lowered to divide the key width).")(f)
    f = click.option("--nlist", type=int, default=None, help="IVF lists [default: power of two near 2·sqrt(N)].")(f)
    return f


strict_option = click.option("--strict", is_flag=True,
                             help="Fail on the first unreadable file of a folder instead of skipping it.")


@click.command("build-datastore")
@click.argument("corpus", type=click.Path(allow_dash=True))
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hub id, local directory or .gguf file.")
@click.option("--out", "-o", envvar=DATASTORE_ENV, default=DEFAULT_DATASTORE, show_envvar=True,
              type=click.Path(file_okay=False), help="Datastore directory to create.")
@click.option("--context", default=512, help="Tokens per window (left context of a key, itself included).")
@click.option("--stride", default=256, help="Tokens a window advances.")
@click.option("--batch-size", "-b", default=8, help="Windows per forward pass.")
@click.option("--holdout", default=0.05, help="Share of the corpus held out for each of dev and test.")
@corpus_format_options
@strict_option
@click.option("--shuffle-seed", type=int, default=None, help="Shuffle document order with this seed.")
@click.option("--max-tokens", type=int, default=None, help="At most this many keys (the document that reaches it is cut).")
@click.option("--index/--no-index", "build_index", default=True, help="Train the index at the end.")
@index_options
@click.option("--overwrite", is_flag=True, help="Replace an existing datastore once the new one is whole.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build.")
@click.option("--shards", default=1, help="Split the build into this many shards, merged at the end.")
@click.option("--engine", type=click.Choice([e.value for e in Engine]), default=Engine.LOCAL.value,
              help="Run shards in this process, or one Ray task each (pip install 'knnlm[ray]').")
@click.option("--ray-address", default=None, help="Ray cluster to join [default: start a local Ray].")
@device_option
@trust_option
def build_datastore_cmd(corpus, model, out, context, stride, batch_size, holdout, glob, fmt, text_field, strict,
                        shuffle_seed, max_tokens, build_index, nlist, code_size, fast_scan, train_size, exact, seed,
                        on_disk, factory, overwrite, resume, shards, engine, ray_address, device, trust_remote_code):
    """Run the LM over CORPUS (text file, folder, JSONL, or - for stdin) and store keys and values."""
    refuse_typed_shape(factory, exact)
    cfg = BuildConfig(
        model=model, device=device, trust_remote_code=trust_remote_code, context=context, stride=stride,
        batch_size=batch_size, holdout=holdout, glob=glob, fmt=fmt, text_field=text_field, strict=strict,
        shuffle_seed=shuffle_seed, max_tokens=max_tokens, build_index=build_index,
        index=IndexConfig(nlist=nlist, code_size=code_size, train_size=train_size, exact=exact, seed=seed,
                          on_disk=on_disk, factory=factory, fast_scan=fast_scan),
        overwrite=overwrite, resume=resume)
    refuse_stray(engine == Engine.RAY.value, "--engine ray", "ray_address")
    shard_cfg = ShardConfig(shards=shards, engine=engine, ray_address=ray_address)
    with progress_bar(max_tokens, "building") as bar:
        try:
            if shard_cfg.shards > 1 or shard_cfg.engine is not Engine.LOCAL:
                ds = build_sharded(corpus, out, cfg, shard_cfg, progress=bar.update,
                                   total=lambda n: setattr(bar, "total", n))
            else:
                ds = build_datastore(corpus, out, cfg, progress=bar.update)
        except KeyboardInterrupt:
            bar.close()
            click.echo("Interrupted; continue with the same command and --resume.", err=True)
            raise SystemExit(130)
    b = ds.meta["build"]
    click.echo(f"{ds.path}: {ds.count} keys of width {ds.dim} from {len(ds.documents)} documents "
               f"in {b['seconds']:.0f} s ({b['tokens_per_s']} tokens/s); "
               f"held out {ds.meta['holdout']['dev_documents']} dev and "
               f"{ds.meta['holdout']['test_documents']} test documents." + unreadable_note(ds.meta))
    held = ds.meta["holdout"]["dev_documents"] + ds.meta["holdout"]["test_documents"]
    # The split's first dev and test documents come first, whatever --holdout (one document's tails are not that)
    if held and held >= len(ds.documents) and set(ds.heldout_names()) - {d[0] for d in ds.documents}:
        click.echo(f"Note: {held} documents are held out and {len(ds.documents)} stored: the split holds out the "
                   "first document for dev and the second for test, then one in round(1/--holdout) each; pass "
                   "--holdout 0 to store them all (eval then needs --corpus).", err=True)


def unreadable_note(meta: dict) -> str:
    """' Skipped N unreadable files: ...' from meta.json, or ''."""
    bad = meta.get("corpus", {}).get("unreadable", {})
    if not bad or not bad.get("count"):
        return ""
    names = ", ".join(bad["names"][:3]) + (", ..." if bad["count"] > 3 else "")
    return f" Skipped {bad['count']} unreadable files or documents ({names}; all in meta.json)."


def refuse_typed_shape(factory: str | None, exact: bool) -> None:
    """A typed --code-size equal to its default does nothing beside --factory either; IndexConfig, which sees only
    values, refuses the others."""
    if factory is not None and not exact and "--code-size" in typed("code_size"):
        raise click.UsageError(f"--nlist and --code-size shape the default index; the --factory string {factory!r} "
                               "names its own lists and codes, so they would do nothing; leave them out.")


@click.command("train-index")
@click.argument("datastore", type=click.Path(file_okay=False), default=DEFAULT_DATASTORE, envvar=DATASTORE_ENV)
@index_options
def train_index_cmd(datastore, nlist, code_size, fast_scan, train_size, exact, seed, on_disk, factory):
    """(Re)build the FAISS index of DATASTORE."""
    refuse_typed_shape(factory, exact)
    ds = open_datastore(datastore)
    cfg = IndexConfig(nlist=nlist, code_size=code_size, train_size=train_size, exact=exact, seed=seed,
                      on_disk=on_disk, factory=factory, fast_scan=fast_scan)
    check_retrain(ds, cfg)  # before the progress bar: a refusal is all the output
    with journal.hold(ds.path), progress_bar(ds.count, "adding keys", unit="key") as bar:  # another change's lock too
        info = train_index(ds, cfg, progress=bar.update)
    click.echo(f"{ds.path}/index.faiss: {info['factory']} over {info['count']} keys in {info['total_seconds']} s.")


COMMANDS = [build_datastore_cmd, train_index_cmd]
