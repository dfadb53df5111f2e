"""Expert parallelism over torch.distributed: the process group, the core's EP backend, the evaluation workflow."""

from moe_understudy.runtime.ep.backend import EPRecorder, ExpertParallelBackend, configure_ep, patch_ep
from moe_understudy.runtime.ep.group import PeerFailure, choose_backend, init_distributed
from moe_understudy.runtime.ep.workflow import launch_ep, run_ep_evaluation, runs_table, summarize, sweep_runs

__all__ = [
    "EPRecorder",
    "ExpertParallelBackend",
    "PeerFailure",
    "choose_backend",
    "configure_ep",
    "init_distributed",
    "launch_ep",
    "patch_ep",
    "run_ep_evaluation",
    "runs_table",
    "summarize",
    "sweep_runs",
]
