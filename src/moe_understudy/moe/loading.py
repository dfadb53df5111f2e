"""Loading a causal LM and its tokenizer: a folder `understudy teacher` wrote, or any transformers MoE checkpoint.

Also the one place that turns the user's `--dtype` / `--device` words into torch objects, so an
unknown dtype, a malformed device or a device this machine does not have is one sentence.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_understudy.errors import UserError

CHECKPOINT_DIR = "checkpoint"  # a teacher run's periodic checkpoint folder (teacher.py writes it)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or fp32 / bf16 / fp16, or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UserError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}.")
        return name
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise UserError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the word --dtype takes)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps' or 'auto' (cuda when present, else cpu) -> a device this machine has."""
    if isinstance(name, torch.device):
        device = name
    elif str(name).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(str(name).strip())
        except (RuntimeError, ValueError) as err:
            raise UserError(f"Unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"Device {name!r} needs CUDA, which this machine does not have; use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"Device {name!r} is not available here; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"Device {name!r} is not supported; use cpu, cuda, cuda:N or auto.")
    return device


def is_local_model(path: str | Path) -> bool:
    """Whether `path` names a folder on this machine (else it is taken as a hub id)."""
    return Path(path).expanduser().exists()


def load_model_and_tokenizer(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
):
    """(model, tokenizer) saved by `understudy teacher` or any transformers MoE checkpoint; clear errors otherwise.

    The model comes in `dtype` on `device`, in eval mode. A missing config, unreachable hub id or
    truncated weights file is a UserError naming the folder and the fix.
    """
    from transformers import AutoModelForCausalLM

    from moe_understudy.data import load_tokenizer

    torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").exists():
        hint = (
            " (a teacher run was started there: finish it with `understudy teacher --resume`)"
            if (local / CHECKPOINT_DIR).exists()
            else ""
        )
        raise UserError(f"{path} holds no config.json, so it is not a saved model{hint}.")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local if local.exists() else path), dtype=torch_dtype
        )
    except OSError as err:
        if local.exists():
            raise UserError(
                f"The weights in {path} could not be read ({_first_line(err)}); they are truncated or "
                f"corrupt: save the model again (save_pretrained) or retrain it."
            ) from err
        raise UserError(
            f"Model {str(path)!r} is neither a local model folder nor reachable on the hub (offline?); "
            f"train one with `understudy teacher --out DIR` or pass a local folder."
        ) from err
    except Exception as err:  # safetensors' own errors for a truncated or corrupt weights file
        if type(err).__name__ != "SafetensorError":
            raise
        shards = sorted(local.glob("*.safetensors")) if local.is_dir() else []
        where = shards[0] if len(shards) == 1 else path
        raise UserError(
            f"The weights in {where} are truncated or corrupt ({_first_line(err)}); save the model again "
            f"(save_pretrained) or retrain it."
        ) from err
    tokenizer = load_tokenizer(path)
    return model.to(torch_device).eval(), tokenizer


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) of the model's first floating-point parameter (float32 / cpu for none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__
