"""One object to hold: a datastore, its model and a search over it.

    from knnlm import KNNLM

    knn = KNNLM.open("datastores/default")
    knn.evaluate("def parse(text):\\n    return text.split()\\n")["knn_lm_ppl"]
    knn.generate("def main(", max_new_tokens=20)
    knn.neighbors("import numpy as", top=5)["neighbors"]
    knn.report("def parse(text):\\n    return text.split()\\n", "report.html")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace

from . import journal
from .arrays import check_writable
from .datastore import Datastore, check_unchanged, open_datastore
from .evaluate import EvalConfig, dev_scores, run_eval, search_settings
from .generate import KNNLogitsProcessor, generate
from .errors import KNNLMError, expect
from .lm import DEFAULT_MODEL, LM, datastore_lm, load_lm
from .memory.attention import AttentionMemoryConfig
from .memory.document import MemoryConfig, tune_memory
from .neighbors import neighbors
from .report import report_eval
from .retrieval import RetrievalConfig, Retriever
from .combine import pick_temperature, resolve_combiner, save_lambda
from .tune import TuneConfig, tune


class KNNLM:
    """A frozen LM with its nearest-neighbour memory.

    Open one with `KNNLM.open`; the model, the index and the λ file are read once and shared by
    every call. λ arguments take a number in [0, 1], "tuned", "adaptive", "gate" or "gate-pre"
    (all read the datastore's lambda.json, written by `tune`); combine="spalm" uses SPALM's
    gated memory instead of λ; skip_below (a number or "tuned") skips the search where the
    before-retrieval gate predicts a λ below it. temperature None means the tuned T, else 1,
    as in `knnlm eval`. RetoMaton is a search setting: `KNNLM.open(..., retrieval=RetrievalConfig(
    retomaton=True, min_knns=50))` or `knn.with_retrieval(retomaton=True)`; evaluate() then reports
    `searches_saved`.

    memory (a MemoryConfig) adds the document memory to evaluate and generate; `KNNLM.without_datastore`
    gives the model with nothing built, for the document memory alone.

    Attributes:
        datastore: the opened Datastore (None: without_datastore).
        lm: the model (the one the datastore was built with).
        retriever: the search over the datastore (None: without_datastore).
    """

    def __init__(self, datastore: Datastore | None, lm: LM, retriever: Retriever | None):
        self.datastore, self.lm, self.retriever = datastore, lm, retriever

    @classmethod
    def open(cls, datastore=None, model: str | None = None, device: str | None = None,
             retrieval: RetrievalConfig = RetrievalConfig(), trust_remote_code: bool = False,
             lm: LM | None = None) -> "KNNLM":
        """Open a datastore with its model.

        Args:
            datastore: the datastore directory; None: $KNNLM_DATASTORE, else datastores/default.
            model: hub id, directory or .gguf file; None: the model named in the datastore.
            device: torch device; None: cuda when available, else cpu.
            retrieval: k, nprobe, re-ranking and exact search.
            trust_remote_code: allow the model repository's own code.
            lm: an already loaded model to use instead of loading one.

        Returns:
            The KNNLM.

        Raises:
            KNNLMError: the datastore is missing or broken, or the model is not the one it was built with.
        """
        ds = open_datastore(datastore)
        lm = datastore_lm(ds, model, device, trust_remote_code, lm)
        return cls(ds, lm, Retriever(ds, retrieval))

    @classmethod
    def without_datastore(cls, model: str | None = None, device: str | None = None, trust_remote_code: bool = False,
                          lm: LM | None = None) -> "KNNLM":
        """The model alone, with no datastore (evaluate and generate then take the document memory only).

        Args:
            model: hub id, directory or .gguf file; None: the bundled default model.
            device: torch device; None: cuda when available, else cpu.
            trust_remote_code: allow the model repository's own code.
            lm: an already loaded model to use instead of loading one.
        """
        return cls(None, lm or load_lm(model or DEFAULT_MODEL, device, trust_remote_code), None)

    def _refuse_mixing(self, lam, temperature, combine, skip_below) -> None:
        """Without a datastore, one sentence for the datastore's mixing settings (they would do nothing), as the CLI's
        --no-datastore refuses its flags."""
        given = [f"{name}={value!r}" for name, value, default in (
            ("lam", lam, 0.25), ("temperature", temperature, None), ("combine", combine, "mix"),
            ("skip_below", skip_below, None)) if value != default and str(value) != str(default)]
        if self.datastore is None and given:
            raise KNNLMError(f"{', '.join(given)} mix the datastore's neighbours in, and this KNNLM has no datastore; "
                             "leave them out (the document memory takes its own in MemoryConfig).")

    def _need_datastore(self, what: str) -> None:
        """One sentence instead of an AttributeError when a datastore's method is called without one."""
        if self.datastore is None:
            raise KNNLMError(f"KNNLM.{what} needs a datastore; open one with KNNLM.open (without_datastore "
                             "offers evaluate and generate only).")

    def evaluate(self, text: str | list[str], lam: str | float = 0.25, temperature: float | None = None,
                 context: int | None = None, stride: int | None = None, combine: str = "mix",
                 skip_below: str | float | None = None, memory: MemoryConfig | None = None,
                 attention_memory: AttentionMemoryConfig | None = None) -> dict:
        """Perplexity of the LM and of the kNN-LM on text.

        Args:
            text: one document, or a list of documents.
            lam: λ.
            temperature: T of p_kNN.
            context: tokens per window; None: the datastore's.
            stride: tokens a window advances; None: the datastore's.
            combine: "mix" or "spalm".
            skip_below: None, a number or "tuned": the learned retrieval skip.
            attention_memory: kNN-augmented attention over what left the window (None: off).
            memory: the document memory (its figures under "memory"); None: none.

        Returns:
            The report of `knnlm eval --json`: tokens, lm_ppl, knn_lm_ppl, knn_only_ppl, change,
            searches_skipped, ...
        """
        self._refuse_mixing(lam, temperature, combine, skip_below)
        cfg = EvalConfig(lam=str(lam), temperature=temperature,
                         retrieval=self.retriever.cfg if self.retriever else RetrievalConfig(), context=context,
                         stride=stride, combine=combine, skip_below=None if skip_below is None else str(skip_below),
                         memory=memory or MemoryConfig(), use_datastore=self.datastore is not None,
                         attention=attention_memory)
        return self._score(text, cfg)[0]

    def _score(self, text: str | list[str], cfg: EvalConfig):
        """run_eval over one text or a list of texts, with this object's model and search."""
        return run_eval(self.datastore, cfg=cfg, lm=self.lm, retriever=self.retriever, documents=_documents(text))

    def report(self, text: str | list[str], path: str = "report.html", lam: str | float = 0.25,
               temperature: float | None = None, detail_tokens: int = 5000, combine: str = "mix",
               skip_below: str | float | None = None, overwrite: bool = False) -> dict:
        """Evaluate text and write the interactive HTML report of it (as `knnlm eval --report`).

        Args:
            text: one document, or a list of documents.
            path: the .html file to write (one self-contained page).
            lam: λ.
            temperature: T of p_kNN.
            detail_tokens: tokens (the first ones) given the full neighbour panel.
            combine: "mix" or "spalm".
            skip_below: None, a number or "tuned": the learned retrieval skip.
            overwrite: replace an existing file at path (else refused before any work).

        Returns:
            The evaluation report, with "report_file" and "report_bytes".
        """
        self._need_datastore("report")
        cfg = EvalConfig(lam=str(lam), temperature=temperature, retrieval=self.retriever.cfg, combine=combine,
                         skip_below=None if skip_below is None else str(skip_below), overwrite=overwrite)
        return report_eval(self.datastore, cfg=cfg, path=path, detail_tokens=detail_tokens, lm=self.lm,
                           documents=_documents(text), retriever=self.retriever)[0]

    def generate(self, prompt: str, max_new_tokens: int = 64, lam: str | float = 0.25,
                 temperature: float | None = None, sample: bool = False, seed: int = 0, combine: str = "mix",
                 skip_below: str | float | None = None, memory: MemoryConfig | None = None,
                 attention_memory: AttentionMemoryConfig | None = None) -> str:
        """Continue a prompt, decoding from the interpolated distribution.

        Args:
            prompt: text to continue (encoded as it is, without a chat template).
            max_new_tokens: tokens to add.
            lam: λ; 0 gives the LM's own choices (the search still runs).
            temperature: T of p_kNN.
            sample: draw tokens instead of taking the most likely.
            seed: seed of the sampler.
            combine: "mix" or "spalm".
            skip_below: None, a number or "tuned": the learned retrieval skip.
            attention_memory: kNN-augmented attention, the KV cache cut to the datastore's window (without a
                datastore: eval's (512, 256)); None: off.
            memory: the document memory of the prompt and the continuation; None: none.

        Returns:
            The new text (without the prompt).
        """
        self._refuse_mixing(lam, temperature, combine, skip_below)
        if self.datastore is None:
            return generate(self.lm, prompt, None, 0.0, None, max_new_tokens, sample, seed, memory=memory,
                            attention=attention_memory).text
        combiner = resolve_combiner(lam, self.datastore.path, combine, skip_below, temperature,
                                    search_settings(self.datastore, self.retriever))
        return generate(self.lm, prompt, self.retriever, combiner, None, max_new_tokens, sample, seed,
                        memory=memory, attention=attention_memory).text

    def neighbors(self, text: str, position: int = -1, top: int = 10, temperature: float | None = None) -> dict:
        """The datastore entries nearest to one position of a text.

        Args:
            text: the text.
            position: the token whose next token is predicted; -1 is the last.
            top: neighbours to return.
            temperature: T of p_kNN for the kNN predictions.

        Returns:
            The dict of `knnlm neighbors --json`: LM and kNN top predictions, and neighbours with
            distance, stored next token, source document, offset and preceding context.
        """
        self._need_datastore("neighbors")
        expect(top, int, "top", "10")
        t = pick_temperature(temperature, self.datastore.path)
        need = min(top, self.datastore.count)  # a search of k = top, where this one's finds fewer
        retriever = self.retriever if need <= self.retriever.k else self.with_retrieval(k=need).retriever
        return neighbors(self.lm, retriever, text, position, top, temperature=t, k=self.retriever.k)

    def logits_processor(self, lam: str | float = 0.25, temperature: float | None = None, combine: str = "mix",
                         skip_below: str | float | None = None) -> KNNLogitsProcessor:
        """A LogitsProcessor for `self.lm.model.generate(..., logits_processor=[...])`.

        Close it (or use it in a `with` block) when done: it hooks the model's output projection.
        """
        self._need_datastore("logits_processor")
        return KNNLogitsProcessor(self.lm, self.retriever, str(lam), temperature, combine, skip_below)

    def tune(self, text: str | list[str] | None = None, cfg: TuneConfig = TuneConfig(),
             memory: MemoryConfig | None = None) -> dict:
        """Fit every mixing policy (λ, T, adaptive bins, gates, skip threshold, SPALM) and store them in the datastore.

        Args:
            text: tuning documents; None: the datastore's held-out dev part (scores cached).
            cfg: what to fit (TuneConfig: the adaptive bins, gates, skip and SPALM to fit, the held-out split).
            memory: with memory "document", also fit the separate p_mem's λ_m and T_m (lambda.json's "memory").

        Returns:
            What `knnlm tune-lambda --json` prints: lambda, temperature, adaptive, heldout figures.
        """
        self._need_datastore("tune")
        expect(cfg, TuneConfig, "cfg", "TuneConfig()")  # before the dev part's scoring, not after
        expect(memory, MemoryConfig, "memory", "MemoryConfig('document')", optional=True)
        check_writable(self.datastore.path)  # where the tuned values (and the dev scores' cache) go
        if cfg.spalm:
            self.lm.output_head.check()  # a model SPALM cannot project for: refused before the scoring
        ecfg = EvalConfig(lam="0", temperature=1.0, retrieval=self.retriever.cfg, keep_features=True)
        with journal.hold(self.datastore.path):  # one tune at a time; no add, remove or compact under its scoring
            check_unchanged(self.datastore)  # the datastore this KNNLM opened, not one rebuilt or changed since
            if text is None:
                scores, _ = dev_scores(self.datastore, ecfg, lm=self.lm, retriever=self.retriever)
                what = f"dev part of {self.datastore.path}"
            else:
                report, scores = self._score(text, ecfg)
                what = report["corpus"]
            result = tune(scores, cfg, description=what, head=self.lm.output_head)
            if memory is not None and memory.on:
                result["memory"] = tune_memory(scores, result, memory)
            save_lambda(self.datastore.path, result, result.pop("tensors", None))
        return result

    def with_retrieval(self, **changes) -> "KNNLM":
        """The same datastore and model with other search settings, e.g. `.with_retrieval(k=100)`."""
        self._need_datastore("with_retrieval")
        cfg, fresh = self.retriever.cfg, RetrievalConfig()
        # A search turned off or replaced takes its settings' defaults back, where not given: they would do nothing
        # (and RetrievalConfig refuses them), e.g. .with_retrieval(retomaton=False) after min_knns=5.
        if changes.get("retomaton") is False:
            changes = {"min_knns": fresh.min_knns, "max_candidates": fresh.max_candidates, **changes}
        if changes.get("exact") or changes.get("search_device") is not None:
            changes = {"nprobe": fresh.nprobe, **changes}
        if changes.get("search_device") is not None:  # torch's exact search: nothing to re-rank, no faiss exact
            changes = {"rerank": True, "rerank_depth": None, "exact": False, **changes}
        if changes.get("exact"):
            changes = {"search_device": None, **changes}
        cfg = replace(cfg, **changes)
        return KNNLM(self.datastore, self.lm, Retriever(self.datastore, cfg))


def _documents(text) -> list[tuple[str, str]]:
    """(name, text) of one text or of each of several (a list, tuple, generator, array... of str); one sentence for
    anything else (a Path is not its text)."""
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (bytes, os.PathLike)) or not isinstance(text, Iterable):
        texts = None
    else:
        texts = list(text)
    wrong = type(text) if texts is None else next((type(t) for t in texts if not isinstance(t, str)), None)
    if wrong is not None:
        raise KNNLMError(f"text takes a str or several (e.g. a list of str), not a {wrong.__name__}; pass the text "
                         "itself (a file's with Path.read_text()).")
    return [(f"text {i}", t) for i, t in enumerate(texts)]
