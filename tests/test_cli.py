"""The command line: bad input gets one sentence and a non-zero exit; every flag reaches its config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import knnlm.cli.build as cli_build
import knnlm.cli.evaluate as cli_eval
from knnlm.cli.main import cli
from knnlm.datastore import foreign_entries, open_datastore
from knnlm.errors import KNNLMError


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _one_sentence_error(result, *words):
    assert result.exit_code != 0
    msg = result.output.strip().splitlines()[-1]
    assert msg.startswith("Error: ")
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def built(tiny_model_dir, corpus_dir):
    r = run("build-datastore", corpus_dir, "--model", tiny_model_dir, "--glob", "*.txt", "--context", 64,
            "--stride", 32, "--holdout", 0.2)
    assert r.exit_code == 0, r.output
    return Path("datastores/default")


def test_build_eval_info_with_defaults(built, tiny_model_dir):
    assert (built / "keys.npy").exists() and not Path("datastores/default.partial").exists()
    r = run("eval", "--lambda", "0.25", "--k", 32, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["corpus"].startswith("test part") and out["tokens"] > 0
    assert out["lm_ppl"] > 1 and out["knn_lm_ppl"] > 1 and out["k"] == 32
    r = run("eval", "--lambda", "0", "--k", 8)
    assert r.exit_code == 0 and "kNN-LM perplexity" in r.output
    exact = json.loads(run("eval", "--lambda", "0.25", "--k", 32, "--exact", "--json").stdout)
    on_device = json.loads(run("eval", "--lambda", "0.25", "--k", 32, "--search-device", "cpu", "--json").stdout)
    assert on_device["knn_lm_ppl"] == pytest.approx(exact["knn_lm_ppl"], rel=1e-6)
    assert on_device["search_device"] == "cpu"
    _one_sentence_error(run("eval", "--search-device", "gpu0"), "--search-device", "not a torch device")
    partial = json.loads(run("eval", "--lambda", "0.25", "--k", 32, "--rerank-depth", 8, "--json").stdout)
    assert partial["rerank"] == "first 8"
    refused = run("eval", "--no-datastore", "--search-device", "cuda", "--model", tiny_model_dir)
    assert refused.exit_code == 2 and "--search-device" in refused.output
    r = run("info", "--json")
    info = json.loads(r.stdout)
    assert info["meta"]["count"] > 0 and info["index"]["kind"] in ("exact", "ivfpq")
    r = run("info")
    assert "index" in r.output and "held out" in r.output


def test_stdin_and_jsonl_corpora(tiny_model_dir, corpus_texts, tmp_path):
    text = corpus_texts["bisect.py"]
    r = run("build-datastore", "-", "--model", tiny_model_dir, "--out", "from-stdin", "--context", 64,
            "--stride", 32, "--no-index", input=text)
    assert r.exit_code == 0, r.output
    lines = [json.dumps({"body": t}) for t in corpus_texts.values()]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    r = run("build-datastore", tmp_path / "c.jsonl", "--text-field", "body", "--model", tiny_model_dir,
            "--out", "from-jsonl", "--context", 64, "--stride", 32, "--no-index", "--holdout", 0)
    assert r.exit_code == 0, r.output
    meta = json.loads(Path("from-jsonl/meta.json").read_text())
    assert len(meta["documents"]) == 7 and meta["documents"][0][0].endswith("c.jsonl:1")
    # Every line lacks the field asked for: the refusal says why, not only that no token came.
    msg = _one_sentence_error(run("build-datastore", tmp_path / "c.jsonl", "--model", tiny_model_dir, "--out",
                                  "wrong-field", "--no-index", "--holdout", 0), "gave no tokens",
                              "7 documents or files were skipped as unreadable and none was left",
                              "no string field 'text'", "pass the right --text-field")
    assert not Path("wrong-field").exists() and not Path("wrong-field.partial").exists(), msg
    # The same refusal from a sharded build's plan leaves no OUT.partial to refuse the next build.
    _one_sentence_error(run("build-datastore", tmp_path / "c.jsonl", "--model", tiny_model_dir, "--out", "wrong-field",
                            "--no-index", "--holdout", 0, "--shards", 2), "pass the right --text-field")
    assert not Path("wrong-field").exists() and not Path("wrong-field.partial").exists()
    # One file scored with --corpus is one document (its split's empty tails are not counted).
    (tmp_path / "one.txt").write_text(text)
    r = run("eval", "--datastore", "from-jsonl", "--exact", "--k", 8, "--corpus", tmp_path / "one.txt", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["documents"] == 1


def test_bad_input(tiny_model_dir, corpus_dir, tmp_path):
    m = ["--model", tiny_model_dir]
    _one_sentence_error(run("build-datastore", tmp_path / "nope.txt", *m), "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _one_sentence_error(run("build-datastore", tmp_path / "empty.txt", *m), "empty")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\x00\x01\x02")
    _one_sentence_error(run("build-datastore", tmp_path / "bin.txt", *m), "not a text file")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _one_sentence_error(run("build-datastore", tmp_path / "latin.txt", *m), "not UTF-8")
    _one_sentence_error(run("build-datastore", corpus_dir, *m, "--glob", "*.md"), "no files matching", "--glob")
    for glob in ("", "/abs/*.txt", "../*.txt", "a**b"):  # no traceback, and nothing read outside the folder
        _one_sentence_error(run("build-datastore", corpus_dir, *m, "--glob", glob), f"--glob {glob!r}", "'**/*.py'")
    _one_sentence_error(run("build-datastore", corpus_dir / "bisect.py.txt", "--model", tmp_path / "no-model"),
                        "not found", "offline")
    _one_sentence_error(run("build-datastore", corpus_dir / "bisect.py.txt", *m, "--stride", 600, "--context", 512),
                        "--stride")
    assert not Path("datastores/default").exists() and not Path("datastores/default.partial").exists()


def test_existing_output_is_never_touched(built, tiny_model_dir, corpus_dir):
    before = (built / "keys.npy").read_bytes()
    _one_sentence_error(run("build-datastore", corpus_dir, "--model", tiny_model_dir, "--glob", "*.txt"),
                        "already exists", "--overwrite")
    assert (built / "keys.npy").read_bytes() == before
    r = run("build-datastore", corpus_dir, "--model", tiny_model_dir, "--glob", "bisect*.txt", "--context", 64,
            "--stride", 32, "--overwrite", "--no-index")
    assert r.exit_code == 0, r.output
    assert (built / "keys.npy").read_bytes() != before and not (built / "index.faiss").exists()


def test_overwrite_replaces_only_a_datastore(tiny_model_dir, corpus_dir, tmp_path):
    build = ["build-datastore", corpus_dir, "--model", tiny_model_dir, "--glob", "bisect*.txt", "--context", 64,
             "--stride", 32, "--no-index", "--overwrite", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_sentence_error(run(*build, mine), str(mine), "holds files no datastore holds (notes.txt)", "--out")
    _one_sentence_error(run(*build[:-2], "--out", mine), "notes.txt")  # without --overwrite: the same
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(mine.iterdir()) == [mine / "notes.txt"]
    # A meta.json of any content does not make other files a datastore's.
    (mine / "meta.json").write_text("{garbage")
    _one_sentence_error(run(*build, mine), "(notes.txt)")
    assert (mine / "notes.txt").read_text() == "keep me"
    (mine / "meta.json").unlink()
    # Names a datastore uses, but no meta.json: somebody's keys.npy, not ours to replace.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keys.npy").write_bytes(b"not ours")
    _one_sentence_error(run(*build, theirs), "not a datastore (it has no meta.json)")
    assert (theirs / "keys.npy").read_bytes() == b"not ours"
    # A link is refused, whatever it points to (the build would end in replacing the link).
    (tmp_path / "link").symlink_to(tmp_path / "empty-target")
    _one_sentence_error(run(*build, tmp_path / "link"), "symbolic link")
    assert not (tmp_path / "empty-target").exists() and not (tmp_path / "link.partial").exists()
    (tmp_path / "file").write_text("keep me too")
    _one_sentence_error(run(*build, tmp_path / "file"), "is a file")  # click's own check of --out
    assert (tmp_path / "file").read_text() == "keep me too"
    # Reading the folder as a datastore does not send the user to --overwrite it.
    msg = _one_sentence_error(run("eval", "--datastore", mine), str(mine), "no meta.json", "--out NEW_FOLDER")
    assert "--overwrite" not in msg and "{" not in msg
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    r = run(*build, tmp_path / "empty")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "empty" / "meta.json").is_file()


def test_damaged_datastores(built):
    meta = (built / "meta.json").read_text()
    (built / "meta.json").write_text(meta[:50])
    _one_sentence_error(run("info"), "corrupt")
    (built / "meta.json").unlink()
    _one_sentence_error(run("eval"), "no meta.json")
    (built / "meta.json").write_text(meta)
    keys = built / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-4096])
    _one_sentence_error(run("eval"), "shorter than meta.json says")
    _one_sentence_error(run("eval", "--datastore", "nowhere"), "does not exist")
    Path("a.txt").write_text("x")
    with pytest.raises(KNNLMError, match=r"^a.txt is a file, not a datastore folder; pass the folder"):
        open_datastore("a.txt")


def test_every_build_flag_reaches_its_config(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def fake(corpus, out, cfg, progress=None):
        seen.update(corpus=corpus, out=out, cfg=cfg)
        raise Stop

    monkeypatch.setattr(cli_build, "build_datastore", fake)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(Stop):
        run("build-datastore", tmp_path / "c.txt", "--model", "m", "--out", "o", "--context", 100, "--stride", 50,
            "--batch-size", 3, "--holdout", 0.1, "--glob", "*.md", "--format", "jsonl", "--text-field", "body",
            "--strict", "--shuffle-seed", 7, "--max-tokens", 999, "--no-index", "--nlist", 64, "--code-size", 16,
            "--train-size", 5000, "--exact", "--seed", 3, "--overwrite", "--resume", "--device", "cpu",
            "--trust-remote-code")
    c = seen["cfg"]
    assert seen["out"] == "o"
    assert (c.model, c.context, c.stride, c.batch_size, c.holdout, c.glob, c.fmt, c.text_field) == \
        ("m", 100, 50, 3, 0.1, "*.md", "jsonl", "body")
    assert (c.shuffle_seed, c.max_tokens, c.build_index, c.overwrite, c.resume, c.device, c.trust_remote_code) == \
        (7, 999, False, True, True, "cpu", True)
    assert c.strict is True
    assert (c.index.nlist, c.index.code_size, c.index.train_size, c.index.exact, c.index.seed) == (64, 16, 5000, True, 3)


def test_every_eval_flag_reaches_its_config(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake(datastore, corpus, cfg, progress=None):
        seen.update(datastore=datastore, corpus=corpus, cfg=cfg)
        raise Stop

    monkeypatch.setattr(cli_eval, "run_eval", fake)
    with pytest.raises(Stop):
        run("eval", "--datastore", "d", "--corpus", "c.txt", "--glob", "*.py", "--lambda", "adaptive",
            "--temperature", 30, "--k", 5, "--nprobe", 3, "--no-rerank", "--context", 100, "--stride", 10,
            "--batch-size", 2, "--save-scores", "s.h5", "--model", "m", "--device", "cpu", "--trust-remote-code")
    c = seen["cfg"]
    assert (seen["datastore"], seen["corpus"]) == ("d", "c.txt")
    assert (c.lam, c.temperature, c.context, c.stride, c.batch_size, c.model, c.device, c.trust_remote_code,
            c.glob, c.save_scores) == ("adaptive", 30.0, 100, 10, 2, "m", "cpu", True, "*.py", "s.h5")
    r = c.retrieval
    assert (r.k, r.nprobe, r.rerank, r.exact) == (5, 3, False, False)


def test_datastore_env_var(monkeypatch, built):
    Path("datastores/default").rename("elsewhere")
    monkeypatch.setenv("KNNLM_DATASTORE", "elsewhere")
    r = run("info", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["path"] == "elsewhere"


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "knnlm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "build-datastore" in r.stdout


def test_tune_then_eval_tuned_and_adaptive(built, tmp_path):
    _one_sentence_error(run("eval", "--lambda", "adaptive"), "never tuned (no lambda.json)", "tune-lambda")
    r = run("tune-lambda", "--k", 32, "--bins", 4, "--min-bin-tokens", 20, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert Path(result["plot"]).stat().st_size > 1000
    assert (built / "dev-scores.h5").exists() and (built / "lambda.json").exists()
    assert foreign_entries(built) == []  # all a build may replace (DATASTORE_ENTRIES): the plot included
    assert 0 <= result["lambda"] < 1 and result["adaptive"]["lambdas"]
    r = run("eval", "--lambda", "tuned", "--k", 32, "--json")
    tuned = json.loads(r.stdout)
    assert tuned["temperature"] == result["temperature"] and "lambda.json" in tuned["lambda_source"]
    r = run("eval", "--lambda", "adaptive", "--k", 32, "--json")
    ada = json.loads(r.stdout)
    assert ada["temperature"] == result["adaptive"]["temperature"]
    # A plain number keeps the tuned temperature as its default.
    r = run("eval", "--lambda", "0.3", "--k", 32, "--json")
    assert json.loads(r.stdout)["temperature"] == result["temperature"]
    # Cached dev scores are reused: a second tuning gives the same answer without the LM.
    r = run("tune-lambda", "--k", 32, "--bins", 4, "--min-bin-tokens", 20, "--json", "--no-plot")
    assert "using cached scores" in r.output and json.loads(r.stdout)["lambda"] == result["lambda"]
    # From an eval --save-scores file.
    run("eval", "--k", 32, "--save-scores", tmp_path / "s.h5")
    _one_sentence_error(run("eval", "--k", 32, "--save-scores", tmp_path / "s.h5"), "already exists", "--overwrite")
    r = run("tune-lambda", "--scores", tmp_path / "s.h5", "--no-adaptive", "--json", "--no-plot")
    assert r.exit_code == 0 and json.loads(r.stdout)["adaptive"] is None
    _one_sentence_error(run("eval", "--lambda", "adaptive"), "no adaptive schedule")
    _one_sentence_error(run("eval", "--lambda", "1.5"), "--lambda")


def test_a_model_given_by_a_relative_path_is_found_from_any_folder(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_model_dir, "tiny")
    r = run("build-datastore", corpus_dir, "--model", "tiny", "--glob", "*.txt", "--context", 64, "--stride", 32,
            "--holdout", 0.2, "--max-tokens", 600, "--out", "ds")
    assert r.exit_code == 0, r.output
    assert json.loads(Path("ds/meta.json").read_text())["model"]["name"] == str(Path("tiny").resolve())
    monkeypatch.chdir(tmp_path / "..")  # elsewhere: "tiny" would name nothing here
    assert run("eval", "--datastore", tmp_path / "ds", "--k", 8, "--exact", "--json").exit_code == 0
    shutil.rmtree(tmp_path / "tiny")  # the model is gone: the sentence names the datastore's model and --model
    _one_sentence_error(run("eval", "--datastore", tmp_path / "ds", "--k", 8, "--exact"),
                        f"{tmp_path / 'ds'} was built with the model '{tmp_path / 'tiny'}', which cannot be loaded",
                        "pass --model with that model")


def test_a_few_documents_are_told_how_many_are_held_out(tiny_model_dir, corpus_dir, tmp_path):
    import shutil

    (tmp_path / "four").mkdir()
    for f in sorted(corpus_dir.glob("*.txt"))[:4]:
        shutil.copy(f, tmp_path / "four")
    r = run("build-datastore", tmp_path / "four", "--model", tiny_model_dir, "--context", 64, "--stride", 32,
            "--no-index", "--out", "four-ds")
    assert r.exit_code == 0 and "Note: 2 documents are held out and 2 stored" in r.output, r.output
    one = next(corpus_dir.glob("*.txt"))  # one document: its tails are held out, which needs no note
    r = run("build-datastore", one, "--model", tiny_model_dir, "--context", 64, "--stride", 32, "--no-index",
            "--out", "one-ds")
    assert r.exit_code == 0 and "Note:" not in r.output, r.output


def test_an_output_named_as_one_of_the_datastore_s_own_files_is_refused_even_with_overwrite(built, tmp_path):
    """--save-scores, --report, --plot and --html that name a file the datastore holds (before: written over it with
    --overwrite, every later command failing), and --save-scores and --report naming one file (before: the page
    replaced the scores, silently)."""
    ds = built
    before = {p.name: p.read_bytes() for p in ds.iterdir() if p.is_file() and p.name != ".lock"}
    _one_sentence_error(run("eval", "--k", 32, "--save-scores", ds / "keys.npy", "--overwrite"),
                        "the datastore's own keys.npy", "outside")
    _one_sentence_error(run("eval", "--k", 32, "--save-scores", ds / "keys.npy"), "the datastore's own")  # not
    # "pass --overwrite", which is refused too
    _one_sentence_error(run("eval", "--k", 32, "--report", ds / "meta.json", "--overwrite"),
                        "the datastore's own meta.json")
    _one_sentence_error(run("tune-lambda", "--k", 32, "--plot", ds / "index.faiss", "--overwrite"),
                        "the datastore's own index.faiss")
    _one_sentence_error(run("neighbors", "import os", "--html", ds / "vals.npy", "--overwrite"),
                        "the datastore's own vals.npy")
    assert {p.name: p.read_bytes() for p in ds.iterdir() if p.is_file() and p.name != ".lock"} == before
    same = tmp_path / "same.out"
    _one_sentence_error(run("eval", "--k", 32, "--save-scores", same, "--report", same), "both name", "two files")
    assert not same.exists()


def test_without_overwrite_a_file_written_meanwhile_is_refused_at_the_write(built, tmp_path, monkeypatch):
    """--save-scores and --report without --overwrite reach the exclusive write: a file another process wrote after
    the check before the work (here: the check made blind) is refused at the write, not replaced."""
    import knnlm.evaluate
    import knnlm.report
    import knnlm.scores

    for module in (knnlm.evaluate, knnlm.report, knnlm.scores):
        monkeypatch.setattr(module, "refuse_existing", lambda path, overwrite: None)
    for flag, name in (("--save-scores", "s.h5"), ("--report", "r.html")):
        path = tmp_path / name
        path.write_text("another process's")
        _one_sentence_error(run("eval", "--k", 32, flag, path), "written by another process while this one ran")
        assert path.read_text() == "another process's"
        assert run("eval", "--k", 32, flag, path, "--overwrite").exit_code == 0  # replaced when asked
        assert path.read_bytes() != b"another process's"
    # tune-lambda's --plot, the same way (tuned on the scores just saved, so no LM pass).
    import knnlm.cli.tune

    monkeypatch.setattr(knnlm.cli.tune, "refuse_existing", lambda path, overwrite: None)
    plot = tmp_path / "p.png"
    plot.write_text("another process's")
    _one_sentence_error(run("tune-lambda", "--scores", tmp_path / "s.h5", "--no-adaptive", "--plot", plot),
                        "written by another process while this one ran")
    assert plot.read_text() == "another process's"
    assert run("tune-lambda", "--scores", tmp_path / "s.h5", "--no-adaptive", "--plot", plot,
               "--overwrite").exit_code == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
