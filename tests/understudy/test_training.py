"""Layer-wise fitting, end-to-end KL training, joint hook: each reduces what it optimises."""

from __future__ import annotations

import pytest
import torch

from moe_understudy.config import EndToEndConfig
from moe_understudy.moe.adapters import find_moe_layers
from moe_understudy.moe.presets import build_model, tiny_config
from moe_understudy.understudy.e2e import replacement_kl, train_end_to_end
from moe_understudy.understudy.joint import JointUnderstudies, JointUnderstudyCallback
from moe_understudy.understudy.layerwise import fit_layer, held_out_error
from moe_understudy.understudy.losses import cosine_loss
from moe_understudy.understudy.modules import build_understudy
from moe_understudy.understudy.replace import substituted


@pytest.mark.parametrize(
    ("arch", "loss"), [("dense", "mse"), ("lowrank", "relative"), ("shadows", "relative")]
)
def test_layerwise_training_reduces_held_out_error(tiny_layer, routed_rows, arch, loss):
    train, val = routed_rows(tiny_layer, n=1024, seed=1), routed_rows(tiny_layer, n=256, seed=2)
    kw = {"init": "random", "width": 8} if arch == "shadows" else {}
    module = build_understudy(arch, tiny_layer, seed=0, **kw)
    fit = fit_layer(
        module, train, val, loss=loss, steps=100, batch_tokens=256, lr=3e-3, warmup=10, eval_every=50
    )
    assert fit.val_error < 0.7 * fit.val_error_start
    assert held_out_error(module, val) == pytest.approx(fit.val_error, rel=1e-5)  # best weights are kept


def test_layerwise_cosine_training_aligns_directions(tiny_layer, routed_rows):
    train, val = routed_rows(tiny_layer, n=1024, seed=1), routed_rows(tiny_layer, n=256, seed=2)
    module = build_understudy("dense", tiny_layer, seed=0)
    with torch.no_grad():
        before = cosine_loss(module(val["x"]), val["y"]).item()
    fit_layer(
        module, train, val, loss="cosine", steps=100, batch_tokens=256, lr=1e-2, warmup=10, eval_every=100
    )
    with torch.no_grad():
        assert cosine_loss(module(val["x"]), val["y"]).item() < 0.85 * before


def test_early_stop_keeps_the_best_weights_and_stops_when_nothing_improves(tiny_layer, routed_rows):
    rows = routed_rows(tiny_layer, n=256)
    module = build_understudy(
        "small_moe", tiny_layer, num_experts=4, intermediate=32, top_k=2, init="teacher"
    )
    fit = fit_layer(module, rows, rows, steps=1000, lr=1e-2, eval_every=10, patience=2)
    assert fit.val_error_start < 1e-10  # exact copy
    assert fit.steps == 20  # two checks without improvement
    assert held_out_error(module, rows) < 1e-10  # the exact copy is what is kept


def test_full_substitution_with_an_exact_copy_changes_nothing(tiny_model):
    understudies = {
        ly.index: build_understudy("small_moe", ly, num_experts=4, intermediate=32, top_k=2, init="teacher")
        for ly in find_moe_layers(tiny_model)
    }
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_model(input_ids=ids).logits
        with substituted(tiny_model, understudies, fraction=1.0):
            got = tiny_model(input_ids=ids).logits
        again = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, want)  # the model is restored


def test_full_substitution_works_on_a_model_that_collects_router_logits():
    config = tiny_config("mixtral")
    config.output_router_logits = True  # the aux loss needs every layer's router logits
    model = build_model(config, seed=0)
    understudies = {ly.index: build_understudy("dense", ly) for ly in find_moe_layers(model)}
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad(), substituted(model, understudies, fraction=1.0):
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("arch", ["dense", "shadows"])
def test_partial_substitution_serves_some_tokens_from_the_understudy(tiny_model, arch):
    understudies = {
        ly.index: build_understudy(arch, ly, seed=0, init="random")
        if arch == "shadows"
        else build_understudy(arch, ly, seed=0)
        for ly in find_moe_layers(tiny_model)
    }
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(input_ids=ids).logits
        with substituted(tiny_model, understudies, fraction=0.0):
            none = tiny_model(input_ids=ids).logits
        with substituted(tiny_model, understudies, fraction=0.5):
            half = tiny_model(input_ids=ids).logits
        with substituted(tiny_model, understudies, fraction=1.0):
            every = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(none, full, rtol=1e-5, atol=1e-6)
    assert (half - full).abs().max() > 1e-3
    assert (half - every).abs().max() > 1e-3


@pytest.mark.parametrize("cache", [True, False])
def test_end_to_end_reduces_the_kl_it_optimises(cache):
    model = build_model(tiny_config("mixtral", num_layers=2), seed=0)
    understudies = {
        ly.index: build_understudy("dense", ly, seed=0, intermediate=16) for ly in find_moe_layers(model)
    }
    blocks = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = EndToEndConfig(
        steps=60,
        blocks=8,
        batch_size=4,
        lr=3e-3,
        warmup=5,
        fraction_min=1.0,
        fraction_max=1.0,
        eval_blocks=8,
        cache_teacher=cache,
    )
    params_before = [p.clone() for p in model.parameters()]
    result = train_end_to_end(model, understudies, blocks, cfg)
    assert result.kl_after < 0.5 * result.kl_before
    assert result.kl_after == pytest.approx(replacement_kl(model, understudies, blocks), rel=1e-4)
    assert all(
        torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True)
    )  # teacher frozen
    assert all(p.requires_grad for p in model.parameters())  # and given back as it was


def test_end_to_end_with_reverse_kl_and_hidden_term_also_reduces_its_kl():
    model = build_model(tiny_config("qwen2_moe", num_layers=2), seed=0)
    understudies = {ly.index: build_understudy("lowrank", ly, seed=0) for ly in find_moe_layers(model)}
    blocks = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = EndToEndConfig(
        steps=40,
        blocks=8,
        batch_size=4,
        lr=3e-3,
        warmup=5,
        direction="reverse",
        hidden_weight=0.5,
        eval_blocks=8,
    )
    result = train_end_to_end(model, understudies, blocks, cfg)
    assert result.kl_after < 0.7 * result.kl_before


def _e2e_setup():
    model = build_model(tiny_config("mixtral", num_layers=2), seed=0)
    understudies = {
        ly.index: build_understudy("dense", ly, seed=0, intermediate=16) for ly in find_moe_layers(model)
    }
    blocks = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    # Half substitution: the per-layer draws are state the checkpoint must carry too.
    cfg = EndToEndConfig(
        steps=20, blocks=8, batch_size=4, lr=3e-3, warmup=3, fraction_min=0.3, fraction_max=0.7,
        eval_blocks=4, checkpoint_every=5,
    )  # fmt: skip
    return model, understudies, blocks, cfg


def _interrupt_at_step_13(monkeypatch, model, understudies, blocks, cfg, ckpt) -> None:
    """Run the end-to-end stage with checkpoints until a KeyboardInterrupt at step 13."""
    import moe_understudy.understudy.e2e as e2e_mod

    real_lr = e2e_mod.warmup_cosine

    def crash_at_step_13(step, *args):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(e2e_mod, "warmup_cosine", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train_end_to_end(model, understudies, blocks, cfg, checkpoint=ckpt)
    monkeypatch.setattr(e2e_mod, "warmup_cosine", real_lr)


def test_interrupted_end_to_end_resumes_from_its_checkpoint_to_the_same_understudies(tmp_path, monkeypatch):

    model, straight, blocks, cfg = _e2e_setup()
    train_end_to_end(model, straight, blocks, cfg)

    model, resumed, blocks, cfg = _e2e_setup()
    ckpt = tmp_path / "e2e.pt"
    _interrupt_at_step_13(monkeypatch, model, resumed, blocks, cfg, ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 10  # the last checkpoint before the crash

    model, resumed, blocks, cfg = _e2e_setup()  # a fresh process: understudies at their initial weights
    result = train_end_to_end(model, resumed, blocks, cfg, checkpoint=ckpt)
    assert not ckpt.exists()  # removed once the stage ends
    assert [s for s, _ in result.history] == list(range(1, 21))
    for k in straight:
        for a, b in zip(straight[k].state_dict().values(), resumed[k].state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_end_to_end_refuses_in_one_sentence_a_checkpoint_whose_optimizer_state_has_another_layout(
    tmp_path, monkeypatch
):
    from moe_understudy.errors import UserError

    model, understudies, blocks, cfg = _e2e_setup()
    ckpt = tmp_path / "e2e.pt"
    _interrupt_at_step_13(monkeypatch, model, understudies, blocks, cfg, ckpt)
    saved = torch.load(ckpt, weights_only=False)
    for state in saved["optimizer"]["state"].values():  # moments of an older, transposed layout
        state["exp_avg"] = state["exp_avg"].reshape(-1)
    torch.save(saved, ckpt)

    model, understudies, blocks, cfg = _e2e_setup()
    with pytest.raises(UserError, match="another shape .* delete it and rerun with --resume"):
        train_end_to_end(model, understudies, blocks, cfg, checkpoint=ckpt)
    assert ckpt.exists()  # nothing saved is lost


def test_end_to_end_refuses_a_checkpoint_from_other_settings_and_stops_on_nan(tmp_path, monkeypatch):
    import moe_understudy.understudy.e2e as e2e_mod
    from moe_understudy.errors import UserError

    model, understudies, blocks, cfg = _e2e_setup()
    ckpt = tmp_path / "e2e.pt"
    torch.save({"config": cfg.replace(lr=1.0).to_dict()}, ckpt)
    with pytest.raises(UserError, match="other settings"):
        train_end_to_end(model, understudies, blocks, cfg, checkpoint=ckpt)
    ckpt.unlink()

    monkeypatch.setattr(e2e_mod, "_step_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(UserError, match="became nan at step 1; lower --e2e-lr"):
        train_end_to_end(model, understudies, blocks, cfg, checkpoint=ckpt)


def test_joint_loss_trains_understudies_only_and_leaves_model_gradients_alone(tiny_model):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    tiny_model.zero_grad()
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()

    joint = JointUnderstudies(tiny_model, arch="dense", intermediate=16).attach()
    loss = tiny_model(input_ids=ids, labels=ids).loss + joint.loss()
    loss.backward()
    for a, p in zip(plain, tiny_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in joint.parameters())
    tiny_model.zero_grad()

    opt = torch.optim.AdamW(joint.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        with torch.no_grad():
            tiny_model(input_ids=ids)  # no-grad forwards are not recorded
        assert joint.loss().item() == 0.0
        tiny_model(input_ids=ids)
        value = joint.loss()
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first
    joint.detach()
    tiny_model(input_ids=ids)
    assert joint.loss().item() == 0.0  # detached: nothing recorded
    assert set(joint.understudies) == {ly.index for ly in find_moe_layers(tiny_model)}


def test_trainer_callback_steps_the_understudies_once_per_model_step(tiny_model):
    joint = JointUnderstudies(tiny_model, arch="dense", intermediate=8)
    callback = JointUnderstudyCallback(joint, lr=1e-2)
    before = [p.clone() for p in joint.parameters()]
    callback.on_train_begin(None, None, None)
    ids = torch.randint(0, 97, (2, 12))
    tiny_model(input_ids=ids)
    callback.on_step_end(None, None, None)
    assert callback.last_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, joint.parameters(), strict=True))
    logs = {}
    callback.on_log(None, None, None, logs=logs)
    assert logs["understudy_loss"] == callback.last_loss
    callback.on_train_end(None, None, None)
    tiny_model(input_ids=ids)
    assert joint.loss().item() == 0.0


def test_end_to_end_under_serving_overflow_trains_the_stand_in_on_what_the_policy_hands_it():
    from moe_understudy.runtime.layer import patch
    from moe_understudy.runtime.ledger import LoadRecorder

    model = build_model(tiny_config("mixtral", num_layers=2), seed=0)
    layers = find_moe_layers(model)
    trunks = {
        ly.index: build_understudy("trunk", ly, seed=0, usage=torch.ones(ly.num_experts)) for ly in layers
    }
    blocks = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    cfg = EndToEndConfig(
        steps=12, blocks=8, batch_size=4, lr=3e-3, warmup=2, eval_blocks=4, overflow="serving",
        policy="shadow", priority="score", cf_min=0.5, cf_max=1.0, hidden_weight=0.0,
    )  # fmt: skip
    before = {k: m.state_dict()["scale"].clone() for k, m in trunks.items()}
    result = train_end_to_end(model, trunks, blocks, cfg)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.history)
    assert any(not torch.equal(before[k], m.state_dict()["scale"]) for k, m in trunks.items())
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())  # the model is frozen
    rec = LoadRecorder()
    with torch.no_grad(), patch(model, trunks, policy="shadow", capacity_factor=0.5, recorder=rec):
        model(input_ids=blocks[:4])
    assert sum(s.shadow for s in rec.steps) > 0  # the policy hands the trunk overflow at these capacities
