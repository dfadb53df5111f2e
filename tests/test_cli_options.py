"""The options every command shares: --data (the user's text everywhere, a notice when a command falls
back to the default corpus), --dtype / --device, and --config replays from the YAML a run wrote."""

from __future__ import annotations

import json
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
import typer
import yaml
from typer.testing import CliRunner

from moe_understudy.cli import app
from moe_understudy.cli.common import RUN, command
from moe_understudy.config import DataConfig, EPConfig
from moe_understudy.data.tokenizer import train_bpe
from moe_understudy.moe.presets import build_model, tiny_config

torch.set_num_threads(1)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory):
    """A model folder as a hub checkpoint would be: weights and tokenizer, no teacher.yaml, no blocks.pt."""
    root = tmp_path_factory.mktemp("hub_like")
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "value", "list", "for", "in", "if", "else"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500))
    (root / "mine.txt").write_text(text)
    tokenizer = train_bpe([text], vocab_size=300)
    build_model(tiny_config("mixtral", vocab_size=len(tokenizer)), seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def test_evaluate_runs_on_the_users_data_in_bf16_and_replays_from_its_yaml(hub_like, tmp_path):
    args = ["--data", hub_like / "mine.txt", "--block-size", "32", "--blocks", "8", "--batch-size", "4"]
    args += ["--policies", "full,drop", "--capacity", "0.5", "--dtype", "bf16"]
    first = run("evaluate", hub_like / "model", *args, "--out", tmp_path / "one")
    assert first.exit_code == 0, first.output
    assert "default corpus" not in said(first)  # the user's text, no fallback notice
    saved = yaml.safe_load((tmp_path / "one" / "eval.yaml").read_text())
    assert saved["data"]["source"] == str(hub_like / "mine.txt") and saved["dtype"] == "bfloat16"
    assert saved["capacities"] == [0.5] and saved["max_blocks"] == 8
    again = run("evaluate", "--config", tmp_path / "one" / "eval.yaml", "--out", tmp_path / "two")
    assert again.exit_code == 0, again.output
    rows = [json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("one", "two")]
    assert [r["perplexity"] for r in rows[0]] == [r["perplexity"] for r in rows[1]]


def test_a_model_without_its_own_text_falls_back_with_a_notice():
    from moe_understudy.data.heldout import data_for

    notes: list[str] = []
    chosen = data_for("org/some-hub-moe", None, notice=notes.append)
    assert chosen == DataConfig() and len(notes) == 1
    assert "has no teacher.yaml or cached blocks, so the default corpus ('stdlib') is used" in notes[0]
    assert "--data" in notes[0]
    given = DataConfig(source="mine.txt")
    assert data_for("org/some-hub-moe", given, notice=notes.append) is given and len(notes) == 1


def test_capture_dtype_sets_the_model_and_store_dtype_unless_store_dtype_says_otherwise(hub_like, tmp_path):
    data = ["--data", hub_like / "mine.txt", "--block-size", "32", "--tokens", "256", "--val-tokens", "64"]
    bf16 = run("capture", hub_like / "model", "--out", tmp_path / "a", "--dtype", "bfloat16", *data)
    assert bf16.exit_code == 0, bf16.output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["dtype"] == "bfloat16"
    saved = yaml.safe_load((tmp_path / "a" / "capture.yaml").read_text())
    assert saved["model_dtype"] == "bfloat16" and saved["dtype"] == "bfloat16"
    mixed = run(
        "capture",
        hub_like / "model",
        "--out",
        tmp_path / "b",
        "--dtype",
        "bf16",
        "--store-dtype",
        "float32",
        *data,
    )
    assert mixed.exit_code == 0, mixed.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"] == "float32"
    replay = run("capture", "--config", tmp_path / "b" / "capture.yaml", "--out", tmp_path / "c")
    assert replay.exit_code == 0, replay.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["tokens"] == {"train": 256, "val": 64}


def test_inspect_and_replace_eval_write_the_yaml_that_replays_them(hub_like, tmp_path):
    import moe_understudy as mu
    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.modules import build_understudy

    data = ["--data", hub_like / "mine.txt", "--block-size", "32", "--blocks", "4"]
    result = run(
        "inspect", hub_like / "model", *data, "--json", tmp_path / "load.json", "--dtype", "bfloat16"
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "inspect.yaml").read_text())
    assert (
        saved["dtype"] == "bfloat16"
        and saved["blocks"] == 4
        and saved["json_out"] == str(tmp_path / "load.json")
    )
    again = run("inspect", "--config", tmp_path / "inspect.yaml")
    assert again.exit_code == 0, again.output

    model, _ = load_model_and_tokenizer(hub_like / "model")
    mu.save_understudies(
        tmp_path / "us", {m.index: build_understudy("dense", m) for m in find_moe_layers(model)}, model
    )
    result = run(
        "replace-eval",
        hub_like / "model",
        "--understudies",
        tmp_path / "us",
        *data,
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "replace_eval.yaml").read_text())["understudies"] == str(
        tmp_path / "us"
    )


def test_simulate_captures_its_trace_on_the_users_data(hub_like, tmp_path):
    args = [
        "--model",
        hub_like / "model",
        "--data",
        hub_like / "mine.txt",
        "--block-size",
        "32",
        "--ranks",
        "8",
    ]
    args += ["--steps", "1", "--tokens-per-rank", "32", "--policies", "full,drop", "--out", tmp_path]
    result = run("simulate", *args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "sim.yaml").read_text())
    assert saved["data"]["source"] == str(hub_like / "mine.txt") and saved["data"]["block_size"] == 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_rank(rank, world, port, cfg):
    from moe_understudy.runtime.ep import run_ep_evaluation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    run_ep_evaluation(cfg)


@pytest.mark.dist
def test_ep_replicate_placement_calibrates_on_the_users_data_without_cached_blocks(hub_like, tmp_path):
    assert not (hub_like / "model" / "blocks.pt").exists()
    cfg = EPConfig(
        model=str(hub_like / "model"),
        data=DataConfig(source=str(hub_like / "mine.txt"), block_size=32),
        placement="replicate",
        extra_slots=1,
        policies=("full",),
        max_blocks=4,
        blocks_per_rank=2,
        out=str(tmp_path),
    )
    mp.start_processes(_ep_rank, args=(2, _free_port(), cfg), nprocs=2, start_method="fork")
    payload = json.loads((tmp_path / "ep.json").read_text())
    assert payload["runs"][0]["slots_per_rank"] == 3  # ceil(4 experts / 2 ranks) + 1 extra: replicated
    assert payload["runs"][0]["perplexity"] > 0
    assert EPConfig.from_yaml(tmp_path / "ep.yaml").data.source == str(hub_like / "mine.txt")


RUNS_A_MODEL = ("inspect", "capture", "distill", "replace-eval", "evaluate", "simulate", "ep", "rouge")
TRAINS_A_MODEL = ("teacher", "sft", "kd", "demo")  # fp32 weights, forwards under autocast to --dtype


@pytest.mark.parametrize("command", [*TRAINS_A_MODEL, *RUNS_A_MODEL])
def test_every_command_takes_config_and_debug_and_the_model_runners_dtype_and_device(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert {"--config", "--debug", "--dtype", "--device"} <= set(result.output.replace("│", " ").split()), (
        command
    )


@pytest.mark.parametrize(
    "args",
    [
        ["teacher", "--quick"],
        ["sft", "--data", "rows.jsonl"],
        ["kd", "--data", "rows.jsonl", "--teacher", "t"],
        ["demo", "--quick"],
    ],
    ids=lambda args: args[0],
)
def test_the_training_commands_refuse_an_unknown_device_in_one_sentence_before_writing(tmp_path, args):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "tpu9"])
    assert result.exit_code == 2, result.output
    assert said(result) == "error: Unknown device 'tpu9'; use cpu, cuda, cuda:N or auto."
    assert not out.exists()


def test_command_adds_shared_options_after_model_and_last_and_passes_only_the_functions_own():
    demo_app, seen = typer.Typer(), {}

    @command(lead=("priority",), tail=RUN, on=demo_app)
    def probe(ctx: typer.Context, model: str | None = None, steps: int = 1) -> None:
        seen.update(own={"model": model, "steps": steps}, params=dict(ctx.params))

    @command(on=demo_app)
    def other(ctx: typer.Context) -> None:  # a second command, so typer keeps the subcommand name
        pass

    result = CliRunner().invoke(
        demo_app, ["probe", "--model", "m", "--priority", "score", "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    assert seen["own"] == {"model": "m", "steps": 1}  # shared options reach ctx.params, not the arguments
    assert seen["params"]["priority"] == "score" and seen["params"]["dtype"] == "bfloat16"
    assert seen["params"]["debug"] is False and seen["params"]["config"] is None
    help_text = (
        CliRunner().invoke(demo_app, ["probe", "--help"], env={"COLUMNS": "200", "TERM": "dumb"}).output
    )
    order = [help_text.index(f"--{name}") for name in ("model", "priority", "steps", "device", "debug")]
    assert order == sorted(order)
