import math

import torch

from moe_understudy.kd import losses


def _logits(*probs):
    return torch.tensor(probs).log()


def test_masked_mean_of_an_empty_mask_is_zero_and_differentiable():
    x = torch.randn(3, 4, requires_grad=True)
    out = losses.masked_mean(x, torch.zeros(3, 4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()


def test_forward_kl_matches_the_closed_form():
    p, q = [0.5, 0.5], [0.25, 0.75]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = losses.forward_kl(student_logits=_logits(q), teacher_logits=_logits(p))
    assert abs(got.item() - expected) < 1e-6


def test_reverse_kl_weighs_by_the_student():
    p, q = [0.5, 0.5], [0.25, 0.75]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = losses.reverse_kl(student_logits=_logits(q), teacher_logits=_logits(p))
    assert abs(got.item() - expected) < 1e-6


def test_skew_kls_mix_one_tenth_of_the_other_distribution():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    mix_f = 0.1 * p + 0.9 * q
    mix_r = 0.1 * q + 0.9 * p
    exp_f = (p * (p / mix_f).log()).sum().item()
    exp_r = (q * (q / mix_r).log()).sum().item()
    assert abs(losses.skew_forward_kl(q.log(), p.log()).item() - exp_f) < 1e-6
    assert abs(losses.skew_reverse_kl(q.log(), p.log()).item() - exp_r) < 1e-6
    assert losses.skew_forward_kl(q.log(), p.log()).item() < losses.forward_kl(q.log(), p.log()).item()


def test_masked_tokens_do_not_count():
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [10.0, -10.0]])  # second token far off
    mask = torch.tensor([True, False])
    assert losses.forward_kl(student, teacher, mask).item() < 1e-7
    assert losses.forward_kl(student, teacher).item() > 1.0


def test_divergences_are_zero_for_equal_logits_and_upcast_half_inputs():
    x = torch.randn(5, 11).half()
    for name in losses.DIVERGENCES:
        out = losses.divergence(name, x, x)
        assert out.dtype == torch.float32 and abs(out.item()) < 1e-5


def test_router_entropy_of_a_uniform_router_is_log_e():
    assert abs(losses.router_entropy(torch.zeros(7, 8)).item() - math.log(8)) < 1e-6


def test_entropy_floor_penalises_only_concentrated_routers():
    uniform = torch.zeros(4, 4)
    peaked = torch.tensor([[20.0, 0.0, 0.0, 0.0]] * 4)
    floor = 0.5 * math.log(4)
    assert losses.entropy_floor_penalty(uniform, floor).item() == 0.0
    assert abs(losses.entropy_floor_penalty(peaked, floor).item() - floor**2) < 1e-4


def test_load_balancing_loss_is_zero_when_balanced_and_three_when_one_expert_takes_all():
    balanced = losses.load_balancing_loss(torch.zeros(8, 4), torch.arange(8)[:, None] % 4)
    collapsed = losses.load_balancing_loss(torch.zeros(8, 4), torch.zeros(8, 1, dtype=torch.long))
    assert balanced.item() < 1e-8
    # counts (8, 0, 0, 0): CV^2 = 3; importance is uniform: CV^2 = 0
    assert abs(collapsed.item() - 3.0) < 1e-5


def test_load_balancing_loss_has_a_gradient_through_the_gate_probabilities():
    logits = torch.randn(16, 4, requires_grad=True)
    losses.load_balancing_loss(logits, logits.topk(2).indices).backward()
    assert logits.grad.abs().sum() > 0


def test_averaged_divergence_is_the_mean_of_the_per_pass_divergences():
    student = torch.randn(6, 9)
    passes = [torch.randn(6, 9) for _ in range(3)]
    mask = torch.tensor([True, True, False, True, True, True])
    for name in losses.DIVERGENCES:
        expected = sum(losses.divergence(name, student, t, mask) for t in passes) / 3
        torch.testing.assert_close(losses.averaged_divergence(name, student, passes, mask), expected)


def test_averaged_forward_kl_has_the_gradient_of_kl_to_the_averaged_teacher():
    student = torch.randn(5, 7, requires_grad=True)
    passes = [torch.randn(5, 7) for _ in range(4)]
    losses.averaged_divergence("fkl", student, passes).backward()
    averaged_grad = student.grad.clone()
    student.grad = None
    mean_p = torch.stack([torch.softmax(t, -1) for t in passes]).mean(0)
    losses.forward_kl(student, mean_p.log()).backward()
    torch.testing.assert_close(averaged_grad, student.grad)


def test_router_probs_match_the_adapters_routing_probs_for_both_scoring_functions():
    from moe_understudy.moe.adapters import Routing

    logits = torch.randn(5, 8)
    idx = logits.topk(2).indices
    for scores in ("softmax", "sigmoid"):
        expected = Routing(logits, idx.float(), idx, scores=scores).probs()
        torch.testing.assert_close(losses.router_probs(logits, scores), expected)


def test_load_balancing_loss_uses_the_given_scoring_function():
    logits = torch.randn(32, 8) * 3
    idx = logits.topk(2).indices
    sig = torch.sigmoid(logits)
    importance = (sig / sig.sum(-1, keepdim=True)).sum(0)
    counts = torch.bincount(idx.reshape(-1), minlength=8).float()
    cv2 = lambda x: x.var(unbiased=False) / x.mean() ** 2  # noqa: E731
    expected = cv2(counts) + cv2(importance)
    got = losses.load_balancing_loss(logits, idx, scores="sigmoid")
    assert abs(got.item() - expected.item()) < 1e-5
    assert abs(got.item() - losses.load_balancing_loss(logits, idx).item()) > 1e-3
