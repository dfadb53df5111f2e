"""Batched generation with the KV cache: left-padded prompts -> responses cut at end-of-text.

Sampling defaults follow MiniLLM / EEM evaluation: temperature 1.0, top-p 1.0, top-k 0 (plain
ancestral sampling); `greedy=True` decodes greedily instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_understudy.data.packing import prompt_ids_batch


def response_mask(new_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, n) bool: generated tokens up to and including each row's first EOS (all if none)."""
    is_eos = new_tokens == eos_id
    before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS count strictly before each position
    return before == 0


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue left-padded prompts (B, S): returns new tokens (B, n) and their response mask (B, n).

    Tokens after the first EOS are padding and masked out. Uses the caller's torch RNG state.
    """
    was_training = model.training
    model.eval()
    kwargs = (
        dict(do_sample=False)
        if greedy
        else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        # MoE configs that record router logits would compute an aux loss per step, which breaks
        # on cached steps with padding; generation does not need it.
        **({"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}),
        **kwargs,
    )
    model.train(was_training)
    new = out[:, input_ids.shape[1] :]  # (B, n)
    return new, response_mask(new, eos_id)


def decode_responses(tokenizer, new_tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Text of each row's response: tokens before the first EOS, stripped."""
    eos = tokenizer.eos_token_id
    texts = []
    for row, keep in zip(new_tokens.tolist(), mask.tolist(), strict=True):
        ids = [t for t, k in zip(row, keep, strict=True) if k and t != eos]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    seed: int = 10,
    greedy: bool = False,
    max_new_tokens: int = 128,
    max_prompt: int = 256,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[str]:
    """One response per prompt, in the prompts' order; deterministic under `seed`.

    Prompts are batched by length (less padding); the RNG is seeded once, so a run is repeatable.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = [""] * len(prompts)
    # the callers' training randomness is not disturbed: the CPU's and the model's CUDA generator come back
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, att = prompt_ids_batch([prompts[i] for i in idx], tokenizer, max_prompt=max_prompt)
            new, mask = sample_continuations(
                model,
                ids.to(device),
                att.to(device),
                eos_id=eos,
                pad_id=pad,
                max_new_tokens=max_new_tokens,
                greedy=greedy,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
            )
            for i, text in zip(idx, decode_responses(tokenizer, new.cpu(), mask.cpu()), strict=True):
                out[i] = text
    return out
