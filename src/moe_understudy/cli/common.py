"""What every command module shares: the typer app, the console, one-sentence errors, the options
several commands take (declared once, below), and `command`, which registers a command with them.
Options that are fields of a stage config are declared in fields.py.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from moe_understudy.cli.fields import Stage
from moe_understudy.errors import UserError

app = typer.Typer(
    name="understudy",
    help="Distil compact understudies for MoE layers, serve overflow tokens with them, and distil whole MoEs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

# ---- options several commands take: one declaration, one help text ----------------------------
ModelArgument = Annotated[
    str | None,
    typer.Argument(
        help="MoE model: a folder from `understudy teacher`, any saved transformers MoE checkpoint, or a hub id "
        "(or set in --config).",
        show_default=False,
    ),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        help="Your text: a .txt file, a folder of text files, a .jsonl (a 'text' field, or prompt/response "
        "pairs) or a `datasets` name[:config]. Default: the model's own (its cached blocks or teacher corpus; "
        "else the stdlib corpus, with a notice)."
    ),
]
BlockSizeOption = Annotated[
    int | None, typer.Option(help="Tokens per block (default: the teacher's, else 128).")
]
MaxCharsOption = Annotated[int | None, typer.Option(help="Cap on corpus characters read.")]
UnderstudiesOption = Annotated[
    str | None,
    typer.Option(
        help="Stand-ins: a folder from `understudy distill` (or a hub id); needed by understudy, layer, "
        "deadline, shadow and expanded_shadow."
    ),
]
PoliciesOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated overflow policies from full, drop, drop_renorm, reroute, expanded_drop, "
        "understudy, shadow, expanded_shadow, layer, deadline (default: evaluate full,drop,expanded_drop,reroute "
        "and, with --understudies, shadow or understudy by their level; ep full)."
    ),
]
CapacitiesOption = Annotated[
    str | None,
    typer.Option(
        "--capacities",
        "--capacity",
        help="Comma-separated capacity factors cf (every policy but full): capacity = ceil(cf * tokens * k / "
        "experts) per layer and step; under ep over the GLOBAL batch of all ranks (default: evaluate "
        "1,1.25,1.5,2; ep 1).",
    ),
]
PriorityOption = Annotated[
    str | None,
    typer.Option(
        help="Which assignments overflow first: score (lowest router weight, Capacity-Aware Inference's token "
        "drop; the default of evaluate, ep, simulate and serve-eval) or position (arrival order, first choices first)."
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(help="Where the model runs: cpu (default), cuda, cuda:N, or auto (cuda when present)."),
]
DtypeOption = Annotated[
    str | None,
    typer.Option(help="The model's dtype: float32 (default), bfloat16 or float16; stand-ins follow it."),
]
TrainDtypeOption = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="The dtype training computes in, under autocast: float32 (default), bfloat16 or float16 (with loss "
        "scaling); the weights stay fp32 and are saved so.",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        help="Replay a run: read the options from the YAML it wrote (flags given here override them)."
    ),
]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="On an error, show the full traceback instead of one sentence.")
]
SeedOption = Annotated[int | None, typer.Option(help="Random seed (default 0).")]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")]

# The shared options a command takes by name through `command(lead=..., tail=...)`:
# name -> (parameter, annotation, default). "train_dtype" is --dtype with the training commands' help.
_SHARED = {
    "understudies": ("understudies", UnderstudiesOption, None),
    "policies": ("policies", PoliciesOption, None),
    "capacities": ("capacities", CapacitiesOption, None),
    "priority": ("priority", PriorityOption, None),
    "data": ("data", DataOption, None),
    "block_size": ("block_size", BlockSizeOption, None),
    "max_chars": ("max_chars", MaxCharsOption, None),
    "json": ("json_out", JsonOption, None),
    "seed": ("seed", SeedOption, None),
    "device": ("device", DeviceOption, None),
    "dtype": ("dtype", DtypeOption, None),
    "train_dtype": ("dtype", TrainDtypeOption, None),
    "resume": ("resume", ResumeOption, False),
    "config": ("config", ConfigOption, None),
    "debug": ("debug", DebugOption, False),
}
LOAD = ("understudies", "policies", "capacities", "priority")  # what serves the overflow, at which cf
TEXT = ("data", "block_size")
RUN = ("device", "dtype", "config", "debug")  # how a saved model runs, replay, tracebacks
TRAIN = ("seed", "device", "train_dtype", "resume", "config", "debug")


def user_errors(fn):
    """Run a command: a UserError becomes one red sentence (exit 2), any other error one sentence too (exit 1)
    that names its type and suggests --debug; with --debug every error shows its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own rich progress bars say what is happening
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted; saved checkpoints are kept, rerun with --resume to continue.[/]"
            )
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer.Exit and click's own usage errors: click reports them itself
        except Exception as err:
            if kwargs.get("debug"):
                raise
            if isinstance(err, UserError):
                console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
                sys.exit(2)
            console.print(f"[bold red]error:[/] {one_sentence(err)}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


def command(
    name: str | None = None,
    *,
    lead: tuple[str, ...] = (),
    tail: tuple[str, ...] = RUN,
    stage: Stage | None = None,
    on: typer.Typer = app,
):
    """Register a command whose function declares only the options its body uses: the shared options
    named in `lead` (placed after MODEL) and `tail` (placed last), and the options of `stage` (its
    config's fields, after the function's own) join the signature typer reads, so each is declared
    once. Their values reach the function through `ctx.params` (which `Stage.configure` reads), not
    as arguments; errors are one sentence (`user_errors`). `on`: the typer app."""
    import inspect

    def register(fn):
        own = inspect.signature(fn, eval_str=True)
        params = list(own.parameters.values())

        kw = inspect.Parameter.KEYWORD_ONLY

        def shared(names):
            return [
                inspect.Parameter(_SHARED[n][0], kw, annotation=_SHARED[n][1], default=_SHARED[n][2])
                for n in names
            ]

        names = list(own.parameters)
        at = names.index("model") + 1 if "model" in names else 1  # after MODEL, else after ctx
        fields = stage.parameters() if stage is not None else []
        params = [
            p.replace(kind=kw) for p in (*params[:at], *shared(lead), *params[at:], *fields, *shared(tail))
        ]

        @functools.wraps(fn)
        def call(**kwargs):
            return fn(**{k: v for k, v in kwargs.items() if k in own.parameters})

        wrapped = user_errors(call)
        wrapped.__signature__ = own.replace(parameters=params)
        return on.command(name)(wrapped)

    return register


def one_sentence(err: BaseException) -> str:
    """An unexpected error as one sentence: what happened and what to do next."""
    import errno

    first = (str(err).strip().splitlines() or [""])[0][:240]
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full ({err.filename or first}); free some space and rerun."
    if isinstance(err, FileNotFoundError):
        return f"{err.filename or first} does not exist; check the path and rerun."
    if isinstance(err, PermissionError):
        return f"No permission to use {err.filename or first}; choose another path and rerun."
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
        return f"Out of memory ({first}); lower --batch-size (or use --dtype bfloat16) and rerun."
    return f"{type(err).__name__}: {first} (rerun with --debug to see the traceback)."


def model_data(model: str | None, notice: bool = False):
    """The DataConfig a command starts from: the model's own (teacher.yaml next to it), else the default
    corpus; with `notice` (no --data given) that fallback is printed, since results on text unlike the
    model's own mean little."""
    from moe_understudy.config import DataConfig
    from moe_understudy.data.heldout import data_for, own_data_config

    if model is None or not notice:
        return (own_data_config(model) if model else None) or DataConfig()
    return data_for(model, None, notice=lambda message: console.print(f"[yellow]note:[/] {message}"))


def write_replay(cfg, path: str | Path) -> Path:
    """Write the YAML that replays this run (`--config PATH`) and say where it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(path)
    console.print(f"replay with --config {path}", highlight=False)
    return path
