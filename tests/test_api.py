"""The Python API (`import moe_understudy as mu`) and the understudies artifact: the README example runs,
a folder describes itself, loads by path or hub id, refuses other models, and a patched model saves
what reloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moe_understudy as mu
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config
from moe_understudy.understudy.modules import build_understudy

torch.set_num_threads(1)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny():
    return build_model(tiny_config("mixtral"), seed=0).eval()


def _dense(model, seed=0):
    return {m.index: build_understudy("dense", m, seed=seed + m.index) for m in find_moe_layers(model)}


def test_the_package_exports_the_api_with_docstrings():
    for name in (
        "patch",
        "unpatch",
        "load_understudies",
        "save_understudies",
        "capture",
        "distill",
        "evaluate",
        "quantize",
    ):
        fn = getattr(mu, name)
        assert callable(fn) and fn.__doc__ and len(fn.__doc__.split()) > 10, name
        assert name in mu.__all__ and name in dir(mu)
    with pytest.raises(AttributeError):
        mu.no_such_thing  # noqa: B018


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("\n## Python\n") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (## Python)", "exec"), namespace)  # noqa: S102 - the README's own example
    rows = namespace["rows"]
    assert [(r["policy"], r["capacity_factor"]) for r in rows][:2] == [("full", None), ("drop", 0.5)]
    assert all(r["perplexity"] > 0 for r in rows)
    assert (tmp_path / "store" / "manifest.json").is_file()
    assert (tmp_path / "understudies" / "README.md").is_file()
    assert (tmp_path / "patched" / "config.json").is_file()
    assert (tmp_path / "patched" / "understudies" / "understudies.safetensors").is_file()
    assert namespace["logits"].dtype == torch.bfloat16


def test_an_understudies_folder_describes_itself(tmp_path, tiny):
    mu.save_understudies(tmp_path, _dense(tiny), tiny)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "moe-understudy-understudies/2"
    assert config["family"] == "mixtral" and config["model_type"] == "mixtral"
    assert (config["hidden_size"], config["num_layers"], config["moe_layers"]) == (32, 2, [0, 1])
    assert (config["num_experts"], config["top_k"]) == (4, 2)
    assert config["arch"] == ["dense"] and config["dtype"] == "float32"
    assert config["sizes"]["0"]["cost"] == pytest.approx(0.5) and config["sizes"]["0"]["params"] > 0
    card = (tmp_path / "README.md").read_text()
    assert "mixtral" in card and "mu.load_understudies" in card and "top-2" in card


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"num_local_experts": 6}, "4 experts per MoE layer but the model has 6"),
        ({"num_experts_per_tok": 1}, "2 experts per token"),
    ],
)
def test_understudies_refuse_a_model_with_other_experts_or_top_k(tmp_path, tiny, change, words):
    mu.save_understudies(tmp_path, _dense(tiny), tiny)
    base = tiny_config("mixtral")
    other = build_model(base.__class__(**{**base.to_dict(), **change}), seed=0)
    with pytest.raises(UserError, match=words) as err:
        mu.load_understudies(tmp_path, other)
    assert str(tmp_path) in str(err.value) and "understudy distill" in str(err.value)


def test_loaded_understudies_follow_the_model_dtype(tmp_path, tiny):
    saved = _dense(tiny)
    mu.save_understudies(tmp_path, saved, tiny)
    half = build_model(tiny_config("mixtral"), seed=0).to(torch.bfloat16)
    loaded = mu.load_understudies(tmp_path, half)
    assert {p.dtype for m in loaded.values() for p in m.parameters()} == {torch.bfloat16}
    as_saved = mu.load_understudies(tmp_path, half, dtype="float32")
    for k, module in saved.items():  # fp32 round trip stays bit-identical
        for a, b in zip(module.state_dict().values(), as_saved[k].state_dict().values(), strict=True):
            assert torch.equal(a, b)


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub's snapshot logic reads offline: refs/main -> snapshots/<commit>/files."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_understudies_load_by_hub_id_from_the_offline_cache(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants

    mu.save_understudies(tmp_path / "folder", _dense(tiny), tiny)
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-understudies", tmp_path / "folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = mu.load_understudies("someone/tiny-understudies", tiny)
    assert sorted(loaded) == [0, 1]


def test_an_unknown_hub_id_or_missing_folder_is_one_sentence(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"'nobody/nothing' are neither a local folder nor found in") as err:
        mu.load_understudies("nobody/nothing", tiny)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        mu.load_understudies(tmp_path / "missing" / "folder", tiny)


def test_save_pretrained_of_a_patched_model_saves_what_reloads(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    understudies = _dense(tiny)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny(input_ids=ids).logits
    with mu.patch(tiny, understudies, policy="understudy", capacity_factor=0.5):
        tiny.save_pretrained(tmp_path / "model")  # the model's own method, while patched
        with torch.no_grad():
            patched = tiny(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference)
    again = mu.load_understudies(tmp_path / "model", reloaded)  # finds model/understudies
    with torch.no_grad(), mu.patch(reloaded, again, policy="understudy", capacity_factor=0.5):
        assert torch.allclose(reloaded(input_ids=ids).logits, patched, atol=1e-6)
    assert "save_pretrained" not in vars(tiny)  # unpatching takes the override away


def test_capture_distill_evaluate_take_strings_with_a_tokenizer(tmp_path):
    from moe_understudy.data.tokenizer import train_bpe

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 6 for i in range(60)]
    tokenizer = train_bpe(texts, vocab_size=300)
    model = build_model(tiny_config("mixtral", vocab_size=len(tokenizer)), seed=0)
    store = mu.capture(
        model, texts, tmp_path / "store", tokenizer=tokenizer, tokens=1024, val_tokens=256, block_size=32
    )
    assert store.tokens("train") == 1024
    understudies = mu.distill(model, tmp_path / "store", steps=5, eval_every=5, out=tmp_path / "us")
    assert (tmp_path / "us" / "config.json").is_file() and sorted(understudies) == [0, 1]
    rows = mu.evaluate(model, tmp_path / "us", texts, tokenizer=tokenizer, block_size=32, capacities=[1.0])
    assert {r["policy"] for r in rows} == {"full", "drop", "understudy"}


def test_api_errors_are_one_sentence(tiny, tmp_path):
    with pytest.raises(UserError, match="Nothing to evaluate"):
        mu.evaluate(tiny, None, torch.zeros(0, 8, dtype=torch.long), policies=["full"])
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        mu.capture(tiny, ["some text"], tmp_path / "s")
    with pytest.raises(UserError, match="policy must be one of"):
        mu.evaluate(tiny, None, torch.zeros(4, 8, dtype=torch.long), policies=["teleport"])


def test_quantize_stores_a_trunk_set_in_int8_in_place_and_refuses_other_archs(tiny):
    trunks = {m.index: build_understudy("trunk", m, seed=0, init="random") for m in find_moe_layers(tiny)}
    assert mu.quantize(trunks) is trunks
    assert all(t.gate_up.dtype == torch.int8 for t in trunks.values())
    with pytest.raises(mu.UserError, match="trunk"):
        mu.quantize(_dense(tiny))
