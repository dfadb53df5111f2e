"""The one learning-rate schedule every trainer uses (teacher, SFT/KD, layer-wise and end-to-end distillation)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to 10% of it at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
