"""The process group of expert parallelism: backend choice, joining, collectives that fail in one sentence.

Launch one process per rank (`torchrun --nproc-per-node N -m moe_understudy.runtime.ep ep.yaml`,
or `understudy ep --nproc N ...`, which writes the YAML and calls torchrun: `launch_ep` in
workflow.py). Backend: NCCL when CUDA is present, gloo otherwise.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_understudy.errors import UserError


class PeerFailure(UserError, RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


def choose_backend(requested: str = "auto") -> str:
    """nccl when CUDA is available (and asked for or auto), else gloo."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise UserError("Backend nccl needs CUDA, which is not available here; use --backend gloo (or auto).")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 60.0) -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or the caller) described in the environment.

    Returns (rank, world size, device). With no RANK/WORLD_SIZE in the environment, runs as a
    world of one (a local group on a free port), so the same code path serves single-process runs.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    name = choose_backend(backend)
    if not dist.is_initialized():
        dist.init_process_group(name, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "nccl" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective(name: str, fn, *args, **kwargs):
    """Run one collective; turn a backend error or timeout into a one-sentence PeerFailure."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as err:  # DistBackendError / timeouts subclass these
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerFailure(
            f"rank {rank}: {name} failed or timed out ({first}); another rank probably died or stalled -- "
            f"check its log, then rerun."
        ) from err


def all_gather_equal(name: str, tensor: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's `tensor` (all the same shape), in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    collective(name, dist.all_gather, parts, tensor.contiguous())
    return parts
