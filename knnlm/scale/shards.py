"""A sharded build: plan shards as runs of the build's blocks, build each resumably, merge, finish."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..arrays import write_json
from ..build import (_RESUME_KEYS, WHOLE, BuildConfig, _check_partial, _fill, _finish, _move_in, _new_state,
                     _prepare_dirs, _read_progress, _stream, _Writer, check_resume_settings, check_whole, claimed,
                     clear_work, open_build)
from ..datastore import Datastore, datastore_path
from ..errors import KNNLMError
from ..lm import LM
from .engines import Engine, ensure_ray, index_runner, run_shards
from .merge import merge_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardConfig:
    """How a build is split and where its shards run."""

    shards: int = 1  # shards to split the build into (fewer if the corpus has fewer blocks of windows)
    engine: Engine = Engine.LOCAL  # local: shards in this process, one after another; ray: one Ray task each
    ray_address: str | None = None  # Ray cluster to join (ray.init's address); None: start a local Ray

    def __post_init__(self):
        if self.shards < 1:
            raise KNNLMError(f"--shards {self.shards} must be at least 1.")
        object.__setattr__(self, "engine", Engine(self.engine))


def shard_dir(work: Path, i: int) -> Path:
    """Where shard i of a build in progress lives."""
    return work / "shards" / f"{i:04d}"


def _drop(_record: str) -> None:
    """A writer that keeps nothing (the plan's dry run)."""


def plan_shards(lm: LM, src, cfg: BuildConfig, n: int) -> dict:
    """Split the build's window stream into up to n runs of whole blocks.

    A dry run tokenizes every document (no forward pass) and notes the checkpoint state after every
    block of cfg.block_windows windows. Shard i starts from one of those states, exactly where an
    unsharded build would be, and stops where shard i + 1 starts; shards may split a document.

    Returns:
        {"shards": [{"start": checkpoint state, "stop": [seq, window] or None (the last), "rows": keys}],
        "rows": keys of the build, "seconds": 0.0 (build time so far), "merged": False}.
    """
    s = _new_state()
    bounds, windows, rows = [], 0, 0  # bounds: (checkpoint position and counters, keys before it) per full block
    for seq, win, _ids, labels in _stream(lm, src, cfg, s, _drop, _drop):
        windows += 1
        rows += len(labels)
        if windows % cfg.block_windows == 0:
            bounds.append(({"seq": seq, "window": win.index + 1, "scheduled": s["scheduled"],
                            "doc_start": s["doc_start"]}, rows))
    if rows == 0:
        raise src.no_tokens(cfg.holdout)
    blocks = math.ceil(windows / cfg.block_windows)
    cuts = sorted({round(j * blocks / n) for j in range(1, n)} - {0, blocks})
    if len(cuts) + 1 < n:
        log.info("the corpus has %d blocks of %d windows: %d shards instead of %d", blocks, cfg.block_windows,
                 len(cuts) + 1, n)
    starts = [({}, 0)] + [bounds[c - 1] for c in cuts] + [(None, rows)]
    shards = []
    for (start, lo), (end, hi) in zip(starts, starts[1:]):
        shards.append({"start": {**_new_state(), **start}, "rows": hi - lo,
                       "stop": None if end is None else [end["seq"], end["window"]]})
    log.info("planned %d shards over %d keys", len(shards), rows)
    return {"shards": shards, "rows": rows, "seconds": 0.0, "merged": False}


def run_shard(lm: LM, src, cfg: BuildConfig, work: Path, spec: dict, progress=None) -> int:
    """Build (or resume) one shard in its directory; returns the keys it holds."""
    if (work / "progress.json").exists():
        s = _read_progress(work)
        _check_partial(work, s, lm.dim)
    else:
        work.mkdir(parents=True, exist_ok=True)
        s = json.loads(json.dumps(spec["start"]))
    if s.get("done"):
        return s["rows"]
    w = _Writer(work, lm.dim, s)
    try:
        # A shard stopped right at its end has nothing left to run.
        if spec["stop"] is None or [s["seq"], s["window"]] != spec["stop"]:
            _fill(lm, src, cfg, w, progress, spec["stop"])
        w.state["done"] = True
        w.checkpoint(w.state["seq"], w.state["window"])
    finally:
        w.close()
    return w.state["rows"]


def build_sharded(corpus: str, out: str | os.PathLike | None = None, cfg: BuildConfig = BuildConfig(),
                  shard_cfg: ShardConfig = ShardConfig(), lm: LM | None = None, progress=None,
                  total=None) -> Datastore:
    """Build a datastore in shards and merge them: the arrays equal an unsharded build's.

    Args:
        corpus: as for build_datastore.
        out: the datastore directory (on storage every Ray node sees); None: $KNNLM_DATASTORE or the default.
        cfg: build settings (--max-tokens, holdout, windows... apply to the whole build).
        shard_cfg: how many shards, and the engine that runs them.
        lm: an already loaded model for planning and the local engine (else cfg.model is loaded).
        progress: optional callable taking the number of keys just stored, by any shard.
        total: optional callable taking the number of keys the build will store, once planned.

    Returns:
        The opened datastore. Interrupted, OUT.partial/ keeps every shard's checkpoint for `resume=True`.
    """
    if shard_cfg.engine is Engine.RAY and shard_cfg.ray_address is not None:
        ensure_ray(shard_cfg.ray_address)  # join the cluster first: an address with no cluster stops nothing begun
    path = datastore_path(out)
    with claimed(path):
        work, plan = _prepare_dirs(path, cfg, sharded=True)  # before the model loads
        out, src, lm = open_build(corpus, out, cfg, lm)
        if plan is WHOLE:
            return _move_in(check_whole(work, cfg, src, lm), out)
        return _build_sharded(lm, src, cfg, shard_cfg, work, plan, out, progress, total)


def _build_sharded(lm: LM, src, cfg: BuildConfig, shard_cfg: ShardConfig, work: Path, plan: dict | None, out: Path,
                   progress, total) -> Datastore:
    """build_sharded's work, inside claimed(out), from _prepare_dirs' work dir and plan."""
    settings = ({k: getattr(cfg, k) for k in _RESUME_KEYS}
                | {"model": lm.fingerprint, "corpus": src.files, "shards": shard_cfg.shards})
    if plan is None:
        clear_work(work)
        try:
            plan = plan_shards(lm, src, cfg, shard_cfg.shards)
        except KNNLMError:  # nothing planned, nothing to resume: no OUT.partial left to refuse the next build
            clear_work(work)
            raise
        write_json(work / "settings.json", settings)
        write_json(work / "shards.json", plan)
    else:
        check_resume_settings(work, settings)
    if total:
        total(plan["rows"])
    if not plan.get("merged"):
        t0 = time.time()
        try:
            # Workers elsewhere read documents by absolute path; names (and so meta.json) stay as given.
            # Without the planning pass's open table readers (a pyarrow batch generator cannot be pickled).
            remote_src = replace(src, _tables=None, docs=[replace(r, path=str(Path(r.path).resolve())) if r.path else r
                                            for r in src.docs])
            dirs = [shard_dir(work.resolve(), i) for i in range(len(plan["shards"]))]
            run_shards(shard_cfg, lm, remote_src, cfg, dirs, plan["shards"], progress)
        finally:
            plan["seconds"] += time.time() - t0
            write_json(work / "shards.json", plan)
        plan["state"] = merge_shards(work, dirs, plan["shards"], lm.dim) | {"seconds": plan["seconds"]}
        plan["merged"] = True
        write_json(work / "shards.json", plan)
    shutil.rmtree(work / "shards", ignore_errors=True)  # merged: only the merged arrays are resumed from
    # Files the shards skipped as unreadable (found by workers elsewhere) go into meta.json with the rest.
    src.unreadable[:] = list(dict.fromkeys([*plan["state"].get("unreadable", []), *src.unreadable]))
    return _finish(lm, src, cfg, work, plan["state"], out, index_runner(shard_cfg, len(plan["shards"])))
