"""The interactive HTML report: every scored token coloured by what the memory gained, with its neighbours.

    from knnlm.report import report_eval
    result, scores = report_eval("datastores/default", None, EvalConfig(), "report.html")

The data building (`build_report_data`) is a pure function of the scores and what was looked up;
`gather` looks up the detailed tokens' neighbours, contexts and LM top tokens; `render` inlines it
all into the packaged template (template.html).
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from ..combine import Combiner, load_lambda
from ..datastore import folder_of, refuse_own_file
from ..errors import KNNLMError
from ..arrays import refuse_existing
from ..evaluate import EvalConfig, open_eval, score_run
from ..lm import LM
from ..retrieval import Retriever
from ..scores import Scores
from .data import build_report_data, detail_count, shown_rows
from .gather import lm_top_tokens, neighbor_contexts, neighbor_ids
from .render import check_report_path, neighbors_panel, render_html, write_html

__all__ = ["build_report_data", "write_report", "report_eval", "write_neighbors_html", "render_html"]

REPORT_TOKENS = 5000  # tokens given the full panel by default
REPORT_NEIGHBORS = 8  # neighbours listed per token
CONTEXT_TOKENS = 20  # tokens of a neighbour's preceding context


def write_report(path: str | os.PathLike, scores: Scores, docs: list[tuple[str, str]], lm: LM, retriever: Retriever,
                 combiner: Combiner, summary: dict | None = None, detail_tokens: int = REPORT_TOKENS,
                 batch_size: int = 4, title: str | None = None, overwrite: bool = True) -> dict:
    """Write the HTML report of scored documents.

    Args:
        path: the .html file to write.
        scores: the per-token scores of docs (from run_eval).
        docs: the (name, text) pairs that were scored.
        lm: the model.
        retriever: the search the scores were made with (the detailed tokens are searched again for row ids).
        combiner: the mixing policy the scores were evaluated with.
        summary: the run's report dict (perplexities, λ, T, search, speed).
        detail_tokens: tokens (the first ones) given the full panel.
        batch_size: windows per forward pass when computing the LM's top tokens.
        title: the page title.
        overwrite: replace a file at path; without it, one another process wrote meanwhile is refused.

    Returns:
        {"path", "bytes", "tokens_detailed", "rows"}.
    """
    ids = [(name, lm.encode(text)) for name, text in docs]
    m = detail_count(len(scores), detail_tokens)
    head = lm.output_head
    lambdas = combiner.lambdas(scores)
    mixed = combiner.target_log_probs(scores, head, lambdas)
    nbr = neighbor_ids(retriever, scores, m)
    rows = shown_rows(nbr, REPORT_NEIGHBORS) if m else np.zeros(0, np.int64)
    contexts = neighbor_contexts(retriever.ds, rows, CONTEXT_TOKENS)  # only the rows the page shows
    context, stride = int(scores.attrs.get("context") or retriever.ds.meta["context"]), \
        int(scores.attrs.get("stride") or retriever.ds.meta["stride"])
    lm_top = lm_top_tokens(lm, ids, scores, m, context, stride, batch_size)
    data = build_report_data(scores, ids, mixed, lambdas, nbr, contexts, lm.decode, combiner.temperature,
                             lm_top=lm_top, summary=summary, tuned=load_lambda(retriever.ds.path),
                             detail_tokens=detail_tokens, neighbors=REPORT_NEIGHBORS)
    size = write_html(path, data, title or f"kNN-LM report: {(summary or {}).get('corpus', 'text')}", overwrite)
    return {"path": str(path), "bytes": size, "tokens_detailed": m, "rows": int(len(rows))}


def report_eval(datastore=None, corpus: str | None = None, cfg: EvalConfig = EvalConfig(),
                path: str | os.PathLike = "report.html", detail_tokens: int = REPORT_TOKENS, lm: LM | None = None,
                split: str = "test", progress=None, documents: list[tuple[str, str]] | None = None,
                retriever: Retriever | None = None) -> tuple[dict, Scores]:
    """run_eval, then the HTML report of what it scored (`knnlm eval --report`).

    Args:
        datastore, corpus, cfg, lm, split, progress, documents, retriever: as for run_eval.
        path: the .html file to write.
        detail_tokens: tokens (the first ones) given the full panel.

    Returns:
        run_eval's (report, scores); the report also holds "report_file" and "report_bytes".
    """
    check_report_path(path)
    if cfg.use_datastore:
        refuse_own_file(path, folder_of(datastore), "--report")
    refuse_existing(path, cfg.overwrite)
    if cfg.save_scores and os.path.abspath(cfg.save_scores) == os.path.abspath(path):
        raise KNNLMError(f"--save-scores and --report both name {path}, so the page would replace the scores; name "
                         "two files.")
    if isinstance(detail_tokens, bool) or not isinstance(detail_tokens, (int, np.integer)) or detail_tokens < 0:
        raise KNNLMError(f"--report-tokens {detail_tokens!r} is not a number of tokens; pass one, e.g. 5000.")
    # The page searches the detailed tokens' queries again, and reads the LM's top tokens and mix from a plain
    # forward and the datastore's neighbours: none is what RetoMaton's pointers, the attention memory or the
    # document memory scored.
    search = retriever.cfg if retriever is not None else cfg.retrieval
    given = [flag for flag, on in (("--retomaton", search.retomaton), ("--attention-memory", cfg.attention is not None),
                                   ("--memory document", cfg.memory.on)) if on]
    if given:
        raise KNNLMError("The report shows a plain search's neighbours and the LM's own top tokens; drop "
                         f"{' and '.join(given)} to write it.")
    run = open_eval(datastore, corpus, cfg, lm, split, documents, retriever)
    # The page searches the detailed tokens' queries again for their neighbours' rows.
    result, scores = score_run(run, replace(cfg, keep_features=True), progress)
    info = write_report(path, scores, run.docs, run.lm, run.retriever, run.combiner, result, detail_tokens,
                        cfg.batch_size, overwrite=cfg.overwrite)
    result.update(report_file=info["path"], report_bytes=info["bytes"])
    return result, scores


def write_neighbors_html(path: str | os.PathLike, r: dict, overwrite: bool = False) -> int:
    """The neighbour panel of one position (the dict of KNNLM.neighbors) as a page; returns its size in bytes.
    An existing file is replaced only with overwrite; one of the datastore's own files (r's "datastore") never is."""
    if r.get("datastore") is not None:
        refuse_own_file(path, r["datastore"], "--html")
    refuse_existing(path, overwrite)
    return write_html(path, neighbors_panel(r), f"kNN-LM neighbours of position {r['position']}", overwrite)
