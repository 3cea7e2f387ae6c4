"""Client-side privacy on the real ClientApp: cumulative DP-SGD ledger, restarts, budget refusal,
client clipping and local DP."""

import numpy as np
import pytest
from client_calls import make_context, train_once
from flwr.app import ArrayRecord, Context, RecordDict

from client_app.privacy_store import PrivacyStore, client_identity
from common.config import NodeConfig, RunConfig
from common.models import build_model
from common.privacy.clipping import arrays_from_record, model_delta, update_norm
from common.protocol import LOCAL_EPSILON, REFUSED, SAMPLE_EPSILON, UNCLIPPED

DPSGD = {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0, "local-epochs": 1}
NODE = {"partition-id": 0, "num-partitions": 10}


def _metrics(reply):
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply.content["metrics"]


def test_dpsgd_epsilon_grows_across_rounds_and_survives_a_restart(tmp_path):
    node = NODE | {"state-dir": str(tmp_path)}
    context = make_context(DPSGD, node)
    epsilons = [_metrics(train_once(context, r))[SAMPLE_EPSILON] for r in (1, 2, 3)]
    assert epsilons[0] > 0 and epsilons[0] < epsilons[1] < epsilons[2]

    # A restarted SuperNode: new node id, empty context.state, same state-dir and data.
    restarted = make_context(DPSGD, node, node_id=99)
    after_restart = _metrics(train_once(restarted, 4))[SAMPLE_EPSILON]
    assert after_restart > epsilons[2]

    # The same growth in one uninterrupted ledger: 4 rounds without a restart.
    fresh = make_context(DPSGD, NODE)
    uninterrupted = [_metrics(train_once(fresh, r))[SAMPLE_EPSILON] for r in (1, 2, 3, 4)]
    assert after_restart == pytest.approx(uninterrupted[-1], rel=1e-9)


def test_without_state_dir_a_restart_loses_nothing_within_the_run(tmp_path):
    context = make_context(DPSGD, NODE)
    first = _metrics(train_once(context, 1))[SAMPLE_EPSILON]
    second = _metrics(train_once(context, 2))[SAMPLE_EPSILON]
    assert second > first  # context.state carries the ledger between rounds


def test_dpsgd_client_refuses_when_budget_is_exhausted(tmp_path):
    context = make_context(DPSGD | {"max-epsilon": 1.0}, NODE | {"state-dir": str(tmp_path)})
    replies = [train_once(context, r) for r in range(1, 6)]
    refused = [bool(_metrics(r).get(REFUSED, 0)) for r in replies]
    assert any(refused), [_metrics(r)[SAMPLE_EPSILON] for r in replies]
    first_refusal = refused.index(True)
    assert all(refused[first_refusal:])  # once exhausted, always refused
    assert all(_metrics(r)[SAMPLE_EPSILON] <= 1.0 for r in replies)
    assert "privacy budget exhausted" in replies[first_refusal].content["status"]["reason"]


def test_ledger_identity_follows_the_data_not_the_node():
    config = RunConfig()
    assert client_identity(config, NodeConfig(0, 10)) == client_identity(config, NodeConfig(0, 10))
    assert client_identity(config, NodeConfig(0, 10)) != client_identity(config, NodeConfig(1, 10))
    assert client_identity(config, NodeConfig(data_path="/a.csv")) != client_identity(config, NodeConfig(data_path="/b.csv"))


def test_store_keeps_the_ledger_with_more_progress(tmp_path):
    config, node = RunConfig(), NodeConfig(0, 10, state_dir=str(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store = PrivacyStore(context, config, node)
    store.save({"updates": 5, "history": [[1.0, 0.1, 50]]})
    stale = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    assert PrivacyStore(stale, config, node).load()["updates"] == 5


def test_client_mode_clips_to_the_norm_the_server_sent():
    context = make_context({"dp": "client", "learning-rate": 0.5}, NODE)
    initial = ArrayRecord(build_model("mlp", 64, 10, seed=0).state_dict())
    reply = train_once(context, 1, clipping_norm=0.05, arrays=initial)
    delta = model_delta(arrays_from_record(reply.content["arrays"]), arrays_from_record(initial))
    assert update_norm(delta) <= 0.05 * (1 + 1e-5)
    assert _metrics(reply)[UNCLIPPED] == 0  # five epochs at lr 0.5 move far more than 0.05


def test_local_dp_adds_noise_and_accounts_every_release():
    context = make_context({"dp": "local", "noise-multiplier": 2.0, "clipping-norm": 0.1}, NODE)
    initial = ArrayRecord(build_model("mlp", 64, 10, seed=0).state_dict())
    first = train_once(context, 1, arrays=initial)
    second = train_once(context, 2, arrays=initial)
    delta = model_delta(arrays_from_record(first.content["arrays"]), arrays_from_record(initial))
    num_params = sum(v.size for v in delta.values())
    # Clipped to 0.1, then N(0, (2*0.1)^2) per coordinate: the noise dominates the norm.
    assert update_norm(delta) == pytest.approx(0.2 * np.sqrt(num_params), rel=0.05)
    assert 0 < _metrics(first)[LOCAL_EPSILON] < _metrics(second)[LOCAL_EPSILON]


def test_dpsgd_target_epsilon_holds_when_the_batch_does_not_divide_the_data(tmp_path):
    """The noise is solved for the sampling the client really does (rate 1/ceil(n/B), ceil(n/B) steps per epoch)."""
    rounds, target = 3, 3.0
    context = make_context(
        {"dp": "dpsgd", "target-epsilon": target, "num-server-rounds": rounds, "local-epochs": 1, "batch-size": 16},
        NODE,
    )
    epsilons = [_metrics(train_once(context, r))[SAMPLE_EPSILON] for r in range(1, rounds + 1)]
    assert 0.95 * target <= epsilons[-1] <= target, epsilons
