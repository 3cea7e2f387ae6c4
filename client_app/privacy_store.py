"""Where a client keeps its privacy ledger so spent budget is never forgotten.

Two copies: ``context.state`` (survives between rounds in simulation and while a SuperNode
runs) and, when the node has a ``state-dir``, a JSON file in it (survives a SuperNode
restart, which gives the node a new id and an empty ``context.state``). The file is keyed by
a stable identity of the DATA (its path, or the demo partition it is), not the node id.
Loading takes the copy with more recorded training, so a ledger can only grow; writes are
atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from flwr.app import ConfigRecord, Context

from common.config import NodeConfig, RunConfig

STATE_KEY = "privacy-ledger"


def client_identity(config: RunConfig, node: NodeConfig) -> str:
    """A name for this client's data that does not change when the node restarts."""
    if node.data_path:
        source = f"file:{os.path.realpath(node.data_path)}"
    else:
        source = (
            f"{config.dataset}:{config.dataset_samples}:{config.seed}:{config.test_fraction}:"
            f"{config.partitioner}:{config.dirichlet_alpha}:{config.classes_per_client}:"
            f"{node.num_partitions}:{node.partition_id}"
        )
        if config.dataset_path:
            source += f":{os.path.realpath(config.dataset_path)}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _progress(ledger: dict[str, Any] | None) -> int:
    return -1 if ledger is None else int(ledger.get("updates", 0))


class PrivacyStore:
    def __init__(self, context: Context, config: RunConfig, node: NodeConfig):
        self.context = context
        self.identity = client_identity(config, node)
        self.path = os.path.join(node.state_dir, f"ledger-{self.identity}.json") if node.state_dir else ""

    def load(self) -> dict[str, Any] | None:
        in_state = None
        if STATE_KEY in self.context.state:
            text = self.context.state.config_records[STATE_KEY]["json"]
            if not isinstance(text, str):
                raise TypeError(f"context.state[{STATE_KEY!r}]['json'] holds {type(text).__name__}, not the JSON text save() writes")
            in_state = json.loads(text)
        on_disk = None
        if self.path and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                on_disk = json.load(handle)
        return max((in_state, on_disk), key=_progress)

    def save(self, ledger: dict[str, Any]) -> None:
        text = json.dumps(ledger)
        self.context.state[STATE_KEY] = ConfigRecord({"json": text})
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            partial_path = f"{self.path}.tmp"
            with open(partial_path, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial_path, self.path)
