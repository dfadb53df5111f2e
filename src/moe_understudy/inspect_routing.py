"""Routing inspection: how evenly each MoE layer spreads tokens over its experts.

`routing_load` runs blocks through a model and counts assignments per (layer, expert); the summary
functions are pure tensor code so they serve the teacher report, `understudy inspect` and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_understudy.moe.adapters import find_moe_layers


@dataclass(frozen=True)
class LoadStats:
    """Expert load of a model over some text.

    counts:       (L, E) assignments per layer and expert, summed over all batches
    batch_ratios: (L, B) max/mean expert load of each layer in each batch ("per layer-batch")
    layers:       decoder-layer index of each row
    """

    counts: torch.Tensor
    batch_ratios: torch.Tensor
    layers: tuple[int, ...]

    def max_over_mean(self) -> torch.Tensor:
        """(L,) max/mean load of the pooled counts per layer."""
        return max_over_mean(self.counts)

    def mean_batch_ratio(self) -> torch.Tensor:
        """(L,) mean over batches of the per-batch max/mean load."""
        return self.batch_ratios.mean(dim=1)

    def hottest_share(self) -> torch.Tensor:
        """(L,) fraction of all assignments of each layer that go to its most-loaded expert (pooled)."""
        c = self.counts.float()
        return c.max(dim=-1).values / c.sum(dim=-1).clamp_min(1e-12)

    def entropy(self) -> torch.Tensor:
        """(L,) entropy (nats) of the pooled expert-usage distribution; log(E) is perfectly even."""
        return usage_entropy(self.counts)

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "tokens_per_expert": self.counts.tolist(),
            "max_over_mean_pooled": [round(v, 4) for v in self.max_over_mean().tolist()],
            "max_over_mean_per_batch": [round(v, 4) for v in self.mean_batch_ratio().tolist()],
            "hottest_expert_share": [round(v, 4) for v in self.hottest_share().tolist()],
            "entropy": [round(v, 4) for v in self.entropy().tolist()],
        }


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """counts (..., E) -> (...) max load divided by mean load (1.0 is perfectly balanced)."""
    c = counts.float()
    return c.max(dim=-1).values / c.mean(dim=-1).clamp_min(1e-12)


def usage_entropy(counts: torch.Tensor) -> torch.Tensor:
    """counts (..., E) -> (...) entropy in nats of the normalised counts."""
    p = counts.float() / counts.float().sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


@torch.no_grad()
def routing_load(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress=None) -> LoadStats:
    """Count expert assignments of `model` over `blocks` (N, S) in batches of `batch_size`."""
    layers = find_moe_layers(model)
    per_batch: list[list[torch.Tensor]] = [[] for _ in layers]

    def recorder(i: int):
        def hook(_module, _inputs, output):
            indices = output[2]
            per_batch[i].append(torch.bincount(indices.reshape(-1).cpu(), minlength=layers[i].num_experts))

        return hook

    handles = [layer.block.gate.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start : start + batch_size].to(device))
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
    stacked = torch.stack([torch.stack(b) for b in per_batch])  # (L, B, E)
    return LoadStats(
        counts=stacked.sum(dim=1),
        batch_ratios=max_over_mean(stacked),
        layers=tuple(layer.index for layer in layers),
    )


def save_heatmap(stats: LoadStats, path: str | Path, title: str = "tokens per expert") -> Path:
    """Write a (layer x expert) heatmap of the share of assignments each expert receives."""
    from moe_understudy.report import pyplot, save_figure

    plt = pyplot()

    share = stats.counts.float() / stats.counts.float().sum(dim=1, keepdim=True)
    num_layers, num_experts = share.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * num_experts + 2), max(2.5, 0.5 * num_layers + 1.5)))
    im = ax.imshow(share.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), [str(i) for i in stats.layers])
    ratios = stats.mean_batch_ratio().tolist()
    for row, ratio in enumerate(ratios):
        ax.text(num_experts - 0.5, row, f" max/mean {ratio:.2f}", va="center", fontsize=8, color="black")
    fig.colorbar(im, ax=ax, label="share of assignments")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def inspect_model(cfg, console) -> LoadStats:
    """`understudy inspect`: route held-out text (an `InspectConfig`) through a model and print its expert load."""
    import json

    from rich.table import Table

    from moe_understudy.data import load_corpus, pack_blocks
    from moe_understudy.moe.loading import load_model_and_tokenizer

    model_path, batch_size, heatmap, json_out = cfg.model, cfg.batch_size, cfg.heatmap, cfg.json_out
    block_size = cfg.data.block_size
    model, tokenizer = load_model_and_tokenizer(model_path, cfg.device, cfg.dtype)
    find_moe_layers(model)  # fail early, with the families we support, on a model without MoE layers
    corpus = load_corpus(cfg.data)
    blocks = pack_blocks(corpus.val or corpus.train, tokenizer, block_size, max_blocks=cfg.blocks)
    stats = routing_load(model, blocks, batch_size=batch_size)

    table = Table(
        title=f"expert load of {model_path} on {len(blocks)} x {block_size} tokens of {corpus.name}"
    )
    table.add_column("layer", justify="right")
    table.add_column("tokens per expert")
    table.add_column("max/mean (pooled)", justify="right")
    table.add_column(f"max/mean (per {batch_size}-block batch)", justify="right")
    table.add_column("entropy / log E", justify="right")
    log_e = torch.log(torch.tensor(float(stats.counts.shape[1])))
    for row, layer in enumerate(stats.layers):
        table.add_row(
            str(layer),
            " ".join(str(c) for c in stats.counts[row].tolist()),
            f"{stats.max_over_mean()[row]:.2f}",
            f"{stats.mean_batch_ratio()[row]:.2f}",
            f"{(stats.entropy()[row] / log_e):.3f}",
        )
    console.print(table)
    if heatmap is not None:
        console.print(
            f"heatmap written to {save_heatmap(stats, heatmap, title=f'expert load: {Path(model_path).name}')}"
        )
    if json_out is not None:
        Path(json_out).write_text(json.dumps(stats.to_dict(), indent=2))
        console.print(f"figures written to {json_out}")
    return stats
