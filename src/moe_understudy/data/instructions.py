"""Instruction data: Dolly, Alpaca, prompt/response (T0 mix), prompt/completion and Self-Instruct rows.

Every format becomes `Example(prompt, response, task, references)` with ONE prompt template, so a
model trained on one format can be asked in another:

    Instruction: {instruction}

    Input: {input}          <- only when the row has a non-empty input/context

    Response:

Formats that already carry a full prompt (prompt/response, prompt/completion) keep the prompt text
as it is and get the same "\\n\\nResponse:" cue appended (unless it already ends with "Response:"),
so the boundary between prompt and answer always looks the same to the model. The response is
encoded after the prompt with one leading space (see `packing.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_understudy.data.corpus import load_hf_dataset, read_rows, stable_fraction
from moe_understudy.errors import UserError

RESPONSE_CUE = "Response:"


@dataclass(frozen=True)
class Example:
    """One instruction example; `references` are the accepted answers (default: the response)."""

    prompt: str
    response: str
    task: str = ""
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.references:
            object.__setattr__(self, "references", (self.response,))
        elif not isinstance(self.references, tuple):
            object.__setattr__(self, "references", tuple(self.references))


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The shared template for instruction(+input) rows."""
    parts = [f"Instruction: {instruction.strip()}"]
    if input_text and input_text.strip():
        parts.append(f"Input: {input_text.strip()}")
    parts.append(RESPONSE_CUE)
    return "\n\n".join(parts)


def cued_prompt(prompt: str) -> str:
    """A ready-made prompt with the response cue appended once."""
    prompt = prompt.rstrip()
    return prompt if prompt.endswith(RESPONSE_CUE) else f"{prompt}\n\n{RESPONSE_CUE}"


# ---- formats: the keys that identify a row, and how a row becomes examples -------------------


def _dolly(row: dict) -> list[Example]:
    return [
        Example(
            instruction_prompt(row["instruction"], row.get("context") or ""),
            row["response"],
            str(row.get("category") or ""),
        )
    ]


def _alpaca(row: dict) -> list[Example]:
    return [
        Example(
            instruction_prompt(row["instruction"], row.get("input") or ""),
            row["output"],
            str(row.get("task") or ""),
        )
    ]


def _prompt_response(row: dict) -> list[Example]:
    return [Example(cued_prompt(row["prompt"]), row["response"], str(row.get("task") or ""))]


def _prompt_completion(row: dict) -> list[Example]:
    return [Example(cued_prompt(row["prompt"]), row["completion"], str(row.get("task") or ""))]


def _self_instruct(row: dict) -> list[Example]:
    task = str(row.get("name") or row.get("id") or "")
    return [
        Example(instruction_prompt(row["instruction"], inst.get("input") or ""), inst["output"], task)
        for inst in row["instances"]
    ]


# Detection order matters: the first format whose required keys a row has wins.
FORMATS: dict[str, tuple[frozenset[str], Callable[[dict], list[Example]]]] = {
    "self_instruct": (frozenset({"instruction", "instances"}), _self_instruct),
    "dolly": (frozenset({"instruction", "context", "response"}), _dolly),
    "alpaca": (frozenset({"instruction", "output"}), _alpaca),
    "prompt_response": (frozenset({"prompt", "response"}), _prompt_response),
    "prompt_completion": (frozenset({"prompt", "completion"}), _prompt_completion),
}


def detect_format(row: dict) -> str:
    """The name of the first format whose required fields `row` has."""
    for name, (keys, _) in FORMATS.items():
        if keys <= row.keys():
            return name
    accepted = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, (keys, _) in FORMATS.items())
    raise UserError(
        f"Unknown instruction layout with fields {', '.join(sorted(row)) or 'none'}; "
        f"use rows with one of these field sets ({accepted})."
    )


def examples_from_rows(
    rows: Iterable[dict], fmt: str = "auto", limit: int | None = None, where: str = "data"
) -> list[Example]:
    """Examples from parsed rows in the given (or auto-detected from the first row) format."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"Unknown instruction format '{fmt}'; use auto or one of {', '.join(FORMATS)}.")
    examples: list[Example] = []
    convert = None
    for i, row in enumerate(rows):
        if convert is None:
            _, convert = FORMATS[detect_format(row) if fmt == "auto" else fmt]
        try:
            examples += convert(row)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UserError(
                f"{where} row {i + 1} does not match its format ({exc!r} missing or malformed); fix or remove that row."
            ) from exc
        if limit is not None and len(examples) >= limit:
            return examples[:limit]
    if not examples:
        raise UserError(f"{where} holds no instruction examples; pass a file with at least one row.")
    return examples


def load_instructions(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[Example]:
    """Examples from a .jsonl, .jsonl.gz, .json or .json.gz file (see the module docstring for formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Instruction file {path} does not exist; pass an existing .jsonl, .jsonl.gz or .json file."
        )
    return examples_from_rows(read_rows(path), fmt=fmt, limit=limit, where=str(path))


def load_hf_instructions(
    name: str, split: str = "train", fmt: str = "auto", limit: int | None = None
) -> list[Example]:
    """Examples from a Hugging Face dataset "name" or "name:config" (offline or unknown -> UserError)."""
    dataset_name, _, config = name.partition(":")
    rows = load_hf_dataset(dataset_name, config or None, split=split)
    return examples_from_rows(rows, fmt=fmt, limit=limit, where=f"dataset {name}")


# ---- splits ----------------------------------------------------------------------------------


def split_by_task(
    examples: Sequence[Example], unseen_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(seen, unseen): whole tasks held out, `round(unseen_fraction * tasks)` of them (at least one).

    Tasks are ranked by a seeded stable hash of their name, so the split is the same on every
    run and machine; examples keep their input order.
    """
    if not 0.0 < unseen_fraction < 1.0:
        raise UserError(f"unseen_fraction must be in (0, 1), got {unseen_fraction}.")
    tasks = sorted({e.task for e in examples})
    if len(tasks) < 2:
        raise UserError(
            f"Splitting by task needs at least two task names, found {len(tasks)}; use train_val_test instead."
        )
    ranked = sorted(tasks, key=lambda t: stable_fraction(f"{seed}:{t}"))
    n_unseen = min(len(tasks) - 1, max(1, round(unseen_fraction * len(tasks))))
    unseen_tasks = set(ranked[:n_unseen])
    seen = [e for e in examples if e.task not in unseen_tasks]
    unseen = [e for e in examples if e.task in unseen_tasks]
    return seen, unseen


def train_val_test(
    examples: Sequence[Example], val: float = 0.05, test: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, val, test) by a seeded stable hash of each example's text, so duplicates share a split."""
    if val < 0 or test < 0 or val + test >= 1:
        raise UserError(f"Need val >= 0, test >= 0 and val + test < 1, got val={val}, test={test}.")
    parts: tuple[list[Example], list[Example], list[Example]] = ([], [], [])
    for e in examples:
        u = stable_fraction(f"{seed}:{e.prompt}\x00{e.response}")
        parts[0 if u >= val + test else 1 if u < val else 2].append(e)
    return parts


def shuffled(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """A seeded shuffle (copy) for training order."""
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out
