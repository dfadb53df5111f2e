import functools
import os

import pytest
import torch
import typer.testing

# Tests run offline and deterministic: no hub, fixed seeds, few threads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# CliRunner.invoke rebuilds the click command tree from the Typer app on every call (every command's
# signature and type hints, ~30 ms); the app does not change within a run, so build it once.
if hasattr(typer.testing, "_get_command"):
    typer.testing._get_command = functools.cache(typer.testing._get_command)


@pytest.fixture(autouse=True)
def _seed():
    # The CPU generator only: torch.manual_seed also queues lazy seeds for CUDA, XPU and MTIA, each
    # capturing the (deep, under pytest) call stack, which cost ~5 s over the suite.
    torch.default_generator.manual_seed(0)
    yield
