"""Everything needed to continue a run after the server dies, saved after every round.

The checkpoint holds the global model, the strategy object itself (so server-side optimizer
state such as FedAdam's moments and FedAvgM's momentum comes along), the privacy plan
(sampler RNG state, DP noise RNG state, adaptive clip norm, the ledger), the round number
and the metrics so far. It is written to a temporary file and renamed, so a crash leaves
either the previous checkpoint or the new one, never half of one. The ledger in it only
ever grows: a resumed run starts from the epsilon already spent.

The file is a pickle written by this server for this server: load only checkpoints from an
output directory you control.

Secret state never enters the pickle: the server's DP generator
(:class:`common.privacy.secret_random.SecretRandom`, its key and stream position) is stored
by reference and written to ``secret_state.json`` with mode 0600, which is as secret as the
unnoised aggregate: whoever reads it can regenerate the noise. It is written BEFORE the
checkpoint, so a crash between the two resumes with the stream ahead of the checkpoint
(fresh noise, never a reused draw); otherwise a resumed run continues the very same stream.
"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any

from common.privacy.secret_random import SecretRandom
from server_app.diagnostics import open_private
from server_app.results import atomic_write

CHECKPOINT_FILE = "checkpoint.pkl"
SECRET_FILE = "secret_state.json"
SECRET_ID = "secret-random"
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.secrets: list[SecretRandom] = []

    def persistent_id(self, obj: Any) -> str | None:
        if isinstance(obj, SecretRandom):  # kept out of the pickle: see the module docstring
            if self.secrets and self.secrets[0] is not obj:
                raise ValueError("a checkpoint holds at most one secret generator")
            self.secrets[:1] = [obj]
            return SECRET_ID
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, handle, secret_path: str):
        super().__init__(handle)
        self.secret_path = secret_path
        self.secret: SecretRandom | None = None

    def persistent_load(self, pid: Any) -> SecretRandom:
        if pid != SECRET_ID:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in the checkpoint")
        if self.secret is None:
            if not os.path.exists(self.secret_path):
                raise FileNotFoundError(
                    f"resume: the DP run's secret state {self.secret_path} is missing; it is needed to continue "
                    "the noise stream (copy it with the run, keeping mode 0600), or start a new run"
                )
            with open(self.secret_path, encoding="utf-8") as handle:
                self.secret = SecretRandom.from_state_dict(json.load(handle))
        return self.secret


def _write_private(path: str, data: bytes) -> None:
    """Atomic write of a file only its owner can read (0600 from creation, never world-readable)."""
    tmp = f"{path}.tmp"
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str, checkpoint: Checkpoint) -> None:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(checkpoint)
    if pickler.secrets:
        secret = json.dumps(pickler.secrets[0].state_dict()).encode()
        _write_private(os.path.join(output_dir, SECRET_FILE), secret)
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
        checkpoint: Checkpoint = _Unpickler(handle, os.path.join(output_dir, SECRET_FILE)).load()
    changed = sorted(
        key for key in set(config) | set(checkpoint.config)
        if key not in RESUMABLE_CHANGES and config.get(key) != checkpoint.config.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {checkpoint.config.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"resume: the config differs from the checkpointed run ({details}); use the same config")
    return checkpoint
