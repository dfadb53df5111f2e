"""`understudy serve-eval`: generation under load (continuous-batched greedy decoding per policy x capacity)."""

from __future__ import annotations

import typer

from moe_understudy.cli.common import LOAD, ModelArgument, command, console
from moe_understudy.cli.fields import Stage
from moe_understudy.config import ServeConfig

SERVE = Stage(
    ServeConfig,
    {
        "data": "Prompts: heldout (default: the model's held-out text), domain_shift (prose) or an instruction file.",
        "fmt": "Instruction format of a --data file.",
        "prompts": "Prompts served, N.",
        "prompt_tokens": "Prompt length: held-out blocks cut to it, instruction prompts cut from the left.",
        "new_tokens": "Greedy tokens generated per prompt.",
        "slots": "Sequences decoding at once (default: all N); a finished sequence's slot goes to a waiting prompt.",
        "mode": "decode: decode steps under each policy; prefill: prompt chunks under each policy.",
        "prefill_chunk": "Prefill positions per forward call (default: whole prompts).",
        "devices": "Devices the experts are spread over when counting all-to-all bytes.",
        "noise_floor": "Also run the unpatched model with another batch composition, and in bfloat16.",
        "bf16_floor": "Include the bfloat16 run in the noise floor.",
        "out": "Report folder: report.json, report.png and serve.yaml.",
    },
    renames={"devices": "num_devices"},
    paths=("out",),
)


@command("serve-eval", lead=LOAD, stage=SERVE)
def serve_eval(ctx: typer.Context, model: ModelArgument = None) -> None:
    """Generation under load: decode-step agreement teacher-forced along the unpatched greedy run, free-running
    sequence figures, overflow per step, tokens/s and bytes, for each policy x capacity factor."""

    from moe_understudy.eval.serve import run_serve

    params = {**ctx.params, "model": model or (None if ctx.params["config"] else "runs/teacher")}
    cfg = SERVE.configure(params)
    run_serve(cfg, console)  # writes OUT/serve.yaml
