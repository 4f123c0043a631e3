"""Build throughput ÷ a plain forward pass over the same windows; index train+add time at 1M keys.

    python bench/build.py [--tokens 20000] [--index-keys 1000000]

Both timings of a ratio come from one run, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
HERE = Path(__file__).parent

import torch  # noqa: E402

from common import stdlib_texts, synthetic_datastore  # noqa: E402
from knnlm.build import BuildConfig, build_datastore  # noqa: E402
from knnlm.datastore import open_datastore  # noqa: E402
from knnlm.index import IndexConfig, train_index  # noqa: E402
from knnlm.lm import load_lm  # noqa: E402
from knnlm.windows import length_batches, pad_batch, plan_windows  # noqa: E402


def plain_forward(lm, texts, context, stride, batch_size) -> tuple[int, float]:
    """Tokens and seconds of the model's ordinary forward (logits included) over the build's windows."""
    work = []
    for d, (_, text) in enumerate(texts):
        ids = lm.encode(text)
        work += [(ids[w.begin: w.end], w.own_to - w.own_from) for w in plan_windows(d, len(ids), context, stride)]
    tokens = sum(n for _, n in work)
    t0 = time.perf_counter()
    for start in range(0, len(work), 64):  # same blocks and length-sorted batches as the build
        block = work[start: start + 64]
        for batch in length_batches([len(w[0]) for w in block], batch_size):
            ids, mask = pad_batch([block[i][0] for i in batch])
            with torch.inference_mode():
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000, help="tokens of stdlib source to store")
    ap.add_argument("--index-keys", type=int, default=1_000_000, help="random keys for the index timing (0: skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    lm = load_lm("smollm2-135m", "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="knnlm-bench-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    texts, total = [], 0
    for name, text in stdlib_texts(400):
        n = len(lm.encode(text))
        if texts and total + n > args.tokens:
            break
        texts.append((name, text))
        (corpus / f"{len(texts):04d}.txt").write_text(text)
        total += n
    cfg = BuildConfig(holdout=0.0, build_index=False, batch_size=args.batch_size)
    plain_forward(lm, texts[:2], cfg.context, cfg.stride, cfg.batch_size)  # warm-up
    t0 = time.perf_counter()
    ds = build_datastore(str(corpus), tmp / "ds", cfg, lm=lm)
    build_s = time.perf_counter() - t0
    tokens, fwd_s = plain_forward(lm, texts, cfg.context, cfg.stride, cfg.batch_size)
    assert tokens == ds.count, (tokens, ds.count)
    out = {"tokens": tokens, "build_tokens_per_s": tokens / build_s, "forward_tokens_per_s": tokens / fwd_s,
           "ratio_build_over_forward": fwd_s / build_s, "target": ">= 0.95"}
    if args.index_keys:
        # Shared with bench/eval.py and bench/generate.py, which reuse the index trained here.
        syn = HERE / "results" / f"synthetic-{args.index_keys}"
        if not (syn / "meta.json").exists():
            synthetic_datastore(syn, lm, args.index_keys)
        sds = open_datastore(syn)
        t0 = time.perf_counter()
        info = train_index(sds, IndexConfig())
        out.update(index_keys=args.index_keys, index_factory=info["factory"], index_train_s=info["train_seconds"],
                   index_train_add_s=time.perf_counter() - t0, index_target="<= 180 s")
    shutil.rmtree(tmp)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
