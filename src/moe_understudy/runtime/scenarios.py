"""Load scenarios: which tokens the runtime sees and how the router is pushed.

- natural: held-out text from the model's own corpus (the validation blocks cached next to a teacher
  trained here, else the validation split of its data config);
- domain_shift: English prose the default (code) corpus never trains on (`data.domain_shift_texts`);
- hot_expert: natural text with a logit bias on one expert of every layer, applied inside the
  router by the runtime layer (weights untouched);
- batch-size sweep: capacity is per forward step, so `batches(blocks, size)` at several sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_understudy.config import DataConfig, EvalConfig, TeacherConfig
from moe_understudy.errors import UserError

SCENARIOS = ("natural", "domain_shift", "hot_expert")


@dataclass(frozen=True)
class Scenario:
    """Token blocks (N, S) to evaluate on and the router bias to apply, if any."""

    name: str
    blocks: torch.Tensor
    logit_bias: torch.Tensor | None = None  # (E,) added to every MoE layer's router logits


def model_data_config(model_dir: str | Path, fallback: DataConfig) -> DataConfig:
    """The data config a teacher trained here was made with (teacher.yaml), else `fallback`."""
    path = Path(model_dir) / "teacher.yaml"
    return TeacherConfig.from_yaml(path).data if path.is_file() else fallback


def natural_blocks(model_dir: str | Path, data: DataConfig, tokenizer, max_blocks: int) -> torch.Tensor:
    """(N, S) held-out blocks: the teacher's cached validation blocks, else packed from the val split."""
    cache = Path(model_dir) / "blocks.pt"
    if cache.is_file():
        blocks = torch.load(cache)["val"][:max_blocks]
    else:
        from moe_understudy.data import load_corpus, pack_blocks

        blocks = pack_blocks(load_corpus(data).val, tokenizer, data.block_size, max_blocks=max_blocks)
    if len(blocks) == 0:
        raise UserError(f"No held-out text to evaluate {model_dir} on; point --data at a larger corpus.")
    return blocks


def domain_shift_blocks(tokenizer, block_size: int, max_blocks: int) -> torch.Tensor:
    """(N, S) blocks of prose unlike the training text."""
    from moe_understudy.data import domain_shift_texts, pack_blocks

    return pack_blocks(domain_shift_texts(), tokenizer, block_size, max_blocks=max_blocks)


def hot_expert_bias(num_experts: int, expert: int, strength: float) -> torch.Tensor:
    """(E,) router logit bias raising `expert` by `strength`."""
    if not 0 <= expert < num_experts:
        raise UserError(
            f"hot expert {expert} does not exist; choose an expert id from 0 to {num_experts - 1}."
        )
    bias = torch.zeros(num_experts)
    bias[expert] = strength
    return bias


def batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Full batches (batch_size, S) of `blocks`; a short tail is left out so every step has the same load."""
    n = len(blocks) // batch_size
    if n == 0:
        raise UserError(
            f"{len(blocks)} evaluation blocks do not fill one batch of {batch_size}; raise --blocks or lower --batch-size."
        )
    return list(blocks[: n * batch_size].split(batch_size))


def build_scenario(cfg: EvalConfig, num_experts: int, tokenizer, notice=None) -> Scenario:
    """The scenario `cfg.scenario` asks for, on the model in `cfg.model`.

    Natural text is `cfg.data` when given, else the model's own (see data/heldout.py; `notice`
    receives the sentence printed when that falls back to the default corpus).
    """
    from moe_understudy.data.heldout import data_for, model_blocks

    if cfg.scenario == "domain_shift":
        block_size = data_for(cfg.model, cfg.data, notice=lambda _: None).block_size
        return Scenario("domain_shift", domain_shift_blocks(tokenizer, block_size, cfg.max_blocks))
    blocks = model_blocks(cfg.model, cfg.data, tokenizer, cfg.max_blocks, notice=notice)
    if cfg.scenario == "hot_expert":
        return Scenario("hot_expert", blocks, hot_expert_bias(num_experts, cfg.hot_expert, cfg.hot_bias))
    return Scenario("natural", blocks)
