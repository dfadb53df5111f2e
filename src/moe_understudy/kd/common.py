"""Pieces shared by the SFT and KD recipes: data, batches, schedule, forward, validation, checkpoints.

`InstructionRecipe` is the skeleton both recipes follow (torchtune style): `setup()` builds models,
data and optimisers (and resumes), `train()` runs the steps with periodic validation ROUGE-L, keeps
the best checkpoint (the model chosen by validation ROUGE-L is what lands in `out_dir`), and
`cleanup()` writes the summary. Subclasses provide `_setup_models`, `_trainable` and `_train_step`.

Compute is counted where it happens, never derived from the configuration: `counters` holds
`optimizer_steps` (a post-step hook on the student optimiser) and `teacher_forwards` (sequences the
distillation teacher ran a forward pass over; the KD recipe counts them with a forward hook, SFT has
no teacher). They go into every history record, the checkpoint and the summary.

`--device` / `--dtype` (`self.precision`, precision.py): the models, the optimiser state and each
batch live on the device; the trained weights stay fp32 and every forward (steps, sampling,
validation generation) runs under `precision.autocast()`; float16 scales the loss (`self.scaler`;
a step whose gradients overflow is skipped, and `optimizer_steps` counts only the steps taken).
Checkpoints hold CPU copies, so a run resumes on another device.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from moe_understudy.data.instructions import Example, load_instructions, shuffled
from moe_understudy.data.packing import IGNORE_INDEX, collate_instructions, encode_instruction
from moe_understudy.errors import UserError
from moe_understudy.eval.rouge import rouge_over_seeds
from moe_understudy.files import atomic_torch_save
from moe_understudy.precision import MixedPrecision, on_cpu
from moe_understudy.progress import stage_bar
from moe_understudy.schedule import warmup_cosine

CHECKPOINT_DIR = "checkpoint"  # resumable training state inside the run folder
STATE_FILE = "state.pt"


# ---- data -------------------------------------------------------------------------------------


def train_val_examples(
    data: str, fmt: str, val_data: str | None, val_examples: int, max_examples: int | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): `val_data` when given, else the last `val_examples` of a seeded shuffle of `data`."""
    examples = shuffled(load_instructions(data, fmt=fmt), seed=seed)
    if val_data:
        val = load_instructions(val_data, fmt=fmt)[:val_examples] if val_examples else []
        train = examples
    else:
        if val_examples >= len(examples):
            raise UserError(
                f"{data} holds {len(examples)} examples, not more than val_examples={val_examples}; "
                f"lower --val-examples or pass --val-data."
            )
        train, val = (examples[:-val_examples], examples[-val_examples:]) if val_examples else (examples, [])
    if max_examples is not None:
        train = train[:max_examples]
    return train, val


def step_examples(examples: Sequence[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of optimiser step `step`: epoch-wise seeded permutations, a pure function of step.

    Being a function of the step alone makes resumed runs see exactly the batches of an unbroken run.
    """
    n = len(examples)
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(examples[perm[i]])
    return out


def dataset_batch(
    examples: Sequence[Example], tokenizer, max_prompt: int, max_total: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response batch: input_ids, attention_mask, labels (B, S), target_mask (B, S-1).

    target_mask[b, t] is True where logits at t predict a response token (label of t+1 is kept).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate_instructions(
        [encode_instruction(e, tokenizer, max_prompt, max_total) for e in examples], pad
    )
    batch["target_mask"] = batch["labels"][:, 1:] != IGNORE_INDEX
    return batch


# ---- models -----------------------------------------------------------------------------------


def is_moe_config(model: nn.Module) -> bool:
    return hasattr(model.config, "output_router_logits")


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S, V) next-token logits; positions count only attended tokens, so left padding is harmless."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    extra = {"output_router_logits": False} if is_moe_config(model) else {}
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra
    ).logits


def set_special_tokens(model: nn.Module, tokenizer) -> None:
    """Make the model's config and generation config use the tokenizer's EOS / PAD."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = pad
        cfg.bos_token_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )


def validation_rouge(
    model: nn.Module, tokenizer, val: Sequence[Example], max_new_tokens: int, max_prompt: int
) -> float:
    """Greedy ROUGE-L F1 x100 on the validation examples (the checkpoint-selection metric)."""
    if not val:
        return float("nan")
    scores = rouge_over_seeds(
        model,
        tokenizer,
        val,
        greedy=True,
        max_new_tokens=max_new_tokens,
        max_prompt=max_prompt,
        batch_size=64,
    )
    return scores.overall[0]


def _fmt_terms(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items())


class InstructionRecipe:
    """Shared skeleton of the SFT and KD recipes (see the module docstring)."""

    kind = "train"

    def __init__(
        self, cfg, out_dir: str | Path, resume: bool = False, console: Console | None = None
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.start_step = 0
        self.best_rouge = -math.inf
        self.history: list[dict] = []
        self.counters: dict[str, int] = {"optimizer_steps": 0, "teacher_forwards": 0}

    # -- subclass hooks --
    def _setup_models(self) -> None:  # sets self.model (trained) and self.tokenizer
        raise NotImplementedError

    def _train_step(self, step: int, examples: list[Example]) -> dict[str, float]:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        return None

    def _examples_per_step(self) -> int:
        """Training examples drawn per optimiser step (KD's teacher_passes draws more)."""
        return self.cfg.batch_size

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch (built on the CPU) on the run's device."""
        return {k: v.to(self.precision.device) for k, v in batch.items()}

    # -- setup --
    def setup(self) -> InstructionRecipe:
        cfg = self.cfg
        self.precision = MixedPrecision.of(cfg.device, cfg.dtype)  # unknown device: one sentence, first
        torch.manual_seed(cfg.seed)
        ckpt = self.out_dir / CHECKPOINT_DIR / STATE_FILE
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not self.resume:
            if ckpt.exists():
                raise UserError(
                    f"{self.out_dir} already holds a {self.kind} run; pass --resume to continue it or choose another --out."
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup_models()
        self.model.to(self.precision.device)  # fp32 master weights (the forwards autocast)
        self.train_examples, self.val_examples = train_val_examples(
            cfg.data, cfg.fmt, cfg.val_data, cfg.val_examples, cfg.max_examples, cfg.seed
        )
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.optimizer.register_step_post_hook(lambda *_: self._count("optimizer_steps"))
        self.scaler = self.precision.scaler()
        if self.resume and ckpt.exists():
            self._load_checkpoint(ckpt)
        cfg.to_yaml(self.out_dir / f"{self.kind}.yaml")
        return self

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        # An older run's config gets the new fields' defaults; the device may change (CPU copies).
        saved = type(self.cfg).from_dict(state["config"])
        if saved.replace(device=self.cfg.device) != self.cfg:
            raise UserError(
                f"{self.out_dir} was started with a different configuration; resume with the same options or use another --out."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # onto the parameters' device
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.precision.set_rng_state(state)
        self.start_step = state["step"]
        self.best_rouge = state["best_rouge"]
        self.history = state["history"]
        torch.random.set_rng_state(state["rng"])
        self.counters.update(state.get("counters", {}))
        self._load_extra_state(state["extra"])
        self.console.print(
            f"resumed {self.kind} at step {self.start_step} (best val ROUGE-L {self.best_rouge:.2f})"
        )

    def _save_checkpoint(self, step: int) -> None:
        path = self.out_dir / CHECKPOINT_DIR
        path.mkdir(exist_ok=True)
        state = {
            "config": self.cfg.to_dict(),
            "model": on_cpu(self.model.state_dict()),
            "optimizer": on_cpu(self.optimizer.state_dict()),
            "step": step,
            "best_rouge": self.best_rouge,
            "history": self.history,
            "rng": torch.random.get_rng_state(),
            "counters": dict(self.counters),
            "extra": self._extra_state(),
            **self.precision.rng_state(),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        atomic_torch_save(state, path / STATE_FILE)

    def _save_best(self) -> None:
        self.model.save_pretrained(str(self.out_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(self.out_dir))

    # -- train --
    def train(self) -> dict:
        cfg = self.cfg
        self.model.train()
        bar = stage_bar(self.kind, "{task.fields[info]}", console=self.console, transient=True)
        with bar as progress:
            task = progress.add_task(self.kind, total=cfg.steps, completed=self.start_step, info="")
            for step in range(self.start_step, cfg.steps):
                lr = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                terms = self._train_step(
                    step, step_examples(self.train_examples, step, self._examples_per_step(), cfg.seed)
                )
                record = {"step": step + 1, "lr": lr, **terms, **self.counters}
                self.history.append(record)  # before the checkpoint, which stores the history
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    record["val_rouge_l"] = self._evaluate_and_keep()
                    self._save_checkpoint(step + 1)
                if not self.console.is_terminal and (step + 1) % max(1, cfg.steps // 10) == 0:
                    # logs written to files get a line per tenth of the run instead of a live bar
                    self.console.print(f"{self.kind} step {step + 1}/{cfg.steps}: " + _fmt_terms(terms))
                progress.update(task, advance=1, info=" ".join(f"{k} {v:.3f}" for k, v in terms.items()))
        return self.cleanup()

    def _evaluate_and_keep(self) -> float:
        cfg = self.cfg
        with self.precision.autocast():
            rouge = validation_rouge(
                self.model, self.tokenizer, self.val_examples, cfg.max_new_tokens, cfg.max_prompt
            )
        self.model.train()
        # Without validation data every evaluation replaces the saved model (the last one is kept).
        if math.isnan(rouge) or rouge > self.best_rouge:
            self.best_rouge = rouge if not math.isnan(rouge) else self.best_rouge
            self._save_best()
        self.console.print(f"{self.kind}: validation ROUGE-L {rouge:.2f} (best {self.best_rouge:.2f})")
        return rouge

    def cleanup(self) -> dict:
        summary = {
            "kind": self.kind,
            "config": self.cfg.to_dict(),
            "steps": self.cfg.steps,
            "best_val_rouge_l": None if math.isinf(self.best_rouge) else self.best_rouge,
            **self.counters,
            "history": self.history,
        }
        (self.out_dir / f"{self.kind}_log.json").write_text(json.dumps(summary, indent=2))
        return summary
