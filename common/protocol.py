"""What server and clients say to each other beyond Flower's own keys.

The server puts :class:`RoundInstructions` into every message's ConfigRecord; clients reply
with the metric names below. Keeping the keys here keeps both sides in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, ConfigRecordValues, MetricRecord

from common.data.scaling import FeatureScaling

CLIENT_ID = "client-id"  # a client's stable identity (of its data), answered to an "identify" query
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
TRAIN_LOSS = "train_loss"  # also the key QFedAvg reads
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_acc"
UNCLIPPED = "unclipped"  # client-side clipping: 1 if the update was within the clip norm
SAMPLE_EPSILON = "sample_epsilon"  # dpsgd: this client's cumulative sample-level epsilon
LOCAL_EPSILON = "local_epsilon"  # local DP: this client's cumulative epsilon
NOISE_MULTIPLIER = "noise_multiplier"  # dpsgd/local: the noise multiplier this client used
REFUSED = "refused"  # 1 if the client refused (its privacy policy or budget forbids the request)
DEBUG_NOISE = "debug-noise"  # 1 if a dpsgd/local client's noise came from a debug key: no guarantee


@dataclass(frozen=True)
class RoundInstructions:
    server_round: int
    num_features: int
    num_classes: int
    proximal_mu: float = 0.0
    clipping_norm: float = 0.0  # client-side clipping: the norm to clip this round's update to
    scaling: FeatureScaling | None = None  # users' tables: standardise with the server's held-out statistics

    def to_record(self) -> ConfigRecord:
        record: dict[str, ConfigRecordValues] = {
            "server-round": self.server_round,
            "num-features": self.num_features,
            "num-classes": self.num_classes,
            "clipping-norm": self.clipping_norm,
        }
        if self.scaling is not None:
            record |= {"feature-shift": list(self.scaling.shift), "feature-scale": list(self.scaling.scale)}
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "RoundInstructions":
        # FedProx adds "proximal-mu" to the config it sends; other strategies do not.
        return cls(
            server_round=int(_number(record, "server-round")),
            num_features=int(_number(record, "num-features")),
            num_classes=int(_number(record, "num-classes")),
            proximal_mu=_number(record, "proximal-mu", 0.0),
            clipping_norm=_number(record, "clipping-norm", 0.0),
            scaling=(
                FeatureScaling(_numbers(record, "feature-shift"), _numbers(record, "feature-scale"))
                if "feature-shift" in record else None
            ),
        )


def _number(record: ConfigRecord, key: str, default: float | None = None) -> float:
    """The scalar ``key`` (``default`` when absent and one is given; else a KeyError)."""
    value = record[key] if default is None else record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"round instructions: {key!r} must be a number, got {value!r}")
    return float(value)


def _numbers(record: ConfigRecord, key: str) -> tuple[float, ...]:
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"round instructions: {key!r} must be a list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def eval_metrics(num_examples: int, loss: float, accuracy: float) -> MetricRecord:
    return MetricRecord({NUM_EXAMPLES: num_examples, EVAL_LOSS: loss, EVAL_ACCURACY: accuracy})
