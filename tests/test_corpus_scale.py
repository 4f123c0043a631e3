"""Corpora at scale (Parquet, HF datasets folders, unreadable files skipped) and two holes (--nprobe 0, a
damaged index.faiss)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import clustered, make_datastore, read_json, without_polysemous_training
from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.corpus import iter_documents, open_corpus
from knnlm.datastore import open_datastore
from knnlm.errors import KNNLMError
from knnlm.index import IndexConfig, load_index, train_index
from knnlm.retrieval import RetrievalConfig, Retriever

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3) for i in range(11)]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_sentence(result, *words) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error: "), result.output
    for w in words:
        assert w in msg, msg
    return msg


def write_parquet(path: Path, texts: list, row_group_size: int = 3) -> Path:
    """A Parquet file of (text, id) rows, in several row groups."""
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def texts_of(corpus) -> list[str]:
    return [text for _, _, _, text in iter_documents(corpus, 0.0)]


def test_parquet_file_and_folder_are_streamed_in_row_order(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", TEXTS)
    c = open_corpus(str(f))
    assert [r.name for r in c.docs] == [f"{f}:{i}" for i in range(len(TEXTS))]
    assert texts_of(c) == TEXTS
    # Shuffled order reads the rows out of order (restarting the stream): the same documents.
    shuffled = open_corpus(str(f), shuffle_seed=3)
    assert sorted(texts_of(shuffled)) == sorted(TEXTS) and texts_of(shuffled) != TEXTS
    d = tmp_path / "folder"
    d.mkdir()
    write_parquet(d / "part-0.parquet", TEXTS[:5])
    write_parquet(d / "part-1.parquet", TEXTS[5:], row_group_size=2)
    for kw in ({}, {"fmt": "parquet"}, {"glob": "*.parquet"}):  # found by default, by format, by glob
        assert texts_of(open_corpus(str(d), **kw)) == TEXTS


def test_table_columns_are_checked(tmp_path):
    f = write_parquet(tmp_path / "a.parquet", TEXTS)
    with pytest.raises(KNNLMError, match="no column 'body'.*--text-field"):
        open_corpus(str(f), text_field="body")
    with pytest.raises(KNNLMError, match="holds int64, not text"):
        open_corpus(str(f), text_field="id")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    one_sentence(invoke("build-datastore", tmp_path / "bad.parquet", "--no-index"), "bad.parquet",
                 "not a readable Parquet file")
    pq.write_table(pa.table({"text": ["a b c", None]}), tmp_path / "null.parquet")
    with pytest.raises(KNNLMError, match="null"):
        texts_of(open_corpus(str(tmp_path / "null.parquet")))


def test_hf_datasets_folder_written_by_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": TEXTS, "n": list(range(len(TEXTS)))})
    ds = ds.shuffle(seed=1).select(range(9))  # an indices mapping, as real pipelines leave
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    c = open_corpus(str(tmp_path / "hf"), text_field="content")
    assert texts_of(c) == list(ds["content"]) and len(c.files) == 2
    assert texts_of(open_corpus(str(tmp_path / "hf"), fmt="hf", text_field="content")) == list(ds["content"])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(KNNLMError, match="several splits.*train, test.*dd/train"):
        open_corpus(str(tmp_path / "dd"))
    with pytest.raises(KNNLMError, match="not a Hugging Face datasets folder"):
        open_corpus(str(tmp_path), fmt="hf")
    with pytest.raises(KNNLMError, match="is a file; pass the folder"):
        open_corpus(str(tmp_path / "hf" / "state.json"), fmt="hf")


def bad_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    for i, t in enumerate(TEXTS[:4]):
        (d / f"{i}.txt").write_text(t)
    (d / "1b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # binary: NUL at the start
    (d / "2b.txt").write_bytes(("x = 1\n" * 3000 + "caf\xe9\n").encode("latin-1"))  # not UTF-8, far in
    return d


def test_unreadable_files_of_a_folder_are_skipped_and_named(tmp_path):
    d = bad_folder(tmp_path)
    c = open_corpus(str(d), strict=False)
    assert c.unreadable == [str(d / "1b.txt")]  # found when listed (NUL in the first bytes)
    got = list(iter_documents(c, 0.0))
    assert [t for _, _, _, t in got] == TEXTS[:4]
    assert c.unreadable == [str(d / "1b.txt"), str(d / "2b.txt")]  # found when read
    # 1b.txt never became a document; 2b.txt (number 3) keeps its number, so the held-out parts stay put.
    assert [seq for seq, *_ in got] == [0, 1, 2, 4]
    with pytest.raises(KNNLMError, match="1b.txt is not a text file"):
        open_corpus(str(d), strict=True)
    (d / "1b.txt").unlink()
    c = open_corpus(str(d), strict=True)
    with pytest.raises(KNNLMError, match="2b.txt is not UTF-8"):
        list(iter_documents(c, 0.0))
    # A single unreadable file fails whatever --strict says.
    with pytest.raises(KNNLMError, match="not UTF-8"):
        list(iter_documents(open_corpus(str(d / "2b.txt"), strict=False), 0.0))


def test_a_dangling_link_in_a_folder_is_skipped_and_named_not_dropped_silently(tmp_path, caplog):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("x = 1\n")
    (d / "b.txt").symlink_to(tmp_path / "gone.txt")
    c = open_corpus(str(d), strict=False)
    assert [r.name for r in c.docs] == [str(d / "a.txt")] and c.unreadable == [str(d / "b.txt")]
    assert "b.txt is a link to" in caplog.text and [f["path"] for f in c.files] == [str(d / "a.txt")]
    with pytest.raises(KNNLMError, match=r"b.txt is a link to .*gone.txt, which does not exist; fix the link"):
        open_corpus(str(d), strict=True)


def test_many_skipped_documents_name_the_first_few_and_count_the_rest(tmp_path, caplog):
    from knnlm.corpus import SKIP_WARNINGS

    lines = ['{"text": "x = 1"}'] + ['{"body": "no text here"}'] * (SKIP_WARNINGS + 25) + ['{"text": "y = 2"}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    c = open_corpus(str(tmp_path / "c.jsonl"), strict=False)
    with caplog.at_level("WARNING", logger="knnlm.corpus"):
        got = [t for _, _, _, t in iter_documents(c, 0.0)]
    assert got == ["x = 1", "y = 2"] and len(c.unreadable) == SKIP_WARNINGS + 25  # every one recorded
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(named) == SKIP_WARNINGS and named[0].startswith(f"skipping {tmp_path / 'c.jsonl'}:2:")
    assert sum("counted, not named" in r.getMessage() for r in caplog.records) == 1


def test_a_text_field_for_plain_text_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "b.jsonl").write_text('{"body": "y = 2"}\n')
    with pytest.raises(KNNLMError, match=r"--text-field body names a JSONL field or a table's column, and .*a.txt "
                                         r"holds only plain text; leave it out, or pass --format jsonl"):
        open_corpus(str(tmp_path / "a.txt"), text_field="body")
    with pytest.raises(KNNLMError, match=r"--text-field body .* the files of .* matching --glob '\*\*/\*.txt' hold only "
                                         r"plain text; leave it out, or pass the files that have it, e.g. --glob"):
        open_corpus(str(tmp_path), text_field="body")  # the default --glob leaves out b.jsonl
    assert [t for *_, t in iter_documents(open_corpus(str(tmp_path / "b.jsonl"), text_field="body"), 0.0)] == ["y = 2"]
    both = open_corpus(str(tmp_path), glob="*.*", text_field="body")  # the field applies to the JSONL file in it
    assert [t for *_, t in iter_documents(both, 0.0)] == ["x = 1\n", "y = 2"]


def test_a_parquet_file_read_as_text_is_named_as_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["x = 1", "y = 2"]}), tmp_path / "t.parquet")
    for fmt in ("jsonl", "text"):
        with pytest.raises(KNNLMError, match=r"t.parquet is a Parquet file, read here as text; pass --format parquet"):
            open_corpus(str(tmp_path / "t.parquet"), fmt=fmt)
    (tmp_path / "t.parquet").rename(tmp_path / "t.txt")  # by its bytes, not its name; and a lone file read whole
    with pytest.raises(KNNLMError, match=r"t.txt is a Parquet file"):
        list(iter_documents(open_corpus(str(tmp_path / "t.txt"), fmt="text"), 0.0))


def test_build_skips_unreadable_files_and_says_so(tmp_path, tiny_model_dir):
    d = bad_folder(tmp_path)
    common = ["--model", tiny_model_dir, "--context", 32, "--stride", 16, "--holdout", 0, "--no-index"]
    r = invoke("build-datastore", d, "--out", "ds", *common)
    assert r.exit_code == 0, r.output
    assert "Skipped 2 unreadable" in r.output and "1b.txt" in r.output
    meta = read_json("ds/meta.json")
    assert meta["corpus"]["unreadable"] == {"count": 2, "names": [str(d / "1b.txt"), str(d / "2b.txt")]}
    assert len(meta["documents"]) == 4
    one_sentence(invoke("build-datastore", d, "--out", "strict", "--strict", *common), "1b.txt", "not a text file")
    assert not Path("strict").exists() and not Path("strict.partial").exists()


def test_build_from_parquet_equals_build_from_text_files(tmp_path, tiny_lm, tiny_model_dir):
    d = tmp_path / "txt"
    d.mkdir()
    for i, t in enumerate(TEXTS[:4]):
        (d / f"{i}.txt").write_text(t)
    f = write_parquet(tmp_path / "c.parquet", TEXTS[:4], row_group_size=1)
    cfg = BuildConfig(model=str(tiny_model_dir), context=32, stride=16, holdout=0, build_index=False)
    a = build_datastore(str(d), tmp_path / "a", cfg, lm=tiny_lm)
    b = build_datastore(str(f), tmp_path / "b", cfg, lm=tiny_lm)
    assert np.array_equal(a.keys, b.keys) and np.array_equal(a.vals, b.vals)
    assert [x[0] for x in b.documents] == [f"{f}:{i}" for i in range(4)]


# §5: two holes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nprobe", [0, -3])
def test_nprobe_below_one_is_refused(nprobe, tmp_path):
    with pytest.raises(KNNLMError, match=f"--nprobe {nprobe} must be at least 1"):
        RetrievalConfig(nprobe=nprobe)
    make_datastore(tmp_path / "ds", clustered(40, 8), np.zeros(40))
    one_sentence(invoke("neighbors", "--datastore", tmp_path / "ds", "x", "--nprobe", nprobe), "--nprobe")


@pytest.fixture
def ivf(tmp_path) -> Path:
    path = make_datastore(tmp_path / "ivf", clustered(12000, 16), np.zeros(12000))
    with without_polysemous_training():
        train_index(open_datastore(path), IndexConfig(nlist=16, code_size=4))
    return path


@pytest.mark.parametrize("damage", ["truncate-header", "truncate-half", "truncate-last-byte", "garbage",
                                    "garbage-after-magic"])
def test_a_damaged_ivf_index_is_one_sentence(ivf, damage):
    path = ivf / "index.faiss"
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    path.write_bytes({"truncate-header": data[:6], "truncate-half": data[: len(data) // 2],
                      "truncate-last-byte": data[:-1], "garbage": rng.bytes(4000),
                      "garbage-after-magic": data[:4] + rng.bytes(4000)}[damage])
    with pytest.raises(KNNLMError, match=r"index.faiss is damaged.*knnlm train-index"):
        load_index(open_datastore(ivf))


def test_garbled_ids_in_an_index_are_one_sentence(ivf):
    ds = open_datastore(ivf)
    index = load_index(ds)
    lists = faiss.extract_index_ivf(index).invlists
    for lst in range(16):  # faiss reads such a file without complaint; the ids would index past keys.npy
        n = lists.list_size(lst)
        if n:
            faiss.rev_swig_ptr(lists.get_ids(lst), n)[:] += 10**9
    faiss.write_index(index, str(ivf / "index.faiss"))
    r = Retriever(open_datastore(ivf), RetrievalConfig(k=5, nprobe=16))
    with pytest.raises(KNNLMError, match=r"index.faiss is damaged.*knnlm train-index"):
        r.search(clustered(3, 16, seed=1))


def test_info_json_lists_updates(tmp_path):
    path = make_datastore(tmp_path / "ds", clustered(40, 8), np.zeros(40))
    r = invoke("info", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["updates"]["add"] == {"documents": 0, "keys": 0}
