"""A dpsgd/local client trusts no one: its own node-config policy overrides what the server
asks, it answers no evaluation with exact statistics, and its noise is on a float-safe grid."""

import numpy as np
import pytest
from client_calls import make_context, train_once
from flower_messages import task_identity
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import MessageType

from client_app.app import app as client_app
from client_app.update_privacy import LAPLACE_GRID_BITS, _laplace_on_grid
from common.models import build_model
from common.privacy.local_dp import LocalDpLedger
from common.privacy.secret_random import SecretRandom
from common.protocol import EVAL_ACCURACY, EVAL_LOSS, LOCAL_EPSILON, NUM_EXAMPLES, REFUSED, RoundInstructions

NODE = {"partition-id": 0, "num-partitions": 10}
LOCAL = {"dp": "local", "noise-multiplier": 2.0, "clipping-norm": 0.1}


def _refusal(reply) -> str:
    metrics = reply.content["metrics"]
    return reply.content["status"]["reason"] if metrics.get(REFUSED, 0) else ""


def _evaluate(context) -> Message:
    with task_identity(node_id=1):
        content = {"arrays": ArrayRecord(build_model("mlp", 64, 10, seed=0).state_dict()),
                   "config": RoundInstructions(1, 64, 10).to_record()}
        message = Message(RecordDict(content), context.node_id, MessageType.EVALUATE)
    with task_identity(node_id=context.node_id):
        return client_app(message, context)


@pytest.mark.parametrize("run, node_policy, expected", [
    (LOCAL | {"noise-multiplier": 0.1}, {"min-noise-multiplier": 0.5}, "below this client's minimum 0.5"),
    ({"dp": "dpsgd", "noise-multiplier": 0.2, "local-epochs": 1}, {}, "below this client's minimum 0.3"),
    (LOCAL | {"target-delta": 1e-3}, {}, "above this client's maximum 1e-05"),
    ({"dp": "none"}, {"require-dp": "local"}, "requires dp = 'local'"),
    (LOCAL, {"require-dp": "dpsgd"}, "requires dp = 'dpsgd'"),
])
def test_a_client_refuses_a_server_that_asks_for_less_privacy_than_its_policy(run, node_policy, expected):
    reply = train_once(make_context(run, NODE | node_policy), 1)
    assert expected in _refusal(reply)


def test_a_client_refuses_more_rounds_than_its_own_epsilon_cap_allows():
    ledger = LocalDpLedger("gaussian", 2.0, 1e-5)
    ledger.step(), ledger.step()
    cap = (ledger.epsilon() + ledger.epsilon_if_step()) / 2  # room for two releases, not three
    context = make_context(LOCAL | {"num-server-rounds": 5}, NODE | {"max-epsilon": cap})
    replies = [train_once(context, r) for r in range(1, 6)]
    refusals = [_refusal(r) for r in replies]
    assert refusals[:2] == ["", ""] and all("privacy budget exhausted" in r for r in refusals[2:])
    spent = replies[1].content["metrics"][LOCAL_EPSILON]
    assert spent == pytest.approx(ledger.epsilon(), rel=1e-9) and spent <= cap


def test_the_default_policy_caps_epsilon_at_ten_whatever_the_server_asks():
    context = make_context({"dp": "local", "noise-multiplier": 0.5, "clipping-norm": 0.1}, NODE)
    assert "privacy budget exhausted" in _refusal(train_once(context, 1))


@pytest.mark.parametrize("mode", ["server", "client", "dpsgd", "local"])
def test_evaluate_releases_no_statistics_in_a_dp_mode(mode):
    reply = _evaluate(make_context({"dp": mode, "noise-multiplier": 1.0}, NODE))
    metrics = reply.content["metrics"]
    assert metrics[REFUSED] == 1 and not {NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY} & set(metrics)


def test_evaluate_answers_without_dp():
    metrics = _evaluate(make_context({"dp": "none"}, NODE)).content["metrics"]
    assert {NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY} <= set(metrics)


def test_laplace_noise_lives_on_the_grid_so_no_float_bits_carry_the_input():
    """Mironov's attack reads the input from which floats a textbook Laplace can output. Here
    every output is an integer number of grid steps g = C / 2^20, whatever the input."""
    clip = 0.1
    grid = 2.0 ** (np.floor(np.log2(clip)) - LAPLACE_GRID_BITS)
    rng = np.random.default_rng(0)
    for scale in (1e-6, 0.3, 1e3):  # inside and far outside the L1 ball
        delta = {"w": rng.normal(size=(40, 7)) * scale, "b": rng.normal(size=7) * scale}
        noisy = _laplace_on_grid(delta, clip, 2.0, SecretRandom())
        for value in noisy.values():
            steps = value / grid
            assert np.array_equal(steps, np.rint(steps))


def test_laplace_on_the_grid_clips_to_the_l1_norm_and_adds_the_accounted_noise():
    clip, z = 0.1, 0.5
    delta = {"w": np.full(1000, 1.0)}  # L1 norm 1000, clipped to 0.1
    draws = np.stack([_laplace_on_grid(delta, clip, z, SecretRandom())["w"] for _ in range(200)])
    # Mean: the clipped update (0.1 / 1000 per coordinate); noise std sqrt(2) * z * C per coordinate.
    assert np.abs(draws.mean(axis=0).sum() - clip) < 5 * np.sqrt(2) * z * clip * np.sqrt(1000 / 200)
    assert draws.std() == pytest.approx(np.sqrt(2) * z * clip, rel=0.02)
