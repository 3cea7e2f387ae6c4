"""Convert a checkpoint of the older pickle format (``checkpoint.pkl``) to the plain format, once.

Why a separate, explicit step: reading a pickle can run any code, so the ServerApp never reads
one (server_app/checkpoint.py). A run directory you wrote yourself, with an older version of
this app, can still be resumed: convert it here, saying that you trust the file, then resume as
usual. The pickle is kept, renamed to ``checkpoint.pkl.converted`` (nothing is deleted).

    python -m server_app.checkpoint_convert /abs/run-dir --trust
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

from common.config import RunConfig
from common.privacy.secret_random import SecretRandom
from server_app.checkpoint import OLD_CHECKPOINT_FILE, SECRET_FILE, Checkpoint, save_checkpoint
from server_app.run_state import federation_to_plain

OLD_SECRET_ID = "secret-random"  # how the old pickle referred to secret_state.json


class _OldCheckpoint:
    """Attribute bag for the old ``server_app.checkpoint.Checkpoint`` (completed_rounds, arrays,
    federation_state, rows, config, elapsed_seconds)."""


class _OldUnpickler(pickle.Unpickler):
    def __init__(self, handle, secret_path: str):
        super().__init__(handle)
        self.secret_path = secret_path
        self.secret: SecretRandom | None = None

    def find_class(self, module: str, name: str):
        if (module, name) == ("server_app.checkpoint", "Checkpoint"):
            return _OldCheckpoint
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if pid != OLD_SECRET_ID:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in the checkpoint")
        if self.secret is None:
            with open(self.secret_path, encoding="utf-8") as handle:
                self.secret = SecretRandom.from_state_dict(json.load(handle))
        return self.secret


def convert(output_dir: str) -> str:
    """Write checkpoint.json + NPZ from ``output_dir``'s trusted checkpoint.pkl; return the new path."""
    old_path = os.path.join(output_dir, OLD_CHECKPOINT_FILE)
    with open(old_path, "rb") as handle:
        old = _OldUnpickler(handle, os.path.join(output_dir, SECRET_FILE)).load()
    state = old.federation_state
    plain, arrays = federation_to_plain(
        state["strategy"], state["privacy"], state["eval_sampler"], state["tally"], {}, state["num_clients"]
    )
    model = {name: array.numpy() for name, array in old.arrays.items()}
    config = RunConfig().to_dict() | dict(old.config)  # keys added since took their defaults
    save_checkpoint(output_dir, Checkpoint(old.completed_rounds, model, plain, arrays, list(old.rows), config,
                                           float(old.elapsed_seconds), state["privacy"].secret))
    os.replace(old_path, old_path + ".converted")
    return os.path.join(output_dir, "checkpoint.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the run directory holding checkpoint.pkl")
    parser.add_argument("--trust", action="store_true",
                        help="confirm you wrote this checkpoint: reading a pickle runs whatever code it holds")
    args = parser.parse_args(argv)
    if not args.trust:
        print("Reading checkpoint.pkl unpickles it, which runs any code it holds: convert only a checkpoint "
              "you wrote yourself, and say so with --trust.", file=sys.stderr)
        return 2
    print(f"Converted to {convert(args.output_dir)}; resume with resume=true as usual.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
