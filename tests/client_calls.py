"""Call the real ClientApp directly (no Ray, no SuperNode) with real Flower Messages and Contexts."""

from __future__ import annotations

from flower_messages import task_identity
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common import MessageType

from client_app.app import app as client_app
from common.config import RunConfig
from common.models import build_model
from common.protocol import RoundInstructions


def make_context(run_config: dict, node_config: dict, node_id: int = 7) -> Context:
    full = RunConfig.from_run_config(run_config).to_dict()
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=full)


def train_once(context: Context, server_round: int, clipping_norm: float = 0.0, arrays: ArrayRecord | None = None) -> Message:
    config = RunConfig.from_run_config(context.run_config)
    if arrays is None:
        arrays = ArrayRecord(build_model(config.model, 64, 10, seed=0).state_dict())
    content = RecordDict(
        {"arrays": arrays, "config": RoundInstructions(server_round, 64, 10, clipping_norm=clipping_norm).to_record()}
    )
    with task_identity(node_id=1):
        message = Message(content, context.node_id, MessageType.TRAIN)
    with task_identity(node_id=context.node_id):
        return client_app(message, context)
