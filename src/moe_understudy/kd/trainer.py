"""`understudy kd`: distil a whole MoE teacher into a dense or smaller MoE student.

One recipe (`KDRecipe`: setup / _loss_step / train / cleanup); the method only changes how the
teacher routes, which tokens are distilled and which extra terms are added. Per step, with
D the divergence (forward KL for `kd`, reverse KL `sum q (log q - log p)` otherwise):

- ``kd``:   D on the dataset's responses, teacher routes natively.
- ``gkd``:  D on responses the student samples itself (on-policy; `on_policy=False` uses the
  dataset's responses instead, the off-policy variant).
- ``all``:  as gkd, teacher runs every expert weighted by its full router softmax (router untouched).
- ``ka``:   as gkd, teacher in Knowledge-Augmentation mode (N-1 experts, sampled with prob lambda);
  M = `ka_passes` teacher passes over the same inputs per step, each with its own expert draws; the
  M divergences are averaged (`losses.averaged_divergence`, as EEM's code divides the summed repeat
  losses by M) into ONE backward and ONE optimiser step, so KA takes as many optimiser steps as KD.
- ``sar``:  first a teacher-router step (only gate weights, own AdamW at `sar_lr`, all experts
  active): minimise KL(teacher || student) with the student fixed + beta * load-balancing loss;
  then the student's D step against the teacher with all experts active under the updated router
  (see `sar_router_step` for the KL direction and its source).
- ``bdistill`` (MoE student; our formulation from B-Distill's public abstract):
  both models route by Monte-Carlo exploration (see kd/teachers.py);
  loss = D + router_kl_weight * sum_l KL(P_T,l || q_S,l) + entropy_weight * sum_l floor_l, where for
  student MoE layer l the aligned teacher layer is floor(l * L_T / L_S), P_T,l groups the teacher's E_T
  router probabilities into the student's E_S experts by contiguous blocks (teacher expert e counts for
  student expert floor(e * E_S / E_T)), q_S,l is the student router softmax, and
  floor_l = mean_t relu(entropy_floor * log E_S - H(q_S,l,t))^2 penalises routers that concentrate
  below the floor. Means run over attended tokens.

Compute matching. `teacher_passes` = M > 1 (kd, gkd) draws M x batch_size examples per step, runs
the teacher once over each of the M sub-batches and averages the M sub-batch losses into one update:
the same optimiser steps and the same teacher forwards as KA with ka_passes = M (M x batch_size
sequences per step), spent on M times as many distinct inputs instead of M expert draws of the
same ones (so the student also does M times KA's forward/backward, and gkd M times the sampling).
For a deterministic teacher, M passes over the *same* inputs would only repeat one result, which
is why the extra passes go to new inputs. Counts are taken where they happen (`counters`):
`optimizer_steps` by a hook on the student optimiser, `teacher_forwards` (sequences) by a forward
hook on the teacher, `router_optimizer_steps` (SAR) where the router optimiser steps. A teacher
forward is counted whatever it costs: ALL and SAR run all N experts and KA N-1, native routing top-k.

Device and dtype: the teacher and the student live on `--device` in fp32 (the student's master
weights; the teacher's routers are SAR's) and every forward, the student's sampling included, runs
under autocast to `--dtype` (see kd/common.py). The KA / exploration generator stays on the CPU
(kd/teachers.py draws there and moves the choices), so its draws are the same on every device.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from rich.console import Console

from moe_understudy.config import KDConfig
from moe_understudy.data.packing import prompt_ids_batch
from moe_understudy.errors import UserError
from moe_understudy.eval.generate import sample_continuations
from moe_understudy.kd import losses
from moe_understudy.kd.common import InstructionRecipe, dataset_batch, lm_logits, set_special_tokens
from moe_understudy.kd.teachers import RoutingRecorder, router_parameters, routing_mode
from moe_understudy.moe.adapters import UnsupportedModelError, find_moe_layers
from moe_understudy.moe.presets import PRESETS
from moe_understudy.precision import MixedPrecision, on_cpu, step_with_scaler

TEACHER_MODES = {"kd": None, "gkd": None, "all": "all", "ka": "ka", "sar": "all", "bdistill": "explore"}


def same_tokenizer(a, b) -> bool:
    """Two tokenizers agree when their vocabularies and special ids are identical."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def grouped_router_log_probs(teacher_logits: torch.Tensor, student_experts: int) -> torch.Tensor:
    """(T, E_T) teacher router logits -> (T, E_S) log of probabilities summed over contiguous expert groups."""
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    e_t = probs.shape[-1]
    group = torch.arange(e_t, device=probs.device) * student_experts // e_t  # (E_T,) student expert of each
    grouped = torch.zeros(probs.shape[0], student_experts, device=probs.device).index_add_(1, group, probs)
    return grouped.clamp_min(1e-12).log()


def _selected(logits: torch.Tensor, target: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, S, V) -> (N, V): predictions of the N target tokens, cut to the tokenizer's vocabulary."""
    return logits[:, :-1][target][:, :vocab]


def router_scores(teacher: torch.nn.Module) -> dict[int, str]:
    """Layer index -> the router's own scoring function ("softmax", or "sigmoid" for DeepSeek-V3).

    Read from the adapter's `Routing.scores` of one routing call on a zero token per layer.
    """
    out = {}
    for layer in find_moe_layers(teacher):
        w = next(layer.block.gate.parameters())
        with torch.no_grad():
            out[layer.index] = layer.route(
                torch.zeros(1, layer.hidden_size, dtype=w.dtype, device=w.device)
            ).scores
    return out


def sar_router_step(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    router_optimizer: torch.optim.Optimizer,
    beta: float,
    vocab: int,
    precision: MixedPrecision | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """SAR router step: with all experts active, move only the teacher's routers toward the fixed student.

    loss = KL(p_teacher || q_student) = sum p_T (log p_T - log q_S) over target tokens, gradient
    through the teacher's routers only (student logits detached), + beta * mean over layers of the
    load-balancing loss (CV^2 of the native top-k counts + CV^2 of the summed router probabilities,
    each router under its own scoring function: sigmoid for DeepSeek-V3, softmax otherwise).

    Direction: the KL is taken from the distribution being trained (the all-expert teacher) to the
    fixed target (the student), i.e. mode-seeking for the teacher: its routers are pushed to put the
    teacher's mass where the student already has mass, giving the student a target it can fit. This
    follows EEM's public code (github.com/gmkim-ai/MoEKD, finetune_sfr.py, HEAD 87d62d1): its teacher
    step calls get_distil_loss(..., is_teacher=True) with the default --teacher-kld-type "reverse",
    which computes sum softmax(teacher) * (log_softmax(teacher) - log_softmax(student)), plus the
    LLaMA-MoE gate's balance_loss (CV^2 of importance + load, weight 1e-2), on the student's samples.
    `router_optimizer` must hold the router parameters only; every other teacher parameter is
    expected frozen (requires_grad False), the student is not touched. `precision` runs the forwards
    under its autocast, `scaler` (float16) scales the loss of this optimiser's own step.
    """
    ids, att, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
    with contextlib.nullcontext() if precision is None else precision.autocast():
        with torch.no_grad():
            s_logits = _selected(lm_logits(student, ids, att), target, vocab)
        rec = RoutingRecorder()
        with routing_mode(teacher, "all", rec):
            t_logits = _selected(lm_logits(teacher, ids, att), target, vocab)
        kl = losses.forward_kl(
            s_logits, t_logits
        )  # KL(teacher || student); gradient reaches the routers only
        tokens = att.reshape(-1).bool()
        scores = router_scores(teacher)
        balance = torch.stack(
            [
                losses.load_balancing_loss(
                    rec.logits(layer), rec.native_indices(layer), tokens, scores=scores[layer]
                )
                for layer in rec.layers()
            ]
        ).mean()
        loss = kl + beta * balance
    router_optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        router_optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(router_optimizer)  # unscales first; skipped when a gradient overflowed
        scaler.update()
    router_optimizer.zero_grad(set_to_none=True)
    return {"router_kl": float(kl.detach()), "balance": float(balance.detach())}


class KDRecipe(InstructionRecipe):
    """Whole-model distillation; see the module docstring for each method."""

    kind = "kd"

    # ---- setup ----------------------------------------------------------------------------
    def _setup_models(self) -> None:
        from moe_understudy.kd.sft import model_for
        from moe_understudy.moe.loading import load_model_and_tokenizer

        cfg: KDConfig = self.cfg
        # fp32 on the run's device: under autocast it computes in --dtype, and SAR trains its routers
        self.teacher, self.tokenizer = load_model_and_tokenizer(cfg.teacher, device=self.precision.device)
        try:
            find_moe_layers(self.teacher)
        except UnsupportedModelError as err:
            raise UserError(
                f"The teacher {cfg.teacher} has no MoE layer; pass an MoE teacher (e.g. one made by `understudy sft --model mixtral`)."
            ) from err
        self.teacher.eval().requires_grad_(False)
        if cfg.student in PRESETS:
            self.model = model_for(cfg.student, self.tokenizer, cfg.max_total, cfg.seed)
        elif Path(cfg.student).expanduser().exists():
            self.model, student_tok = load_model_and_tokenizer(cfg.student)
            if not same_tokenizer(student_tok, self.tokenizer):
                raise UserError(
                    f"The student {cfg.student} uses a different tokenizer than the teacher {cfg.teacher}; "
                    f"start the student from a preset or a checkpoint trained with the teacher's tokenizer."
                )
            set_special_tokens(self.model, self.tokenizer)
        else:
            raise UserError(
                f"--student {cfg.student!r} is neither a preset ({', '.join(PRESETS)}) nor a saved model folder; pass one of those."
            )
        self.vocab = len(self.tokenizer)
        for name, m in (("teacher", self.teacher), ("student", self.model)):
            if m.config.vocab_size < self.vocab:
                raise UserError(
                    f"The {name}'s vocabulary ({m.config.vocab_size}) is smaller than the tokenizer's ({self.vocab}); use a model built for this tokenizer."
                )
        if cfg.method == "bdistill":
            try:
                self.student_layers = find_moe_layers(self.model)
            except UnsupportedModelError as err:
                raise UserError(
                    "B-Distill distils MoE to MoE; pass an MoE student (e.g. --student quick-moe-student)."
                ) from err
        self.router_optimizer = None
        if cfg.method == "sar":
            params = router_parameters(self.teacher)
            for p in params:
                p.requires_grad_(True)
            self.router_optimizer = torch.optim.AdamW(params, lr=cfg.sar_lr, weight_decay=0.0)
            self.router_scaler = self.precision.scaler()  # its own: the router step is a step of its own
            self.router_optimizer.register_step_post_hook(lambda *_: self._count("router_optimizer_steps"))
            self.counters["router_optimizer_steps"] = 0
        self.teacher.register_forward_hook(self._count_teacher_forward, with_kwargs=True)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # KA / exploration sampling

    def _count_teacher_forward(self, module, args, kwargs, output) -> None:
        """Forward hook: one teacher forward per sequence of the batch it ran on."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self._count("teacher_forwards", int(ids.shape[0]))

    def _examples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.teacher_passes

    def _extra_state(self) -> dict:
        if self.router_optimizer is None:
            return {"generator": self.generator.get_state()}
        extra = {
            "generator": self.generator.get_state(),
            "routers": [p.detach().to("cpu", copy=True) for p in router_parameters(self.teacher)],
            "router_optimizer": on_cpu(self.router_optimizer.state_dict()),
        }
        if self.router_scaler.is_enabled():
            extra["router_scaler"] = self.router_scaler.state_dict()
        return extra

    def _load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.router_optimizer is not None:
            with torch.no_grad():
                for p, saved in zip(router_parameters(self.teacher), state["routers"], strict=True):
                    p.copy_(saved)
            self.router_optimizer.load_state_dict(state["router_optimizer"])
            if "router_scaler" in state:
                self.router_scaler.load_state_dict(state["router_scaler"])

    # ---- batches --------------------------------------------------------------------------
    def _batch(self, examples) -> dict[str, torch.Tensor]:
        """Dataset responses (kd, off-policy) or student-sampled ones (on-policy)."""
        cfg: KDConfig = self.cfg
        if cfg.method == "kd" or not cfg.on_policy:
            batch = dataset_batch(examples, self.tokenizer, cfg.max_prompt, cfg.max_total)
            return self.to_device({k: batch[k] for k in ("input_ids", "attention_mask", "target_mask")})
        return self._student_batch([e.prompt for e in examples])

    def _student_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded prompts + the student's sampled responses (temperature 1, no top-k/p)."""
        cfg: KDConfig = self.cfg
        ids, att = prompt_ids_batch(prompts, self.tokenizer, max_prompt=cfg.max_prompt)
        ids, att = ids.to(self.precision.device), att.to(self.precision.device)
        budget = max(1, min(cfg.gen_max_new_tokens, cfg.max_total - ids.shape[1]))
        eos = int(self.tokenizer.eos_token_id)
        new, mask = sample_continuations(
            self.model,
            ids,
            att,
            eos_id=eos,
            pad_id=eos if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id,
            max_new_tokens=budget,
        )
        input_ids = torch.cat([ids, new], dim=1)  # (B, S + n)
        attention = torch.cat([att, mask.long()], dim=1)
        target = torch.cat([torch.zeros_like(att, dtype=torch.bool), mask], dim=1)[:, 1:]  # (B, S + n - 1)
        return {"input_ids": input_ids, "attention_mask": attention, "target_mask": target}

    # ---- losses ---------------------------------------------------------------------------
    def _teacher_context(self, recorder: RoutingRecorder | None = None):
        mode = TEACHER_MODES[self.cfg.method]
        if mode is None:
            return contextlib.nullcontext()
        return routing_mode(
            self.teacher,
            mode,
            recorder,
            ka_experts=self.cfg.ka_experts,
            ka_lambda=self.cfg.ka_lambda,
            explore_eps=self.cfg.explore_eps,
            generator=self.generator,
        )

    def _selected_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _selected(logits, target, self.vocab)

    def _loss_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One student loss with each term separately (`loss` is their weighted sum).

        KA runs the teacher `ka_passes` times over the batch (fresh expert draws each time) and
        averages the divergences (`losses.averaged_divergence`); every other method runs it once.
        """
        cfg: KDConfig = self.cfg
        ids, att, target = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        t_rec = RoutingRecorder() if cfg.method == "bdistill" else None
        passes = cfg.ka_passes if cfg.method == "ka" else 1
        t_passes = []
        for _ in range(passes):
            with torch.no_grad(), self._teacher_context(t_rec):
                t_passes.append(self._selected_logits(lm_logits(self.teacher, ids, att), target))
        if cfg.method == "bdistill":
            s_rec = RoutingRecorder()
            with routing_mode(
                self.model, "explore", s_rec, explore_eps=cfg.explore_eps, generator=self.generator
            ):
                s_logits = self._selected_logits(lm_logits(self.model, ids, att), target)
        else:
            s_logits = self._selected_logits(lm_logits(self.model, ids, att), target)
        terms = {"distill": losses.averaged_divergence(cfg.loss_divergence, s_logits, t_passes)}
        loss = terms["distill"]
        if cfg.method == "bdistill":
            router_kl, floor = self._router_terms(t_rec, s_rec, att.reshape(-1).bool())
            terms.update(router_kl=router_kl, entropy_floor=floor)
            loss = loss + cfg.router_kl_weight * router_kl + cfg.entropy_weight * floor
        terms["loss"] = loss
        return terms

    def _router_terms(self, t_rec: RoutingRecorder, s_rec: RoutingRecorder, tokens: torch.Tensor):
        """B-Distill: summed router KL to the aligned teacher layer and entropy-floor penalty."""
        t_layers, s_layers = t_rec.layers(), s_rec.layers()
        kl = floor = torch.zeros((), device=tokens.device)
        for j, s_layer in enumerate(s_layers):
            s_logits = s_rec.logits(s_layer)  # (T, E_S)
            e_s = s_logits.shape[-1]
            t_logits = t_rec.logits(t_layers[j * len(t_layers) // len(s_layers)]).detach()
            kl = kl + losses.router_kl(s_logits, grouped_router_log_probs(t_logits, e_s), tokens)
            floor = floor + losses.entropy_floor_penalty(
                s_logits, self.cfg.entropy_floor * math.log(e_s), tokens
            )
        return kl, floor

    def _router_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return sar_router_step(
            self.teacher,
            self.model,
            batch,
            self.router_optimizer,
            self.cfg.sar_beta,
            self.vocab,
            precision=self.precision,
            scaler=self.router_scaler,
        )

    # ---- one step -------------------------------------------------------------------------
    def _train_step(self, step: int, examples) -> dict[str, float]:
        """One optimiser step. With teacher_passes = M the M sub-batches' losses are averaged
        (gradients accumulated, each scaled by 1/M) before the single step."""
        cfg: KDConfig = self.cfg
        m, b = cfg.teacher_passes, cfg.batch_size
        logged: dict[str, float] = {}
        sums: dict[str, float] = {}
        for i in range(m):
            with self.precision.autocast():  # the student's sampling too
                batch = self._batch(examples[i * b : (i + 1) * b])
            if cfg.method == "sar":
                logged.update(self._router_step(batch))
            with self.precision.autocast():
                terms = self._loss_step(batch)
            self.scaler.scale(terms["loss"] / m).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / m
        step_with_scaler(self.scaler, self.optimizer, cfg.grad_clip, list(self.model.parameters()))
        self.optimizer.zero_grad(set_to_none=True)
        logged.update(sums)
        return logged


def run_kd(cfg: KDConfig, out_dir: str | Path, resume: bool = False, console: Console | None = None) -> dict:
    """Distil `cfg.teacher` into `cfg.student` by `cfg.method`; the best student by validation ROUGE-L lands in `out_dir`."""
    recipe = KDRecipe(cfg, out_dir, resume=resume, console=console).setup()
    return recipe.train()
