"""The round loop, driven by hand so each round can be sampled, checked and recorded.

Flower's ``Strategy.start`` runs all rounds in one call; here the same strategy methods
(``configure_train``/``aggregate_train``/``configure_evaluate``/``aggregate_evaluate``) are
called round by round, with the privacy plan's sampling, the budget stop, a failure check,
central evaluation, a progress line and the results written after every round. User-level DP
is not the loop's business: it is in the strategy (``server_app.dp_strategy``), which the
privacy plan wraps around the configured one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.data.scaling import FeatureScaling
from common.evaluation import Evaluation
from common.privacy.clipping import arrays_from_record, record_from_arrays
from common.protocol import (
    CLIENT_ID,
    DEBUG_NOISE,
    EVAL_ACCURACY,
    EVAL_LOSS,
    LOCAL_EPSILON,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    REFUSED,
    SAMPLE_EPSILON,
    TRAIN_LOSS,
    RoundInstructions,
)
from server_app import run_state
from server_app.diagnostics import Diagnostics
from server_app.dp_strategy import DP_CLIPPING_NORM, DP_NUM_CLIPPED, DP_NUM_REJECTED
from server_app.health import RunHealth
from server_app.messaging import send_and_receive
from server_app.privacy import PrivacyPlan
from server_app.progress import Progress
from server_app.replies import metric, reported
from server_app.results import RunRecorder
from server_app.sampling import ClientSampler, offered
from server_app.status import say
from server_app.update_validation import reply_problem

REPLY_TIMEOUT = 3600.0


class RoundFailed(RuntimeError):
    """No client produced a usable update in a round: training cannot go on."""


class Diverged(RuntimeError):
    """The model cannot improve any more: its aggregate is not finite, or every update was malformed."""


class WaitTimeout(RuntimeError):
    """Too few clients stayed connected for longer than ``wait-timeout``."""


class BudgetSpent(RuntimeError):
    """Every sampled client refused because its own privacy budget is spent (dpsgd/local)."""


# How a client words a refusal for lack of budget (client_app/app.py, client_app/dpsgd.py).
BUDGET_REFUSAL = "privacy budget exhausted"


# How a run ended, as summary.json's ``stop_kind`` and the last log line ``fl-dp stop-kind: <kind>``
# (launchers turn it into their exit code): every planned round ran; the privacy budget
# (max-epsilon) stopped it; it stopped waiting for clients (wait-timeout); or it failed (the
# model diverged, or a round had no usable update).
STOP_KINDS = ("completed", "budget", "clients", "failed")


@dataclass
class Stop:
    kind: str  # one of STOP_KINDS
    reason: str  # one sentence, summary.json's ``stop_reason``
    interrupted: dict | None = None  # the round that did not finish: {"round": r} (+ its counts without DP)
    error: RoundFailed | None = None  # re-raised by the ServerApp once the results are written


@dataclass
class PrivacyTally:
    """Privacy figures gathered round by round (from the server's ledger or clients' reports)."""

    sample_epsilon_max: float | None = None  # dpsgd: max cumulative sample-level epsilon reported
    local_epsilon_max: float | None = None  # local: max cumulative local epsilon reported
    reported_noise: float | None = None  # dpsgd/local: smallest noise multiplier a client used
    clipping_norm: float | None = None  # server/client: the clip norm of the last round
    num_clipped: int = 0
    num_rejected: int = 0
    debug_clients: bool = False  # a dpsgd/local client drew its noise from a debug key: no guarantee

    def collect(self, usable: list[Message]) -> None:
        if any(reported(m, DEBUG_NOISE) for m in usable):
            self.debug_clients = True
        for key, attr in ((SAMPLE_EPSILON, "sample_epsilon_max"), (LOCAL_EPSILON, "local_epsilon_max")):
            values = [value for m in usable if (value := reported(m, key)) is not None]
            previous = getattr(self, attr)
            if values:
                setattr(self, attr, max(values + ([previous] if previous is not None else [])))
        noises = [value for m in usable if (value := reported(m, NOISE_MULTIPLIER)) is not None]
        if noises:
            self.reported_noise = min(noises)


def _refusal_reason(reply: Message) -> str:
    status = reply.content.config_records.get("status")
    return str(status["reason"]) if status is not None and "reason" in status else "refused"


def wait_for_clients(grid: Grid, needed: int, why: str, timeout: float) -> list[int]:
    """Connected node ids once at least ``needed`` are there; ``timeout`` seconds at most (0: forever).

    Polls quickly first (a federation that is already up answers at once) and then once a second.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    while len(nodes := list(grid.get_node_ids())) < needed:
        if timeout and time.monotonic() > deadline:
            raise WaitTimeout(
                f"only {len(nodes)} of the {needed} required clients ({why}) connected within wait-timeout = {timeout:g}s"
            )
        log(INFO, "Waiting for clients: %d connected, %d needed (%s)", len(nodes), needed, why)
        time.sleep(pause)
        pause = min(2 * pause, 1.0)
    return nodes


@dataclass
class Federation:
    """The round loop's parts, each complete when the federation is built (after the clients
    connected and the privacy plan was made, or restored from a checkpoint)."""

    grid: Grid
    strategy: Strategy  # in user-level DP modes wrapped by server_app.dp_strategy.UserLevelDPStrategy
    privacy: PrivacyPlan
    eval_sampler: ClientSampler
    recorder: RunRecorder
    diagnostics: Diagnostics
    central_eval: Callable[[ArrayRecord], Evaluation]
    num_features: int
    num_classes: int
    min_available_clients: int
    federated_evaluation: bool
    tally: PrivacyTally
    health: RunHealth
    max_epsilon: float = 0.0
    wait_timeout: float = 0.0  # seconds; 0 waits forever (Flower's own behaviour)
    identify_clients: bool = True
    identities: dict[int, str] = field(default_factory=dict)  # node id -> client identity
    scaling: FeatureScaling | None = None  # users' tables: sent to clients with every instruction
    stopped: Stop | None = None  # how run() ended
    round_counts: dict | None = None  # the exact counts of the round in flight
    _sent: dict[str, int] = field(default_factory=dict)  # message id -> the node it was sent to

    def connected_clients(self) -> list[int]:
        """Connected node ids, ordered by the clients' stable identities (not by their node ids,
        which change with every start), so the same seed samples the same clients in every run."""
        nodes = self.wait_for_clients()
        if not self.identify_clients:  # huge simulations: one message per client is too dear
            return sorted(nodes)
        unknown = [n for n in nodes if n not in self.identities]
        if unknown:
            with_identity = RecordDict({"config": ConfigRecord()})
            queries = [Message(with_identity, node, MessageType.QUERY) for node in unknown]
            for reply in send_and_receive(self.grid, queries, REPLY_TIMEOUT):
                if not reply.has_error():
                    self.identities[reply.metadata.src_node_id] = str(reply.content["identity"][CLIENT_ID])
        return sorted(nodes, key=lambda node: (self.identities.get(node, ""), node))

    def wait_for_clients(self) -> list[int]:
        """Connected node ids once enough are there; bounded by the wait limit.

        Enough is ``min-available-clients``, and with fixed-size DP sampling the whole population
        the ledger was opened for: m of fewer than N clients is a higher rate than the m/N the
        epsilon is accounted with, so the server waits (or stops) rather than under-report.
        """
        needed = max(self.min_available_clients, self.privacy.population)
        why = "min-available-clients" if needed == self.min_available_clients else (
            "fixed DP sampling is accounted as m of all N clients; use sampling='poisson' to tolerate dropouts"
        )
        return wait_for_clients(self.grid, needed, why, self.wait_timeout)

    def state(self, num_clients: int) -> tuple[dict, dict]:
        """What a checkpoint must hold to continue exactly where this federation is: plain JSON values
        and the arrays they name (server_app/run_state.py; nothing is pickled)."""
        return run_state.federation_to_plain(
            self.strategy, self.privacy, self.eval_sampler, self.tally, self.identities, num_clients
        )

    def _instructions(self, server_round: int) -> ConfigRecord:
        # The DP wrapper adds the round's clip norm to the train instructions (client-side clipping).
        return RoundInstructions(server_round, self.num_features, self.num_classes, scaling=self.scaling).to_record()

    def run(self, arrays: ArrayRecord, num_rounds: int, first_round: int = 1,
            on_round_end: Callable[[int, ArrayRecord], None] | None = None) -> tuple[ArrayRecord, str]:
        """Train rounds ``first_round..num_rounds``, until the budget stop, a failure, or until clients
        are missing for longer than the wait limit; return the model of the last COMPLETED round (never
        a half-done round's: every file of a stopped run describes the same round) and why it stopped.
        ``self.stopped`` says how (:class:`Stop`). ``on_round_end(round, model)`` runs after every
        round, before the round is published (e.g. to save a checkpoint)."""
        waking = time.monotonic()
        # Part of start-up, not of round 1: asks every client its identity, which also wakes
        # cold clients (process or worker start, imports, data) before the first round is timed.
        try:
            ready = len(self.connected_clients())
        except WaitTimeout as stop:  # e.g. a resume with the clients gone: stop cleanly, results kept
            return arrays, self._stop("clients", f"stopped before round {first_round}: {stop}")
        log(INFO, "%d clients ready in %.1f s", ready, time.monotonic() - waking)
        progress = Progress(num_rounds, first_round - 1)  # timed from round 1, not from start-up
        for server_round in range(first_round, num_rounds + 1):
            ledger = self.privacy.ledger
            if ledger is not None and self.max_epsilon and ledger.epsilon_if_step() > self.max_epsilon:
                reason = (
                    f"budget stop before round {server_round}: it would raise epsilon from "
                    f"{ledger.epsilon():.3f} to {ledger.epsilon_if_step():.3f} > max-epsilon {self.max_epsilon}"
                )
                return arrays, self._stop("budget", reason)
            started = time.monotonic()
            self.round_counts = None
            try:
                new_arrays, row = self.train_round(server_round, arrays)
                if self.federated_evaluation:
                    row |= self.evaluate_round(server_round, new_arrays)
            except WaitTimeout as stop:
                return arrays, self._stop("clients", f"stopped before finishing round {server_round}: {stop}", server_round)
            except BudgetSpent as stop:
                return arrays, self._stop("budget", f"budget stop in round {server_round}: {stop}", server_round)
            except Diverged as stop:
                self.health.diverged(server_round, str(stop))
                return arrays, self._stop("failed", f"stopped before finishing round {server_round}: {stop}", server_round)
            except RoundFailed as failure:
                return arrays, self._stop("failed", str(failure), server_round, failure)
            row |= self.diagnostics.counts(server_round, self.round_counts or {})
            central = self.central_eval(new_arrays)
            row["central_loss"], row["central_accuracy"] = central.loss, central.accuracy
            problems = self.health.check(server_round, central.loss, row.get("train_loss"), central.predicted_classes)
            row["round"] = server_round
            row["seconds"] = round(time.monotonic() - started, 3)
            # Checkpoint (with the secret noise state) before anything of the round is published:
            # a resume after a crash in between re-runs the round with the same noise stream, and
            # that is safe only if nothing of the first attempt was released.
            self.recorder.add_round(row | self.privacy_fields(), publish=False)
            if on_round_end is not None:
                on_round_end(server_round, new_arrays)
            arrays = new_arrays
            self.recorder.publish()
            line = progress.line(server_round, row["central_accuracy"], row["central_loss"], self.privacy_fields())
            say(line + "".join(f"  WARNING {kind}" for kind in problems))
        return arrays, self._stop("completed", f"completed {num_rounds} rounds")

    def _stop(self, kind: str, reason: str, interrupted_round: int | None = None,
              error: RoundFailed | None = None) -> str:
        """Record how the run ended; a round that did not finish keeps its exact counts (without DP in
        summary.json, with DP only in the operator's 0600 diagnostics.jsonl), never a metrics row."""
        if kind != "completed":
            say(reason)
        interrupted = None
        if interrupted_round is not None:
            interrupted = {"round": interrupted_round}
            if self.round_counts is not None:
                flag = {"interrupted": True} if self.diagnostics.private else {}
                interrupted |= self.diagnostics.counts(interrupted_round, self.round_counts | flag)
        self.stopped = Stop(kind, reason, interrupted, error)
        return reason

    def privacy_fields(self) -> dict:
        """The per-round privacy columns (null where a figure does not apply)."""
        ledger = self.privacy.ledger
        tally = self.tally
        return {
            "epsilon": ledger.epsilon() if ledger is not None else tally.local_epsilon_max,
            "sample_epsilon_max": tally.sample_epsilon_max,
            "noise_multiplier": self.privacy.noise_multiplier if ledger is not None else tally.reported_noise,
            "clipping_norm": tally.clipping_norm,
        }

    def node_of(self, reply: Message) -> int:
        """The node a reply is about. For a node that left, Flower's SuperLink answers with an error
        of its own (source: the SuperLink's id); the instruction it answers names the node."""
        return self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _exchange(self, server_round: int, messages) -> tuple[list[Message], list[Message]]:
        messages = list(messages)
        received = send_and_receive(self.grid, messages, REPLY_TIMEOUT)
        # Flower's grids set each pushed message's id on the message itself.
        self._sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        replies = sorted(  # a fixed order (by client identity) makes aggregation bit-reproducible
            received, key=lambda m: (self.identities.get(self.node_of(m), ""), self.node_of(m))
        )
        failures = [m for m in replies if m.has_error()]
        for message in failures:
            self.diagnostics.event(server_round, f"client {self.node_of(message)} failed: {message.error.reason}")
        return replies, failures

    def _refusals(self, server_round: int, replies: list[Message]) -> list[Message]:
        refused = [m for m in replies if not m.has_error() and reported(m, REFUSED)]
        for message in refused:
            reason = _refusal_reason(message)
            self.diagnostics.event(server_round, f"client {self.node_of(message)} refused to train: {reason}")
        return refused

    def _valid(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> list[Message]:
        reference = arrays_from_record(arrays)
        valid = []
        for message in replies:
            problem = reply_problem(message, reference)
            if problem is None:
                valid.append(message)
            else:
                self.diagnostics.event(
                    server_round, f"rejected the update of client {self.node_of(message)}: {problem}"
                )
        return valid

    def train_round(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        chosen = self.privacy.sampler.sample(self.connected_clients())
        messages = list(
            self.strategy.configure_train(server_round, arrays, self._instructions(server_round), offered(chosen))
        )
        replies, failures = self._exchange(server_round, messages)
        refused = self._refusals(server_round, replies)
        answered = [m for m in replies if not m.has_error() and m not in refused]
        usable = self._valid(server_round, answered, arrays)
        self.tally.collect(usable)
        counts = {
            "num_replies": len(usable),
            "num_failures": len(failures),
            "num_refused": len(refused),
            "num_invalid": len(answered) - len(usable),
        }
        self.round_counts = counts  # filed by run(): with the round's row, or as the interrupted round
        row = {"train_loss": _mean_metric(usable, TRAIN_LOSS)}
        # User-level DP releases noise even from a round with no usable update (an empty Poisson
        # round, or every sampled client gone): the ledger is charged and the run goes on.
        if not usable and self.privacy.mechanism is None:
            raise self._no_update(server_round, messages, failures, refused, answered)
        new_arrays, metrics = self.strategy.aggregate_train(server_round, usable)
        if metrics is not None and DP_NUM_CLIPPED in metrics:
            counts |= self._release_counts(server_round, metrics)
        if new_arrays is None:
            raise RoundFailed(
                f"round {server_round}: {type(self.strategy).__name__} produced no aggregate from "
                f"{len(usable)} updates (see its log line above)"
            )
        return _finite(server_round, _with_dtypes_of(arrays, new_arrays)), row

    def _no_update(self, server_round: int, messages: list[Message], failures: list[Message],
                   refused: list[Message], answered: list[Message]) -> RuntimeError:
        """Why a round without differential privacy got no update to aggregate."""
        if answered and not refused:
            return Diverged(f"every update of round {server_round} was malformed (see the rejections above)")
        if refused and not failures and not answered and all(
            _refusal_reason(m).startswith(BUDGET_REFUSAL) for m in refused
        ):
            return BudgetSpent("every sampled client's own privacy budget (its max-epsilon) is spent")
        reasons = "; ".join(sorted({str(m.error.reason) for m in failures})) or (
            ("all refused: each client's reason is in "
             + ("diagnostics.jsonl (operator-only)" if self.diagnostics.private else "the log above")
             + "; e.g. its privacy budget or its own policy")
            if refused else "no clients sampled"
        )
        # A DP run publishes no exact count, the number sampled included.
        nobody = "no sampled client" if self.diagnostics.private else f"none of {len(messages)} sampled clients"
        return RoundFailed(f"round {server_round}: {nobody} returned an update ({reasons})")

    def _release_counts(self, server_round: int, metrics: MetricRecord) -> dict:
        """File what the DP wrapper reports of its release: the clip norm (released) in the tally,
        the exact clipped and rejected counts (private) for the operator's diagnostics only."""
        tally = self.tally
        clip, clipped, rejected = (metric(metrics, key) for key in (DP_CLIPPING_NORM, DP_NUM_CLIPPED, DP_NUM_REJECTED))
        if clip is None or clipped is None or rejected is None:
            raise TypeError(f"the DP strategy reported non-numeric figures: {dict(metrics)}")
        tally.clipping_norm, tally.num_clipped, tally.num_rejected = clip, int(clipped), int(rejected)
        if tally.num_rejected:
            self.diagnostics.event(
                server_round, f"round {server_round}: {tally.num_rejected} update(s) exceeded the clip norm and were rejected"
            )
        return {"num_clipped": tally.num_clipped, "num_rejected": tally.num_rejected}

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> dict:
        chosen = self.eval_sampler.sample(self.connected_clients())
        messages = self.strategy.configure_evaluate(
            server_round, arrays, self._instructions(server_round), offered(chosen)
        )
        replies, _ = self._exchange(server_round, messages)
        # A client with no validation split (e.g. 1-2 examples each) weighs 0: Flower's weighted mean
        # of only such replies divides by zero, so they are left out; with none left there is no figure.
        weighed = [m for m in replies if m.has_error() or (reported(m, NUM_EXAMPLES) or 0) > 0]
        if not any(not m.has_error() for m in weighed):
            return {"federated_loss": None, "federated_accuracy": None}
        metrics = self.strategy.aggregate_evaluate(server_round, weighed)
        return {"federated_loss": metric(metrics, EVAL_LOSS), "federated_accuracy": metric(metrics, EVAL_ACCURACY)}


def _finite(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """The new global model, unless it holds NaN/Inf (then the run stops, keeping the last good one)."""
    bad = [name for name, array in arrays.items() if not np.all(np.isfinite(array.numpy()))]
    if bad:
        raise Diverged(
            f"the aggregate of round {server_round} has NaN/Inf in {bad[:3]}; the strategy could not "
            "withstand these updates (try a robust strategy, a smaller learning rate, or clipping)"
        )
    return arrays


def _with_dtypes_of(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """The global model keeps its dtypes: FedAdam/FedYogi/FedAdagrad's numpy step returns
    float64 arrays, which the float32 model (and the reply check) would otherwise inherit."""
    expected = {name: array.dtype for name, array in reference.items()}
    if all(arrays[name].dtype == dtype for name, dtype in expected.items()):
        return arrays
    values = arrays_from_record(arrays)
    return record_from_arrays({name: values[name].astype(dtype) for name, dtype in expected.items()})


def _mean_metric(replies: list[Message], key: str) -> float | None:
    """Example-weighted mean of a client metric (None when no reply carries it)."""
    pairs = [(value, reported(m, NUM_EXAMPLES) or 0.0) for m in replies if (value := reported(m, key)) is not None]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    value = sum(v * w for v, w in pairs) / total
    return value if math.isfinite(value) else None
