"""KD recipes count their compute where it happens; KA takes one update per step (EEM's averaged repeats)."""

import copy
import json
import random

import pytest
import torch

from moe_understudy.config import KDConfig
from moe_understudy.data.tokenizer import train_bpe
from moe_understudy.kd import losses
from moe_understudy.kd.common import lm_logits
from moe_understudy.kd.teachers import routing_mode
from moe_understudy.kd.trainer import KDRecipe
from moe_understudy.moe.presets import build_model, tiny_config

WORDS = "red blue green cat dog bird sun moon tree lake".split()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A saved tiny Mixtral teacher with its BPE and an instruction file."""
    tmp = tmp_path_factory.mktemp("kdcompute")
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rows.append({"task": "copy", "prompt": f"copy {a} {b}", "response": f"{a} {b}"})
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = tmp / "teacher"
    tok = train_bpe([f"{r['prompt']} {r['response']}" for r in rows], 280, teacher)
    build_model(tiny_config("mixtral", vocab_size=len(tok)), seed=0).save_pretrained(str(teacher))
    return data, teacher


def _cfg(setting, **kw):
    data, teacher = setting
    base = dict(
        data=str(data),
        teacher=str(teacher),
        student="quick-student",
        steps=2,
        batch_size=2,
        val_examples=2,
        max_prompt=12,
        max_total=20,
        gen_max_new_tokens=3,
        max_new_tokens=2,
        eval_every=2,
    )
    return KDConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "per_step"),
    [
        (dict(method="kd"), 1),
        (dict(method="gkd"), 1),
        (dict(method="ka", ka_passes=3), 3),
        (dict(method="kd", teacher_passes=3), 3),
        (dict(method="gkd", teacher_passes=3), 3),
        (dict(method="sar"), 2),  # router step + student step, one teacher forward each
    ],
)
def test_every_method_counts_one_optimizer_step_per_step_and_its_teacher_forwards(
    setting, tmp_path, kw, per_step
):
    cfg = _cfg(setting, **kw)
    summary = KDRecipe(cfg, tmp_path / "run").setup().train()
    assert summary["optimizer_steps"] == cfg.steps
    assert summary["teacher_forwards"] == per_step * cfg.steps * cfg.batch_size
    assert [h["optimizer_steps"] for h in summary["history"]] == [1, 2]
    if cfg.method == "sar":
        assert summary["router_optimizer_steps"] == cfg.steps
    log = json.loads((tmp_path / "run" / "kd_log.json").read_text())
    assert log["teacher_forwards"] == summary["teacher_forwards"]


def test_counters_survive_a_resume(setting, tmp_path):
    cfg = _cfg(setting, method="ka", ka_passes=2, steps=4)
    recipe = KDRecipe(cfg, tmp_path / "run").setup()
    original = recipe._train_step

    def stop_at_step_3(step, examples):
        if step == 2:
            raise KeyboardInterrupt
        return original(step, examples)

    recipe._train_step = stop_at_step_3
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    summary = KDRecipe(cfg, tmp_path / "run", resume=True).setup().train()
    assert summary["optimizer_steps"] == 4 and summary["teacher_forwards"] == 2 * 4 * 2


def test_teacher_passes_draws_that_many_batches_of_distinct_examples(setting, tmp_path):
    recipe = KDRecipe(_cfg(setting, method="kd", teacher_passes=3), tmp_path / "run").setup()
    assert recipe._examples_per_step() == 6
    with pytest.raises(ValueError, match="teacher_passes"):
        _cfg(setting, method="ka", teacher_passes=2)


def test_ka_one_update_is_the_step_on_the_averaged_objective_not_m_steps(setting, tmp_path):
    # lambda = 1: every token's experts are sampled, so the three teacher passes differ.
    cfg = _cfg(setting, method="ka", ka_passes=3, ka_lambda=1.0, on_policy=False, lr=1e-2, warmup=1)
    recipe = KDRecipe(cfg, tmp_path / "run").setup()
    for group in recipe.optimizer.param_groups:
        group["lr"] = cfg.lr
    examples = recipe.train_examples[: cfg.batch_size]
    batch = recipe._batch(examples)
    ids, att, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
    start = copy.deepcopy(recipe.model)
    gen_state = recipe.generator.get_state()

    recipe._train_step(0, examples)
    assert all(s["step"] == 1 for s in recipe.optimizer.state.values())

    def teacher_passes(gen):
        out = []
        for _ in range(cfg.ka_passes):
            with torch.no_grad(), routing_mode(recipe.teacher, "ka", ka_lambda=1.0, generator=gen):
                out.append(lm_logits(recipe.teacher, ids, att)[:, :-1][target][:, : recipe.vocab])
        return out

    def student_loss(student, t_logits):
        s_logits = lm_logits(student, ids, att)[:, :-1][target][:, : recipe.vocab]
        return losses.averaged_divergence("rkl", s_logits, t_logits)

    def updated(n_updates: int):
        """The student after one step on the averaged loss (1) or, the old way, one step per pass (M)."""
        student = copy.deepcopy(start).train()
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(0)
        gen.set_state(gen_state)
        t_logits = teacher_passes(gen)
        assert not torch.equal(t_logits[0], t_logits[1])
        chunks = [t_logits] if n_updates == 1 else [[t] for t in t_logits]
        for chunk in chunks:
            student_loss(student, chunk).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return student.state_dict()

    got = recipe.model.state_dict()
    one, old = updated(1), updated(cfg.ka_passes)
    assert all(torch.allclose(got[k], one[k], atol=1e-6) for k in got)
    assert not all(torch.allclose(got[k], old[k], atol=1e-6) for k in got)
