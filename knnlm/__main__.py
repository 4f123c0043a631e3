"""`python -m knnlm`: the command line."""

from knnlm.cli.main import cli

if __name__ == "__main__":
    cli()
