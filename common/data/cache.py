"""A small on-disk cache for prepared arrays (generated datasets, partition tables).

Preparing data can cost seconds (MNIST-1D generation, partitioning tens of thousands of
rows), and in deployment every message runs in a fresh process. The result depends only
on the settings, so it is stored once under a key derived from them and memory-mapped
back. Writes go to a temporary file and are renamed, so concurrent clients never read half
a file. Set ``FL_DP_CACHE`` to move the cache (default ``~/.cache/fl-dp``); delete it freely.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

import numpy as np


def cache_dir() -> str:
    return os.environ.get("FL_DP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fl-dp")


def cached_arrays(
    description: str, build: Callable[[], dict[str, np.ndarray]], root: str | None = None
) -> dict[str, np.ndarray]:
    """The arrays ``build()`` returns for ``description``, computed at most once per cache ``root``."""
    key = hashlib.sha256(description.encode()).hexdigest()[:24]
    path = os.path.join(root or cache_dir(), f"{key}.npz")
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError):
        pass  # missing or unreadable: rebuild
    arrays = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still works, just without the cache
    return arrays
