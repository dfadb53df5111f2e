"""`understudy sft`, `kd`, `rouge`: instruction tuning, whole-model MoE distillation, ROUGE-L."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import TRAIN, command, console, write_replay
from moe_understudy.cli.fields import Stage
from moe_understudy.config import KDConfig, RougeConfig, SFTConfig
from moe_understudy.errors import UserError

# Options that sft and kd share, fields of config.InstructionRun (one declaration, one help text).
_INSTRUCTIONS = {
    "fmt": "Instruction format of the files (auto: detected from the first row).",
    "val_data": "Validation file for checkpoint selection (default: hold out --val-examples rows of --data).",
    "val_examples": "Validation examples scored by greedy ROUGE-L (0 keeps the last model).",
    "max_examples": "Use at most this many training examples.",
    "max_prompt": "Prompt tokens kept, cut from the left.",
    "max_total": "Prompt + response tokens kept.",
}
_VALIDATION = {
    "eval_every": "Steps between validation ROUGE-L checks and checkpoints.",
    "max_new_tokens": "Generated tokens per validation response.",
}
SFT = Stage(
    SFTConfig,
    {
        "data": "Instruction file (.jsonl/.json, optionally .gz): Dolly, Alpaca, prompt/response, "
        "prompt/completion or Self-Instruct rows.",
        "model": "Preset name to train from scratch (e.g. mixtral, quick, quick-student) or a saved model folder "
        "to fine-tune.",
        "tokenizer": "Tokenizer folder for a preset model (default: train a BPE on --data).",
        "vocab_size": "BPE vocabulary when a tokenizer is trained here.",
        **_INSTRUCTIONS,
        "steps": "Optimiser steps.",
        "batch_size": "Examples per step.",
        "lr": "Peak AdamW learning rate.",
        "warmup": "Linear warm-up steps.",
        **_VALIDATION,
    },
)


@command(tail=TRAIN, stage=SFT)
def sft(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: the model chosen by validation ROUGE-L (save_pretrained + tokenizer), checkpoint/, sft_log.json."
        ),
    ],
) -> None:
    """Fine-tune a model on instruction data with the prompt masked from the loss (teacher or student)."""
    from moe_understudy.kd.sft import run_sft

    cfg = _needs_data(SFT.configure(ctx.params, ignore=("out",)))
    summary = run_sft(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/sft.yaml
    console.print(
        f"[bold green]model saved to {out}[/]: best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


KD = Stage(
    KDConfig,
    {
        "data": "Instruction file with the prompts (and responses, for --method kd or --off-policy).",
        "teacher": "Saved MoE teacher folder (e.g. from `understudy sft --model mixtral`); its tokenizer is used.",
        "method": "kd (forward KL on dataset responses), gkd (reverse KL on student samples), all (teacher runs every expert), ka (Knowledge Augmentation: --ka-passes teacher passes per input, losses averaged into one update), sar (Student-Aware Router: a teacher-router step minimising KL(teacher || student) through the routers, the direction of EEM's finetune_sfr.py, mode-seeking toward what the student can fit, + load balancing under the router's own scores; then the student step), bdistill (MoE student: MC exploration + router distillation; our formulation from B-Distill's public abstract).",
        "student": "Student: a preset (quick-student, llama-student, quick-moe-student, moe-student) or a saved "
        "folder sharing the teacher's tokenizer.",
        "divergence": "fkl, rkl, skew_fkl or skew_rkl (default: fkl for kd, rkl otherwise).",
        **_INSTRUCTIONS,
        "gen_max_new_tokens": "Length of student-sampled responses.",
        "steps": "Optimiser steps, one student update each, every method.",
        "batch_size": "Prompts per step.",
        "lr": "Peak student learning rate.",
        "warmup": "Linear warm-up steps.",
        "ka_experts": "KA: experts the teacher activates per layer (default N-1).",
        "ka_lambda": "KA: per-token probability of sampling experts instead of taking the top ones.",
        "ka_passes": "KA: teacher passes per input per step, averaged into one update.",
        "sar_lr": "SAR: learning rate of the teacher-router optimiser.",
        "sar_beta": "SAR: weight of the load-balancing loss.",
        "explore_eps": "B-Distill: uniform mixing of router probabilities for exploration.",
        "router_kl_weight": "B-Distill: weight of the router KL.",
        "entropy_floor": "B-Distill: router entropy floor as a fraction of log(experts).",
        "entropy_weight": "B-Distill: weight of the entropy-floor penalty.",
        **_VALIDATION,
    },
)


@command(tail=("seed", "device", "train_dtype", "resume", "debug"), stage=KD)
def kd(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(help="Run folder: the student chosen by validation ROUGE-L, checkpoint/, kd_log.json."),
    ],
    off_policy: Annotated[
        bool,
        typer.Option(
            "--off-policy",
            help="Distil on the dataset's responses instead of student samples (non-kd methods).",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Replay a run: read the options from its kd.yaml (flags given here override them); e.g. teacher_passes: M gives kd/gkd M x batch-size examples per step, KA's teacher forwards."
        ),
    ] = None,
) -> None:
    """Distil a whole MoE teacher into a dense or smaller MoE student (KD, GKD, ALL, KA, SAR, B-Distill)."""
    from moe_understudy.kd.trainer import run_kd

    params = {**ctx.params, "on_policy": False if off_policy else None}
    cfg = _needs_data(KD.configure(params, ignore=("out", "off_policy")))
    if not cfg.teacher:
        raise UserError("Give the --teacher folder to distil (or a --config kd.yaml that names one).")
    summary = run_kd(cfg, out, resume=ctx.params["resume"], console=console)  # writes OUT/kd.yaml
    console.print(
        f"[bold green]student saved to {out}[/] ({cfg.method}): best validation ROUGE-L {_fmt_rouge(summary['best_val_rouge_l'])}"
    )


ROUGE = Stage(
    RougeConfig,
    {
        "fmt": _INSTRUCTIONS["fmt"],
        "seeds": "Comma-separated sampling seeds.",
        "greedy": "Greedy decoding, one pass, instead of sampling over seeds.",
        "temperature": "Sampling temperature.",
        "top_p": "Nucleus sampling mass (1.0 = off).",
        "top_k": "Top-k sampling (0 = off).",
        "max_new_tokens": "Generated tokens per response, cut earlier at end-of-text.",
        "max_prompt": _INSTRUCTIONS["max_prompt"],
        "batch_size": "Prompts generated together with left padding and the KV cache.",
        "limit": "Score at most this many examples per file.",
        "out": "Write the report (per dataset, per task, per seed) as JSON here, rouge.yaml beside it.",
    },
    flags={"greedy": "--greedy"},
    paths=("out",),
)


@command(stage=ROUGE)
def rouge(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Argument(help="Saved model folder (with its tokenizer; or set in --config).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option(help="Instruction file to score; repeat --data for several datasets.")
    ] = None,
) -> None:
    """Generate responses and score ROUGE-L F1 x100 per dataset and task, mean and std over seeds."""
    from moe_understudy.eval.rouge import run_rouge

    start = RougeConfig(data=tuple(data)) if data else None  # RougeConfig() alone lacks files to score
    cfg = ROUGE.configure(ctx.params, start=start)
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
