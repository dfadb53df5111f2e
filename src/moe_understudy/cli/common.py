"""What every command module shares: the typer app, the console, one-sentence errors, option parsing."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from moe_understudy.errors import UserError

app = typer.Typer(
    name="understudy",
    help="Distil compact understudies for MoE layers, serve overflow tokens with them, and distil whole MoEs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def user_errors(fn):
    """Print a UserError as one red sentence and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own rich progress bars say what is happening
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}")
            sys.exit(2)
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted; saved checkpoints are kept, rerun with --resume to continue.[/]"
            )
            sys.exit(130)

    return wrapper


def given(**options):
    """The options the user actually passed (None means: keep the config's value)."""
    return {k: v for k, v in options.items() if v is not None}


def split(text: str | None, kind=str, what: str = "list") -> tuple | None:
    """'0.5,0.75,1' -> (0.5, 0.75, 1.0); None stays None; a bad item is a UserError naming it."""
    if text is None:
        return None
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise UserError(
            f"Could not read {what} {text!r} ({err}); pass comma-separated values like 0.5,1."
        ) from err
