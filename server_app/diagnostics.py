"""Exact counts and per-client events, kept away from what a DP run releases.

How many sampled clients replied, were clipped, rejected, refused or failed are exact
statistics of private data (each has sensitivity 1; in a Poisson round the number of replies
reveals |S_t|, and a failure reveals that a client was sampled). The guarantee does not cover
them, so in a DP mode they go to ``diagnostics.jsonl`` in the output directory, created with
mode 0600 (operator-only, as secret as the unnoised aggregate), and never to ``metrics.*``,
``summary.json``, the plots or the log. Without DP they are ordinary columns and log lines.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from logging import WARNING
from typing import Iterator

from flwr.common.logger import log

DIAGNOSTICS_FILE = "diagnostics.jsonl"
# Flower's strategies log how many nodes they sampled and how many replied, e.g.
# "configure_train: Sampled 3 nodes (out of 10)": in a DP mode that is |S_t| itself.
FLOWER_COUNT_LINES = ("configure_train:", "aggregate_train:", "configure_evaluate:", "aggregate_evaluate:")


def open_private(path: str, flags: int) -> int:
    """Open ``path`` readable by its owner only (0600), also when it already existed."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class Diagnostics:
    def __init__(self, output_dir: str, private: bool):
        self.private = private
        self.path = os.path.join(output_dir, DIAGNOSTICS_FILE)

    def _append(self, record: dict) -> None:
        fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def event(self, server_round: int, text: str) -> None:
        """A per-client event (failure, refusal, rejected update): the log, or the private file."""
        if self.private:
            self._append({"round": server_round, "event": text})
        else:
            log(WARNING, "%s", text)

    def counts(self, server_round: int, counts: dict) -> dict:
        """The round's exact counts: returned as metric columns without DP, filed privately with DP."""
        if not self.private:
            return counts
        self._append({"round": server_round} | counts)
        return {}

    @contextmanager
    def flower_counts_diverted(self) -> Iterator[None]:
        """In a DP mode, Flower's own count lines go to the private file instead of the log."""
        if not self.private:
            yield
            return

        class Divert(logging.Filter):
            def filter(inner, record: logging.LogRecord) -> bool:
                text = record.getMessage()
                if text.startswith(FLOWER_COUNT_LINES):
                    self._append({"flower": text})
                    return False
                return True

        divert = Divert()
        logger = logging.getLogger("flwr")
        logger.addFilter(divert)
        try:
            yield
        finally:
            logger.removeFilter(divert)

