"""Scale: index train + add time (one process, 2 Ray parts, on disk), search memory with the index on
disk as keys grow, and a sharded build's throughput against an unsharded one.

    python bench/scale.py [--keys 1000000,2000000] [--build-tokens 4000] [--keep]

Keys are clustered like real ones: the real SmolLM2 keys of bench/results/code (built by
bench/quality.py) plus Gaussian noise. Every ratio compares two timings of one run. Datastores are made
under bench/results/scale/ and removed at the end unless --keep (10M keys of d = 576 are 11.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench helpers, and this checkout's knnlm
# One thread per process unless told (the machine is shared): --threads sets it before faiss and torch load.
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
os.environ["OMP_NUM_THREADS"] = _threads

import numpy as np  # noqa: E402

from common import MemorySampler, stdlib_texts  # noqa: E402
from knnlm.arrays import write_json  # noqa: E402

REAL = [HERE / "results" / "code"]  # bench/quality.py builds it


def real_datastore() -> Path:
    """The real datastore whose keys seed the synthetic ones."""
    for p in REAL:
        if (p / "keys.npy").exists():
            return p
    sys.exit("bench/scale.py needs a real datastore: run bench/quality.py first (it builds bench/results/code).")


def clustered_datastore(path: Path, real: Path, n: int, seed: int = 0, chunk: int = 100_000) -> Path:
    """n keys = real keys (picked at random) + noise of a tenth of their spread, with the real meta's model."""
    meta = json.loads((real / "meta.json").read_text())
    src = np.load(real / "keys.npy", mmap_mode="r")
    spread = float(np.asarray(src[:10_000], dtype=np.float32).std())
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    keys = np.lib.format.open_memmap(path / "keys.npy", mode="w+", dtype=np.float16, shape=(n, meta["dim"]))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        rows = np.sort(rng.integers(0, len(src), hi - lo))
        noise = rng.normal(0, 0.1 * spread, size=(hi - lo, meta["dim"])).astype(np.float32)
        keys[lo:hi] = (np.asarray(src[rows], dtype=np.float32) + noise).astype(np.float16)
    keys.flush()
    del keys
    np.save(path / "vals.npy", np.load(real / "vals.npy")[rng.integers(0, len(src), n)])
    write_json(path / "meta.json", {
        **{k: meta[k] for k in ("format", "model", "tokenizer", "key_source", "dim", "dtype", "context", "stride")},
        "count": n, "holdout": {"share": 0, "dev_documents": 0, "test_documents": 0},
        "corpus": {"source": f"synthetic: {real} + noise", "files": []}, "documents": [["synthetic", 0, n, 0]],
        "build": {"finished": f"clustered-{n}-{seed}", "seconds": 0, "tokens_per_s": None, "device": "cpu"}})
    return path


def timed_index(path: Path, on_disk: bool = False, runner=None) -> dict:
    """Train + add the default index of the datastore at path; index.json's fields and wall seconds."""
    from knnlm.datastore import open_datastore
    from knnlm.index import IndexConfig, train_index

    t0 = time.perf_counter()
    info = train_index(open_datastore(path), IndexConfig(on_disk=on_disk), runner=runner)
    return {"seconds": round(time.perf_counter() - t0, 1), "train_seconds": info["train_seconds"],
            "factory": info["factory"], "lists": info["lists"]}


def search_memory(path: str, queries: int) -> dict:
    """(In a fresh process) private and file-backed peak memory of searching the datastore's index."""
    from knnlm.datastore import open_datastore
    from knnlm.retrieval import RetrievalConfig, Retriever

    ds = open_datastore(path)
    rng = np.random.default_rng(1)
    q = (np.asarray(ds.keys[np.sort(rng.integers(0, ds.count, queries))], dtype=np.float32)
         + rng.normal(0, 0.05, size=(queries, ds.dim)).astype(np.float32))
    with MemorySampler() as base:
        pass
    with MemorySampler() as m:
        r = Retriever(ds, RetrievalConfig())  # k = 1000, nprobe 8, exact re-rank from keys.npy
        t0 = time.perf_counter()
        for lo in range(0, queries, 64):
            r.search(q[lo: lo + 64])
        seconds = time.perf_counter() - t0
    return {"private_mib": round(m.peak["RssAnon"], 1), "private_beyond_start_mib":
            round(m.peak["RssAnon"] - base.peak["RssAnon"], 1), "file_backed_mib": round(m.peak["RssFile"], 1),
            "queries_per_s": round(queries / seconds, 1)}


def sharded_build_ratio(tokens: int, results: Path) -> dict:
    """Unsharded and 2-shard (local engine) builds of the same stdlib text with SmolLM2: seconds and ratio."""
    from knnlm.build import BuildConfig, build_datastore
    from knnlm.lm import load_lm
    from knnlm.scale import ShardConfig, build_sharded

    lm = load_lm("smollm2-135m", "cpu")
    corpus = results / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, (_name, text) in enumerate(stdlib_texts(40)):
        (corpus / f"{i:03d}.txt").write_text(text)
    # Short windows and blocks, so that a few thousand keys make enough blocks for 2 shards.
    cfg = BuildConfig(model="smollm2-135m", device="cpu", holdout=0.05, max_tokens=tokens, build_index=False,
                      context=256, stride=128, batch_size=4, block_windows=4, overwrite=True)
    build_datastore(str(corpus), results / "warm-up", BuildConfig(**{**cfg.__dict__, "max_tokens": 200}), lm=lm)
    seconds = {"unsharded": 0.0, "sharded": 0.0}
    built = {}
    for kind in ("unsharded", "sharded", "sharded", "unsharded"):  # ABBA: drifting load hits both alike
        t0 = time.perf_counter()
        if kind == "unsharded":
            built[kind] = build_datastore(str(corpus), results / kind, cfg, lm=lm)
        else:
            built[kind] = build_sharded(str(corpus), results / kind, cfg, ShardConfig(shards=2), lm=lm)
        seconds[kind] += time.perf_counter() - t0
    a, b = built["unsharded"], built["sharded"]
    same = bool(np.array_equal(a.keys, b.keys) and np.array_equal(a.vals, b.vals))
    return {"keys": a.count, "shards": b.meta["build"]["shards"], "unsharded_s": round(seconds["unsharded"], 1),
            "sharded_s": round(seconds["sharded"], 1), "identical_arrays": same,
            "throughput_ratio": round(seconds["unsharded"] / seconds["sharded"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", default="1000000,2000000", help="comma-separated datastore sizes")
    ap.add_argument("--ray-keys", type=int, default=None,
                    help="size for the one process vs 2 Ray parts timing [default: the smallest of --keys; 0: skip]")
    ap.add_argument("--queries", type=int, default=256, help="queries of the search-memory measurement")
    ap.add_argument("--build-tokens", type=int, default=4000, help="keys of the sharded-build comparison (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the datastores under bench/results/scale")
    ap.add_argument("--threads", type=int, default=1, help="threads of this process (each Ray part has one)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"), help="where the report goes")
    ap.add_argument("--search-memory", metavar="DATASTORE",
                    help="only measure a search's peak private memory over DATASTORE, in this process (the full "
                         "run does this in a fresh process)")
    args = ap.parse_args()
    if args.search_memory:
        print(json.dumps(search_memory(args.search_memory, args.queries)))
        return
    results = HERE / "results" / "scale"
    results.mkdir(parents=True, exist_ok=True)
    real, sizes = real_datastore(), [int(s) for s in args.keys.split(",") if s and int(s) > 0]
    ray_keys = min(sizes, default=0) if args.ray_keys is None else args.ray_keys
    report = {"threads": args.threads, "cpus": os.cpu_count(), "real_keys": str(real), "sizes": {}}
    try:
        if args.build_tokens:
            report["sharded_build"] = sharded_build_ratio(args.build_tokens, results / "build")
            print(json.dumps({"sharded_build": report["sharded_build"]}), flush=True)
            shutil.rmtree(results / "build")
        for n in sorted(set(sizes) | ({ray_keys} - {0})):
            path = results / f"keys-{n}"
            t0 = time.perf_counter()
            clustered_datastore(path, real, n)
            row = {"write_s": round(time.perf_counter() - t0, 1), "keys_gib": round(n * 576 * 2 / 2**30, 2)}
            if n == ray_keys:
                from knnlm.scale.engines import RayRunner, ensure_ray

                row["one_process"] = timed_index(path)
                ensure_ray(None)  # started before the clock: a cluster is up before a build uses it
                row["ray_2_parts"] = timed_index(path, runner=RayRunner(2))
                row["ray_over_one_process"] = round(row["ray_2_parts"]["seconds"] / row["one_process"]["seconds"], 3)
            if n not in sizes:  # only the Ray comparison at this size
                report["sizes"][n] = row
                shutil.rmtree(path)
                continue
            row["on_disk"] = timed_index(path, on_disk=True)
            out = subprocess.run([sys.executable, __file__, "--search-memory", str(path), "--queries",
                                  str(args.queries), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            row["search_on_disk"] = json.loads(out.stdout.strip().splitlines()[-1])
            report["sizes"][n] = row
            print(json.dumps({n: row}), flush=True)
            if not args.keep:
                shutil.rmtree(path)
    finally:
        if not args.keep:
            shutil.rmtree(results, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
