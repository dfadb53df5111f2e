"""sft and kd under --dtype / --device: fp32 master weights (student, teacher), forwards under autocast,
float16 with loss scaling; each case runs on the CPU and, with a GPU, on CUDA (skipped here, saying so)."""

import json
import random

import pytest
import torch

from moe_understudy.config import KDConfig, SFTConfig
from moe_understudy.data.tokenizer import train_bpe
from moe_understudy.errors import UserError
from moe_understudy.kd.sft import SFTRecipe
from moe_understudy.kd.trainer import KDRecipe
from moe_understudy.moe.presets import build_model, tiny_config

WORDS = "red blue green cat dog bird sun moon tree lake".split()
NO_GPU = "no CUDA device here: the CUDA case of sft / kd training runs on a machine with a GPU"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)),
]
SMALL = dict(
    val_examples=2, max_prompt=12, max_total=20, max_new_tokens=2, eval_every=2, batch_size=2, steps=2
)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A saved tiny Mixtral teacher with its BPE and an instruction file."""
    tmp = tmp_path_factory.mktemp("kdprecision")
    rng = random.Random(0)
    rows = [
        {"task": "copy", "prompt": f"copy {a} {b}", "response": f"{a} {b}"}
        for a, b in ((rng.choice(WORDS), rng.choice(WORDS)) for _ in range(30))
    ]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = tmp / "teacher"
    tok = train_bpe([f"{r['prompt']} {r['response']}" for r in rows], 280, teacher)
    build_model(tiny_config("mixtral", vocab_size=len(tok)), seed=0).save_pretrained(str(teacher))
    return data, teacher


def _watch(model) -> list[tuple[torch.dtype, torch.dtype]]:
    """(logits dtype, head weight dtype) of every training forward of `model` from now on."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, _i, out: seen.append((out.dtype, m.weight.dtype)) if m.training else None
    )
    return seen


def _fp32_on(state: dict, kind: str = "cpu") -> bool:
    """Every floating tensor of a checkpoint's state dict is fp32 and on `kind` (CPU copies)."""
    tensors = [t for t in state.values() if t.is_floating_point()]
    return bool(tensors) and all(t.dtype == torch.float32 and t.device.type == kind for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_sft_runs_in_bfloat16_with_fp32_weights_and_its_config_round_trips(setting, tmp_path, device):
    data, _ = setting
    cfg = SFTConfig(
        data=str(data), model="quick-student", vocab_size=280, device=device, dtype="bf16", **SMALL
    )
    recipe = SFTRecipe(cfg, tmp_path / "sft").setup()
    seen = _watch(recipe.model)
    summary = recipe.train()
    assert set(seen) == {(torch.bfloat16, torch.float32)}  # bf16 compute, fp32 master weights
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    assert summary["optimizer_steps"] == cfg.steps
    state = torch.load(tmp_path / "sft" / "checkpoint" / "state.pt", weights_only=False)
    assert _fp32_on(state["model"])
    assert SFTConfig.from_yaml(tmp_path / "sft" / "sft.yaml") == cfg and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("method", "dtype"),
    [("kd", "bfloat16"), ("gkd", "bfloat16"), ("sar", "float16")],  # gkd samples under autocast
)
def test_kd_methods_run_in_reduced_precision_with_fp32_student_and_teacher(
    setting, tmp_path, method, dtype, device
):
    data, teacher = setting
    cfg = KDConfig(data=str(data), teacher=str(teacher), method=method, gen_max_new_tokens=3, **SMALL)
    cfg = cfg.replace(device=device, dtype=dtype)
    recipe = KDRecipe(cfg, tmp_path / "kd").setup()
    seen = _watch(recipe.model)
    summary = recipe.train()
    assert set(seen) == {(getattr(torch, dtype), torch.float32)}
    assert all(torch.isfinite(torch.tensor(h["distill"])) for h in summary["history"])
    for model in (recipe.model, recipe.teacher):
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, device)}
    state = torch.load(tmp_path / "kd" / "checkpoint" / "state.pt", weights_only=False)
    assert _fp32_on(state["model"])
    if dtype == "float16":  # dynamic loss scaling, the router step's own scaler too
        assert state["scaler"]["scale"] > 0 and state["extra"]["router_scaler"]["scale"] > 0
        assert all(r.dtype == torch.float32 and r.device.type == "cpu" for r in state["extra"]["routers"])
    assert KDConfig.from_yaml(tmp_path / "kd" / "kd.yaml") == cfg


def test_an_unknown_device_stops_sft_and_kd_before_the_run_folder_exists(setting, tmp_path):
    data, teacher = setting
    with pytest.raises(UserError, match=r"^Unknown device 'tpu9'; use cpu, cuda, cuda:N or auto\.$"):
        SFTRecipe(SFTConfig(data=str(data), device="tpu9", **SMALL), tmp_path / "s").setup()
    with pytest.raises(UserError, match="Unknown device 'tpu9'"):
        KDRecipe(
            KDConfig(data=str(data), teacher=str(teacher), device="tpu9", **SMALL), tmp_path / "k"
        ).setup()
    assert not (tmp_path / "s").exists() and not (tmp_path / "k").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_an_sft_run_interrupted_on_cuda_resumes_on_the_cpu(setting, tmp_path, interrupted_sft):
    data, _ = setting
    cfg = SFTConfig(
        data=str(data), model="quick-student", vocab_size=280, device="cuda", dtype="bf16", **SMALL
    )
    cfg = cfg.replace(steps=4)
    interrupted_sft(cfg, tmp_path / "r", at=2)
    resumed = SFTRecipe(cfg.replace(device="cpu"), tmp_path / "r", resume=True).setup()
    assert resumed.start_step == 2
    summary = resumed.train()
    assert len(summary["history"]) == 4 and summary["optimizer_steps"] == 4
