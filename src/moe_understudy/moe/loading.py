"""Loading a causal LM and its tokenizer: a folder `understudy teacher` wrote, or any transformers MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_understudy.errors import UserError

CHECKPOINT_DIR = "checkpoint"  # a teacher run's periodic checkpoint folder (teacher.py writes it)


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) saved by `understudy teacher` or any transformers MoE checkpoint; clear errors otherwise."""
    from transformers import AutoModelForCausalLM

    from moe_understudy.data import load_tokenizer

    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").exists():
        hint = (
            " (a teacher run was started there: finish it with `understudy teacher --resume`)"
            if (local / CHECKPOINT_DIR).exists()
            else ""
        )
        raise UserError(f"{path} holds no config.json, so it is not a saved model{hint}.")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local if local.exists() else path), dtype=torch.float32
        )
    except OSError as err:
        raise UserError(
            f"Model {str(path)!r} is neither a local model folder nor reachable on the hub (offline?); "
            f"train one with `understudy teacher --out DIR` or pass a local folder."
        ) from err
    tokenizer = load_tokenizer(path)
    return model.to(device).eval(), tokenizer
