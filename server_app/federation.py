"""The round loop, driven by hand so each round can be sampled, checked and recorded.

Flower's ``Strategy.start`` runs all rounds in one call; here the same strategy methods
(``configure_train``/``aggregate_train``/``configure_evaluate``/``aggregate_evaluate``) are
called round by round, with our seeded sampling, a failure check, central evaluation,
a progress line and the results written after every round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Callable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.protocol import EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, RoundInstructions
from server_app.progress import Progress
from server_app.results import RunRecorder
from server_app.sampling import ClientSampler, OfferedNodes

REPLY_TIMEOUT = 3600.0


class RoundFailed(RuntimeError):
    """No client produced a usable update in a round: training cannot go on."""


@dataclass
class Federation:
    grid: Grid
    strategy: Strategy
    sampler: ClientSampler
    eval_sampler: ClientSampler
    recorder: RunRecorder
    central_eval: Callable[[ArrayRecord], tuple[float, float]]
    num_features: int
    num_classes: int
    min_available_clients: int
    federated_evaluation: bool

    def wait_for_clients(self) -> list[int]:
        while len(nodes := list(self.grid.get_node_ids())) < self.min_available_clients:
            log(INFO, "Waiting for clients: %d connected, %d needed", len(nodes), self.min_available_clients)
            time.sleep(1.0)
        return nodes

    def _instructions(self, server_round: int):
        return RoundInstructions(server_round, self.num_features, self.num_classes).to_record()

    def run(self, arrays: ArrayRecord, num_rounds: int) -> ArrayRecord:
        progress = Progress(num_rounds)
        for server_round in range(1, num_rounds + 1):
            started = time.monotonic()
            arrays, row = self.train_round(server_round, arrays)
            if self.federated_evaluation:
                row |= self.evaluate_round(server_round, arrays)
            row["central_loss"], row["central_accuracy"] = self.central_eval(arrays)
            row["round"] = server_round
            row["seconds"] = round(time.monotonic() - started, 3)
            self.recorder.add_round(row)
            print(progress.line(server_round, row["central_accuracy"], row["central_loss"]), flush=True)
        return arrays

    def _exchange(self, messages) -> tuple[list[Message], list[Message]]:
        replies = list(self.grid.send_and_receive(messages, timeout=REPLY_TIMEOUT))
        failures = [m for m in replies if m.has_error()]
        for message in failures:
            log(WARNING, "client %s failed: %s", message.metadata.src_node_id, message.error.reason)
        return replies, failures

    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        chosen = self.sampler.sample(self.wait_for_clients())
        messages = list(
            self.strategy.configure_train(server_round, arrays, self._instructions(server_round), OfferedNodes(chosen))
        )
        replies, failures = self._exchange(messages)
        new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            reasons = "; ".join(sorted({m.error.reason for m in failures})) or "no replies"
            raise RoundFailed(
                f"round {server_round}: none of {len(messages)} sampled clients returned an update ({reasons})"
            )
        return new_arrays, {
            "train_loss": _metric(metrics, TRAIN_LOSS),
            "num_replies": len(replies) - len(failures),
            "num_failures": len(failures),
        }

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> dict:
        chosen = self.eval_sampler.sample(self.wait_for_clients())
        messages = self.strategy.configure_evaluate(
            server_round, arrays, self._instructions(server_round), OfferedNodes(chosen)
        )
        replies, _ = self._exchange(messages)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        return {"federated_loss": _metric(metrics, EVAL_LOSS), "federated_accuracy": _metric(metrics, EVAL_ACCURACY)}


def _metric(record: MetricRecord | None, key: str) -> float | None:
    if record is None or key not in record:
        return None
    return float(record[key])
