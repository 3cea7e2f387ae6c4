"""The ClientApp: train and evaluate on this node's partition."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plainfl.task import MLP, load_partition, test, train

torch.set_num_threads(1)
app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = MLP()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    (x, y), _ = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    cfg = context.run_config
    loss = train(model, x, y, cfg["local-epochs"], cfg["batch-size"], cfg["learning-rate"], cfg["momentum"])
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = MLP()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, (x, y) = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, acc = test(model, x, y)
    return Message(content=RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc,
                                                                "num-examples": len(y)})}), reply_to=msg)
