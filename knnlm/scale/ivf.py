"""An IVF index filled in parts that share one trained quantizer, then merged in RAM or on disk.

The on-disk merge is faiss's own (faiss.contrib.ondisk.merge_ondisk): the inverted lists go to an
.ivfdata file beside index.faiss, memory-mapped when searched, so the index need not fit in RAM.
"""

from __future__ import annotations

import logging
import shutil
import uuid

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

log = logging.getLogger(__name__)


def add_part(trained: np.ndarray, keys_path: str, lo: int, hi: int, out: str, chunk: int) -> int:
    """Add keys [lo, hi) of keys.npy, ids = row numbers, to a copy of the trained index; write it to out."""
    index = faiss.deserialize_index(trained)
    keys = np.load(keys_path, mmap_mode="r")
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        index.add_with_ids(np.asarray(keys[a:b], dtype=np.float32), np.arange(a, b, dtype=np.int64))
    faiss.write_index(index, out)
    return hi - lo


def fill_in_parts(index, ds, cfg, runner, progress=None) -> dict:
    """Fill the trained, empty IVF index with ds's keys in runner.parts parts; returns index.json's fields for it.

    Each part is a copy of the trained index (same quantizer and codebooks) holding a run of rows;
    merging appends the parts' inverted lists in row order, so the result equals one sequential add.
    With cfg.on_disk the merged lists live in ds.path/index-<id>.ivfdata.
    """
    parts = max(1, min(runner.parts, ds.count))
    bounds = np.linspace(0, ds.count, parts + 1).astype(np.int64)
    trained = faiss.serialize_index(index)  # (bytes,) uint8: what every part starts from
    root = ds.path.resolve()  # workers elsewhere have another working directory
    tmp = root / f".index-parts-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = [str(tmp / f"{i:04d}.faiss") for i in range(parts)]
        args = [(trained, str(root / "keys.npy"), int(lo), int(hi), f, cfg.add_chunk)
                for lo, hi, f in zip(bounds[:-1], bounds[1:], files)]
        log.info("adding %d keys in %d parts", ds.count, parts)
        for n in runner.map(add_part, args):
            if progress:
                progress(n)
        if cfg.on_disk:
            name = f"index-{uuid.uuid4().hex[:12]}.ivfdata"
            merge_ondisk(index, files, str(root / name))
            return {"lists": "on-disk", "ivfdata": name}
        ivf = faiss.extract_index_ivf(index)
        for f in files:
            ivf.merge_from(faiss.read_index(f), 0)
        index.ntotal = ivf.ntotal
        return {"lists": "in RAM"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
