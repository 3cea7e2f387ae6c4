"""Everything needed to continue a run after the server dies, saved after every round.

The checkpoint holds the global model, the strategy object itself (so server-side optimizer
state such as FedAdam's moments and FedAvgM's momentum comes along), the privacy plan
(sampler RNG state, DP noise RNG state, adaptive clip norm, the ledger), the round number
and the metrics so far. It is written to a temporary file and renamed, so a crash leaves
either the previous checkpoint or the new one, never half of one. The ledger in it only
ever grows: a resumed run starts from the epsilon already spent.

The file is a pickle written by this server for this server: load only checkpoints from an
output directory you control.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

from server_app.results import atomic_write

CHECKPOINT_FILE = "checkpoint.pkl"
# Keys that may differ between the interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "wait-timeout"}


@dataclass
class Checkpoint:
    completed_rounds: int
    arrays: Any  # ArrayRecord of the global model after ``completed_rounds``
    federation_state: dict[str, Any]
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    elapsed_seconds: float


class _Pickler(pickle.Pickler):
    """In deployment Flower's arrays are zero-copy memoryviews of received buffers: store their bytes."""

    dispatch_table = copyreg.dispatch_table | {memoryview: lambda view: (bytes, (view.tobytes(),))}


def save_checkpoint(output_dir: str, checkpoint: Checkpoint) -> None:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(checkpoint)
    atomic_write(os.path.join(output_dir, CHECKPOINT_FILE), buffer.getvalue())


def load_checkpoint(output_dir: str, config: dict[str, Any]) -> Checkpoint:
    """The last checkpoint in ``output_dir``; refuses one written with a different config."""
    path = os.path.join(output_dir, CHECKPOINT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"resume = true but there is no checkpoint at {path}; run without resume to start "
            "a new run, or point output-dir at the interrupted run's directory"
        )
    with open(path, "rb") as handle:
        checkpoint: Checkpoint = pickle.load(handle)
    changed = sorted(
        key for key in set(config) | set(checkpoint.config)
        if key not in RESUMABLE_CHANGES and config.get(key) != checkpoint.config.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {checkpoint.config.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"resume: the config differs from the checkpointed run ({details}); use the same config")
    return checkpoint
