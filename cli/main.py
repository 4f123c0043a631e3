"""The `knnlm` command group: logging, user errors, and the subcommands."""

from __future__ import annotations

import logging

import click

from knnlm.errors import USER_ERRNOS, KNNLMError, os_error_fix


class _Group(click.Group):
    """Turns library errors into one-sentence click errors (exit 1), and Ctrl-C into a hint."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KNNLMError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:  # what the checks before the work could not foresee (a folder made read-only, a full disk)
            if e.errno not in USER_ERRNOS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror}; {os_error_fix(e.errno)} (files being written were left "
                                       "as they were).") from e
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="knnlm")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(quiet: bool, verbose: bool) -> None:
    """Give a frozen Hugging Face causal LM a nearest-neighbour memory (kNN-LM)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("knnlm: %(message)s"))
    root = logging.getLogger("knnlm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _register() -> None:
    """Attach every subcommand (one module each)."""
    from . import build, evaluate, generate, info, neighbors, tune, update

    for mod in (build, info, evaluate, tune, generate, neighbors, update):
        for command in mod.COMMANDS:
            cli.add_command(command)


_register()
