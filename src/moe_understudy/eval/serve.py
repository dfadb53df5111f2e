"""Generation under load: continuous-batched greedy decoding with a KV cache, every policy x capacity.

The serving engine is eval/batching.py; the systems and their rows eval/serve_rows.py; this module
loads prompts and runs the `understudy serve-eval` workflow (`run_serve(ServeConfig)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from moe_understudy.config import ServeConfig
from moe_understudy.errors import UserError
from moe_understudy.eval.batching import (
    DECODE,
    PROMPT_SOURCES,
    Batching,
    Forced,
    Greedy,
    reference_run,
    serve,
)
from moe_understudy.eval.serve_rows import (
    Phases,
    check_policies,
    compare_free,
    decode_rows,
    noise_floor_rows,
    prefill_rows,
    token_text,
)
from moe_understudy.moe.adapters import find_moe_layers

# ---- prompts and the workflow ---------------------------------------------------------------------------


def load_prompts(cfg: ServeConfig, tokenizer, notice: Callable[[str], None] | None = None) -> list[list[int]]:
    """`cfg.prompts` prompts as token ids: held-out blocks (or prose) cut to `prompt_tokens`, or an
    instruction file's prompts cut from the left to `prompt_tokens`."""
    from moe_understudy.data.heldout import data_for, model_blocks
    from moe_understudy.runtime.scenarios import domain_shift_blocks

    if cfg.data in PROMPT_SOURCES:
        if cfg.data == "heldout":
            blocks = model_blocks(cfg.model, None, tokenizer, cfg.prompts, notice=notice)
        else:
            block_size = data_for(cfg.model, None, notice=lambda _: None).block_size
            blocks = domain_shift_blocks(tokenizer, block_size, cfg.prompts)
        if len(blocks) < cfg.prompts:
            raise UserError(
                f"Only {len(blocks)} {cfg.data} blocks are available for {cfg.prompts} prompts; lower --prompts."
            )
        if blocks.shape[1] < cfg.prompt_tokens:
            raise UserError(
                f"{cfg.data} blocks hold {blocks.shape[1]} tokens, fewer than --prompt-tokens {cfg.prompt_tokens}; "
                f"lower --prompt-tokens."
            )
        return [row[: cfg.prompt_tokens].tolist() for row in blocks]
    path = Path(cfg.data)
    if not path.is_file():
        raise UserError(
            f"Unknown prompt source {cfg.data!r}: pass --data {' or '.join(PROMPT_SOURCES)}, or an existing "
            f"instruction file (.jsonl / .json)."
        )
    from moe_understudy.data.instructions import load_instructions

    examples = load_instructions(path, fmt=cfg.fmt, limit=cfg.prompts)
    if len(examples) < cfg.prompts:
        raise UserError(
            f"{path} holds {len(examples)} examples, fewer than --prompts {cfg.prompts}; lower --prompts."
        )
    encoded = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    prompts = [ids[-cfg.prompt_tokens :] for ids in encoded]
    if not all(prompts):
        raise UserError(f"{path} has an empty prompt; every example needs prompt text.")
    return prompts


def check_context(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, name: str) -> None:
    """Refuse prompts that with `new_tokens` would not fit the model's context window."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if context is not None and longest + new_tokens > context:
        raise UserError(
            f"Prompts of up to {longest} tokens plus {new_tokens} new tokens need {longest + new_tokens} positions, "
            f"but {name} has a context of {context}; lower --prompt-tokens or --new-tokens."
        )


def _refuse_preset_name(model: str) -> None:
    from moe_understudy.moe.presets import PRESETS

    if model in PRESETS and not Path(model).exists():
        raise UserError(
            f"{model!r} is a model preset, not a trained model; train one with "
            f"`understudy teacher --preset {model} --out DIR` and pass DIR."
        )


_COLUMNS = [
    ("policy", "policy", "{}"),
    ("capacity_factor", "cf", "{:g}"),
    ("agreement", "top-1 agree (forced)", "{:.3f}"),
    ("agreement_ci95", "95% interval", "{0[0]:.3f}..{0[1]:.3f}"),  # bootstrap over prompts
    ("kl", "KL/pos", "{:.4f}"),
    ("identical_frac", "identical seqs", "{:.3f}"),
    ("prefix_frac", "prefix frac", "{:.3f}"),
    ("rouge_l", "ROUGE-L", "{:.1f}"),
    ("overflow_frac", "overflow", "{:.3f}"),
    ("frac_tokens_degraded", "tok degraded", "{:.3f}"),
    ("mean_tokens_per_step", "tok/step", "{:.1f}"),
    ("bytes_per_token", "bytes/tok", "{:,.0f}"),
    ("memory_expert_equiv", "memory (experts)", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
]


def serve_table(rows: list[dict[str, Any]], noise: list[dict[str, Any]], title: str) -> Table:
    """A rich table of system rows, then the noise-floor rows (unpatched model, other conditions)."""
    table = Table(title=title)
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="left" if header == "policy" else "right")
    cell = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
    for r in rows:
        table.add_row(*[cell(r.get(k), fmt) for k, _, fmt in _COLUMNS])
    for r in noise:
        table.add_row(*[cell({**r, "policy": f"noise: {r['noise']}"}.get(k), fmt) for k, _, fmt in _COLUMNS])
    return table


def plot_serving(
    rows: list[dict[str, Any]], noise: list[dict[str, Any]], path: str | Path, title: str
) -> Path:
    """PNG: teacher-forced top-1 agreement (left) and identical free-running sequences (right) vs cf."""
    from moe_understudy.report import pyplot, save_figure

    plt = pyplot()
    panels = [("agreement", "top-1 agreement, teacher-forced")]
    if any("identical_frac" in r for r in rows):
        panels.append(("identical_frac", "identical sequences, free-running"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 5), squeeze=False)
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["capacity_factor"] is not None:
            lines.setdefault(r["policy"], []).append(r)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for name, series in lines.items():
            series = sorted(series, key=lambda r: r["capacity_factor"])
            ax.plot([r["capacity_factor"] for r in series], [r[key] for r in series], marker="o", label=name)
        full = [r for r in rows if r["capacity_factor"] is None]
        if full:
            ax.axhline(full[0][key], color="black", linestyle="-", linewidth=1, label="full")
        for i, n in enumerate(noise):
            ax.axhline(
                n[key], color="grey", linestyle=("--", ":")[i % 2], linewidth=1, label=f"noise: {n['noise']}"
            )
        ax.set_xlabel("capacity factor (per decode step over its tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def run_serve(cfg: ServeConfig, console: Console | None = None) -> dict[str, Any]:
    """`understudy serve-eval`: load, build prompts, reference run, every system, noise floor, report."""
    import json

    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = console or Console(stderr=True)
    _refuse_preset_name(cfg.model)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, dtype=cfg.dtype)
    layers = find_moe_layers(model)  # a model without MoE layers stops here, in one sentence
    understudies = None
    if cfg.understudies:
        from moe_understudy.understudy.io import load_understudies

        understudies = load_understudies(cfg.understudies, model, device=cfg.device)
    check_policies(model, understudies, cfg.policies)
    prompts = load_prompts(cfg, tokenizer, notice=lambda m: console.print(f"[yellow]note:[/] {m}"))
    check_context(model, prompts, cfg.new_tokens if cfg.mode == DECODE else 0, cfg.model)
    eos = tokenizer.eos_token_id
    batching = Batching(
        slots=cfg.slots or len(prompts),
        new_tokens=cfg.new_tokens,
        eos_id=-1 if eos is None else int(eos),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)),
        prefill_chunk=cfg.prefill_chunk,
    )
    console.print(
        f"serve-eval [bold]{cfg.mode}[/]: {len(prompts)} prompts ({cfg.data}, up to {max(map(len, prompts))} tokens), "
        f"{batching.slots} slots, {cfg.new_tokens} new tokens; {len(layers)} MoE layers of {layers[0].num_experts} "
        f"experts (top-{layers[0].top_k}), priority {cfg.priority}, {cfg.num_devices} devices"
    )
    noise: list[dict[str, Any]] = []
    if cfg.mode == DECODE:
        reference = reference_run(model, prompts, batching)
        text = token_text(tokenizer, batching.eos_id)
        if cfg.noise_floor:
            noise = noise_floor_rows(model, prompts, batching, reference, text=text, bf16=cfg.bf16_floor)
    served = (model, understudies, prompts, batching, cfg.policies, cfg.capacities)
    load = {"priority": cfg.priority, "num_devices": cfg.num_devices}
    if cfg.mode == DECODE:
        rows = decode_rows(*served, reference, **load, text=text)
    else:
        rows = prefill_rows(*served, **load)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "serve.yaml")
    title = f"serving ({cfg.mode}): {len(prompts)} prompts, {batching.slots} slots, priority {cfg.priority}"
    json_path = out / "report.json"
    json_path.write_text(
        json.dumps({"config": cfg.to_dict(), "rows": rows, "noise_floor": noise}, indent=2, default=str)
    )
    png = plot_serving(rows, noise, out / "report.png", title)
    width = console.width
    console.width = max(width, 170)
    try:
        console.print(serve_table(rows, noise, title))
    finally:
        console.width = width
    console.print(f"report: [bold]{json_path}[/]  plot: [bold]{png}[/]")
    return {"rows": rows, "noise_floor": noise, "json": json_path, "png": png}


# Re-exported: the serving engine and the rows are used through this module too.
__all__ = [
    "Batching",
    "DECODE",
    "Forced",
    "Greedy",
    "PROMPT_SOURCES",
    "Phases",
    "check_context",
    "check_policies",
    "compare_free",
    "decode_rows",
    "load_prompts",
    "noise_floor_rows",
    "plot_serving",
    "prefill_rows",
    "reference_run",
    "run_serve",
    "serve",
    "serve_table",
    "token_text",
]
