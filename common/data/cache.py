"""A small on-disk cache for prepared arrays (generated datasets, partition tables).

Preparing data can cost seconds (MNIST-1D generation, partitioning tens of thousands of
rows), and in deployment every message runs in a fresh process. The result depends only
on the settings, so it is stored once under a key derived from them and read back whole
(an uncompressed ``.npz``: ``np.load`` cannot memory-map an archive, so every array is
copied into memory on each read). Writes go to a temporary file and are renamed, so
concurrent clients never read half a file. Set ``FL_DP_CACHE`` to move the cache (default ``~/.cache/fl-dp``); delete it freely.
A caller may write to a cache of its own instead (the ServerApp: under ``output-dir``) and still
read entries the shared cache already holds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable, Sequence

import numpy as np


def cache_dir() -> str:
    return os.environ.get("FL_DP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fl-dp")


def cached_arrays(
    description: str,
    build: Callable[[], dict[str, np.ndarray]],
    root: str | None = None,
    read_also: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays ``build()`` returns for ``description``, computed at most once per cache ``root``.

    ``root`` is the one directory this call may write (default: the shared cache,
    :func:`cache_dir`). ``read_also`` are further roots that are only ever READ, after ``root``;
    by default, when ``root`` is given, that is the shared cache: a process that must write only
    under its own directory (the ServerApp, under ``output-dir``) still reuses data the clients or
    an earlier run already prepared, and builds + writes under ``root`` only when none holds it.
    """
    key = hashlib.sha256(description.encode()).hexdigest()[:24]
    write_root = root or cache_dir()
    if read_also is None:
        read_also = [cache_dir()] if root else []
    for where in [write_root, *[r for r in read_also if r and r != write_root]]:
        stored = _read(os.path.join(where, f"{key}.npz"))
        if stored is not None:
            return stored
    arrays = build()
    path = os.path.join(write_root, f"{key}.npz")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, partial_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        with os.fdopen(handle, "wb") as out:
            np.savez(out, allow_pickle=False, **arrays)  # plain arrays only: _read refuses pickles
        os.replace(partial_path, path)
    except OSError:
        pass  # a read-only home still works, just without the cache
    return arrays


def _read(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError):
        return None  # missing or unreadable: try the next root, or rebuild
