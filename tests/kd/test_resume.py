"""An interrupted run resumed from its checkpoint ends exactly where an unbroken run ends."""

import json
import random

import pytest
import torch

from moe_understudy.config import SFTConfig
from moe_understudy.errors import UserError
from moe_understudy.kd.sft import SFTRecipe


def _data(path):
    rng = random.Random(0)
    words = "red blue green cat dog sun".split()
    rows = [
        {"task": "t", "prompt": f"say {w}", "response": w} for w in (rng.choice(words) for _ in range(30))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(data):
    return SFTConfig(
        data=data,
        model="quick-student",
        vocab_size=280,
        steps=4,
        batch_size=2,
        eval_every=2,
        val_examples=2,
        max_prompt=8,
        max_total=16,
        max_new_tokens=2,
    )


def test_resume_after_an_interruption_matches_an_unbroken_run(tmp_path, interrupted_sft):
    cfg = _cfg(_data(tmp_path / "d.jsonl"))
    unbroken = SFTRecipe(cfg, tmp_path / "a").setup().train()
    interrupted_sft(cfg, tmp_path / "b", at=2)
    with pytest.raises(UserError, match="--resume"):
        SFTRecipe(cfg, tmp_path / "b").setup()
    resumed = SFTRecipe(cfg, tmp_path / "b", resume=True).setup().train()

    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in unbroken["history"]], abs=1e-6
    )
    a = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
