"""`understudy capture -> distill -> replace-eval` from the command line on a tiny saved model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from moe_understudy.cli import app
from moe_understudy.data.tokenizer import train_bpe
from moe_understudy.moe.presets import build_model, tiny_config


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Mixtral + BPE tokenizer saved like `understudy teacher` does, and a one-file corpus."""
    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "value", "list", "for", "in", "if", "else", "None"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000))
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    tokenizer = train_bpe([text], vocab_size=300)
    model = build_model(tiny_config("mixtral", vocab_size=len(tokenizer)), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_capture_distill_reload_and_evaluate(saved_model):
    root = saved_model
    model, store, out = root / "model", root / "store", root / "us"
    data = ["--data", root / "corpus.txt", "--block-size", "32"]
    result = run("capture", model, "--out", store, "--tokens", "1024", "--val-tokens", "256", *data)
    assert result.exit_code == 0, result.output
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["tokens"] == {"train": 1024, "val": 256} and manifest["layers"] == [0, 1]

    args = ["distill", model, "--store", store, "--out", out, "--steps", "30", "--eval-every", "10"]
    args += ["--e2e-steps", "4", "--e2e-blocks", "4", "--e2e-batch-size", "2", *data]
    result = run(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["layers"]) == {"0", "1"}
    assert report["layers"]["0"]["cost"] == 0.5
    assert {"ppl_teacher", "ppl_layerwise", "ppl_e2e"} <= set(report)
    assert (out / "layerwise" / "layer1.json").exists()

    again = run(*args)  # same folder without --resume: refused, nothing overwritten
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = run(*args, "--resume")  # every layer and the end-to-end stage are already done
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "report.json").read_text())["ppl_e2e"] == report["ppl_e2e"]

    result = run(
        "replace-eval", model, "--understudies", out, "--blocks", "4", *data, "--json", root / "eval.json"
    )
    assert result.exit_code == 0, result.output
    figures = json.loads((root / "eval.json").read_text())
    assert figures["ppl_teacher"] > 0 and figures["cost"] == {"0": 0.5, "1": 0.5}


def test_distill_refuses_a_store_of_another_model(saved_model, tmp_path):
    root = saved_model
    other = build_model(tiny_config("mixtral", vocab_size=300, num_layers=3), seed=0)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "tokenizer.json").write_text((root / "model" / "tokenizer.json").read_text())
    (tmp_path / "other" / "tokenizer_config.json").write_text(
        (root / "model" / "tokenizer_config.json").read_text()
    )
    data = ["--data", root / "corpus.txt", "--block-size", "32"]
    run(
        "capture", root / "model", "--out", tmp_path / "store", "--tokens", "256", "--val-tokens", "64", *data
    )
    result = run(
        "distill", tmp_path / "other", "--store", tmp_path / "store", "--out", tmp_path / "us", *data
    )
    assert result.exit_code == 2
    assert "holds MoE layers [0, 1] but the model has [0, 1, 2]" in " ".join(result.output.split())


def test_distill_shares_trunk_adapter_ranks_out_by_where_the_store_overflows(saved_model, tmp_path):
    from moe_understudy.capture import CaptureStore
    from moe_understudy.moe.adapters import find_moe_layers
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies
    from moe_understudy.understudy.layerwise import AssignmentObjective

    root = saved_model
    data = ["--data", root / "corpus.txt", "--block-size", "32"]
    store, out = tmp_path / "store", tmp_path / "trunk"
    run("capture", root / "model", "--out", store, "--tokens", "1024", "--val-tokens", "256", *data)
    result = run(
        "distill", root / "model", "--store", store, "--out", out, "--arch", "trunk", "--steps", "10",
        "--adapter-rank", "2", "--adapter-allocation", "overflow", "--focus-cfs", "1", *data,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model, _ = load_model_and_tokenizer(root / "model")
    trunks = load_understudies(out, model)
    for layer in find_moe_layers(model):
        ranks = trunks[layer.index].adapter_ranks
        assert sum(ranks) == 2 * layer.num_experts and max(ranks) <= 4 and min(ranks) < max(ranks)
        rows = CaptureStore(store).load(layer.index)
        freq = AssignmentObjective(layer, extra=0, serving=(1.0,), batch_rows=1024).overflow_frequency(rows)
        mass = torch.bincount(
            rows["indices"].reshape(-1),
            weights=(freq * rows["weights"]).reshape(-1),
            minlength=layer.num_experts,
        )
        assert ranks[int(mass.argmax())] == max(ranks) and ranks[int(mass.argmin())] == min(ranks)


def test_distill_seed_reseeds_the_end_to_end_draws_too(saved_model, tmp_path):
    from moe_understudy.config import DistillConfig

    root = saved_model
    data = ["--data", root / "corpus.txt", "--block-size", "32"]
    store = tmp_path / "store"
    run("capture", root / "model", "--out", store, "--tokens", "256", "--val-tokens", "64", *data)
    args = ["distill", root / "model", "--store", store, "--steps", "2", "--eval-every", "1", *data]
    seeded = run(*args, "--out", tmp_path / "seeded", "--seed", "3")
    default = run(*args, "--out", tmp_path / "default")
    assert seeded.exit_code == 0 and default.exit_code == 0, seeded.output + default.output
    seeded_cfg = DistillConfig.from_yaml(tmp_path / "seeded" / "distill.yaml")
    assert (seeded_cfg.seed, seeded_cfg.e2e.seed) == (3, 3)
    assert DistillConfig.from_yaml(tmp_path / "default" / "distill.yaml").e2e.seed == 0


def test_quantize_stores_a_distilled_trunk_in_int8_beside_the_float_one(saved_model, tmp_path):
    from moe_understudy.config import QuantizeConfig
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    root = saved_model
    data = ["--data", root / "corpus.txt", "--block-size", "32"]
    store, trunk, int8 = tmp_path / "store", tmp_path / "trunk", tmp_path / "trunk-int8"
    run("capture", root / "model", "--out", store, "--tokens", "512", "--val-tokens", "128", *data)
    run("distill", root / "model", "--store", store, "--out", trunk, "--arch", "trunk", "--steps", "5", *data)
    refused = run("quantize", root / "model", "--understudies", trunk, "--out", trunk)
    assert refused.exit_code == 2 and "new folder" in refused.output
    result = run("quantize", root / "model", "--understudies", trunk, "--out", int8)
    assert result.exit_code == 0, result.output
    replay = QuantizeConfig.from_yaml(int8 / "quantize.yaml")  # the run's YAML round-trips its options
    assert (replay.understudies, replay.out) == (str(trunk), str(int8))
    model, _ = load_model_and_tokenizer(root / "model")
    floats, ints = load_understudies(trunk, model), load_understudies(int8, model)
    for i, q in ints.items():
        assert q.gate_up.dtype == torch.int8 and floats[i].gate_up.dtype == torch.float32
        expert = 3 * 32 * 32  # the tiny preset's SwiGLU expert: hidden 32, intermediate 32
        assert q.memory_expert_equiv(expert) < 0.6 * floats[i].memory_expert_equiv(expert)
