"""Eval's inputs and caches: bad settings are one sentence before any scoring; the dev-scores cache
knows the index it was made with; eval reads JSONL corpora with any text field."""

from __future__ import annotations


import numpy as np
import torch
import pytest
from click.testing import CliRunner

from knnlm.cli.main import cli
from knnlm.evaluate import EvalConfig, dev_scores, run_eval
from knnlm.index import train_index
from knnlm.retrieval import RetrievalConfig

from helpers import build_corpus_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm, tiny_model_dir, corpus_texts):
    return build_corpus_store(tmp_path_factory.mktemp("inputs"), corpus_texts, tiny_model_dir, tiny_lm)


def refused(result, *words):
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (result.exception, result.output)
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error: ") and "Traceback" not in result.output
    for w in words:
        assert w in msg, msg


def test_bad_eval_settings_are_one_sentence_before_scoring(store, tiny_model_dir, monkeypatch, tmp_path):
    import knnlm.evaluate

    def no_scoring(*a, **k):
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(knnlm.evaluate, "score_documents", no_scoring)
    run = lambda *a: CliRunner().invoke(cli, ["eval", "--datastore", str(store.path), "--model", str(tiny_model_dir),
                                              *map(str, a)])
    refused(run("--batch-size", 0), "--batch-size 0 must be at least 1")
    refused(run("--save-scores", tmp_path / "missing" / "s.h5"), "does not exist", "create it")
    refused(run("--lambda", "2"), "outside [0, 1]")
    refused(run("--temperature", 0), "must be a positive number")
    refused(run("--temperature", "inf"), "--temperature inf must be a positive number")  # it gave nan perplexities
    assert not list(tmp_path.iterdir())


def test_a_failed_save_leaves_no_temporary_file(store, tiny_lm, tmp_path, monkeypatch):
    import h5py

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.File, "create_dataset", broken)
    with pytest.raises(OSError):
        run_eval(store, cfg=EvalConfig(lam="0", save_scores=str(tmp_path / "s.h5")), lm=tiny_lm)
    assert list(tmp_path.iterdir()) == []


def test_dev_scores_cache_knows_the_index(store, tiny_lm):
    cfg = EvalConfig(lam="0", temperature=1.0, retrieval=RetrievalConfig(k=20))
    first, cached = dev_scores(store, cfg, lm=tiny_lm)
    assert not cached
    again, cached = dev_scores(store, cfg, lm=tiny_lm)
    assert cached and np.array_equal(again.dists, first.dists)
    train_index(store)  # retrained: the cache must not be reused, even for the same settings
    _, cached = dev_scores(store, cfg, lm=tiny_lm)
    assert not cached
    # other k: not reused either
    assert not dev_scores(store, EvalConfig(lam="0", temperature=1.0, retrieval=RetrievalConfig(k=10)),
                          lm=tiny_lm)[1]


def test_dev_scores_are_the_same_computed_or_read_from_the_cache(store, tiny_lm):
    """tune-lambda fits its gates on these: a run that scores must fit what a later run reads back (the cache keeps
    the queries in fp16; before, the first run's float32 queries gave other gates than every run after it)."""
    cfg = EvalConfig(lam="0", temperature=1.0, retrieval=RetrievalConfig(k=20), keep_features=True)
    first, cached = dev_scores(store, cfg, lm=tiny_lm)
    again, cached_again = dev_scores(store, cfg, lm=tiny_lm)
    assert (cached, cached_again) == (False, True) and first.queries is not None
    for name in ("queries", "targets", "lm_logp", "dists", "vals", "lm_entropy", "lm_max", "lm_second", "lm_argmax"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name


def test_eval_reads_jsonl_with_another_text_field(store, tiny_lm, tiny_model_dir, tmp_path, corpus_texts):
    text = corpus_texts["bisect.py"][:2000]
    (tmp_path / "c.jsonl").write_text(__import__("json").dumps({"body": text}) + "\n")
    (tmp_path / "c.txt").write_text(text)
    r = CliRunner().invoke(cli, ["eval", "--datastore", str(store.path), "--model", str(tiny_model_dir),
                                 "--corpus", str(tmp_path / "c.jsonl"), "--text-field", "body", "--json"])
    assert r.exit_code == 0, r.output
    want = run_eval(store, str(tmp_path / "c.txt"), EvalConfig(), lm=tiny_lm)[0]
    got = __import__("json").loads(r.stdout)
    assert got["tokens"] == want["tokens"] and got["lm_ppl"] == want["lm_ppl"]
    r = CliRunner().invoke(cli, ["eval", "--datastore", str(store.path), "--model", str(tiny_model_dir),
                                 "--corpus", str(tmp_path / "c.jsonl")])
    refused(r, "no string field 'text'", "--text-field")


def test_text_that_is_not_utf8_or_not_a_str_is_one_sentence(tiny_lm, monkeypatch):
    import io
    import sys
    from pathlib import Path

    from knnlm.corpus import open_corpus, read_stdin
    from knnlm.errors import KNNLMError

    # argv's undecodable bytes arrive as lone surrogates (surrogateescape); the tokenizer raised a TypeError on them
    with pytest.raises(KNNLMError, match=r"^The text is not UTF-8 \(byte 0xff at character 3\); convert it to UTF-8"):
        tiny_lm.encode("abc\udcff def")
    with pytest.raises(KNNLMError, match=r"^The text is not UTF-8 \(U\+D800 at character 1\)"):
        tiny_lm.encode("a\ud800")
    for wrong in (b"abc", Path("abc.txt"), None, ["abc"]):
        with pytest.raises(KNNLMError, match=rf"^The text is a {type(wrong).__name__}, not a str; pass the text"):
            tiny_lm.encode(wrong)
    assert tiny_lm.encode("abc é") == tiny_lm.tokenizer("abc é", add_special_tokens=False)["input_ids"]
    # stdin, decoded strictly (a UTF-8 locale) or with surrogateescape (the C locale)
    for errors, words in (("strict", r"invalid start byte at byte 3"), ("surrogateescape", r"byte 0xff at character 3")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff def"), "utf-8", errors=errors))
        with pytest.raises(KNNLMError, match=rf"^The text on stdin is not UTF-8 \({words}"):
            read_stdin()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff def"), "utf-8", errors=errors))
        with pytest.raises(KNNLMError, match=r"^The text on stdin is not UTF-8"):
            open_corpus("-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("x = 'é'\n".encode()), "utf-8"))
    assert read_stdin() == "x = 'é'\n"


def test_api_arguments_of_the_wrong_type_are_one_sentence(store, tiny_lm):
    from pathlib import Path

    from knnlm import KNNLM, MemoryConfig
    from knnlm.errors import KNNLMError

    knn = KNNLM.open(store.path, lm=tiny_lm, retrieval=RetrievalConfig(k=8, exact=True))
    text = "def f(x):\n    return x\n"
    cases = [
        (lambda: knn.evaluate(Path("a.txt")), r"^text takes a str or several \(e.g. a list of str\), not a PosixPath; "
                                              r"pass the text"),
        (lambda: knn.evaluate([text, b"x"]), r"^text takes a str or several .*, not a bytes"),
        (lambda: knn.evaluate(b"x"), r"^text takes a str or several .*, not a bytes"),
        (lambda: knn.evaluate(None), r"^text takes a str or several .*, not a NoneType"),
        (lambda: knn.generate([text, text], 2), r"^The text is a list, not a str"),
        (lambda: knn.generate(text, "5"), r"^max_new_tokens takes an int, e.g. 64, not '5' \(str\)"),
        (lambda: knn.generate(text, 1.5), r"^max_new_tokens takes an int, e.g. 64, not 1.5 \(float\)"),
        (lambda: knn.generate(text, 2, sample=True, seed=None), r"^seed takes an int, e.g. 0, not None"),
        (lambda: knn.generate(text, 2, temperature="5"), r"^temperature takes an int or float, e.g. 1.0, not '5'"),
        (lambda: knn.generate(text, 2, memory="document"), r"^memory takes None or a MemoryConfig, e.g. "
                                                           r"MemoryConfig\('document'\), not 'document'"),
        (lambda: knn.evaluate(text, memory="document"), r"^memory takes a MemoryConfig"),
        (lambda: knn.evaluate(text, attention_memory=True), r"^attention_memory takes None or an "
                                                            r"AttentionMemoryConfig, e.g. AttentionMemoryConfig\(\)"),
        (lambda: knn.evaluate(text, context="64"), r"^context takes None or an int"),
        (lambda: knn.with_retrieval(k="5"), r"^k takes an int, e.g. 1000, not '5'"),
        (lambda: KNNLM.open(store.path, lm=tiny_lm, retrieval={"k": 5}), r"^retrieval takes a RetrievalConfig"),
        (lambda: KNNLM.open(store.path, device="cuda:7" if not torch.cuda.is_available() else "tpu"),
         r"^--device \S+: torch sees no CUDA device here|is not a torch device"),
    ]
    for call, words in cases:
        with pytest.raises(KNNLMError, match=words):
            call()
    # numpy's integers are integers
    assert knn.with_retrieval(k=np.int64(4)).retriever.k == 4
    assert knn.evaluate([text, text], memory=MemoryConfig("document"))["tokens"] > 0
    # several texts, however held: a tuple, a generator, a numpy array of str
    one = knn.evaluate([text, text])
    for several in ((text, text), (t for t in [text, text]), np.array([text, text])):
        assert knn.evaluate(several)["knn_lm_ppl"] == one["knn_lm_ppl"]


def test_run_eval_takes_a_corpus_or_documents(store, tiny_lm, tmp_path):
    from knnlm.errors import KNNLMError

    (tmp_path / "c.txt").write_text("x = 1\n" * 40)
    cfg = EvalConfig(retrieval=RetrievalConfig(k=4, exact=True))
    with pytest.raises(KNNLMError, match=r"^run_eval scores a corpus or the given documents, not both"):
        run_eval(store, str(tmp_path / "c.txt"), cfg, lm=tiny_lm, documents=[("t", "y = 2\n")])
    with pytest.raises(KNNLMError, match=r"^No documents were given to score"):
        run_eval(store, cfg=cfg, lm=tiny_lm, documents=[])
    r, _ = run_eval(store, cfg=cfg, lm=tiny_lm, documents=[("t", "y = 2\n" * 30)])
    assert r["corpus"] == "1 given text"


def test_a_config_run_twice_refuses_its_scores_file_before_scoring(store, tiny_lm, tmp_path, monkeypatch):
    import knnlm.evaluate
    from knnlm.errors import KNNLMError

    cfg = EvalConfig(retrieval=RetrievalConfig(k=4, exact=True), save_scores=str(tmp_path / "s.h5"))
    run_eval(store, cfg=cfg, lm=tiny_lm, documents=[("t", "y = 2\n" * 30)])
    monkeypatch.setattr(knnlm.evaluate, "score_documents", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(KNNLMError, match=r"s.h5 already exists; pass --overwrite"):
        run_eval(store, cfg=cfg, lm=tiny_lm, documents=[("t", "y = 2\n" * 30)])
