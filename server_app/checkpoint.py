"""Everything needed to continue a run after the server dies, saved after every round as plain data.

Loading a checkpoint never runs code: results folders are copied, shared and restored, and a
pickle from such a folder would execute whatever it was made to (issue 12). So the checkpoint
is two plain files in ``output_dir``:

* ``checkpoint-<round>.npz``: the arrays (the global model, the strategy's state such as
  FedAdam's moments), read with ``allow_pickle=False``, uncompressed members only;
* ``checkpoint.json``: everything else (rounds, metric rows, config, elapsed time, and the
  federation's state from :mod:`server_app.run_state`: ledger, adaptive clipping, seeded
  sampler states, tally, identities, number of clients), plus the NPZ's name and SHA-256.

Both are checked before anything is used: the JSON against an explicit schema (here for the
top level, in :mod:`server_app.run_state` for the federation; shapes against the model), the
NPZ against its hash. Anything else, a pickle included, is refused with a CheckpointError.

Atomic and consistent: the NPZ is written under a new name (temporary file, fsync, rename),
then ``checkpoint.json``, which names it, replaces the previous one in one ``os.replace``; only
then are older NPZ files removed. ``checkpoint.json`` is the commit point: a crash at any moment
leaves the previous complete checkpoint (the old JSON still names its own, untouched NPZ) or
the new one. A directory swap would need two renames (or a symlink), with a moment in which
no checkpoint directory exists; one file rename has no such moment.

Secret state never enters these files: the server's DP generator
(:class:`common.privacy.secret_random.SecretRandom`, its key and stream position) is written
to ``secret_state.json`` with mode 0600, which is as secret as the unnoised aggregate: whoever
reads it can regenerate the noise. It is written BEFORE the checkpoint, so a crash between the
two resumes with the stream ahead of the checkpoint (fresh noise, never a reused draw);
otherwise a resumed run continues the very same stream.

Resuming checks the config: keys that may differ are listed in ``RESUMABLE_CHANGES``;
``output-dir`` is not compared (a moved run directory resumes); ``num-server-rounds`` may
change unless the noise was solved from ``target-epsilon`` for the planned rounds.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import ConfigError, RunConfig
from common.privacy.secret_random import SecretRandom
from server_app.diagnostics import open_private
from server_app.plain import BOOLEAN, INTEGER, LIST, NUMBER, OBJECT, STRING, CheckpointError, at_least, list_of, record
from server_app.results import atomic_write

CHECKPOINT_FILE = "checkpoint.json"
OLD_CHECKPOINT_FILE = "checkpoint.pkl"  # the pickle format before issue 12: never loaded
SECRET_FILE = "secret_state.json"
FORMAT, VERSION = "fl-dp checkpoint", 2
# Keys that may differ between the interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "overwrite", "wait-timeout", "output-dir", "index-idle-nodes"}
SCALARS = (str, int, float, bool, type(None))


@dataclass
class Checkpoint:
    completed_rounds: int
    model: dict[str, np.ndarray]  # the global model after ``completed_rounds``, in state-dict order
    federation: dict[str, Any]  # plain JSON (server_app.run_state), checked when restored
    arrays: dict[str, np.ndarray]  # the arrays ``federation`` names (the strategy's state)
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    elapsed_seconds: float
    secret: SecretRandom | None = None  # kept in secret_state.json (0600), never in the checkpoint

    def model_for(self, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stored model, refused unless its names, shapes and dtypes are the model's."""
        expected = [(name, value.shape, value.dtype) for name, value in reference.items()]
        stored = [(name, value.shape, value.dtype) for name, value in self.model.items()]
        if stored != expected:
            raise CheckpointError(f"the checkpoint's model {_layout(stored)} is not this run's model {_layout(expected)}")
        return self.model


def _layout(arrays: list) -> str:
    return "[" + ", ".join(f"{name} {tuple(shape)} {dtype}" for name, shape, dtype in arrays[:4]) + ", ...]"


def _write_private(path: str, data: bytes) -> None:
    """Atomic write of a file only its owner can read (0600 from creation, never world-readable)."""
    partial_path = f"{path}.tmp"
    with os.fdopen(open_private(partial_path, os.O_WRONLY | os.O_TRUNC), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial_path, path)


def _sync_directory(path: str) -> None:
    """Make the renames in ``path`` durable (a power cut after a rename may otherwise undo it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str, checkpoint: Checkpoint) -> None:
    """Secret state first (0600), then the arrays under a new name, then the JSON that commits them."""
    if checkpoint.secret is not None:
        _write_private(os.path.join(output_dir, SECRET_FILE), json.dumps(checkpoint.secret.state_dict()).encode())
    arrays = {f"model.{i}": np.asarray(v) for i, v in enumerate(checkpoint.model.values())} | {
        name: np.asarray(value) for name, value in checkpoint.arrays.items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)  # load_checkpoint reads with allow_pickle=False
    data = buffer.getvalue()
    npz_name = f"checkpoint-{checkpoint.completed_rounds:06d}.npz"
    atomic_write(os.path.join(output_dir, npz_name), data)
    _sync_directory(output_dir)  # the NPZ's name is on disk before the JSON that refers to it
    document = {
        "format": FORMAT,
        "version": VERSION,
        "completed_rounds": checkpoint.completed_rounds,
        "elapsed_seconds": checkpoint.elapsed_seconds,
        "config": checkpoint.config,
        "rows": checkpoint.rows,
        "arrays": {"file": npz_name, "sha256": hashlib.sha256(data).hexdigest(),
                   "model": list(checkpoint.model), "other": list(checkpoint.arrays)},
        "secret_state": checkpoint.secret is not None,
        "federation": checkpoint.federation,
    }
    atomic_write(os.path.join(output_dir, CHECKPOINT_FILE), (json.dumps(document) + "\n").encode())
    _sync_directory(output_dir)
    for stale in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*.npz*")):
        if os.path.basename(stale) != npz_name:  # older arrays, or a write a crash interrupted
            os.remove(stale)


TOP_LEVEL = {"format": STRING, "version": INTEGER, "completed_rounds": INTEGER, "elapsed_seconds": NUMBER,
             "config": OBJECT, "rows": LIST, "arrays": OBJECT, "secret_state": BOOLEAN, "federation": OBJECT}
ARRAYS = {"file": STRING, "sha256": STRING, "model": LIST, "other": LIST}


def load_checkpoint(output_dir: str, config: dict[str, Any]) -> Checkpoint:
    """The last checkpoint in ``output_dir``, checked; refuses one written with a different config.

    Reads only: nothing is written, and nothing in the files is executed.
    """
    path = os.path.join(output_dir, CHECKPOINT_FILE)
    if not os.path.exists(path):
        old = os.path.join(output_dir, OLD_CHECKPOINT_FILE)
        if os.path.exists(old):
            raise CheckpointError(
                f"resume: {old} was written by an older version of this app (a pickle, which is never loaded: "
                "loading a pickle can run any code); re-run without resume = true (add overwrite = true to move "
                "the old run aside), or convert it once, if you trust the file, with "
                f"`python -m server_app.checkpoint_convert {output_dir} --trust`"
            )
        raise FileNotFoundError(
            f"resume = true but there is no checkpoint at {path}; run without resume to start "
            "a new run, or point output-dir at the interrupted run's directory"
        )
    document = _read_json(path)
    _check_document(path, document)
    _check_config(document["config"], config, document["completed_rounds"])
    model, other = _read_arrays(output_dir, path, document["arrays"])
    secret = _read_secret(output_dir) if document["secret_state"] else None
    return Checkpoint(document["completed_rounds"], model, document["federation"], other, document["rows"],
                      document["config"], float(document["elapsed_seconds"]), secret)


def _read_json(path: str, what: str = "a checkpoint of this app") -> Any:
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"resume: {path} is not {what} (not JSON: {error})") from None


def _check_document(path: str, document: Any) -> None:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"resume: {path} is not a checkpoint of this app (no \"format\": {FORMAT!r})")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"resume: {path} has format version {document.get('version')!r}; this app reads version {VERSION}"
        )
    try:
        record(document, TOP_LEVEL, "checkpoint")
        at_least(document["completed_rounds"], 1, "checkpoint.completed_rounds")
        at_least(document["elapsed_seconds"], 0, "checkpoint.elapsed_seconds")
        for key, value in document["config"].items():
            if not isinstance(value, SCALARS):
                raise CheckpointError(f"checkpoint.config.{key}: expected a plain value, got {type(value).__name__}")
        rows = list_of(document["rows"], OBJECT, "checkpoint.rows")
        for index, row in enumerate(rows):
            if row.get("round") != index + 1 or not all(isinstance(v, SCALARS) for v in row.values()):
                raise CheckpointError(f"checkpoint.rows[{index}]: expected round {index + 1} with plain values")
        if len(rows) != document["completed_rounds"]:
            raise CheckpointError(
                f"checkpoint: {len(rows)} metric rows for {document['completed_rounds']} completed rounds"
            )
        arrays = record(document["arrays"], ARRAYS, "checkpoint.arrays")
        list_of(arrays["model"], STRING, "checkpoint.arrays.model")
        list_of(arrays["other"], STRING, "checkpoint.arrays.other")
        if os.path.basename(arrays["file"]) != arrays["file"] or not arrays["file"].endswith(".npz"):
            raise CheckpointError("checkpoint.arrays.file: expected a file name ending in .npz, next to the checkpoint")
    except CheckpointError as error:
        raise CheckpointError(f"resume: {path} does not fit the checkpoint schema: {error}") from None


def _check_config(saved: dict[str, Any], config: dict[str, Any], completed: int) -> None:
    defaults = RunConfig().to_dict()  # a key added since the checkpoint was written had its default
    saved = {key: defaults[key] for key in config if key not in saved and key in defaults} | saved
    changed = sorted(
        key for key in set(config) | set(saved)
        if key not in RESUMABLE_CHANGES | {"num-server-rounds"} and config.get(key) != saved.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ConfigError(f"resume: the config differs from the checkpointed run ({details}); use the same config")
    before, now = saved.get("num-server-rounds"), config.get("num-server-rounds")
    if before == now:
        return
    if saved.get("target-epsilon"):
        raise ConfigError(
            f"resume: num-server-rounds cannot change from {before} to {now}: the noise multiplier was solved from "
            f"target-epsilon = {saved['target-epsilon']} for {before} rounds, so other rounds would miss that target; "
            f"resume with num-server-rounds = {before}, or start a new run"
        )
    if not isinstance(now, int) or now < completed:
        raise ConfigError(
            f"resume: num-server-rounds = {now!r} is below the {completed} rounds the checkpoint already completed"
        )


def _read_arrays(output_dir: str, path: str, spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    npz_path = os.path.join(output_dir, spec["file"])
    try:
        with open(npz_path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CheckpointError(f"resume: {path} names {npz_path}, which cannot be read ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise CheckpointError(f"resume: {npz_path} is not the file {path} was written with (its SHA-256 differs)")
    model_keys = [f"model.{i}" for i in range(len(spec["model"]))]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
        if any(m.compress_type != zipfile.ZIP_STORED for m in members):
            raise CheckpointError("compressed members (this app writes none)")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(model_keys + spec["other"]):
                raise CheckpointError(f"it holds {sorted(npz.files)[:6]}..., not the arrays the checkpoint lists")
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise CheckpointError(f"resume: {npz_path} is not a valid checkpoint NPZ ({error})") from None
    if any(value.dtype.kind not in "biuf" for value in arrays.values()):
        raise CheckpointError(f"resume: {npz_path} holds non-numeric arrays")
    model = {name: arrays[key] for name, key in zip(spec["model"], model_keys)}
    return model, {name: arrays[name] for name in spec["other"]}


def _read_secret(output_dir: str) -> SecretRandom:
    path = os.path.join(output_dir, SECRET_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"resume: the DP run's secret state {path} is missing; it is needed to continue "
            "the noise stream (copy it with the run, keeping mode 0600), or start a new run"
        )
    state = _read_json(path, "a secret generator state")
    try:
        record(state, {"key": STRING, "position": INTEGER, "debug": BOOLEAN}, "secret_state")
        if len(state["key"]) != 64:
            raise CheckpointError("secret_state.key: expected 32 bytes in hex")
        at_least(state["position"], 0, "secret_state.position")
        return SecretRandom.from_state_dict(state)
    except (CheckpointError, ValueError) as error:
        raise CheckpointError(f"resume: {path} is not a secret generator state: {error}") from None
