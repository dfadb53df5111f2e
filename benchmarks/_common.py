"""Shared helpers for benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Cores, threads, torch / python versions and platform of this run."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def command_line() -> str:
    """The exact command that ran this benchmark."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(name: str, payload: dict) -> Path:
    """Write `benchmarks/results/NAME.json` with the command and machine info added; return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"command": command_line(), "machine": machine_info(), **payload}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
