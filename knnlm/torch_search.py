"""Exact nearest-neighbour search in torch, on a GPU (or any torch device).

With the LM on a GPU, faiss on the CPU is nearly all of eval's time (an H100 runs SmolLM2 ten times
faster than 16 CPU threads search IVF-PQ). faiss-gpu's wheels need CUDA 12's cuBLAS; torch, already
here for the LM, searches on the LM's GPU with its matrix units instead, exactly:

1. keys.npy is copied to the device once, in fp16 as stored (N·d·2 bytes), with ‖k‖²/2 per key;
2. per chunk of keys, one matrix product scores every key, s = ‖k‖²/2 − q·k, which ranks keys as
   ‖q − k‖² does (‖q‖² is the same for all); on a GPU in fp16, the queries scaled by a power of two
   so that no score overflows;
3. the `oversample`·k (1.5·k) best scores of each chunk (torch.topk), then of all chunks, are candidates;
4. their float32 distances ‖q − k‖² are computed from the keys themselves (differences, as re-ranking
   computes them, to float32 rounding), and the k nearest kept in order.

The distances are exact; the candidates are chosen by fp16 scores, which round to about 1e-3 of their
scale, so a key of the true k nearest could rank below them: bench/torch_search.py measured recall
of the true 1000 nearest ≥ 0.99997 from 1.25·k candidates on (1.0 for queries near stored keys).
On a CPU device every step is float32 and the result is exact search (the tests' reference path;
faiss's flat index is faster there, `--exact`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import KNNLMError

COPY_ROWS = 65_536  # keys copied to the device per step
SCORE_BYTES = 1 << 30  # one chunk's score matrix (queries × keys) on a GPU
CPU_SCORE_BYTES = 64 << 20  # the same on a CPU
QUERY_BATCH = 1024  # queries scored together on a GPU
CPU_QUERY_BATCH = 128  # the same on a CPU
RERANK_BYTES = 256 << 20  # gathered candidate keys (float32) at once
# Candidates per query as a multiple of k. bench/torch_search.py, recall of the true k nearest: from 1.25 on
# 1.0 for 1M random keys on an H100, and 1.0 (queries near stored keys) or 0.99997 (random queries) for 1M
# real SmolLM2 keys (fp16 scores on a CPU); at 1, 0.992-0.996.
OVERSAMPLE = 1.5
FP16_SCORE_MAX = 2.0 ** 14  # each term of a score is scaled below this: |s| < 2^15 < fp16's 65,504


def parse_search_device(name: str) -> torch.device:
    """The torch device of --search-device, or one sentence saying why it cannot be used."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise KNNLMError(f"--search-device {name!r} is not a torch device; use cuda, cuda:N or cpu.") from None
    if device.type not in ("cpu", "cuda"):
        raise KNNLMError(f"--search-device {name}: the search runs on cuda, cuda:N or cpu, not {device.type}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KNNLMError(f"--search-device {name}: torch sees no CUDA device here; leave --search-device out to "
                         "search the faiss index on the CPU.")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise KNNLMError(f"--search-device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    return device


class TorchExactIndex:
    """Exact k-nearest search over a datastore's keys on a torch device; `search` answers like faiss's.

    Args:
        keys: (N, d) float16 keys (keys.npy, memory-mapped: copied in blocks).
        device: where the keys live and the search runs.
        live: ids of the keys that may be returned (None: all), e.g. without removed documents.
        half: score in fp16 (default: on a GPU); float32 otherwise.
        oversample: candidates per query, as a multiple of k, whose exact distances are computed.
        score_bytes: bytes of one chunk's score matrix (None: 1 GiB on a GPU, 64 MiB on a CPU).
    """

    def __init__(self, keys: np.ndarray, device: str | torch.device, live: np.ndarray | None = None,
                 half: bool | None = None, oversample: float = OVERSAMPLE, score_bytes: int | None = None):
        self.device = torch.device(device)
        self.half = self.device.type == "cuda" if half is None else bool(half)
        self.dtype = torch.float16 if self.half else torch.float32
        self.oversample = max(1.0, float(oversample))
        self.score_bytes = score_bytes or (SCORE_BYTES if self.device.type == "cuda" else CPU_SCORE_BYTES)
        self.ntotal, self.d = int(keys.shape[0]), int(keys.shape[1])
        try:
            self.keys = torch.empty((self.ntotal, self.d), dtype=self.dtype, device=self.device)
            self.half_norms = torch.empty(self.ntotal, dtype=torch.float32, device=self.device)
            for lo in range(0, self.ntotal, COPY_ROWS):
                block = torch.from_numpy(np.array(keys[lo: lo + COPY_ROWS], dtype=np.float16)).to(self.device)
                self.keys[lo: lo + len(block)] = block.to(self.dtype)
                self.half_norms[lo: lo + len(block)] = block.float().pow(2).sum(1) / 2
        except (torch.OutOfMemoryError, RuntimeError) as e:  # a CPU's failed allocation is a RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            size = self.ntotal * self.d * (2 if self.half else 4) / 2**30
            raise KNNLMError(f"The {self.ntotal:,} keys ({size:.1f} GiB as {str(self.dtype)[6:]}) do not fit on "
                             f"{self.device}; leave --search-device out to search the faiss index.") from None
        self.live = int(self.ntotal)
        if live is not None:
            dead = torch.ones(self.ntotal, dtype=torch.bool, device=self.device)
            dead[torch.from_numpy(np.asarray(live, dtype=np.int64)).to(self.device)] = False
            self.half_norms[dead] = math.inf  # never ranked: every score of theirs is +inf
            self.live = int(len(live))
        finite = self.half_norms[torch.isfinite(self.half_norms)]
        self.max_half_norm = float(finite.max()) if len(finite) else 0.0

    def _scale(self, q: torch.Tensor) -> float:
        """A power of two that keeps the fp16 scaled queries and both terms of their scores below FP16_SCORE_MAX."""
        top = max(self.max_half_norm, float(q.norm(dim=1).max()) * math.sqrt(2 * self.max_half_norm),
                  float(q.abs().max()), 1e-30)
        return 2.0 ** math.floor(math.log2(FP16_SCORE_MAX / top))

    def _candidates(self, q: torch.Tensor, n_cand: int) -> torch.Tensor:
        """(B, n_cand) ids of the keys of the lowest scores ‖k‖²/2 − q·k, over chunks of keys."""
        chunk = max(n_cand, self.score_bytes // (len(q) * (2 if self.half else 4)))
        scale = self._scale(q) if self.half else 1.0
        qs = (q * scale).to(self.dtype)
        best_s, best_i = [], []
        for lo in range(0, self.ntotal, chunk):
            keys = self.keys[lo: lo + chunk]
            bias = (self.half_norms[lo: lo + chunk] * scale).to(self.dtype)
            scores = torch.addmm(bias, qs, keys.T, alpha=-1)  # (B, C): ‖k‖²/2 − q·k, scaled
            s, i = torch.topk(scores, min(n_cand, len(keys)), dim=1, largest=False, sorted=False)
            best_s.append(s)
            best_i.append(i + lo)
        if len(best_s) == 1:
            return best_i[0]
        s, i = torch.cat(best_s, 1), torch.cat(best_i, 1)
        return i.gather(1, torch.topk(s, n_cand, dim=1, largest=False, sorted=False).indices)

    def _exact(self, q: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest of each row's candidates by float32 ‖q − k‖², ascending; removed keys at +inf."""
        rows = max(1, RERANK_BYTES // (cand.shape[1] * self.d * 4))
        dists, ids = [], []
        for lo in range(0, len(q), rows):
            c = cand[lo: lo + rows]
            # Differences, not ‖q‖² + ‖k‖² − 2q·k: no cancellation, and no TF32 matmul if someone allows it.
            d = torch.cdist(q[lo: lo + rows, None, :], self.keys[c].float(),
                            compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square()  # (b, C)
            d = torch.where(torch.isfinite(self.half_norms[c]), d, math.inf)
            top = torch.topk(d, k, dim=1, largest=False, sorted=True)
            dists.append(top.values)
            ids.append(torch.where(torch.isfinite(top.values), c.gather(1, top.indices), -1))
        return torch.cat(dists), torch.cat(ids)

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dists (n, k) float32 ascending, ids (n, k) int64) like faiss: -1 and inf past the live keys."""
        q_all = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.isfinite(q_all).all():
            raise KNNLMError("A query vector holds inf or NaN (the model's hidden state overflowed); search "
                             "finite queries.")
        n = len(q_all)
        dists = np.full((n, k), np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        kk = min(k, self.live)
        if n == 0 or kk == 0:
            return dists, ids
        n_cand = min(self.ntotal, math.ceil(self.oversample * k))
        batch = min(n, QUERY_BATCH if self.device.type == "cuda" else CPU_QUERY_BATCH)
        for lo in range(0, n, batch):
            q = torch.from_numpy(q_all[lo: lo + batch]).to(self.device)
            try:
                d, i = self._exact(q, self._candidates(q, n_cand), kk)
            except torch.OutOfMemoryError:
                raise KNNLMError(f"{self.device} ran out of memory searching {len(q)} queries (beside the model and "
                                 "the keys); pass a smaller --batch-size, or leave --search-device out.") from None
            dists[lo: lo + len(q), :kk] = d.cpu().numpy()
            ids[lo: lo + len(q), :kk] = i.cpu().numpy()
        return dists, ids
