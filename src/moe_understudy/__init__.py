"""moe-understudy: understudies for MoE layers and MoE-aware distillation.

    import moe_understudy as mu
    store = mu.capture(model, blocks, out="store")
    understudies = mu.distill(model, store)
    with mu.patch(model, understudies, policy="understudy", capacity_factor=1.0):
        ...

`patch`, `unpatch`, `load_understudies`, `save_understudies`, `capture`, `distill` and `evaluate`
are documented in moe_understudy/api.py (each has its own docstring). They are imported on first
use, so `import moe_understudy` (and the `understudy` command line) stays quick.

`mu.capture` is the API function even after the submodule moe_understudy/capture.py is imported
(the import system binds a submodule onto its package; this package keeps the function there).
Reach the submodule with `from moe_understudy.capture import ...` or `sys.modules`.
"""

import sys
import types

__version__ = "0.1.0"

__all__ = [
    "PatchedModel",
    "UserError",
    "capture",
    "distill",
    "evaluate",
    "load_understudies",
    "patch",
    "quantize",
    "save_understudies",
    "unpatch",
]


def __getattr__(name: str):
    if name in __all__:
        from moe_understudy import api

        return getattr(api, name)
    raise AttributeError(f"module 'moe_understudy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """This package's module type: its `capture` attribute is always the API function."""

    @property
    def capture(self):
        from moe_understudy import api

        return api.capture

    @capture.setter
    def capture(self, submodule) -> None:
        """Importing moe_understudy/capture.py binds it here; the function stays (the module is in sys.modules)."""


sys.modules[__name__].__class__ = _Package
