"""`understudy sft`, `kd`, `rouge`: instruction tuning, whole-model MoE distillation, ROUGE-L."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import (
    TRAIN,
    command,
    configure,
    console,
    write_replay,
)
from moe_understudy.errors import UserError

# Options that sft, kd and rouge share (one declaration, one help text).
FmtOption = Annotated[str | None, typer.Option(help="Instruction format of the files (default auto-detect).")]
ValDataOption = Annotated[
    str | None,
    typer.Option(
        help="Validation file for checkpoint selection (default: hold out --val-examples rows of --data)."
    ),
]
MaxExamplesOption = Annotated[int | None, typer.Option(help="Use at most this many training examples.")]
MaxPromptOption = Annotated[
    int | None, typer.Option(help="Prompt tokens kept, cut from the left (default 256).")
]
MaxTotalOption = Annotated[int | None, typer.Option(help="Prompt + response tokens kept (default 512).")]
EvalEveryOption = Annotated[
    int | None,
    typer.Option(help="Steps between validation ROUGE-L checks and checkpoints (default 100)."),
]
MaxNewTokensOption = Annotated[
    int | None, typer.Option(help="Generated tokens per validation response (default 64).")
]


@command(tail=TRAIN)
def sft(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: the model chosen by validation ROUGE-L (save_pretrained + tokenizer), checkpoint/, sft_log.json."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Instruction file (.jsonl/.json, optionally .gz): Dolly, Alpaca, prompt/response, prompt/completion or Self-Instruct rows."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Preset name to train from scratch (e.g. mixtral, quick, quick-student) or a saved model folder to fine-tune (default quick)."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer folder for a preset model (default: train a BPE on --data).")
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="BPE vocabulary when a tokenizer is trained here (default 4096).")
    ] = None,
    fmt: FmtOption = None,
    val_data: ValDataOption = None,
    val_examples: Annotated[
        int | None,
        typer.Option(
            help="Validation examples scored by greedy ROUGE-L (default 64; 0 keeps the last model)."
        ),
    ] = None,
    max_examples: MaxExamplesOption = None,
    max_prompt: MaxPromptOption = None,
    max_total: MaxTotalOption = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 500).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step (default 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 1e-3).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 20).")] = None,
    eval_every: EvalEveryOption = None,
    max_new_tokens: MaxNewTokensOption = None,
) -> None:
    """Fine-tune a model on instruction data with the prompt masked from the loss (teacher or student)."""
    from moe_understudy.config import SFTConfig
    from moe_understudy.kd.sft import run_sft

    cfg = _needs_data(configure(SFTConfig, ctx.params, ignore=("out",)))
    summary = run_sft(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/sft.yaml
    console.print(
        f"[bold green]model saved to {out}[/]: best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


@command(tail=("seed", "device", "train_dtype", "resume", "debug"))
def kd(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(help="Run folder: the student chosen by validation ROUGE-L, checkpoint/, kd_log.json."),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="Instruction file with the prompts (and responses, for --method kd or --off-policy)."
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Saved MoE teacher folder (e.g. from `understudy sft --model mixtral`); its tokenizer is used."
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="kd (forward KL on dataset responses), gkd (reverse KL on student samples), all (teacher runs every expert), ka (Knowledge Augmentation: --ka-passes teacher passes per input, losses averaged into one update), sar (Student-Aware Router: a teacher-router step minimising KL(teacher || student) through the routers, the direction of EEM's finetune_sfr.py, mode-seeking toward what the student can fit, + load balancing under the router's own scores; then the student step), bdistill (MoE student: MC exploration + router distillation; our formulation from B-Distill's public abstract). Default kd."
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="Student: a preset (quick-student, llama-student, quick-moe-student, moe-student) or a saved folder sharing the teacher's tokenizer (default quick-student)."
        ),
    ] = None,
    divergence: Annotated[
        str | None, typer.Option(help="fkl, rkl, skew_fkl or skew_rkl (default: fkl for kd, rkl otherwise).")
    ] = None,
    off_policy: Annotated[
        bool,
        typer.Option(
            "--off-policy",
            help="Distil on the dataset's responses instead of student samples (non-kd methods).",
        ),
    ] = False,
    fmt: FmtOption = None,
    val_data: ValDataOption = None,
    val_examples: Annotated[
        int | None, typer.Option(help="Validation examples scored by greedy ROUGE-L (default 64).")
    ] = None,
    max_examples: MaxExamplesOption = None,
    max_prompt: MaxPromptOption = None,
    max_total: MaxTotalOption = None,
    gen_max_new_tokens: Annotated[
        int | None, typer.Option(help="Length of student-sampled responses (default 64).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps, one student update each, every method (default 300).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per step (default 8).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak student learning rate (default 5e-4).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 10).")] = None,
    ka_experts: Annotated[
        int | None, typer.Option(help="KA: experts the teacher activates per layer (default N-1).")
    ] = None,
    ka_lambda: Annotated[
        float | None,
        typer.Option(
            help="KA: per-token probability of sampling experts instead of taking the top ones (default 0.05)."
        ),
    ] = None,
    ka_passes: Annotated[
        int | None,
        typer.Option(help="KA: teacher passes per input per step, averaged into one update (default 2)."),
    ] = None,
    sar_lr: Annotated[
        float | None, typer.Option(help="SAR: learning rate of the teacher-router optimiser (default 1e-4).")
    ] = None,
    sar_beta: Annotated[
        float | None, typer.Option(help="SAR: weight of the load-balancing loss (default 0.01).")
    ] = None,
    explore_eps: Annotated[
        float | None,
        typer.Option(help="B-Distill: uniform mixing of router probabilities for exploration (default 0.1)."),
    ] = None,
    router_kl_weight: Annotated[
        float | None, typer.Option(help="B-Distill: weight of the router KL (default 0.1).")
    ] = None,
    entropy_floor: Annotated[
        float | None,
        typer.Option(help="B-Distill: router entropy floor as a fraction of log(experts) (default 0.5)."),
    ] = None,
    entropy_weight: Annotated[
        float | None, typer.Option(help="B-Distill: weight of the entropy-floor penalty (default 0.1).")
    ] = None,
    eval_every: EvalEveryOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Replay a run: read the options from its kd.yaml (flags given here override them); e.g. teacher_passes: M gives kd/gkd M x batch-size examples per step, KA's teacher forwards."
        ),
    ] = None,
) -> None:
    """Distil a whole MoE teacher into a dense or smaller MoE student (KD, GKD, ALL, KA, SAR, B-Distill)."""
    from moe_understudy.config import KDConfig
    from moe_understudy.kd.trainer import run_kd

    params = {**ctx.params, "on_policy": False if off_policy else None}
    cfg = _needs_data(configure(KDConfig, params, ignore=("out", "off_policy")))
    if not cfg.teacher:
        raise UserError("Give the --teacher folder to distil (or a --config kd.yaml that names one).")
    summary = run_kd(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/kd.yaml
    console.print(
        f"[bold green]student saved to {out}[/] ({cfg.method}): best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


@command()
def rouge(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Saved model folder (with its tokenizer; or set in --config).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option(help="Instruction file to score; repeat --data for several datasets.")
    ] = None,
    fmt: FmtOption = None,
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated sampling seeds (default 10,20,30,40,50).")
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Greedy decoding, one pass, instead of sampling over seeds.")
    ] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 1.0).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (default 1.0 = off).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling (default 0 = off).")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="Generated tokens per response, cut earlier at end-of-text (default 128)."),
    ] = None,
    max_prompt: MaxPromptOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Prompts generated together with left padding and the KV cache (default 16)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many examples per file.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the report (per dataset, per task, per seed) as JSON here, rouge.yaml beside it."
        ),
    ] = None,
) -> None:
    """Generate responses and score ROUGE-L F1 x100 per dataset and task, mean and std over seeds."""
    from moe_understudy.config import RougeConfig
    from moe_understudy.eval.rouge import run_rouge

    start = RougeConfig(data=tuple(data)) if data else None  # RougeConfig() alone lacks files to score
    cfg = configure(RougeConfig, ctx.params, start=start)
    run_rouge(cfg, console=console)
    if cfg.out:
        write_replay(cfg, Path(cfg.out).with_name("rouge.yaml"))


def _needs_data(cfg):
    """`cfg` when it names its instruction data; else one sentence asking for --data."""
    if not cfg.data:
        raise UserError("Give the instruction file with --data (or a --config YAML that names it).")
    return cfg


def _fmt_rouge(value) -> str:
    return "n/a (no validation examples)" if value is None else f"{value:.2f}"
