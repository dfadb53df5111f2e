"""What EPLB plans its replicas on under `understudy ep --placement replicate`: stale or fresh."""

import pytest
import torch

from moe_understudy.config import EPConfig
from moe_understudy.runtime.ep.workflow import calibration_blocks


@pytest.fixture
def model_dir(tmp_path):
    blocks = torch.arange(40 * 8).view(40, 8)
    torch.save({"train": blocks[:32], "val": blocks[32:]}, tmp_path / "blocks.pt")
    return tmp_path, blocks


def test_stale_eplb_plans_on_an_earlier_window_and_fresh_on_the_served_blocks(model_dir):
    folder, blocks = model_dir
    served = blocks[32:]
    stale = calibration_blocks(EPConfig(model=str(folder), placement="replicate"), None, served)
    assert torch.equal(stale, blocks[:32])  # the folder's train blocks, never the served ones
    fresh = calibration_blocks(
        EPConfig(model=str(folder), placement="replicate", calibration="eval"), None, served
    )
    assert fresh is served


def test_capacity_per_rank_over_replicas_is_a_valid_ep_config():
    cfg = EPConfig(placement="replicate", extra_slots=1, capacity_scope="rank")
    assert cfg.capacity_scope == "rank" and cfg.extra_slots == 1
