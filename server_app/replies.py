"""Reading the numbers clients report in their replies' ``metrics`` record.

Clients are not trusted to send well-typed records: a missing key or a value that is not a
number reads as None, and each caller says what None means for it (a default, or "not reported").
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord


def metric(record: MetricRecord | None, key: str) -> float | None:
    """``record[key]`` as a float, or None when the record or the key is missing or not a number."""
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def reported(reply: Message, key: str) -> float | None:
    """A number a client reported in its reply's metrics (None when it did not)."""
    return metric(reply.content.metric_records.get("metrics"), key)
