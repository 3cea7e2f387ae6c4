"""The run's status lines, for the person or the launcher watching the ServerApp: one channel.

Progress, results, the privacy guarantee, warnings and the closing ``fl-dp stop-kind: <kind>``
line are the ServerApp's answer to its user. They go to standard output as plain lines, flushed
at once, because launchers read them verbatim in every runtime (``flwr log``, docker logs) and a
logging prefix or level filter must not change them. Events about the runtime itself (waiting for
clients, the calibrated noise, Flower's own counts) go through Flower's logger, like Flower's.
"""

from __future__ import annotations


def say(line: str) -> None:
    """Write one status line now (not buffered: a run may be killed right after it)."""
    print(line, flush=True)
