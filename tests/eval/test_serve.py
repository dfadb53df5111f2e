"""Generation under load: continuous batching with a KV cache, teacher-forced along the unpatched generation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from load_aware_helpers import CopyOfLayer, tiny_model
from torch import nn
from typer.testing import CliRunner

from moe_understudy.cli import app
from moe_understudy.eval.serve import (
    DECODE,
    Batching,
    Forced,
    Greedy,
    Phases,
    compare_free,
    decode_rows,
    noise_floor_rows,
    prefill_rows,
    reference_run,
    serve,
)
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model
from moe_understudy.runtime.layer import patch
from moe_understudy.runtime.ledger import LoadRecorder

VOCAB = 300


def tiny(seed: int = 0):
    return tiny_model(
        seed=seed, vocab_size=VOCAB, routed_gain=30.0
    )  # the routed part matters next to the residual


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (9, 5, 12, 7, 10, 6)]


def batching(slots=6, new_tokens=6, eos=-1, chunk=None):
    return Batching(slots=slots, new_tokens=new_tokens, eos_id=eos, pad_id=0, prefill_chunk=chunk)


def test_serving_equals_transformers_greedy_generation_one_prompt_at_a_time(prompts):
    model = tiny()
    ref = reference_run(model, prompts, batching())
    for p, got in zip(prompts, ref.tokens, strict=True):
        out = model.generate(
            input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        assert out[0, len(p) :].tolist() == got


def test_join_and_leave_with_chunked_prefill_give_the_same_logits(prompts):
    model = tiny()
    ref = reference_run(model, prompts, batching())
    greedy = Greedy(len(prompts), keep_logits=True)
    run = serve(model, prompts, batching(slots=2, chunk=4), greedy, order=[5, 4, 3, 2, 1, 0])
    assert run.tokens == ref.tokens
    for seq in range(len(prompts)):
        for step, logits in ref.logits[seq].items():
            assert torch.allclose(greedy.logits[seq][step], logits, atol=1e-4)
    # two places: prompts join in pairs as the previous pair leaves; never more than 2 running
    joins = [seqs for phase, seqs in run.schedule if phase == "prefill"]
    assert joins == [[5, 4], [3, 2], [1, 0]]
    assert all(len(seqs) <= 2 for _, seqs in run.schedule)


def test_a_finished_sequence_leaves_and_a_waiting_prompt_takes_its_slot(prompts):
    model = tiny()
    free = reference_run(model, prompts, batching())
    eos = free.tokens[0][1]  # sequence 0 emits this as its second token
    run = serve(model, prompts, batching(slots=3, eos=eos), Greedy())
    assert run.tokens[0] == free.tokens[0][:2]
    for got, full in zip(run.tokens, free.tokens, strict=True):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:cut]  # same greedy tokens until each one's end-of-text
    # the prompt waiting first (3) joins right after sequence 0 has left, while 1 and 2 still run
    joined = [seqs for phase, seqs in run.schedule if phase == "prefill"]
    assert joined[0] == [0, 1, 2] and 3 in joined[1]
    first_join = next(i for i, (phase, seqs) in enumerate(run.schedule) if phase == "prefill" and 3 in seqs)
    assert 1 in run.schedule[first_join + 1][1] and 0 not in run.schedule[first_join + 1][1]


def by_system(rows):
    return {(r["policy"], r["capacity_factor"]): r for r in rows}


def test_full_agrees_exactly_and_dropping_at_low_capacity_does_not(prompts):
    model = tiny()
    b = batching()
    ref = reference_run(model, prompts, b)
    rows = by_system(decode_rows(model, None, prompts, b, ["drop"], [0.25, 100.0], ref))
    full, low, ample = rows[("full", None)], rows[("drop", 0.25)], rows[("drop", 100.0)]
    assert full["agreement"] == 1.0 and full["kl"] == pytest.approx(0.0, abs=1e-7)
    assert (
        full["identical_frac"] == 1.0
        and full["prefix_frac"] == 1.0
        and full["rouge_l"] == pytest.approx(100.0)
    )
    assert full["positions"] == len(prompts) * (b.new_tokens - 1)  # decode positions: new tokens 2..n
    assert (
        low["agreement"] < 1.0 and low["kl"] > 1e-3 and low["overflow_frac"] > 0.2 and low["frac_dropped"] > 0
    )
    assert low["bytes_per_token"] < full["bytes_per_token"]
    assert ample["agreement"] == 1.0 and ample["overflow_frac"] == 0.0
    assert full["agreement_ci95"] == [1.0, 1.0]
    assert low["agreement_ci95"][0] <= low["agreement"] <= low["agreement_ci95"][1]
    assert full["memory_expert_equiv"] == 0.0 and full["understudy_cost"] is None
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


def test_an_understudy_that_copies_the_layer_reproduces_full(prompts):
    model = tiny()
    b = batching()
    ref = reference_run(model, prompts, b)
    stand_ins = {m.index: CopyOfLayer(m) for m in find_moe_layers(model)}
    (full, u) = decode_rows(model, stand_ins, prompts, b, ["understudy"], [0.25], ref)
    assert u["frac_understudy"] > 0.2 and u["understudy_cost"] == pytest.approx(1.0)
    assert u["agreement"] == 1.0 and u["kl"] == pytest.approx(0.0, abs=1e-6)
    assert u["identical_frac"] == 1.0


def test_capacity_of_a_decode_step_is_over_that_steps_tokens(prompts):
    model = tiny()
    b = batching(slots=4, new_tokens=4)
    ref = reference_run(model, prompts, b)
    handle = patch(model, None, policy="full", priority="score")
    try:
        settings = {"prefill": dict(policy="full"), DECODE: dict(policy="drop", capacity_factor=1.0)}
        phases = Phases(handle, settings, LoadRecorder(), DECODE)
        run = serve(model, prompts, b, Forced(ref), on_forward=phases)
    finally:
        handle.unpatch()
    layers = find_moe_layers(model)
    calls = phases.per_call()
    steps = run.decode_steps()
    assert len(calls) == len(steps) and {len(s) for s in steps} == {4, 2}  # a full step, then the last two
    for ledgers, seqs in zip(calls, steps, strict=True):
        assert len(ledgers) == len(layers)
        for s in ledgers:
            assert s.tokens == len(seqs)
            assert s.capacity == math.ceil(1.0 * len(seqs) * layers[0].top_k / layers[0].num_experts)


class FlipOnce(nn.Module):
    """The model, except that at decode call `at` row 0's most likely token is replaced by another."""

    def __init__(self, model, at: int):
        super().__init__()
        self.model, self.at, self.decode_calls = model, at, 0
        self.config = model.config

    def forward(self, **kw):
        out = self.model(**kw)
        if kw["input_ids"].shape[1] == 1:
            if self.decode_calls == self.at:
                logits = out.logits.clone()
                row = logits[0, -1]
                second = row.topk(2).indices[1]
                row[second] = row.max() + 5.0
                out.logits = logits
            self.decode_calls += 1
        return out


def test_teacher_forcing_feeds_the_reference_so_one_flip_stays_one_flip(prompts):
    model = tiny()
    b = batching(new_tokens=6)
    ref = reference_run(model, prompts, b)
    forced = Forced(ref)
    run = serve(FlipOnce(model, at=2), prompts, b, forced)
    assert run.tokens == ref.tokens  # inputs are the reference's tokens
    summary = forced.summary()
    assert summary["positions"] == len(prompts) * 5
    assert summary["agreement"] == pytest.approx(1 - 1 / summary["positions"])  # exactly the one flip
    assert sum(k > 1e-6 for k in summary["kl_by_position"]) == 1  # later steps are untouched
    free = serve(FlipOnce(model, at=2), prompts, b, Greedy())
    flipped = compare_free(free.tokens, ref.tokens, lambda ids: " ".join(map(str, ids)))
    assert free.tokens[0][:3] == ref.tokens[0][:3] and free.tokens[0][3] != ref.tokens[0][3]
    assert flipped["identical_frac"] == pytest.approx(5 / 6) and flipped["prefix_frac"] < 1


def test_noise_floor_rows_compare_the_unpatched_model_under_other_conditions(prompts):
    model = tiny()
    b = batching()
    ref = reference_run(model, prompts, b)
    rows = noise_floor_rows(model, prompts, b, ref)
    assert [r["slots"] for r in rows] == [3, 6] and "bfloat16" in rows[1]["noise"]
    composition, bf16 = rows
    assert composition["agreement"] == 1.0 and composition["identical_frac"] == 1.0
    assert 0 <= bf16["agreement"] <= 1 and bf16["kl"] >= 0


def test_prefill_mode_scores_prompt_positions_chunk_by_chunk(prompts):
    model = tiny()
    rows = by_system(prefill_rows(model, None, prompts, batching(slots=3, chunk=4), ["drop"], [0.25]))
    full, low = rows[("full", None)], rows[("drop", 0.25)]
    assert full["positions"] == sum(map(len, prompts)) and full["agreement"] == 1.0
    assert low["agreement"] < 1.0 and low["overflow_frac"] > 0
    # capacity per chunk of 3 prompts x 4 positions (widths 12 and 10: the last chunk has 2 positions)
    assert low["tokens_per_step"] == [12, 12, 12, 12, 12, 6]


# ---- the command and its bad input --------------------------------------------------------------------


def saved_model(tmp_path, model=None):
    from moe_understudy.data.tokenizer import train_bpe

    folder = tmp_path / "model"
    (model or tiny()).save_pretrained(folder)
    train_bpe(["def f(x):\n    return x + 1\n" * 50], vocab_size=VOCAB, out_dir=folder)
    blocks = torch.randint(2, VOCAB, (8, 24), generator=torch.Generator().manual_seed(5))
    torch.save({"train": blocks, "val": blocks}, folder / "blocks.pt")
    return folder


def run_cli(*args):
    return CliRunner().invoke(app, ["serve-eval", *map(str, args)])


def test_cli_serve_eval_writes_report_plot_and_a_yaml_that_replays(tmp_path):
    folder = saved_model(tmp_path)
    out = tmp_path / "serve"
    common = ["--policies", "full,drop", "--capacity", "0.5,1", "--prompts", "4", "--prompt-tokens", "8"]
    result = run_cli(folder, *common, "--new-tokens", "4", "--slots", "2", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [(r["policy"], r["capacity_factor"]) for r in report["rows"]] == [
        ("full", None),
        ("drop", 0.5),
        ("drop", 1.0),
    ]
    assert len(report["noise_floor"]) == 2 and (out / "report.png").stat().st_size > 0
    again = run_cli("--config", out / "serve.yaml", "--out", tmp_path / "again", "--no-noise-floor")
    assert again.exit_code == 0, again.output
    replay = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [r["agreement"] for r in replay["rows"]] == [r["agreement"] for r in report["rows"]]
    prefill = run_cli(folder, *common, "--mode", "prefill", "--prefill-chunk", "4", "--out", tmp_path / "p")
    assert prefill.exit_code == 0, prefill.output


def one_sentence(result, *words):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:") and text.count(". ") == 0, text
    for w in words:
        assert w in text, text


def test_bad_input_is_one_sentence_each(tmp_path):
    folder = saved_model(tmp_path)
    one_sentence(run_cli(folder, "--data", "nosuchpreset"), "nosuchpreset", "heldout")
    one_sentence(run_cli("fine"), "preset", "understudy teacher --preset fine")
    one_sentence(
        run_cli(folder, "--prompts", "4", "--prompt-tokens", "20", "--new-tokens", "50"), "context of 64"
    )
    one_sentence(run_cli(folder, "--prompts", "0"), "at least one prompt")
    one_sentence(run_cli(folder, "--policies", "understudy"), "understudy", "--understudies")
    dense = build_model(_dense_config())
    one_sentence(run_cli(saved_model(tmp_path / "dense", dense)), "No MoE layer")


def _dense_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def test_serve_config_round_trips_through_yaml_and_refuses_no_prompts():
    from moe_understudy.config import ServeConfig

    cfg = ServeConfig(policies=("full", "drop"), capacities=(1.0, 2.0), slots=8, prefill_chunk=16)
    assert ServeConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="at least one prompt"):
        ServeConfig(prompts=0)
    with pytest.raises(ValueError, match="mode"):
        ServeConfig(mode="beam")
