"""Load scenarios: which blocks are evaluated and how the router is pushed."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.config import EvalConfig
from moe_understudy.errors import UserError
from moe_understudy.runtime.scenarios import batches, build_scenario, hot_expert_bias


def test_batches_are_full_steps_only():
    blocks = torch.arange(7 * 4).view(7, 4)
    got = batches(blocks, 3)
    assert [b.shape[0] for b in got] == [3, 3]  # the seventh block would make a lighter step
    assert torch.equal(torch.cat(got), blocks[:6])
    with pytest.raises(UserError, match="batch"):
        batches(blocks, 8)


def test_hot_expert_bias_raises_one_expert():
    assert hot_expert_bias(4, 2, 1.5).tolist() == [0.0, 0.0, 1.5, 0.0]
    with pytest.raises(UserError, match="expert id"):
        hot_expert_bias(4, 4, 1.0)


def test_natural_and_hot_expert_use_the_cached_held_out_blocks(tmp_path):
    val = torch.randint(0, 50, (10, 16))
    torch.save({"train": torch.zeros(2, 16, dtype=torch.long), "val": val}, tmp_path / "blocks.pt")
    natural = build_scenario(EvalConfig(model=str(tmp_path), max_blocks=6), num_experts=4, tokenizer=None)
    assert natural.name == "natural" and torch.equal(natural.blocks, val[:6]) and natural.logit_bias is None
    hot = build_scenario(
        EvalConfig(model=str(tmp_path), scenario="hot_expert", hot_expert=1, hot_bias=3.0),
        num_experts=4,
        tokenizer=None,
    )
    assert torch.equal(hot.blocks, val) and hot.logit_bias.tolist() == [0.0, 3.0, 0.0, 0.0]
