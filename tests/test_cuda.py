"""The pipeline with the LM on a GPU agrees with the CPU: keys, eval, RetoMaton, decoding (skipped without CUDA).

CI has no GPU; a GPU machine runs these beside the rest of the suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import build_corpus_store
from knnlm.datastore import open_datastore
from knnlm.evaluate import EvalConfig, run_eval
from knnlm.generate import generate
from knnlm.index import IndexConfig, train_index
from knnlm.lm import load_lm
from knnlm.retrieval import RetrievalConfig, Retriever

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_lm(tiny_model_dir):
    """The tiny model on the GPU, full float32 matrix products (no TF32), so that it can match the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield load_lm(str(tiny_model_dir), device="cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def stores(tmp_path_factory, corpus_texts, tiny_model_dir, tiny_lm, cuda_lm):
    """The same corpus built on the CPU and on the GPU, each with an exact index."""
    out = {}
    for name, lm in (("host", tiny_lm), ("gpu", cuda_lm)):
        root = tmp_path_factory.mktemp(name)
        ds = build_corpus_store(root, corpus_texts, tiny_model_dir, lm)
        train_index(ds, IndexConfig(factory="Flat"))
        out[name] = open_datastore(ds.path)
    return out


def test_keys_built_on_the_gpu_equal_the_cpus(stores):
    cpu, gpu = stores["host"], stores["gpu"]
    assert np.array_equal(np.asarray(cpu.vals), np.asarray(gpu.vals))
    a, b = np.asarray(cpu.keys, np.float32), np.asarray(gpu.keys, np.float32)
    assert a.shape == b.shape
    # fp16 keys of float32 states. The GPU's float32 sums differ from the CPU's in their last digits, about 1e-5
    # of a key's scale (as float32 against float64 does on the CPU), which rounds an element one fp16 step apart,
    # or several where the element is near zero and its steps are tiny (an H200 failed two steps alone): two steps
    # or 1e-4 of the key's root mean square, element by element. A key of another position misses by far more.
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    tol = 2 * step + 1e-4 * np.sqrt(np.mean(a * a, axis=1, keepdims=True))
    err = np.abs(a - b)
    assert np.all(err <= tol), f"{np.sum(err > tol)} of {err.size} key elements differ, by up to {err.max():.3g}"


@pytest.mark.parametrize("search", [{}, {"search_device": "cuda"}, {"retomaton": True, "min_knns": 8}],
                         ids=["faiss", "torch-cuda", "retomaton"])  # settings, not configs: these check CUDA when made
def test_eval_on_the_gpu_equals_the_cpu(stores, tiny_lm, cuda_lm, search):
    """Same datastore, LM on either device: the same perplexities to 1e-5, the same searches saved."""
    ds = stores["host"]
    retrieval = RetrievalConfig(**search)
    reference = retrieval if retrieval.search_device is None else RetrievalConfig(exact=True)
    cpu, _ = run_eval(ds, None, EvalConfig(lam="0.3", retrieval=reference), lm=tiny_lm)
    gpu, _ = run_eval(ds, None, EvalConfig(lam="0.3", retrieval=retrieval), lm=cuda_lm)
    for key in ("lm_ppl", "knn_lm_ppl"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-5)
    assert gpu["tokens"] == cpu["tokens"]
    if retrieval.retomaton:
        assert gpu["searches_saved"] == pytest.approx(cpu["searches_saved"], abs=0.02)
        assert gpu["searches_saved"] > 0


def test_decoding_on_the_gpu_equals_the_cpu(stores, tiny_lm, cuda_lm, corpus_texts):
    prompt = corpus_texts["textwrap.py"][:300]
    ds = stores["host"]
    for lm_args in ({}, {"lam": 0.5}):
        a = generate(tiny_lm, prompt, Retriever(ds) if lm_args else None, max_new_tokens=24, **lm_args)
        b = generate(cuda_lm, prompt, Retriever(ds) if lm_args else None, max_new_tokens=24, **lm_args)
        assert a.tokens == b.tokens
