"""`understudy ...`: the command line, one module per command group.

Each command parses its options, maps them onto the fields of its stage's frozen config dataclass
and hands the config to one workflow function; errors meant for users are `UserError`s printed as
one sentence (common.py). Modules are imported in pipeline order, which is the order of `--help`.
"""
# ruff: noqa: I001, F401

from moe_understudy.cli.common import app
from moe_understudy.cli import foundation
from moe_understudy.cli import understudies
from moe_understudy.cli import runtime
from moe_understudy.cli import parallel
from moe_understudy.cli import kd
from moe_understudy.cli import serve

__all__ = ["app"]
