"""Scoring text with the LM and the datastore, and the perplexity report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .corpus import iter_documents, open_corpus
from .datastore import Datastore, open_datastore
from .errors import KNNLMError
from .interpolate import interpolate, knn_log_prob, perplexity
from .lm import LM, load_lm
from .retrieval import RetrievalConfig, Retriever
from .index import read_index_info
from .scores import Scores, concat_scores, load_scores, save_scores
from .windows import check_window, length_batches, pad_batch, plan_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `eval` (and of the scoring that `tune-lambda` runs)."""

    lam: str = "0.25"  # λ: a number in [0, 1], "tuned" or "adaptive" (from lambda.json)
    temperature: float | None = None  # T of softmax(-d/T); None: the tuned T, else 1
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # k, nprobe, rerank, exact
    context: int | None = None  # tokens per window; None: the datastore's (keys then match exactly)
    stride: int | None = None  # tokens a window advances; None: the datastore's
    batch_size: int = 4  # windows per forward pass (logits are B·T·V floats)
    model: str | None = None  # None: the model the datastore was built with
    device: str | None = None  # torch device; None: cuda when available, else cpu
    trust_remote_code: bool = False  # run the model repository's own code
    glob: str = "**/*.txt"  # files of a folder given as --corpus
    save_scores: str | None = None  # write per-token scores to this HDF5 file


@dataclass
class Timer:
    """Seconds spent in the LM forward and in retrieval."""

    lm: float = 0.0
    retrieval: float = 0.0


def score_documents(lm: LM, retriever: Retriever | None, docs: list[tuple[str, str]], context: int,
                    stride: int, batch_size: int = 4, progress=None, timer: Timer | None = None) -> Scores:
    """Per-token LM log-probs and neighbours for every token after each document's first.

    Args:
        lm: the model.
        retriever: the datastore search; None scores the LM alone (no neighbours).
        docs: (name, text) pairs.
        context: tokens per window; every token gets up to this much left context.
        stride: tokens a window advances (each token is scored exactly once).
        batch_size: windows per forward pass.
        progress: optional callable taking the number of tokens just scored.
        timer: accumulates seconds spent in the LM and in retrieval.

    Returns:
        Scores in document order.
    """
    timer = timer or Timer()
    work = []  # (doc number, window, token ids of the window)
    for d, (_name, text) in enumerate(docs):
        ids = lm.encode(text)
        # A window's last position predicts the token just past it, so targets come from the document.
        work.extend((w, ids[w.begin: w.end], ids[w.own_from + 1: w.own_to + 1])
                    for w in plan_windows(d, len(ids), context, stride))
    parts: list = [None] * len(work)
    for batch in length_batches([len(t) for _, t, _ in work], batch_size):
        t0 = time.perf_counter()
        ids, mask = pad_batch([work[i][1] for i in batch])
        keys, logits = lm.forward(ids, mask, logits=True)  # (B, T, d), (B, T, V)
        queries, lm_logp, targets, meta = [], [], [], []
        for j, i in enumerate(batch):
            w, _toks, labels = work[i]
            lo, hi = w.own_from - w.begin, w.own_to - w.begin
            tgt = torch.as_tensor(labels)
            # log_softmax over owned rows only: the full (B, T, V) would double the logits' memory.
            logp = torch.log_softmax(logits[j, lo:hi], dim=-1)  # (n, V)
            lm_logp.append(logp.gather(1, tgt[:, None].to(logp.device))[:, 0])
            queries.append(keys[j, lo:hi])
            targets.append(tgt)
            meta.append((i, w, hi - lo))
        q = torch.cat(queries).cpu().numpy()  # (n, d)
        lp = torch.cat(lm_logp).double().cpu().numpy()
        tg = torch.cat(targets).numpy().astype(np.int32)
        timer.lm += time.perf_counter() - t0
        t0 = time.perf_counter()
        if retriever is not None:
            dists, _ids, vals = retriever.neighbors(q)
        else:
            dists, vals = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int32)
        timer.retrieval += time.perf_counter() - t0
        at = 0
        for i, w, n in meta:
            sl = slice(at, at + n)
            pos = np.arange(w.own_from + 1, w.own_to + 1, dtype=np.int32)
            parts[i] = Scores(tg[sl], lp[sl], dists[sl], vals[sl], np.full(n, w.doc, np.int32), pos)
            at += n
        if progress:
            progress(at)
    return concat_scores([p for p in parts if p is not None], {})


def report(scores: Scores, lambdas: np.ndarray | float, temperature: float) -> dict:
    """Perplexities of the LM, the kNN-LM and the kNN alone over the same tokens."""
    knn = knn_log_prob(scores.dists, scores.vals, scores.targets, temperature)
    mixed = interpolate(scores.lm_logp, knn, lambdas)
    lm_ppl, knn_lm_ppl = perplexity(scores.lm_logp), perplexity(mixed)
    return {
        "tokens": len(scores),
        "lm_ppl": lm_ppl,
        "knn_lm_ppl": knn_lm_ppl,
        "knn_only_ppl": perplexity(knn),
        "change": knn_lm_ppl / lm_ppl - 1.0,
        "target_in_neighbors": float(np.isfinite(knn).mean()) if len(scores) else float("nan"),
    }


def resolve_docs(ds: Datastore, corpus: str | None, split: str, glob: str) -> tuple[list, str]:
    """The documents to score: --corpus, else the datastore's held-out part; and a description."""
    if corpus is None:
        docs = ds.heldout(split)
        if not docs:
            raise KNNLMError(f"Datastore {ds.path} has no held-out {split} text (built with --holdout 0?); "
                             "pass text with --corpus.")
        return docs, f"{split} part of {ds.path}"
    src = open_corpus(corpus, glob=glob)
    return [(name, text) for _, _, name, text in iter_documents(src, 0.0)], str(corpus)


def run_eval(datastore=None, corpus: str | None = None, cfg: EvalConfig = EvalConfig(), lm: LM | None = None,
             split: str = "test", progress=None, documents: list[tuple[str, str]] | None = None,
             retriever: Retriever | None = None) -> tuple[dict, Scores]:
    """Evaluate the kNN-LM on text: the library side of `knnlm eval`.

    Args:
        datastore: directory (None: $KNNLM_DATASTORE or datastores/default) or an opened Datastore.
        corpus: text to score (file, folder, JSONL); None scores the datastore's held-out `split`.
        cfg: evaluation settings.
        lm: an already loaded model (else the datastore's, or cfg.model).
        split: "test" or "dev", when corpus is None.
        progress: optional callable taking the number of tokens just scored.
        documents: (name, text) pairs to score instead of corpus.
        retriever: an already opened search over this datastore (else one is made from cfg.retrieval).

    Returns:
        (report dict, per-token Scores).
    """
    from .tune import pick_temperature, resolve_lambda

    ds = datastore if isinstance(datastore, Datastore) else open_datastore(datastore)
    choice = resolve_lambda(cfg.lam, ds.path)
    temperature = pick_temperature(cfg.temperature, ds.path, choice)
    lm = lm or load_lm(cfg.model or ds.meta["model"]["name"], cfg.device, cfg.trust_remote_code)
    ds.check_compatible(lm)
    context, stride = cfg.context or ds.meta["context"], cfg.stride or ds.meta["stride"]
    check_window(context, stride, lm.max_positions)
    if documents is not None:
        docs, what = list(documents), f"{len(documents)} given texts"
    else:
        docs, what = resolve_docs(ds, corpus, split, cfg.glob)
    retriever = retriever or Retriever(ds, cfg.retrieval)
    timer = Timer()
    t0 = time.perf_counter()
    scores = score_documents(lm, retriever, docs, context, stride, cfg.batch_size, progress, timer)
    seconds = time.perf_counter() - t0
    if len(scores) == 0:
        raise KNNLMError(f"{what} has no tokens to score (each document needs two or more); pass more text.")
    scores.attrs.update(datastore=ds.fingerprint, datastore_path=str(ds.path), model=lm.name,
                        model_fingerprint=lm.fingerprint, context=context, stride=stride,
                        corpus=what, **retriever.describe)
    lambdas = choice.lambdas_for(scores.nn_dist)
    out = report(scores, lambdas, temperature)
    out.update(corpus=what, documents=len(docs), lam=cfg.lam, lambda_kind=choice.kind, lambda_source=choice.source,
               mean_lambda=float(np.mean(lambdas)), temperature=temperature, **retriever.describe,
               seconds=seconds, tokens_per_s=len(scores) / seconds, lm_seconds=timer.lm,
               retrieval_seconds=timer.retrieval)
    if cfg.save_scores:
        save_scores(cfg.save_scores, scores)
        out["scores_file"] = cfg.save_scores
    return out, scores


def dev_scores(ds: Datastore, cfg: EvalConfig, lm: LM | None = None, progress=None,
               retriever: Retriever | None = None) -> tuple[Scores, bool]:
    """Scores of the datastore's held-out dev part: from DATASTORE/dev-scores.h5 when it was made with
    the same datastore, windows and search settings, else computed and cached there.

    Returns:
        (scores, whether they came from the cache).
    """
    path = ds.path / "dev-scores.h5"
    r = cfg.retrieval
    kind = "exact" if r.exact else (read_index_info(ds) or {}).get("kind")
    want = {"datastore": ds.fingerprint, "k": r.k, "nprobe": r.nprobe, "rerank": r.rerank, "search": kind,
            "context": cfg.context or ds.meta["context"], "stride": cfg.stride or ds.meta["stride"]}
    if path.exists():
        scores = load_scores(str(path))
        if all(scores.attrs.get(key) == value for key, value in want.items()):
            return scores, True
    cfg = EvalConfig(**{**cfg.__dict__, "lam": "0", "save_scores": str(path)})
    _, scores = run_eval(ds, None, cfg, lm=lm, split="dev", progress=progress, retriever=retriever)
    return scores, False
