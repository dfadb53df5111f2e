"""A command's config-field options (cli/fields.py): declared as {option: help}, typed and defaulted
from the field, so --help states the config's own default and cannot drift from it."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from moe_understudy.cli import app
from moe_understudy.cli.common import command
from moe_understudy.cli.fields import Stage
from moe_understudy.config import DataConfig, DistillConfig, StageConfig


@dataclasses.dataclass(frozen=True)
class _Inner(StageConfig):
    rate: float = 0.25


@dataclasses.dataclass(frozen=True)
class _Probe(StageConfig):
    steps: int = 7
    name: str | None = None
    cfs: tuple[float, ...] = (1.0, 1.5)
    shuffle: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    inner: _Inner = dataclasses.field(default_factory=_Inner)


PROBE = Stage(
    _Probe,
    {
        "steps": "Steps to take.",
        "name": "A name (default: none).",
        "cfs": "Capacity factors.",
        "shuffle": "Shuffle the blocks.",
        "block_size": "Tokens per block.",
        "inner_rate": "The inner rate.",
    },
    prefixes={"inner_": "inner."},
)


def _probe_app(seen: dict) -> typer.Typer:
    probe_app = typer.Typer()

    @command(stage=PROBE, tail=("config", "debug"), on=probe_app)
    def probe(ctx: typer.Context) -> None:
        seen["cfg"] = PROBE.configure(ctx.params)

    @command(on=probe_app)
    def other(ctx: typer.Context) -> None:  # a second command, so typer keeps the subcommand name
        pass

    return probe_app


def _help(target: typer.Typer, *command_words: str) -> str:
    result = CliRunner().invoke(target, [*command_words, "--help"], env={"COLUMNS": "300", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_each_option_states_its_fields_default_unless_its_help_names_one():
    text = _help(_probe_app({}), "probe")
    assert "Steps to take (default 7)." in text
    assert "Capacity factors (default 1.0,1.5)." in text
    assert "Shuffle the blocks (default on)." in text
    assert "Tokens per block (default 128)." in text  # DataConfig's default, through the data mapping
    assert "The inner rate (default 0.25)." in text  # through the prefix onto the nested config
    assert "A name (default: none)." in text and "(default None)" not in text


def test_options_set_their_fields_with_the_fields_types():
    seen: dict = {}
    result = CliRunner().invoke(
        _probe_app(seen),
        [
            "probe",
            "--steps",
            "3",
            "--cfs",
            "1,2",
            "--no-shuffle",
            "--block-size",
            "64",
            "--inner-rate",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == _Probe(
        steps=3, cfs=(1.0, 2.0), shuffle=False, data=DataConfig(block_size=64), inner=_Inner(rate=0.5)
    )


def test_options_not_given_keep_the_configs_values():
    seen: dict = {}
    assert CliRunner().invoke(_probe_app(seen), ["probe"]).exit_code == 0
    assert seen["cfg"] == _Probe()


def test_a_bad_value_is_one_sentence_naming_the_option():
    result = CliRunner().invoke(_probe_app({}), ["probe", "--cfs", "1,x"])
    assert result.exit_code == 2
    assert "--cfs" in result.output and "comma-separated" in result.output


def test_an_option_that_is_no_field_is_refused_when_the_command_is_declared():
    with pytest.raises(TypeError, match="no field 'stpes'"):
        Stage(_Probe, {"stpes": "Typo."}).parameters()


@pytest.mark.parametrize(
    ("flag", "field"),
    [("--steps", "steps"), ("--lr", "lr"), ("--e2e-steps", "e2e.steps"), ("--e2e-cf-max", "e2e.cf_max")],
)
def test_distill_help_shows_the_distill_configs_defaults(flag, field):
    value = DistillConfig()
    for part in field.split("."):
        value = getattr(value, part)
    text = _help(app, "distill")
    after = text[text.index(f"{flag} ") :]
    assert f"(default {value!r})" in after[: after.index(" --", 2)]


def test_a_path_option_shows_as_a_path_and_reaches_its_field_as_text(tmp_path):
    stage = Stage(_Probe, {"name": "Where to write."}, paths=("name",))
    seen: dict = {}
    path_app = typer.Typer()

    @command(stage=stage, tail=("config", "debug"), on=path_app)
    def probe(ctx: typer.Context) -> None:
        seen["cfg"] = stage.configure(ctx.params)

    @command(on=path_app)
    def other(ctx: typer.Context) -> None:
        pass

    assert "--name <path>" in _help(path_app, "probe")
    assert CliRunner().invoke(path_app, ["probe", "--name", str(tmp_path / "x")]).exit_code == 0
    assert seen["cfg"].name == str(tmp_path / "x")
