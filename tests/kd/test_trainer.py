import torch

from moe_understudy.kd.teachers import router_parameters
from moe_understudy.kd.trainer import grouped_router_log_probs, sar_router_step
from moe_understudy.moe.presets import build_model, preset_config, tiny_config

VOCAB = 97


def _pair():
    teacher = build_model(tiny_config("mixtral", vocab_size=VOCAB), seed=0).requires_grad_(False)
    student = build_model(preset_config("quick-student", VOCAB, max_positions=64), seed=1)
    return teacher, student


def _batch():
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    target = torch.zeros(2, 9, dtype=torch.bool)
    target[:, 5:] = True  # the last four tokens are the "response"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}


def _router_optimizer(teacher, lr=1e-2):
    params = router_parameters(teacher)
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def test_sar_router_step_changes_only_the_teachers_router_weights():
    teacher, student = _pair()
    opt = _router_optimizer(teacher)
    router_ids = {id(p) for p in router_parameters(teacher)}
    t_before = {n: p.clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.clone() for n, p in student.named_parameters()}
    sar_router_step(teacher, student, _batch(), opt, beta=0.01, vocab=VOCAB)
    changed = {n for n, p in teacher.named_parameters() if not torch.equal(p, t_before[n])}
    routers = {n for n, p in teacher.named_parameters() if id(p) in router_ids}
    assert changed == routers and len(routers) == 2
    assert all(torch.equal(p, s_before[n]) for n, p in student.named_parameters())


def test_sar_router_steps_pull_the_all_expert_teacher_toward_the_student():
    teacher, student = _pair()
    opt = _router_optimizer(teacher, lr=5e-2)
    first = sar_router_step(teacher, student, _batch(), opt, beta=0.0, vocab=VOCAB)["router_kl"]
    for _ in range(5):
        last = sar_router_step(teacher, student, _batch(), opt, beta=0.0, vocab=VOCAB)["router_kl"]
    assert last < first


def test_grouped_router_probabilities_sum_contiguous_teacher_experts():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    grouped = grouped_router_log_probs(logits, student_experts=2).exp()
    torch.testing.assert_close(grouped, torch.tensor([[0.3, 0.7]]))


def test_sar_balance_term_uses_deepseek_v3_sigmoid_scores_not_softmax():
    from moe_understudy.kd import losses
    from moe_understudy.kd.common import lm_logits
    from moe_understudy.kd.teachers import RoutingRecorder, routing_mode
    from moe_understudy.kd.trainer import router_scores

    teacher = build_model(tiny_config("deepseek_v3", vocab_size=VOCAB), seed=0).requires_grad_(False)
    student = build_model(preset_config("quick-student", VOCAB, max_positions=64), seed=1)
    assert set(router_scores(teacher).values()) == {"sigmoid"}
    with torch.no_grad():  # a freshly initialised router is near uniform; sharpen it so the scores differ
        for p in router_parameters(teacher):
            p.mul_(20.0)
    batch = _batch()
    rec = RoutingRecorder()
    with torch.no_grad(), routing_mode(teacher, "all", rec):
        lm_logits(teacher, batch["input_ids"], batch["attention_mask"])
    tokens = batch["attention_mask"].reshape(-1).bool()

    def balance(scores):
        return torch.stack(
            [
                losses.load_balancing_loss(rec.logits(i), rec.native_indices(i), tokens, scores=scores)
                for i in rec.layers()
            ]
        ).mean()

    sigmoid, softmax = balance("sigmoid").item(), balance("softmax").item()
    assert abs(sigmoid - softmax) > 1e-2  # the check below can tell the two apart
    got = sar_router_step(teacher, student, batch, _router_optimizer(teacher), beta=0.01, vocab=VOCAB)
    assert abs(got["balance"] - sigmoid) < 1e-5
