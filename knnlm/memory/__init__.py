"""Memories of the text being read: the document's own past (document.py) and kNN-augmented attention (attention.py)."""
