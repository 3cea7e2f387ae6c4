"""Send messages to clients and collect their replies, polling with a short back-off.

Flower 1.41's ``Grid.send_and_receive`` sleeps a fixed interval between reply pulls: 3 s in
deployment (``flwr/superlink/grid/http_grid.py``) and 0.1 s in simulation
(``inmemory_grid.py``). A reply that arrives just after a pull waits the whole interval, so
a deployment round waits ~1.5 s on average for nothing, and a simulated round of a small model
spends a large share of its time asleep. This does the same with Flower's public
``push_messages``/``pull_messages``, pulling after 5 ms and backing off to at most 0.5 s: quick
replies are collected at once, and a long round still costs the SuperLink only two pulls a
second.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_PULL_AFTER = 0.005  # seconds
BACKOFF = 1.5
LONGEST_PULL_INTERVAL = 0.5


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_PULL_AFTER
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * BACKOFF, LONGEST_PULL_INTERVAL)
    return replies
