"""Writing files so that a crash mid-write never leaves a half-written one in place."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` through a temporary name: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
