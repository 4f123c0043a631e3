"""kNN-LM eval throughput ÷ LM-only throughput, and peak RSS, at several datastore sizes.

    python bench/eval.py [--sizes 100000,1000000] [--tokens 3000]
    python bench/eval.py --real [--variants knn,skip,retomaton,skip+retomaton] [--tokens 3000]
    python bench/eval.py --datastore DIR [--variants knn,retomaton] [--no-exact] [--lambda tuned]

Each size runs in its own process (so peak RSS is its own); within it the LM-only and the
kNN-LM passes alternate twice (--rounds) over the same tokens, and the ratio uses the sums. Each
pass ends with its report, as `knnlm eval`'s tokens/s do: the LM's perplexity; the kNN-LM's
mixing, whose share is reported apart (report_ms_per_token). Keys are
random (the timing does not depend on what they encode); datastores are cached in
bench/results/ between runs.

--real uses the real datastore of 1M keys bench/results/real-1m: SmolLM2's keys over the Python
sources of this environment's site-packages (shuffled files, the first 1M tokens; about an hour to
build once on 2 cores). Its eval text (and, apart, about 33k tokens to tune its gates on) are
other files of the same directories: the same libraries, text the datastore does not hold. Each
speed-feature variant (the learned skip, RetoMaton, both) is timed against the LM alone, and its
perplexity compared with an exact (brute-force) full search under the same λ policy.
--datastore times any datastore (e.g. bench/scale.py --keep's 10M clustered keys). The variant
"torch" searches exactly in torch (--search-device) on $KNNLM_BENCH_SEARCH_DEVICE (default: the LM's,
$KNNLM_BENCH_DEVICE, e.g. cuda); "rerank-R" re-ranks the first R candidates (--rerank-depth), "nprobe-N"
visits N lists (default 8), "k-N" takes N neighbours instead of 1000 (another model: the perplexity against the
exact search, at k 1000, says what it costs), "candidates-N" ranks N of RetoMaton's candidates (--max-candidates),
e.g. --variants nprobe-4+rerank-128,k-256+rerank-128,retomaton+candidates-2048. The λ policy
is the learned gate where the datastore is tuned (its LM statistics and token statistics are then part of the kNN-LM's time), else
0.25; --lambda sets another, e.g. tuned (the fitted fixed λ and T, knnlm eval's cheapest mixing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import VARIANTS_HELP, parse_variant, stdlib_texts, variant_retrieval  # noqa: E402

HERE = Path(__file__).parent


def one_size(n: int, tokens: int, rounds: int = 2) -> dict:
    """Measure at one datastore size (run in a child process)."""
    from common import BENCH_DEVICE, BENCH_MODEL, peak_rss_mib
    from knnlm.datastore import open_datastore
    from knnlm.evaluate import score_documents
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    path = HERE / "results" / f"synthetic-{n}"
    ds = open_datastore(path)
    docs = eval_docs(lm, tokens)
    retriever = Retriever(ds, RetrievalConfig())  # the defaults: k 1000, nprobe 8, re-rank on
    rss_before = peak_rss_mib()
    score_documents(lm, None, docs[:1], 512, 256)  # warm-up
    lm_s, knn_s, s, timer, mem, _mix_s, per_round = alternate(lm, retriever, docs, rounds=rounds)
    keys_mib = (path / "keys.npy").stat().st_size / 2**20
    return {"keys": n, "tokens": len(s), "lm_only_tokens_per_s": rounds * len(s) / lm_s,
            "knn_lm_tokens_per_s": rounds * len(s) / knn_s, "ratio": lm_s / knn_s,
            "ratio_per_round": [round(x, 3) for x in per_round],
            "retrieval_share_of_knn_time": timer.retrieval / knn_s, "keys_npy_mib": round(keys_mib),
            "index_mib": round((path / "index.faiss").stat().st_size / 2**20),
            "peak_rss_mib_after_load": round(rss_before), "peak_rss_mib": round(peak_rss_mib()),
            "peak_private_mib": round(mem.peak["RssAnon"]), "peak_mapped_file_mib": round(mem.peak["RssFile"])}


def alternate(lm, retriever, docs, combiner=None, rounds: int = 2):
    """The LM alone and the kNN-LM over the same documents, alternating `rounds` times: (LM seconds, kNN-LM
    seconds, the kNN-LM's last Scores, its Timer, the peak-memory sampler, the kNN-LM's report seconds, each
    round's ratio). The order turns every round (LM first, then the kNN-LM first, ...), so that a drift of the
    machine's speed weighs on both sides alike.

    Each side's seconds end with its report, as `knnlm eval`'s tokens/s do: the LM's perplexity, and the
    kNN-LM's mixing (a learned gate's features sort every token's neighbours by token)."""
    from common import MemorySampler
    from knnlm.combine import resolve_combiner
    from knnlm.evaluate import Timer, report, score_documents
    from knnlm.interpolate import perplexity

    combiner = combiner if combiner is not None else resolve_combiner("0.25")
    timer, lm_s, knn_s, mix_s, scores = Timer(), [], [], [0.0], [None]

    def lm_side():
        t0 = time.perf_counter()
        perplexity(score_documents(lm, None, docs, 512, 256).lm_logp)
        lm_s.append(time.perf_counter() - t0)

    def knn_side():
        t0 = time.perf_counter()
        scores[0] = score_documents(lm, retriever, docs, 512, 256, timer=timer, combiner=combiner)
        t1 = time.perf_counter()
        report(scores[0], combiner)
        mix_s[0] += time.perf_counter() - t1
        knn_s.append(time.perf_counter() - t0)

    with MemorySampler() as mem:
        for i in range(rounds):
            for side in ((lm_side, knn_side) if i % 2 == 0 else (knn_side, lm_side)):
                side()
    return sum(lm_s), sum(knn_s), scores[0], timer, mem, mix_s[0], [a / b for a, b in zip(lm_s, knn_s)]


REAL = HERE / "results" / "real-1m"


def sibling_texts(ds_path: Path, seed: int, skip: int = 0) -> list[tuple[str, str]]:
    """(name, text) of Python files beside the datastore's documents that it does not hold: text of the
    same libraries the LM never read in the datastore. Shuffled with seed; the first `skip` left out."""
    import json
    import random

    held = {d[0] for d in json.loads((ds_path / "meta.json").read_text())["documents"]}
    dirs = sorted({Path(name).parent for name in held})
    files = sorted({p for d in dirs for p in d.glob("*.py")
                    if str(p) not in held and 2_000 < p.stat().st_size < 60_000})
    random.Random(seed).shuffle(files)
    return [(str(p), p.read_text(errors="replace")) for p in files[skip:]]


def eval_docs(lm, tokens: int, real: Path | None = None) -> list[tuple[str, str]]:
    """Files until they hold `tokens` tokens: files beside the real datastore's documents (seed 1), else
    stdlib files (seed 1)."""
    docs, total = [], 0
    for name, text in (sibling_texts(real, seed=1) if real is not None else stdlib_texts(50, seed=1)):
        docs.append((name, text))
        total += len(lm.encode(text))
        if total >= tokens:
            break
    return docs


def prepare_real(path: Path = REAL, keys: int = 1_000_000, tune: bool = True) -> None:
    """Build the real datastore (once) and, with tune, tune its mixing on files beside its documents that eval_docs
    never reads."""
    import sysconfig

    from common import BENCH_DEVICE, BENCH_MODEL
    from knnlm.build import BuildConfig, build_datastore
    from knnlm.datastore import partial_dir

    held = json.loads((path / "meta.json").read_text())["count"] if (path / "meta.json").exists() else keys
    if held != keys:
        print(f"{path} holds {held} keys, not {keys}: timing it as it is (delete it to build another size).",
              file=sys.stderr)
    if not (path / "index.faiss").exists():
        site = sysconfig.get_paths()["purelib"]
        build_datastore(site, path, BuildConfig(model=BENCH_MODEL, device=BENCH_DEVICE, glob="**/*.py", holdout=0,
                                                shuffle_seed=0, max_tokens=keys,
                                                resume=partial_dir(path).exists()))
    if tune and not (path / "lambda.json").exists():
        dev = path.parent / f"{path.name}-dev"
        dev.mkdir(parents=True, exist_ok=True)
        chars = 0
        for i, (name, text) in enumerate(sibling_texts(path, seed=1, skip=100)):  # eval_docs reads fewer than 100
            (dev / f"{i:03d}-{Path(name).name}").write_text(text)
            chars += len(text)
            if chars >= 80_000:  # about 33k tokens of Python
                break
        subprocess.run([sys.executable, "-m", "knnlm", "tune-lambda", "-d", str(path), "-c", str(dev), "--glob", "*.py",
                        "--no-spalm", "--no-plot", "--device", BENCH_DEVICE], check=True)


def with_factory(path: Path, factory: str) -> Path:
    """A sibling of the datastore at path sharing its arrays (hard links) and tuning, indexed with a faiss factory."""
    import shutil

    from knnlm.datastore import open_datastore
    from knnlm.index import IndexConfig, train_index

    out = path.parent / f"{path.name}-{factory.replace(',', '-')}"
    if not (out / "index.faiss").exists():
        out.mkdir(exist_ok=True)
        for f in ("keys.npy", "vals.npy"):
            if not (out / f).exists():
                (out / f).hardlink_to(path / f)
        for f in ("meta.json", "lambda.json", "mixing.safetensors"):
            if (path / f).exists():
                shutil.copy2(path / f, out / f)
        train_index(open_datastore(out), IndexConfig(factory=factory))
    return out


def default_lambda(path: Path) -> str:
    """The λ policy a datastore is timed with unless told: the learned gate where it is tuned (its skip is what
    the "skip" variants turn on), else 0.25."""
    return "gate" if (path / "lambda.json").exists() else "0.25"


def one_datastore(path: Path, tokens: int, variants: list[str], exact: bool, real: bool = False,
                  rounds: int = 2, lam: str | None = None) -> dict:
    """Each variant's eval throughput against the LM alone (alternating, `rounds` times) and its perplexity
    against an exact full search with the same λ policy (lam: knnlm eval's --lambda; None: the learned gate
    where the datastore is tuned, else 0.25)."""
    from common import BENCH_DEVICE, BENCH_MODEL
    from knnlm.combine import resolve_combiner
    from knnlm.datastore import open_datastore
    from knnlm.errors import KNNLMError
    from knnlm.evaluate import report, score_documents
    from knnlm.lm import load_lm
    from knnlm.retrieval import RetrievalConfig, Retriever

    lm = load_lm(BENCH_MODEL, BENCH_DEVICE)
    ds = open_datastore(path)
    docs = eval_docs(lm, tokens, path if real else None)
    lam = lam or default_lambda(path)
    out = {"datastore": str(path), "keys": ds.count, "lambda": lam, "variants": {}}
    if exact:
        combiner = resolve_combiner(lam, path)
        s = score_documents(lm, Retriever(ds, RetrievalConfig(exact=True)), docs, 512, 256, combiner=combiner)
        r = report(s, combiner)
        out["exact_knn_lm_ppl"], out["lm_ppl"] = r["knn_lm_ppl"], r["lm_ppl"]
    score_documents(lm, None, docs[:1], 512, 256)  # warm-up
    for name in variants:
        on = parse_variant(name)
        try:  # the skip needs a tuned threshold: knnlm's own sentence where the datastore has none
            combiner = resolve_combiner(lam, path, skip_below="tuned" if "skip" in on else None)
        except KNNLMError as e:
            out["variants"][name] = str(e)
            continue
        retriever = Retriever(ds, variant_retrieval(on))
        score_documents(lm, retriever, docs[:1], 512, 256, combiner=combiner)  # warm-up: index, pointers
        lm_s, knn_s, s, timer, mem, mix_s, per_round = alternate(lm, retriever, docs, combiner, rounds)
        r = report(s, combiner)
        row = {"tokens": r["tokens"], "ratio": round(lm_s / knn_s, 3),
               "ratio_per_round": [round(x, 3) for x in per_round],
               "lm_only_tokens_per_s": round(rounds * r["tokens"] / lm_s, 1),
               "knn_lm_tokens_per_s": round(rounds * r["tokens"] / knn_s, 1),
               "retrieval_ms_per_token": round(1000 * timer.retrieval / (rounds * r["tokens"]), 3),
               "report_ms_per_token": round(1000 * mix_s / (rounds * r["tokens"]), 3),
               "searches_skipped": round(r["searches_skipped"], 4),
               "searches_saved_by_retomaton": round(timer.searches_saved / (rounds * r["tokens"]), 4),
               "knn_lm_ppl": round(r["knn_lm_ppl"], 4), "peak_private_mib": round(mem.peak["RssAnon"])}
        if exact:
            row["ppl_over_exact_full_search"] = round(r["knn_lm_ppl"] / out["exact_knn_lm_ppl"] - 1, 5)
        out["variants"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return out


def prepare(n: int) -> None:
    """Create the synthetic datastore of n keys and its index (run in a process of its own)."""
    from common import BENCH_DEVICE, BENCH_MODEL, cached_synthetic
    from knnlm.lm import load_lm

    path = HERE / "results" / f"synthetic-{n}"
    if not (path / "index.faiss").exists():
        cached_synthetic(path, load_lm(BENCH_MODEL, BENCH_DEVICE), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--real", action="store_true", help=f"time the speed-feature variants on {REAL}")
    ap.add_argument("--datastore", help="time the variants on this datastore")
    ap.add_argument("--real-keys", type=int, default=None,
                    help="keys of the real datastore --real builds when it is missing (with --datastore: at that path) "
                         "[default: 1,000,000]")
    ap.add_argument("--variants", default="knn,skip,retomaton,skip+retomaton,no-rerank,skip+no-rerank",
                    help=VARIANTS_HELP)
    ap.add_argument("--factory", help="time a sibling datastore indexed with this faiss factory, e.g. IVF2048,PQ64x4fs")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact full-search perplexity reference")
    ap.add_argument("--rounds", type=int, default=2, help="times the kNN-LM alternates with the LM alone [default: 2]")
    ap.add_argument("--lambda", dest="lam",
                    help="the λ policy, as knnlm eval's --lambda (with --real or --datastore) [default: gate where the "
                         "datastore is tuned, else 0.25]")
    ap.add_argument("--out", help="also write the report here (JSON)")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be 1 or more.")
    if args.lam is not None and not (args.real or args.datastore):
        sys.exit("--lambda sets the λ policy of --real and --datastore runs; the synthetic sizes use a fixed λ 0.25.")
    if args.real_keys is not None and not args.real:
        sys.exit("--real-keys sets the size of the datastore --real builds; pass --real too.")
    if args.real or args.datastore:
        path = Path(args.datastore) if args.datastore else REAL
        if args.real:
            prepare_real(path, args.real_keys or 1_000_000)
        if args.factory:
            path = with_factory(path, args.factory)
        if args.lam is not None:
            from knnlm.combine import resolve_combiner
            from knnlm.errors import KNNLMError
            try:
                resolve_combiner(args.lam, path)  # a bad policy stops here, in one sentence, before any variant runs
            except KNNLMError as e:
                sys.exit(str(e))
        variants = [v for v in args.variants.split(",") if v]
        for v in variants:
            parse_variant(v)  # an unknown one stops here, before any work
        out = one_datastore(path, args.tokens, variants, not args.no_exact, real=args.real, rounds=args.rounds,
                            lam=args.lam)
        print(json.dumps(out, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))
        return
    if args.prepare is not None:
        prepare(args.prepare)
        return
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.tokens, args.rounds)))
        return
    rows = []
    for n in map(int, args.sizes.split(",")):
        subprocess.run([sys.executable, __file__, "--prepare", str(n)], check=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--tokens", str(args.tokens),
                              "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("target: ratio >= 0.90 at 1M keys; peak RSS must not grow with keys.npy (peak_private_mib is the\n"
          "process's own memory; peak_mapped_file_mib counts keys.npy pages a search touched: page cache)")


if __name__ == "__main__":
    main()
