"""What server and clients say to each other beyond Flower's own keys.

The server puts :class:`RoundInstructions` into every message's ConfigRecord; clients reply
with the metric names below. Keeping the keys here keeps both sides in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord

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
        record = {
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
            server_round=int(record["server-round"]),
            num_features=int(record["num-features"]),
            num_classes=int(record["num-classes"]),
            proximal_mu=float(record.get("proximal-mu", 0.0)),
            clipping_norm=float(record.get("clipping-norm", 0.0)),
            scaling=(
                FeatureScaling(tuple(record["feature-shift"]), tuple(record["feature-scale"]))
                if "feature-shift" in record else None
            ),
        )


def eval_metrics(num_examples: int, loss: float, accuracy: float) -> MetricRecord:
    return MetricRecord({NUM_EXAMPLES: num_examples, EVAL_LOSS: loss, EVAL_ACCURACY: accuracy})
