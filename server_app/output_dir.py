"""A new run never writes into another run's results (issue 12).

Re-running a command without ``resume = true`` used to overwrite a finished run's metrics and
checkpoint after its first round, leaving a mix of two runs. So a new run checks ``output-dir``
before it writes anything: if it holds a run's files it is refused, with the two ways out:
``resume = true`` (continue that run) or ``overwrite = true``, which MOVES the old run to
``<output-dir>.old-<time>`` (one rename, same parent, so same file system; nothing is deleted).
"""

from __future__ import annotations

import glob
import os
import time

from common.config import ConfigError
from server_app.status import say

# Files only a run of this app writes (a directory with just other files is not "used").
RUN_FILES = ("config.json", "metrics.json", "metrics.csv", "summary.json", "model.pt", "checkpoint.json",
             "checkpoint.pkl", "secret_state.json", "diagnostics.jsonl")


def run_files(output_dir: str) -> list[str]:
    """The files of a run in ``output_dir`` (empty when there is none)."""
    if not os.path.isdir(output_dir):
        return []
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    return found + sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*.npz")))


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> str | None:
    """Check ``output_dir`` before anything is written; with ``overwrite``, move an old run aside.

    Returns where the old run went (or None).
    """
    if resume and overwrite:
        raise ConfigError("resume = true and overwrite = true contradict each other: choose one")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"output-dir = {output_dir!r} is a file, not a directory; choose another output-dir")
    if resume:
        return None  # the checkpoint decides (server_app/checkpoint.py)
    found = run_files(output_dir)
    if not found:
        return None
    if not overwrite:
        raise ConfigError(
            f"output-dir = {output_dir!r} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
            "nothing was written. Add resume=true to continue it, or overwrite=true to move it aside to "
            f"{os.path.normpath(output_dir)}.old-<time> and start anew, or choose another output-dir"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{os.path.normpath(output_dir)}.old-{stamp}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.rename(output_dir, target)
    say(f"overwrite = true: moved the previous run in {output_dir} to {target}")
    return target
