"""Save and load a set of understudies (one per MoE layer): a self-describing artifact.

Folder layout (`save_pretrained` style), loadable by path or by hub id:
  config.json                  format; what the set was made for: the model id, its family and
                               model_type, hidden size, number of decoder layers, MoE layer indices,
                               num_experts and top_k; the archs and dtype of the weights; per
                               layer the arch and the kwargs that rebuild its shapes ("layers";
                               "int8" names the weights stored in int8) and its parameters and
                               cost ("sizes")
  understudies.safetensors     weights, keys "layer{L}.{parameter}"
  README.md                    a short model card: what it is, what it fits, how to load it
Files are written under temporary names and moved into place, weights first, config after, card
last, so a folder whose config.json exists holds the matching weights. A model whose hidden size,
layers, num_experts or top_k differ from the recorded ones is refused in one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.files import atomic_save_tensors, atomic_write_text, load_tensors
from moe_understudy.moe.adapters import decoder_layers, find_moe_layers
from moe_understudy.moe.standins import StandIn
from moe_understudy.understudy.modules import from_config

FORMAT = "moe-understudy-understudies/2"
READABLE = ("moe-understudy-understudies/1", FORMAT)  # /1 lacks family, num_experts and top_k
CONFIG = "config.json"
WEIGHTS = "understudies.safetensors"
CARD = "README.md"
SAVED_BESIDE = "understudies"  # where a patched model's save_pretrained puts its stand-ins


def model_facts(model: nn.Module) -> dict:
    """What an understudy set records about the model it stands in for."""
    layers = find_moe_layers(model)
    config = getattr(model, "config", None)
    return {
        "model_id": str(getattr(config, "_name_or_path", "") or ""),
        "family": layers[0].family,
        "model_type": str(getattr(config, "model_type", "") or ""),
        "hidden_size": layers[0].hidden_size,
        "num_layers": len(decoder_layers(model)),
        "moe_layers": [ly.index for ly in layers],
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
    }


def save_understudies(out_dir: str | Path, understudies: dict[int, nn.Module], model: nn.Module) -> Path:
    """Write `understudies` {MoE layer index: module} made for `model` into `out_dir`; returns the folder.

    The folder reloads with `load_understudies(out_dir, model)` (or by hub id once uploaded) and
    describes itself: config.json says what model it fits, README.md how to use it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = model_facts(model)
    unknown = sorted(set(understudies) - set(facts["moe_layers"]))
    if unknown:
        raise UserError(
            f"Understudies for layers {unknown} have no MoE layer in the model (it has {facts['moe_layers']})."
        )
    moe = {ly.index: ly for ly in find_moe_layers(model)}
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict] = {}
    sizes: dict[str, dict] = {}  # per layer: parameters, cost (FLOPs / the active routed experts')
    dtypes = set()
    for index, module in sorted(understudies.items()):
        if not isinstance(module, StandIn):
            raise UserError(
                f"Layer {index}: {type(module).__name__} is not an understudy module; build it with build_understudy."
            )
        cost = module.flops_per_token() / moe[index].active_expert_flops_per_token()
        per_layer[str(index)] = {"arch": module.arch, "config": module.config()}
        if module.quantized:  # int8 storage: load re-applies the layout before reading the weights
            per_layer[str(index)]["int8"] = list(module.quantized)
        sizes[str(index)] = {"params": module.param_count(), "cost": round(cost, 4)}
        for name, t in module.state_dict().items():
            tensors[f"layer{index}.{name}"] = t
            dtypes.add(str(t.dtype).removeprefix("torch."))
    config = {
        "format": FORMAT,
        **facts,
        "arch": sorted({spec["arch"] for spec in per_layer.values()}),
        "dtype": ",".join(sorted(dtypes)),
        "layers": per_layer,
        "sizes": sizes,
    }
    atomic_save_tensors(tensors, out / WEIGHTS, metadata={"format": FORMAT})
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2))
    atomic_write_text(out / CARD, model_card(config))
    return out


def model_card(config: dict) -> str:
    """A short README.md for an understudy folder, from its config.json."""
    sizes = config.get("sizes", {})
    rows = "\n".join(
        f"| {k} | {v['arch']} | {sizes.get(k, {}).get('params', '?')} | {sizes.get(k, {}).get('cost', '?')} |"
        for k, v in config["layers"].items()
    )
    return f"""---
library_name: moe-understudy
tags: [moe, mixture-of-experts, understudy]
---
# Understudies for `{config.get("model_id") or "an MoE model"}`

Compact stand-ins, one per MoE layer, that approximate each layer's dispatch + routed-expert
computation; the moe-understudy runtime serves overflowing tokens with them instead of dropping them.

Made for a {config.get("family", "?")} model (model_type `{config.get("model_type", "?")}`): hidden size
{config["hidden_size"]}, {config["num_layers"]} decoder layers, MoE layers {config["moe_layers"]},
{config.get("num_experts", "?")} experts per layer, top-{config.get("top_k", "?")}. Weights: {config.get("dtype", "?")}.
Loading onto a model with other sizes is refused.

| layer | arch | parameters | cost (x active routed experts' FLOPs) |
|---|---|---|---|
{rows}

```python
import moe_understudy as mu
understudies = mu.load_understudies("THIS_FOLDER_OR_HUB_ID", model)  # follows the model's dtype and device
with mu.patch(model, understudies, policy="understudy", capacity_factor=1.0):
    logits = model(input_ids=ids).logits
```
"""


def resolve(path_or_id: str | Path) -> Path:
    """The local folder of an understudy set: `path_or_id` itself, or the hub snapshot of that repo id.

    Hub ids go through huggingface_hub's snapshot logic (offline: the local cache only); an id that
    is neither a folder here nor on the hub (or in the cache when offline) is one sentence.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        return local
    text = str(path_or_id)
    if not _looks_like_repo_id(text):
        raise UserError(
            f"{text} does not exist; pass a folder written by `understudy distill` (or mu.save_understudies) "
            f"or a hub repo id like org/name."
        )
    from huggingface_hub import snapshot_download

    from moe_understudy.data.hub import hub_access

    offline = True
    try:
        with hub_access() as offline:
            return Path(snapshot_download(text, allow_patterns=[CONFIG, WEIGHTS, CARD]))
    except Exception as err:  # RepositoryNotFoundError, LocalEntryNotFoundError, HTTP errors ...
        where = "the local hub cache (offline)" if offline else "the hub"
        raise UserError(
            f"Understudies {text!r} are neither a local folder nor found in {where}; pass a folder written by "
            f"`understudy distill`, or a hub repo id that holds {CONFIG} and {WEIGHTS}."
        ) from err


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~", "/")) and "\\" not in text


def saved_folder(path: str | Path) -> Path:
    """The local folder of saved understudies `path` names (a folder, a hub repo id, or a model
    folder saved from a patched model, which holds them in SAVED_BESIDE)."""
    folder = resolve(path)
    if not (folder / WEIGHTS).is_file() and (folder / SAVED_BESIDE / WEIGHTS).is_file():
        return folder / SAVED_BESIDE
    return folder


def read_config(path: str | Path) -> dict:
    """The config.json of a saved understudy folder (UserError when it is not one)."""
    folder = Path(path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(
            f"{path} holds no saved understudies ({CONFIG} + {WEIGHTS}); create them with `understudy distill`."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{cfg_path} is not valid JSON (truncated?); save the understudies again.") from err
    if not isinstance(config, dict) or config.get("format") not in READABLE:
        raise UserError(f"{cfg_path} is not a {FORMAT} file; re-save the understudies with this version.")
    return config


def check_fits(config: dict, model: nn.Module, where: str | Path) -> None:
    """Refuse, in one sentence, a model whose sizes differ from those the understudies were made for."""
    facts = model_facts(model)
    made = f"The understudies in {where} were made for"
    fix = "distil understudies for this model (understudy distill)."
    if facts["hidden_size"] != config["hidden_size"]:
        raise UserError(
            f"{made} hidden size {config['hidden_size']} but the model has {facts['hidden_size']}; {fix}"
        )
    if facts["num_layers"] != config["num_layers"] or facts["moe_layers"] != config["moe_layers"]:
        raise UserError(
            f"{made} {config['num_layers']} layers with MoE layers {config['moe_layers']} but the model has "
            f"{facts['num_layers']} with {facts['moe_layers']}; {fix}"
        )
    for key, words in (("num_experts", "experts per MoE layer"), ("top_k", "experts per token (top-k)")):
        if key in config and config[key] != facts[key]:
            raise UserError(f"{made} {config[key]} {words} but the model has {facts[key]}; {fix}")


def load_understudies(
    path: str | Path,
    model: nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> dict[int, nn.Module]:
    """{MoE layer index: understudy} saved in `path` (a folder or a hub repo id), checked against `model`.

    Refuses (UserError naming the mismatch) a model whose hidden size, decoder layer count, MoE
    layer list, num_experts or top_k differs from the one the understudies were made for. The
    modules come on `device` in `dtype`, by default the model's own (its MoE router's weights).
    """
    from moe_understudy.moe.loading import resolve_device, resolve_dtype

    folder = saved_folder(path)
    config = read_config(folder)
    check_fits(config, model, path)
    gate = find_moe_layers(model)[0].block.gate.weight
    device = gate.device if device is None else resolve_device(device)
    dtype = gate.dtype if dtype is None else resolve_dtype(dtype)
    weights = load_tensors(
        folder / WEIGHTS, "save the understudies again (understudy distill --resume, or mu.save_understudies)"
    )
    out: dict[int, nn.Module] = {}
    for key, spec in config["layers"].items():
        module = from_config(spec["arch"], spec["config"])
        if spec.get("int8"):
            from moe_understudy.understudy.quantize import quantize_

            quantize_(module)
        prefix = f"layer{key}."
        try:
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True
            )
        except RuntimeError as err:
            raise UserError(
                f"The weights of layer {key} in {folder / WEIGHTS} do not match its {CONFIG} "
                f"({str(err).splitlines()[0][:120]}); save the understudies again."
            ) from err
        out[int(key)] = module.to(device=device, dtype=dtype).eval()
    return out
