"""Audit canaries on the client side: a ClientApp mod, active only when ``audit-canaries`` > 0.

``fl-dp audit`` (fl_dp/audit.py) measures a lower bound on epsilon by attacking the real run
(common/privacy/audit.py has the math and the papers). What it inserts depends on ``dp``:

* ``server``, ``client`` and ``none``: canary CLIENTS (Andrew et al. 2024). In simulation the
  LAST k = ``audit-canaries`` partitions are canaries and the other N = num-partitions - k
  nodes are the real clients, each training on partition i of N (the data a run without the
  audit would give it). The server knows nothing of this: it samples canaries like any other
  client, so with N real clients and k canaries the ledger accounts a population of N + k.
  Canary i is inserted with probability 1/2 (:func:`common.privacy.audit.canary_included`,
  from the audit key). When sampled, an inserted canary replies with the global model plus
  B * c_i, c_i its unit direction: B = 2 C with ``server`` clipping (the server clips it to C)
  and in ``none`` (no clipping; it then also claims the example count of real partition
  i mod N so FedAvg weighs it like a client), and B = C with ``client`` (an honest client clips
  itself; the server would reject more). A held-out canary declines every training request
  (``refused``): the server drops a refused reply before aggregation, so neither an update nor
  a clipped-count bit nor an example count of it enters anything released, exactly as if the
  client were not in the population. That is the add/remove relation the ledger accounts:
  the mean is over the FIXED denominator m (never the number of replies) and Poisson sampling
  draws every other client independently, so the output distribution with canary i held out
  is the one without client i. (Replying with the global model unchanged, delta 0, would be
  the same with fixed clipping, but with adaptive clipping its "unclipped" bit would still be
  counted: not absent.) Canaries answer evaluation requests with 0 examples (no weight).
* ``dpsgd``: canary EXAMPLES. Partition 0's training data gets the inserted ones of k
  out-of-distribution examples (inputs uniform over that partition's feature range, random
  labels: :func:`common.privacy.audit.canary_examples`); every other node is untouched.
  Its DP-SGD sampling rate follows its real size, as for every client (sizes are public).

The audit key (hex) comes from the environment variable ``FL_DP_AUDIT_KEY``, which
``fl-dp audit`` draws from the OS for every audit and records in the operator-only audit file.
Canary directions and inclusion bits are the auditor's own choice, not DP randomness.
Deployments on real SuperNodes (``data-path``) have no canaries.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.common import MessageType

from common.config import NodeConfig, RunConfig
from common.protocol import NUM_EXAMPLES, REFUSED, TRAIN_LOSS, UNCLIPPED, RoundInstructions, eval_metrics

AUDIT_KEY_ENV = "FL_DP_AUDIT_KEY"
CANARY_MODES = ("server", "client", "none")  # canary clients; dpsgd: canary examples
EXAMPLE_CANARY_PARTITION = 0
OVERSHOOT = 2.0  # an inserted canary's update norm, in clip norms, where nobody clips it for it
HELD_OUT = "audit canary held out of this run (not inserted): declines, as if absent"


def audit_key() -> bytes:
    text = os.environ.get(AUDIT_KEY_ENV, "")
    if not text:
        raise RuntimeError(
            f"audit-canaries > 0 but {AUDIT_KEY_ENV} is not set: audit canaries run under `fl-dp audit`, "
            "which draws the key"
        )
    return bytes.fromhex(text)


def real_clients(config: RunConfig, node: NodeConfig) -> int | None:
    """N, the number of real (demo-partition) clients when this run has canary clients, else None."""
    if config.audit_canaries and config.dp in CANARY_MODES and node.partition_id is not None and node.num_partitions is not None:
        return node.num_partitions - config.audit_canaries
    return None


def canary_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Answer for canary nodes; give real nodes their partition of the N real clients."""
    config = RunConfig.from_run_config(context.run_config)
    if not config.audit_canaries or config.dp not in CANARY_MODES:
        return call_next(msg, context)
    node = NodeConfig.from_node_config(context.node_config)
    real, partition = real_clients(config, node), node.partition_id
    if real is None or partition is None or msg.metadata.message_type == MessageType.QUERY:
        return call_next(msg, context)
    if real < 1:
        raise ValueError(f"audit-canaries = {config.audit_canaries} leaves no real client among {node.num_partitions}")
    if partition < real:  # a real client: same state object, its partition of the N real ones
        as_real = Context(context.run_id, context.node_id, dict(context.node_config) | {"num-partitions": real},
                          context.state, context.run_config)
        return call_next(msg, as_real)
    return _canary_reply(msg, config, partition - real, partition % real, real)


def _canary_reply(msg: Message, config: RunConfig, index: int, stand_in: int, real: int) -> Message:
    from common.privacy.audit import canary_direction, canary_included

    if msg.metadata.message_type == MessageType.EVALUATE:
        declined = eval_metrics(0, 0.0, 0.0) if config.dp == "none" else MetricRecord({REFUSED: 1})
        return Message(RecordDict({"metrics": declined}), reply_to=msg)
    key = audit_key()
    arrays = msg.content.array_records["arrays"]
    if not canary_included(key, index):
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({NUM_EXAMPLES: 1, REFUSED: 1}),
                              "status": ConfigRecord({"reason": HELD_OUT})})
        return Message(content, reply_to=msg)
    instructions = RoundInstructions.from_record(msg.content.config_records["config"])
    clip = instructions.clipping_norm or config.clipping_norm
    size = sum(array.numpy().size for array in arrays.values())
    norm = clip * (1 - 1e-6) if config.dp == "client" else OVERSHOOT * clip
    step = norm * canary_direction(key, index, size)
    canary_arrays, offset = {}, 0
    for name, array in arrays.items():
        value = array.numpy()
        canary_arrays[name] = (value.astype(np.float64) + step[offset : offset + value.size].reshape(value.shape)).astype(value.dtype)
        offset += value.size
    metrics: dict[str, MetricRecordValues] = {NUM_EXAMPLES: 1}
    if config.dp == "client":
        metrics[UNCLIPPED] = 0
    if config.dp == "none":  # FedAvg needs the same metric keys from every reply
        metrics[NUM_EXAMPLES], metrics[TRAIN_LOSS] = _stand_in(config, stand_in, real, instructions, arrays)
    record = ArrayRecord({name: Array(np.asarray(value, order="C")) for name, value in canary_arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


def _stand_in(
    config: RunConfig, partition: int, real: int, instructions: RoundInstructions, arrays: ArrayRecord
) -> tuple[int, float]:
    """``none``: the example count of real partition ``partition`` and the global model's loss on it,
    so the canary's reply looks like a client's (and FedAvg weighs it like one)."""
    from common.data.client_data import load_client_data
    from common.evaluation import evaluate
    from common.models import build_model

    node = NodeConfig(partition_id=partition, num_partitions=real)
    data = load_client_data(config, node, instructions.num_features, instructions.num_classes)
    if instructions.scaling is not None:
        data = data.scaled(instructions.scaling)
    model = build_model(config.model, instructions.num_features, instructions.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, _ = evaluate(model, data.x_train, data.y_train)
    return max(1, len(data.y_train)), float(loss)


def with_canary_examples(config: RunConfig, node: NodeConfig, data, num_classes: int):
    """``dpsgd`` audits: partition 0's data with the inserted canary examples appended."""
    if not (config.audit_canaries and config.dp == "dpsgd" and node.partition_id == EXAMPLE_CANARY_PARTITION):
        return data
    from common.privacy.audit import canary_included

    key = audit_key()
    x, y = example_canaries(config, key, data.x_train, num_classes)
    keep = np.array([canary_included(key, i) for i in range(config.audit_canaries)], dtype=bool)
    return type(data)(
        np.concatenate([data.x_train, x[keep].astype(data.x_train.dtype)]),
        np.concatenate([data.y_train, y[keep].astype(data.y_train.dtype)]),
        data.x_val,
        data.y_val,
    )


def example_canaries(config: RunConfig, key: bytes, x_train: np.ndarray, num_classes: int):
    """All k canary examples (inserted or not): the auditor rebuilds them from the same data."""
    from common.privacy.audit import canary_examples

    return canary_examples(key, config.audit_canaries, x_train.shape[1], num_classes,
                           float(x_train.min()), float(x_train.max()))
