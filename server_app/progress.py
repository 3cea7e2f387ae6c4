"""One line per round: where the run is, how good the model is, and how long is left."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total_rounds: int, rounds_done_before: int = 0):
        self.total_rounds = total_rounds
        self.rounds_done_before = rounds_done_before  # a resumed run: ETA from this session's pace
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, server_round: int, accuracy: float | None, loss: float | None, privacy: dict | None = None) -> str:
        elapsed = self.elapsed()
        eta = elapsed / (server_round - self.rounds_done_before) * (self.total_rounds - server_round)
        acc = "n/a" if accuracy is None else f"{accuracy:.4f}"
        los = "n/a" if loss is None else f"{loss:.4f}"
        text = (
            f"round {server_round}/{self.total_rounds}  central accuracy {acc}  loss {los}  "
            f"elapsed {elapsed:.1f}s  ETA {eta:.1f}s"
        )
        for key, label in (("epsilon", "epsilon"), ("sample_epsilon_max", "sample epsilon (max)")):
            if privacy and privacy.get(key) is not None:
                text += f"  {label} {privacy[key]:.3f}"
        return text
