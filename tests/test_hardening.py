"""Hardening: strict JSON, one sentence for every bad input, one atomic write, one window pipeline, fork safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import knnlm.build
from helpers import clustered, make_datastore
from knnlm import retrieval
from knnlm.arrays import atomic_path, json_safe, write_json
from knnlm.build import BuildConfig, build_datastore
from knnlm.update import AddConfig
from knnlm.corpus import DEFAULT_GLOB, open_corpus
from knnlm.datastore import DEFAULT_DATASTORE, datastore_path, open_datastore
from knnlm.errors import KNNLMError
from knnlm.index import IndexConfig, train_index
from knnlm.cli.main import cli
from knnlm.windows import Window, forward_owned, plan_windows
from knnlm.evaluate import EvalConfig
from knnlm.tune import TuneConfig


def strict_loads(text: str):
    """JSON as jq and JavaScript read it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def invoke(*args):
    """The CLI, catching whatever it raises (a traceback shows up as result.exception, not SystemExit)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, *words) -> str:
    """The command ended in one 'Error:' sentence with exit 1, not a traceback; it names every word."""
    assert isinstance(result.exception, SystemExit), (repr(result.exception), result.output)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error: "), result.output
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_texts) -> Path:
    """A folder of .txt documents shared by the module's tests (builds record its path)."""
    d = tmp_path_factory.mktemp("corpus")
    for name, text in corpus_texts.items():
        (d / f"{name}.txt").write_text(text)
    return d


BUILD = dict(context=64, stride=32, holdout=0.2, glob="*.txt", max_tokens=6000)


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, tiny_lm, tiny_model_dir, corpus) -> Path:
    """A small datastore with an (exact) index."""
    out = tmp_path_factory.mktemp("built") / "ds"
    build_datastore(str(corpus), out, BuildConfig(model=str(tiny_model_dir), **BUILD), lm=tiny_lm)
    return out


@pytest.fixture
def built(built_once, tmp_path) -> Path:
    """A copy of the datastore this test may damage."""
    return Path(shutil.copytree(built_once, tmp_path / "ds"))


@pytest.fixture(scope="module")
def partial_once(tmp_path_factory, tiny_lm, tiny_model_dir, corpus) -> Path:
    """An interrupted build (OUT.partial/ with a checkpoint), as Ctrl-C leaves it."""
    out = tmp_path_factory.mktemp("partial") / "ds"
    blocks = []

    def crash(n):  # in the second block: the first is checkpointed
        blocks.append(n)
        if len(blocks) == 2:
            raise KeyboardInterrupt

    cfg = BuildConfig(model=str(tiny_model_dir), **BUILD)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(str(corpus), out, cfg, lm=tiny_lm, progress=crash)
    work = out.with_name("ds.partial")
    assert json.loads((work / "progress.json").read_text())["rows"] > 0
    return work


def resume_args(corpus, out, tiny_model_dir):
    """The command line that resumes the build of partial_once into out."""
    return ["build-datastore", corpus, "--out", out, "--model", tiny_model_dir, "--resume", "--context", 64,
            "--stride", 32, "--holdout", 0.2, "--glob", "*.txt", "--max-tokens", 6000]


# 1. Valid JSON ---------------------------------------------------------------------------------------------------

def test_json_safe_turns_non_finite_numbers_into_null_everywhere():
    obj = {"a": float("inf"), "b": [np.float32("nan"), {"c": -np.inf, "d": np.float64(2.5)}], "e": np.int64(3),
           "f": (1.5, np.array([1.0, np.inf])), "g": "Infinity", "h": None, "i": True, "j": np.bool_(False)}
    got = json_safe(obj)
    assert got == {"a": None, "b": [None, {"c": None, "d": 2.5}], "e": 3, "f": [1.5, [1.0, None]],
                   "g": "Infinity", "h": None, "i": True, "j": False}
    assert type(got["e"]) is int and type(got["j"]) is bool
    strict_loads(json.dumps(got, allow_nan=False))


def test_write_json_and_print_json_are_strict(tmp_path, capsys):
    from knnlm.cli.common import print_json

    obj = {"knn_only_ppl": float("inf"), "nested": [{"x": np.float32("nan")}], "ok": np.float64(1.25)}
    write_json(tmp_path / "r.json", obj)
    assert strict_loads((tmp_path / "r.json").read_text()) == {"knn_only_ppl": None, "nested": [{"x": None}],
                                                               "ok": 1.25}
    print_json({**obj, "path": tmp_path})
    out = strict_loads(capsys.readouterr().out)
    assert out["knn_only_ppl"] is None and out["nested"] == [{"x": None}] and out["path"] == str(tmp_path)


def test_eval_json_is_strict_when_the_knn_alone_is_infinite(built):
    # k = 1: most targets have no neighbour with their value, so the kNN-only perplexity is infinite.
    r = invoke("eval", "--datastore", built, "--k", 1, "--lambda", 0.25, "--json")
    assert r.exit_code == 0, r.output
    out = strict_loads(r.stdout)
    assert out["knn_only_ppl"] is None and out["target_in_neighbors"] < 1  # inf became null


# 2. One sentence for every bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_index_faiss(built, damage):
    path = built / "index.faiss"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not an index" * 50, "empty": b""}[damage])
    refused(invoke("eval", "--datastore", built, "--k", 4), "index.faiss", "damaged", "train-index")
    with pytest.raises(KNNLMError, match="damaged"):
        retrieval.Retriever(open_datastore(built))


@pytest.mark.parametrize("content", ["{\"kind\": \"exa", "[]", "{\"kind\": \"exact\"}", "\x00\x01"])
def test_damaged_index_json(built, content):
    (built / "index.json").write_text(content)
    refused(invoke("info", built), "index.json", "damaged", "train-index")
    refused(invoke("eval", "--datastore", built, "--k", 4), "index.json", "damaged")


@pytest.mark.parametrize("content", ["{\"split\": \"test\", \"na", "[1, 2]\n", "{\"split\": \"test\"}\n"])
def test_damaged_holdout(built, content):
    (built / "holdout.jsonl").write_text(content)
    refused(invoke("eval", "--datastore", built, "--k", 4), "holdout.jsonl", "damaged", "line 1")


@pytest.mark.parametrize("name,damage", [
    ("progress.json", "truncate"), ("progress.json", "fields"), ("progress.json", "missing_doc_start"),
    ("settings.json", "truncate"), ("settings.json", "delete"),
    ("docs.jsonl", "truncate"), ("docs.jsonl", "garbage"), ("holdout.jsonl", "truncate"), ("keys.npy", "truncate"),
])
def test_damaged_partial_build(partial_once, tmp_path, corpus, tiny_model_dir, name, damage):
    work = Path(shutil.copytree(partial_once, tmp_path / "ds.partial"))
    path = work / name
    data = path.read_bytes()
    state = json.loads((work / "progress.json").read_text())
    # What the checkpoint counts on (the rest, written after it, is cut off when resuming anyway).
    needed = {"docs.jsonl": state["docs_bytes"], "holdout.jsonl": state["holdout_bytes"],
              "keys.npy": 128 + state["rows"] * 32 * 2}.get(name, len(data))
    assert 0 < needed <= len(data)
    if damage == "truncate":
        path.write_bytes(data[: needed // 2])
    elif damage == "delete":
        path.unlink()
    elif damage == "fields":
        path.write_text(json.dumps({"seq": "three"}))
    elif damage == "missing_doc_start":
        state = json.loads(data)
        state.pop("doc_start")
        state["window"] = max(1, state["window"])
        path.write_text(json.dumps(state))
    else:  # garbage of the same length: the checkpoint's byte counts still hold
        path.write_bytes(b"#" * len(data))
    msg = refused(invoke(*resume_args(corpus, tmp_path / "ds", tiny_model_dir)), "damaged", name, "--overwrite")
    assert str(work) in msg
    assert not (tmp_path / "ds").exists()


def test_undamaged_partial_build_resumes(partial_once, tmp_path, corpus, tiny_model_dir, built_once):
    shutil.copytree(partial_once, tmp_path / "ds.partial")
    r = invoke(*resume_args(corpus, tmp_path / "ds", tiny_model_dir))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ds" / "keys.npy").read_bytes() == (built_once / "keys.npy").read_bytes()


@pytest.fixture
def no_lm_pass(monkeypatch):
    """Fails the test if a build gets as far as loading the model."""
    def load_lm(*_a, **_k):
        raise AssertionError("the build loaded the model before refusing its settings")
    monkeypatch.setattr(knnlm.build, "load_lm", load_lm)


@pytest.mark.parametrize("flags,words", [
    (["--code-size", 0], ["--code-size 0"]),
    (["--code-size", -3], ["--code-size -3"]),
    (["--nlist", 0], ["--nlist 0"]),
    (["--train-size", 100], ["--train-size 100", "256"]),
    (["--train-size", 0], ["--train-size 0"]),
    (["--nlist", 1024, "--train-size", 600], ["--train-size 600", "1024"]),
    # Up to a million keys choose nlist 2048: 300 training keys could never train it.
    (["--max-tokens", 1_000_000, "--train-size", 300], ["--train-size 300", "2048", "--max-tokens"]),
    (["--batch-size", 0], ["--batch-size 0"]),
    (["--max-tokens", 0], ["--max-tokens 0"]),
    (["--max-tokens", -5], ["--max-tokens -5"]),
    (["--holdout", 0.5], ["--holdout"]),
])
def test_bad_build_settings_are_refused_before_the_lm_pass(corpus, no_lm_pass, flags, words):
    refused(invoke("build-datastore", corpus, "--model", "unused", "--out", "ds", *flags), *words)
    assert not Path("ds").exists() and not Path("ds.partial").exists()


def test_train_size_is_fine_with_exact_or_a_small_cap():
    # --exact ignores the training sample; 20k keys at most choose nlist 256, which 300 keys can train.
    BuildConfig(index=IndexConfig(exact=True, train_size=10))
    BuildConfig(max_tokens=20_000, index=IndexConfig(train_size=300))
    BuildConfig(max_tokens=20_000, build_index=False, index=IndexConfig(nlist=4096, train_size=5000))


@pytest.mark.parametrize("flags,words", [
    (["--code-size", 0], ["--code-size 0"]),
    (["--train-size", 200], ["--train-size 200", "256"]),
    (["--nlist", 4096, "--train-size", 1000], ["--train-size 1000", "4096"]),
    # an --nlist the keys cannot train is refused, not silently replaced by an exact index
    (["--nlist", 100_000], ["--nlist 100000", "leave out --nlist"]),
    (["--factory", "IVFbanana,PQ99"], ["--factory 'IVFbanana,PQ99'"]),
])
def test_bad_index_settings_are_refused(built, flags, words):
    before = (built / "index.faiss").read_bytes()
    r = invoke("train-index", built, *flags)
    refused(r, *words)
    assert "adding keys" not in r.output  # refused before the progress bar starts
    assert (built / "index.faiss").read_bytes() == before


def test_an_nlist_too_large_for_the_keys_is_refused():
    with pytest.raises(KNNLMError, match=r"--nlist 1024 needs at least 39936 keys .* has 20000 keys: pass --nlist "
                                         r"512 or less, or leave it out"):
        IndexConfig(nlist=1024).check_count(20_000)
    IndexConfig(nlist=512).check_count(20_000)  # 19,968 keys train 512 lists
    IndexConfig(nlist=1024, exact=True).check_count(20_000)  # --exact asks for no lists
    with pytest.raises(KNNLMError, match=r"--nlist 1024 needs .* --max-tokens allows at most 20000 keys: .*, a larger "
                                         r"--max-tokens, or"):
        BuildConfig(max_tokens=20_000, index=IndexConfig(nlist=1024))  # refused before the build starts
    BuildConfig(max_tokens=20_000, build_index=False, index=IndexConfig(nlist=1024))  # no index: nothing to train


def test_train_size_below_the_chosen_nlist_is_refused_before_training(tmp_path):
    ds = open_datastore(make_datastore(tmp_path / "syn", clustered(40_000, 8), np.zeros(40_000)))
    # 40k keys choose nlist 512; faiss would fail on 300 training keys (after sampling and reading them).
    with pytest.raises(KNNLMError, match="--train-size 300 .* at least 512"):
        train_index(ds, IndexConfig(train_size=300))
    assert not (ds.path / "index.faiss").exists() and not (ds.path / "index.json").exists()


def test_train_index_refuses_an_nlist_its_keys_cannot_train(tmp_path, caplog):
    # The API as the CLI: refused, not an exact index in its place; only a build (which could not know its size
    # when it began) falls back, with a warning.
    ds = open_datastore(make_datastore(tmp_path / "syn", clustered(12_000, 8), np.zeros(12_000)))
    with pytest.raises(KNNLMError, match=r"--nlist 4096 needs at least 159744 keys .* has 12000 keys: pass --nlist "
                                         r"307 or less"):
        train_index(ds, IndexConfig(nlist=4096))
    assert not (ds.path / "index.faiss").exists()
    with caplog.at_level("WARNING", logger="knnlm.index"):
        assert train_index(ds, IndexConfig(nlist=4096), fallback=True)["factory"] == "Flat"
    assert any("exact (flat) index: trained over 12000 keys, too few" in r.getMessage() for r in caplog.records)


def test_few_lists_still_get_enough_training_keys(tmp_path, capfd):
    # 64·nlist keys would be 128 for nlist 2, too few for PQ's 256 centroids; the default keeps 256.
    ds = open_datastore(make_datastore(tmp_path / "syn", clustered(12_000, 8), np.zeros(12_000)))
    info = train_index(ds, IndexConfig(nlist=2, code_size=4))
    assert info["factory"] == "IVF2,PQ4" and info["train_size"] == 256
    # 256 points for 256 codewords is the sample chosen: no faiss warning for each of the 4 sub-quantizers
    assert "WARNING clustering" not in capfd.readouterr().err


def test_index_failure_in_a_build_keeps_the_keys_for_resume(corpus, tiny_lm, tiny_model_dir, monkeypatch, tmp_path):
    def broken(*_a, **_k):
        raise KNNLMError("Index settings are impossible.")
    monkeypatch.setattr(knnlm.build, "train_index", broken)
    cfg = BuildConfig(model=str(tiny_model_dir), **{**BUILD, "max_tokens": 500})
    with pytest.raises(KNNLMError, match="--resume"):
        build_datastore(str(corpus), tmp_path / "ds", cfg, lm=tiny_lm)
    monkeypatch.undo()
    ds = build_datastore(str(corpus), tmp_path / "ds", BuildConfig(**{**cfg.__dict__, "resume": True}), lm=tiny_lm)
    assert ds.count == 500 and (ds.path / "index.faiss").exists()


# 3. One implementation each --------------------------------------------------------------------------------------

def test_atomic_path_writes_whole_files_or_nothing(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and not tmp.exists()
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    synced.clear()
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.bin"]
    assert str(tmp) in synced and str(tmp_path) in synced  # the file before the rename, its folder after


def test_atomic_path_replaces_directories(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "broken").write_text("x")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")
            raise ValueError("save failed")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["broken"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["config.json"]


def test_a_failed_index_write_leaves_no_temporary_file(built, monkeypatch):
    import faiss

    def fail(index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    before = sorted(os.listdir(built))
    monkeypatch.setattr(faiss, "write_index", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        train_index(open_datastore(built), IndexConfig(exact=True))
    assert sorted(os.listdir(built)) == before


def test_default_datastore_and_glob_have_one_home(monkeypatch):
    from knnlm.cli.build import build_datastore_cmd, train_index_cmd
    from knnlm.cli.common import datastore_option
    from knnlm.cli.info import info_cmd

    params = {p.name: p for p in build_datastore_cmd.params}
    assert params["glob"].default == DEFAULT_GLOB == BuildConfig().glob
    assert open_corpus.__defaults__[0] == DEFAULT_GLOB
    for p in (params["out"], *train_index_cmd.params[:1], *info_cmd.params[:1],
              datastore_option(lambda datastore: None).__click_params__[0]):
        assert p.default == DEFAULT_DATASTORE and p.envvar == "KNNLM_DATASTORE", p.name
    assert datastore_path(None) == Path(DEFAULT_DATASTORE)
    monkeypatch.setenv("KNNLM_DATASTORE", "elsewhere")
    assert datastore_path(None) == Path("elsewhere")


def _reference_owned(lm, ids, w: Window, logits: bool):
    """Keys and logits of one window's owned rows, from a forward pass over that window alone."""
    x = torch.tensor([ids[w.begin: w.end]])
    keys, out = lm.forward(x, torch.ones_like(x), logits=logits)
    lo, hi = w.own_from - w.begin, w.own_to - w.begin
    return keys[0, lo:hi], (out[0, lo:hi] if logits else None)


@pytest.mark.parametrize("logits", [True, False])
def test_forward_owned_matches_one_window_at_a_time(tiny_lm, corpus_texts, logits):
    docs = [tiny_lm.encode(corpus_texts[n])[:n_tok] for n, n_tok in (("bisect.py", 300), ("keyword.py", 77))]
    work = [(w, ids[w.begin: w.end]) for d, ids in enumerate(docs) for w in plan_windows(d, len(ids), 64, 24)]
    seen = []
    for batch in forward_owned(tiny_lm, work, batch_size=3, logits=logits):
        assert 1 <= len(batch) <= 3
        for o in batch:
            w = work[o.item][0]
            assert o.window == w
            ref_keys, ref_logits = _reference_owned(tiny_lm, docs[w.doc], w, logits)
            assert o.keys.shape == (w.own_to - w.own_from, tiny_lm.dim) and o.keys.dtype == torch.float32
            torch.testing.assert_close(o.keys, ref_keys, rtol=1e-4, atol=1e-4)
            if logits:
                assert o.logits.shape == (len(o.keys), tiny_lm.vocab_size)
                torch.testing.assert_close(o.logits, ref_logits, rtol=1e-4, atol=1e-4)
            else:
                assert o.logits is None
            seen.append(o.item)
    assert sorted(seen) == list(range(len(work)))


# 4. Smaller correctness points -----------------------------------------------------------------------------------

def test_every_planned_window_owns_a_position():
    for context in range(2, 13):
        for stride in range(1, context + 1):
            for n in range(0, 60):
                windows = plan_windows(3, n, context, stride)
                owned = np.zeros(max(n - 1, 0), dtype=int)
                for i, w in enumerate(windows):
                    assert w.index == i and w.doc == 3
                    assert w.own_to > w.own_from, (n, context, stride, w)
                    assert w.begin <= w.own_from and w.own_to <= w.end <= n and w.end - w.begin <= context
                    owned[w.own_from: w.own_to] += 1
                assert (owned == 1).all(), (n, context, stride)
    # n − 1 on a window's end: the window ending at 8 owns positions up to 7, and nothing is left for another.
    assert [(w.begin, w.end, w.own_from, w.own_to) for w in plan_windows(0, 9, 8, 4)] == [(0, 8, 0, 8)]


def test_rerank_pool_is_made_once_under_concurrency(monkeypatch):
    made = []

    class SlowPool(retrieval.ThreadPoolExecutor):
        def __init__(self, *a, **k):
            time.sleep(0.05)  # widens the window in which an unlocked check-then-create races
            made.append(self)
            super().__init__(*a, **k)

    monkeypatch.setattr(retrieval, "ThreadPoolExecutor", SlowPool)
    monkeypatch.setattr(retrieval, "_POOL", {})
    got, start = [], threading.Barrier(8)

    def use():
        start.wait()
        got.append(retrieval._rerank_pool(3))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(made) == 1 and all(p is made[0] for p in got)
    finally:
        for p in made:
            p.shutdown()


def _distances_in_child(queue, q, keys, ids):
    got = retrieval.exact_distances(q, keys, ids)
    queue.put((got, len(retrieval._POOL)))


def test_rerank_works_in_a_forked_child(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # several re-rank threads, even on one core
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(2000, 16)).astype(np.float16)
    q = rng.normal(size=(256, 16)).astype(np.float32)
    ids = rng.integers(-1, 2000, size=(256, 120))  # 30,720 candidate rows: 3 workers' worth (RERANK_ROWS_PER_WORKER)
    monkeypatch.setattr(retrieval, "_POOL", {})
    expected = retrieval.exact_distances(q, keys, ids)  # the parent now holds a pool of 3 threads
    assert retrieval._POOL
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_distances_in_child, args=(queue, q, keys, ids))
    child.start()
    try:
        # With the parent's pool the child's jobs would wait forever; on threads of its own, torch fails
        # once the parent set its thread count ("Invalid thread pool!"): the child re-ranks in its own thread.
        got, child_pools = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    np.testing.assert_array_equal(got, expected)
    assert np.isinf(got[ids < 0]).all() and child_pools == 0


# 5. info ---------------------------------------------------------------------------------------------------------

def test_info_names_the_index_kind(built):
    r = invoke("info", built)
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("index"))
    assert "exact (Flat)" in line
    info = strict_loads(invoke("info", built, "--json").stdout)
    assert info["index"]["kind"] == "exact"


@pytest.mark.parametrize("make,words", [
    (lambda: BuildConfig(context="64"), r"^context takes an int, e.g. 512, not '64'"),
    (lambda: BuildConfig(batch_size=2.5), r"^batch_size takes an int"),
    (lambda: BuildConfig(max_tokens=float("inf")), r"^max_tokens takes None or an int"),
    (lambda: BuildConfig(holdout="0.1"), r"^holdout takes an int or float"),
    (lambda: BuildConfig(shuffle_seed="1"), r"^shuffle_seed takes None or an int"),
    (lambda: BuildConfig(index=None), r"^index takes an IndexConfig"),
    (lambda: BuildConfig(glob=3), r"^glob takes a str, e.g. '\*\*/\*.txt', not 3 \(int\)"),
    (lambda: BuildConfig(model=5), r"^model takes None or a str or PathLike"),
    (lambda: AddConfig(text_field=None), r"^text_field takes a str"),
    (lambda: AddConfig(fmt=1), r"^fmt takes a str"),
    (lambda: IndexConfig(nlist="8"), r"^nlist takes None or an int"),
    (lambda: IndexConfig(add_chunk=1.5), r"^add_chunk takes an int"),
    (lambda: IndexConfig(seed=-1), r"^--seed -1 must not be negative"),
    (lambda: TuneConfig(bins="32"), r"^bins takes an int"),
    (lambda: TuneConfig(temperatures=(float("nan"),)), r"^Temperatures must be finite, positive and increasing"),
    (lambda: TuneConfig(temperatures=(1.0, float("inf"))), r"^Temperatures must be finite"),
    (lambda: TuneConfig(temperatures="1,10"), r"^temperatures and lambdas take sequences of numbers"),
    (lambda: TuneConfig(skip_tolerance="0.1"), r"^skip_tolerance takes an int or float"),
    (lambda: EvalConfig(batch_size="4"), r"^batch_size takes an int"),
    (lambda: IndexConfig(factory="IVF4,Flat", nlist=16), r"^--nlist and --code-size shape the default index"),
    (lambda: IndexConfig(factory="IVF4,Flat", code_size=8), r"the --factory string 'IVF4,Flat' names its own"),
])
def test_configs_of_the_wrong_type_are_one_sentence(make, words):
    with pytest.raises(KNNLMError, match=words):
        make()


def test_configs_take_numpy_numbers():
    b = BuildConfig(context=np.int64(64), stride=np.int32(32), shuffle_seed=np.int64(1))
    assert (b.context, type(b.context), type(b.shuffle_seed)) == (64, int, int)  # plain values: json, random take them
    t = TuneConfig(temperatures=np.array([1.0, 10.0]), seed=np.int64(2))
    assert type(t.seed) is int and t.temperatures == (1.0, 10.0) and hash(t)
    assert TuneConfig(temperatures=10.0).temperatures == (10.0,)  # one number is a grid of one


def test_leftovers_of_killed_writes_go_with_the_next_write(tmp_path):
    """atomic_path's temporaries and replace_dir's set-aside folders are named for their process and machine: the
    next write of the same target removes those of processes that no longer run, and only those."""
    import subprocess
    import sys

    from knnlm.arrays import _HOST, replace_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "meta.json"
    names = {"dead": f".meta.json.tmp-{dead}-{_HOST}0badc0de", "alive": f".meta.json.tmp-{os.getpid()}-{_HOST}0badc0de",
             "elsewhere": f".meta.json.tmp-{dead}-{'f' * 8 if _HOST != 'f' * 8 else 'e' * 8}0badc0de",  # a machine
             "other file": f".other.json.tmp-{dead}-{_HOST}0badc0de"}
    for name in names.values():
        (tmp_path / name).write_text("{")
    write_json(target, {"a": 1})
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left and {names["alive"], names["elsewhere"], names["other file"]} <= left
    # a datastore set aside by an --overwrite killed between its two renames goes once a new one is in place
    (tmp_path / "ds").mkdir()
    old = tmp_path / f".ds.old-{dead}-{_HOST}0badc0de"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    new = tmp_path / "new"
    new.mkdir()
    replace_dir(new, tmp_path / "ds")
    assert not old.exists() and not any(n.startswith(".ds.old-") for n in os.listdir(tmp_path))


def test_a_datastore_set_aside_by_an_interrupted_replacement_is_named(tmp_path):
    (tmp_path / "ds.partial").mkdir()
    (tmp_path / "ds.partial" / "meta.json").write_text("{}")  # the new datastore, whole, not yet moved in
    kept = tmp_path / ".ds.old-1-abcd0badc0de"
    kept.mkdir()
    with pytest.raises(KNNLMError, match=r"a build replacing it was interrupted: --resume finishes it, or move .*"
                                         r"\.ds\.old-1-abcd0badc0de back to .*ds to keep the old one"):
        open_datastore(tmp_path / "ds")


def test_tune_lambda_refuses_a_datastore_it_cannot_write_before_scoring(built, monkeypatch):
    import knnlm.arrays

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(knnlm.arrays, "try_create", refused)
    r = invoke("tune-lambda", "--datastore", built, "--no-plot")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "cannot be written (Permission denied), and this command writes there" in r.output
    assert not (built / "dev-scores.h5").exists() and not (built / "lambda.json").exists()


def test_a_file_the_machine_refuses_to_write_is_one_sentence(built, monkeypatch, tmp_path):
    """What no check can foresee (a folder made read-only meanwhile, a full disk) ends in one sentence, no traceback."""
    import errno

    import h5py

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s.h5"))

    monkeypatch.setattr(h5py, "File", full)
    r = invoke("eval", "--datastore", built, "--save-scores", tmp_path / "s.h5", "--exact")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (f"Error: {tmp_path / 's.h5'}: No space left on device; free some "
                                                 "space, or write elsewhere (files being written were left as they "
                                                 "were).")


def test_a_full_disk_under_an_index_write_is_one_sentence(built, monkeypatch):
    """faiss reports a failed write as a RuntimeError; it reaches the command line as the OSError it is."""
    import faiss

    def full(index, path):
        raise RuntimeError(f"Error: 'ret == (n)' failed: write error in {path}: 0 != 1 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full)
    r = invoke("train-index", built, "--exact")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].endswith("index.faiss: No space left on device; free some space, or write "
                                                       "elsewhere (files being written were left as they were).")
    assert not (built / ".pending").exists() and open_datastore(built).count > 0  # the old index stays


def test_a_model_whose_positions_see_later_tokens_is_refused(tiny_lm, tmp_path):
    """PaliGemma without token_type_ids attends both ways over its input (a prefix-LM): its keys would hold the text
    after them (before: accepted silently, its kNN-LM perplexity far too good). Build, eval, generation and
    attention memory each refuse it in one sentence; the causal models pass the same probe."""
    from copy import deepcopy as copy_module

    import transformers

    from knnlm.lm import LM, QueryHook, load_lm
    from knnlm.memory.attention import AttentionMemoryConfig, attached

    n = len(tiny_lm.tokenizer)
    text = dict(vocab_size=n + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, eos_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=32)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=n + 1, projection_dim=32)).eval()
    lm = LM(model=model, tokenizer=tiny_lm.tokenizer, name="paligemma", device="cpu")
    ids = torch.tensor([lm.encode("import os\n")])
    words = "lets a position see later tokens"
    with pytest.raises(KNNLMError, match=words):
        lm.forward(ids, torch.ones_like(ids))
    with pytest.raises(KNNLMError, match=words):  # every decoding processor's hook (a datastore's would be refused
        QueryHook(lm)  # first as another model's; a document memory's processor has none)
    with pytest.raises(KNNLMError, match=words):
        with attached(lm, AttentionMemoryConfig(k=8)):
            pass
    assert not model.config._attn_implementation.startswith("knnlm")  # the memory never attached
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the causal model of every other test, probed
        copy = LM(model=copy_module(tiny_lm.model).to(dtype), tokenizer=tiny_lm.tokenizer, name="tiny", device="cpu")
        copy.check_causal()  # afresh (tiny_lm itself was probed by whichever test ran first), in each dtype
        assert copy._causal is True
    # by directory it is not loaded at all: AutoModelForCausalLM has no class for it (before: "it needs config.json,
    # weights and a tokenizer", which the directory has)
    model.save_pretrained(tmp_path / "paligemma")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "paligemma")
    with pytest.raises(KNNLMError, match="does not load its model type 'paligemma'"):
        load_lm(str(tmp_path / "paligemma"), device="cpu")


def test_a_write_told_not_to_overwrite_refuses_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    """Two commands writing one new file without --overwrite both passed the check made before their work, and the
    later replaced the earlier, silently. The exclusive write puts a file in place only where none is, and the loser
    says so, its temporary removed; where the file system has no hard links the check at the write stands."""
    path = tmp_path / "scores.h5"
    with atomic_path(path, exclusive=True) as tmp:
        tmp.write_text("first")
    assert path.read_text() == "first"
    with pytest.raises(KNNLMError, match="written by another process while this one ran; pass --overwrite"):
        with atomic_path(path, exclusive=True) as tmp:
            tmp.write_text("second")
    assert path.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.h5"]
    with atomic_path(path) as tmp:  # with --overwrite: replaced
        tmp.write_text("third")
    assert path.read_text() == "third"

    def no_links(*_a):
        raise PermissionError("no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    with atomic_path(tmp_path / "new.h5", exclusive=True) as tmp:
        tmp.write_text("fresh")
    assert (tmp_path / "new.h5").read_text() == "fresh"
    with pytest.raises(KNNLMError, match="written by another process"):
        with atomic_path(tmp_path / "new.h5", exclusive=True) as tmp:
            tmp.write_text("again")
    assert (tmp_path / "new.h5").read_text() == "fresh" and len(list(tmp_path.iterdir())) == 2
