"""--attention-memory and its --memory-* options, shared by eval and generate."""

from __future__ import annotations

import functools

import click

from knnlm.memory.attention import AttentionMemoryConfig, Positions, Retrieval

from .common import refuse_stray

_DEFAULT = AttentionMemoryConfig()


def attention_config(on: bool, layers: str | None, k: int | None, positions: str | None,
                     retrieval: str | None) -> AttentionMemoryConfig | None:
    """The AttentionMemoryConfig of the options, or None when --attention-memory is off."""
    refuse_stray(on, "--attention-memory", "memory_layers", "memory_k", "memory_positions", "memory_retrieval")
    if not on:
        return None
    return AttentionMemoryConfig(layers=_DEFAULT.layers if layers is None else layers,
                                 k=_DEFAULT.k if k is None else k,
                                 positions=positions or _DEFAULT.positions, retrieval=retrieval or _DEFAULT.retrieval)


def attention_options(f):
    """--attention-memory, --memory-layers, --memory-k, --memory-positions, --memory-retrieval, passed to f
    as one `attention` argument (an AttentionMemoryConfig or None)."""

    @functools.wraps(f)
    def command(*args, attention_memory, memory_layers, memory_k, memory_positions, memory_retrieval, **kwargs):
        return f(*args, attention=attention_config(attention_memory, memory_layers, memory_k, memory_positions,
                                                   memory_retrieval), **kwargs)

    options = [
        click.option("--attention-memory", is_flag=True,
                     help="kNN-augmented attention: at --memory-layers each head also attends to the top --memory-k "
                          "keys and values retrieved from the document's past that left the window."),
        click.option("--memory-layers", default=None,
                     help="Layers that retrieve: all, top-half, top-third or '20,24-29' "
                          f"[default: {_DEFAULT.layers}]."),
        click.option("--memory-k", type=int, default=None,
                     help=f"(key, value) pairs retrieved per query [default: {_DEFAULT.k}]."),
        click.option("--memory-positions", type=click.Choice([p.value for p in Positions]), default=None,
                     help="Rotate retrieved keys at their true positions (exact) or a window's length before the "
                          f"query (fixed, InfLLM) [default: {_DEFAULT.positions.value}]."),
        click.option("--memory-retrieval", type=click.Choice([r.value for r in Retrieval]), default=None,
                     help="Top-k per query head, or per KV-head group (GQA) "
                          f"[default: {_DEFAULT.retrieval.value}]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
