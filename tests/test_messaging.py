"""The server's reply collection: replies are collected soon after they arrive, and the timeout holds.

Time is simulated (a fake clock whose ``sleep`` advances it), so nothing here depends on load.
"""

import pytest
from flower_messages import task_identity
from flwr.app import Message, RecordDict
from flwr.common import MessageType

import server_app.messaging as messaging


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


class DelayedGrid:
    """Push/pull like a Grid; reply i becomes available ``delays[i]`` seconds after the push."""

    def __init__(self, clock, delays):
        self.clock, self.delays, self.pulls = clock, delays, 0

    def push_messages(self, messages):
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        replies = []
        for message_id, delay in zip(self.ids, self.delays):
            if delay <= self.clock.now and message_id in wanted:
                with task_identity(node_id=1):
                    reply = Message(RecordDict(), 1, MessageType.TRAIN)
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                replies.append(reply)
        return replies


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(messaging, "time", fake)
    return fake


def _messages(count):
    with task_identity(node_id=1):
        return [Message(RecordDict(), 2, MessageType.TRAIN) for _ in range(count)]


def test_replies_are_collected_soon_after_they_arrive(clock):
    grid = DelayedGrid(clock, [0.0, 0.05, 30.0])
    replies = messaging.send_and_receive(grid, _messages(3), timeout=3600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 30.0 <= clock.now <= 30.0 + messaging.LONGEST_PULL_INTERVAL  # Flower's grid: up to +3 s
    assert grid.pulls < 30.0 / messaging.LONGEST_PULL_INTERVAL + 20  # backing off, not spinning


def test_a_quick_reply_is_collected_within_milliseconds(clock):
    grid = DelayedGrid(clock, [0.004])
    messaging.send_and_receive(grid, _messages(1), timeout=3600)
    assert clock.now <= 0.01


def test_timeout_returns_what_arrived(clock):
    grid = DelayedGrid(clock, [0.0, 60.0])
    replies = messaging.send_and_receive(grid, _messages(2), timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == pytest.approx(5.0)


def test_clients_gone_before_round_one_stop_the_run_cleanly():
    """Waking the clients is start-up (outside the round loop's own handling): a resume whose clients
    never come back must still end with a reason, not an exception that loses the run's ending."""
    from flwr.app import ArrayRecord

    from common.config import RunConfig
    from server_app.federation import Federation
    from server_app.privacy import plan_privacy

    class EmptyGrid:
        def get_node_ids(self):
            return []

    federation = Federation(
        grid=EmptyGrid(), strategy=None, privacy=plan_privacy(RunConfig(), 2), eval_sampler=None, recorder=None,
        diagnostics=None, central_eval=None, num_features=4, num_classes=2, min_available_clients=2,
        federated_evaluation=False, tally=None, health=None, wait_timeout=0.01,
    )
    arrays = ArrayRecord()
    returned, reason = federation.run(arrays, num_rounds=3, first_round=2)
    assert returned is arrays
    assert reason.startswith("stopped before round 2: only 0 of the 2 required clients"), reason
