"""`understudy serve-eval`: generation under load (continuous-batched greedy decoding per policy x capacity)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_understudy.cli.common import LOAD, ModelArgument, command, configure, console


@command("serve-eval", lead=LOAD)
def serve_eval(
    ctx: typer.Context,
    model: ModelArgument = None,
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
) -> None:
    """Generation under load: decode-step agreement teacher-forced along the unpatched greedy run, free-running
    sequence figures, overflow per step, tokens/s and bytes, for each policy x capacity factor."""

    from moe_understudy.config import ServeConfig
    from moe_understudy.eval.serve import run_serve

    params = {**ctx.params, "model": model or (None if ctx.params["config"] else "runs/teacher")}
    cfg = configure(ServeConfig, params, renames={"devices": "num_devices"})
    run_serve(cfg, console)  # writes OUT/serve.yaml
