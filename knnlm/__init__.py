"""knnlm: a nearest-neighbour memory (kNN-LM) for any frozen Hugging Face causal LM.

    from knnlm import KNNLM, build_datastore, BuildConfig
"""

from importlib import import_module

__version__ = "0.1.0"

# Public names and their modules ("module:attr" where the name differs; `tune` and `interpolate`
# are submodules, so their functions cannot share those names); imported on first use.
_EXPORTS = {
    "KNNLMError": "errors",
    "LM": "lm", "load_lm": "lm",
    "BuildConfig": "build", "build_datastore": "build",
    "Datastore": "datastore", "open_datastore": "datastore",
    "IndexConfig": "index", "train_index": "index",
    "AddConfig": "update", "add_documents": "update", "remove_documents": "update", "compact": "update",
    "RetrievalConfig": "retrieval", "Retriever": "retrieval",
    "EvalConfig": "evaluate", "run_eval": "evaluate", "score_documents": "evaluate",
    "Scores": "scores", "load_scores": "scores", "save_scores": "scores",
    "TuneConfig": "tune", "tune_lambda": "tune:tune",
    "save_lambda": "combine", "load_lambda": "combine", "resolve_combiner": "combine", "Combiner": "combine",
    "knn_log_prob": "interpolate", "perplexity": "interpolate",
    "KNNLM": "api",
    "KNNLogitsProcessor": "generate",
    "MemoryConfig": "memory.document", "AttentionMemoryConfig": "memory.attention",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        value = getattr(import_module(f".{module}", __name__), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")
