"""The report's HTML: the packaged template with the data inlined, written as one self-contained file."""

from __future__ import annotations

import html
import json
import os
import re
from importlib import resources

from ..arrays import atomic_path, json_safe, try_create
from ..errors import KNNLMError


def template() -> str:
    """The packaged page template (knnlm/report/template.html)."""
    return resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")


def render_html(data: dict, title: str) -> str:
    """The page for data (from build_report_data, or a neighbours panel), everything inline."""
    payload = json.dumps(json_safe({**data, "title": title}), ensure_ascii=False, separators=(",", ":"),
                         allow_nan=False)
    # Inside <script> only "</" (and HTML comments) could end the element early; \u escapes keep JSON valid.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    # One pass over the template: a title or text holding "__DATA__" or "__TITLE__" is not replaced in its turn.
    fill = {"__TITLE__": html.escape(title), "__DATA__": payload}
    return re.sub("__TITLE__|__DATA__", lambda m: fill[m.group(0)], template())


def check_report_path(path: str | os.PathLike) -> None:
    """Refuse, before any work, a report path that cannot be written: empty, a folder (or named as one), in a
    missing folder, or in one where no file can be made."""
    if not str(path).strip():
        raise KNNLMError("The report path is empty; pass a file path such as report.html.")
    if os.path.isdir(path) or str(path).endswith(("/", os.sep)):
        raise KNNLMError(f"The report path {path} is a folder; pass a file path such as report.html.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KNNLMError(f"Cannot write the report {path}: the folder {parent} does not exist; create it or pass "
                         "another path.")
    try:
        try_create(path)  # the name the page's own (atomic) write will make
    except OSError as e:
        raise KNNLMError(f"Cannot write the report {path}: no file can be made in {parent} ({e.strerror or e}); "
                         "pass another path: a shorter name, in a folder you can write.") from None


def write_html(path: str | os.PathLike, data: dict, title: str, overwrite: bool = True) -> int:
    """Write the page atomically; returns its size in bytes. Without overwrite, a page another process wrote there
    meanwhile is refused, not replaced."""
    check_report_path(path)
    text = render_html(data, title).encode("utf-8")
    with atomic_path(path, exclusive=not overwrite) as tmp:
        tmp.write_bytes(text)
    return len(text)


def neighbors_panel(r: dict) -> dict:
    """The page data of one position's neighbours (the dict of `knnlm neighbors --json`)."""
    return {"mode": "neighbors", "single": {
        "title": f"Position {r['position']}", "position": r["position"], "tokens": r["tokens"],
        "context_text": r["context"], "target": r["target"]["text"] if r["target"] else None,
        "temperature": r.get("temperature"),
        "lm": [[p["text"], p["prob"]] for p in r["lm"]], "knn": [[p["text"], p["prob"]] for p in r["knn"]],
        "nbrs": [{"rank": n["rank"], "d": n["distance"], "doc": n["document"], "off": n["offset"],
                  "ctx": n["context"], "next": n["next_text"], "ok": n["is_target"]} for n in r["neighbors"]]}}
