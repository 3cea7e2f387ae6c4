"""Build real Flower 1.41 Messages in tests, outside any Flower runtime.

An instruction ``Message(content, dst_node_id, message_type)`` reads its run, source node and
task ids from ``flwr.supercore.task_identity.TaskIdentity``, which only a runtime sets; a reply
``Message(content, reply_to=instruction)`` takes its metadata from the instruction. So:

    from tests.flower_messages import train_round, train_reply

    instructions = train_round(strategy, server_round=1, arrays=current, node_ids=[11, 12])
    replies = [train_reply(msg, new_arrays, num_examples=10) for msg in instructions]
    aggregated, metrics = strategy.aggregate_train(1, replies)

``train_round`` calls the strategy's real ``configure_train`` with the project's
``OfferedNodes`` as the grid (as server_app/federation.py does), inside ``task_identity()``.
Use ``task_identity()`` yourself (a context manager that restores the previous identity)
to build instruction Messages by hand, e.g. ``Message(RecordDict(...), 3, MessageType.TRAIN)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from server_app.sampling import OfferedNodes

# The Flower release whose private TaskIdentity this module (and tests/simulation.py's in-process
# simulation) was checked against; tests/test_flower_private_api.py fails on any other.
VERIFIED_FLOWER = "1.41.0"
SERVER_NODE_ID = SUPERLINK_NODE_ID  # the source node id a ServerApp's messages carry
NUM_EXAMPLES = "num-examples"


@contextmanager
def task_identity(run_id: int = 1, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> Iterator[None]:
    """Set TaskIdentity (run, node, task ids) for the block, then restore what was there."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def array_record(arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> ArrayRecord:
    """ArrayRecord from a dict of arrays (names kept) or a list (names "0", "1", ...)."""
    if not isinstance(arrays, Mapping):
        arrays = {str(i): a for i, a in enumerate(arrays)}
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def train_round(strategy, server_round: int, arrays: ArrayRecord, node_ids: Sequence[int]) -> list[Message]:
    """The strategy's real ``configure_train`` for these nodes; returns the instruction Messages."""
    with task_identity():
        return list(strategy.configure_train(server_round, arrays, ConfigRecord(), OfferedNodes(node_ids)))


def train_reply(
    instruction: Message,
    arrays: ArrayRecord | Mapping[str, np.ndarray] | Sequence[np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float | int] | None = None,
) -> Message:
    """A ClientApp-style train reply: one ArrayRecord "arrays", one MetricRecord "metrics"."""
    record = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    metric_values = {NUM_EXAMPLES: int(num_examples), **(metrics or {})}
    content = RecordDict({"arrays": record, "metrics": MetricRecord(metric_values)})
    return Message(content, reply_to=instruction)
