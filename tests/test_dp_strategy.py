"""User-level DP as a Flower strategy wrapper: the wrapped strategy only post-processes the release.

The attack each test stands against: a wrapped strategy that could see the clients' own updates
(Krum picks one, FedMedian takes their coordinates) would release a function of them that the
noise does not cover. The wrapper must hand it the noisy mean and nothing else, and charge every
release (an empty Poisson round's too) to the ledger.
"""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedAvgM

from common.privacy.accounting import UserLevelLedger
from common.privacy.secret_random import SecretRandom
from server_app.dp_strategy import DP_NUM_CLIPPED, UserLevelDPStrategy, unwrapped
from server_app.user_level_dp import UserLevelDP
from tests.flower_messages import array_record, task_identity, train_reply, train_round

SIZE = 1_000
TAKE_ALL = dict(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)


class SpyFedAvg(FedAvg):
    """FedAvg that keeps every reply it is asked to aggregate."""

    def __init__(self):
        super().__init__(**TAKE_ALL)
        self.seen: list[dict[str, np.ndarray]] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen += [{k: v.numpy() for k, v in r.content["arrays"].items()} for r in replies]
        return super().aggregate_train(server_round, replies)


def _wrapped(inner, key: str, m: int = 4, z: float = 1.0, clip: float = 1.0):
    mechanism = UserLevelDP(z, clip, expected_clients=m, clip_on_server=True, rng=SecretRandom.from_debug_key(key))
    ledger = UserLevelLedger(z, "poisson", 100, m, 1e-5, "rdp")
    return UserLevelDPStrategy(inner, mechanism, ledger), mechanism


def _updates(n: int, norm: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": (d := rng.normal(size=SIZE)) / np.linalg.norm(d) * norm} for _ in range(n)]


def _round(strategy, server_round, current, updates):
    instructions = train_round(strategy, server_round, array_record(current), list(range(100, 100 + len(updates))))
    replies = [train_reply(msg, {"w": current["w"] + u["w"]}, num_examples=10 * (i + 1))
               for i, (msg, u) in enumerate(zip(instructions, updates))]
    with task_identity():
        arrays, metrics = strategy.aggregate_train(server_round, replies)
    return instructions, arrays, metrics


def test_the_wrapped_strategy_sees_only_the_noisy_mean():
    spy = SpyFedAvg()
    strategy, _ = _wrapped(spy, "spy")
    current = {"w": np.zeros(SIZE)}
    updates = _updates(3, norm=5.0)  # clipped to 1 by the server
    _, arrays, metrics = _round(strategy, 1, current, updates)
    assert len(spy.seen) == 1, "the wrapped strategy must aggregate one value: the release"
    release = spy.seen[0]["w"]
    np.testing.assert_allclose(arrays["w"].numpy(), release)
    for update in updates:  # no client's own update (clipped or not) reaches it
        for candidate in (update["w"], update["w"] / 5.0):
            assert np.linalg.norm(release - candidate) > 1.0
    assert metrics[DP_NUM_CLIPPED] == 3


def test_the_release_is_the_fixed_denominator_mean_plus_the_mechanisms_noise():
    """Same debug key, same draws: the wrapper's output is the mechanism's output, not an
    example-weighted mean (the replies carry 10, 20, 30 examples)."""
    strategy, _ = _wrapped(SpyFedAvg(), "same-key")
    reference, _ = _wrapped(SpyFedAvg(), "same-key")
    current = {"w": np.zeros(SIZE)}
    updates = _updates(3, norm=0.5)
    _, arrays, _ = _round(strategy, 1, current, updates)
    expected, _ = reference.mechanism.aggregate(current, [{"w": current["w"] + u["w"]} for u in updates])
    np.testing.assert_allclose(arrays["w"].numpy(), expected["w"], rtol=1e-6, atol=1e-7)


def test_server_momentum_steps_on_the_release():
    """FedAvgM behind the wrapper: momentum of the noisy mean, i.e. post-processing."""
    inner = FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **TAKE_ALL)
    strategy, _ = _wrapped(inner, "momentum")
    reference, _ = _wrapped(SpyFedAvg(), "momentum")
    current = {"w": np.zeros(SIZE)}
    velocity = np.zeros(SIZE)
    for server_round in (1, 2):
        updates = _updates(2, norm=0.5, seed=server_round)
        _, arrays, _ = _round(strategy, server_round, current, updates)
        release, _ = reference.mechanism.aggregate(current, [{"w": current["w"] + u["w"]} for u in updates])
        pseudo_gradient = current["w"] - release["w"]
        velocity = pseudo_gradient if server_round == 1 else 0.9 * velocity + pseudo_gradient
        expected = current["w"] - velocity
        np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
        current = {"w": arrays["w"].numpy()}
    assert unwrapped(strategy) is inner


def test_an_empty_round_releases_noise_and_is_charged():
    strategy, _ = _wrapped(SpyFedAvg(), "empty")
    current = {"w": np.zeros(SIZE)}
    train_round(strategy, 1, array_record(current), [])
    before = strategy.ledger.epsilon()
    with task_identity():
        arrays, _ = strategy.aggregate_train(1, [])
    assert np.linalg.norm(arrays["w"].numpy()) > 0  # noise alone: N(0, (zC/m)^2) per coordinate
    assert strategy.ledger.epsilon() > before


def test_clients_are_told_the_rounds_clip_norm():
    strategy, mechanism = _wrapped(SpyFedAvg(), "config", clip=0.37)
    instructions = train_round(strategy, 1, array_record({"w": np.zeros(3)}), [7, 8])
    assert [msg.content["config"]["clipping-norm"] for msg in instructions] == [pytest.approx(0.37)] * 2
    assert mechanism.clipping_norm == 0.37
