"""Every path that had its own MoE wrapper before the execution core gives the same outputs through it.

tests/fixtures/pre_core_outputs.pt holds the logits the four old wrappers (runtime LoadAwareMoE,
KD RoutedBlock, end-to-end SubstitutedMoE; EP is pinned against one process in test_ep.py) gave on
one seeded batch of three families, recorded with the code before the core replaced them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from load_aware_helpers import make_ids, tiny_model

from moe_understudy.kd.teachers import routing_mode
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.runtime.layer import patch, unpatch
from moe_understudy.understudy.modules import build_understudy
from moe_understudy.understudy.replace import substituted

GOLDEN = torch.load(Path(__file__).parents[1] / "fixtures" / "pre_core_outputs.pt")
OLD_POLICIES = ("full", "drop", "drop_renorm", "reroute", "understudy", "shadow", "layer", "deadline")


def _setup(family):
    model = tiny_model(family)
    layers = find_moe_layers(model)
    dense = {m.index: build_understudy("dense", m, seed=m.index, intermediate=16) for m in layers}
    shadows = {m.index: build_understudy("shadows", m, seed=m.index, width=8) for m in layers}
    return model, dense, shadows


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_runtime_policies_equal_the_old_load_aware_layer(family):
    model, dense, shadows = _setup(family)
    for policy in OLD_POLICIES:
        for priority in ("position", "score"):
            patch(
                model,
                shadows if policy == "shadow" else dense,
                policy=policy,
                capacity_factor=0.5,
                priority=priority,
            )
            got = model(input_ids=make_ids()).logits
            unpatch(model)
            torch.testing.assert_close(
                got, GOLDEN[f"{family}/runtime/{policy}/{priority}"], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_kd_routing_modes_equal_the_old_routed_block(family):
    model, _, _ = _setup(family)
    for mode in ("native", "all", "ka", "explore"):
        with routing_mode(model, mode, generator=torch.Generator().manual_seed(11), ka_lambda=0.5):
            got = model(input_ids=make_ids()).logits
        torch.testing.assert_close(got, GOLDEN[f"{family}/kd/{mode}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_substitution_equals_the_old_substituted_block(family):
    model, dense, shadows = _setup(family)
    for name, stand_ins in (("dense", dense), ("shadows", shadows)):
        for fraction in (0.0, 0.5, 1.0):
            with substituted(model, stand_ins, fraction=fraction, seed=3):
                got = model(input_ids=make_ids()).logits
            torch.testing.assert_close(
                got, GOLDEN[f"{family}/substituted/{name}/{fraction}"], atol=1e-5, rtol=0
            )
