"""Capture store: what is recorded equals the layer's own computation; only manifest-listed shards are trusted."""

from __future__ import annotations

import json

import pytest
import torch

from moe_understudy.capture import MANIFEST, CaptureStore, capture_activity, shard_name
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config


def _blocks(n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 97, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_store_holds_block_inputs_routed_outputs_and_routing(tmp_path, family):
    model = build_model(tiny_config(family), seed=0)
    ids = _blocks()
    store = capture_activity(
        model, {"train": ids[:4], "val": ids[4:]}, tmp_path, batch_size=2, shard_tokens=20
    )
    layers = find_moe_layers(model)
    assert store.layers == [ly.index for ly in layers]
    assert store.tokens("train") == 4 * 16 and store.tokens("val") == 2 * 16
    for ly in layers:
        rows = store.load(ly.index, "train")
        r = ly.route(rows["x"])
        # y is the ROUTED output only (shared experts excluded) of exactly the recorded routing
        torch.testing.assert_close(
            rows["y"], ly.experts(rows["x"], rows["indices"], rows["weights"]), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(rows["logits"], r.logits)
        assert torch.equal(rows["indices"], r.indices)
        assert rows["x"].shape == (64, ly.hidden_size) and rows["indices"].dtype == torch.int64


def test_block_inputs_are_what_the_decoder_layer_feeds_its_moe(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    seen = []
    layer = find_moe_layers(model)[1]
    handle = layer.block.register_forward_hook(
        lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone())
    )
    ids = _blocks(2)
    store = capture_activity(model, {"train": ids, "val": ids}, tmp_path)
    handle.remove()
    assert torch.equal(store.load(1, "train")["x"], seen[0])


def test_shards_are_cut_at_the_requested_size_and_usage_is_counted(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    store = capture_activity(
        model, {"train": _blocks(6), "val": _blocks(1)}, tmp_path, batch_size=1, shard_tokens=32
    )
    shards = store.manifest["shards"]["train"]["0"]
    assert [s["rows"] for s in shards] == [32, 32, 32]
    assert shards[0]["file"] == f"train/{shard_name(0, 0)}"
    counts = torch.tensor(store.manifest["usage"]["0"]["counts"])
    assert counts.sum().item() == 6 * 16 * 2  # every top-2 assignment of the train split
    assert store.usage(0).sum().item() == pytest.approx(6 * 16, rel=1e-5)  # weights sum to 1 per token


def test_a_shard_not_listed_in_the_manifest_is_ignored(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    capture_activity(model, {"train": _blocks(2), "val": _blocks(1)}, tmp_path, shard_tokens=1000)
    stray = tmp_path / "train" / shard_name(0, 1)
    stray.write_bytes((tmp_path / "train" / shard_name(0, 0)).read_bytes())
    (tmp_path / "train" / (shard_name(0, 2) + ".tmp")).write_bytes(b"half a shard")
    assert CaptureStore(tmp_path).load(0)["x"].shape[0] == 2 * 16


def test_a_killed_capture_leaves_nothing_trusted(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    capture_activity(model, {"train": _blocks(2), "val": _blocks(1)}, tmp_path)

    class Killed(Exception):
        pass

    def die(module, args, output):
        raise Killed

    handle = find_moe_layers(model)[1].block.experts.register_forward_hook(die)
    with pytest.raises(Killed):  # a second capture into the same folder dies mid-way
        capture_activity(
            model, {"train": _blocks(4), "val": _blocks(1)}, tmp_path, batch_size=1, shard_tokens=16
        )
    handle.remove()
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(UserError, match="did not finish"):
        CaptureStore(tmp_path)


def test_store_refuses_a_model_it_did_not_record(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    store = capture_activity(model, {"train": _blocks(1), "val": _blocks(1)}, tmp_path)
    deeper = build_model(tiny_config("mixtral", num_layers=3), seed=0)
    with pytest.raises(UserError, match=r"holds MoE layers \[0, 1\] but the model has \[0, 1, 2\]"):
        store.check_model(find_moe_layers(deeper))
    with pytest.raises(UserError, match="no layer 7"):
        store.load(7)
    assert json.loads((tmp_path / MANIFEST).read_text())["dtype"] == "float32"


def test_half_precision_store(tmp_path):
    model = build_model(tiny_config("mixtral"), seed=0)
    store = capture_activity(model, {"train": _blocks(1), "val": _blocks(1)}, tmp_path, dtype="bfloat16")
    assert store.load(0)["x"].dtype == torch.bfloat16
