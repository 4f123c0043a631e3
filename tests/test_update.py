"""A datastore that follows its corpus: add, remove, compact; crash-safe; searches never return removed rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

import knnlm
import knnlm.cli.update as cli_update
from helpers import clustered, make_datastore, read_json, without_polysemous_training
from knnlm.arrays import write_json
from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.index import IndexConfig, load_index, read_index_info, train_index
from knnlm.journal import PENDING
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.update import AddConfig, add_documents, apply_add, compact, remove_documents

BUILD = dict(context=64, stride=32, holdout=0, index=IndexConfig(exact=True))  # exact: neighbours checkable
DOCS = ["bisect.py", "colorsys.py", "fnmatch.py", "keyword.py"]  # small, and in sorted order


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def folder(root: Path, texts: dict, names: list[str]) -> Path:
    """A folder corpus holding the named documents."""
    root.mkdir(parents=True)
    for n in names:
        (root / f"{n}.txt").write_text(texts[n])
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_lm, tiny_model_dir, corpus_texts):
    """A datastore of three documents (exact index), and a folder holding a fourth."""
    base = tmp_path_factory.mktemp("upd")
    src = folder(base / "corpus", corpus_texts, DOCS[:3])
    ds = base / "ds"
    build_datastore(str(src), ds, BuildConfig(model=str(tiny_model_dir), **BUILD), lm=tiny_lm)
    return ds, folder(base / "more", corpus_texts, DOCS[3:])


@pytest.fixture
def ds3(three, tmp_path) -> Path:
    """A copy of the three-document datastore this test may change."""
    return Path(shutil.copytree(three[0], tmp_path / "ds"))


def brute(keys: np.ndarray, live: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest live rows (numpy, float64)."""
    x = np.asarray(keys, dtype=np.float64)[live]
    d = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    return live[np.argsort(d, axis=1, kind="stable")[:, :k]]


def test_add_gives_the_arrays_of_a_build_over_all_documents(ds3, three, tiny_lm, tiny_model_dir, corpus_texts,
                                                            tmp_path):
    whole = tmp_path / "whole"
    build_datastore(str(folder(tmp_path / "all", corpus_texts, DOCS)), whole,
                    BuildConfig(model=str(tiny_model_dir), **BUILD), lm=tiny_lm)
    r = add_documents(ds3, str(three[1]), lm=tiny_lm)
    a, b = open_datastore(ds3), open_datastore(whole)
    assert r["documents"] == 1 and a.count == b.count and r["keys"] == a.count - a.documents[2][1] - a.documents[2][2]
    assert np.array_equal(a.keys, b.keys) and np.array_equal(a.vals, b.vals)
    assert [d[1:] for d in a.documents] == [d[1:] for d in b.documents]
    assert a.documents[3][0].endswith("keyword.py.txt") and not (ds3 / ".added").exists()
    # The index was added to, not retrained: it returns the brute-force neighbours over all keys.
    q = np.asarray(a.keys[:: 97], dtype=np.float32)
    _, ids = Retriever(a, RetrievalConfig(k=5)).search(q)
    assert np.array_equal(ids, brute(a.keys, np.arange(a.count), q, 5))
    assert a.meta["updates"][0]["op"] == "add" and load_index(a).ntotal == a.count


def test_add_refuses_a_held_out_document(tiny_lm, tiny_model_dir, corpus_texts, tmp_path):
    src = folder(tmp_path / "corpus", corpus_texts, DOCS)
    ds = build_datastore(str(src), tmp_path / "ds", BuildConfig(model=str(tiny_model_dir), **{**BUILD, "holdout": 0.25}),
                         lm=tiny_lm)
    name = ds.heldout("dev")[0][0]
    with pytest.raises(KNNLMError, match=f"{name} is held out of .* as its dev text"):
        add_documents(ds.path, name, lm=tiny_lm)
    with pytest.raises(KNNLMError, match="is held out of"):  # the same file, spelled relative to here
        add_documents(ds.path, os.path.relpath(name), lm=tiny_lm)
    assert open_datastore(ds.path).count == ds.count  # nothing added
    with pytest.raises(KNNLMError, match="'dev' or 'test', not 'tst'"):
        ds.heldout("tst")


def test_add_holds_the_lock_through_its_lm_pass(ds3, three, tiny_lm):
    from knnlm.journal import _try_lock, _unlock

    fd = _try_lock(ds3)  # another change in progress (a lock of another open file, as another process's)
    try:
        with pytest.raises(KNNLMError, match="being changed by another process"):
            add_documents(ds3, str(three[1]), lm=tiny_lm)
    finally:
        _unlock(fd)
    assert not (ds3 / ".added").exists() and not (ds3 / ".added.partial").exists()  # refused before any work
    # During the add's LM pass (its progress calls) the lock is taken: a remove then is refused (before, it ran,
    # and the add failed after it).
    seen = []

    def meanwhile(_n):
        fd = _try_lock(ds3)  # what a remove in another process would try
        seen.append(fd)
        if fd is not None:
            _unlock(fd)

    r = add_documents(ds3, str(three[1]), lm=tiny_lm, progress=meanwhile)
    assert seen and all(fd is None for fd in seen) and r["documents"] == 1
    fd = _try_lock(ds3)  # released at its end
    assert fd is not None
    _unlock(fd)


def test_a_hold_keeps_other_threads_changes_out(tmp_path):
    import threading

    from knnlm.journal import _try_lock, _unlock, begin, hold

    root = tmp_path / "d"
    root.mkdir()
    seen = {}

    def other():  # a remove in another thread of the same process
        try:
            begin(root)
        except KNNLMError as e:
            seen["begin"] = str(e)
        try:
            with hold(root):
                pass
        except KNNLMError as e:
            seen["hold"] = str(e)

    with hold(root):
        with hold(root):  # nested in this thread: the same hold
            pass
        assert _try_lock(root) is None  # still held after the nested one ended
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert "being changed by another process" in seen["begin"] and "being changed" in seen["hold"]
    assert not (root / ".pending").exists()
    fd = _try_lock(root)  # released at the hold's end
    assert fd is not None
    _unlock(fd)


def test_add_clears_what_an_interrupted_clean_up_left(ds3, three, tiny_lm):
    # The add's own build folder, its removal cut short after meta.json went: ours, not a user's folder.
    left = ds3 / ".added"
    left.mkdir()
    (left / "keys.npy").write_bytes(b"half deleted")
    r = add_documents(ds3, str(three[1]), lm=tiny_lm)
    assert r["documents"] == 1 and not left.exists()


def test_add_refuses_an_index_it_cannot_change_before_its_lm_pass(three, tmp_path, monkeypatch):
    """An index with its lists on disk: refused before the model is loaded, with nothing built left behind."""
    path = ivf_datastore(tmp_path / "ivf")
    with without_polysemous_training():
        train_index(open_datastore(path), IndexConfig(nlist=16, code_size=8, on_disk=True))
    before = sorted(os.listdir(path))

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("knnlm.lm.datastore_lm", no_model)
    with pytest.raises(KNNLMError, match="keeps its lists on disk"):
        add_documents(path, str(three[1]))
    assert sorted(os.listdir(path)) == before


def test_add_refuses_another_model_and_documents_already_there(ds3, three, tiny_lm, tmp_path):
    other = make_datastore(tmp_path / "other", clustered(50, tiny_lm.dim), np.zeros(50), model_fp="another")
    with pytest.raises(KNNLMError, match="another model"):
        add_documents(other, str(three[1]), lm=tiny_lm)
    r = invoke("add", other, three[1], "--model", tiny_lm.name)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: ") and "another model" in r.output
    name = open_datastore(ds3).documents[0][0]
    with pytest.raises(KNNLMError, match="already in"):
        add_documents(ds3, name, lm=tiny_lm)
    assert read_json(ds3 / "meta.json") == open_datastore(three[0]).meta  # nothing changed


def test_remove_then_no_search_returns_their_rows(ds3, tiny_lm):
    ds = open_datastore(ds3)
    name, start, count, _ = ds.documents[1]
    gone = np.arange(start, start + count)
    # The removed document's own keys (past its first token: documents that open alike share that key).
    q = np.asarray(ds.keys[start + 1: start + count: 7], dtype=np.float32)
    before = Retriever(ds, RetrievalConfig(k=8)).search(q)[1]
    assert np.isin(before[:, 0], gone).all()  # they found themselves
    r = invoke("remove", ds3, name)
    assert r.exit_code == 0, r.output
    ds = open_datastore(ds3)
    live = ds.live_ids()
    assert ds.live_count == ds.count - count and len(live) == ds.live_count
    want = brute(ds.keys, live, q, 8)
    for cfg in (RetrievalConfig(k=8), RetrievalConfig(k=8, exact=True), RetrievalConfig(k=8, rerank=False)):
        ids = Retriever(ds, cfg).search(q)[1]
        assert not np.isin(ids, gone).any()
        assert np.array_equal(ids, want), cfg
    # The neighbours listing (the CLI's and the library's) names no row of the removed document.
    knn = knnlm.KNNLM(ds, tiny_lm, Retriever(ds, RetrievalConfig(k=50)))
    text = Path(name).read_text()[:400]
    docs = {n["document"] for n in knn.neighbors(text, -1, 50)["neighbors"]}
    assert docs and name not in docs
    # Removing it again is refused, and says so; train-index waits for compact.
    again = invoke("remove", ds3, name)
    assert again.exit_code == 1 and f"{name} was removed from {ds3} already" in again.output, again.output
    with pytest.raises(KNNLMError, match="compact"):
        train_index(ds)


def test_compact_drops_the_rows_and_keeps_every_search(ds3):
    ds = open_datastore(ds3)
    remove_documents(ds3, [ds.documents[0][0]])
    before = open_datastore(ds3)
    live = before.live_ids()
    q = clustered(6, before.dim, seed=3) * 0.1 + np.asarray(before.keys[live[::400]][:6], dtype=np.float32)
    d0, i0 = Retriever(before, RetrievalConfig(k=6)).search(q)
    r = invoke("compact", ds3)
    assert r.exit_code == 0, r.output
    after = open_datastore(ds3)
    assert after.count == len(live) and not after.removed and load_index(after).ntotal == after.count
    assert np.array_equal(after.keys, before.keys[live]) and np.array_equal(after.vals, before.vals[live])
    assert [d[0] for d in after.documents] == [d[0] for d in before.documents[1:]]
    assert after.documents[0][1] == 0 and after.documents[1][1] == after.documents[0][2]
    d1, i1 = Retriever(after, RetrievalConfig(k=6)).search(q)
    assert np.array_equal(live[i1], i0) and np.allclose(d1, d0)
    r = invoke("info", ds3)
    assert "removed 1 (" in r.output and "0 removed keys await" in r.output


def ivf_datastore(path: Path, docs: int = 4, per: int = 3000, d: int = 32, fast_scan: bool = False) -> Path:
    """A synthetic datastore of `docs` documents with an IVF-PQ index (8-bit or fast-scan codes)."""
    keys = clustered(docs * per, d, seed=1)
    make_datastore(path, keys, np.random.default_rng(0).integers(0, 100, docs * per))
    meta = read_json(path / "meta.json")
    meta["documents"] = [[f"doc{i}", i * per, per, 0] for i in range(docs)]
    write_json(path / "meta.json", meta)
    with without_polysemous_training():
        train_index(open_datastore(path), IndexConfig(nlist=16, code_size=8, fast_scan=fast_scan))
    return path


@pytest.mark.parametrize("fast_scan", [True, False])
def test_ivf_remove_add_compact_keep_the_pq_ranking(tmp_path, fast_scan):
    path = ivf_datastore(tmp_path / "ivf", fast_scan=fast_scan)
    ds = open_datastore(path)
    assert read_json(path / "index.json")["factory"] == "IVF16,PQ8" + ("x4fs" if fast_scan else "")
    q = clustered(20, ds.dim, seed=5)
    full = RetrievalConfig(k=60, nprobe=16, rerank=False)
    _, before = Retriever(ds, full).search(q)
    remove_documents(path, ["doc1", "doc3"])
    ds = open_datastore(path)
    gone = (before // 3000 == 1) | (before // 3000 == 3)
    _, after = Retriever(ds, RetrievalConfig(k=10, nprobe=16, rerank=False)).search(q)
    # Removing entries leaves the others' codes: the ranking is the old one with the removed ids dropped.
    # (Fast-scan's quantized lookup tables tie many distances, and removal reorders its blocks, so there
    # the order of ties may change: its rows must hold no removed id, and their kept neighbours.)
    kept = [row[~g][:10] for row, g in zip(before, gone)]
    assert all((~g).sum() >= 10 for g in gone)
    if fast_scan:
        assert not np.isin(after // 3000, [1, 3]).any()
        assert np.mean([len(set(a) & set(row[~g])) / 10 for a, row, g in zip(after, before, gone)]) >= 0.9
    else:
        assert np.array_equal(after, np.array(kept))
    # Add a document: it gets the next row numbers, found under their ids, no retraining.
    extra = make_datastore(tmp_path / "extra", clustered(500, ds.dim, seed=9), np.ones(500))
    apply_add(ds, open_datastore(extra))
    ds = open_datastore(path)
    # Found by their codes alone (no re-ranking): fast-scan's add after a removal once ORed new codes into the
    # stale bits a removal leaves in a list's last block.
    added = np.asarray(ds.keys[12000:12500:10], np.float32)
    dists, ids = Retriever(ds, RetrievalConfig(k=5, nprobe=16, rerank=False)).search(added)
    assert (ids == np.arange(12000, 12500, 10)[:, None]).any(1).mean() >= 0.95 and np.all(dists[:, 0] >= 0)
    live = ds.live_ids()
    _, i0 = Retriever(ds, full).search(q)
    compact(path)
    ds = open_datastore(path)
    _, i1 = Retriever(ds, full).search(q)
    assert ds.count == 6500 and np.array_equal(live[i1], i0)


# Crash safety: a driver process forks one child per crash point; each child is killed (os._exit) just
# before its n-th file-system step, on its own copy of the datastore. The parent never runs faiss before
# forking (faiss's OpenMP is not fork-safe), and this test process checks every copy afterwards.
DRIVER = r"""
import os, shutil, sys, json
import faiss
import knnlm.arrays
from knnlm import update
from knnlm.datastore import open_datastore
from knnlm.index import IndexConfig, train_index

op, src, work, arg = sys.argv[1:5]
steps = [0, 10**9]

def hook(fn):
    def wrapped(*a, **k):
        steps[0] += 1
        if steps[0] == steps[1]:
            os._exit(137)
        return fn(*a, **k)
    return wrapped

for mod, name in [(os, "replace"), (os, "fsync"), (os, "truncate"), (os, "mkdir"), (shutil, "rmtree"),
                  (faiss, "write_index"), (knnlm.arrays.NpyAppender, "append"), (knnlm.arrays.NpyAppender, "finish")]:
    setattr(mod, name, hook(getattr(mod, name)))
outcomes = []
for n in range(1, 200):
    dst = os.path.join(work, str(n))
    shutil.copytree(src, dst)
    pid = os.fork()
    if pid == 0:
        steps[0], steps[1] = 0, n
        ds = open_datastore(dst)
        if op == "add":
            update.apply_add(ds, open_datastore(arg, check_arrays=False))
        elif op == "remove":
            update.remove_documents(dst, json.loads(arg))
        elif op == "train":
            train_index(ds, IndexConfig(exact=True))
        else:
            update.compact(dst)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    outcomes.append(os.waitstatus_to_exitcode(status))
    if outcomes[-1] == 0:
        break
print(json.dumps(outcomes))
"""


def state(path: Path) -> tuple:
    """Everything a reader sees: meta (less history), arrays, and the index's answers to fixed queries."""
    ds = open_datastore(path)
    q = clustered(8, ds.dim, seed=11)
    ids = Retriever(ds, RetrievalConfig(k=10, nprobe=16, rerank=False)).search(q)[1]
    meta = {k: v for k, v in ds.meta.items() if k != "updates"}
    # index.json names the index caches and tuned values were made with: it must describe index.faiss
    volatile = ("trained", "train_seconds", "total_seconds", "updated")
    info = {k: v for k, v in read_index_info(ds).items() if k not in volatile}
    return (json.dumps(meta, sort_keys=True), ds.keys.tobytes(), ds.vals.tobytes(), ids.tobytes(),
            json.dumps(info, sort_keys=True))


@pytest.mark.parametrize("op", ["remove", "add", "compact", "train"])
def test_kill_at_any_step_leaves_the_old_or_the_new_datastore(tmp_path, op):
    src = ivf_datastore(tmp_path / "src", per=1500, docs=8)
    if op == "compact":
        remove_documents(src, ["doc2", "doc5"])
    arg = json.dumps(["doc1", "doc6"]) if op == "remove" else ""
    if op == "add":
        arg = str(make_datastore(tmp_path / "extra", clustered(300, 32, seed=4), np.ones(300)))
    new = Path(shutil.copytree(src, tmp_path / "new"))
    {"add": lambda: apply_add(open_datastore(new), open_datastore(arg)),
     "remove": lambda: remove_documents(new, json.loads(arg)), "compact": lambda: compact(new),
     "train": lambda: train_index(new, IndexConfig(exact=True))}[op]()
    old_state, new_state = state(src), state(new)
    assert old_state != new_state
    work = tmp_path / "crashes"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(knnlm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DRIVER, op, str(src), str(work), arg], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    assert outcomes[-1] == 0 and set(outcomes[:-1]) == {137} and len(outcomes) > 10
    seen = []
    for n in range(1, len(outcomes)):
        s = state(work / str(n))  # opening recovers: finishes a committed change or drops an uncommitted one
        assert s in (old_state, new_state), f"crash at step {n} left a mix"
        assert not (work / str(n) / PENDING).exists()
        seen.append("new" if s == new_state else "old")
    assert seen[0] == "old" and seen[-1] == "new"  # both outcomes happen: the crash points span the commit
    assert seen == sorted(seen, key=["old", "new"].index)  # once new, always new
    print(f"{op}: {len(seen)} crash points, {seen.count('old')} left the old datastore")


def test_every_add_flag_reaches_its_config(monkeypatch, tmp_path):
    seen = {}

    def fake(datastore, corpus, cfg, progress=None):
        seen.update(datastore=datastore, corpus=corpus, cfg=cfg)
        raise KNNLMError("stop")

    monkeypatch.setattr(cli_update, "add_documents", fake)
    (tmp_path / "d").mkdir()
    r = invoke("add", tmp_path / "d", "c.parquet", "--model", "m", "--batch-size", 3, "--glob", "*.md", "--format",
               "parquet", "--text-field", "body", "--strict", "--device", "cpu", "--trust-remote-code")
    assert "stop" in r.output
    assert seen["cfg"] == AddConfig(model="m", device="cpu", trust_remote_code=True, batch_size=3, glob="*.md",
                                    fmt="parquet", text_field="body", strict=True)
    assert seen["corpus"] == "c.parquet"


def test_exact_search_and_ids_check_without_an_index(tmp_path):
    path = ivf_datastore(tmp_path / "ivf", docs=3, per=4000)
    (path / "index.faiss").unlink()
    (path / "index.json").unlink()
    remove_documents(path, ["doc0"])  # no index: only meta.json changes
    ds = open_datastore(path)
    q = clustered(5, ds.dim, seed=2)
    ids = Retriever(ds, RetrievalConfig(k=7, exact=True)).search(q)[1]
    assert np.array_equal(ids, brute(ds.keys, ds.live_ids(), q, 7)) and ids.min() >= 4000
    assert isinstance(faiss.IndexFlatL2(4), faiss.IndexFlat)


def test_cli_add_then_info(ds3, three, tiny_model_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "x.txt"
    bad.write_bytes(b"\x00binary")
    shutil.copy(next(three[1].iterdir()), bad.with_name("y.txt"))
    r = invoke("add", ds3, bad.parent, "--model", tiny_model_dir)
    assert r.exit_code == 0, r.output
    assert "added 1 documents" in r.output and "Skipped 1 unreadable" in r.output and "x.txt" in r.output
    info = json.loads(invoke("info", ds3, "--json").stdout)
    assert info["updates"]["add"]["documents"] == 1 and info["meta"]["updates"][0]["unreadable"]["count"] == 1


def test_update_and_index_functions_take_a_folder_or_a_datastore_and_refuse_the_rest(tmp_path):
    from helpers import clustered, make_datastore
    from knnlm.errors import KNNLMError
    from knnlm.index import IndexConfig, train_index
    from knnlm.retrieval import RetrievalConfig, Retriever
    from knnlm.update import compact, remove_documents

    path = make_datastore(tmp_path / "ds", clustered(600, 8), np.zeros(600))
    ds = open_datastore(path)
    assert train_index(str(path), IndexConfig(exact=True))["factory"] == "Flat"  # a folder, as elsewhere
    with pytest.raises(KNNLMError, match=r"^names takes a list of document names, e.g. \['synthetic'\], not one"):
        remove_documents(ds, "synthetic")  # an opened Datastore is taken; one name is no list
    with pytest.raises(KNNLMError, match=r"^A datastore is named by its folder .* not by 3 \(int\)"):
        open_datastore(3)
    with pytest.raises(KNNLMError, match=r"^cfg takes an IndexConfig"):
        train_index(ds, {"nlist": 8})
    remove_documents(ds, ["synthetic"])  # every document: nothing left to search
    with pytest.raises(KNNLMError, match=r"holds no keys a search may return \(every document was removed\)"):
        Retriever(open_datastore(path), RetrievalConfig(exact=True))
    compact(ds)
    assert open_datastore(path).count == 0


class _Killed(BaseException):
    """A kill -9 at a chosen point, as far as the files are concerned: nothing after it runs."""


def test_train_index_holds_the_datastore_against_other_changes(ds3, monkeypatch):
    """From its start, before any training, not only while it commits."""
    import threading

    import knnlm.index as index_mod
    from knnlm.journal import hold

    seen = []
    monkeypatch.setattr(index_mod, "_train_index", lambda *a, **k: pytest.fail("trained while another change held it"))

    def other():  # train-index while another change holds the datastore
        try:
            train_index(ds3, IndexConfig(exact=True))
        except KNNLMError as e:
            seen.append(str(e))

    with hold(ds3):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(seen) == 1 and "being changed by another process" in seen[0]


def test_a_refused_add_or_train_index_draws_no_progress_bar(ds3, three, tiny_model_dir):
    """The refusal is all the output: add's bar waits for its checks, train-index's for the datastore's lock."""
    import threading

    from knnlm.journal import hold

    stored = open_datastore(ds3).documents[0][0]
    r = invoke("add", ds3, stored, "--model", tiny_model_dir)
    assert r.exit_code == 1 and "is already in" in r.output and "adding" not in r.output, r.output
    seen = []
    with hold(ds3):  # another thread's change: its hold refuses this one's
        t = threading.Thread(target=lambda: seen.append(invoke("train-index", ds3, "--exact")))
        t.start()
        t.join()
    assert seen[0].exit_code == 1 and "being changed by another process" in seen[0].output, seen[0].output
    assert "adding keys" not in seen[0].output


def test_a_reader_of_a_folder_it_cannot_write_reads_the_last_committed_state(ds3, monkeypatch):
    import knnlm.journal as journal

    def killed(root):  # the change's process dies: its lock goes with it
        key = str(Path(root).resolve())
        journal._unlock(journal._HELD.pop(key))

    count = open_datastore(ds3).count
    pending = journal.begin(ds3)  # an add that appended nothing yet and was killed before its commit
    (pending / "meta.json").write_text("{}")
    killed(ds3)
    # a folder made read-only (chmod a-w; as root here, os.access is what a user's process would see)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert open_datastore(ds3).count == count and (pending / "meta.json").exists()  # read as it was, left alone
    with pytest.raises(KNNLMError, match="cannot be written .* run it as a user who may read and write there"):
        remove_documents(ds3, [open_datastore(ds3).documents[0][0]])
    monkeypatch.undo()
    # a change killed after its commit: only a writer can finish it
    monkeypatch.setattr(journal, "_roll_forward", lambda root: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        remove_documents(ds3, [open_datastore(ds3).documents[0][0]])
    monkeypatch.undo()
    killed(ds3)
    monkeypatch.setattr(journal, "_try_lock", lambda root: (_ for _ in ()).throw(journal.ReadOnly("read-only")))
    with pytest.raises(KNNLMError, match="interrupted after its commit .* run `knnlm info"):
        open_datastore(ds3)
    monkeypatch.undo()
    assert len(open_datastore(ds3).meta["removed"]) == 1  # a writer finishes it


def test_an_add_interrupted_before_another_corpus_is_added_starts_afresh(ds3, three, tiny_lm, corpus_texts, tmp_path):
    seen = []

    def crash(n):
        seen.append(n)
        if len(seen) > 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add_documents(ds3, str(folder(tmp_path / "long", corpus_texts, ["textwrap.py", "shlex.py"])), lm=tiny_lm,
                      progress=crash)
    assert (ds3 / ".added.partial" / "progress.json").exists()
    other = folder(tmp_path / "other", corpus_texts, ["glob.py"])
    r = add_documents(ds3, str(other), lm=tiny_lm)  # before: "pass the same ones to --resume, or --overwrite"
    assert r["documents"] == 1 and not (ds3 / ".added.partial").exists()
    assert open_datastore(ds3).documents[-1][0].endswith("glob.py.txt")


def test_names_are_compared_as_paths_from_the_folder_the_build_ran_in(tiny_lm, tiny_model_dir, corpus_texts, tmp_path,
                                                                     monkeypatch):
    """A name stored relative to the build's folder names the same file from any other: adding it again, or a held-out
    document, from another folder was taken (the same keys twice; the test text in the datastore), and removing it
    by its path from there was refused."""
    build_dir = tmp_path / "a"
    folder(build_dir / "corpus", corpus_texts, DOCS)
    monkeypatch.chdir(build_dir)
    ds = build_datastore("corpus", "ds", BuildConfig(model=str(tiny_model_dir), **{**BUILD, "holdout": 0.25}),
                         lm=tiny_lm)
    assert ds.meta["corpus"]["cwd"] == str(build_dir) and not os.path.isabs(ds.documents[0][0])
    stored, (held, held_text) = ds.documents[0][0], ds.heldout("dev")[0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KNNLMError, match="is already in"):
        add_documents(build_dir / "ds", f"a/{stored}", lm=tiny_lm)
    with pytest.raises(KNNLMError, match="is held out of .* as its dev text"):
        add_documents(build_dir / "ds", f"a/{held}", lm=tiny_lm)
    # A held-out file whose text has changed since is still the held-out document, by its path.
    (build_dir / held).write_text((build_dir / held).read_text() + "\n# changed\n")
    with pytest.raises(KNNLMError, match="is held out of .* as its dev text"):
        add_documents(build_dir / "ds", str(build_dir / held), lm=tiny_lm)
    # A copy of a held-out document's text under another name is left out of an add, with a warning, and named in
    # its record; alone, it is refused.
    (tmp_path / "copy.txt").write_text(held_text)
    with pytest.raises(KNNLMError, match="copy.txt holds the text of a document held out of .* as its dev text"):
        add_documents(build_dir / "ds", "copy.txt", lm=tiny_lm)
    assert open_datastore(build_dir / "ds").count == ds.count  # nothing added
    mixed = folder(tmp_path / "mixed", {"copy": held_text, "other": "def g(y):\n    return y\n"},
                   ["copy", "other"])
    r = add_documents(build_dir / "ds", str(mixed), lm=tiny_lm)
    assert r["documents"] == 1 and r["heldout_copies"] == [str(mixed / "copy.txt")]
    assert open_datastore(build_dir / "ds").documents[-1][0] == str(mixed / "other.txt")
    # A document added from here is stored by its absolute path, so it is the same file from the build's folder.
    folder(tmp_path / "more", {"new": corpus_texts["keyword.py"] + "\n# more\n"}, ["new"])
    add_documents(build_dir / "ds", "more/new.txt", lm=tiny_lm)
    assert open_datastore(build_dir / "ds").documents[-1][0] == str(tmp_path / "more" / "new.txt")
    monkeypatch.chdir(build_dir)
    with pytest.raises(KNNLMError, match="is already in"):
        add_documents("ds", "../more/new.txt", lm=tiny_lm)
    monkeypatch.chdir(tmp_path)
    r = remove_documents(build_dir / "ds", [f"a/{stored}", "more/new.txt"])
    assert r["names"] == [stored, str(tmp_path / "more" / "new.txt")]
    # The build's folder through a link is the same folder: a stored file spelled through it is already in.
    (tmp_path / "link").symlink_to(build_dir)
    with pytest.raises(KNNLMError, match="is already in"):
        add_documents(build_dir / "ds", f"link/{ds.documents[1][0]}", lm=tiny_lm)


def test_a_build_from_a_folder_deleted_meanwhile_records_no_folder(tiny_lm, tiny_model_dir, corpus_texts, tmp_path,
                                                                  monkeypatch):
    src = folder(tmp_path / "corpus", corpus_texts, DOCS[:2])
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    ds = build_datastore(str(src), tmp_path / "ds", BuildConfig(model=str(tiny_model_dir), **BUILD), lm=tiny_lm)
    assert ds.meta["corpus"]["cwd"] is None and len(ds.documents) == 2
    with pytest.raises(KNNLMError, match="is already in"):  # absolute names need no folder
        add_documents(ds.path, str(src / "bisect.py.txt"), lm=tiny_lm)


def test_a_text_file_named_like_a_jsonl_line_is_no_line_of_another_file(tiny_lm, tiny_model_dir, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for name in ("log-10:30", "log-10:45"):
        (src / name).write_text(f"def at_{name[-2:]}(x):\n    return x + {name[-2:]}\n")
    ds = build_datastore(str(src), tmp_path / "ds", BuildConfig(model=str(tiny_model_dir), glob="*", **BUILD),
                         lm=tiny_lm)
    with pytest.raises(KNNLMError, match="is not a stored document"):
        remove_documents(ds.path, [str(src / "log-10")])
    assert remove_documents(ds.path, [str(src / "log-10:30")])["names"] == [str(src / "log-10:30")]


def test_add_reads_stdin_once_and_takes_stdin_again(ds3, tiny_model_dir, corpus_texts):
    for text in (corpus_texts["keyword.py"], corpus_texts["keyword.py"] + "\n# more\n"):
        r = CliRunner().invoke(cli, ["add", str(ds3), "-", "--model", str(tiny_model_dir)], input=text)
        assert r.exit_code == 0, r.output
    assert [d[0] for d in open_datastore(ds3).documents[-2:]] == ["<stdin>", "<stdin>"]


def test_remove_takes_a_jsonl_file_for_all_its_lines_and_info_lists_the_documents(ds3, tiny_lm, tmp_path):
    lines = tmp_path / "j.jsonl"
    lines.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(3)))
    add_documents(ds3, str(lines), lm=tiny_lm)
    names = [d[0] for d in open_datastore(ds3).documents]
    assert names[-3:] == [f"{lines}:{i}" for i in (1, 2, 3)]
    r = remove_documents(ds3, [str(lines)])
    assert r["documents"] == 3 and r["names"] == names[-3:]
    info = json.loads(invoke("info", ds3, "--json").stdout)
    assert info["documents"] == 3 and info["documents_removed"] == 3
    listed = json.loads(invoke("info", ds3, "--documents", "--json").stdout)["documents"]
    assert [(d["name"], d["removed"]) for d in listed] == [(n, n in names[-3:]) for n in names]
    text = invoke("info", ds3, "--documents").output.splitlines()
    assert len(text) == 6 and text[-1].startswith(f"{lines}:3\t") and text[-1].endswith("awaiting `knnlm compact`")
    assert "3 documents stored, 3 more removed" in invoke("info", ds3).output


def test_an_add_that_gives_no_tokens_does_not_name_holdout(ds3, tiny_model_dir, tmp_path):
    (tmp_path / "one.txt").write_text("x")  # one token: no next token to store
    r = invoke("add", ds3, tmp_path / "one.txt", "--model", tiny_model_dir)
    assert r.exit_code == 1 and "gave no tokens" in r.output and "one token long)" in r.output, r.output
    assert "holdout" not in r.output and "held out" not in r.output
    # A build names its --holdout as one way out (all of a one-token corpus's documents are held out or too short).
    for i in range(2):
        (tmp_path / "short" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "short" / f"{i}.txt").write_text("x")
    r = invoke("build-datastore", tmp_path / "short", "--model", tiny_model_dir, "--holdout", 0.3, "--out",
               tmp_path / "new")
    assert r.exit_code == 1 and "or held out); pass a larger corpus or a smaller --holdout." in r.output, r.output
