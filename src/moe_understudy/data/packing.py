"""Token tensors for training and generation: packed LM blocks, masked instruction pairs, padded batches.

Instruction encoding: the prompt (already templated, see `instructions.py`, ending in "Response:")
is followed by the response with one leading space (GPT-2 style: the space belongs to the first
response word), then EOS. Only response tokens and the EOS carry labels; generation from
`prompt_ids_batch` therefore produces " <response>" and callers compare `text.strip()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_understudy.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moe_understudy.data.instructions import Example

IGNORE_INDEX = -100  # label value that cross-entropy skips
_ENCODE_BATCH = 512  # documents per fast-tokenizer call (bounds peak memory, keeps batching fast)


def pack_blocks(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """(N, block_size) int64: `texts` tokenised, EOS after each document, concatenated, cut into full blocks.

    The tail shorter than a block is dropped; with `max_blocks` only the first blocks are kept
    (and tokenising stops once there are enough).
    """
    if block_size < 2:
        raise UserError(f"block_size must be at least 2, got {block_size}.")
    eos = _eos_id(tokenizer)
    need = None if max_blocks is None else max_blocks * block_size
    chunks: list[np.ndarray] = []
    have = 0
    for start in range(0, len(texts), _ENCODE_BATCH):
        batch = list(texts[start : start + _ENCODE_BATCH])
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray([*ids, eos], dtype=np.int64))
            have += len(ids) + 1
        if need is not None and have >= need:
            break
    n_blocks = have // block_size if need is None else min(have, need) // block_size
    if n_blocks == 0:
        raise UserError(
            f"The text holds {have} tokens, fewer than one block of {block_size}; pass more text or a smaller block size."
        )
    flat = np.concatenate(chunks)[: n_blocks * block_size]
    return torch.from_numpy(flat).view(n_blocks, block_size)  # (N, block_size)


def response_ids(response: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a response as it follows a prompt: one leading space, then the text, then EOS."""
    text = response if response[:1].isspace() else " " + response
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], _eos_id(tokenizer)]


def encode_instruction(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_prompt: int = 256, max_total: int = 512
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt then response+EOS; labels are -100 over the prompt.

    The prompt is cut from the LEFT to `max_prompt` tokens (the instruction's end and the
    "Response:" cue survive); the whole is cut to `max_total` tokens from the right.
    """
    if not 0 < max_prompt < max_total:
        raise UserError(
            f"Need 0 < max_prompt < max_total, got max_prompt={max_prompt}, max_total={max_total}."
        )
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"][-max_prompt:]
    answer = response_ids(example.response, tokenizer)[: max_total - len(prompt)]
    return [*prompt, *answer], [IGNORE_INDEX] * len(prompt) + answer


def collate_instructions(
    batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) `input_ids`, `labels` (-100 on padding) and `attention_mask` from (ids, labels) pairs."""
    if not batch:
        raise UserError("Cannot collate an empty batch of instructions.")
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, (ids, labs) in enumerate(batch):
        if len(ids) != len(labs):
            raise ValueError(f"Row {row}: {len(ids)} input ids but {len(labs)} labels.")
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.as_tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def prompt_ids_batch(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_prompt: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-padded (B, T) `input_ids` and `attention_mask` for batched generation (prompts cut from the left)."""
    if not prompts:
        raise UserError("Cannot build a generation batch from no prompts.")
    encoded = [ids[-max_prompt:] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError("The tokenizer has no eos token; use one with an eos token (train_bpe adds one).")
    return int(tokenizer.eos_token_id)
