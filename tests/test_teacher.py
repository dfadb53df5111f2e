import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_understudy.teacher as teacher_mod
from moe_understudy.config import DataConfig, TeacherConfig
from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.loading import load_model_and_tokenizer
from moe_understudy.schedule import warmup_cosine
from moe_understudy.teacher import batch_indices, train_teacher


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small corpus of real Python source, so the tests need no download and stay fast."""
    import sysconfig
    from pathlib import Path

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["json/decoder.py", "json/encoder.py", "textwrap.py", "bisect.py", "heapq.py", "colorsys.py"]:
        (root / name.replace("/", "_")).write_text((stdlib / name).read_text())
    return root


def quick_cfg(corpus_dir, steps=24) -> TeacherConfig:
    return TeacherConfig(
        preset="quick",
        data=DataConfig(source=str(corpus_dir), vocab_size=300, block_size=32, val_fraction=0.2),
        steps=steps,
        batch_size=4,
        warmup=4,
        eval_every=8,
        eval_batches=2,
    )


def test_quick_teacher_trains_and_reopens_with_from_pretrained(tmp_path, corpus_dir):
    out = tmp_path / "t"
    result = train_teacher(quick_cfg(corpus_dir), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(find_moe_layers(model)) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_perplexity"] == pytest.approx(result.val_perplexity, rel=1e-3)
    assert result.val_perplexity < 300  # better than uniform over the 300-token vocabulary
    assert len(metrics["expert_load"]["max_over_mean_per_batch"]) == 2
    blocks = torch.load(out / "blocks.pt")
    assert metrics["data_sha256"] == teacher_mod.data_fingerprint(blocks["train"], blocks["val"])
    assert metrics["data_sha256"] != teacher_mod.data_fingerprint(blocks["train"][1:], blocks["val"])
    reopened, tokenizer = load_model_and_tokenizer(out)
    assert tokenizer.decode(tokenizer("def f(x): return x")["input_ids"]) == "def f(x): return x"


def test_interrupted_run_resumes_from_last_checkpoint_to_the_same_weights(tmp_path, corpus_dir, monkeypatch):
    cfg = quick_cfg(corpus_dir)
    straight = tmp_path / "straight"
    train_teacher(cfg, straight)

    interrupted = tmp_path / "interrupted"
    real_lr = teacher_mod.warmup_cosine

    def crash_at_step_13(step, *args):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(teacher_mod, "warmup_cosine", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, interrupted)
    monkeypatch.setattr(teacher_mod, "warmup_cosine", real_lr)
    state = torch.load(interrupted / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 8  # the last checkpoint before the crash
    with pytest.raises(UserError, match="--resume"):
        train_teacher(cfg, interrupted)
    train_teacher(cfg, interrupted, resume=True)

    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(interrupted).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_with_other_options_is_refused(tmp_path, corpus_dir):
    out = tmp_path / "t"
    train_teacher(quick_cfg(corpus_dir, steps=8), out)
    with pytest.raises(UserError, match="different configuration"):
        train_teacher(quick_cfg(corpus_dir, steps=8).replace(lr=1e-2), out, resume=True)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, corpus_dir):
    cfg = quick_cfg(corpus_dir, steps=40).replace(lr=1e6, warmup=1, grad_clip=1e9)
    out = tmp_path / "t"
    with pytest.raises(UserError, match="lower --lr"):
        train_teacher(cfg, out)


def test_learning_rate_warms_up_then_decays():
    cfg = TeacherConfig(steps=100, warmup=10, lr=1.0)
    assert warmup_cosine(0, cfg.steps, cfg.lr, cfg.warmup) == pytest.approx(0.1)
    assert warmup_cosine(9, cfg.steps, cfg.lr, cfg.warmup) == pytest.approx(1.0)
    assert (
        warmup_cosine(99, cfg.steps, cfg.lr, cfg.warmup)
        < warmup_cosine(50, cfg.steps, cfg.lr, cfg.warmup)
        < warmup_cosine(10, cfg.steps, cfg.lr, cfg.warmup)
    )
    assert warmup_cosine(100, cfg.steps, cfg.lr, cfg.warmup) == pytest.approx(0.1)


def test_batches_cover_each_epoch_without_repeats():
    seen = torch.cat([batch_indices(s, 20, 4, seed=0) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(20))
    assert batch_indices(7, 20, 4, seed=0).equal(batch_indices(7, 20, 4, seed=0))


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="understudy teacher"):
        load_model_and_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_model_and_tokenizer(tmp_path / "empty")


def test_joint_understudies_train_alongside_without_changing_the_teacher(tmp_path, corpus_dir):
    from moe_understudy.understudy.io import load_understudies

    cfg = quick_cfg(corpus_dir, steps=8).replace(grad_clip=0.05)  # clipping active at every step
    train_teacher(cfg, tmp_path / "alone")
    train_teacher(cfg.replace(joint_understudy="dense"), tmp_path / "joint")
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "alone")
    joint = AutoModelForCausalLM.from_pretrained(tmp_path / "joint")
    for (name, a), b in zip(alone.state_dict().items(), joint.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    understudies = load_understudies(tmp_path / "joint" / "understudies", joint)
    assert sorted(understudies) == [layer.index for layer in find_moe_layers(joint)]


def test_metrics_report_imbalance_and_the_hottest_experts_share_per_layer(tmp_path, corpus_dir):
    out = tmp_path / "t"
    train_teacher(quick_cfg(corpus_dir, steps=8), out)
    load = json.loads((out / "metrics.json").read_text())["expert_load"]
    counts = torch.tensor(load["tokens_per_expert"], dtype=torch.float64)
    assert len(load["max_over_mean_pooled"]) == len(load["hottest_expert_share"]) == 2
    expected = counts.max(dim=1).values / counts.sum(dim=1)
    assert load["hottest_expert_share"] == pytest.approx(expected.tolist(), abs=1e-4)
    num_experts = counts.shape[1]
    for share, ratio in zip(load["hottest_expert_share"], load["max_over_mean_pooled"], strict=True):
        assert 1 / num_experts <= share <= 1
        assert share == pytest.approx(ratio / num_experts, abs=1e-3)


def _snapshot_cfg(steps=12):
    cfg = TeacherConfig.quick()
    return cfg.replace(
        data=cfg.data.replace(max_chars=60_000, vocab_size=300, block_size=32),
        steps=steps,
        batch_size=4,
        warmup=2,
        eval_every=6,
        save_at=(3, 8),
    )


def test_save_at_writes_reopenable_snapshots_with_their_perplexity(tmp_path):
    out = tmp_path / "t"
    cfg = _snapshot_cfg()
    train_teacher(cfg, out)
    final = AutoModelForCausalLM.from_pretrained(out)
    tokenizer_files = sorted(p.name for p in out.iterdir() if p.name.startswith("tokenizer"))
    assert "tokenizer.json" in tokenizer_files
    snapshots = {}
    for step in (3, 8):
        snap = teacher_mod.snapshot_dir(out, step)
        assert snap == out / f"at-{step}"
        model = AutoModelForCausalLM.from_pretrained(snap)
        assert len(find_moe_layers(model)) == len(find_moe_layers(final))
        for name in tokenizer_files:
            assert (snap / name).read_bytes() == (out / name).read_bytes(), name
        _, tokenizer = load_model_and_tokenizer(snap)
        assert tokenizer.decode(tokenizer("x = 1")["input_ids"]) == "x = 1"
        metrics = json.loads((snap / "metrics.json").read_text())
        assert metrics["step"] == step and metrics["train_tokens"] == step * 4 * 32
        assert 1 < metrics["val_perplexity"] < 300
        snapshots[step] = model.state_dict()
    assert not list(out.glob("*.tmp"))
    # Different training lengths, different weights.
    key = next(k for k in snapshots[3] if "experts" in k)
    assert not snapshots[3][key].equal(snapshots[8][key])
    assert not snapshots[8][key].equal(final.state_dict()[key])


def test_resume_keeps_existing_snapshots_and_writes_the_missing_ones(tmp_path, monkeypatch):
    cfg = _snapshot_cfg()
    straight = tmp_path / "straight"
    train_teacher(cfg, straight)

    out = tmp_path / "interrupted"
    real_lr = teacher_mod.warmup_cosine

    def crash_at_step_7(step, *args):  # step 7 is the 8th: after at-3 and the step-6 checkpoint
        if step == 7:
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(teacher_mod, "warmup_cosine", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(cfg, out)
    monkeypatch.setattr(teacher_mod, "warmup_cosine", real_lr)
    assert (out / "at-3" / "config.json").exists() and not (out / "at-8").exists()
    written = {p.name: p.stat().st_mtime_ns for p in (out / "at-3").iterdir()}

    saved = []
    real_save = teacher_mod._save_snapshot
    monkeypatch.setattr(
        teacher_mod,
        "_save_snapshot",
        lambda model, tok, step, *a: saved.append(step) or real_save(model, tok, step, *a),
    )
    train_teacher(TeacherConfig.from_yaml(out / "teacher.yaml"), out, resume=True)  # the same save_at
    assert saved == [8]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "at-3").iterdir()} == written
    for step in (3, 8):
        for tok_file in out.glob("tokenizer*"):
            assert (out / f"at-{step}" / tok_file.name).read_bytes() == tok_file.read_bytes()
        a = AutoModelForCausalLM.from_pretrained(straight / f"at-{step}").state_dict()
        b = AutoModelForCausalLM.from_pretrained(out / f"at-{step}").state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_save_at_outside_the_run_is_refused():
    with pytest.raises(ValueError, match="save_at"):
        TeacherConfig(steps=10, save_at=(5, 11))
    assert TeacherConfig(steps=10, save_at=(8, 4, 8)).save_at == (4, 8)
    cfg = TeacherConfig(steps=10, save_at=(4, 8))
    assert TeacherConfig.from_yaml(cfg.to_yaml()) == cfg


def test_in_loop_joint_training_serves_overflow_with_the_trunk_and_changes_the_model(tmp_path, corpus_dir):
    from moe_understudy.understudy.io import load_understudies

    base = quick_cfg(corpus_dir, steps=8)
    train_teacher(base, tmp_path / "base")
    cont = base.replace(
        steps=6, warmup=1, eval_every=3, init_from=str(tmp_path / "base"), joint_understudy="trunk"
    )
    train_teacher(cont, tmp_path / "detached")
    train_teacher(cont.replace(joint_in_loop_from=2, joint_cf_min=0.5, joint_cf_max=0.5), tmp_path / "loop")
    detached = AutoModelForCausalLM.from_pretrained(tmp_path / "detached")
    loop = AutoModelForCausalLM.from_pretrained(tmp_path / "loop")
    started = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    # both continued from the saved teacher; only the in-loop run's language-model loss saw stand-ins
    assert any(
        not torch.equal(a, b) for a, b in zip(started.parameters(), detached.parameters(), strict=True)
    )
    assert any(not torch.equal(a, b) for a, b in zip(detached.parameters(), loop.parameters(), strict=True))
    assert sorted(load_understudies(tmp_path / "loop" / "understudies", loop)) == [0, 1]
    assert json.loads((tmp_path / "loop" / "metrics.json").read_text())["val_perplexity"] > 0


def test_in_loop_joint_training_needs_a_stand_in_and_init_from_a_saved_model(tmp_path, corpus_dir):
    with pytest.raises(ValueError, match="joint_understudy"):
        quick_cfg(corpus_dir).replace(joint_in_loop_from=2)
    with pytest.raises(UserError, match="init-from"):
        train_teacher(quick_cfg(corpus_dir).replace(init_from=str(tmp_path / "nowhere")), tmp_path / "t")


# ---- --dtype / --device: fp32 master weights, forwards under autocast --------------------------------

NO_GPU = "no CUDA device here: the CUDA case of teacher training runs on a machine with a GPU"


def _forward_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """(logits dtype, lm_head weight dtype) of every training forward of the next teacher built."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real_build = teacher_mod.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        head = model.get_output_embeddings()
        head.register_forward_hook(
            lambda m, _i, out: seen.append((out.dtype, m.weight.dtype)) if m.training else None
        )
        return model

    monkeypatch.setattr(teacher_mod, "build_model", build_and_watch)
    return seen


def test_teacher_trains_in_bfloat16_under_autocast_with_fp32_weights(tmp_path, corpus_dir, monkeypatch):
    from safetensors.torch import load_file

    cfg = quick_cfg(corpus_dir, steps=8).replace(dtype="bf16")
    assert cfg.dtype == "bfloat16"  # the alias, written in full
    seen = _forward_dtypes(monkeypatch)
    out = tmp_path / "t"
    result = train_teacher(cfg, out)

    assert seen and set(seen) == {(torch.bfloat16, torch.float32)}  # bf16 compute, fp32 weights
    assert 1 < result.val_perplexity < float("inf")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "bfloat16" and metrics["device"] == "cpu"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert "scaler" not in state  # bf16 needs no loss scaling
    assert TeacherConfig.from_yaml(out / "teacher.yaml") == cfg
    # the device is where the run trains, not what it trains: a resume may change it (auto is the cpu here)
    more = train_teacher(cfg.replace(steps=10, device="auto"), out, resume=True)
    assert more.steps == 10 and 1 < more.val_perplexity < float("inf")


def test_teacher_float16_scales_the_loss_and_keeps_the_scale_in_its_checkpoint(tmp_path, corpus_dir):
    out = tmp_path / "t"
    result = train_teacher(quick_cfg(corpus_dir, steps=4).replace(dtype="float16", eval_every=4), out)
    assert 1 < result.val_perplexity < float("inf")
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0


def test_an_unknown_device_is_one_sentence_before_the_run_folder_exists(tmp_path, corpus_dir):
    with pytest.raises(UserError, match=r"^Unknown device 'tpu9'; use cpu, cuda, cuda:N or auto\.$"):
        train_teacher(quick_cfg(corpus_dir).replace(device="tpu9"), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match="dtype must be one of"):
        quick_cfg(corpus_dir).replace(dtype="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_teacher_trains_on_cuda_and_its_checkpoint_resumes_on_the_cpu(tmp_path, corpus_dir, monkeypatch):
    cfg = quick_cfg(corpus_dir, steps=8).replace(device="cuda", dtype="bfloat16")
    seen = _forward_dtypes(monkeypatch)
    out = tmp_path / "t"
    result = train_teacher(cfg, out)
    assert set(seen) == {(torch.bfloat16, torch.float32)} and 1 < result.val_perplexity < float("inf")
    assert json.loads((out / "metrics.json").read_text())["device"].startswith("cuda")
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)  # CPU copies: no map_location
    assert all(s["exp_avg"].device.type == "cpu" for s in state["optimizer"]["state"].values())
    more = train_teacher(cfg.replace(steps=10, device="cpu"), out, resume=True)
    assert 1 < more.val_perplexity < float("inf")
