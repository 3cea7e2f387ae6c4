"""Check a client's reply before it can touch the global model.

A reply is rejected (logged with the client's node id and counted, the round goes on with
the rest) when its arrays are missing, named differently, shaped or typed differently from
the global model, or contain NaN/Inf. Norms are bounded elsewhere: by clipping in the DP
modes (server_app/user_level_dp.py rejects client-clipped updates beyond the norm).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from common.protocol import NUM_EXAMPLES


def reply_problem(message: Message, reference: dict[str, np.ndarray]) -> str | None:
    """Why this train reply is unusable, or None when it is well-formed."""
    content = message.content
    if "arrays" not in content.array_records:
        return "the reply has no 'arrays' record"
    if "metrics" not in content.metric_records or NUM_EXAMPLES not in content["metrics"]:
        return f"the reply has no '{NUM_EXAMPLES}' metric"
    arrays = content.array_records["arrays"]
    num_examples = content.metric_records["metrics"][NUM_EXAMPLES]
    missing = sorted(set(reference) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(reference))
    if missing or extra:
        return f"array names differ from the model's (missing {missing}, extra {extra})"
    for name, expected in reference.items():
        value = arrays[name].numpy()
        if value.shape != expected.shape or value.dtype != expected.dtype:
            return (
                f"array {name!r} is {value.dtype}{list(value.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        if not np.all(np.isfinite(value)):
            return f"array {name!r} contains NaN or Inf"
    if isinstance(num_examples, list) or not num_examples > 0:
        return f"'{NUM_EXAMPLES}' must be a positive number"
    return None
