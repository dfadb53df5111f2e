"""Hugging Face Hub access that fails fast when the machine is offline.

`datasets` and `huggingface_hub` read `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` once, at import,
and without them an offline machine spends ~25 s in HTTP retries per lookup before failing.
`hub_access()` re-reads the variables at call time and probes the hub host (one TCP connect,
2 s timeout); when offline it switches both libraries to their offline mode for the duration of
the call only (restored afterwards), so cached datasets/tokenizers still load and unknown names
fail at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_by_env() -> bool:
    """Whether the environment asks for offline mode right now."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").upper() in _TRUE for n in names)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_access() -> Iterator[bool]:
    """Run hub lookups; yields True when they run in offline mode (cache only)."""
    offline = offline_by_env() or not hub_reachable()
    if not offline:
        yield False
        return
    import datasets.config
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
