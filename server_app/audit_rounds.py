"""``fl-dp audit`` runs (``audit-canaries`` > 0): keep every released global model for the auditor.

The canary scores of an audit (fl_dp/audit.py, common/privacy/audit.py) are computed from what
the run releases: the global model after every round. The server otherwise keeps only the
latest one, so in an audit run it also writes each round's model, and the initial one, to
``output-dir/audit-rounds/round-<r>.npz`` (arrays by name, in the model's order). These are
released values (no 0600): the files add nothing to what an adversary sees, only make it
readable after the run. Each round's file is written after its checkpoint, like everything
else of a round that is published.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord

ROUNDS_DIR = "audit-rounds"


def round_file(output_dir: str, server_round: int) -> str:
    return os.path.join(output_dir, ROUNDS_DIR, f"round-{server_round:05d}.npz")


def _write(output_dir: str, server_round: int, arrays: ArrayRecord) -> None:
    path = round_file(output_dir, server_round)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial_path = path + ".tmp.npz"
    np.savez(partial_path, allow_pickle=False, **{name: array.numpy() for name, array in arrays.items()})
    os.replace(partial_path, path)


def keeping_models(output_dir: str, then: Callable[[int, ArrayRecord], None], initial: ArrayRecord,
                   first_round: int = 1) -> Callable[[int, ArrayRecord], None]:
    """``then`` (the checkpoint), followed by writing the round's released model; the model the
    run starts from (round ``first_round - 1``) is written now."""
    _write(output_dir, first_round - 1, initial)

    def on_round_end(completed_round: int, current: ArrayRecord) -> None:
        then(completed_round, current)
        _write(output_dir, completed_round, current)

    return on_round_end
