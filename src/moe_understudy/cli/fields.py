"""A command's options that are fields of its stage's frozen config dataclass.

`Stage` declares them once, as {option: help}: the option's type comes from its field, and its
help ends with the field's default, so `--help` cannot drift from the config. `Stage.configure`
maps the options a user gave onto those fields, after the run's --config YAML.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from moe_understudy.config import DataConfig
from moe_understudy.errors import UserError

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


@dataclass(frozen=True)
class Stage:
    """The options of one command that set fields of its stage config `cls`.

    helps: option name -> help, in --help order. The option sets the field of its name, or the dotted
    path `renames` gives it, or the one `prefixes` make of it ({"e2e_": "e2e."}: --e2e-steps sets
    e2e.steps); data options (--data, --block-size, ...) set the fields of the config's DataConfig.
    A help that names no default gets the field's, e.g. "(default 1500)". flags: click declarations
    that replace the plain --name (e.g. "--film/--no-film"; a bool field gets --name/--no-name).
    paths: options that name a file or folder (shown as <path>; the field keeps the text).
    """

    cls: type
    helps: Mapping[str, str] = field(default_factory=dict)
    renames: Mapping[str, str] = field(default_factory=dict)
    prefixes: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()

    def configure(self, params: dict[str, Any], *, start=None, ignore=(), data_start=None):
        """The stage config of one command: its --config YAML (else `start`, else `cls()`), then the options given.

        params: the command's options by name (`ctx.params`); None means "not given". Each option sets
        the field `field_path` names; when the config's `data` is None, the data options start from
        `data_start()` (the model's own text). Comma-separated text fills a tuple field (a bad item is
        one sentence), paths become strings. `ignore` names options the command handles itself.
        Invalid values become one-sentence UserErrors.
        """
        config_file = params.get("config")
        if config_file is not None and not Path(config_file).is_file():
            raise UserError(f"--config {config_file} is not a file; pass a YAML file a run wrote.")
        changes: dict[str, Any] = {}
        for name, value in params.items():
            if value is None or name in _NOT_FIELDS or name in ignore:
                continue
            node = changes
            *parents, last = field_path(self.cls, name, self.renames, self.prefixes).split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        try:
            base = self.cls.from_yaml(config_file) if config_file is not None else (start or self.cls())
            if data_start is not None and "data" in changes and getattr(base, "data", None) is None:
                base = base.replace(data=data_start())
            return _apply(base, changes)
        except ValueError as err:
            # one sentence: the config's own message, then what to do
            raise UserError(f"{str(err).rstrip('.')}; fix the option (see --help) and rerun.") from err

    def parameters(self) -> list[inspect.Parameter]:
        """One keyword parameter per option, typed and helped as its field says, defaulting to None
        (not given: the config's value stands)."""
        return [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=self._annotation(name, help_text),
                default=None,
            )
            for name, help_text in self.helps.items()
        ]

    def _annotation(self, name: str, help_text: str):
        path = field_path(self.cls, name, self.renames, self.prefixes)
        hint, default = _field_at(self.cls, path)
        kind = _nested_type(hint)
        decls = [self.flags[name]] if name in self.flags else []
        if kind is bool and not decls:
            decls = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
        if typing.get_origin(kind) is tuple:
            kind = str  # comma-separated on the command line
        if name in self.paths:
            kind = Path
        if "default" not in help_text.lower() and default not in (None, "", ()):
            help_text = f"{help_text.rstrip('.')} (default {_shown(default)})."
        return Annotated[kind | None, typer.Option(*decls, help=help_text)]


def field_path(cls, name: str, renames=None, prefixes=None) -> str:
    """The dotted field of `cls` that option `name` sets (see `Stage`)."""
    top = {f.name for f in dataclasses.fields(cls)}
    corpus = "data" in top and _nested_type(typing.get_type_hints(cls)["data"]) is DataConfig
    is_data = corpus and name in _DATA and (name == "data" or name not in top)
    path = (renames or {}).get(name) or (f"data.{_DATA[name]}" if is_data else name)
    for prefix, into in (prefixes or {}).items():
        if path == name and name.startswith(prefix):
            path = into + name.removeprefix(prefix)
    return path


def _field_at(cls, path: str) -> tuple[Any, Any]:
    """(type hint, default) of the dotted field `path` of config class `cls`, read from the class
    (some configs cannot be built without arguments); a nested config that defaults to None gives
    its own class' defaults."""
    *parents, last = path.split(".")
    for part in parents:
        cls = _nested_type(typing.get_type_hints(cls)[part])
    hints = typing.get_type_hints(cls)
    if last not in hints:  # a command maps an option onto no field: a bug here, not the user's
        raise TypeError(f"{cls.__name__} has no field {last!r}")
    spec = next(f for f in dataclasses.fields(cls) if f.name == last)
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return hints[last], (None if default is dataclasses.MISSING else default)


def _shown(value) -> str:
    """A default as a user would type it: 1,1.5,2 for a tuple, on/off for a flag, 0.003 for 3e-3, 1.0 for 1."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


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
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


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
