"""Quality under load: every system is compared with `full` on the same batches."""

from __future__ import annotations

import json

import pytest
import torch
from load_aware_helpers import CopyOfLayer, tiny_model
from torch import nn
from typer.testing import CliRunner

from moe_understudy.cli import app
from moe_understudy.eval.quality import evaluate_policies, systems
from moe_understudy.moe.adapters import find_moe_layers


def tiny(seed: int = 0):
    return tiny_model(
        seed=seed, vocab_size=300, routed_gain=30.0
    )  # the routed part matters next to the residual


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(5))


def by_system(rows):
    return {(r["policy"], r["capacity_factor"]): r for r in rows}


def test_systems_run_full_once_and_every_other_policy_at_every_factor():
    assert systems(["drop", "full", "understudy"], [0.5, 1]) == [
        ("full", None),
        ("drop", 0.5),
        ("drop", 1.0),
        ("understudy", 0.5),
        ("understudy", 1.0),
    ]


def test_full_is_the_reference_and_dropping_costs_quality(blocks):
    model = tiny()
    rows = by_system(
        evaluate_policies(model, None, blocks, ["drop"], [0.25, 100.0], batch_size=4, progress=False)
    )
    full, low, ample = rows[("full", None)], rows[("drop", 0.25)], rows[("drop", 100.0)]
    assert full["ppl_delta_pct"] == 0 and full["kl"] == pytest.approx(0, abs=1e-7) and full["agreement"] == 1
    assert full["positions"] == 8 * 31
    assert full["ppl_delta_ci95"] == [0.0, 0.0]  # the reference against itself, batch by batch
    low_ci = low["ppl_delta_ci95"]
    assert low_ci[0] <= low["ppl_delta_pct"] <= low_ci[1] and low_ci[0] < low_ci[1]
    assert low["kl"] > 1e-3 and low["frac_dropped"] > 0.3 and low["agreement"] < 1
    assert low["bytes_per_token"] < full["bytes_per_token"]
    assert ample["kl"] == pytest.approx(0, abs=1e-6) and ample["frac_dropped"] == 0
    for r in rows.values():
        total = r["frac_expert"] + r["frac_dropped"] + r["frac_understudy"] + r["frac_shadow"]
        assert total == pytest.approx(1.0)


def test_an_exact_understudy_keeps_full_quality_and_moves_fewer_bytes(blocks):
    model = tiny()
    stand_ins = {m.index: CopyOfLayer(m) for m in find_moe_layers(model)}
    rows = by_system(
        evaluate_policies(
            model, stand_ins, blocks, ["understudy", "drop"], [0.5], batch_size=4, progress=False
        )
    )
    u, full = rows[("understudy", 0.5)], rows[("full", None)]
    assert u["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert u["frac_understudy"] > 0 and u["understudy_cost"] == pytest.approx(1.0)
    assert u["bytes_per_token"] < full["bytes_per_token"]
    assert rows[("drop", 0.5)]["ppl_delta_pct"] != pytest.approx(0.0, abs=1e-3)
    assert not any(
        isinstance(m.parent.mlp, nn.Module) and hasattr(m.parent.mlp, "moe") for m in find_moe_layers(model)
    )


def saved_model(tmp_path, blocks):
    from moe_understudy.data.tokenizer import train_bpe

    folder = tmp_path / "model"
    model = tiny()
    model.save_pretrained(folder)
    train_bpe(["def f(x):\n    return x + 1\n" * 50], vocab_size=300, out_dir=folder)
    torch.save({"train": blocks, "val": blocks}, folder / "blocks.pt")
    return folder


def test_cli_evaluate_writes_table_json_and_plot(tmp_path, blocks):
    folder = saved_model(tmp_path, blocks)
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(folder),
            "--policies",
            "full,drop,reroute",
            "--capacity",
            "0.5,1",
            "--blocks",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "report.json").read_text())
    assert [(r["policy"], r["capacity_factor"]) for r in report["rows"]] == systems(
        ["drop", "reroute"], [0.5, 1.0]
    )
    assert (out / "report.png").stat().st_size > 0 and (out / "eval.yaml").is_file()


def test_cli_evaluate_names_a_bad_policy_and_a_missing_understudy(tmp_path, blocks):
    folder = saved_model(tmp_path, blocks)
    bad = CliRunner().invoke(app, ["evaluate", str(folder), "--policies", "full,teleport"])
    assert bad.exit_code == 2 and "teleport" in bad.output
    missing = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(folder),
            "--policies",
            "understudy",
            "--blocks",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert missing.exit_code == 2 and "--understudies" in missing.output


def test_cli_evaluate_under_expert_parallelism_matches_one_process_full_perplexity(tmp_path, blocks):
    """`evaluate --ep 2` launches torchrun (gloo, loopback) and reports the same `full` perplexity."""
    import json

    folder = saved_model(tmp_path, blocks)
    common = ["--policies", "full", "--blocks", "8", "--batch-size", "4"]
    single = CliRunner().invoke(app, ["evaluate", str(folder), *common, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    parallel = CliRunner().invoke(
        app, ["evaluate", str(folder), *common, "--ep", "2", "--out", str(tmp_path / "ep")]
    )
    assert parallel.exit_code == 0, parallel.output
    one = json.loads((tmp_path / "one" / "report.json").read_text())["rows"][0]["perplexity"]
    ep = json.loads((tmp_path / "ep" / "ep" / "ep.json").read_text())
    ep_full = next(run for run in ep["runs"] if run["policy"] == "full")
    assert ep_full["perplexity"] == pytest.approx(one, rel=1e-4)


def test_cli_evaluate_holds_capacity_per_simulated_device_and_needs_more_than_one(tmp_path, blocks):
    folder = saved_model(tmp_path, blocks)
    common = [
        "evaluate",
        str(folder),
        "--policies",
        "full,drop",
        "--capacity",
        "0.5",
        "--capacity-scope",
        "rank",
    ]
    one = CliRunner().invoke(app, [*common, "--devices", "1", "--out", str(tmp_path / "one")])
    assert one.exit_code == 2 and "--devices N" in one.output
    two = CliRunner().invoke(app, [*common, "--devices", "2", "--out", str(tmp_path / "two")])
    assert two.exit_code == 0, two.output
    rows = json.loads((tmp_path / "two" / "report.json").read_text())["rows"]
    assert {r["policy"] for r in rows} == {"full", "drop"}


def test_evaluate_takes_capacity_per_simulated_device_and_expanded_candidates(tmp_path):
    from moe_understudy.config import EvalConfig

    cfg = EvalConfig(capacity_scope="rank", num_devices=2, expanded_m=2, policies=("full", "expanded_drop"))
    assert EvalConfig.from_yaml(cfg.to_yaml()) == cfg


def test_too_few_blocks_for_one_batch_names_the_evaluate_flags_that_fix_it(tmp_path, blocks):
    folder = saved_model(tmp_path, blocks)
    args = ["evaluate", str(folder), "--policies", "full,drop", "--blocks", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2
    assert "raise --blocks or lower --batch-size" in " ".join(result.output.split())


def test_evaluate_without_policies_runs_the_baselines_then_the_policy_of_the_stand_ins_level(
    tmp_path, blocks
):
    from moe_understudy.eval.quality import BASELINES, default_policies
    from moe_understudy.understudy.io import save_understudies
    from moe_understudy.understudy.modules import build_understudy

    folder = saved_model(tmp_path, blocks)
    model = tiny()
    for arch in ("trunk", "dense"):
        stand_ins = {
            m.index: build_understudy(arch, m, seed=0, init="random") for m in find_moe_layers(model)
        }
        save_understudies(tmp_path / arch, stand_ins, model)
    assert default_policies(None) == BASELINES == ("full", "drop", "expanded_drop", "reroute")
    assert default_policies(str(tmp_path / "trunk")) == (*BASELINES, "shadow")
    assert default_policies(str(tmp_path / "dense")) == (*BASELINES, "understudy")
    args = ["evaluate", str(folder), "--understudies", str(tmp_path / "trunk"), "--capacity", "1"]
    result = CliRunner().invoke(
        app, [*args, "--blocks", "8", "--batch-size", "4", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e" / "report.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == [*BASELINES, "shadow"]
