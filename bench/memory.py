"""Memory of the text being read, on long documents: how much of the window → full-context gap it recovers.

    python bench/memory.py [--rows window,window+doc,full,full+doc] [--context 256] [--stride 128]
                           [--datastore bench/results/code] [--threads 1]

Documents: bench/common.py's long_documents (whole stdlib packages, each cut to SmolLM2's 8192
positions). Every row is the perplexity of the tokens past the first window (target position > W),
per package:
- window: eval's sliding windows of --context W tokens advancing by --stride;
- window+doc: the same keys, with the document memory (causal exact top-k over the package's own
  earlier positions) mixed in as p_mem, λ_m and T_m fitted leave-one-package-out (on the other
  packages' tokens), so no package's figure is fitted on itself;
- full: one window of all 8192 tokens (the model's positions: the upper bound);
- full+doc: full-context keys with the document memory;
- window+doc adaptive: as window+doc with λ_m per quartile of the memory's nearest distance (Drozdov
  et al.'s adaptive λ applied to the memory; measured here only, not offered by eval yet);
- ds rows (--datastore): the datastore's exact neighbours (k = --ds-k) mixed with its tuned λ and T
  (window+ds), and the document memory added to it both ways, as eval does them: "joint" (one p_kNN
  over datastore and memory, the datastore's tuned λ and T), "joint refit" (the same with λ, T fitted
  leave-one-out) and "separate" (p_mem on top of window+ds, λ_m, T_m leave-one-out).
- window+attn: attention memory (AttentionMemoryConfig's defaults) in the window W; window+attn+doc: its
  keys with the document memory mixed in as in window+doc. The cost columns are seconds per token of
each step against the window-only forward, all measured in this run on --threads threads. Forward
passes are cached in bench/results/memory-cache/ (keys and LM log-probs per package and window).
Writes bench/results/memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import long_documents  # noqa: E402
from knnlm.arrays import json_safe, write_json  # noqa: E402
from knnlm.interpolate import interpolate, knn_log_prob, perplexity  # noqa: E402
from knnlm.lm import DEFAULT_MODEL, load_lm  # noqa: E402
from knnlm.memory.attention import AttentionMemoryConfig  # noqa: E402
from knnlm.memory.document import causal_neighbors, fit_memory, join_neighbors, mix_memory  # noqa: E402
from knnlm.memory.reading import forward_in_order  # noqa: E402
from knnlm.windows import forward_owned, plan_windows  # noqa: E402

BASE_ROWS = ("window", "window+doc", "window+doc adaptive", "full", "full+doc")
DS_ROWS = ("window+ds", "window+ds+doc joint", "window+ds+doc joint refit", "window+ds+doc separate")
ATTN_ROWS = ("window+attn", "window+attn+doc")  # attention memory (its defaults), alone and with the document memory
ROWS = BASE_ROWS + DS_ROWS + ATTN_ROWS


def score_ids(lm, ids: list[int], context: int, stride: int, batch_size: int, attention=None) -> dict:
    """Keys (n − 1, d) of positions 0..n−2 and log p_LM of tokens 1..n−1 in eval's windows (with attention
    memory when given: windows read in order, as eval reads them), with seconds."""
    work = [(w, ids[w.begin: w.end]) for w in plan_windows(0, len(ids), context, stride)]
    keys, logp = {}, {}
    t0 = time.perf_counter()
    batches = forward_owned(lm, work, batch_size, logits=True) if attention is None else \
        forward_in_order(lm, work, attention, context)
    for owned in batches:
        for o in owned:
            tgt = torch.as_tensor(ids[o.window.own_from + 1: o.window.own_to + 1])
            lp = torch.log_softmax(o.logits.float(), dim=-1)  # (n, V)
            logp[o.item] = lp.gather(1, tgt[:, None].to(lp.device))[:, 0].double().cpu().numpy()
            keys[o.item] = o.keys.float().cpu().numpy()
            del lp
    seconds = time.perf_counter() - t0
    order = sorted(keys)
    return {"keys": np.concatenate([keys[i] for i in order]), "lm_logp": np.concatenate([logp[i] for i in order]),
            "seconds": seconds}


def cached_scores(lm, pkg: str, ids: list[int], context: int, stride: int, batch_size: int, cache: Path,
                  attention=None) -> dict:
    """score_ids, kept in cache/ (npz) so that a rerun does not repeat the forwards."""
    tag = "" if attention is None else "-attn-" + "-".join(map(str, attention.describe.values()))
    path = cache / f"{pkg}-{len(ids)}-{context}-{stride}{tag}.npz"
    if path.exists():
        with np.load(path) as z:
            return {name: z[name] for name in z.files if name != "seconds"} | {"seconds": float(z["seconds"])}
    out = score_ids(lm, ids, context, stride, batch_size, attention)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def fit_adaptive_memory(base: np.ndarray, md: np.ndarray, mv: np.ndarray, targets: np.ndarray, bins: int = 4) -> dict:
    """λ_m per quantile bin of the memory's nearest distance and one T_m, maximising the likelihood."""
    from knnlm.memory.document import TUNE_LAMBDAS, TUNE_TEMPERATURES
    from knnlm.tune import fit_bins

    nn = md[:, 0].astype(np.float64)
    edges = fit_bins(nn, bins, 200)
    b = np.searchsorted(edges, nn, side="right")
    grid, best = np.asarray(TUNE_LAMBDAS), (-np.inf, 1.0, None)
    for t in TUNE_TEMPERATURES:
        ll = np.maximum(interpolate(base[None], knn_log_prob(md, mv, targets, t)[None], grid[:, None]), -1e300)
        sums = np.stack([ll[:, b == i].sum(1) for i in range(edges.size + 1)], 1)  # (L, B)
        if sums.max(0).sum() > best[0]:
            best = (sums.max(0).sum(), t, grid[sums.argmax(0)])
    return {"edges": edges, "lambdas": best[2], "temperature": float(best[1])}


def mix_adaptive_memory(base, md, mv, targets, fit: dict) -> np.ndarray:
    """mix_memory with fit_adaptive_memory's λ_m per token."""
    from knnlm.interpolate import adaptive_lambdas

    lam = np.where(mv[:, 0] >= 0, adaptive_lambdas(md[:, 0], fit["edges"], fit["lambdas"]), 0.0)
    return interpolate(base, knn_log_prob(md, mv, targets, fit["temperature"]), lam)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(BASE_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--context", type=int, default=256, help="W: eval's --context")
    ap.add_argument("--stride", type=int, default=128, help="eval's --stride")
    ap.add_argument("--k", type=int, default=256, help="neighbours from the document memory")
    ap.add_argument("--ds-k", type=int, default=1000, help="neighbours from the datastore (ds rows)")
    ap.add_argument("--datastore", default="bench/results/code", help="for the ds rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device of the model")
    ap.add_argument("--tokens", type=int, default=None, help="cut each document to this many tokens [default: "
                                                             "the model's positions]")
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    W, S = args.context, args.stride
    cache = Path(args.out).parent / "memory-cache"
    lm = load_lm(DEFAULT_MODEL, args.device)
    docs = long_documents(lm, args.tokens or lm.max_positions)
    kinds = {"window": (W, S, 4, None)}
    if any(r.startswith("full") for r in rows):
        kinds["full"] = (max(len(ids) for _, ids in docs),) * 2 + (1, None)
    if any(r.startswith("window+attn") for r in rows):
        kinds["attn"] = (W, S, 1, AttentionMemoryConfig())
    data = {}  # (kind, pkg) -> scores, memory neighbours and timings
    for kind, (context, stride, batch, attention) in kinds.items():
        for pkg, ids in docs:
            t0 = time.perf_counter()
            s = cached_scores(lm, pkg, ids, context, stride, batch, cache, attention)
            targets = np.asarray(ids[1:], np.int32)
            t1 = time.perf_counter()
            md, mv = causal_neighbors(s["keys"], targets, args.k)
            s.update(targets=targets, mem_dists=md, mem_vals=mv, mem_seconds=time.perf_counter() - t1,
                     past=np.arange(1, len(ids)) > W)  # target positions past the first window
            data[kind, pkg] = s
            print(f"{kind} {pkg}: {len(ids)} tokens, forward {s['seconds']:.1f} s, memory "
                  f"{s['mem_seconds']:.2f} s ({time.perf_counter() - t0:.1f} s)", flush=True)
    pkgs = [p for p, _ in docs]

    def fit_out(kind: str, pkg: str, base: dict, md: dict, mv: dict, fit=fit_memory) -> dict:
        """The memory's (λ, T) fitted on every package but pkg (past-window tokens only)."""
        others = [p for p in pkgs if p != pkg]
        cat = lambda f: np.concatenate([f(p) for p in others])  # noqa: E731
        sel = lambda p: data[kind, p]["past"]  # noqa: E731
        return fit(cat(lambda p: base[p][sel(p)]), cat(lambda p: md[p][sel(p)]), cat(lambda p: mv[p][sel(p)]),
                   cat(lambda p: data[kind, p]["targets"][sel(p)]))

    result = {"settings": {"context": W, "stride": S, "memory_k": args.k, "threads": args.threads,
                           "model": lm.name, "positions": lm.max_positions,
                           "tokens_scored_from": W + 1, "fit": "leave-one-package-out"},
              "packages": {}}
    ds_nb = {}
    if any(r.startswith("window+ds") for r in rows):
        from knnlm.combine import load_lambda
        from knnlm.datastore import open_datastore
        from knnlm.retrieval import RetrievalConfig, Retriever

        ds = open_datastore(args.datastore)
        tuned = load_lambda(ds.path)
        retriever = Retriever(ds, RetrievalConfig(k=args.ds_k, exact=True))
        for pkg in pkgs:
            s = data["window", pkg]
            t0 = time.perf_counter()
            dists, _ids, vals = retriever.neighbors(s["keys"])
            ds_nb[pkg] = (dists, vals, time.perf_counter() - t0)
            print(f"datastore search {pkg}: {ds_nb[pkg][2]:.1f} s", flush=True)
        result["settings"].update(datastore=str(ds.path), datastore_k=args.ds_k, datastore_lambda=tuned["lambda"],
                                  datastore_temperature=tuned["temperature"])
    if ds_nb:  # every package's joint neighbours and kNN-LM mix, made once for the leave-one-out fits
        lam, t = result["settings"]["datastore_lambda"], result["settings"]["datastore_temperature"]
        joint = {p: join_neighbors(*ds_nb[p][:2], data["window", p]["mem_dists"], data["window", p]["mem_vals"])
                 for p in pkgs}
        ds_mix = {p: interpolate(data["window", p]["lm_logp"],
                                 knn_log_prob(*ds_nb[p][:2], data["window", p]["targets"], t), lam) for p in pkgs}
    for pkg in pkgs:
        win, out = data["window", pkg], {}
        past = win["past"]
        tok = int(past.sum())
        fwd = win["seconds"] / len(win["targets"])  # window-only forward, seconds per token
        out["tokens"] = tok
        out["memory_share_of_forward"] = win["mem_seconds"] / win["seconds"]  # measured back to back
        out["window"] = {"ppl": perplexity(win["lm_logp"][past]), "cost": 1.0}
        for kind in kinds:
            s = data[kind, pkg]
            base = {p: data[kind, p]["lm_logp"] for p in pkgs}
            md = {p: data[kind, p]["mem_dists"] for p in pkgs}
            mv = {p: data[kind, p]["mem_vals"] for p in pkgs}
            fit = fit_out(kind, pkg, base, md, mv)
            mixed = mix_memory(s["lm_logp"], s["mem_dists"], s["mem_vals"], s["targets"], fit["lambda"],
                               fit["temperature"])
            per_tok = s["seconds"] / len(s["targets"])
            mem_tok = s["mem_seconds"] / len(s["targets"])
            if kind == "full":
                out["full"] = {"ppl": perplexity(s["lm_logp"][past]), "cost": per_tok / fwd}
            elif kind == "attn":
                out["window+attn"] = {"ppl": perplexity(s["lm_logp"][past]), "cost": per_tok / fwd}
            elif "window+doc adaptive" in rows:
                afit = fit_out(kind, pkg, base, md, mv, fit=fit_adaptive_memory)
                ad = mix_adaptive_memory(s["lm_logp"], s["mem_dists"], s["mem_vals"], s["targets"], afit)
                out["window+doc adaptive"] = {"ppl": perplexity(ad[past]), "cost": (per_tok + mem_tok) / fwd,
                                              "lambdas": afit["lambdas"], "edges": afit["edges"],
                                              "temperature": afit["temperature"]}
            out[{"attn": "window+attn+doc"}.get(kind, f"{kind}+doc")] = {"ppl": perplexity(mixed[past]), "cost": (per_tok + mem_tok) / fwd,
                                  "lambda": fit["lambda"], "temperature": fit["temperature"],
                                  "memory_seconds_per_token": mem_tok}
        if pkg in ds_nb:
            dists, vals, ds_seconds = ds_nb[pkg]
            lam, t = result["settings"]["datastore_lambda"], result["settings"]["datastore_temperature"]
            ds_cost = (win["seconds"] + ds_seconds) / len(win["targets"]) / fwd
            knn = knn_log_prob(dists, vals, win["targets"], t)
            mixed_ds = interpolate(win["lm_logp"], knn, lam)
            out["window+ds"] = {"ppl": perplexity(mixed_ds[past]), "cost": ds_cost, "lambda": lam, "temperature": t}
            # joint: one p_kNN over datastore + memory, (λ, T) fitted on the other packages
            mem_cost = win["mem_seconds"] / len(win["targets"]) / fwd
            jd = interpolate(win["lm_logp"], knn_log_prob(*joint[pkg], win["targets"], t), lam)
            out["window+ds+doc joint"] = {"ppl": perplexity(jd[past]), "cost": ds_cost + mem_cost, "lambda": lam,
                                          "temperature": t}
            lm_lp = {p: data["window", p]["lm_logp"] for p in pkgs}
            fit = fit_out("window", pkg, lm_lp, {p: joint[p][0] for p in pkgs}, {p: joint[p][1] for p in pkgs})
            jl = interpolate(win["lm_logp"], knn_log_prob(*joint[pkg], win["targets"], fit["temperature"]), fit["lambda"])
            out["window+ds+doc joint refit"] = {"ppl": perplexity(jl[past]), "cost": ds_cost + mem_cost,
                                                "lambda": fit["lambda"], "temperature": fit["temperature"]}
            # separate: p_mem on top of window+ds
            fit = fit_out("window", pkg, ds_mix, {p: data["window", p]["mem_dists"] for p in pkgs},
                          {p: data["window", p]["mem_vals"] for p in pkgs})
            sl = mix_memory(mixed_ds, win["mem_dists"], win["mem_vals"], win["targets"], fit["lambda"],
                            fit["temperature"])
            out["window+ds+doc separate"] = {"ppl": perplexity(sl[past]), "cost": ds_cost + mem_cost,
                                             "lambda": fit["lambda"], "temperature": fit["temperature"]}
        if "full" in out:
            gap = out["window"]["ppl"] - out["full"]["ppl"]
            out["recovered"] = {r: (out["window"]["ppl"] - out[r]["ppl"]) / gap
                                for r in out if isinstance(out[r], dict) and "ppl" in out[r] and r != "window"}
        result["packages"][pkg] = {r: v for r, v in out.items()
                                   if r in rows or r in ("tokens", "recovered", "memory_share_of_forward")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, json_safe(result))
    print_table(result, rows)


def print_table(result: dict, rows: list[str]) -> None:
    """Markdown: perplexity (and share of the window → full gap recovered) per package and row, then cost."""
    pkgs = list(result["packages"])
    print("\n| row | " + " | ".join(pkgs) + " | cost per token |")
    print("|---" * (len(pkgs) + 2) + "|")
    for r in rows:
        cells = []
        for p in pkgs:
            v = result["packages"][p].get(r)
            rec = result["packages"][p].get("recovered", {}).get(r)
            cells.append("" if v is None else f"{v['ppl']:.3f}" + ("" if rec is None or r == "full" else f" ({100 * rec:.0f}%)"))
        costs = [result["packages"][p][r]["cost"] for p in pkgs if r in result["packages"][p]]
        print(f"| {r} | " + " | ".join(cells) + f" | {np.mean(costs):.2f}× |")
    print(json.dumps(result["settings"]))


if __name__ == "__main__":
    main()
