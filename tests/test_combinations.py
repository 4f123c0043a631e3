"""Features meeting each other: --no-datastore with search flags and attention memory, RetoMaton in the
dev-scores cache and the tuned-settings note, the report's refusals, updates of indexes they cannot change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import make_datastore
from knnlm.api import KNNLM
from knnlm.cli.main import cli
from knnlm.combine import resolve_combiner, search_settings_note
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.evaluate import NO_DATASTORE_WINDOW, EvalConfig
from knnlm.generate import generate
from knnlm.index import IndexConfig, train_index
from knnlm.memory.attention import AttentionMemoryConfig
from knnlm.memory.document import MemoryConfig
from knnlm.report import report_eval
from knnlm.retrieval import RetrievalConfig
from knnlm.update import remove_documents


def test_no_datastore_refuses_flags_only_a_datastore_reads(tiny_model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    for cmd in (["eval", "--corpus", tmp_path / "t.txt"], ["generate", "-p", "def f("]):
        r = CliRunner().invoke(cli, [*map(str, cmd), "--no-datastore", "--model", str(tiny_model_dir), "--k", "5",
                                     "--retomaton"])
        assert r.exit_code == 2, r.output
        assert "--k" in r.output and "--retomaton" in r.output and "--no-datastore" in r.output
        assert "--k, --retomaton only change the datastore's search or mix; drop them" in r.output
    r = CliRunner().invoke(cli, ["generate", "-p", "x", "--no-datastore", "--model", str(tiny_model_dir), "--k", "5"])
    assert r.exit_code == 2 and "--k only changes the datastore's search or mix; drop it with" in r.output, r.output


def test_generate_without_a_datastore_reads_through_eval_s_window_with_attention_memory(tiny_lm, corpus_texts):
    prompt = corpus_texts["bisect.py"][:300]
    api = KNNLM.without_datastore(lm=tiny_lm).generate(prompt, 6, attention_memory=AttentionMemoryConfig(k=4))
    # The prompt fits the window, so the memory stays empty: the continuation is the windowed LM's.
    plain = generate(tiny_lm, prompt, None, 0.0, None, 6, window=NO_DATASTORE_WINDOW)
    assert api == plain.text


def test_retomaton_is_a_search_setting_for_the_tuned_values_note():
    tuned = {"tuned_on": {"attrs": {"search": "ivfpq", "index": "a", "k": 1000, "nprobe": 8, "rerank": True}}}
    plain = {"search": "ivfpq", "index": "a", "k": 1000, "nprobe": 8, "rerank": True}
    assert search_settings_note(tuned, plain) is None
    note = search_settings_note(tuned, {**plain, "retomaton": "min_knns 50, candidates 2048"})
    assert note is not None and "retomaton off" in note


def test_no_tuned_values_note_on_a_datastore_never_tuned(tmp_path):
    ds = make_datastore(tmp_path / "ds", np.zeros((20, 8)), np.zeros(20))  # no lambda.json
    search = {"search": "ivfpq", "index": "a", "k": 1000, "nprobe": 8, "rerank": True, "retomaton": "min_knns 50"}
    assert resolve_combiner("0.25", ds, search=search).mismatch is None  # nothing tuned is used
    (ds / "lambda.json").write_text(json.dumps({"format": 2, "lambda": 0.3, "temperature": 10.0, "tuned_on": {"attrs": {
        "search": "ivfpq", "index": "a", "k": 1000, "nprobe": 8, "rerank": True}}}))
    assert "retomaton off" in resolve_combiner("0.25", ds, search=search).mismatch  # its tuned T is


@pytest.mark.parametrize("cfg, flag", [(EvalConfig(retrieval=RetrievalConfig(retomaton=True)), "--retomaton"),
                                       (EvalConfig(attention=AttentionMemoryConfig()), "--attention-memory"),
                                       (EvalConfig(memory=MemoryConfig("document")), "--memory document")])
def test_report_refuses_what_it_would_show_wrongly(cfg, flag, tmp_path):
    """The page shows a plain search's neighbours and mix (before: --memory document's perplexity in the JSON, the
    datastore-only mix on the page, silently)."""
    with pytest.raises(KNNLMError, match=f"drop {flag} to write it"):
        report_eval(None, None, cfg, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("name, words", [("", "is empty"), ("newdir/", "is a folder"),
                                         ("b" * 250 + ".html", "no file can be made")])
def test_report_refuses_a_path_it_cannot_write_before_any_work(name, words, tmp_path, monkeypatch):
    """Before: '' and 'newdir/' went on (no report; a file named newdir); a name too long for the write's temporary
    name, or a folder where no file can be made (/proc), failed after all the work, with a traceback; a negative
    count of detailed tokens was taken from the API."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KNNLMError, match=words):
        report_eval(None, None, EvalConfig(), name)
    with pytest.raises(KNNLMError, match="not a number of tokens"):
        report_eval(None, None, EvalConfig(), tmp_path / "r.html", detail_tokens=-5)
    assert list(tmp_path.iterdir()) == []  # the check's own file is gone


def test_report_path_check_names_why_no_file_can_be_made(tmp_path, monkeypatch):
    """A folder where creating a file fails (as /proc does, with ENOENT) is refused in one sentence naming why."""
    import builtins
    import errno

    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if "x" in mode:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(KNNLMError, match=r"no file can be made in .* \(No such file or directory\); pass another path"):
        report_eval(None, None, EvalConfig(), tmp_path / "r.html")


def test_updates_refuse_an_index_that_is_neither_ivf_nor_flat(tmp_path):
    rng = np.random.default_rng(0)
    ds = make_datastore(tmp_path / "ds", rng.normal(size=(300, 16)), rng.integers(0, 100, 300))
    train_index(open_datastore(ds), IndexConfig(factory="HNSW8"))
    with pytest.raises(KNNLMError, match="neither IVF nor flat"):
        remove_documents(ds, ["synthetic"])
    assert open_datastore(ds).meta.get("removed") in (None, [])


def test_a_change_in_progress_is_left_alone_by_readers_and_other_writers(tmp_path):
    import fcntl
    import os

    from knnlm.journal import LOCK, PENDING

    rng = np.random.default_rng(0)
    ds = make_datastore(tmp_path / "ds", rng.normal(size=(50, 8)), rng.integers(0, 100, 50))
    fd = os.open(ds / LOCK, os.O_CREAT | os.O_RDWR)  # another process, in the middle of a change
    fcntl.flock(fd, fcntl.LOCK_EX)
    (ds / PENDING).mkdir()
    (ds / PENDING / "meta.json").write_text("{}")
    try:
        assert open_datastore(ds).count == 50  # the last committed state
        assert (ds / PENDING / "meta.json").exists()  # not thrown away under the writer's feet
        with pytest.raises(KNNLMError, match="being changed by another process"):
            remove_documents(ds, ["synthetic"])
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    open_datastore(ds)  # the writer is gone: its uncommitted change is discarded
    assert not (ds / PENDING).exists()
    remove_documents(ds, ["synthetic"])
    assert open_datastore(ds).live_count == 0


def test_every_public_name_imports_from_knnlm():
    import knnlm
    from knnlm.memory.attention import AttentionMemoryConfig
    from knnlm.memory.document import MemoryConfig

    for name in knnlm.__all__:
        assert getattr(knnlm, name) is not None, name
    # the README's `memory=MemoryConfig("document")` and attention memory's config, from knnlm itself
    assert knnlm.MemoryConfig is MemoryConfig and knnlm.AttentionMemoryConfig is AttentionMemoryConfig


@pytest.mark.parametrize("args,words", [
    (["eval", "--memory-lambda", "0.3", "--memory-neighbors", "8"],
     "--memory-lambda, --memory-neighbors only apply with --memory document; add it or leave them out"),
    (["generate", "-p", "x", "--memory-mix", "separate"], "--memory-mix only applies with --memory document"),
    (["eval", "--report-tokens", "100"], "--report-tokens only applies with --report; add it or leave it out"),
    # the default "joint" mix uses the datastore's λ and T, not the memory's own
    (["eval", "--memory", "document", "--memory-lambda", "0.3"],
     "--memory-lambda only applies with --memory-mix separate or --no-datastore"),
    (["generate", "-p", "x", "--memory", "document", "--memory-mix", "joint", "--memory-temperature", "5"],
     "--memory-temperature only applies with --memory-mix separate or --no-datastore"),
    (["eval", "--no-datastore", "--memory", "document", "--memory-mix", "joint"],
     "--memory-mix only applies with a datastore"),
    (["build-datastore", "corpus.txt", "--ray-address", "auto"], "--ray-address only applies with --engine ray"),
    (["eval", "--memory-k", "8", "--memory-layers", "0"], "--memory-layers, --memory-k only apply with --attention-memory"),
    # the search's own flags
    (["eval", "--min-knns", "7"], "--min-knns only applies with --retomaton; add it or leave it out"),
    (["generate", "-p", "x", "--max-candidates", "500", "--min-knns", "3"],
     "--min-knns, --max-candidates only apply with --retomaton"),
    (["eval", "--exact", "--nprobe", "4"],
     "--nprobe only applies with the faiss index; --exact searches every key, so leave it out"),
    (["neighbors", "x", "--search-device", "cpu", "--nprobe", "4"],
     "--nprobe only applies with the faiss index; --search-device searches every key"),
    (["eval", "--search-device", "cpu", "--exact", "--no-rerank"],
     "--search-device already searches exactly, so --rerank/--no-rerank and --exact would do nothing; leave them out"),
    (["generate", "-p", "x", "--seed", "3"], "--seed only applies with --sample; greedy decoding draws nothing"),
    # a corpus's reading flags without the corpus: the held-out text is read
    (["eval", "--glob", "*.md"], "--glob only applies with --corpus; without it the datastore's held-out text is "
                                 "read, so leave it out or pass --corpus"),
    (["tune-lambda", "--text-field", "body", "--format", "jsonl"], "--format, --text-field only apply with --corpus"),
    # tune-lambda's options of the fits a switch turned off
    (["tune-lambda", "--memory-neighbors", "16"], "--memory-neighbors only applies with --memory document"),
    (["tune-lambda", "--no-adaptive", "--bins", "8"], "--bins only applies with --adaptive; drop --no-adaptive or"),
    (["tune-lambda", "--no-gate", "--gate-rank", "4", "--gate-hidden", "2"],
     "--gate-hidden, --gate-rank only apply with --gate; drop --no-gate or leave them out"),
    (["tune-lambda", "--no-gate", "--skip"], "--skip picks the before-retrieval gate's threshold, so it needs --gate"),
    (["tune-lambda", "--no-skip", "--skip-tolerance", "0.05"], "--skip-tolerance only applies with --skip and --gate"),
    (["tune-lambda", "--plot", "p.png", "--no-plot"], "--plot names the plot that --no-plot skips"),
    (["tune-lambda", "--overwrite"], "--overwrite only applies with --plot"),
    (["eval", "--overwrite"], "--overwrite only applies with --save-scores or --report"),
    # a typed --code-size equal to its default beside --factory (the config sees only the value)
    (["build-datastore", "c.txt", "--factory", "IVF4,Flat", "--code-size", "64"], "names its own lists and codes"),
])
def test_options_that_need_another_are_refused_not_ignored(args, words, tmp_path):
    # Refused before anything is opened: no datastore, model or corpus exists here.
    where = [] if "--no-datastore" in args else ["--datastore" if args[0] != "build-datastore" else "--out",
                                                 str(tmp_path / "nowhere")]
    r = CliRunner().invoke(cli, [*args, *where])
    assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "nowhere").exists()


def test_train_index_refuses_a_typed_code_size_beside_a_factory(tmp_path):
    r = CliRunner().invoke(cli, ["train-index", str(tmp_path / "nowhere"), "--factory", "IVF4,Flat", "--code-size", "64"])
    assert r.exit_code == 2 and "names its own lists and codes, so they would do nothing" in r.output, r.output
    r = CliRunner().invoke(cli, ["train-index", str(tmp_path / "nowhere"), "--factory", "IVF4,Flat"])
    assert r.exit_code == 1 and "does not exist" in r.output, r.output  # past the check


def test_the_memory_s_own_mix_takes_its_lambda(tmp_path):
    # With the separate mix, --memory-lambda is read: nothing is refused (the missing datastore stops it later).
    r = CliRunner().invoke(cli, ["eval", "--memory", "document", "--memory-mix", "separate", "--memory-lambda", "0.3",
                                 "--datastore", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "only appl" not in r.output and "does not exist" in r.output, r.output


def test_a_plot_file_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "p.png").write_bytes(b"mine")
    r = CliRunner().invoke(cli, ["tune-lambda", "--plot", str(tmp_path / "p.png"), "--datastore", str(tmp_path / "no")])
    assert r.exit_code == 1 and "p.png already exists; pass --overwrite to replace it." in r.output, r.output
    assert (tmp_path / "p.png").read_bytes() == b"mine"
    r = CliRunner().invoke(cli, ["tune-lambda", "--plot", str(tmp_path / "p.png"), "--overwrite", "--datastore",
                                 str(tmp_path / "no")])
    assert r.exit_code == 1 and "does not exist" in r.output  # past the check: the missing datastore stops it
    (tmp_path / "no").mkdir()
    (tmp_path / "no" / "lambda.png").write_bytes(b"tuned before")  # the datastore's own plot: tuning replaces it
    r = CliRunner().invoke(cli, ["tune-lambda", "--plot", str(tmp_path / "no" / "lambda.png"), "--datastore",
                                 str(tmp_path / "no")])
    assert r.exit_code == 1 and "no meta.json" in r.output, r.output


def test_settings_greedy_decoding_or_no_memory_would_not_read_are_refused(tiny_lm):
    from knnlm.errors import KNNLMError
    from knnlm.generate import generate
    from knnlm.memory.document import MemoryConfig

    with pytest.raises(KNNLMError, match=r"^seed 3 seeds the sampler, and greedy decoding draws nothing"):
        generate(tiny_lm, "x = 1", None, max_new_tokens=2, seed=3)
    with pytest.raises(KNNLMError, match=r"^MemoryConfig\(memory='none'\) keeps no memory, so k=8 would do nothing"):
        generate(tiny_lm, "x = 1", None, max_new_tokens=2, memory=MemoryConfig("none", k=8))
    with pytest.raises(KNNLMError, match=r"^temperature takes None or an int or float"):
        MemoryConfig("document", temperature="5")
