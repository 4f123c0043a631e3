"""Sharded builds (in-process and on Ray) merge into the arrays of an unsharded build; the index filled in
parts, in RAM or on disk, searches exactly like one filled in one go."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

import knnlm
from cli import build as cli_build
from cli.main import cli
from helpers import clustered, make_datastore
from knnlm.build import BuildConfig, build_datastore
from knnlm.datastore import foreign_entries, open_datastore
from knnlm.errors import KNNLMError
from knnlm.index import IndexConfig, load_index, read_index_info, train_index
from knnlm.scale import Engine, ShardConfig, build_sharded, plan_shards
from knnlm.scale import shards as shards_mod
from knnlm.scale import ivf as scale_ivf
from knnlm.scale.engines import RayRunner
from knnlm.scale.ivf import Adder


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for this module; its workers import this checkout's knnlm."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'knnlm[ray]')")
    root = str(Path(knnlm.__file__).resolve().parents[1])
    ray.init(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": root}}, log_to_driver=False,
             include_dashboard=False)
    yield ray
    ray.shutdown()


def _cfg(model_dir, **kw) -> BuildConfig:
    """Small windows and blocks, so that shards split documents and blocks span documents."""
    base = dict(model=str(model_dir), device="cpu", context=64, stride=32, holdout=0.2, batch_size=3,
                block_windows=8, glob="*.txt", build_index=False, max_tokens=5_000)
    return BuildConfig(**{**base, **kw})


def _assert_same(a, b) -> None:
    """Two datastores hold identical arrays, document tables and held-out parts."""
    assert a.count == b.count
    assert np.array_equal(np.asarray(a.keys), np.asarray(b.keys))
    assert np.array_equal(np.asarray(a.vals), np.asarray(b.vals))
    assert a.documents == b.documents
    assert a.heldout("dev") == b.heldout("dev") and a.heldout("test") == b.heldout("test")
    for k in ("dev_documents", "test_documents"):
        assert a.meta["holdout"][k] == b.meta["holdout"][k]
    assert a.meta["corpus"]["documents_skipped"] == b.meta["corpus"]["documents_skipped"]


@pytest.mark.parametrize("form", ["folder", "one document"])
def test_sharded_build_equals_unsharded(tiny_lm, tiny_model_dir, corpus_dir, form):
    corpus = str(corpus_dir if form == "folder" else corpus_dir / "textwrap.py.txt")
    cfg = _cfg(tiny_model_dir)
    whole = build_datastore(corpus, "whole", cfg, lm=tiny_lm)
    plan = plan_shards(tiny_lm, knnlm.corpus.open_corpus(corpus, "*.txt"), cfg, 3)
    assert len(plan["shards"]) == 3 and sum(s["rows"] for s in plan["shards"]) == whole.count
    assert any(s["start"]["window"] > 0 for s in plan["shards"])  # a shard starts inside a document
    seen = []
    sharded = build_sharded(corpus, "sharded", cfg, ShardConfig(shards=3), lm=tiny_lm, progress=seen.append,
                            total=seen.append)
    _assert_same(sharded, whole)
    assert seen[0] == whole.count and sum(seen[1:]) == whole.count  # the total, then every key once
    assert sharded.meta["build"]["shards"] == 3
    assert not Path("sharded.partial").exists() and not (sharded.path / "shards.json").exists()


def test_more_shards_than_blocks_uses_fewer(tiny_lm, tiny_model_dir, corpus_dir):
    cfg = _cfg(tiny_model_dir, max_tokens=300, block_windows=4)  # 300 keys: about 3 blocks
    whole = build_datastore(str(corpus_dir), "whole", cfg, lm=tiny_lm)
    sharded = build_sharded(str(corpus_dir), "sharded", cfg, ShardConfig(shards=16), lm=tiny_lm)
    _assert_same(sharded, whole)
    assert 1 < sharded.meta["build"]["shards"] < 16


def test_resume_runs_only_unfinished_shards(tiny_lm, tiny_model_dir, corpus_dir, monkeypatch):
    cfg = _cfg(tiny_model_dir)
    whole = build_datastore(str(corpus_dir), "whole", cfg, lm=tiny_lm)
    stored = []

    def crash(n):
        stored.append(n)
        if sum(stored) > whole.count * 0.6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_sharded(str(corpus_dir), "out", cfg, ShardConfig(shards=3), lm=tiny_lm, progress=crash)
    shard_dirs = sorted(Path("out.partial/shards").iterdir())
    done = {d.name for d in shard_dirs if json.loads((d / "progress.json").read_text()).get("done")}
    assert len(done) == 1 and not Path("out").exists()  # one shard whole, the second interrupted inside

    with pytest.raises(KNNLMError, match="--resume"):
        build_sharded(str(corpus_dir), "out", cfg, ShardConfig(shards=3), lm=tiny_lm)
    with pytest.raises(KNNLMError, match="sharded"):
        build_datastore(str(corpus_dir), "out", BuildConfig(**{**cfg.__dict__, "resume": True}), lm=tiny_lm)
    resume = BuildConfig(**{**cfg.__dict__, "resume": True})
    with pytest.raises(KNNLMError, match="other settings"):
        build_sharded(str(corpus_dir), "out", resume, ShardConfig(shards=2), lm=tiny_lm)

    ran = []
    fill = shards_mod._fill
    monkeypatch.setattr(shards_mod, "_fill", lambda lm, src, c, w, *a: (ran.append(w.work.name), fill(lm, src, c, w, *a)))
    again = build_sharded(str(corpus_dir), "out", resume, ShardConfig(shards=3), lm=tiny_lm)
    assert sorted(ran) == sorted({"0000", "0001", "0002"} - done)  # the unfinished and the unstarted
    _assert_same(again, whole)


def test_sharded_build_on_ray_equals_unsharded(ray_local, tiny_lm, tiny_model_dir, corpus_dir):
    cfg = _cfg(tiny_model_dir)
    whole = build_datastore(str(corpus_dir), "whole", cfg, lm=tiny_lm)
    seen = []
    on_ray = build_sharded(str(corpus_dir), "ray", cfg, ShardConfig(shards=2, engine=Engine.RAY),
                           lm=tiny_lm, progress=seen.append)
    _assert_same(on_ray, whole)
    assert sum(seen) == whole.count


def _search(ds_path, queries, nprobe=8):
    """(distances, ids) of the 10 nearest keys through the datastore's index."""
    ds = open_datastore(ds_path)
    index = load_index(ds)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(queries, 10)


@pytest.fixture
def synthetic(tmp_path):
    """A datastore of 12,000 clustered keys (d = 32), big enough for IVF-PQ, and queries near them."""
    keys = clustered(12_000, 32, seed=1)
    make_datastore(tmp_path / "ram", keys, np.arange(len(keys)) % 97)
    queries = keys[::97] + np.random.default_rng(2).normal(0, 0.5, size=(len(keys[::97]), 32)).astype(np.float32)
    return tmp_path, queries


def test_on_disk_index_searches_like_in_ram(synthetic, capfd):
    root, queries = synthetic
    shutil.copytree(root / "ram", root / "disk")
    cfg = IndexConfig(nlist=32, code_size=8, train_size=1024, seed=0)
    train_index(open_datastore(root / "ram"), cfg)
    info = train_index(open_datastore(root / "disk"), IndexConfig(nlist=32, code_size=8, train_size=1024, seed=0, on_disk=True))
    assert info["lists"] == "on-disk" and (root / "disk" / info["ivfdata"]).is_file()
    assert foreign_entries(root / "disk") == []  # a build may replace it (DATASTORE_ENTRIES)
    # The lists file is found beside index.faiss after the datastore moves.
    (root / "disk").rename(root / "moved")
    d_ram, i_ram = _search(root / "ram", queries)
    capfd.readouterr()
    d_disk, i_disk = _search(root / "moved", queries)
    seen = capfd.readouterr()  # faiss's notice at every read of the lists ("updating ondisk filename") is dropped
    assert "ondisk" not in seen.out and "ondisk" not in seen.err
    assert np.array_equal(i_ram, i_disk) and np.array_equal(d_ram, d_disk)
    assert (i_ram >= 0).all()
    out = CliRunner().invoke(cli, ["info", str(root / "moved")])
    assert out.exit_code == 0 and "inverted lists on disk" in out.output and info["ivfdata"] in out.output
    assert "inverted lists in RAM" in CliRunner().invoke(cli, ["info", str(root / "ram")]).output
    # Retraining in RAM replaces the lists file, which goes.
    train_index(open_datastore(root / "moved"), cfg)
    assert read_index_info(open_datastore(root / "moved"))["lists"] == "in RAM"
    assert not list((root / "moved").glob("*.ivfdata"))


def _lists(index) -> dict:
    """{id: (list number, code bytes)} of an IVF index's inverted lists."""
    ivf, out = faiss.extract_index_ivf(index), {}
    for no in range(ivf.nlist):
        n = ivf.invlists.list_size(no)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(no), n)
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(no), n * ivf.code_size).reshape(n, ivf.code_size)
        out.update((int(i), (no, bytes(c))) for i, c in zip(ids, codes))
    return out


def test_fast_add_fills_the_lists_faiss_add_fills():
    keys = clustered(12_000, 32, seed=1)
    index = faiss.index_factory(32, "IVF32,PQ8")
    index.train(keys[:4000])
    ref, fast = faiss.clone_index(index), faiss.clone_index(index)
    ref.add(keys)
    adder = Adder(fast)
    assert adder.fast
    for lo in range(0, len(keys), 5000):
        adder.add(keys[lo: lo + 5000], lo)
    assert fast.ntotal == ref.ntotal and _lists(fast) == _lists(ref)
    assert Adder(faiss.index_factory(32, "IVF32,PQ8x4fs")).fast is False  # left to faiss


def test_fast_scan_add_through_the_graph_fills_faiss_lists(monkeypatch):
    """Past LARGE_NLIST lists a fast-scan index's keys find their lists through the HNSW graph (standing in for
    the quantizer during faiss's add): the same lists and packed codes as faiss's own add wherever the graph
    finds the nearest centroid (here every key: 64 centroids), and the index keeps its flat quantizer."""
    keys = clustered(12_000, 32, seed=1)
    index = faiss.index_factory(32, "IVF64,PQ16x4fs")
    index.train(keys[:4000])
    ref, ours = faiss.clone_index(index), faiss.clone_index(index)
    ref.add_with_ids(keys, np.arange(len(keys)))
    monkeypatch.setattr(scale_ivf, "LARGE_NLIST", 64)
    adder = Adder(ours)
    assert adder.graph_only and not adder.fast and isinstance(adder.coarse, faiss.IndexHNSWFlat)
    for lo in range(0, len(keys), 5000):
        adder.add(keys[lo: lo + 5000], lo)
    assert isinstance(faiss.downcast_index(ours.quantizer), faiss.IndexFlat)
    assert ours.ntotal == ref.ntotal and _lists(ours) == _lists(ref)
    q = clustered(20, 32, seed=2)
    assert np.array_equal(ours.search(q, 50)[1], ref.search(q, 50)[1])
    # a sparse graph searched greedily misses some nearest centroids: the lists are then the graph's
    monkeypatch.setattr(scale_ivf, "ASSIGN_HNSW_M", 2)
    monkeypatch.setattr(scale_ivf, "ASSIGN_EF", 1)
    weak = Adder(faiss.clone_index(index))
    weak.add(keys, 0)
    graph = weak.coarse.search(keys, 1)[1][:, 0]
    listed = _lists(weak.index)
    assert all(listed[i][0] == graph[i] for i in range(len(keys)))
    assert (graph != index.quantizer.search(keys, 1)[1][:, 0]).any()
    monkeypatch.setattr(scale_ivf, "LARGE_NLIST", 4096)
    assert not Adder(faiss.clone_index(index)).graph_only  # fewer lists: faiss's flat assignment


def test_large_nlist_shortcuts_keep_search_quality(synthetic, monkeypatch):
    """Two-level k-means and HNSW coarse assignment (past LARGE_NLIST lists) find the true neighbours about
    as well as flat k-means and assignment; the saved index keeps its flat quantizer."""
    root, queries = synthetic
    shutil.copytree(root / "ram", root / "large")
    cfg = IndexConfig(nlist=64, code_size=8, train_size=4096, seed=0)
    train_index(open_datastore(root / "ram"), cfg)
    monkeypatch.setattr(scale_ivf, "LARGE_NLIST", 64)
    called = {}
    real_two_level = scale_ivf.two_level_clustering
    monkeypatch.setattr(scale_ivf, "two_level_clustering",
                        lambda *a, **kw: called.setdefault("two_level", real_two_level(*a, **kw)))
    train_index(open_datastore(root / "large"), cfg)
    assert "two_level" in called
    index = load_index(open_datastore(root / "large"))
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexFlat)
    assert isinstance(Adder(index).coarse, faiss.IndexHNSWFlat)  # keys found their lists through the graph
    # Coarse lists: the HNSW graph's choice is the flat quantizer's for nearly every key.
    ivf = faiss.extract_index_ivf(index)
    keys = np.asarray(open_datastore(root / "large").keys, dtype=np.float32)
    nearest = ivf.quantizer.search(keys, 1)[1][:, 0]
    assert np.mean([no == nearest[i] for i, (no, _) in _lists(index).items()]) > 0.99
    exact = np.argsort(((queries[:, None, :] - keys[None]) ** 2).sum(-1), axis=1)[:, :10]

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])

    assert recall(_search(root / "large", queries)[1]) > recall(_search(root / "ram", queries)[1]) - 0.05 > 0.5


def test_precomputed_table_is_bounded_on_disk(synthetic, monkeypatch):
    """With its lists on disk, IVF-PQ's precomputed table (nlist·M·256 floats) is made only up to a
    bound, so search memory stays flat as nlist grows; in RAM and in faiss's own setting nothing changes."""
    import knnlm.index as index_mod

    root, queries = synthetic
    shutil.copytree(root / "ram", root / "disk")
    cfg = dict(nlist=32, code_size=8, train_size=1024, seed=0)
    train_index(open_datastore(root / "ram"), IndexConfig(**cfg))
    train_index(open_datastore(root / "disk"), IndexConfig(**cfg, on_disk=True))
    before = faiss.cvar.precomputed_table_max_bytes
    table = lambda name: faiss.downcast_index(load_index(open_datastore(root / name))).precomputed_table.size()
    assert table("ram") == table("disk") == 32 * 8 * 256
    monkeypatch.setattr(index_mod, "ON_DISK_TABLE_MAX_BYTES", 32 * 8 * 256 * 4 - 1)
    assert table("disk") == 0 and table("ram") == 32 * 8 * 256
    assert faiss.cvar.precomputed_table_max_bytes == before
    # without the table the search computes the same terms per query: the same neighbours
    d_ram, i_ram = _search(root / "ram", queries)
    d_disk, i_disk = _search(root / "disk", queries)
    assert np.mean(i_ram == i_disk) > 0.99 and np.allclose(d_ram, d_disk, rtol=1e-4, atol=1e-3)


def test_index_parts_on_ray_search_like_one_add(ray_local, synthetic):
    root, queries = synthetic
    shutil.copytree(root / "ram", root / "parts")
    shutil.copytree(root / "ram", root / "parts-disk")
    cfg = IndexConfig(nlist=32, code_size=8, train_size=1024, seed=0)
    train_index(open_datastore(root / "ram"), cfg)
    added = []
    train_index(open_datastore(root / "parts"), cfg, progress=added.append, runner=RayRunner(3))
    train_index(open_datastore(root / "parts-disk"), IndexConfig(nlist=32, code_size=8, train_size=1024, seed=0, on_disk=True),
                runner=RayRunner(2))
    assert sum(added) == 12_000 and len(added) == 3
    d_ram, i_ram = _search(root / "ram", queries)
    for name in ("parts", "parts-disk"):
        d, i = _search(root / name, queries)
        assert np.array_equal(i, i_ram) and np.array_equal(d, d_ram)
    assert not list((root / "parts").glob(".index-parts-*"))  # the parts are cleaned up


def test_cli_shard_and_on_disk_flags_reach_their_configs(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake(corpus, out, cfg, shard_cfg, progress=None, total=None):
        seen.update(cfg=cfg, shard_cfg=shard_cfg)
        raise Stop

    monkeypatch.setattr(cli_build, "build_sharded", fake)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["build-datastore", str(tmp_path / "c.txt"), "--shards", "3", "--engine", "ray",
                                 "--ray-address", "auto", "--on-disk"], catch_exceptions=False)
    assert seen["shard_cfg"] == ShardConfig(shards=3, engine=Engine.RAY, ray_address="auto")
    assert seen["cfg"].index.on_disk
    def fake_index(ds, cfg, progress=None):
        seen.update(index=cfg)
        raise Stop

    monkeypatch.setattr(cli_build, "train_index", fake_index)
    make_datastore(tmp_path / "ds", clustered(100, 8), np.zeros(100))
    with pytest.raises(Stop):
        CliRunner().invoke(cli, ["train-index", str(tmp_path / "ds"), "--on-disk"], catch_exceptions=False)
    assert seen["index"].on_disk
    build = ["build-datastore", str(tmp_path / "c.txt"), "--shards", "2"]
    for command in (["train-index", str(tmp_path / "ds")], build):
        seen.clear()
        with pytest.raises(Stop):
            CliRunner().invoke(cli, [*command, "--fast-scan"], catch_exceptions=False)
        assert (seen.get("index") or seen["cfg"].index).fast_scan
    out = CliRunner().invoke(cli, ["build-datastore", str(tmp_path / "c.txt"), "--shards", "0"])
    assert out.exit_code == 1 and "--shards 0 must be at least 1" in out.output


def test_cli_sharded_build_and_info(tiny_model_dir, corpus_dir):
    out = CliRunner().invoke(cli, ["build-datastore", str(corpus_dir), "--model", str(tiny_model_dir), "--out", "ds",
                                   "--context", "64", "--stride", "32", "--max-tokens", "3000", "--shards", "2",
                                   "--no-index", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    info = CliRunner().invoke(cli, ["info", "ds"])
    assert "in 2 shards" in info.output and "3000 × 32" in info.output


def test_a_ray_address_with_no_cluster_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'knnlm[ray]')")
    import socket

    from knnlm.scale import engines

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "c.txt").write_text("x = 1\n" * 50)
    out = tmp_path / "ds"
    for address, words in [(closed, f"No Ray cluster answers at --ray-address {closed} (Connection refused)"),
                           ("10.0.0.5", "--ray-address 10.0.0.5 is not HOST:PORT")]:
        r = CliRunner().invoke(cli, ["build-datastore", str(tmp_path / "c.txt"), "--out", str(out), "--shards", "2",
                                     "--engine", "ray", "--ray-address", address, "--model", "no-such-model"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
        assert not out.exists() and not Path(f"{out}.partial").exists()  # refused before the model, or a folder
    assert calls == []  # Ray was not asked

    def no_cluster(**kwargs):  # what ray.init raises for "auto" where no cluster runs on this machine
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process (other tests here start Ray)
    with pytest.raises(KNNLMError, match=r"No Ray cluster answers at --ray-address auto \(Could not find any running "
                                         r"Ray instance\); start one there"):
        engines.ensure_ray("auto")


def test_resuming_a_sharded_build_killed_while_planning_starts_it_over(tiny_lm, tiny_model_dir, corpus_dir):
    """Killed before its plan was written, a sharded build left OUT.partial with no checkpoint of either kind; resumed
    with its --shards it starts over (before: "was not sharded; resume it without --shards")."""
    cfg = _cfg(tiny_model_dir)
    Path("out.partial").mkdir()
    (Path("out.partial") / "settings.json").write_text("{}")
    resume = BuildConfig(**{**cfg.__dict__, "resume": True})
    ds = build_sharded(str(corpus_dir), "out", resume, ShardConfig(shards=2), lm=tiny_lm)
    _assert_same(ds, build_datastore(str(corpus_dir), "whole", cfg, lm=tiny_lm))
