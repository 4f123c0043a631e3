"""Per-token retrieval scores, and their HDF5 cache (`eval --save-scores`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import h5py
import numpy as np

from .arrays import atomic_path, refuse_existing
from .errors import KNNLMError, expect
from .interpolate import masked_distances

SCORES_FORMAT = 2  # 2: queries and LM statistics for the learned gate and SPALM


@dataclass
class Scores:
    """Everything needed to score a kNN-LM on a text without re-running the LM.

    n tokens, k neighbours; neighbours sorted by increasing distance.
    """

    targets: np.ndarray  # (n,) int32, the token being predicted
    lm_logp: np.ndarray  # (n,) float64, log p_LM(target)
    dists: np.ndarray  # (n, k) float32 squared L2; inf where no neighbour
    vals: np.ndarray  # (n, k) int32 stored next tokens; -1 where no neighbour
    doc: np.ndarray  # (n,) int32 document index within the scored text
    pos: np.ndarray  # (n,) int32 position of the target token in its document
    attrs: dict = field(default_factory=dict)  # datastore fingerprint, k, nprobe, rerank, model
    # What the learned gate and SPALM read (None in scores made without them, e.g. by hand):
    queries: np.ndarray | None = None  # (n, d) the keys of the scored positions; float32 in RAM, fp16 on disk
    lm_entropy: np.ndarray | None = None  # (n,) float32 entropy of p_LM, nats
    lm_max: np.ndarray | None = None  # (n,) float32 log-probability of p_LM's most likely token
    lm_second: np.ndarray | None = None  # (n,) float32 ... of its second most likely token
    lm_argmax: np.ndarray | None = None  # (n,) int32 p_LM's most likely token
    searched: np.ndarray | None = None  # (n,) bool: False where a learned skip left the search out

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, idx: np.ndarray) -> "Scores":
        """The scores of the tokens idx (an index array or boolean mask)."""
        extra = {name: (None if getattr(self, name) is None else getattr(self, name)[idx]) for name in OPTIONAL}
        return Scores(
            self.targets[idx], self.lm_logp[idx], self.dists[idx], self.vals[idx],
            self.doc[idx], self.pos[idx], dict(self.attrs), **extra,
        )

    def lm_stats(self) -> dict[str, np.ndarray]:
        """The LM statistics the learned gates read; one sentence when the scores lack them."""
        stats = {name: getattr(self, name) for name in LM_STATS}
        if self.queries is None or any(v is None for v in stats.values()):
            raise KNNLMError("These scores hold no queries or LM statistics, which the learned gate and SPALM need; "
                             "score again with this version (`knnlm eval --save-scores`).")
        return stats

    @property
    def nn_dist(self) -> np.ndarray:
        """(n,) distance to the nearest neighbour (inf if none)."""
        if self.dists.shape[1] == 0:
            return np.full(len(self), np.inf)
        return masked_distances(self.dists[:, :1], self.vals[:, :1])[:, 0]


LM_STATS = ("lm_entropy", "lm_max", "lm_second", "lm_argmax")
OPTIONAL = ("queries", *LM_STATS, "searched")
_REQUIRED = ("target", "lm_logprob", "dist", "val", "doc", "pos")  # in Scores' field order
# On disk: dataset name and dtype of each optional field.
_OPTIONAL_DATASETS = {"queries": ("query", np.float16), "lm_entropy": ("lm_entropy", np.float32),
                      "lm_max": ("lm_max_logprob", np.float32), "lm_second": ("lm_second_logprob", np.float32),
                      "lm_argmax": ("lm_argmax", np.int32), "searched": ("searched", np.bool_)}


def concat_scores(parts: list[Scores], attrs: dict) -> Scores:
    """One Scores from several, in order."""
    if not parts:
        return Scores(
            np.zeros(0, np.int32), np.zeros(0), np.zeros((0, 0), np.float32),
            np.zeros((0, 0), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), attrs,
        )
    return Scores(
        np.concatenate([p.targets for p in parts]),
        np.concatenate([p.lm_logp for p in parts]),
        np.concatenate([p.dists for p in parts]),
        np.concatenate([p.vals for p in parts]),
        np.concatenate([p.doc for p in parts]),
        np.concatenate([p.pos for p in parts]),
        attrs,
        **{name: (np.concatenate([getattr(p, name) for p in parts])
                  if all(getattr(p, name) is not None for p in parts) else None) for name in OPTIONAL},
    )


def as_saved(scores: Scores) -> Scores:
    """scores as load_scores reads them back from save_scores' file: the queries rounded to fp16 (the rest is exact)."""
    if scores.queries is None:
        return scores
    stored = _OPTIONAL_DATASETS["queries"][1]
    return replace(scores, queries=np.asarray(scores.queries).astype(stored).astype(np.float32))


def save_scores(path: str, scores: Scores, overwrite: bool = False) -> None:
    """Write scores to HDF5 atomically (temp file, then rename); a failed write leaves nothing behind. An existing
    file is replaced only with overwrite; its folder must exist."""
    expect(scores, Scores, "scores", "run_eval(...)[1]")
    refuse_existing(path, overwrite)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise KNNLMError(f"Cannot write {path}: its folder does not exist; create it or pass another path.")
    with atomic_path(path, exclusive=not overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = SCORES_FORMAT
        for key, value in scores.attrs.items():
            f.attrs[key] = "" if value is None else value
        f.create_dataset("target", data=scores.targets.astype(np.int32))
        f.create_dataset("lm_logprob", data=scores.lm_logp.astype(np.float64))
        chunks = (min(256, max(1, len(scores))), max(1, scores.dists.shape[1]))
        f.create_dataset("dist", data=scores.dists.astype(np.float32), chunks=chunks if len(scores) else None)
        f.create_dataset("val", data=scores.vals.astype(np.int32), chunks=chunks if len(scores) else None)
        f.create_dataset("doc", data=scores.doc.astype(np.int32))
        f.create_dataset("pos", data=scores.pos.astype(np.int32))
        for name, (dataset, dtype) in _OPTIONAL_DATASETS.items():
            if getattr(scores, name) is not None:
                f.create_dataset(dataset, data=np.asarray(getattr(scores, name)).astype(dtype))


def load_scores(path: str) -> Scores:
    """Read scores written by save_scores; queries come back as float32 (they were stored as fp16)."""
    again = "write it again with `knnlm eval --save-scores` (the dev-scores.h5 cache of tune-lambda rebuilds itself)"
    try:
        with h5py.File(path, "r") as f:
            fmt = int(f.attrs.get("format", -1))
            if fmt != SCORES_FORMAT:
                old = f" (it has format {fmt}, made by an older knnlm, and lacks the gate's features)" \
                    if 0 < fmt < SCORES_FORMAT else ""
                raise KNNLMError(f"{path} is not a knnlm scores file of format {SCORES_FORMAT}{old}; {again}.")
            missing = [name for name in _REQUIRED if name not in f]
            if missing:
                raise KNNLMError(f"Scores file {path} lacks the dataset(s) {', '.join(missing)}; {again}.")
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            extra = {name: (f[dataset][:] if dataset in f else None)
                     for name, (dataset, _dtype) in _OPTIONAL_DATASETS.items()}
            partial = [_OPTIONAL_DATASETS[name][0] for name in ("queries", *LM_STATS) if extra[name] is None]
            if 0 < len(partial) < 1 + len(LM_STATS):  # all of the gate's datasets, or none
                raise KNNLMError(f"Scores file {path} lacks the dataset(s) {', '.join(partial)}; {again}.")
            if extra["queries"] is not None:
                extra["queries"] = extra["queries"].astype(np.float32)
            return Scores(*(f[name][:] for name in _REQUIRED), attrs, **extra)
    except OSError as e:
        raise KNNLMError(f"Cannot read scores file {path} ({e}); write it with `knnlm eval --save-scores`.") from e
