"""The HTML report: its data against the scores (gains, tokens, neighbours, ✓), and the page in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import knnlm.cli.evaluate as cli_eval
from knnlm.api import KNNLM
from knnlm.build import BuildConfig, build_datastore
from knnlm.cli.main import cli
from knnlm.combine import resolve_combiner
from knnlm.errors import KNNLMError
from knnlm.evaluate import EvalConfig, search_settings
from knnlm.interpolate import interpolate, knn_log_prob, masked_distances, neighbor_log_weights
from knnlm.neighbors import neighbors
from knnlm.report import report_eval, write_neighbors_html
from knnlm.report.data import build_report_data, knn_top, shown_count, shown_rows, token_pieces
from knnlm.report.gather import lm_top_tokens, neighbor_contexts, neighbor_ids
from knnlm.retrieval import RetrievalConfig, Retriever
from knnlm.scores import Scores

CHROMIUM = os.environ.get("KNNLM_CHROMIUM", "/usr/bin/chromium")
DETAIL = 2000  # detailed tokens of the browser-tested page (ten times that are shown: all of the test text)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_lm, tiny_model_dir, corpus_texts):
    """A datastore of 5 of the 7 corpus files (1 dev, 1 test held out), exact index."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in corpus_texts.items():
        (corpus / f"{name}.txt").write_text(text)
    cfg = BuildConfig(model=str(tiny_model_dir), context=64, stride=32, holdout=0.2, glob="*.txt")
    return build_datastore(str(corpus), str(root / "ds"), cfg, lm=tiny_lm)


@pytest.fixture(scope="module")
def evaluated(store, tiny_lm, tmp_path_factory):
    """The test part evaluated with λ 0.25, k 16, and its report page."""
    cfg = EvalConfig(lam="0.25", retrieval=RetrievalConfig(k=16, exact=True))
    retriever = Retriever(store, cfg.retrieval)
    path = tmp_path_factory.mktemp("page") / "report.html"
    result, scores = report_eval(store, None, cfg, path, DETAIL, lm=tiny_lm, retriever=retriever)
    combiner = resolve_combiner(cfg.lam, store.path, search=search_settings(store, retriever))
    return {"ds": store, "lm": tiny_lm, "retriever": retriever, "result": result, "scores": scores,
            "combiner": combiner, "path": path, "docs": store.heldout("test")}


def _page_data(path: Path) -> dict:
    """The JSON inlined in a report page."""
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    return json.loads(m.group(1))


def test_data_against_the_scores(evaluated):
    ds, lm, s, retriever = evaluated["ds"], evaluated["lm"], evaluated["scores"], evaluated["retriever"]
    detail = 200
    docs = [(name, lm.encode(text)) for name, text in evaluated["docs"]]
    ids = neighbor_ids(retriever, s, detail)
    rows = shown_rows(ids, 8)
    contexts = neighbor_contexts(ds, rows, 20)
    mixed, lams = evaluated["combiner"].target_log_probs(s), evaluated["combiner"].lambdas(s)
    lm_top = lm_top_tokens(lm, docs, s, detail, 64, 32)
    data = build_report_data(s, docs, mixed, lams, ids, contexts, lm.decode, 1.0, lm_top=lm_top,
                             detail_tokens=detail)
    n, shown = len(s), shown_count(len(s), detail)
    assert (data["tokens_scored"], data["tokens_shown"], data["tokens_detailed"]) == (n, shown, detail)
    # Which tokens: the scored targets, in order, documents as contiguous ranges after their first token.
    assert data["tokens"] == s.targets[:shown].tolist()
    cut = np.flatnonzero(np.diff(s.doc[:shown])) + 1  # where a new document starts among the shown tokens
    edges = [0, *cut.tolist(), shown]
    assert [(d["start"], d["end"]) for d in data["docs"]] == list(zip(edges[:-1], edges[1:]))
    assert shown < n  # tokens past ten times the detailed ones are left out of the text
    assert all(d["first"] == docs[d["doc"]][1][:1] for d in data["docs"])
    # The text shown: each document's tokens before and among the shown ones, decoded, split by token.
    assert len(data["pieces"]) == shown
    for d in data["docs"]:
        shown_ids = docs[d["doc"]][1][: len(d["first"]) + d["end"] - d["start"]]
        assert d["first_text"] + "".join(data["pieces"][d["start"]: d["end"]]) == lm.decode(shown_ids)
    # Gains: the brute-force mix minus the LM.
    ref = interpolate(s.lm_logp, knn_log_prob(s.dists, s.vals, s.targets, 1.0), 0.25) - s.lm_logp
    np.testing.assert_allclose(data["gain"], ref[:shown], atol=6e-4)
    np.testing.assert_allclose(data["detail"]["lam"], 0.25)
    # Neighbours: at most 8, the stored values of the scores, ✓ exactly where the stored token is the target.
    assert len(data["detail"]["nbrs"]) == detail
    assert sum(any(ok for _, _, ok in nb) for nb in data["detail"]["nbrs"]) > 0
    for i, nb in enumerate(data["detail"]["nbrs"]):
        assert len(nb) == min(8, int((s.vals[i] >= 0).sum()))
        assert [ok for _, _, ok in nb] == (s.vals[i, :len(nb)] == s.targets[i]).astype(int).tolist()
        np.testing.assert_allclose([d for _, d, _ in nb], s.dists[i, :len(nb)], rtol=1e-3)
        assert [data["rows"][r][3] for r, _, _ in nb] == s.vals[i, :len(nb)].tolist()
    # Only the rows shown are in the table, each with the datastore's own document, offset and context.
    assert len(data["rows"]) == len(set(ids[:detail, :8][ids[:detail, :8] >= 0].tolist()))
    for row, (name, offset, ctx, nxt) in zip(rows.tolist(), data["rows"]):
        want_name, want_offset, want_ctx = ds.context_tokens(row, 20)
        assert (name, offset, ctx) == (want_name, want_offset, lm.decode(want_ctx))
        assert nxt == int(ds.vals[row])
    # p_kNN's top 5: the brute-force sum of neighbour weights per token.
    for i in range(0, detail, 37):
        w = np.exp(neighbor_log_weights(masked_distances(s.dists[i:i + 1], s.vals[i:i + 1]), 1.0)[0])
        for t, p in data["detail"]["knn_top"][i]:
            assert p == pytest.approx(w[s.vals[i] == t].sum(), abs=1e-4)
    # The LM's top 5 and the neighbour rows agree with `knnlm neighbors` at the same positions.
    text = evaluated["docs"][0][1]
    for i in (0, 63, 150):
        r = neighbors(lm, retriever, text, int(s.pos[i]) - 1, top=8)
        assert [p["token"] for p in r["lm"]] == [t for t, _ in data["detail"]["lm_top"][i]]
        assert [nb["row"] for nb in r["neighbors"]] == ids[i, :8].tolist()
        assert [nb["is_target"] for nb in r["neighbors"]] == [bool(ok) for _, _, ok in data["detail"]["nbrs"][i]]


def test_data_of_handmade_scores():
    # 2 documents; tokens 0-1 in doc 0, token 2 in doc 1; one detailed token.
    inf = np.inf
    s = Scores(np.array([5, 6, 7], np.int32), np.log([0.5, 0.25, 0.1]),
               np.array([[1.0, 2.0, inf], [0.5, 1.0, 3.0], [2.0, 2.0, 2.0]], np.float32),
               np.array([[5, 9, -1], [6, 6, 1], [7, 1, 1]], np.int32), np.array([0, 0, 1], np.int32),
               np.array([1, 2, 1], np.int32))
    mixed = np.log([0.6, 0.2, 0.1])
    ids = np.array([[10, 11, -1]])
    decode = lambda t: "".join(f"<{x}>" for x in t)  # noqa: E731
    data = build_report_data(s, [("a", [4, 5, 6]), ("b", [3, 7])], mixed, np.array([0.5, 0.5, 0.0]), ids,
                             {10: ("a", 3, [1, 2], 5), 11: ("b", 0, [3], 9)}, decode, 1.0, detail_tokens=1,
                             neighbors=2)
    np.testing.assert_allclose(data["gain"], np.log([0.6 / 0.5, 0.2 / 0.25, 1.0]), atol=1e-3)
    assert data["docs"] == [{"doc": 0, "name": "a", "first": [4], "first_text": "<4>", "start": 0, "end": 2},
                            {"doc": 1, "name": "b", "first": [3], "first_text": "<3>", "start": 2, "end": 3}]
    assert data["pieces"] == ["<5>", "<6>", "<7>"]
    assert data["detail"]["nbrs"] == [[[0, 1.0, 1], [1, 2.0, 0]]]
    assert data["rows"] == [["a", 3, "<1><2>", 5], ["b", 0, "<3>", 9]]
    # A search again may order tied neighbours otherwise than the scores: each row shows the datastore's own next
    # token, and ✓ says whether that is the target (before: the scores' value at the row's rank, another row's).
    swapped = build_report_data(s, [("a", [4, 5, 6]), ("b", [3, 7])], mixed, np.array([0.5, 0.5, 0.0]),
                                np.array([[11, 10, -1]]), {10: ("a", 3, [1, 2], 5), 11: ("b", 0, [3], 9)}, decode,
                                1.0, detail_tokens=1, neighbors=2)
    assert swapped["rows"] == data["rows"] and swapped["detail"]["nbrs"] == [[[1, 1.0, 0], [0, 2.0, 1]]]
    w = np.exp([-1.0, -2.0]) / np.exp([-1.0, -2.0]).sum()
    assert data["detail"]["knn_top"] == [[[5, round(w[0], 4)], [9, round(w[1], 4)]]]
    assert data["vocab"]["5"] == "<5>" and data["detail"]["lm_top"] is None
    assert knn_top(s.dists[2], s.vals[2], 1.0) == [(1, pytest.approx(2 / 3)), (7, pytest.approx(1 / 3))]
    assert sum(data["hist"]["lambda"]["count"]) == 3


def test_token_pieces_keep_characters_split_across_tokens():
    """Each token's share of the text: a character whose bytes span tokens shows whole, on the token that ends it
    (before: every token decoded alone, an emoji became four replacement characters)."""
    text = "a🐍b 👨\u200d👩 é\r\n中文\t</script>"
    ids = list(text.encode("utf-8"))  # a byte-level vocabulary of one token per byte

    def decode(t):
        return bytes(t).decode("utf-8", errors="replace")

    pieces = token_pieces(decode, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert pieces[1:5] == ["", "", "", "🐍"] and "\ufffd" not in "".join(pieces)
    assert token_pieces(decode, ids[:3]) == ["a", "", "\ufffd"]  # cut short: the bytes there show as they decode
    # Byte fallback (Llama's, Mistral's): a run of raw bytes that is not whole UTF-8 decodes to one "\ufffd" per
    # byte, the bytes before it too (before: "👍🏽" became "👍����"); a literal "\ufffd" is a character of its own.
    def fallback(t):
        try:
            return bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd" * len(t)

    for text in ("👍🏽", "a🐍\ufffdb", "\ufffd 🐍", "x🐍"):
        ids = list(text.encode("utf-8"))
        for dec in (decode, fallback):
            assert "".join(token_pieces(dec, ids)) == text, (text, dec)
    assert token_pieces(fallback, list("👍🏽".encode("utf-8"))) == ["", "", "", "👍", "", "", "", "🏽"]
    # A decoder that drops a leading space (SentencePiece's) keeps the spaces between tokens.
    words = {1: " the", 2: " cat", 3: "s"}

    def sp_decode(t):
        return "".join(words[x] for x in t).lstrip(" ")

    assert token_pieces(sp_decode, [1, 2, 3]) == ["the", " cat", "s"]


def test_placeholders_in_the_title_or_text_are_left_as_they_are(tmp_path):
    """A corpus named "__DATA__" (the title) or text holding "__TITLE__" stays as it is (before: the data went
    into the title and the page was blank)."""
    from knnlm.report.render import render_html

    page = render_html({"text": "__TITLE__ and __DATA__"}, "report of __DATA__")
    (tmp_path / "p.html").write_text(page)
    assert _page_data(tmp_path / "p.html") == {"text": "__TITLE__ and __DATA__", "title": "report of __DATA__"}
    assert "<title>report of __DATA__" in page


def test_page_is_self_contained(evaluated):
    page = evaluated["path"].read_text()
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)="(?!data:)', page)
    assert "@import" not in page and "fetch(" not in page
    data = _page_data(evaluated["path"])
    assert data["summary"]["knn_lm_ppl"] == pytest.approx(evaluated["result"]["knn_lm_ppl"])
    assert evaluated["result"]["report_bytes"] == evaluated["path"].stat().st_size


def _browser():
    """A playwright-driven Debian chromium, or pytest.skip with the reason it is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Python package playwright is not installed (pip install playwright; `make install` does)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    return sync_playwright


def test_report_in_a_real_browser(evaluated, tmp_path):
    sync_playwright = _browser()
    s, data = evaluated["scores"], _page_data(evaluated["path"])
    errors = []
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM)
        except Exception as e:  # a chromium that cannot start here is reported, never passed over silently
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(evaluated["path"].resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("span.t").count() == len(s)
        # The page's text is the documents' decoded tokens, character for character.
        ids = evaluated["lm"].encode(evaluated["docs"][0][1])
        assert page.locator("pre.body").first.inner_text() == evaluated["lm"].decode(ids[: data["docs"][0]["end"] + 1])
        # A token whose target is among its neighbours shows that neighbour with a ✓.
        i = next(i for i, nb in enumerate(data["detail"]["nbrs"]) if any(ok for _, _, ok in nb))
        rank = next(j for j, (_, _, ok) in enumerate(data["detail"]["nbrs"][i]) if ok) + 1
        page.locator(f"span.t[data-i='{i}']").click()
        nb = page.locator(f"#panel .nb[data-rank='{rank}']")
        assert "ok" in nb.get_attribute("class") and "✓" in nb.inner_text()
        assert nb.locator("mark").inner_text() == data["vocab"][str(s.targets[i])]
        # The search box finds a document.
        name = evaluated["docs"][-1][0]
        page.fill("#search", Path(name).name)
        page.press("#search", "Enter")
        assert name in page.inner_text("#search-status")
        assert page.locator(".doc.found").count() == 1
        page.fill("#search", "#5")
        page.press("#search", "Enter")
        assert page.locator("span.t.sel").get_attribute("data-i") == "5"
        page.screenshot(path=str(tmp_path / "report.png"))
        if os.environ.get("KNNLM_REPORT_SCREENSHOT"):
            shutil.copy(tmp_path / "report.png", os.environ["KNNLM_REPORT_SCREENSHOT"])
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert errors == []


def test_neighbors_page_in_a_real_browser(evaluated, tmp_path):
    r = neighbors(evaluated["lm"], evaluated["retriever"], evaluated["docs"][0][1][:400], -1, top=8)
    path = tmp_path / "n.html"
    write_neighbors_html(path, r)
    sync_playwright = _browser()
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#panel .nb").count() == len(r["neighbors"])
        assert page.locator("#panel .nb.ok").count() == sum(n["is_target"] for n in r["neighbors"])
        browser.close()
    assert errors == []


def test_the_neighbors_page_never_replaces_one_of_the_datastore_s_own_files(evaluated, tmp_path):
    r = neighbors(evaluated["lm"], evaluated["retriever"], evaluated["docs"][0][1][:200], -1, top=4)
    assert Path(r["datastore"]) == evaluated["ds"].path
    meta = evaluated["ds"].path / "meta.json"
    before = meta.read_bytes()
    with pytest.raises(KNNLMError, match="the datastore's own meta.json"):
        write_neighbors_html(meta, r, overwrite=True)
    assert meta.read_bytes() == before
    assert write_neighbors_html(tmp_path / "meta.json", r) > 0  # the same name elsewhere is written


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_eval_report_and_neighbors_html(store, tmp_path):
    ds = store.path
    r = run("eval", "--datastore", ds, "--k", 8, "--exact", "--report", "r.html", "--report-tokens", 50)
    assert r.exit_code == 0, r.output
    assert "report written to r.html" in r.output
    data = _page_data(Path("r.html"))
    assert data["tokens_detailed"] == 50 and len(data["detail"]["nbrs"]) == 50
    assert all(len(nb) <= 8 for nb in data["detail"]["nbrs"])
    r = run("eval", "--datastore", ds, "--k", 8, "--exact", "--report", "r.html")
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = run("eval", "--datastore", ds, "--k", 8, "--exact", "--report", tmp_path / "no" / "r.html")
    assert r.exit_code != 0 and "does not exist" in r.output
    r = run("neighbors", "--datastore", ds, "--exact", "--top", 3, "--html", "n.html", "def f(x):\n    return x")
    assert r.exit_code == 0, r.output
    n = _page_data(Path("n.html"))
    assert n["mode"] == "neighbors" and len(n["single"]["nbrs"]) == 3
    # An existing page is replaced only with --overwrite, in the CLI and the API alike.
    before = Path("n.html").read_bytes()
    r = run("neighbors", "--datastore", ds, "--exact", "--top", 2, "--html", "n.html", "def g(y):")
    assert r.exit_code == 1
    assert "n.html already exists; pass --overwrite to replace it." in r.output and Path("n.html").read_bytes() == before
    r = run("neighbors", "--datastore", ds, "--exact", "--top", 2, "--html", "n.html", "--overwrite", "def g(y):")
    assert r.exit_code == 0 and len(_page_data(Path("n.html"))["single"]["nbrs"]) == 2
    r = run("neighbors", "--datastore", ds, "--overwrite", "def g(y):")
    assert r.exit_code == 2 and "--overwrite only applies with --html" in r.output
    r = run("neighbors", "--datastore", ds, "--top", 9, "--k", 5, "def g(y):")
    assert r.exit_code == 2 and "--top 9 is more than --k 5" in r.output
    r = run("neighbors", "--datastore", ds, "--exact", "--k", 5, "--json", "def g(y):")  # the default --top 10
    assert r.exit_code == 0 and len(json.loads(r.stdout)["neighbors"]) == 5 and json.loads(r.stdout)["k"] == 5
    knn = KNNLM.open(ds, retrieval=RetrievalConfig(k=8, exact=True))
    before = Path("r.html").read_bytes()
    with pytest.raises(KNNLMError, match="r.html already exists; pass --overwrite"):
        knn.report("def f(x):\n    return x\n", "r.html")
    assert Path("r.html").read_bytes() == before
    assert knn.report("def f(x):\n    return x\n", "r.html", overwrite=True)["report_file"] == "r.html"
    assert Path("r.html").read_bytes() != before
    with pytest.raises(KNNLMError, match="--top 0 is not a positive number"):
        knn.neighbors("def f(x):", top=0)
    # listing more neighbours than k searches more, but p_kNN stays the kNN-LM's, over the first k
    few, many = knn.neighbors("def f(x):\n    return", top=3), knn.neighbors("def f(x):\n    return", top=20)
    assert len(many["neighbors"]) == 20 and many["knn"] == few["knn"]
    assert [n["row"] for n in many["neighbors"][:3]] == [n["row"] for n in few["neighbors"]]
    # More than the search can find: the CLI says how many came back.
    r = run("neighbors", "--datastore", ds, "--exact", "--top", store.count + 5, "--k", store.count + 5, "def f(x):")
    assert r.exit_code == 0 and f"{store.count} neighbours found, fewer than --top {store.count + 5}" in r.output


def test_neighbors_refuses_an_empty_html_path(store):
    """Before: `--html ""` was taken for no --html (the model loaded, no page written)."""
    r = CliRunner().invoke(cli, ["neighbors", "-d", str(store.path), "abc", "--html", ""])
    assert r.exit_code != 0 and "The report path is empty" in r.output and "Traceback" not in r.output


def test_eval_refuses_an_empty_report_path(store):
    """`--report ""` is refused by the report's own path check, before any work, not taken for no --report."""
    r = CliRunner().invoke(cli, ["eval", "-d", str(store.path), "--exact", "--report", ""])
    assert r.exit_code != 0 and "The report path is empty" in r.output and "Traceback" not in r.output
    assert "scoring" not in r.output


def test_report_flags_reach_report_eval(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake(datastore, corpus, cfg, path, tokens, progress=None):
        seen.update(datastore=datastore, path=path, tokens=tokens, lam=cfg.lam)
        raise Stop

    monkeypatch.setattr(cli_eval, "report_eval", fake)
    with pytest.raises(Stop):
        run("eval", "--datastore", "d", "--lambda", "0.5", "--report", "x.html", "--report-tokens", 123)
    assert seen == {"datastore": "d", "path": "x.html", "tokens": 123, "lam": "0.5"}


def test_api_report(store, tiny_lm, corpus_texts):
    knn = KNNLM(store, tiny_lm, Retriever(store, RetrievalConfig(k=8, exact=True)))
    out = knn.report([corpus_texts["keyword.py"][:600], corpus_texts["bisect.py"][:600]], "api.html",
                     detail_tokens=100)
    data = _page_data(Path("api.html"))
    assert out["report_file"] == "api.html" and out["report_bytes"] == Path("api.html").stat().st_size
    assert [d["name"] for d in data["docs"]] == ["text 0", "text 1"]
    assert data["tokens_scored"] == out["tokens"] and data["tokens_detailed"] == 100
