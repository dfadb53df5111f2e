"""What every command module shares: the typer app, the console, one-sentence errors, the options
several commands take (declared once, below), and `configure`, which maps a command's options onto
the fields of its stage's frozen config dataclass (after its --config YAML, if given).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import click
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
        "0.5,0.75,1,1.25; ep 1).",
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

# Options that are not fields of any stage config: handled by `user_errors` or the command itself.
_NOT_FIELDS = ("config", "debug", "resume")
# The data options a command maps onto its DataConfig (`--data` is the corpus' source).
_DATA = {
    "data": "source",
    "block_size": "block_size",
    "max_chars": "max_chars",
    "vocab_size": "vocab_size",
    "tokenizer": "tokenizer",
}


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
    name: str | None = None, *, lead: tuple[str, ...] = (), tail: tuple[str, ...] = RUN, on: typer.Typer = app
):
    """Register a command whose function declares only its own options: the shared options named in
    `lead` (placed after MODEL) and `tail` (placed last) join the signature typer reads, so each is
    declared once (`_SHARED`). Their values reach the function through `ctx.params` (which
    `configure` reads), not as arguments; errors are one sentence (`user_errors`). `on`: the typer app."""
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
        params = [p.replace(kind=kw) for p in (*params[:at], *shared(lead), *params[at:], *shared(tail))]

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


def configure(
    cls,
    params: dict[str, Any],
    *,
    start=None,
    renames: dict[str, str] | None = None,
    prefixes: dict[str, str] | None = None,
    ignore=(),
    data_start=None,
):
    """The stage config of one command: its --config YAML (else `start`, else `cls()`), then the options given.

    params: the command's options by name (`ctx.params`); None means "not given". An option sets the
    field of its name, or the dotted path `renames` gives it ("e2e_cache": "e2e.cache_teacher"), or
    `prefixes` make of it ({"e2e_": "e2e."}: --e2e-steps sets e2e.steps); when the
    config's `data` is a DataConfig, the data options (--data, --block-size, --max-chars,
    --vocab-size, --tokenizer) set its fields, starting from `data_start()` where it is None (the
    model's own text). Comma-separated text fills a tuple field (a bad item is one sentence), paths
    become strings. `ignore` names options the command handles itself. Invalid values become
    one-sentence UserErrors.
    """
    from moe_understudy.config import DataConfig

    top = {f.name for f in dataclasses.fields(cls)}
    corpus = "data" in top and _nested_type(typing.get_type_hints(cls)["data"]) is DataConfig
    config_file = params.get("config")
    if config_file is not None and not Path(config_file).is_file():
        raise UserError(f"--config {config_file} is not a file; pass a YAML file a run wrote.")
    changes: dict[str, Any] = {}
    for name, value in params.items():
        if value is None or name in _NOT_FIELDS or name in ignore:
            continue
        is_data = corpus and name in _DATA and (name == "data" or name not in top)
        path = (renames or {}).get(name) or (f"data.{_DATA[name]}" if is_data else name)
        for prefix, into in (prefixes or {}).items():
            if path == name and name.startswith(prefix):
                path = into + name.removeprefix(prefix)
        node = changes
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        base = cls.from_yaml(config_file) if config_file is not None else (start or cls())
        if data_start is not None and "data" in changes and getattr(base, "data", None) is None:
            base = base.replace(data=data_start())
        return _apply(base, changes)
    except ValueError as err:
        # one sentence: the config's own message, then what to do
        raise UserError(f"{str(err).rstrip('.')}; fix the option (see --help) and rerun.") from err


def _apply(cfg, changes: dict[str, Any]):
    """`cfg` with `changes` ({field: value or {nested field: ...}}) applied in one replace per level."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:  # a command maps an option onto no field: a bug here, not the user's
        raise TypeError(f"{type(cfg).__name__} has no field(s) {unknown}")
    done = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            inner = getattr(cfg, name)
            if inner is None:  # e.g. EvalConfig.data: None is the model's own text, given options start anew
                inner = _nested_type(hints[name])()
            done[name] = _apply(inner, value)
        else:
            done[name] = _coerce_option(name, hints[name], value)
    return cfg.replace(**done)


def _nested_type(hint):
    """`X` of `X | None` (a hint that is no union stays as it is)."""
    import types

    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def _coerce_option(name: str, hint, value):
    """An option's value as the field wants it: tuples from comma-separated text or lists, str from paths."""
    target = _nested_type(hint)
    if typing.get_origin(target) is tuple:
        kind = typing.get_args(target)[0]
        if isinstance(value, str):
            return split(value, kind, f"--{name.replace('_', '-')}")
        return tuple(value)
    if isinstance(value, Path):
        return str(value)
    return value


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
