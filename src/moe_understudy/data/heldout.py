"""Which text a command runs a saved model on: the user's `--data`, else the model's own.

A teacher trained here leaves its packed blocks (`blocks.pt`: {"train", "val"} (N, S) token ids)
and its corpus settings (`teacher.yaml`) in its folder. Without `--data`, commands use those; a
model without them (a hub checkpoint, a folder saved elsewhere) falls back to the default corpus,
and says so, since results on text unlike the model's own mean little. With `--data` the user's
text is packed with the model's tokenizer, for the split asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moe_understudy.config import DataConfig, TeacherConfig
from moe_understudy.errors import UserError

CACHE = "blocks.pt"  # the packed blocks a teacher run caches in its folder
TEACHER_YAML = "teacher.yaml"


def _print_notice(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]note:[/] {message}")


def own_data_config(model_dir: str | Path) -> DataConfig | None:
    """The DataConfig a teacher trained here was made with (its teacher.yaml), or None."""
    saved = Path(model_dir) / TEACHER_YAML
    return TeacherConfig.from_yaml(saved).data if saved.is_file() else None


def data_for(
    model_dir: str | Path, data: DataConfig | None, notice: Callable[[str], None] | None = None
) -> DataConfig:
    """`data` when given, else the model's own corpus settings, else the default corpus (with a notice)."""
    if data is not None:
        return data
    own = own_data_config(model_dir)
    if own is not None:
        return own
    default = DataConfig()
    (notice or _print_notice)(
        f"{model_dir} has no teacher.yaml or cached blocks, so the default corpus ({default.source!r}) is "
        f"used; pass --data FILE (text, .jsonl, a folder or a datasets name) to run on your own text."
    )
    return default


def model_blocks(
    model_dir: str | Path,
    data: DataConfig | None,
    tokenizer,
    max_blocks: int,
    split: str = "val",
    notice: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """(N <= max_blocks, S) token blocks of `split` ("val" or "train") to run the model in `model_dir` on.

    With `data` None: the folder's cached blocks, else its teacher.yaml corpus, else the default
    corpus (with a notice). With `data`: that corpus, packed with `tokenizer`.
    """
    cache = Path(model_dir) / CACHE
    if data is None and cache.is_file():
        try:
            return torch.load(cache)[split][:max_blocks]
        except Exception as err:  # a truncated or foreign blocks.pt
            raise UserError(
                f"{cache} could not be read ({type(err).__name__}); delete it (the teacher rewrites it) or pass --data."
            ) from err
    from moe_understudy.data.corpus import load_corpus
    from moe_understudy.data.packing import pack_blocks

    cfg = data_for(model_dir, data, notice)
    corpus = load_corpus(cfg)
    texts = corpus.val if split == "val" else corpus.train
    blocks = pack_blocks(texts, tokenizer, cfg.block_size, max_blocks=max_blocks)
    if len(blocks) == 0:
        which = "held-out" if split == "val" else "training"
        raise UserError(
            f"The {which} split of {cfg.source!r} fills no block of {cfg.block_size} tokens for {model_dir}; "
            f"point --data at a larger corpus or lower --block-size."
        )
    return blocks
