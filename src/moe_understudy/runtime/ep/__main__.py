"""`torchrun --nproc-per-node N -m moe_understudy.runtime.ep EP_YAML`: one rank of an EP evaluation."""

from moe_understudy.runtime.ep.workflow import main

main()
