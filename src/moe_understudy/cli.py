"""`understudy ...`: the command line. This module only parses options and calls a workflow.

Each command maps its options onto the fields of its stage's frozen config dataclass and hands the
config to one workflow function; errors meant for users are `UserError`s printed as one sentence.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

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
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}")
            sys.exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; saved checkpoints are kept, rerun with --resume to continue.[/]")
            sys.exit(130)

    return wrapper


# ---- section: foundation (teacher, inspect) ----------------------------------------------------
# ---- end section: foundation -------------------------------------------------------------------

# ---- section: understudies (capture, distill) --------------------------------------------------
# ---- end section: understudies -----------------------------------------------------------------

# ---- section: runtime (evaluate, demo) ---------------------------------------------------------
# ---- end section: runtime ----------------------------------------------------------------------

# ---- section: parallel (simulate, ep) ----------------------------------------------------------
# ---- end section: parallel ---------------------------------------------------------------------

# ---- section: kd (sft, kd, rouge) --------------------------------------------------------------
# ---- end section: kd ---------------------------------------------------------------------------


if __name__ == "__main__":
    app()
