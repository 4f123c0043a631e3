"""The knnlm command line (installed as the package knnlm.cli)."""
