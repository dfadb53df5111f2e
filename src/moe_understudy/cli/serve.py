"""`understudy serve-eval`: generation under load (continuous-batched greedy decoding per policy x capacity)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import app, console, given, split, user_errors
from moe_understudy.errors import UserError


@app.command("serve-eval")
@user_errors
def serve_eval(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Saved MoE model folder (from `understudy teacher`) with its tokenizer (or set in --config)."
        ),
    ] = None,
    understudies: Annotated[
        str | None,
        typer.Option(
            help="Stand-in folder from `understudy distill`; needed by understudy, layer, deadline, shadow, expanded_shadow."
        ),
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(help="Comma-separated policies compared with full (default full,drop,expanded_drop)."),
    ] = None,
    capacity: Annotated[
        str | None,
        typer.Option(
            help="Capacity factors (default 1,1.5,2); capacity = ceil(cf * tokens of the step * k / experts)."
        ),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(
            help="Which assignments overflow first: score (default, lowest router weight) or position."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Prompts: heldout (default: the model's held-out text), domain_shift (prose) or an instruction file."
        ),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option(help="Instruction format of a --data file (default auto).")
    ] = None,
    prompts: Annotated[int | None, typer.Option(help="Prompts served, N (default 64).")] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(
            help="Prompt length: held-out blocks cut to it, instruction prompts cut from the left (default 64)."
        ),
    ] = None,
    new_tokens: Annotated[
        int | None, typer.Option(help="Greedy tokens generated per prompt (default 32).")
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option(
            help="Sequences decoding at once (default: all N); a finished sequence's slot goes to a waiting prompt."
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="decode (default): decode steps under each policy; prefill: prompt chunks under each policy."
        ),
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="Prefill positions per forward call (default: whole prompts).")
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(help="Devices the experts are spread over when counting all-to-all bytes (default 4)."),
    ] = None,
    noise_floor: Annotated[
        bool | None,
        typer.Option(
            help="Also run the unpatched model with another batch composition, and in bfloat16 (default on)."
        ),
    ] = None,
    bf16_floor: Annotated[
        bool | None, typer.Option(help="Include the bfloat16 run in the noise floor (default on).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder: report.json, report.png and serve.yaml (default runs/serve)."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Torch device (default cpu).")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Read options from a serve.yaml (flags given here override it).")
    ] = None,
) -> None:
    """Generation under load: decode-step agreement teacher-forced along the unpatched greedy run, free-running
    sequence figures, overflow per step, tokens/s and bytes, for each policy x capacity factor."""
    from moe_understudy.config import ServeConfig
    from moe_understudy.eval.serve import run_serve

    if model is None and config is None:
        raise UserError("Give the MODEL folder to serve (or a --config serve.yaml that names one).")
    if config is not None and not config.is_file():
        raise UserError(f"--config {config} is not a file; pass the serve.yaml a serve-eval run wrote.")
    try:
        base = ServeConfig.from_yaml(config) if config else ServeConfig()
        cfg = base.replace(
            **given(
                model=model,
                understudies=understudies,
                policies=split(policies, str, "policies"),
                capacities=split(capacity, float, "capacity factors"),
                priority=priority,
                data=data,
                fmt=fmt,
                prompts=prompts,
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
                slots=slots,
                mode=mode,
                prefill_chunk=prefill_chunk,
                num_devices=devices,
                noise_floor=noise_floor,
                bf16_floor=bf16_floor,
                out=str(out) if out is not None else None,
                device=device,
            )
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    run_serve(cfg, console)
