"""Options and helpers shared by several commands."""

from __future__ import annotations

import json

import click
from tqdm import tqdm

from knnlm.arrays import json_safe
from knnlm.datastore import DATASTORE_ENV, DEFAULT_DATASTORE
from knnlm.lm import DEFAULT_MODEL

datastore_option = click.option(
    "--datastore", "-d", envvar=DATASTORE_ENV, default=DEFAULT_DATASTORE, show_envvar=True,
    type=click.Path(file_okay=False), help="Datastore directory.")
model_option = click.option(
    "--model", "-m", default=None,
    help=f"Hub id, local directory or .gguf file [default: the datastore's model, else {DEFAULT_MODEL}].")
device_option = click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
trust_option = click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own code.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def typed(*names: str) -> list[str]:
    """The options among the parameters `names` that were typed on the command line (as their first spelling)."""
    ctx = click.get_current_context()
    return [p.opts[0] for p in ctx.command.params if p.name in names
            and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]


def refuse_stray(on: bool, needs: str, *names: str, fix: str | None = None) -> None:
    """One sentence, not silence, for options typed on the command line that only apply with `needs` (off).

    fix: the sentence's remedy where "add it or leave them out" would not do (`needs` cannot simply be added);
    "{it}" in it becomes "it" or "them".
    """
    stray = [] if on else typed(*names)
    if stray:
        one = len(stray) == 1
        fix = (fix or "add it or leave {it} out").format(it="it" if one else "them")
        raise click.UsageError(f"{', '.join(stray)} only appl{'ies' if one else 'y'} with {needs}; {fix}.")


def progress_bar(total: int | None, desc: str, unit: str = "tok", lazy: bool = False) -> tqdm:
    """A tqdm bar on stderr showing rate per second; lazy: shown from its first update on (a command refused by
    its own checks prints only its sentence)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                delay=1e-3 if lazy else 0)


def print_json(obj) -> None:
    """Strict JSON on stdout: NaN and infinities are printed as null (see json_safe)."""
    click.echo(json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False))


def print_table(rows: list[tuple[str, object]]) -> None:
    """Two aligned columns."""
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
