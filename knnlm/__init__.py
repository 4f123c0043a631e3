"""knnlm: a nearest-neighbour memory (kNN-LM) for any frozen Hugging Face causal LM."""

__version__ = "0.1.0"
