"""The ClientApp: trains on this node's data (privately, per the run's ``dp`` mode) and
evaluates on its validation split.

A client machine needs only ``common/`` and this package: no server code is imported.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.attacks import attack_update, is_malicious
from client_app.canary import canary_mod, with_canary_examples
from client_app.policy import client_rng, epsilon_cap, mode_refusal, noise_refusal
from client_app.privacy_store import PrivacyStore, client_identity
from client_app.training import train_locally
from client_app.update_privacy import clip_for_server, local_ledger, local_noise_multiplier, randomize_locally
from common.config import NodeConfig, RunConfig
from common.data.client_data import load_client_data
from common.evaluation import evaluate
from common.logs import keep_root_logger_quiet
from common.models import build_model
from common.privacy.clipping import arrays_from_record
from common.protocol import (
    CLIENT_ID,
    DEBUG_NOISE,
    LOCAL_EPSILON,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    REFUSED,
    SAMPLE_EPSILON,
    TRAIN_LOSS,
    UNCLIPPED,
    RoundInstructions,
    eval_metrics,
)

torch.set_num_threads(1)  # one CPU per simulated client; Flower runs clients side by side

keep_root_logger_quiet()
app = ClientApp(mods=[canary_mod])  # audit canaries (fl-dp audit): a no-op unless audit-canaries > 0


def _prepare(msg: Message, context: Context):
    config = RunConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    instructions = RoundInstructions.from_record(msg.content.config_records["config"])
    data = load_client_data(config, node, instructions.num_features, instructions.num_classes)
    if instructions.scaling is not None:
        data = data.scaled(instructions.scaling)
    data = with_canary_examples(config, node, data, instructions.num_classes)  # dpsgd audits only
    model = build_model(config.model, instructions.num_features, instructions.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return config, node, instructions, data, model


def _reply(msg: Message, arrays: ArrayRecord, metrics: dict, status: str = "") -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if status:
        content["status"] = ConfigRecord({"reason": status})
    return Message(content=content, reply_to=msg)


def _refuse(msg: Message, reason: str, metrics: dict | None = None) -> Message:
    """Decline the request: the server's model goes back unchanged, with the reason."""
    arrays = msg.content.array_records.get("arrays", ArrayRecord())
    return _reply(msg, arrays, {NUM_EXAMPLES: 1, REFUSED: 1} | (metrics or {}), reason)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, node, instructions, data, model = _prepare(msg, context)
    refusal = mode_refusal(config, node.policy)
    if refusal:
        return _refuse(msg, refusal)
    # Seeds only what no guarantee rests on (initial shuffles, the simulated attacks); DP noise
    # and DP-SGD batches come from this client's own CSPRNG (client_app/policy.client_rng).
    seed = zlib.crc32(f"{config.seed}|{instructions.server_round}|{node.partition_id}|{node.data_path}".encode())
    torch.manual_seed(seed)
    reply = _train(msg, context, config, node, instructions, data, model, seed)
    if is_malicious(config, node):
        honest = arrays_from_record(reply.content.array_records["arrays"])
        bad = attack_update(honest, arrays_from_record(msg.content.array_records["arrays"]), config, np.random.default_rng(seed))
        reply.content["arrays"] = _record(bad)
    return reply


def _train(msg, context, config, node, instructions, data, model, seed) -> Message:
    if config.dp == "dpsgd":
        return _train_dpsgd(msg, context, config, node, instructions, data, model)

    global_arrays = arrays_from_record(msg.content.array_records["arrays"])
    train_loss = train_locally(model, data.x_train, data.y_train, config, instructions.proximal_mu, seed)
    new_arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if config.dp == "none":
        return _reply(msg, ArrayRecord(model.state_dict()), {NUM_EXAMPLES: len(data.y_train), TRAIN_LOSS: train_loss})
    # DP modes: replies carry no statistics of the private data (no sizes, no losses).
    if config.dp == "server":
        return _reply(msg, ArrayRecord(model.state_dict()), {NUM_EXAMPLES: 1})
    if config.dp == "client":
        clipped, unclipped = clip_for_server(new_arrays, global_arrays, instructions.clipping_norm)
        return _reply(msg, _record(clipped), {NUM_EXAMPLES: 1, UNCLIPPED: unclipped})
    return _train_local_dp(msg, context, config, node, instructions, new_arrays, global_arrays)


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _noise_metrics(node: NodeConfig) -> dict:
    return {DEBUG_NOISE: 1} if node.policy.debug_noise_key else {}


def _train_local_dp(msg, context, config, node, instructions, new_arrays, global_arrays) -> Message:
    store = PrivacyStore(context, config, node)
    saved = store.load()
    z = saved["noise_multiplier"] if saved else local_noise_multiplier(config)
    ledger = local_ledger(config, z, saved)
    refusal = noise_refusal(config, node.policy, z)
    cap = epsilon_cap(config, node.policy)
    if not refusal and ledger.epsilon_if_step() > cap:
        refusal = (
            f"privacy budget exhausted: local epsilon {ledger.epsilon():.3f}, another release would reach "
            f"{ledger.epsilon_if_step():.3f} > cap {cap:g} (the smaller of this client's max-epsilon and the run's)"
        )
    if refusal:
        return _refuse(msg, refusal, {LOCAL_EPSILON: ledger.epsilon()})
    rng = client_rng(node.policy, instructions.server_round)
    noisy = randomize_locally(new_arrays, global_arrays, config, z, rng)
    ledger.step()  # every release is charged, a repeated request included
    store.save({"updates": ledger.rounds, "noise_multiplier": z, "ledger": ledger.state_dict()})
    metrics = {NUM_EXAMPLES: 1, LOCAL_EPSILON: ledger.epsilon(), NOISE_MULTIPLIER: z} | _noise_metrics(node)
    return _reply(msg, _record(noisy), metrics)


def _train_dpsgd(msg, context, config, node, instructions, data, model) -> Message:
    from client_app.dpsgd import noise_for, train_dpsgd

    sigma = noise_for(config, len(data.y_train))
    refusal = noise_refusal(config, node.policy, sigma)
    if refusal:
        return _refuse(msg, refusal, {NOISE_MULTIPLIER: sigma})
    store = PrivacyStore(context, config, node)
    saved = store.load() or {"updates": 0, "history": []}
    rng = client_rng(node.policy, instructions.server_round)
    cap = epsilon_cap(config, node.policy)
    result, history = train_dpsgd(model, data.x_train, data.y_train, config, saved["history"], rng, cap, sigma)
    metrics = {NUM_EXAMPLES: 1, SAMPLE_EPSILON: result.epsilon, NOISE_MULTIPLIER: result.noise_multiplier}
    if result.refused:
        return _refuse(msg, result.refused, metrics)
    store.save({"updates": saved["updates"] + 1, "history": history})
    return _reply(msg, ArrayRecord(model.state_dict()), metrics | _noise_metrics(node))


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server who this client is across restarts, so seeded sampling picks the same clients."""
    config = RunConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    return Message(RecordDict({"identity": ConfigRecord({CLIENT_ID: client_identity(config, node)})}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    config = RunConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    if config.privacy.private or node.policy.require_dp:
        # Exact loss, accuracy and example count of private data: covered by no guarantee.
        reason = mode_refusal(config, node.policy) or f"dp = {config.dp!r}: this client releases no evaluation statistics"
        return Message(RecordDict({"metrics": MetricRecord({REFUSED: 1}), "status": ConfigRecord({"reason": reason})}),
                       reply_to=msg)
    _, _, _, data, model = _prepare(msg, context)
    loss, accuracy = evaluate(model, data.x_val, data.y_val)
    content = RecordDict({"metrics": eval_metrics(len(data.y_val), loss, accuracy)})
    return Message(content=content, reply_to=msg)
