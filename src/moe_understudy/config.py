"""Frozen configuration dataclasses, one per stage; YAML in, YAML out.

Every CLI option maps onto a field of the stage's dataclass; `to_yaml` / `from_yaml` round-trip
exactly, so a run can be repeated from the YAML it wrote next to its output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="StageConfig")


class StageConfig:
    """Mixin for frozen stage configs: dict/YAML round-trip and validated replacement."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})  # type: ignore[call-arg]

    @classmethod
    def from_yaml(cls: type[C], source: str | Path) -> C:
        """`source` is a YAML file path or YAML text."""
        is_path = isinstance(source, Path) or ("\n" not in source and Path(source).is_file())
        text = Path(source).read_text() if is_path else str(source)
        return cls.from_dict(yaml.safe_load(text) or {})

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _coerce(hint: Any, value: Any) -> Any:
    """YAML gives lists where a dataclass wants tuples; convert so equality round-trips."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return value if value is None or len(args) != 1 else _coerce(args[0], value)
    if isinstance(hint, type) and issubclass(hint, StageConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class DataConfig(StageConfig):
    """Where text comes from and how it becomes token blocks."""

    source: str = "stdlib"  # "stdlib", a file/folder of .txt/.py/.md/.jsonl, or a datasets name
    text_field: str = "text"  # field holding text in jsonl / datasets rows
    block_size: int = 128  # tokens per packed training block
    val_fraction: float = 0.05  # fraction of files held out for validation (split by file)
    max_chars: int = 12_000_000  # cap on characters read from the corpus (keeps the default fast)
    vocab_size: int = 4096  # BPE vocabulary when a tokenizer is trained here
    tokenizer: str | None = None  # path or hub id of an existing tokenizer; None trains a BPE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 8:
            raise ValueError(f"block_size must be at least 8, got {self.block_size}.")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}.")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}.")


@dataclass(frozen=True)
class TeacherConfig(StageConfig):
    """Training a small MoE teacher from scratch (`understudy teacher`)."""

    preset: str = "mixtral"  # a name from moe.presets.PRESETS
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1400  # optimiser steps
    batch_size: int = 16  # blocks per step
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay, linear warm-up)
    warmup: int = 50  # warm-up steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between held-out evaluations and checkpoints
    eval_batches: int = 20  # held-out batches per evaluation
    joint_understudy: str | None = None  # understudy arch trained jointly (detached aux loss), or None
    joint_weight: float = 1.0  # weight of the joint understudy loss
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive.")
