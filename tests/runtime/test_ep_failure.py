"""An expert-parallel rank killed mid-run: the survivor fails with one clear sentence within 60 s, no hang.

Two ranks (gloo on loopback) run one forward together; then rank 1 is killed (SIGKILL, as an
out-of-memory kill or a lost node would), and rank 0's next forward must raise PeerFailure.
Plain fork processes, not torch.multiprocessing's start_processes, which would tear the survivor
down as soon as the killed rank exits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_understudy.config import RuntimeConfig
from moe_understudy.moe.presets import build_model, preset_config
from moe_understudy.runtime.ep import PeerFailure, patch_ep

pytestmark = pytest.mark.dist

build_model(preset_config("quick", vocab_size=300), seed=0)  # model classes loaded before forking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    model = build_model(preset_config("quick", vocab_size=300), seed=0)
    patch_ep(model, None, None, RuntimeConfig(), keep_all_experts=True)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        model(input_ids=ids)  # step 1, together
        (out_dir / f"step1-rank{rank}").write_text("done")
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run, after the first step
        while not (out_dir / "killed").exists():  # rank 0 starts step 2 once rank 1 is gone
            time.sleep(0.05)
        t0 = time.monotonic()
        try:
            model(input_ids=ids)
            (out_dir / "rank0.txt").write_text("no error")
        except PeerFailure as err:
            (out_dir / "rank0.txt").write_text(f"{time.monotonic() - t0:.1f}\n{err}")
    os._exit(0)  # the process group cannot be torn down cleanly without its peer


def test_a_rank_killed_after_the_first_step_makes_the_survivor_fail_within_60_s(tmp_path):
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    procs[1].join(timeout=60)
    assert procs[1].exitcode == -signal.SIGKILL, "rank 1 should have been killed after its first step"
    assert (tmp_path / "step1-rank1").exists() and (tmp_path / "step1-rank0").exists()
    t0 = time.monotonic()
    (tmp_path / "killed").write_text("")
    procs[0].join(timeout=60)
    elapsed = time.monotonic() - t0
    if procs[0].is_alive():
        procs[0].kill()
        pytest.fail("the surviving rank hung for 60 s after its peer was killed")
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert elapsed < 60 and float(seconds) < 60
    assert message.startswith("rank 0: ") and "another rank probably died or stalled" in message
    assert "\n" not in message.strip()
