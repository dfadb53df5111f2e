"""Writing files so that a crash mid-write never leaves a half-written one in place, and reading
safetensors files so that a truncated or corrupt one is one sentence naming it.

Every writer here writes to `NAME.tmp` beside the target and moves it into place with `os.replace`
(atomic on POSIX): a reader sees the old file or the new one, never a mix. When the write fails
(the disk fills, the process is interrupted) the temporary file is removed and the previous file
is left exactly as it was; a full disk becomes a `UserError` naming the file and the fix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import torch

from moe_understudy.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to produce the file, then move it onto `path`; on failure `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _FULL:
            kept = "the previous version is kept" if path.exists() else "nothing was written"
            raise UserError(
                f"The disk filled while writing {path} ({kept}); free some space and rerun."
            ) from err
        raise
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save `obj` to `path` through a temporary name: readers see the old file or the new one."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata=None) -> Path:
    """safetensors `save_file` of `tensors` (made contiguous, on the CPU) through a temporary name."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary name."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_tensors(path: str | Path, fix: str) -> dict[str, torch.Tensor]:
    """safetensors `load_file(path)`; a missing, truncated or corrupt file is a UserError naming it and `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; {fix}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is truncated or corrupt ({_first_line(err)}); {fix}.") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__
