"""Generation under load: decode-step agreement of every overflow policy, teacher-forced along the
unpatched model's own greedy generation, beside the free-running figures and the noise floor.

N prompts (held-out text cut to --prompt-tokens) are served together with a KV cache; each decode
step feeds one token per running sequence, so its capacity ceil(cf * tokens * k / E) is over the
sequences running in that step (all N with the default slots). Prefill runs unpatched, so the
figures are decode steps' alone (positions 2..n of the new tokens). See eval/serve.py.

Systems: full, then every policy at every capacity factor. Policies that need no stand-in (drop,
expanded_drop, reroute, ...) run once; each --understudies set runs the policies of its level
(token-level: understudy / layer / deadline; assignment-level: shadow / expanded_shadow); a
stand-in policy with no set of its level is skipped and listed as such.

    .venv/bin/python benchmarks/serve_decode.py --model runs/teacher
    .venv/bin/python benchmarks/serve_decode.py --model runs/teacher --understudies runs/us-dense runs/us-shadows
    .venv/bin/python benchmarks/serve_decode.py --model runs/teacher-fine --understudies ... --name serve_decode_fine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.config import ServeConfig  # noqa: E402
from moe_understudy.eval.quality import stand_in_sizes  # noqa: E402
from moe_understudy.eval.serve import (  # noqa: E402
    Batching,
    check_context,
    decode_rows,
    load_prompts,
    noise_floor_rows,
    plot_serving,
    reference_run,
    serve_table,
    token_text,
)
from moe_understudy.moe.adapters import find_moe_layers  # noqa: E402
from moe_understudy.moe.standins import ASSIGNMENT, TOKEN, level_of  # noqa: E402
from moe_understudy.runtime.policies import NEEDS_SHADOWS, NEEDS_UNDERSTUDY  # noqa: E402

NAME = "serve_decode"
console = Console(stderr=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/teacher", help="saved teacher folder")
    p.add_argument(
        "--understudies", nargs="*", default=[], help="stand-in set folders (each from `understudy distill`)"
    )
    p.add_argument("--policies", default="drop,expanded_drop,understudy,shadow,expanded_shadow")
    p.add_argument("--capacities", default="1.0,1.5,2.0")
    p.add_argument("--priority", default="score", choices=["score", "position"])
    p.add_argument("--data", default="heldout", help="heldout, domain_shift or an instruction file")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--slots", type=int, default=None, help="sequences decoding at once (default: all prompts)"
    )
    p.add_argument("--devices", type=int, default=4, help="devices for all-to-all byte counting")
    p.add_argument("--no-bf16", action="store_true", help="leave the bfloat16 run out of the noise floor")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=NAME, help="result name under benchmarks/results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from moe_understudy.moe.loading import load_model_and_tokenizer
    from moe_understudy.understudy.io import load_understudies

    policies = [p for p in args.policies.split(",") if p and p != "full"]
    capacities = [float(c) for c in args.capacities.split(",")]
    cfg = ServeConfig(
        model=args.model,
        data=args.data,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        slots=args.slots,
        priority=args.priority,
        num_devices=args.devices,
        policies=tuple(policies) or ("full",),
        capacities=tuple(capacities),
    )
    model, tokenizer = load_model_and_tokenizer(args.model)
    layers = find_moe_layers(model)
    prompts = load_prompts(cfg, tokenizer)
    check_context(model, prompts, args.new_tokens, args.model)
    eos = tokenizer.eos_token_id
    batching = Batching(
        slots=args.slots or len(prompts),
        new_tokens=args.new_tokens,
        eos_id=-1 if eos is None else int(eos),
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)),
    )
    text = token_text(tokenizer, batching.eos_id)
    common = dict(priority=args.priority, num_devices=args.devices, text=text)
    t0 = time.time()
    reference = reference_run(model, prompts, batching)
    noise = noise_floor_rows(model, prompts, batching, reference, text=text, bf16=not args.no_bf16)
    stand_in_policies = NEEDS_UNDERSTUDY + NEEDS_SHADOWS
    plain = [p for p in policies if p not in stand_in_policies]
    rows = decode_rows(model, None, prompts, batching, plain, capacities, reference, **common)
    ran: set[str] = set()
    for folder in args.understudies:
        sets = load_understudies(folder, model)
        level = level_of(next(iter(sets.values())))
        wanted = [
            p
            for p in policies
            if (p in NEEDS_UNDERSTUDY and level == TOKEN) or (p in NEEDS_SHADOWS and level == ASSIGNMENT)
        ]
        if not wanted:
            console.print(f"[yellow]{folder}: no requested policy uses a {level}-level stand-in; skipped[/]")
            continue
        cost = stand_in_sizes(model, sets)["cost"]
        got = decode_rows(
            model, sets, prompts, batching, wanted, capacities, reference, with_full=False, **common
        )
        rows += [
            {
                **r,
                "policy": f"{r['policy']} ({Path(folder).name}, cost {cost:.2f})",
                "base_policy": r["policy"],
                "understudies": folder,
            }
            for r in got
        ]
        ran.update(wanted)
    skipped = [p for p in policies if p in stand_in_policies and p not in ran]
    seconds = time.time() - t0
    for r in rows:
        r.setdefault("base_policy", r["policy"])

    title = (
        f"serving: {len(prompts)} prompts x {args.new_tokens} new tokens, {batching.slots} slots, "
        f"priority {args.priority}, {Path(args.model).name}"
    )
    Console(width=200).print(serve_table(rows, noise, title))
    if skipped:
        console.print(f"skipped (no stand-in set of their level given): {', '.join(skipped)}")
    png = plot_serving(rows, noise, RESULTS / f"{args.name}.png", title)
    path = write_result(
        args.name,
        {
            "model": args.model,
            "model_layers": len(layers),
            "experts": layers[0].num_experts,
            "top_k": layers[0].top_k,
            "hidden": layers[0].hidden_size,
            "data": args.data,
            "prompts": len(prompts),
            "prompt_tokens": max(map(len, prompts)),
            "new_tokens": args.new_tokens,
            "slots": batching.slots,
            "priority": args.priority,
            "capacities": capacities,
            "understudy_sets": args.understudies,
            "skipped_policies": skipped,
            "seconds": round(seconds, 1),
            "reference_tokens_per_s": sum(map(len, reference.tokens)) / max(reference.served.seconds, 1e-9),
            "notes": "Headline: top-1 agreement at each decode position, teacher-forced along the unpatched "
            "model's greedy generation (each step fed the unpatched token; the batch composition of every step "
            "is the reference's), KL(full || system) per position beside it. Prefill is unpatched, so the "
            "positions are new tokens 2..n. Free-running: each system's own greedy tokens vs the unpatched "
            "generation (identical sequences, matching-prefix fraction, ROUGE-L F1 x100 of the decoded texts). "
            "Capacity ceil(cf*T*k/E) per layer and decode step of T = running sequences. overflow_frac: "
            "assignments beyond capacity / all assignments. bytes_per_token: dispatch + combine over "
            f"{args.devices} devices (contiguous experts and tokens) per layer-token, fp32 hidden. tokens_per_s: "
            "free-running throughput of this CPU process (the runtime simulates the devices; stand-ins run "
            "locally), a relative figure only.",
            "noise_floor": noise,
            "plot": str(png),
            "rows": rows,
        },
    )
    console.print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
