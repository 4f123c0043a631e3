"""Scoring text with the LM and the datastore, and the perplexity report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .combine import Combiner, resolve_combiner
from .combine.features import lm_stats
from .arrays import refuse_existing
from .corpus import DEFAULT_GLOB, iter_documents, open_corpus
from .datastore import Datastore, folder_of, open_datastore, refuse_own_file
from .errors import KNNLMError, settle
from .interpolate import knn_log_prob, perplexity
from .lm import DEFAULT_MODEL, LM, datastore_lm, load_lm
from .memory.attention import AttentionMemoryConfig
from .memory.document import MemoryConfig, memory_report
from .memory.reading import forward_in_order
from .retomaton import EVAL_CHAIN, chain_neighbors, open_automaton, split_chains
from .retrieval import RetrievalConfig, Retriever
from .scores import Scores, as_saved, concat_scores, load_scores, save_scores
from .windows import check_window, forward_owned, plan_windows

DEV_SCORES = "dev-scores.h5"  # the dev part's scores, cached in the datastore by dev_scores (tune-lambda)

log = logging.getLogger(__name__)


LOGP_ROWS = 32  # rows of logits per log_softmax on a CPU: 32 × V 49,152 floats (6 MiB) stay in the caches
NO_DATASTORE_WINDOW = (512, 256)  # (context, stride) of --no-datastore without --context: build's defaults


@dataclass(frozen=True)
class EvalConfig:
    """Settings of `eval` (and of the scoring that `tune-lambda` runs)."""

    lam: str = "0.25"  # λ: a number in [0, 1], "tuned", "adaptive", "gate" or "gate-pre" (from lambda.json)
    temperature: float | None = None  # T of softmax(-d/T); None: the tuned T, else 1
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # k, nprobe, rerank, exact
    context: int | None = None  # tokens per window; None: the datastore's (keys then match exactly)
    stride: int | None = None  # tokens a window advances; None: the datastore's
    batch_size: int = 4  # windows per forward pass (logits are B·T·V floats)
    model: str | None = None  # None: the model the datastore was built with
    device: str | None = None  # torch device; None: cuda when available, else cpu
    trust_remote_code: bool = False  # run the model repository's own code
    glob: str = DEFAULT_GLOB  # files of a folder given as --corpus
    fmt: str = "auto"  # --corpus format: "auto" (JSONL by suffix), "text" or "jsonl"
    text_field: str = "text"  # the JSONL field holding a document's text
    save_scores: str | None = None  # write per-token scores to this HDF5 file
    combine: str = "mix"  # "mix": λ-interpolation; "spalm": SPALM's gated memory (tuned by tune-lambda)
    skip_below: str | None = None  # skip the search where the pre-retrieval gate's λ is below this, or "tuned"
    # keep each token's query and the LM's entropy and top probabilities (what the learned gates are
    # fitted on); also on when saving scores or when the chosen policy reads them. The statistics cost
    # ~10% of eval time, the queries n·d floats of memory.
    keep_features: bool = False
    attention: AttentionMemoryConfig | None = None  # kNN-augmented attention (--attention-memory); None: off
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # the document memory (--memory and --memory-*)
    use_datastore: bool = True  # False (--no-datastore): the LM alone, with the document memory if asked
    overwrite: bool = False  # replace an existing save_scores file (or report_eval's page); False: refuse it

    def __post_init__(self):
        settle(self, "retrieval", RetrievalConfig, "retrieval", "RetrievalConfig(k=1000)")
        settle(self, "memory", MemoryConfig, "memory", "MemoryConfig('document')")
        settle(self, "attention", AttentionMemoryConfig, "attention_memory", "AttentionMemoryConfig()", optional=True)
        for name in ("context", "stride"):
            settle(self, name, int, name, "512", optional=True)
        settle(self, "batch_size", int, "batch_size", "4")
        if self.batch_size < 1:
            raise KNNLMError(f"--batch-size {self.batch_size} must be at least 1.")
        if self.save_scores:
            parent = os.path.dirname(os.path.abspath(self.save_scores))
            if not os.path.isdir(parent):
                raise KNNLMError(f"--save-scores {self.save_scores}: the folder {parent} does not exist; "
                                 "create it or pass another path.")


@dataclass
class Timer:
    """Seconds spent in the LM forward and in retrieval, and searches RetoMaton's pointers saved."""

    lm: float = 0.0
    retrieval: float = 0.0
    searches_saved: int = 0  # tokens whose neighbours came from the pointers instead of a search


def score_documents(lm: LM, retriever: Retriever | None, docs: list[tuple[str, str]], context: int,
                    stride: int, batch_size: int = 4, progress=None, timer: Timer | None = None,
                    combiner: Combiner | None = None, keep_features: bool = False, keep_queries: bool = False,
                    attention: AttentionMemoryConfig | None = None) -> Scores:
    """Per-token LM log-probs and neighbours for every token after each document's first.

    Args:
        lm: the model.
        retriever: the datastore search; None scores the LM alone (no neighbours).
        docs: (name, text) pairs.
        context: tokens per window; every token gets up to this much left context.
        stride: tokens a window advances (each token is scored exactly once).
        batch_size: windows per forward pass.
        progress: optional callable taking the number of tokens just scored.
        timer: accumulates seconds spent in the LM and in retrieval, and searches RetoMaton saved
            (retriever.cfg.retomaton: its pointer chains restart at each window's first position and
            every EVAL_CHAIN positions).
        combiner: the mixing policy; its learned skip decides which tokens are searched.
        keep_features: also keep the queries and the LM statistics the learned gates read (each
            forced on when the combiner reads it).
        keep_queries: also keep the queries (the document memory searches them).
        attention: kNN-augmented attention over what left the window (each document's windows
            are then read one at a time, in order); None: off.

    Returns:
        Scores in document order (with the queries and the LM statistics, if kept).
    """
    timer = timer or Timer()
    work, targets = [], []  # (window, token ids of the window), the window's targets
    for d, (_name, text) in enumerate(docs):
        ids = lm.encode(text)
        for w in plan_windows(d, len(ids), context, stride):
            work.append((w, ids[w.begin: w.end]))
            # A window's last position predicts the token just past it, so targets come from the document.
            targets.append(ids[w.own_from + 1: w.own_to + 1])
    parts: list = [None] * len(work)
    keep_lm_stats = keep_features or (combiner is not None and combiner.reads_lm_stats)
    keep_queries = keep_queries or keep_features or (combiner is not None and combiner.reads_queries)
    batches = forward_owned(lm, work, batch_size, logits=True) if attention is None else \
        forward_in_order(lm, work, attention, context)
    while True:
        t0 = time.perf_counter()
        owned = next(batches, None)
        if owned is None:
            break
        lm_logp, stats = [], []
        for o in owned:
            tgt = torch.as_tensor(targets[o.item])
            # log_softmax over owned rows only, and on a CPU a few rows at a time: the full (B, T, V)
            # would double the logits' memory, and rows that stay in cache take a third of the time.
            step = LOGP_ROWS if o.logits.device.type == "cpu" else max(1, len(tgt))
            for lo in range(0, len(tgt), step):
                logp = torch.log_softmax(o.logits[lo:lo + step], dim=-1)  # (rows, V)
                lm_logp.append(logp.gather(1, tgt[lo:lo + step, None].to(logp.device))[:, 0])
                if keep_lm_stats:
                    stats.append(lm_stats(logp, owned=True))
        q = torch.cat([o.keys for o in owned]).cpu().numpy()  # (n, d)
        lp = torch.cat(lm_logp).double().cpu().numpy()
        st = {key: np.concatenate([x[key] for x in stats]) for key in stats[0]} if stats else {}
        tg = np.concatenate([np.asarray(targets[o.item], np.int32) for o in owned])
        timer.lm += time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = combiner.search_mask(q, st) if (combiner is not None and retriever is not None) else None
        if retriever is not None and retriever.follows_pointers:
            # Each window's owned positions are pointer chains of at most EVAL_CHAIN positions, all
            # of the batch's stepping together.
            starts = split_chains([len(targets[o.item]) for o in owned], EVAL_CHAIN)
            dists, _ids, vals, saved = chain_neighbors(retriever, open_automaton(retriever), q, tg, starts, keep)
            timer.searches_saved += int(saved.sum())
        elif retriever is not None:
            dists, _ids, vals = retriever.neighbors(q, keep)
        else:
            dists, vals = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int32)
        searched = np.ones(len(q), bool) if keep is None else keep
        timer.retrieval += time.perf_counter() - t0
        at = 0
        for o in owned:
            w, n = o.window, len(targets[o.item])
            sl = slice(at, at + n)
            pos = np.arange(w.own_from + 1, w.own_to + 1, dtype=np.int32)
            parts[o.item] = Scores(tg[sl], lp[sl], dists[sl], vals[sl], np.full(n, w.doc, np.int32), pos,
                                   queries=q[sl] if keep_queries else None, searched=searched[sl],
                                   **{key: v[sl] for key, v in st.items()})
            at += n
        if progress:
            progress(at)
    return concat_scores([p for p in parts if p is not None], {})


def report(scores: Scores, combiner: Combiner, head=None) -> dict:
    """Perplexities of the LM, the kNN-LM (as the combiner mixes them) and the kNN alone over the same tokens."""
    knn = knn_log_prob(scores.dists, scores.vals, scores.targets, combiner.temperature)
    lambdas = combiner.lambdas(scores)  # once: a gate's features sort every token's neighbours
    mixed = combiner.target_log_probs(scores, head, lambdas, knn)
    lm_ppl, knn_lm_ppl = perplexity(scores.lm_logp), perplexity(mixed)
    searched = scores.searched if scores.searched is not None else np.ones(len(scores), bool)
    return {
        "tokens": len(scores),
        "lm_ppl": lm_ppl,
        "knn_lm_ppl": knn_lm_ppl,
        # over the searched tokens only: a skipped search is no miss of the kNN
        "knn_only_ppl": perplexity(knn[searched]),
        "change": knn_lm_ppl / lm_ppl - 1.0,
        "target_in_neighbors": float(np.isfinite(knn[searched]).mean()) if searched.any() else float("nan"),
        "searches_skipped": float(1 - searched.mean()) if len(scores) else 0.0,
        "mean_lambda": float(np.mean(lambdas)) if len(scores) else float("nan"),
    }


def resolve_docs(ds: Datastore, corpus: str | None, split: str, cfg: "EvalConfig") -> tuple[list, str]:
    """The documents to score: --corpus, else the datastore's held-out part; and a description."""
    if corpus is None:
        docs = ds.heldout(split)
        if not docs:
            raise KNNLMError(f"Datastore {ds.path} has no held-out {split} text (built with --holdout 0?); "
                             "pass text with --corpus.")
        return docs, f"{split} part of {ds.path}"
    return corpus_docs(corpus, cfg), str(corpus)


def corpus_docs(corpus: str, cfg: "EvalConfig") -> list[tuple[str, str]]:
    """(name, text) of every readable document of --corpus, all scored (none held out)."""
    src = open_corpus(corpus, glob=cfg.glob, fmt=cfg.fmt, text_field=cfg.text_field)
    return [(name, text) for _, _, name, text in iter_documents(src, 0.0)]


def index_identity(ds: Datastore) -> str:
    """What index a search used: a hash of its index.json (factory, parameters, sample, and a stamp
    that every training writes anew)."""
    info = ds.path / "index.json"
    return hashlib.sha256(info.read_bytes()).hexdigest()[:16] if info.is_file() else "none"


def search_settings(ds: Datastore, retriever: Retriever) -> dict:
    """The search's description (kind, k, nprobe, re-rank) with the index's identity."""
    exact = retriever.cfg.exact or retriever.cfg.search_device is not None
    return {**retriever.describe, "index": "exact" if retriever.kind == "exact" and exact else index_identity(ds)}


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
        (report dict, per-token Scores). The report's `tuned_settings_differ` is a sentence when
        tuned values are used with other search settings than they were fitted with, else None.
    """
    return score_run(open_eval(datastore, corpus, cfg, lm, split, documents, retriever), cfg, progress)


@dataclass
class EvalRun:
    """What an evaluation scores and with what, opened once (run_eval and the HTML report share it)."""

    ds: Datastore | None  # None: --no-datastore
    lm: LM
    retriever: Retriever | None  # None: no search at all
    combiner: Combiner
    docs: list[tuple[str, str]]  # (name, text) pairs
    what: str  # the text, in words
    context: int
    stride: int
    search: dict  # search_settings


def open_eval(datastore=None, corpus: str | None = None, cfg: EvalConfig = EvalConfig(), lm: LM | None = None,
              split: str = "test", documents: list[tuple[str, str]] | None = None,
              retriever: Retriever | None = None) -> EvalRun:
    """Open the datastore, model, search, mixing policy and documents of an evaluation (arguments as run_eval)."""
    if corpus is not None and documents is not None:
        raise KNNLMError("run_eval scores a corpus or the given documents, not both; pass one of them.")
    if cfg.save_scores and cfg.use_datastore:
        folder = folder_of(datastore)
        if not (split == "dev" and Path(cfg.save_scores) == folder / DEV_SCORES):  # dev_scores' own cache may
            refuse_own_file(cfg.save_scores, folder, "--save-scores")
    if cfg.save_scores:  # here, before any work, each time a config runs (it may have written the file before)
        refuse_existing(cfg.save_scores, cfg.overwrite)
    cfg.memory.check_use(cfg.use_datastore)
    if not cfg.use_datastore:
        return open_without_datastore(corpus, cfg, lm, documents)
    ds = datastore if isinstance(datastore, Datastore) else open_datastore(datastore)
    if cfg.save_scores and os.path.exists(cfg.save_scores) and os.path.isdir(cfg.save_scores):
        raise KNNLMError(f"--save-scores {cfg.save_scores} is a folder; pass a file path.")
    retriever = retriever or Retriever(ds, cfg.retrieval)
    search = search_settings(ds, retriever)
    combiner = resolve_combiner(cfg.lam, ds.path, cfg.combine, cfg.skip_below, cfg.temperature, search)
    lm = datastore_lm(ds, cfg.model, cfg.device, cfg.trust_remote_code, lm)
    if combiner.kind == "spalm":
        lm.output_head.check()  # a model SPALM cannot project for is refused before the scoring, not after
    context, stride = datastore_window(cfg, ds)
    check_window(context, stride, lm.max_positions)
    if documents is not None:
        docs, what = given_documents(documents)
    else:
        docs, what = resolve_docs(ds, corpus, split, cfg)
    return EvalRun(ds, lm, retriever, combiner, docs, what, context, stride, search)


def given_documents(documents) -> tuple[list, str]:
    """run_eval's `documents` and how they read in the report; one sentence for none at all."""
    docs = list(documents)
    if not docs:
        raise KNNLMError("No documents were given to score; pass at least one text.")
    return docs, f"{len(docs)} given text{'s' if len(docs) != 1 else ''}"


def datastore_window(cfg: EvalConfig, ds: Datastore) -> tuple[int, int]:
    """(context, stride) of an evaluation: the given ones, else the datastore's (a given 0 is refused later, not
    taken for "unset")."""
    return (ds.meta["context"] if cfg.context is None else cfg.context,
            ds.meta["stride"] if cfg.stride is None else cfg.stride)


def open_without_datastore(corpus: str | None, cfg: EvalConfig, lm: LM | None = None,
                           documents: list[tuple[str, str]] | None = None) -> EvalRun:
    """An evaluation of the LM alone (--no-datastore): λ = 0, no search; the document memory may be added."""
    from .combine import FixedLambda

    if documents is None and corpus is None:
        raise KNNLMError("--no-datastore has no held-out text to score; pass the text with --corpus.")
    lm = lm or load_lm(cfg.model or DEFAULT_MODEL, cfg.device, cfg.trust_remote_code)
    # No datastore to take windows from: build's default windows, or half of a given --context.
    context = NO_DATASTORE_WINDOW[0] if cfg.context is None else cfg.context
    if cfg.stride is not None:
        stride = cfg.stride
    else:
        stride = NO_DATASTORE_WINDOW[1] if cfg.context is None else max(1, context // 2)
    check_window(context, stride, lm.max_positions)
    if documents is not None:
        docs, what = given_documents(documents)
    else:
        docs, what = corpus_docs(corpus, cfg), str(corpus)
    search = {"search": "none", "k": 0, "nprobe": 0, "rerank": False, "index": "none"}
    return EvalRun(None, lm, NoSearch(), FixedLambda(0.0, 1.0, "no datastore"), docs, what, context, stride, search)


class NoSearch:
    """The search of --no-datastore: every query gets one missing neighbour (the report's rule for a miss)."""

    cfg = RetrievalConfig()  # what scoring reads of a search's settings: no RetoMaton here
    follows_pointers = False

    def neighbors(self, queries: np.ndarray, keep=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(queries)
        return np.full((n, 1), np.inf, np.float32), np.full((n, 1), -1, np.int64), np.full((n, 1), -1, np.int32)


def score_run(run: EvalRun, cfg: EvalConfig, progress=None) -> tuple[dict, Scores]:
    """Score an opened evaluation and report it (run_eval's second half)."""
    timer = Timer()
    t0 = time.perf_counter()
    scores = score_documents(run.lm, run.retriever, run.docs, run.context, run.stride, cfg.batch_size, progress,
                             timer, run.combiner, keep_features=cfg.keep_features or bool(cfg.save_scores),
                             keep_queries=cfg.memory.on, attention=cfg.attention)
    seconds = time.perf_counter() - t0
    if len(scores) == 0:
        raise KNNLMError(f"{run.what} has no tokens to score (each document needs two or more); pass more text.")
    scores.attrs.update(datastore=run.ds.fingerprint if run.ds else "none",
                        datastore_path=str(run.ds.path) if run.ds else "none", model=run.lm.name,
                        model_fingerprint=run.lm.fingerprint, context=run.context, stride=run.stride,
                        corpus=run.what, **run.search)
    if cfg.attention is not None:
        scores.attrs["attention_memory"] = json.dumps(cfg.attention.describe)
    t0 = time.perf_counter()
    out = report(scores, run.combiner, run.lm.output_head)
    mixing = time.perf_counter() - t0  # SPALM projects every token again: that is part of its cost
    if cfg.memory.on:  # its own search and mixing: its search_seconds says how much searched
        out["memory"] = memory_report(scores, run.combiner, cfg.memory, run.ds.path if run.ds else None,
                                      run.lm.output_head, out["knn_lm_ppl"])
    seconds += time.perf_counter() - t0
    out.update(corpus=run.what, documents=len(run.docs), lam=cfg.lam, lambda_kind=run.combiner.kind,
               lambda_source=run.combiner.source, combine=cfg.combine, skip_below=cfg.skip_below,
               temperature=run.combiner.temperature, **run.search,
               seconds=seconds, tokens_per_s=len(scores) / seconds, lm_seconds=timer.lm,
               retrieval_seconds=timer.retrieval, mixing_seconds=mixing, tuned_settings_differ=run.combiner.mismatch,
               attention_memory=cfg.attention.describe if cfg.attention is not None else None,
               searches_saved=timer.searches_saved / len(scores))
    if cfg.save_scores:
        save_scores(cfg.save_scores, scores, overwrite=cfg.overwrite)
        out["scores_file"] = cfg.save_scores
    return out, scores


def dev_scores(ds: Datastore, cfg: EvalConfig, lm: LM | None = None, progress=None,
               retriever: Retriever | None = None) -> tuple[Scores, bool]:
    """Scores of the datastore's held-out dev part: from DATASTORE/dev-scores.h5 when it was made with
    the same datastore, index, windows and search settings (and this scores format), else computed
    and cached there.

    Returns:
        (scores, whether they came from the cache).
    """
    path = ds.path / DEV_SCORES
    retriever = retriever or Retriever(ds, cfg.retrieval)
    context, stride = datastore_window(cfg, ds)
    want = {"datastore": ds.fingerprint, **search_settings(ds, retriever), "context": context, "stride": stride}
    want["attention_memory"] = json.dumps(cfg.attention.describe) if cfg.attention is not None else "none"
    want.setdefault("retomaton", "off")  # scores made with RetoMaton's pointers are not a full search's
    if path.exists():
        try:
            scores = load_scores(str(path))
        except KNNLMError as e:  # an old or damaged cache is rebuilt, never misread
            log.info("rebuilding %s: %s", path, e)
        else:
            # caches from before attention memory and RetoMaton had neither
            got = {"attention_memory": "none", "retomaton": "off", **scores.attrs}
            if all(str(got.get(key)) == str(value) for key, value in want.items()):
                return scores, True
    cfg = EvalConfig(**{**cfg.__dict__, "lam": "0", "combine": "mix", "skip_below": None, "save_scores": str(path),
                        "overwrite": True})  # its own cache, stale or damaged
    _, scores = run_eval(ds, None, cfg, lm=lm, split="dev", progress=progress, retriever=retriever)
    return as_saved(scores), False  # as a later run reads them from the cache: the same tuning either way
