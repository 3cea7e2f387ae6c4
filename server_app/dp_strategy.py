"""User-level DP-FedAvg as a Flower strategy wrapper: noise first, then the wrapped strategy's step.

The same seam as Flower's ``DifferentialPrivacyServerSideFixedClipping`` (a ``Strategy`` that
wraps any other one), with this project's mechanism (:mod:`server_app.user_level_dp`):

* ``configure_train`` remembers the global model it sends and puts this round's clip norm
  into the instructions (clients clip to it in ``dp = "client"``), then lets the wrapped
  strategy build the messages;
* ``aggregate_train`` releases ONE noisy value, the clipped updates summed over a fixed
  denominator m plus N(0, (z_delta*C/m)^2) per coordinate, charges it to the ledger, and hands
  exactly that value to the wrapped strategy as its only input (one reply of weight 1).
  Whatever the wrapped strategy then does (FedAvg takes it as is; FedAvgM, FedAdam, FedYogi,
  FedAdagrad run their optimizer on it) is a function of the released value alone:
  post-processing, which cannot weaken the guarantee.

Why not Flower's wrappers: they add noise to the wrapped strategy's OUTPUT, an example-weighted
mean (sensitivity not C/m) taken after the optimizer step (tests/test_flower_dp_audit.py). Why
one reply rather than the clipped replies themselves: a strategy that looked at the individual
updates (Krum picks one, FedMedian takes coordinates of them) would no longer be post-processing.

What one release did (clip norm, clipped and rejected counts) comes back in the metrics record
under the ``dp-*`` keys; the exact counts are private and go only to the operator's diagnostics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.privacy.clipping import arrays_from_record, record_from_arrays
from common.protocol import NUM_EXAMPLES, UNCLIPPED
from server_app.replies import reported
from server_app.user_level_dp import UserLevelDP

if TYPE_CHECKING:
    from common.privacy.accounting import UserLevelLedger

# Keys of the metrics record aggregate_train returns (operator-only figures).
DP_CLIPPING_NORM = "dp-clipping-norm"
DP_NUM_CLIPPED = "dp-num-clipped"
DP_NUM_REJECTED = "dp-num-rejected"


class UserLevelDPStrategy(Strategy):
    """Wrap ``strategy`` so that every round releases one noisy clipped mean, accounted in ``ledger``."""

    def __init__(self, strategy: Strategy, mechanism: UserLevelDP, ledger: UserLevelLedger):
        super().__init__()
        self.strategy = strategy  # the wrapped strategy, Flower's attribute name for it
        self.mechanism = mechanism
        self.ledger = ledger
        self._sent_model: ArrayRecord | None = None  # the global model of the round in flight

    def __repr__(self) -> str:
        return f"UserLevelDPStrategy({self.strategy!r})"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_model = arrays
        config = ConfigRecord(dict(config) | {"clipping-norm": self.mechanism.clipping_norm})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the noisy mean (even of no reply: an empty Poisson round releases noise alone),
        step the ledger, then let the wrapped strategy post-process the release."""
        if self._sent_model is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to take deltas from")
        replies = [reply for reply in replies if not reply.has_error()]
        updates = [arrays_from_record(reply.content.array_records["arrays"]) for reply in replies]
        unclipped = [_reported_unclipped(reply) for reply in replies]
        released, what = self.mechanism.aggregate(arrays_from_record(self._sent_model), updates, unclipped)
        self.ledger.step()
        stepped, _ = self.strategy.aggregate_train(server_round, [_as_only_reply(record_from_arrays(released))])
        metrics = MetricRecord({
            DP_CLIPPING_NORM: what.clipping_norm,
            DP_NUM_CLIPPED: what.num_clipped,
            DP_NUM_REJECTED: what.num_rejected,
        })
        return stepped, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _as_only_reply(released: ArrayRecord) -> Message:
    """The release in the form a Flower strategy aggregates: one train reply of weight 1, so the
    wrapped strategy's weighted mean is the release itself. Flower's strategies expose their
    server step only through ``aggregate_train``, which reads replies' content and nothing else."""
    content = RecordDict({"arrays": released, "metrics": MetricRecord({NUM_EXAMPLES: 1})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _reported_unclipped(reply: Message) -> int:
    """Client mode with adaptive clipping: 1 if the client says its update was within the norm (the default)."""
    value = reported(reply, UNCLIPPED)
    return 1 if value is None else int(value)


def unwrapped(strategy: Strategy) -> Strategy:
    """The strategy that holds the optimizer state (checkpoints store the wrapped one's)."""
    return strategy.strategy if isinstance(strategy, UserLevelDPStrategy) else strategy
