"""Building a datastore: key/value alignment, window coverage, resume, index recall."""

from __future__ import annotations


import faiss
import numpy as np
import pytest
import torch

from helpers import clustered, make_datastore
from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.index import IndexConfig, choose_params, train_index
from knnlm.arrays import sort_rows
from knnlm.retrieval import RetrievalConfig, Retriever, partial_rerank, sort_partial_rerank
from knnlm.windows import plan_windows


def test_key_is_the_input_of_lm_head(tiny_lm):
    ids = torch.tensor([tiny_lm.encode("def wrap(text, width=70):\n    return text")])
    keys, logits = tiny_lm.forward(ids, torch.ones_like(ids), logits=True)
    head = tiny_lm.model.get_output_embeddings()
    with torch.no_grad():
        assert torch.allclose(head(keys), logits, atol=1e-5)
        assert torch.allclose(tiny_lm.model(ids).logits, logits, atol=1e-5)
    keys_only, none = tiny_lm.forward(ids, torch.ones_like(ids), logits=False)
    assert none is None and torch.equal(keys_only, keys)


@pytest.mark.parametrize("n,context,stride", [(1, 8, 4), (2, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4),
                                              (100, 8, 4), (100, 8, 8), (100, 8, 1), (100, 16, 5), (33, 4, 3)])
def test_windows_own_every_position_once(n, context, stride):
    owned = np.zeros(max(n - 1, 0), dtype=int)
    for w in plan_windows(0, n, context, stride):
        assert w.end - w.begin <= context
        assert w.begin <= w.own_from <= w.own_to <= w.end
        owned[w.own_from: w.own_to] += 1
        if w.index > 0:  # positions of later windows keep context − stride tokens before them
            assert w.own_from - w.begin >= context - stride
    assert (owned == 1).all()


def _reference_key(lm, ids, p, context, stride):
    """Key of position p computed alone, with the window start derived independently of plan_windows."""
    b = 0 if p < context else ((p - context) // stride + 1) * stride
    x = torch.tensor([ids[b: p + 1]])
    return lm.forward(x, torch.ones_like(x), logits=False)[0][0, -1].numpy()


@pytest.mark.parametrize("context,stride", [(512, 256), (64, 32), (48, 48)])
def test_keys_and_values_align(tiny_lm, tiny_model_dir, corpus_dir, context, stride):
    cfg = BuildConfig(model=str(tiny_model_dir), context=context, stride=stride, holdout=0.0, batch_size=3,
                      glob="*.txt", build_index=False)
    ds = build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)
    assert ds.keys.dtype == np.float16 and ds.vals.dtype == np.int32
    total = 0
    rng = np.random.default_rng(0)
    for name, start, count, first in ds.documents:
        ids = tiny_lm.encode(open(name).read())
        assert count == len(ids) - 1 and first == ids[0]
        assert np.array_equal(ds.vals[start: start + count], ids[1:])  # vals[i] is the token after key i's
        for p in rng.choice(count, size=min(count, 12), replace=False):
            ref = _reference_key(tiny_lm, ids, int(p), context, stride)
            np.testing.assert_allclose(ds.keys[start + p], ref, rtol=2e-3, atol=2e-3)
        total += count
    assert total == ds.count


def _build_killed_in(monkeypatch, name: str, *args, **kwargs) -> None:
    """build_datastore(*args, **kwargs) killed (KeyboardInterrupt) where it calls knnlm.build's function `name`."""
    import knnlm.build

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(knnlm.build, name, killed)
        with pytest.raises(KeyboardInterrupt):
            build_datastore(*args, **kwargs)


def test_a_second_build_of_a_datastore_is_refused_while_one_runs(tiny_lm, tiny_model_dir, corpus_dir, tmp_path,
                                                                  monkeypatch):
    """Two builds writing one OUT.partial doubled its document table: a build holds its work folder until it ends
    (a killed one's hold ends with its process), and a second one, resumed, restarted or sharded, is refused."""
    import subprocess
    import sys

    from knnlm.datastore import partial_dir
    from knnlm.scale import ShardConfig, build_sharded

    out = tmp_path / "ds"
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", build_index=False,
                      max_tokens=2_000)
    work = partial_dir(out)
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_CREAT | os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); "
                               "time.sleep(120)", str(work / ".lock")], stdout=subprocess.PIPE, text=True)
    import knnlm.build

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the refusal")

    try:
        assert holder.stdout.readline().strip() == "1"  # the other build holds it
        with monkeypatch.context() as m:
            m.setattr(knnlm.build, "load_lm", no_model)  # refused before any model is loaded
            for kw in ({}, {"resume": True}, {"overwrite": True}):
                with pytest.raises(KNNLMError, match=rf"^Another build of {out} is running \(it holds {work}\); "
                                                     r"wait for it to finish, or build into another --out\.$"):
                    build_datastore(str(corpus_dir), out, BuildConfig(**{**cfg.__dict__, **kw}))
            with pytest.raises(KNNLMError, match="^Another build of"):
                build_sharded(str(corpus_dir), out, cfg, ShardConfig(shards=2))
        assert sorted(p.name for p in work.iterdir()) == [".lock"] and not out.exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    ds = build_datastore(str(corpus_dir), out, cfg, lm=tiny_lm)  # its process gone: the build goes ahead
    assert ds.count == 2_000 and not work.exists()


def test_a_build_killed_while_training_its_index_is_not_taken_for_a_datastore(tiny_lm, tiny_model_dir, corpus_dir,
                                                                              tmp_path, monkeypatch):
    """meta.json is written into OUT.partial before the index is trained: killed then, the folder is an interrupted
    build that --resume finishes, not a datastore that eval, neighbors or info read."""
    from click.testing import CliRunner

    from knnlm.cli.main import cli
    from knnlm.datastore import partial_dir

    out = tmp_path / "ds"
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", max_tokens=2_000,
                      index=IndexConfig(exact=True))

    _build_killed_in(monkeypatch, "train_index", str(corpus_dir), out, cfg, lm=tiny_lm)
    work = partial_dir(out)
    assert (work / "meta.json").exists() and not out.exists()
    sentence = (rf"^{work} is an interrupted build of {out} \(or one still running\), not a datastore; once no "
                rf"build of {out} runs, finish it with `knnlm build-datastore CORPUS --out {out} --resume` \(the same "
                r"corpus and settings\), or remove it\.$")
    with pytest.raises(KNNLMError, match=sentence):
        open_datastore(work)
    for command in (["info", str(work)], ["eval", "-d", str(work), "--exact"], ["neighbors", "-d", str(work),
                                                                                  "--exact", "def f(x):"]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 1 and "Traceback" not in r.output and "is an interrupted build of" in r.output, command
    ds = build_datastore(str(corpus_dir), out, BuildConfig(**{**cfg.__dict__, "resume": True}), lm=tiny_lm)
    assert ds.count == 2_000 and (out / "index.faiss").exists() and not work.exists()


def test_a_datastore_named_partial_killed_after_its_last_move_opens(tiny_lm, tiny_model_dir, corpus_dir, tmp_path,
                                                                    monkeypatch):
    """A build's bookkeeping leaves its work folder before the folder becomes the datastore: killed right after that
    move, a datastore whose own name ends in .partial is still a datastore, holding none of it."""
    import knnlm.build

    real = knnlm.build.replace_dir

    def moved_then_killed(work, out):
        real(work, out)
        raise KeyboardInterrupt

    monkeypatch.setattr(knnlm.build, "replace_dir", moved_then_killed)
    out = tmp_path / "ds.partial"
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", build_index=False,
                      max_tokens=2_000)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(str(corpus_dir), out, cfg, lm=tiny_lm)
    assert open_datastore(out).count == 2_000
    assert not [p.name for p in out.iterdir() if p.name in ("settings.json", "progress.json", "docs.jsonl")]


def test_a_build_killed_between_its_last_step_and_its_move_is_moved_by_resume(tiny_lm, tiny_model_dir, corpus_dir,
                                                                              tmp_path, monkeypatch):
    """Killed after its bookkeeping went but before the move, the work folder is a whole datastore: --resume moves it
    in with no LM pass (where its meta.json says it was this build's), and it equals an uninterrupted build."""
    import knnlm.build
    from knnlm.datastore import partial_dir

    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", max_tokens=2_000,
                      index=IndexConfig(exact=True))
    whole = build_datastore(str(corpus_dir), tmp_path / "whole", cfg, lm=tiny_lm)
    out = tmp_path / "ds"

    _build_killed_in(monkeypatch, "replace_dir", str(corpus_dir), out, cfg, lm=tiny_lm)
    work = partial_dir(out)
    assert (work / "index.faiss").exists() and not (work / "settings.json").exists()

    def no_pass(*_args, **_kwargs):
        raise AssertionError("an LM pass ran: only the move is left")

    monkeypatch.setattr(knnlm.build, "_fill", no_pass)
    with pytest.raises(KNNLMError, match=r"^The finished build in .* used other settings: --max-tokens; pass the "
                                         r"same ones to --resume, or --overwrite to start over\.$"):
        build_datastore(str(corpus_dir), out, BuildConfig(**{**cfg.__dict__, "resume": True, "max_tokens": 1_000}),
                        lm=tiny_lm)  # another build's (an add of other documents would start afresh)
    ds = build_datastore(str(corpus_dir), out, BuildConfig(**{**cfg.__dict__, "resume": True}), lm=tiny_lm)
    assert not work.exists() and ds.documents == whole.documents
    assert np.array_equal(np.asarray(ds.keys), np.asarray(whole.keys))


def test_a_work_folder_holding_only_its_lock_is_no_build_to_resume(tmp_path):
    """A build killed as it took its lock leaves DIR.partial/.lock alone: nothing to resume, and readers say so."""
    from knnlm.datastore import partial_dir

    work = partial_dir(tmp_path / "ds")
    work.mkdir()
    (work / ".lock").touch()
    with pytest.raises(KNNLMError, match=r"does not exist; build one") as e:
        open_datastore(tmp_path / "ds")
    assert "--resume" not in str(e.value)
    (work / "progress.json").write_text("{}")
    with pytest.raises(KNNLMError, match=r"an interrupted build can be continued with --resume"):
        open_datastore(tmp_path / "ds")


def test_a_lock_of_a_folder_moved_away_is_not_the_build_s(tiny_lm, tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    """A build that took the lock of a work folder another build had just moved or removed holds nothing: refused."""
    from knnlm import journal

    d = tmp_path / "d"
    d.mkdir()
    with journal.hold(d):
        assert journal.holds_current_lock(d)
        (d / journal.LOCK).rename(d / "moved")
        (d / journal.LOCK).touch()  # the folder's lock now: another file
        assert not journal.holds_current_lock(d)
    monkeypatch.setattr(journal, "holds_current_lock", lambda _root: False)
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", build_index=False,
                      max_tokens=2_000)
    with pytest.raises(KNNLMError, match="^Another build of"):
        build_datastore(str(corpus_dir), tmp_path / "ds", cfg, lm=tiny_lm)


def test_resume_gives_identical_arrays(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0.2, batch_size=2,
                      block_windows=8, glob="*.txt", build_index=False, max_tokens=6_000)
    whole = build_datastore(str(corpus_dir), "whole", cfg, lm=tiny_lm)
    assert whole.count == 6_000
    seen = []

    def crash(n):
        seen.append(n)
        if sum(seen) > whole.count // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_datastore(str(corpus_dir), "resumed", cfg, lm=tiny_lm, progress=crash)
    from pathlib import Path

    assert Path("resumed.partial/progress.json").exists() and not Path("resumed").exists()
    with pytest.raises(Exception, match="--resume"):
        build_datastore(str(corpus_dir), "resumed", cfg, lm=tiny_lm)
    # Resumed with other settings: refused, naming each that differs.
    other = BuildConfig(**{**cfg.__dict__, "resume": True, "context": 48, "max_tokens": 5_000})
    with pytest.raises(KNNLMError, match=r"used other settings: --context \(64 then, 48 now\), --max-tokens \(6000 "
                                         r"then, 5000 now\); pass the same ones to --resume"):
        build_datastore(str(corpus_dir), "resumed", other, lm=tiny_lm)
    again = build_datastore(str(corpus_dir), "resumed", BuildConfig(**{**cfg.__dict__, "resume": True}), lm=tiny_lm)
    assert np.array_equal(np.asarray(again.keys), np.asarray(whole.keys))
    assert np.array_equal(np.asarray(again.vals), np.asarray(whole.vals))
    assert again.documents == whole.documents
    assert again.heldout("dev") == whole.heldout("dev") and again.heldout("test") == whole.heldout("test")


def test_files_that_appear_at_out_during_a_build_are_kept(tiny_lm, tiny_model_dir, corpus_dir, tmp_path):
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", build_index=False,
                      max_tokens=2_000)
    out = tmp_path / "ds"

    def meanwhile(_n):  # somebody puts a file where the datastore is to go
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("keep me")

    with pytest.raises(KNNLMError, match=r"holds files no datastore holds \(notes.txt\).* rerun with --resume"):
        build_datastore(str(corpus_dir), out, cfg, lm=tiny_lm, progress=meanwhile)
    assert (out / "notes.txt").read_text() == "keep me" and sorted(out.iterdir()) == [out / "notes.txt"]
    (out / "notes.txt").unlink()  # cleared: the kept build finishes without running the model again
    done = build_datastore(str(corpus_dir), out, BuildConfig(**{**cfg.__dict__, "resume": True}), lm=None)
    assert done.count == 2_000 and not tmp_path.joinpath("ds.partial").exists()


def test_holdout_never_enters_the_datastore(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0.2, glob="*.txt",
                      build_index=False)
    ds = build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)
    stored = {d[0] for d in ds.documents}
    dev, test = ds.heldout("dev"), ds.heldout("test")
    assert dev and test
    held = {n for n, _ in dev + test}
    assert not stored & held
    assert len(stored) + len(held) == 7


def test_single_document_holds_out_its_tail(tiny_lm, tiny_model_dir, corpus_texts, tmp_path):
    text = corpus_texts["textwrap.py"]
    (tmp_path / "one.txt").write_text(text)
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0.1, build_index=False)
    ds = build_datastore(str(tmp_path / "one.txt"), "ds", cfg, lm=tiny_lm)
    (_, dev), = ds.heldout("dev")
    (_, test), = ds.heldout("test")
    assert text.endswith(dev + test)
    assert 0.05 < len(test) / len(text) < 0.15
    stored_tokens = 1 + ds.count
    assert stored_tokens == len(tiny_lm.encode(text[: len(text) - len(dev) - len(test)]))


def test_max_tokens_cuts_the_last_document(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0.0, glob="*.txt",
                      max_tokens=5000, build_index=False)
    ds = build_datastore(str(corpus_dir), "ds", cfg, lm=tiny_lm)
    name, start, count, _ = ds.documents[-1]
    assert ds.count == 5000 and start + count == 5000
    assert np.array_equal(ds.vals[start:], tiny_lm.encode(open(name).read())[1: count + 1])


@pytest.mark.parametrize("fast_scan", [False, True])
def test_ivfpq_recall_against_exact_search(tmp_path, fast_scan):
    """IVF-PQ with nprobe 16 finds ≥ 60% of the exact top-10; re-ranking 100 candidates lifts that to ≥ 95%.
    --fast-scan's 4-bit codes are coarser (here 8 codes of 4 bits: 4 bytes a key): re-ranking eval's 1000
    candidates lifts them to ≥ 95%."""
    keys = clustered(20_000, 32, seed=1)
    ds = open_datastore(make_datastore(tmp_path / "syn", keys, np.arange(len(keys)) % 100))
    info = train_index(ds, IndexConfig(code_size=8, fast_scan=fast_scan))
    assert info["kind"] == "ivfpq" and info["factory"] == ("IVF256,PQ8x4fs" if fast_scan else "IVF256,PQ8")
    queries = clustered(300, 32, seed=2)
    exact = faiss.IndexFlatL2(32)
    exact.add(np.asarray(ds.keys, dtype=np.float32))
    _, ref = exact.search(queries, 10)

    def recall(ids):
        return np.mean([len(set(a[:10]) & set(b)) / 10 for a, b in zip(ids, ref)])

    _, approx = Retriever(ds, RetrievalConfig(k=10, nprobe=16, rerank=False)).search(queries)
    _, reranked = Retriever(ds, RetrievalConfig(k=1000 if fast_scan else 100, nprobe=16,
                                                rerank=True)).search(queries)
    assert recall(approx) >= (0.03 if fast_scan else 0.6)
    assert recall(reranked) >= 0.95


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float64])
def test_row_order_is_numpys_stable_argsort(dtype):
    """Ties (stable: column order), infinities, -0.0 beside 0.0, negatives, subnormals; float64 falls back."""
    from knnlm.arrays import row_order

    a = np.random.default_rng(0).integers(-4, 4, size=(300, 257)).astype(dtype)
    if dtype != np.int32:
        a[0, :6] = [np.inf, -np.inf, 0.0, -0.0, 1e-42, -1e-42]  # 0.0 first: -0.0 must not pass it
        with np.errstate(invalid="ignore"):
            made = (np.inf * np.zeros(1, dtype))[0]  # the NaN an invalid operation makes (negative on x86)
        a[1, :4] = [np.nan, -np.nan, np.inf, made]  # NaNs of both signs: last, in column order
    else:
        a[0, :3] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max, -1]
    got = row_order(a)
    assert got.dtype == np.intp and np.array_equal(got, np.argsort(a, axis=1, kind="stable"))


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_sort_rows_puts_each_row_in_stable_order(rows):
    """One row (a decoding step: np.take) and several (take_along_axis) alike: numpy's stable order, shapes and dtypes kept."""
    rng = np.random.default_rng(rows)
    d = rng.integers(0, 20, (rows, 300)).astype(np.float32)  # ties
    d[0, :2] = [np.inf, np.nan]
    ids = rng.permutation(rows * 300).reshape(rows, 300).astype(np.int64)
    order = np.argsort(d, axis=1, kind="stable")
    got_d, got_i = sort_rows(d, ids)
    assert got_d.shape == d.shape and got_d.dtype == d.dtype and got_i.dtype == ids.dtype
    assert np.array_equal(got_d, np.take_along_axis(d, order, 1), equal_nan=True)
    assert np.array_equal(got_i, np.take_along_axis(ids, order, 1))
    assert sort_rows(np.zeros((1, 0), np.float32))[0].shape == (1, 0)


@pytest.mark.parametrize("span", [2, 49_153, 1 << 22, (1 << 22) + 1], ids=["few", "tokens", "widest-narrow", "wide"])
def test_row_order_of_token_ids_sorts_narrow_keys_the_same(span):
    """int32 values whose range fits beside the column number in 32 bits (1000 columns: 2^22 values) take
    uint32 keys; one more value takes the 64-bit keys. Either way numpy's stable argsort, also at the range's ends."""
    from knnlm.arrays import row_order

    rng = np.random.default_rng(span)
    a = (rng.integers(0, span, size=(64, 1000)) - 1).astype(np.int32)  # -1 (a missing neighbour) and up
    a[0, :2] = [-1, span - 2]  # both ends of the range
    a[1] = 7  # one row all ties
    got = row_order(a)
    assert got.dtype == np.intp and np.array_equal(got, np.argsort(a, axis=1, kind="stable"))
    assert row_order(np.zeros((5, 0), np.int32)).shape == (5, 0)


@pytest.mark.parametrize("a", [np.array([], np.int64), np.array([7]), np.array([3, 3, 3]), np.array([[5, -2], [5, 9]]),
                               np.random.default_rng(2).integers(-50, 50, 5000),
                               np.random.default_rng(3).integers(0, 2**62, 3000, dtype=np.int64)],
                         ids=["empty", "one", "all-equal", "2-D", "many-repeats", "wide"])
def test_unique_sorted_is_numpys_unique(a):
    from knnlm.arrays import unique_sorted

    got = unique_sorted(a)
    assert got.dtype == a.dtype and np.array_equal(got, np.unique(a))


@pytest.mark.parametrize("kind", ["8-bit", "fast-scan", "on-disk"])
def test_coarse_assignment_in_torch_matches_faiss(tmp_path, kind, monkeypatch):
    """Batches of COARSE_MIN_QUERIES or more find their IVF lists in torch (in blocks), smaller ones by few(): the
    same lists and neighbours either way. A query that is not finite gets no list, as in faiss. An index with a
    transform in front keeps faiss's own search."""
    import knnlm.retrieval as retrieval
    from knnlm.retrieval import COARSE_MIN_QUERIES, CoarseAssigner

    keys = clustered(20_000, 32, seed=1)
    ds = open_datastore(make_datastore(tmp_path / "syn", keys, np.arange(len(keys)) % 100))
    train_index(ds, IndexConfig(code_size=8, fast_scan=kind == "fast-scan", on_disk=kind == "on-disk"))
    q = clustered(4 * COARSE_MIN_QUERIES, 32, seed=2)
    r = Retriever(ds, RetrievalConfig(k=100, nprobe=16, rerank=False))
    assert r._coarse is not None
    quantizer = faiss.extract_index_ivf(r.index).quantizer
    ref_d, ref_lists = quantizer.search(q, 16)
    monkeypatch.setattr(retrieval, "COARSE_BLOCK", 256 * 5)  # 5 queries a block: several blocks and a short last
    d, lists = r._coarse(q, 16)
    assert np.array_equal(lists, ref_lists) and np.allclose(d, ref_d, rtol=1e-5)
    assert r._coarse(q, 10_000)[1].shape == (len(q), 256)  # nprobe past nlist: every list
    bad = q[:3].copy()
    bad[1, 4] = np.nan
    assert (r._coarse(bad, 16)[1][1] == -1).all() and (quantizer.search(bad, 16)[1][1] == -1).all()
    calls = []
    preassigned = r.index.search_preassigned
    monkeypatch.setattr(r.index, "search_preassigned", lambda *a: calls.append(len(a[0])) or preassigned(*a))
    batched = r.search(q)
    single = [np.concatenate(x) for x in zip(*(r.search(q[i:i + 8]) for i in range(0, len(q), 8)))]
    assert calls == [len(q)] + [8] * (len(q) // 8)  # torch's lists for the whole batch, few()'s for batches of 8
    assert np.mean(batched[1] == single[1]) > 0.99  # ties at the last places may order apart
    assert np.allclose(batched[0], single[0], rtol=1e-4)
    every = Retriever(ds, RetrievalConfig(k=100, nprobe=10_000, rerank=False))
    assert np.mean(every.search(q)[1] == every.index.search(q, 100)[1]) > 0.99  # faiss takes nprobe ≤ nlist too
    if kind == "8-bit":
        train_index(ds, IndexConfig(factory="PCA16,IVF64,Flat"))
        r = Retriever(ds, RetrievalConfig(k=100, nprobe=16, rerank=False))
        assert r._coarse is None and not CoarseAssigner.applies(r.index)
        assert r.search(q)[1].shape == (len(q), 100)


@pytest.mark.parametrize("nprobe", [8, 100, 10_000])
def test_few_queries_find_exactly_faiss_lists(tmp_path, nprobe, monkeypatch):
    """A decoding step's lists come from a bound over the centroids' principal axes (CoarseAssigner.few), then
    exact distances where the bound allows: the lists and distances of faiss's own flat search of one query, bit
    for bit, and so the same neighbours. Checked where the bound prunes (keys wider than its axes, most of
    their spread in a few directions, as hidden states have it), on queries at a centroid, at 0, far away,
    inside the axes' span and not finite."""
    import knnlm.retrieval as retrieval

    d = 2 * retrieval.COARSE_AXES
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :d // 4]  # the centres span d/4 directions
    keys = (clustered(30_000, d // 4, seed=3, centers=400) @ basis.T + rng.normal(0, 0.3, (30_000, d)))
    ds = open_datastore(make_datastore(tmp_path / "syn", keys.astype(np.float32), np.arange(len(keys)) % 100))
    train_index(ds, IndexConfig(factory="IVF256,PQ16"))
    q = np.concatenate([keys[:40] + rng.normal(0, 0.5, (40, d)), np.zeros((1, d)), 1e3 * keys[40:42]])
    measured = []
    exact = retrieval.CoarseAssigner._exact
    monkeypatch.setattr(retrieval.CoarseAssigner, "_exact",
                        staticmethod(lambda x, c, ids: measured.append(len(ids)) or exact(x, c, ids)))
    # a loose bound (4 axes) whose first measured centroids are only nprobe: the second round must find what
    # they miss; then the defaults
    for axes, first in ((4, 1), (retrieval.COARSE_AXES, retrieval.COARSE_FIRST)):
        monkeypatch.setattr(retrieval, "COARSE_AXES", axes)
        monkeypatch.setattr(retrieval, "COARSE_FIRST", first)
        r = Retriever(ds, RetrievalConfig(k=50, nprobe=nprobe, rerank=False))
        ivf = faiss.extract_index_ivf(r.index)
        probes = min(nprobe, ivf.nlist)
        measured.clear()
        for x in np.concatenate([q, r._coarse.centroids.numpy()[:2]]).astype(np.float32):
            ref = ivf.quantizer.search(x[None], probes)
            got = r._coarse.few(x[None], nprobe)
            assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
        if nprobe == 8 and axes > 4:  # the bound leaves most centroids unmeasured
            assert np.median(measured[1::2]) < ivf.nlist / 4
    # a query inside the axes' span (its ‖Rq‖ would be rounding) is measured against every centroid
    axes_rows = r._coarse._bound_parts()[0]
    inside = (r._coarse.centroids.numpy()[3] @ axes_rows.T @ axes_rows)[None].astype(np.float32)
    measured.clear()
    got, ref = r._coarse.few(inside, nprobe), ivf.quantizer.search(inside, probes)
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0]) and measured == [ivf.nlist]
    q = q.astype(np.float32)
    many = r._coarse.few(q[:5], nprobe)  # several rows at once: each as alone
    assert np.array_equal(many[1], np.concatenate([r._coarse.few(x[None], nprobe)[1] for x in q[:5]]))
    bad = q[:3].copy()
    bad[1, 0] = np.inf
    assert (r._coarse.few(bad, nprobe)[1][1] == -1).all() and (ivf.quantizer.search(bad[1:2], probes)[1] == -1).all()
    calls = []
    preassigned = r.index.search_preassigned
    monkeypatch.setattr(r.index, "search_preassigned", lambda *a: calls.append(len(a[0])) or preassigned(*a))
    for x in q[:10]:
        got, ref = r.search(x[None]), r.index.search(x[None], 50)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
    assert calls == [1] * 10
    with pytest.raises(ValueError, match="width"):
        r._coarse.few(q[:1, :-1], nprobe)


def test_rerank_depth_recomputes_the_first_candidates_only(tmp_path):
    keys = clustered(20_000, 32, seed=1)
    ds = open_datastore(make_datastore(tmp_path / "syn", keys, np.arange(len(keys)) % 100))
    train_index(ds, IndexConfig(code_size=8))
    q = clustered(40, 32, seed=2)
    raw = Retriever(ds, RetrievalConfig(k=200, nprobe=16, rerank=False))
    pq_d, ids = raw.index.search(q, 200)  # the index's order
    k16 = np.asarray(ds.keys, dtype=np.float64)
    true = ((q[:, None, :] - k16[ids]) ** 2).sum(-1)
    part = Retriever(ds, RetrievalConfig(k=200, nprobe=16, rerank_depth=50))
    d, i = part.search(q)
    for row in range(len(q)):  # the first 50 at their exact distances, the other 150 at the index's, never
        # below the farthest of the 50 (so none outranks them)
        want = np.concatenate([true[row, :50], np.maximum(pq_d[row, 50:], true[row, :50].max())])
        got = dict(zip(i[row], d[row]))
        assert np.allclose([got[x] for x in ids[row]], want, rtol=1e-4)
        assert set(i[row, :50]) == set(ids[row, :50])
    assert np.all(np.diff(d, axis=1) >= 0) and part.describe["rerank"] == "first 50"
    from knnlm.retrieval import exact_distances
    own_d, own_i = raw.search(q)  # the Retriever's own index distances (its coarse step rounds otherwise)
    want_d, want_i = sort_rows(partial_rerank(own_d, exact_distances(q, part._keys, own_i[:, :50])), own_i)
    assert np.array_equal(np.where(want_i < 0, np.inf, want_d), d) and np.array_equal(want_i, i)
    full_d, full_i = Retriever(ds, RetrievalConfig(k=200, nprobe=16, rerank_depth=500)).search(q)
    ref_d, ref_i = Retriever(ds, RetrievalConfig(k=200, nprobe=16)).search(q)
    assert np.array_equal(full_i, ref_i) and np.array_equal(full_d, ref_d)
    with pytest.raises(KNNLMError, match="--rerank-depth 0"):
        RetrievalConfig(rerank_depth=0)
    with pytest.raises(KNNLMError, match="leave it out with --no-rerank"):
        RetrievalConfig(rerank_depth=10, rerank=False)


def test_sorting_a_partial_rerank_equals_sorting_whole_rows():
    """sort_partial_rerank sorts only the re-ranked head where the tail follows it in order; every row, those
    where it does not included, must come out as sort_rows gives it, bit for bit."""
    rng = np.random.default_rng(3)
    n, k, depth = 400, 60, 16
    index_d = np.sort(rng.integers(0, 50, (n, k)).astype(np.float32), axis=1)  # ascending, many ties
    ids = rng.permutation(n * k).reshape(n, k).astype(np.int64)
    head = index_d[:, :depth] + rng.integers(-5, 6, (n, depth)).astype(np.float32)  # ties with the floor too
    head[1, 3] = np.inf  # a missing neighbour among the re-ranked: the row is sorted whole
    head[2, 0] = np.nan
    index_d[3, 20:] = np.inf  # missing at the end, as faiss leaves them
    ids[3, 20:] = -1
    index_d[4, 30], index_d[4, 31] = 40.0, 30.0  # a tail out of order
    index_d[5] = 7.0  # one value throughout: head and tail tied at the floor
    head[5] = 7.0
    dists = partial_rerank(index_d, head)
    got_d, got_i = sort_partial_rerank(dists, ids, depth)
    want_d, want_i = sort_rows(dists, ids)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_d, want_d, equal_nan=True)
    head_only = np.flatnonzero((np.sort(dists[:, depth:], axis=1) != dists[:, depth:]).any(axis=1))
    assert set(head_only) == {4}  # the out-of-order tail really is out of order (the test reaches the fallback)
    for rows in (slice(0, 1), slice(3, 5)):  # a decoding step's one row, and two (sort_rows itself)
        got_d, got_i = sort_partial_rerank(dists[rows], ids[rows], depth)
        want_d, want_i = sort_rows(dists[rows], ids[rows])
        assert np.array_equal(got_i, want_i) and np.array_equal(got_d, want_d, equal_nan=True)
    for bad in (0, k):
        with pytest.raises(ValueError, match="head and a tail"):
            sort_partial_rerank(dists, ids, bad)


def test_small_datastores_get_an_exact_index(tmp_path, caplog):
    ds = open_datastore(make_datastore(tmp_path / "syn", clustered(500, 16), np.zeros(500)))
    with caplog.at_level("INFO", logger="knnlm"):
        info = train_index(ds)
    assert info["kind"] == "exact" and "too few" in info["reason"]
    assert "exact" in caplog.text
    assert choose_params(1_000_000, 576, IndexConfig())["factory"] == "IVF2048,PQ64"
    assert choose_params(1_000_000, 576, IndexConfig(fast_scan=True))["factory"] == "IVF2048,PQ64x4fs"
    for bad in (dict(fast_scan=True, on_disk=True), dict(fast_scan=True, factory="IVF64,Flat")):
        with pytest.raises(KNNLMError, match="leave out"):
            IndexConfig(**bad)


def test_exact_rerank_distances_match_numpy(tmp_path):
    keys = clustered(3000, 16, seed=3)
    ds = open_datastore(make_datastore(tmp_path / "syn", keys, np.arange(3000)))
    train_index(ds)
    q = clustered(20, 16, seed=4)
    d, ids = Retriever(ds, RetrievalConfig(k=50, exact=True)).search(q)
    k16 = np.asarray(ds.keys, dtype=np.float64)
    brute = ((q[:, None, :].astype(np.float64) - k16[None]) ** 2).sum(-1)
    ref_ids = np.argsort(brute, axis=1)[:, :50]
    assert (ids != ref_ids).mean() < 1e-2
    np.testing.assert_allclose(d, np.take_along_axis(brute, ids, 1), rtol=1e-4, atol=1e-3)


def test_a_build_takes_numpy_integers(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = BuildConfig(model=str(tiny_model_dir), context=np.int64(64), stride=np.int32(32), holdout=0.2,
                      glob="*.txt", build_index=False, max_tokens=np.int64(500), shuffle_seed=np.int64(1))
    ds = build_datastore(str(corpus_dir), "np-ints", cfg, lm=tiny_lm)
    assert ds.count == 500 and ds.meta["context"] == 64 and type(ds.meta["context"]) is int
    again = build_datastore(str(corpus_dir), "np-ints", BuildConfig(**{**cfg.__dict__, "overwrite": True}), lm=tiny_lm)
    assert np.array_equal(np.asarray(again.keys), np.asarray(ds.keys))


def test_overwrite_waits_for_no_one_but_refuses_a_datastore_another_command_is_changing(tiny_lm, tiny_model_dir,
                                                                                       corpus_dir, tmp_path):
    """add, remove, compact, train-index and tune-lambda hold the datastore's lock while they work; a build with
    --overwrite must not swap the folder under them (before: tune-lambda's values of the old keys landed in the new
    datastore, add died with a traceback, train-index committed an index of the old keys). It refuses, keeping its
    work for --resume, which finishes once the lock is free."""
    import threading

    from knnlm import journal

    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0, glob="*.txt", build_index=False,
                      max_tokens=2_000)
    out = tmp_path / "ds"
    first = build_datastore(str(corpus_dir), out, cfg, lm=tiny_lm)
    held, done = threading.Event(), threading.Event()

    def other_command():  # as tune-lambda does, in a thread of its own
        with journal.hold(out):
            held.set()
            done.wait(60)

    worker = threading.Thread(target=other_command)
    worker.start()
    held.wait(60)
    try:
        again = BuildConfig(**{**cfg.__dict__, "max_tokens": 1_000, "overwrite": True})
        with pytest.raises(KNNLMError, match=r"being changed by another process.*once it finishes, rerun with --resume"):
            build_datastore(str(corpus_dir), out, again, lm=tiny_lm)
        assert open_datastore(out).count == first.count  # untouched
    finally:
        done.set()
        worker.join()
    assert not journal._HELD and not journal._HOLDING  # the refused build kept no lock
    resumed = build_datastore(str(corpus_dir), out, BuildConfig(**{**again.__dict__, "resume": True}), lm=tiny_lm)
    assert resumed.count < first.count and open_datastore(out).count == resumed.count
    # a command that opened the old datastore and takes the lock after the move (tune-lambda, KNNLM.tune) is told
    from knnlm.datastore import check_unchanged

    check_unchanged(resumed)
    with pytest.raises(KNNLMError, match="rebuilt or changed by another command after this one opened it"):
        check_unchanged(first)
