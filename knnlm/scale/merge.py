"""Merging finished shards into one build directory: keys, values, document table and held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..arrays import NpyAppender
from ..build import _damaged, _read_progress

# Rows copied per step, bounding RAM (64k keys of d = 576 are 72 MiB).
MERGE_CHUNK = 65_536


def _copy_prefix(src: Path, dst, size: int) -> None:
    """The first `size` bytes of file src, appended to the open file dst."""
    with open(src, "rb") as f:
        left = size
        while left:
            block = f.read(min(left, 1 << 24))
            if not block:
                raise OSError(f"{src} is shorter than its checkpoint says")
            dst.write(block)
            left -= len(block)


def merge_shards(work: Path, dirs: list[Path], specs: list[dict], dim: int) -> dict:
    """Concatenate the shards' files, in shard order, into work; returns the merged build's counts.

    Shards store global row numbers in their document tables, so tables concatenate unchanged.
    The merge starts over if interrupted (the shards are removed only after it).
    """
    keys = NpyAppender(work / "keys.npy", np.float16, (dim,), 0)
    vals = NpyAppender(work / "vals.npy", np.int32, (), 0)
    state = {"rows": 0, "skipped": 0, "heldout": {"dev": 0, "test": 0}, "shards": len(dirs), "unreadable": []}
    try:
        with open(work / "docs.jsonl", "wb") as docs, open(work / "holdout.jsonl", "wb") as held:
            for d, spec in zip(dirs, specs):
                s = _read_progress(d)
                if not s.get("done") or s["rows"] != spec["rows"]:
                    raise _damaged(work, f"shard {d.name} holds {s['rows']} keys, its plan {spec['rows']}")
                for name, arr, dtype, shape in (("keys.npy", keys, np.float16, (dim,)),
                                                ("vals.npy", vals, np.int32, ())):
                    NpyAppender(d / name, dtype, shape, s["rows"]).finish()  # seal the shard's header
                    part = np.load(d / name, mmap_mode="r")
                    for lo in range(0, len(part), MERGE_CHUNK):
                        arr.append(part[lo: lo + MERGE_CHUNK])
                _copy_prefix(d / "docs.jsonl", docs, s["docs_bytes"])
                _copy_prefix(d / "holdout.jsonl", held, s["holdout_bytes"])
                state["rows"] += s["rows"]
                state["skipped"] += s["skipped"]
                state["unreadable"] += [n for n in s.get("unreadable", []) if n not in state["unreadable"]]
                for k in ("dev", "test"):
                    state["heldout"][k] += s["heldout"][k]
    finally:
        keys.close()
        vals.close()
    return state
