"""ROUGE-L F1 of generated responses (MiniLLM / EEM protocol) per dataset and per task.

Score of one response: ROUGE-L F1 (`rouge-score`, Porter stemmer) against each reference, max over
references, x100. A run's score is the mean over examples; with sampling it is repeated for each
seed and reported as mean and (population) standard deviation over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rouge_score import rouge_scorer

from moe_understudy.config import RougeConfig
from moe_understudy.data.instructions import Example, load_instructions
from moe_understudy.eval.generate import generate_responses


def rouge_l(
    prediction: str, references: Sequence[str], scorer: rouge_scorer.RougeScorer | None = None
) -> float:
    """ROUGE-L F1 x100 of `prediction`, max over `references` (0 for no references)."""
    scorer = scorer or rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max((100.0 * scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


def score_examples(predictions: Sequence[str], examples: Sequence[Example]) -> list[float]:
    """Per-example ROUGE-L F1 x100 of `predictions[i]` against `examples[i].references`."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [rouge_l(p, e.references, scorer) for p, e in zip(predictions, examples, strict=True)]


@dataclass
class SeedScores:
    """Mean ROUGE-L per seed, overall and per task, and each example's scores, for one dataset."""

    overall: list[float] = field(default_factory=list)  # one per seed
    by_task: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    by_seed: list[list[float]] = field(default_factory=list)  # per seed, one score per example

    def add(self, scores: Sequence[float], examples: Sequence[Example]) -> None:
        self.overall.append(_mean(scores))
        self.by_seed.append(list(scores))
        per_task: dict[str, list[float]] = defaultdict(list)
        for s, e in zip(scores, examples, strict=True):
            per_task[e.task or "-"].append(s)
        for task, vals in per_task.items():
            self.by_task[task].append(_mean(vals))

    def summary(self) -> dict:
        return {
            "mean": _mean(self.overall),
            "std": _std(self.overall),
            "per_seed": self.overall,
            "tasks": {t: {"mean": _mean(v), "std": _std(v)} for t, v in sorted(self.by_task.items())},
            # Each example's score averaged over seeds: what paired comparisons between models need.
            "per_example": [_mean(col) for col in zip(*self.by_seed, strict=True)],
        }


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


def _std(xs: Sequence[float]) -> float:
    return float(statistics.pstdev(xs)) if len(xs) > 1 else 0.0


def rouge_over_seeds(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    seeds: Sequence[int] = (10, 20, 30, 40, 50),
    greedy: bool = False,
    **sampling,
) -> SeedScores:
    """Generate for every example once per seed (once if greedy) and collect the ROUGE-L scores.

    sampling: the other options of `generate_responses` (max_new_tokens, max_prompt, batch_size,
    temperature, top_p, top_k), with its defaults."""
    result = SeedScores()
    prompts = [e.prompt for e in examples]
    for seed in [seeds[0] if seeds else 0] if greedy else seeds:
        preds = generate_responses(model, tokenizer, prompts, seed=seed, greedy=greedy, **sampling)
        result.add(score_examples(preds, examples), examples)
    return result


def run_rouge(cfg: RougeConfig, console: Console | None = None) -> dict:
    """`understudy rouge`: score a saved model on each file of `cfg.data`; print a table, write JSON."""
    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = console or Console(stderr=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    report: dict = {"config": cfg.to_dict(), "datasets": {}}
    for path in cfg.data:
        examples = load_instructions(path, fmt=cfg.fmt, limit=cfg.limit)
        scores = rouge_over_seeds(
            model,
            tokenizer,
            examples,
            seeds=cfg.seeds,
            greedy=cfg.greedy,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt=cfg.max_prompt,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
        )
        report["datasets"][Path(path).name] = {"examples": len(examples), **scores.summary()}
    console.print(rouge_table(report["datasets"], title=f"ROUGE-L F1 x100 of {cfg.model}"))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
    return report


def rouge_table(datasets: dict, title: str) -> Table:
    """Rich table: one row per dataset and per task within it (mean ± std over seeds)."""
    table = Table(title=title)
    for col in ("dataset / task", "examples", "ROUGE-L", "std"):
        table.add_column(col, justify="left" if col.startswith("dataset") else "right")
    for name, d in datasets.items():
        table.add_row(f"[bold]{name}[/]", str(d["examples"]), f"{d['mean']:.2f}", f"{d['std']:.2f}")
        for task, t in d["tasks"].items():
            table.add_row(f"  {task}", "", f"{t['mean']:.2f}", f"{t['std']:.2f}")
    return table
