"""Per-token retrieval scores, and their HDF5 cache (`eval --save-scores`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import KNNLMError

SCORES_FORMAT = 1


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

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, idx: np.ndarray) -> "Scores":
        """The scores of the tokens idx (an index array or boolean mask)."""
        return Scores(
            self.targets[idx], self.lm_logp[idx], self.dists[idx], self.vals[idx],
            self.doc[idx], self.pos[idx], dict(self.attrs),
        )

    @property
    def nn_dist(self) -> np.ndarray:
        """(n,) distance to the nearest neighbour (inf if none)."""
        if self.dists.shape[1] == 0:
            return np.full(len(self), np.inf)
        return np.where(self.vals[:, 0] >= 0, self.dists[:, 0], np.inf)


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
    )


def save_scores(path: str, scores: Scores) -> None:
    """Write scores to HDF5 atomically (temp file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with h5py.File(tmp, "w") as f:
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
    os.replace(tmp, path)


def load_scores(path: str) -> Scores:
    """Read scores written by save_scores."""
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs.get("format", -1)) != SCORES_FORMAT:
                raise KNNLMError(f"{path} is not a knnlm scores file of format {SCORES_FORMAT}; "
                                 "write it again with `knnlm eval --save-scores`.")
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            return Scores(
                f["target"][:], f["lm_logprob"][:], f["dist"][:], f["val"][:],
                f["doc"][:], f["pos"][:], attrs,
            )
    except OSError as e:
        raise KNNLMError(f"Cannot read scores file {path} ({e}); write it with `knnlm eval --save-scores`.") from e
