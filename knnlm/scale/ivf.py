"""An IVF index trained and filled at scale: in parts that share one trained quantizer, merged in RAM or on disk.

The on-disk merge is faiss's own (faiss.contrib.ondisk.merge_ondisk): the inverted lists go to an
.ivfdata file beside index.faiss, memory-mapped when searched, so the index need not fit in RAM.

Past LARGE_NLIST lists, flat k-means and a flat coarse assignment cost nlist distances per key; training
then uses faiss's two-level k-means (faiss.contrib.clustering) and adding an HNSW graph over the
centroids (the saved index keeps its flat quantizer, so searches still rank every centroid).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import uuid

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from ..arrays import own_name, remove_dead
from ..index import flat_l2, write_index_file

log = logging.getLogger(__name__)

LARGE_NLIST = 4096  # from this many IVF lists on, two-level k-means and HNSW coarse assignment
ASSIGN_HNSW_M, ASSIGN_EF = 32, 32  # the assignment graph: 99.8% of keys land in their nearest list


def two_level_clustering(*args, **kwargs):
    """faiss.contrib.clustering.two_level_clustering, imported on first use (without scipy that module
    prints a note on stdout when imported, which would land in the CLI's output)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from faiss.contrib.clustering import two_level_clustering as clustering
    return clustering(*args, **kwargs)


def train_ivf(index, xt: np.ndarray, seed: int) -> None:
    """Train an index whose IVF is L2 over a flat quantizer; past LARGE_NLIST lists with two-level k-means.

    Two-level k-means clusters into sqrt(nlist) groups, then splits each group in proportion to its size:
    about 2·sqrt(nlist) distances per point and iteration instead of nlist (faiss's recipe for large nlist).
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist >= LARGE_NLIST and ivf.quantizer.ntotal == 0 \
            and flat_l2(ivf.quantizer) and index.d == ivf.d:
        centroids, _ = two_level_clustering(xt, int(np.sqrt(ivf.nlist)), ivf.nlist, clustering_niter=ivf.cp.niter,
                                            seed=seed)
        ivf.quantizer.add(centroids)  # a filled quantizer: faiss's training goes on to the codes only
    index.train(xt)


def clear_stale_slots(index) -> None:
    """Zero the unused code slots of fast-scan's last block in each list (no-op for other indexes).

    faiss removes an entry by moving the list's last code into its slot and shrinking the list, but
    leaves the moved code's old 4-bit nibbles in the block; its fast-scan add then ORs the new codes
    into those bits, corrupting them. Cleared slots make an add after a removal exact.
    """
    ivf = faiss.try_extract_index_ivf(index)
    inv = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(inv, faiss.BlockInvertedLists):
        return
    packer = inv.packer
    zero = np.zeros(packer.code_size, np.uint8)
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n % packer.nvec == 0:
            continue
        blocks = (n + packer.nvec - 1) // packer.nvec
        buf = faiss.rev_swig_ptr(inv.get_codes(lst), blocks * packer.block_size).reshape(blocks, packer.block_size)
        for slot in range(n, blocks * packer.nvec):
            packer.pack_1(zero, slot, buf)


class Adder:
    """Adds keys to a trained index, with faiss's faster paths for its default IVF-PQ (8-bit codes of residuals).

    - PQ codes: one flat (BLAS) search per sub-quantizer, ProductQuantizer.compute_codes_with_assign_index,
      instead of faiss's per-key loop (about 12x faster at 9-dim sub-vectors); the codes are the same but for
      ties in rounding.
    - Coarse lists: past LARGE_NLIST lists an HNSW graph over the centroids, else the flat quantizer.
    The codes go in with add_sa_codes. A fast-scan IVF-PQ index past LARGE_NLIST lists is added to by faiss
    (its codes go into packed blocks) with the graph standing in for its quantizer during the add. Any other
    index is added to by faiss as it is. A fast-scan index's stale code slots (left by removals) are cleared
    first.
    """

    def __init__(self, index):
        clear_stale_slots(index)
        self.index, self.top = index, faiss.downcast_index(index)
        top = self.top
        self.fast = (type(top) is faiss.IndexIVFPQ and top.by_residual and top.pq.nbits == 8
                     and top.metric_type == faiss.METRIC_L2 and flat_l2(top.quantizer))
        # fast-scan: only the coarse assignment is ours (faiss packs the codes)
        self.graph_only = (type(top) is faiss.IndexIVFPQFastScan and top.metric_type == faiss.METRIC_L2
                           and flat_l2(top.quantizer) and top.nlist >= LARGE_NLIST)
        self.ivf = faiss.try_extract_index_ivf(index)
        self.with_ids = self.ivf is not None or isinstance(top, (faiss.IndexIDMap, faiss.IndexIDMap2))
        if not (self.fast or self.graph_only):
            return
        self.coarse = top.quantizer
        if top.nlist >= LARGE_NLIST:
            self.coarse = faiss.IndexHNSWFlat(top.d, ASSIGN_HNSW_M)
            self.coarse.hnsw.efSearch = ASSIGN_EF
            self.coarse.add(top.quantizer.reconstruct_n(0, top.nlist))
        if self.fast:
            self.sub = faiss.IndexFlatL2(top.pq.dsub)  # kept alive while the PQ points at it

    def add(self, x: np.ndarray, lo: int) -> None:
        """Add the float32 keys x as rows lo, lo+1, ... (their ids)."""
        ids = np.arange(lo, lo + len(x), dtype=np.int64)
        if self.graph_only:
            flat, top = self.top.quantizer, self.top
            top.quantizer = self.coarse  # the same centroids (residuals are reconstructed from the graph's copy)
            try:
                top.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
            finally:
                top.quantizer = flat  # owned by the index, as before
            return
        if not self.fast:
            if self.with_ids:
                self.index.add_with_ids(x, ids)
            else:  # flat (never removed from) and graph indexes number rows themselves
                assert self.index.ntotal == lo, "an index without ids numbers rows itself"
                self.index.add(x)
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, top = len(x), self.top
        _, lists = self.coarse.search(x, 1)
        lists = np.ascontiguousarray(lists[:, 0])
        if (lists < 0).any():  # the graph found nothing (never seen; the flat quantizer always does)
            bad = np.flatnonzero(lists < 0)
            lists[bad] = top.quantizer.search(x[bad], 1)[1][:, 0]
        residuals = np.empty_like(x)
        top.quantizer.compute_residual_n(n, faiss.swig_ptr(x), faiss.swig_ptr(residuals), faiss.swig_ptr(lists))
        codes = np.empty((n, top.pq.code_size), dtype=np.uint8)
        top.pq.assign_index = self.sub
        try:
            top.pq.compute_codes_with_assign_index(faiss.swig_ptr(residuals), faiss.swig_ptr(codes), n)
        finally:
            top.pq.assign_index = None
        coarse = lists.astype("<i8").view(np.uint8).reshape(n, 8)[:, :top.coarse_code_size()]  # faiss: little-endian
        top.add_sa_codes(np.ascontiguousarray(np.hstack([coarse, codes])), ids)


def add_part(trained: np.ndarray, keys_path: str, lo: int, hi: int, out: str, chunk: int) -> int:
    """Add keys [lo, hi) of keys.npy, ids = row numbers, to a copy of the trained index; write it to out."""
    index = faiss.deserialize_index(trained)
    adder = Adder(index)
    keys = np.load(keys_path, mmap_mode="r")
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        adder.add(np.asarray(keys[a:b], dtype=np.float32), a)
    write_index_file(index, out)
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
    remove_dead(root / "index", "parts")  # the parts of a killed fill
    tmp = own_name(root / "index", "parts")
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
