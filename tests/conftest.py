"""Fixtures: a tiny seeded Llama with a tokenizer made on the spot, small corpora, isolated dirs."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py", "keyword.py"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory, with its own cache and no network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KNNLM_DATASTORE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    if "KNNLM_CACHE" not in __import__("os").environ:
        monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _train_tokenizer(texts: list[str]):
    """A small byte-level BPE tokenizer trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def corpus_texts() -> dict[str, str]:
    """A few real Python files from the standard library, by name."""
    return {name: (STDLIB / name).read_text() for name in CORPUS_FILES}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_texts) -> Path:
    """A seeded 2-layer Llama (d = 32) and its tokenizer, saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _train_tokenizer(list(corpus_texts.values()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default weights make hidden states differ clearly from token to token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """The tiny model, loaded once."""
    from knnlm.lm import load_lm

    return load_lm(str(tiny_model_dir), device="cpu")


@pytest.fixture
def corpus_dir(tmp_path, corpus_texts) -> Path:
    """A folder of .txt documents."""
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in corpus_texts.items():
        (d / f"{name}.txt").write_text(text)
    return d
