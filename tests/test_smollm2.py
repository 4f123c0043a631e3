"""Integration with the bundled SmolLM2-135M on real text: the README's Python example, keys, λ = 0.

Slower than the rest (the model is converted once per session, ~20 s, and runs on real text).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # the bundled model: `pytest -m 'not slow'` leaves these out

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_python() -> str:
    """The README's Python example."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should hold one Python example"
    return blocks[0]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Runs the README's Python example in a directory of its own; its variables and printed output."""
    where = tmp_path_factory.mktemp("readme")
    old_cwd, old_cache = os.getcwd(), os.environ.get("KNNLM_CACHE")
    os.chdir(where)
    os.environ["KNNLM_CACHE"] = str(where / "cache")
    out = io.StringIO()
    env: dict = {}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_readme_python(), "README.md", "exec"), env)
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("KNNLM_CACHE", None)
        else:
            os.environ["KNNLM_CACHE"] = old_cache
    env["printed"] = out.getvalue()
    return env


def test_readme_example(example):
    knn, report = example["knn"], example["report"]
    assert example["name"].endswith("decoder.py")  # held out: not among the datastore's documents
    assert all(not d[0].endswith("decoder.py") for d in knn.datastore.documents)
    assert report["tokens"] > 1000
    # Code from the same package helps even with a datastore this small (~6k keys): 6.81 → 6.62.
    assert report["knn_lm_ppl"] < report["lm_ppl"]
    print(example["printed"])
    assert "→ kNN-LM" in example["printed"] and len(example["hits"]["neighbors"]) == 3
    # With λ = 0.5 the model quotes the datastore (encoder.py's JSONEncoder); alone, it does not.
    stored = "".join(Path(d[0]).read_text() for d in knn.datastore.documents)
    with_memory = knn.generate("class JSONEncoder(object):", max_new_tokens=24, lam=0.5, temperature=30)
    alone = knn.generate("class JSONEncoder(object):", max_new_tokens=24, lam=0)
    assert len(with_memory) >= 60 and with_memory[:60] in stored and alone[:60] not in stored


def test_keys_are_the_lm_head_input(example):
    """lm_head(key) reproduces the logits; stored keys match a fresh full-context forward pass."""
    knn = example["knn"]
    lm, ds = knn.lm, knn.datastore
    name, start, count, first = ds.documents[0]
    ids = [first] + [int(v) for v in ds.vals[start: start + count]]  # the document's tokens
    n = min(len(ids) - 1, ds.meta["context"])  # positions the first window owns
    x = torch.tensor([ids[:n]])
    keys, logits = lm.forward(x, torch.ones_like(x))
    head = lm.model.get_output_embeddings()
    with torch.inference_mode():
        assert torch.allclose(head(keys), logits, atol=1e-4, rtol=1e-5)
    stored = np.asarray(ds.keys[start: start + n], dtype=np.float32)
    fresh = keys[0].numpy()
    assert np.allclose(stored, fresh, atol=2e-2, rtol=2e-3)  # float16 storage
    assert np.abs(stored - fresh.astype(np.float16).astype(np.float32)).max() < 1e-2


def test_lambda_zero_is_the_models_own_loss(example):
    knn = example["knn"]
    text = "import json\n\ndata = json.loads('{\"a\": [1, 2, 3]}')\nprint(json.dumps(data, indent=2))\n"
    r = knn.evaluate(text, lam=0)
    ids = knn.lm.encode(text)
    x = torch.tensor([ids])
    with torch.inference_mode():
        loss = knn.lm.model(input_ids=x, labels=x).loss.item()  # one window: the text is short
    assert r["tokens"] == len(ids) - 1
    assert r["knn_lm_ppl"] == r["lm_ppl"]
    assert r["lm_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
