"""Bad input gets one sentence naming the file and the fix, and nothing is lost.

Truncated or corrupt safetensors files (understudies, store shards, model weights), a store or
understudies made for another model, unknown dtypes and devices, empty and all-padding batches,
NaN / inf in captured data, a full disk during a save (the previous file stays), a killed capture
(a rerun restarts cleanly), and the CLI: no traceback unless --debug.
"""

from __future__ import annotations

import errno
import importlib
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moe_understudy as mu
from moe_understudy.cli import app
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config
from moe_understudy.understudy.modules import build_understudy

capture_mod = importlib.import_module("moe_understudy.capture")  # the submodule (mu.capture is the function)
torch.set_num_threads(1)


def _other(**change):
    base = tiny_config("mixtral")
    return build_model(base.__class__(**{**base.to_dict(), **change}), seed=0)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_sentence(message: str) -> None:
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message


@pytest.fixture(scope="module")
def tiny():
    return build_model(tiny_config("mixtral"), seed=0).eval()


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    ids = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(0))
    return mu.capture(tiny, {"train": ids[:8], "val": ids[8:]}, tmp_path_factory.mktemp("store") / "store")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Mixtral + BPE tokenizer saved like `understudy teacher` does, and a one-file corpus."""
    from moe_understudy.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("saved")
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "value", "list", "for", "in", "if"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600))
    (root / "corpus.txt").write_text(text)
    tokenizer = train_bpe([text], vocab_size=300)
    build_model(tiny_config("mixtral", vocab_size=len(tokenizer)), seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


# ---- truncated or corrupt safetensors --------------------------------------------------------------


def test_truncated_understudies_name_the_file_and_the_fix(tmp_path, tiny):
    us = {m.index: build_understudy("dense", m) for m in find_moe_layers(tiny)}
    mu.save_understudies(tmp_path, us, tiny)
    _truncate(tmp_path / "understudies.safetensors")
    with pytest.raises(UserError) as err:
        mu.load_understudies(tmp_path, tiny)
    message = str(err.value)
    _one_sentence(message)
    assert (
        "understudies.safetensors is truncated or corrupt" in message
        and "save the understudies again" in message
    )


def test_a_corrupt_understudies_config_is_one_sentence(tmp_path, tiny):
    us = {m.index: build_understudy("dense", m) for m in find_moe_layers(tiny)}
    mu.save_understudies(tmp_path, us, tiny)
    (tmp_path / "config.json").write_text('{"format": "moe-underst')
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        mu.load_understudies(tmp_path, tiny)


def test_a_truncated_store_shard_names_the_shard(tmp_path, tiny):
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
    store = mu.capture(tiny, {"train": ids[:4], "val": ids[4:]}, tmp_path / "store")
    shard = tmp_path / "store" / "train" / "layer0-00000.safetensors"
    _truncate(shard)
    with pytest.raises(UserError) as err:
        store.load(0, "train")
    message = str(err.value)
    _one_sentence(message)
    assert str(shard) in message and "capture the store again" in message


def test_truncated_model_weights_are_one_sentence(saved_model, tmp_path):
    import shutil

    from moe_understudy.moe.loading import load_model_and_tokenizer

    model = tmp_path / "model"
    shutil.copytree(saved_model / "model", model)
    _truncate(model / "model.safetensors")
    with pytest.raises(UserError) as err:
        load_model_and_tokenizer(model)
    message = str(err.value)
    _one_sentence(message)
    assert "model.safetensors are truncated or corrupt" in message and "save the model again" in message


# ---- made for another model ------------------------------------------------------------------------


def test_a_store_captured_from_another_model_is_refused(store):
    with pytest.raises(
        UserError, match="captured from a model with 4 experts per MoE layer but this model has 6"
    ):
        store.check_model(find_moe_layers(_other(num_local_experts=6)))
    with pytest.raises(UserError, match="2 experts per token"):
        store.check_model(find_moe_layers(_other(num_experts_per_tok=1)))
    with pytest.raises(UserError, match="capture this model first"):
        mu.distill(_other(num_local_experts=6), store, steps=1)


def test_understudies_with_other_num_experts_or_top_k_are_refused(tmp_path, tiny):
    other = _other(num_local_experts=6, num_experts_per_tok=3)
    mu.save_understudies(
        tmp_path, {m.index: build_understudy("shadows", m) for m in find_moe_layers(other)}, other
    )
    with pytest.raises(UserError, match="6 experts per MoE layer but the model has 4"):
        mu.load_understudies(tmp_path, tiny)


# ---- dtype and device ------------------------------------------------------------------------------


def test_unknown_dtype_and_device_are_one_sentence():
    from moe_understudy.config import EvalConfig
    from moe_understudy.moe.loading import resolve_device, resolve_dtype

    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(UserError, match="Unknown dtype 'float8'; use one of float32, bfloat16, float16"):
        resolve_dtype("float8")
    with pytest.raises(UserError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs CUDA, which this machine does not have; use --device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EvalConfig(dtype="int8")


def test_the_cli_refuses_an_unknown_dtype_or_device_in_one_sentence(saved_model):
    model = saved_model / "model"
    runner = CliRunner()
    bad_dtype = runner.invoke(app, ["inspect", str(model), "--dtype", "float8", "--blocks", "2"])
    assert bad_dtype.exit_code == 2 and "dtype must be one of float32, bfloat16, float16" in bad_dtype.output
    bad_device = runner.invoke(app, ["inspect", str(model), "--device", "tpu9", "--blocks", "2"])
    assert bad_device.exit_code == 2 and "device 'tpu9'" in " ".join(bad_device.output.split())
    for result in (bad_dtype, bad_device):
        assert "Traceback" not in result.output


# ---- empty and all-padding batches -----------------------------------------------------------------


def test_empty_input_is_one_sentence_and_an_empty_step_runs(tiny):
    from moe_understudy.eval.metrics import perplexity
    from moe_understudy.runtime.policies import POLICIES

    with pytest.raises(UserError, match="No text to score"):
        perplexity(tiny, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(UserError, match="Nothing to evaluate"):
        mu.evaluate(tiny, None, torch.zeros(0, 16, dtype=torch.long), policies=["full"])
    dense = {m.index: build_understudy("dense", m) for m in find_moe_layers(tiny)}
    shadows = {m.index: build_understudy("shadows", m) for m in find_moe_layers(tiny)}
    for policy in POLICIES:  # a step with no tokens at all (a drained serving batch) under every policy
        stand_ins = shadows if "shadow" in policy else dense
        with torch.no_grad(), mu.patch(tiny, stand_ins, policy=policy, capacity_factor=0.5) as handle:
            assert handle.layers[0](torch.zeros(1, 0, 32)).shape == (1, 0, 32)


def test_an_all_padding_batch_runs_under_every_policy_and_masks_to_zero(tiny):
    from moe_understudy.reduce import masked_mean
    from moe_understudy.runtime.policies import POLICIES

    ids = torch.zeros(2, 8, dtype=torch.long)  # every token the pad id, every position masked
    mask = torch.zeros(2, 8, dtype=torch.long)
    dense = {m.index: build_understudy("dense", m) for m in find_moe_layers(tiny)}
    shadows = {m.index: build_understudy("shadows", m) for m in find_moe_layers(tiny)}
    for policy in POLICIES:
        stand_ins = shadows if "shadow" in policy else dense
        with torch.no_grad(), mu.patch(tiny, stand_ins, policy=policy, capacity_factor=0.5):
            assert torch.isfinite(tiny(input_ids=ids, attention_mask=mask).logits).all(), policy
    loss = masked_mean(torch.randn(2, 8, requires_grad=True), mask.bool())
    assert loss.item() == 0.0 and loss.requires_grad  # a zero with a gradient path, never NaN


# ---- NaN / inf in captured data --------------------------------------------------------------------


def test_nan_or_inf_in_a_store_shard_is_refused_naming_the_shard(tmp_path, tiny):
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(2))
    store = mu.capture(tiny, {"train": ids[:4], "val": ids[4:]}, tmp_path / "store")
    shard = tmp_path / "store" / "val" / "layer1-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["y"][3, 0] = float("nan")
    tensors["logits"][0, 0] = float("inf")
    save_file(tensors, str(shard))
    with pytest.raises(UserError) as err:
        store.load(1, "val")
    message = str(err.value)
    _one_sentence(message)
    assert str(shard) in message and "NaN or inf values in y, logits" in message
    with pytest.raises(UserError, match="NaN or inf"):
        mu.distill(tiny, store, steps=1)


# ---- a full disk keeps the previous file -----------------------------------------------------------


def _fill_the_disk_midway(monkeypatch, module, name="save_file"):
    """Make `module.name` write half a file and then fail as a full disk does."""
    real = getattr(module, name)

    def full(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        _truncate(Path(filename))
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(module, name, full)


def test_a_full_disk_during_a_save_keeps_the_previous_understudies(tmp_path, tiny, monkeypatch):
    import safetensors.torch

    first = {m.index: build_understudy("dense", m, seed=1) for m in find_moe_layers(tiny)}
    mu.save_understudies(tmp_path, first, tiny)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _fill_the_disk_midway(monkeypatch, safetensors.torch)
    second = {m.index: build_understudy("dense", m, seed=2) for m in find_moe_layers(tiny)}
    with pytest.raises(UserError) as err:
        mu.save_understudies(tmp_path, second, tiny)
    message = str(err.value)
    _one_sentence(message)
    assert "The disk filled while writing" in message and "the previous version is kept" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no .tmp left, old files intact
    monkeypatch.undo()
    loaded = mu.load_understudies(tmp_path, tiny, dtype="float32")
    for k, module in first.items():
        for a, b in zip(module.state_dict().values(), loaded[k].state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from moe_understudy.files import atomic_torch_save

    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="disk filled while writing .*state.pt"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# ---- a killed capture restarts cleanly -------------------------------------------------------------


def test_a_killed_capture_leaves_no_trusted_store_and_a_rerun_restarts_cleanly(tmp_path, tiny, monkeypatch):
    ids = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(3))
    blocks = {"train": ids[:8], "val": ids[8:]}
    out = tmp_path / "store"
    mu.capture(tiny, blocks, out, shard_tokens=32)  # an earlier, finished capture in the same folder
    real, calls = capture_mod._flush, []

    def killed_after_two_shards(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # as a kill between two shard writes
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "_flush", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        mu.capture(tiny, {"train": ids[4:], "val": ids[:4]}, out, shard_tokens=32)
    with pytest.raises(UserError, match="the capture did not finish; rerun it"):
        capture_mod.CaptureStore(out)  # the old manifest went first: nothing is trusted
    monkeypatch.undo()
    store = mu.capture(tiny, blocks, out, shard_tokens=64)
    listed = {s["file"] for split in store.manifest["shards"].values() for ss in split.values() for s in ss}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")}
    assert on_disk == listed and not list(out.rglob("*.tmp"))  # no shard of the killed run is left
    assert store.load(0, "train")["x"].shape[0] == 8 * 16


# ---- the CLI: one sentence, no traceback unless --debug --------------------------------------------


def test_cli_errors_are_one_sentence_unless_debug(saved_model, tmp_path, monkeypatch):
    runner = CliRunner()
    model = saved_model / "model"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    (tmp_path / "broken" / "understudies.safetensors").write_bytes(b"not safetensors")
    args = ["replace-eval", str(model), "--understudies", str(tmp_path / "broken"), "--blocks", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "config.json is not a moe-understudy-understudies/2 file" in " ".join(result.output.split())

    import moe_understudy.understudy.distill as distill_mod

    def bug(*args, **kwargs):
        raise RuntimeError("expected m1 and m2 to have the same dtype\nmore lines of detail")

    monkeypatch.setattr(distill_mod, "run_replace_eval", bug)
    unexpected = runner.invoke(app, ["replace-eval", str(model), "--understudies", str(tmp_path)])
    assert unexpected.exit_code == 1 and "Traceback" not in unexpected.output
    said = " ".join(unexpected.output.split())
    assert "RuntimeError: expected m1 and m2 to have the same dtype (rerun with --debug" in said
    assert "more lines" not in said
    debug = runner.invoke(app, ["replace-eval", str(model), "--understudies", str(tmp_path), "--debug"])
    assert debug.exit_code == 1 and isinstance(debug.exception, RuntimeError)  # the traceback is shown


def test_cli_a_config_that_is_not_a_file_is_one_sentence(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "m", "--config", str(tmp_path / "nope.yaml")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "is not a file" in said and "Traceback" not in said


def test_cli_bad_capture_data_names_the_path(saved_model, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "capture",
            str(saved_model / "model"),
            "--out",
            str(tmp_path / "s"),
            "--data",
            str(tmp_path / "no.txt"),
        ],
    )
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    assert not (tmp_path / "s" / "manifest.json").exists()
