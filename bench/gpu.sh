#!/usr/bin/env bash
# Issue 10's figures with the LM on a CUDA device and faiss on the CPU, and exact search in torch on the GPU
# (the "torch" variant), in one run on a GPU machine:
#
#     bash bench/gpu.sh [OUT]        (from the repository root)
#
# It builds the real datastore bench/eval.py --real times (SmolLM2's keys over this environment's site-packages,
# 1M keys; $KNNLM_GPU_DATASTORE, $KNNLM_GPU_KEYS set another path and size), its mixing tuned while a fast-scan
# sibling is indexed, then times eval and greedy decoding as bench/eval.py and bench/generate.py do, each against the
# LM alone on the same device. Every step's log (its JSON at the end) goes to OUT [bench/results/gpu]; a step that
# fails is logged and the next one runs. $KNNLM_BENCH_DEVICE [cuda] is the LM's device, $KNNLM_BENCH_MODEL the
# model [smollm2-135m], $PYTHON [python3] the interpreter. About 12 minutes on one H200 with 16 CPU cores
# (estimated from its steps' times).
set -u
out=${1:-bench/results/gpu}
ds=${KNNLM_GPU_DATASTORE:-bench/results/real-1m}
keys=${KNNLM_GPU_KEYS:-1000000}
fs=IVF2048,PQ64x4fs
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 KNNLM_BENCH_DEVICE=${KNNLM_BENCH_DEVICE:-cuda}
mkdir -p "$out"

step() {  # step NAME COMMAND...: run it, its output in OUT/NAME.log, its time and exit status on stdout
  local name=$1 t=$SECONDS rc
  shift
  echo "== $(date +%T) $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: rc $rc in $((SECONDS - t)) s"
  tail -n 3 "$out/$name.log"
}

real() { echo "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import eval as e; $1"; }

"$py" -c "import os, faiss, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, 'faiss', faiss.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
      'cpus', os.cpu_count(), 'faiss threads', faiss.omp_get_max_threads())"
step build "$py" -c "$(real "e.prepare_real(Path('$ds'), $keys, tune=False)")"
# The tuning (LM on the GPU) and the fast-scan index (faiss on the CPU) are not timed: they run side by side.
step tune "$py" -c "$(real "e.prepare_real(Path('$ds'), $keys)")" &
step index "$py" -c "$(real "e.with_factory(Path('$ds'), '$fs')")"
wait
sibling="$ds-${fs//,/-}"
for f in lambda.json mixing.safetensors; do  # with_factory copies the tuning only where it was already there
  [ -e "$ds/$f" ] && [ ! -e "$sibling/$f" ] && cp "$ds/$f" "$sibling/$f"
done

step eval-default "$py" bench/eval.py --datastore "$ds" --real --real-keys "$keys" --rounds 2 \
  --variants knn,skip,retomaton,k-128,torch
step eval-fast-scan "$py" bench/eval.py --datastore "$sibling" --real --real-keys "$keys" --rounds 2 --lambda tuned \
  --variants knn,rerank-128,k-128+rerank-128
step generate-default "$py" bench/generate.py --datastore "$ds" --variants knn,k-128,torch --rounds 3
step generate-fast-scan "$py" bench/generate.py --datastore "$sibling" --variants rerank-128,k-128+rerank-128 --rounds 3
echo "== $(date +%T) done in $SECONDS s"
