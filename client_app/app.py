"""The ClientApp: trains on this node's data and evaluates on its validation split.

A client machine needs only ``common/`` and this package: no server code is imported.
"""

from __future__ import annotations

import zlib

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_app.training import train_locally
from common.config import NodeConfig, RunConfig
from common.data.client_data import load_client_data
from common.evaluation import evaluate
from common.models import build_model
from common.protocol import RoundInstructions, eval_metrics, train_metrics

torch.set_num_threads(1)  # one CPU per simulated client; Flower runs clients side by side

app = ClientApp()


def _prepare(msg: Message, context: Context):
    config = RunConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    instructions = RoundInstructions.from_record(msg.content["config"])
    data = load_client_data(config, node, instructions.num_features, instructions.num_classes)
    model = build_model(config.model, instructions.num_features, instructions.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return config, node, instructions, data, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, node, instructions, data, model = _prepare(msg, context)
    seed = zlib.crc32(f"{config.seed}|{instructions.server_round}|{node.partition_id}|{node.data_path}".encode())
    torch.manual_seed(seed)
    train_loss = train_locally(
        model, data.x_train, data.y_train, config, instructions.proximal_mu, seed
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": train_metrics(len(data.y_train), train_loss),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    _, _, _, data, model = _prepare(msg, context)
    loss, accuracy = evaluate(model, data.x_val, data.y_val)
    content = RecordDict({"metrics": eval_metrics(len(data.y_val), loss, accuracy)})
    return Message(content=content, reply_to=msg)
