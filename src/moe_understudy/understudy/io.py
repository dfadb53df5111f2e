"""Save and load a set of understudies (one per MoE layer) next to the model they stand in for.

Folder layout (`save_pretrained` style):
  config.json                  format, model id, hidden size, number of decoder layers, MoE layer
                               indices, and per layer the arch and the kwargs that rebuild its shapes
  understudies.safetensors     weights, keys "layer{L}.{parameter}"
Both are written under temporary names and moved into place, weights first, config last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_understudy.errors import UserError
from moe_understudy.moe.adapters import decoder_layers, find_moe_layers
from moe_understudy.moe.standins import StandIn
from moe_understudy.understudy.modules import from_config

FORMAT = "moe-understudy-understudies/1"
CONFIG = "config.json"
WEIGHTS = "understudies.safetensors"


def _model_facts(model: nn.Module) -> dict:
    layers = find_moe_layers(model)
    return {
        "model_id": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        "hidden_size": layers[0].hidden_size,
        "num_layers": len(decoder_layers(model)),
        "moe_layers": [ly.index for ly in layers],
    }


def save_understudies(out_dir: str | Path, understudies: dict[int, nn.Module], model: nn.Module) -> Path:
    """Write `understudies` {MoE layer index: module} for `model` into `out_dir`; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = _model_facts(model)
    unknown = sorted(set(understudies) - set(facts["moe_layers"]))
    if unknown:
        raise UserError(
            f"Understudies for layers {unknown} have no MoE layer in the model (it has {facts['moe_layers']})."
        )
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict] = {}
    for index, module in sorted(understudies.items()):
        if not isinstance(module, StandIn):
            raise UserError(
                f"Layer {index}: {type(module).__name__} is not an understudy module; build it with build_understudy."
            )
        per_layer[str(index)] = {"arch": module.arch, "config": module.config()}
        for name, t in module.state_dict().items():
            tensors[f"layer{index}.{name}"] = t.detach().cpu().contiguous()
    config = {"format": FORMAT, **facts, "layers": per_layer}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / CONFIG)
    return out


def read_config(path: str | Path) -> dict:
    """The config.json of a saved understudy folder (UserError when it is not one)."""
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file() or not (Path(path) / WEIGHTS).is_file():
        raise UserError(
            f"{path} holds no saved understudies ({CONFIG} + {WEIGHTS}); create them with `understudy distill`."
        )
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise UserError(f"{cfg_path} is not a {FORMAT} file; re-save the understudies with this version.")
    return config


def load_understudies(
    path: str | Path, model: nn.Module, device: str | torch.device = "cpu"
) -> dict[int, nn.Module]:
    """{MoE layer index: understudy} saved in `path`, checked against `model`.

    Refuses (UserError naming the mismatch) a model whose hidden size, decoder layer count or MoE
    layer list differs from the one the understudies were made for.
    """
    config = read_config(path)
    facts = _model_facts(model)
    if facts["hidden_size"] != config["hidden_size"]:
        raise UserError(
            f"The understudies in {path} were made for hidden size {config['hidden_size']} but the model has "
            f"{facts['hidden_size']}; distil understudies for this model."
        )
    if facts["num_layers"] != config["num_layers"] or facts["moe_layers"] != config["moe_layers"]:
        raise UserError(
            f"The understudies in {path} were made for {config['num_layers']} layers with MoE layers "
            f"{config['moe_layers']} but the model has {facts['num_layers']} with {facts['moe_layers']}; "
            f"distil understudies for this model."
        )
    weights = load_file(str(Path(path) / WEIGHTS))
    out: dict[int, nn.Module] = {}
    for key, spec in config["layers"].items():
        module = from_config(spec["arch"], spec["config"])
        prefix = f"layer{key}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True
        )
        out[int(key)] = module.to(device).eval()
    return out
