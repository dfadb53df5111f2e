"""`understudy sft`: supervised fine-tuning on instruction data with the prompt masked from the loss.

Used for both sides of the distillation protocol (MiniLLM / EEM): the MoE teacher is SFT-ed on the
instruction data, and so is the student before any KD method starts from it. A preset name trains
from scratch with a tokenizer (a BPE trained on the instruction data unless one is given); a saved
model folder is fine-tuned with its own tokenizer. MoE models add their config's router
load-balancing term (transformers' aux loss) so experts stay in use.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from moe_understudy.config import SFTConfig
from moe_understudy.data.instructions import load_instructions
from moe_understudy.data.tokenizer import load_tokenizer, train_bpe
from moe_understudy.errors import UserError
from moe_understudy.kd.common import InstructionRecipe, dataset_batch, is_moe_config, set_special_tokens
from moe_understudy.moe.presets import PRESETS, build_model, preset_config
from moe_understudy.precision import step_with_scaler


def model_for(name: str, tokenizer, max_positions: int, seed: int):
    """A fresh model of preset `name` sized to `tokenizer`, or None when `name` is not a preset."""
    if name not in PRESETS:
        return None
    model = build_model(preset_config(name, len(tokenizer), max_positions=max_positions), seed=seed)
    set_special_tokens(model, tokenizer)
    return model


class SFTRecipe(InstructionRecipe):
    """Prompt-masked next-token cross-entropy on (prompt, response) pairs."""

    kind = "sft"

    def _setup_models(self) -> None:
        from moe_understudy.moe.loading import load_model_and_tokenizer

        cfg: SFTConfig = self.cfg
        if cfg.model in PRESETS:
            self.tokenizer = self._tokenizer_for_preset(cfg)
            self.model = model_for(cfg.model, self.tokenizer, cfg.max_total, cfg.seed)
        elif Path(cfg.model).expanduser().exists():
            self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
            set_special_tokens(self.model, self.tokenizer)
        else:
            raise UserError(
                f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a saved model folder; pass one of those."
            )

    def _tokenizer_for_preset(self, cfg: SFTConfig):
        if cfg.tokenizer:
            return load_tokenizer(cfg.tokenizer)
        if self.resume and (self.out_dir / "tokenizer.json").exists():
            return load_tokenizer(self.out_dir)  # the BPE this run trained before it was interrupted
        texts = [f"{e.prompt} {e.response}" for e in load_instructions(cfg.data, fmt=cfg.fmt)]
        return train_bpe(texts, cfg.vocab_size, self.out_dir)

    def _train_step(self, step: int, examples) -> dict[str, float]:
        cfg: SFTConfig = self.cfg
        batch = self.to_device(dataset_batch(examples, self.tokenizer, cfg.max_prompt, cfg.max_total))
        moe = is_moe_config(self.model)
        with self.precision.autocast():
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                **({"output_router_logits": True} if moe else {}),
            )
        self.scaler.scale(out.loss).backward()
        step_with_scaler(self.scaler, self.optimizer, cfg.grad_clip, list(self.model.parameters()))
        self.optimizer.zero_grad(set_to_none=True)
        terms = {"loss": float(out.loss.detach())}
        if moe and getattr(out, "aux_loss", None) is not None:
            terms["aux"] = float(out.aux_loss.detach())
        return terms


def run_sft(
    cfg: SFTConfig, out_dir: str | Path, resume: bool = False, console: Console | None = None
) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`; the best model by validation ROUGE-L is saved in `out_dir`."""
    recipe = SFTRecipe(cfg, out_dir, resume=resume, console=console).setup()
    return recipe.train()
