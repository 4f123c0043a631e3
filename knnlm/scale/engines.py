"""Where shards run: in this process, or as Ray tasks (one per shard, each loading the model once)."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import KNNLMError

log = logging.getLogger(__name__)


class Engine(str, Enum):
    """What runs the shards of a build and the parts of an index."""

    LOCAL = "local"  # this process, one shard after another (torch already uses every core)
    RAY = "ray"  # one Ray task per shard (num_gpus=1 where the cluster has GPUs)


def _rows_done(work: Path) -> int:
    """Keys a shard has checkpointed (0 before its first checkpoint)."""
    try:
        return int(json.loads((work / "progress.json").read_bytes())["rows"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def run_shards(shard_cfg, lm, src, cfg, dirs: list[Path], specs: list[dict], progress=None) -> None:
    """Build every unfinished shard (dirs[i] per specs[i]); what is already checkpointed counts as progress."""
    from .shards import run_shard

    if progress:
        progress(sum(_rows_done(d) for d in dirs))
    if shard_cfg.engine is Engine.LOCAL:
        for d, spec in zip(dirs, specs):
            run_shard(lm, src, cfg, d, spec, progress)
        return
    _run_ray_shards(shard_cfg.ray_address, src, cfg, dirs, specs, progress)


def _ray():
    """The ray module, or one sentence saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise KNNLMError("--engine ray needs Ray; install it with `pip install 'knnlm[ray]'`, "
                         "or use --engine local.") from e
    return ray


RAY_CONNECT_TIMEOUT = 10.0  # seconds a cluster's head may take to accept a connection before the build gives up


def _no_cluster(address: str, why: str) -> KNNLMError:
    return KNNLMError(f"No Ray cluster answers at --ray-address {address} ({why}); start one there (`ray start "
                      "--head`), pass its head's address, or leave --ray-address out for a local Ray.")


def check_reachable(address: str | None) -> None:
    """One sentence, before Ray is asked, where nothing listens at a host:port address (Ray itself would retry
    for minutes). None, "auto" and "local" are Ray's to resolve."""
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise KNNLMError(f"--ray-address {address} is not HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:PORT or auto; "
                         "pass the address `ray start --head` printed.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise _no_cluster(address, e.strerror or type(e).__name__) from e


def ensure_ray(address: str | None):
    """Join the Ray cluster at address, or start a local one, unless this process already has Ray running."""
    ray = _ray()
    check_reachable(address)
    if not ray.is_initialized():
        # Local workers import the same knnlm as this process.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        try:
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=False)
        except ConnectionError as e:  # e.g. "auto" with no cluster running on this machine
            raise _no_cluster(address, str(e).split(". ")[0].rstrip(".")) from e
    return ray


def _gpus(ray) -> int:
    """GPUs to ask per shard task: one where the cluster has any."""
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _ray_shard(src, cfg, work: str, spec: dict) -> int:
    """A Ray task: load the model once and build (or resume) one shard."""
    from ..lm import load_lm
    from .shards import run_shard

    lm = load_lm(cfg.model, cfg.device, cfg.trust_remote_code)
    return run_shard(lm, src, cfg, Path(work), spec)


def _unwrap(ray, e: Exception, what: str) -> KNNLMError:
    """A Ray failure as one sentence (a KNNLMError raised inside a task as itself)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, KNNLMError):
        return cause
    return KNNLMError(f"{what} failed on Ray ({type(cause or e).__name__}: {str(cause or e).splitlines()[0]}); "
                      "finished shards and checkpoints are kept: rerun the same command with --resume.")


def _run_ray_shards(address, src, cfg, dirs: list[Path], specs: list[dict], progress) -> None:
    """One Ray task per unfinished shard; progress read from the shards' checkpoints on shared storage."""
    ray = ensure_ray(address)
    # A killed worker's task is retried, and resumes from its shard's last checkpoint.
    task = ray.remote(num_gpus=_gpus(ray), max_retries=3)(_ray_shard)
    src_ref = ray.put(src)
    pending = {task.remote(src_ref, cfg, str(d), spec): i for i, (d, spec) in enumerate(zip(dirs, specs))}
    seen = [_rows_done(d) for d in dirs]
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for i, d in enumerate(dirs):
                now = _rows_done(d)
                if progress and now > seen[i]:
                    progress(now - seen[i])
                seen[i] = max(seen[i], now)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise _unwrap(ray, e, f"Shard {i}") from e
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


@dataclass(frozen=True)
class RayRunner:
    """Runs a function over argument tuples as Ray tasks (for index parts)."""

    parts: int  # how many parts the work is split into
    address: str | None = None  # Ray cluster, or None for a local one

    def map(self, fn, args: list[tuple]) -> list:
        """fn(*a) for each a, in parallel; results in order."""
        ray = ensure_ray(self.address)
        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(*a) for a in args]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            raise _unwrap(ray, e, "Adding keys to the index") from e


@dataclass(frozen=True)
class LocalRunner:
    """Runs a function over argument tuples in this process, one after another."""

    parts: int = 1  # how many parts the work is split into

    def map(self, fn, args: list[tuple]) -> list:
        """fn(*a) for each a; results in order."""
        return [fn(*a) for a in args]


def index_runner(shard_cfg, n_parts: int):
    """What adds a sharded build's keys to its index: Ray tasks, one per shard, under --engine ray; else None."""
    if shard_cfg.engine is Engine.RAY:
        return RayRunner(n_parts, shard_cfg.ray_address)
    return None
