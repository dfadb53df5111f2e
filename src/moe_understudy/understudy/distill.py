"""Workflow of `understudy distill`: layer-wise fits from a capture store, then optional end-to-end.

Output folder:
  distill.yaml                 the DistillConfig of the run
  layerwise/layer{L}.safetensors + layer{L}.json   per-layer result; the .json is the done marker
  layerwise/config.json + understudies.safetensors the layer-wise set (kept after end-to-end)
  config.json + understudies.safetensors           the final set (end-to-end when it ran)
  report.json                  per-layer held-out error, cost, perplexities and KL before/after
  e2e_checkpoint.pt            end-to-end state every `checkpoint_every` steps (removed when it ends)
A rerun with `resume` skips layers whose marker exists, continues an interrupted end-to-end stage
from its checkpoint and reuses a finished one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from moe_understudy.capture import CaptureStore, spread_blocks
from moe_understudy.config import DistillConfig
from moe_understudy.errors import UserError
from moe_understudy.files import atomic_save_tensors, load_tensors
from moe_understudy.moe.adapters import MoELayer, find_moe_layers
from moe_understudy.progress import stage_bar
from moe_understudy.understudy.assignment import overflow_ranks
from moe_understudy.understudy.e2e import train_end_to_end
from moe_understudy.understudy.io import load_understudies, save_understudies
from moe_understudy.understudy.layerwise import AssignmentObjective, CombinedObjective, fit_layer
from moe_understudy.understudy.modules import ASSIGNMENT_ARCHS, build_understudy, cost_ratio
from moe_understudy.understudy.replace import substituted

E2E_CHECKPOINT = "e2e_checkpoint.pt"


@dataclass(frozen=True)
class DistillResult:
    out_dir: Path
    report: dict


def arch_kwargs(cfg: DistillConfig, store: CaptureStore, layer: MoELayer) -> dict:
    """Keyword arguments of build_understudy for `cfg.arch` (None values mean the arch default)."""
    if cfg.arch in ("dense", "merged"):
        kw: dict = {"intermediate": cfg.intermediate}
        if cfg.arch == "merged":
            kw["usage"] = store.usage(layer.index)
        return kw
    if cfg.arch == "lowrank":
        return {"rank": cfg.rank, "intermediate": cfg.intermediate}
    if cfg.arch == "small_moe":
        return {
            "num_experts": cfg.num_experts,
            "intermediate": cfg.intermediate,
            "top_k": cfg.top_k,
            "init": "teacher",
            "usage": store.usage(layer.index),
        }
    if cfg.arch == "trunk":
        return {
            "width": cfg.width,
            "film": cfg.film,
            "adapter_rank": adapter_ranks(cfg, store, layer),
            "width_per_pair": cfg.width_per_pair,
            "init": cfg.init,
            "usage": store.usage(layer.index),
        }
    return {"kind": cfg.kind, "width": cfg.width, "init": cfg.init}


def adapter_ranks(cfg: DistillConfig, store: CaptureStore, layer: MoELayer) -> int | tuple[int, ...]:
    """The trunk's adapter rank, or with `overflow` allocation one per expert: E x adapter_rank ranks
    shared out by each expert's overflow mass (combine weight x how often it overflows under score
    priority) over the store's training rows."""
    if cfg.adapter_allocation == "uniform" or not cfg.adapter_rank:
        return cfg.adapter_rank
    rows = store.load(layer.index)
    focus = AssignmentObjective(
        layer, extra=0, serving=cfg.focus_cfs or (1.0, 1.25, 1.5, 2.0), batch_rows=cfg.focus_batch_rows
    )
    mass = (focus.overflow_frequency(rows) * rows["weights"].float()).reshape(-1)
    per_expert = torch.bincount(rows["indices"].long().reshape(-1), weights=mass, minlength=layer.num_experts)
    cap = cfg.adapter_max_rank or 2 * cfg.adapter_rank
    return overflow_ranks(per_expert, layer.num_experts * cfg.adapter_rank, cap)


def layer_objective(cfg: DistillConfig, layer: MoELayer):
    """What a layer's stand-in is fitted to: per-assignment expert targets (assignment level), else y."""
    if cfg.arch in ASSIGNMENT_ARCHS and cfg.objective == "auto":
        return AssignmentObjective(
            layer,
            extra=cfg.extra_experts,
            serving=cfg.focus_cfs,
            batch_rows=cfg.focus_batch_rows,
            weight_power=cfg.pair_weight_power,
        )
    return CombinedObjective(cfg.loss)


@torch.no_grad()
def perplexity_with(
    model: nn.Module, blocks: torch.Tensor, understudies: dict[int, nn.Module] | None, batch_size: int = 8
) -> float:
    """Held-out perplexity of `model` over `blocks` (N, S), every MoE layer in `understudies` fully replaced."""
    from moe_understudy.eval.metrics import perplexity

    with substituted(model, understudies or {}, fraction=1.0):
        return perplexity(model, blocks, batch_size)


def _check_out_dir(cfg: DistillConfig, out: Path, resume: bool) -> None:
    saved = out / "distill.yaml"
    if not saved.exists():
        return
    if not resume:
        raise UserError(
            f"{out} already holds a distillation run; pass --resume to continue it or choose a new --out."
        )
    before = DistillConfig.from_yaml(saved)
    if before != cfg:
        raise UserError(
            f"{out} was started with different settings (see {saved}); resume with the same options or choose a new --out."
        )


def fit_layers(
    cfg: DistillConfig, model: nn.Module, store: CaptureStore, out: Path, console: Console
) -> tuple[dict[int, nn.Module], dict[int, dict]]:
    """Fit (or reload, when its marker exists) one understudy per MoE layer."""
    folder = out / "layerwise"
    folder.mkdir(parents=True, exist_ok=True)
    understudies: dict[int, nn.Module] = {}
    metrics: dict[int, dict] = {}
    progress = stage_bar(
        "[bold]layer-wise[/] layer {task.fields[layer]}",
        "step {task.completed}/{task.total}  held-out rel. error {task.fields[err]:.4f}",
        console=console,
        count=False,
        eta=False,
    )
    with progress:
        for layer in find_moe_layers(model):
            L = layer.index
            module = build_understudy(cfg.arch, layer, seed=cfg.seed + L, **arch_kwargs(cfg, store, layer))
            marker, weights = folder / f"layer{L}.json", folder / f"layer{L}.safetensors"
            if marker.exists() and weights.exists():
                module.load_state_dict(load_tensors(weights, f"delete {marker} to fit layer {L} again"))
                understudies[L], metrics[L] = module.eval(), json.loads(marker.read_text())
                continue
            train, val = store.load(L, "train"), store.load(L, "val")
            task = progress.add_task("", total=cfg.steps, layer=L, err=float("nan"))

            def show(step: int, err: float, task=task) -> None:
                progress.update(task, completed=step, err=err)

            fit = fit_layer(
                module,
                train,
                val,
                objective=layer_objective(cfg, layer),
                steps=cfg.steps,
                batch_tokens=cfg.batch_tokens,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                warmup=cfg.warmup,
                eval_every=cfg.eval_every,
                patience=cfg.patience,
                seed=cfg.seed + L,
                on_check=show,
            )
            progress.update(task, completed=cfg.steps)
            metrics[L] = {
                "val_rel_error_start": round(fit.val_error_start, 5),
                "val_rel_error": round(fit.val_error, 5),
                "steps": fit.steps,
                "params": module.param_count(),
                "flops_per_token": module.flops_per_token(),
                "layer_active_flops_per_token": layer.active_expert_flops_per_token(),
                "cost": round(cost_ratio(module, layer), 4),
                # per device per MoE layer, in routed experts (the stand-in is replicated on every device)
                "memory_expert_equiv": round(module.memory_expert_equiv(layer.expert_params()), 4),
            }
            atomic_save_tensors(module.state_dict(), weights)
            marker.write_text(json.dumps(metrics[L], indent=1))  # written last: the layer is done
            understudies[L] = module
    return understudies, metrics


def run_distill(cfg: DistillConfig, resume: bool = False, console: Console | None = None) -> DistillResult:
    """Distil understudies for `cfg.model` from `cfg.store` into `cfg.out` (see the module docstring)."""
    from moe_understudy.data import load_corpus
    from moe_understudy.moe.loading import load_model_and_tokenizer

    console = console or Console(stderr=True)
    out = Path(cfg.out)
    _check_out_dir(cfg, out, resume)
    store = CaptureStore(cfg.store)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    store.check_model(find_moe_layers(model))
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "distill.yaml")
    torch.manual_seed(cfg.seed)

    understudies, metrics = fit_layers(cfg, model, store, out, console)
    device = next(model.parameters()).device
    for module in understudies.values():  # fp32 master weights beside a model of any dtype
        module.to(device=device, dtype=torch.float32)
    save_understudies(out / "layerwise", understudies, model)
    report: dict = {"config": cfg.to_dict(), "layers": {str(k): v for k, v in metrics.items()}}

    e2e = cfg.e2e
    corpus = load_corpus(e2e.data)
    S = e2e.data.block_size
    val_blocks = spread_blocks(corpus.val, tokenizer, S, e2e.eval_blocks, seed=e2e.seed + 2)
    report["ppl_teacher"] = round(perplexity_with(model, val_blocks, None), 4)
    report["ppl_layerwise"] = round(perplexity_with(model, val_blocks, understudies), 4)
    e2e_done = out / "e2e.json"
    if e2e.steps > 0 and resume and e2e_done.exists() and (out / "config.json").exists():
        understudies = load_understudies(out, model, dtype=torch.float32)
        report["e2e"] = json.loads(e2e_done.read_text())
    elif e2e.steps > 0:
        train_blocks = spread_blocks(corpus.train, tokenizer, S, e2e.blocks, seed=e2e.seed, oversample=4)
        res = train_end_to_end(
            model,
            understudies,
            train_blocks,
            e2e,
            val_blocks=val_blocks,
            console=console,
            checkpoint=out / E2E_CHECKPOINT,
        )
        report["e2e"] = {
            "kl_before": round(res.kl_before, 5),
            "kl_after": round(res.kl_after, 5),
            "steps": res.steps,
            "history": res.history,
        }
        save_understudies(out, understudies, model)
        e2e_done.write_text(json.dumps(report["e2e"], indent=1))
    else:
        save_understudies(out, understudies, model)
    if e2e.steps > 0:
        report["ppl_e2e"] = round(perplexity_with(model, val_blocks, understudies), 4)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    console.print(summary_table(report))
    return DistillResult(out_dir=out, report=report)


def summary_table(report: dict) -> Table:
    """Rich table: per-layer held-out error and cost, then whole-model perplexities."""
    table = Table(title="understudies")
    for col in ("layer", "held-out rel. error", "params", "cost (x active experts)", "steps"):
        table.add_column(col, justify="right")
    for L, m in report["layers"].items():
        table.add_row(L, f"{m['val_rel_error']:.4f}", f"{m['params']:,}", f"{m['cost']:.3f}", str(m["steps"]))
    teacher = report["ppl_teacher"]
    rows = [("teacher ppl", teacher), ("all replaced, layer-wise", report["ppl_layerwise"])]
    if "ppl_e2e" in report:
        rows.append(("all replaced, end-to-end", report["ppl_e2e"]))
    for name, ppl in rows:
        delta = "" if name == "teacher ppl" else f" ({100 * (ppl / teacher - 1):+.1f}%)"
        table.add_row(name, f"{ppl:.3f}{delta}", "", "", "")
    return table


def run_replace_eval(
    model_path: str,
    understudies_path: str,
    data,
    blocks: int = 32,
    console: Console | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Reload saved understudies onto `model_path` and compare perplexity with every MoE layer replaced.

    The model comes in `dtype` on `device`; the understudies follow it.
    """
    from moe_understudy.data import load_corpus
    from moe_understudy.moe.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, device, dtype)
    understudies = load_understudies(understudies_path, model)
    val = spread_blocks(load_corpus(data).val, tokenizer, data.block_size, blocks, seed=data.seed + 2)
    teacher = perplexity_with(model, val, None)
    replaced = perplexity_with(model, val, understudies)
    result = {
        "ppl_teacher": round(teacher, 4),
        "ppl_replaced": round(replaced, 4),
        "increase_pct": round(100 * (replaced / teacher - 1), 2),
    }
    layers = find_moe_layers(model)
    result["cost"] = {
        str(ly.index): round(cost_ratio(understudies[ly.index], ly), 4)
        for ly in layers
        if ly.index in understudies
    }
    return result
