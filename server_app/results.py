"""Everything a run leaves behind, written as it happens so a crash loses at most one round.

``config.json`` at start; ``metrics.csv``/``metrics.json`` rewritten after every round;
``summary.json``, ``model.pt`` and ``accuracy.png`` at the end. Every file is written to a
temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

import torch

METRIC_COLUMNS = [
    "round",
    "central_loss",
    "central_accuracy",
    "federated_loss",
    "federated_accuracy",
    "train_loss",
    "num_replies",
    "num_failures",
    "num_refused",
    "num_invalid",
    "seconds",
    "epsilon",
    "sample_epsilon_max",
    "delta",
    "noise_multiplier",
    "clipping_norm",
    "accountant",
    "sampling",
    "neighbouring_relation",
]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write(path: str, data: bytes) -> None:
    partial_path = f"{path}.tmp"
    with open(partial_path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial_path, path)


def write_json(path: str, document: Any) -> None:
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode())


class RunRecorder:
    """Collects one row per round and keeps the results directory up to date."""

    def __init__(self, output_dir: str, config: dict[str, Any]):
        self.output_dir = output_dir
        self.rows: list[dict[str, Any]] = []
        self.constant_columns: dict[str, Any] = {}  # the same in every row (e.g. delta, accountant)
        os.makedirs(output_dir, exist_ok=True)
        write_json(self.path("config.json"), config)

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def add_round(self, row: dict[str, Any], publish: bool = True) -> None:
        """Record a round; ``publish=False`` holds it back (until :meth:`publish`), e.g. until the
        checkpoint that covers it is on disk."""
        row = row | self.constant_columns
        self.rows.append({key: _json_safe(row.get(key)) for key in METRIC_COLUMNS} | {
            key: _json_safe(value) for key, value in row.items() if key not in METRIC_COLUMNS
        })
        if publish:
            self.publish()

    def publish(self) -> None:
        self._write_metrics()

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue a resumed run's history."""
        self.rows = list(rows)
        self._write_metrics()

    def _write_metrics(self) -> None:
        write_json(self.path("metrics.json"), self.rows)
        self._write_csv()

    def _write_csv(self) -> None:
        columns = list(self.rows[0]) if self.rows else METRIC_COLUMNS
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
        atomic_write(self.path("metrics.csv"), buffer.getvalue().encode())

    def finish(self, state_dict: dict[str, torch.Tensor], wall_seconds: float, extra: dict[str, Any]) -> dict:
        accuracies = [r["central_accuracy"] for r in self.rows if r["central_accuracy"] is not None]
        summary = {
            "final_central_accuracy": accuracies[-1] if accuracies else None,
            "best_central_accuracy": max(accuracies) if accuracies else None,
            "rounds": len(self.rows),
            "wall_seconds": round(wall_seconds, 3),
            "output_dir": self.output_dir,
        } | extra
        self._write_metrics()  # also when no round ran: an empty history, not a missing file
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write(self.path("model.pt"), buffer.getvalue())
        if self.rows:
            self.plot_accuracy()
            if any(r["epsilon"] is not None or r["sample_epsilon_max"] is not None for r in self.rows):
                self.plot_privacy()
        write_json(self.path("summary.json"), summary)
        return summary

    def plot_accuracy(self) -> None:
        rounds = [r["round"] for r in self.rows]
        with _figure(self.path("accuracy.png")) as ax:
            for key, label in (("central_accuracy", "central (held-out)"), ("federated_accuracy", "federated (clients' val)")):
                ax.plot(rounds, [_nan(r[key]) for r in self.rows], marker="o", label=label)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(_whole_rounds())
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1)
            ax.legend()

    def plot_privacy(self) -> None:
        """Epsilon spent so far (left axis) and central accuracy (right axis) against rounds."""
        key = "epsilon" if any(r["epsilon"] is not None for r in self.rows) else "sample_epsilon_max"
        rounds = [r["round"] for r in self.rows]
        with _figure(self.path("privacy.png")) as ax:
            ax.plot(rounds, [_nan(r[key]) for r in self.rows], marker="o", color="tab:red", label=key)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(_whole_rounds())
            ax.set_ylabel(f"{key} (delta {self.rows[0]['delta']})", color="tab:red")
            right = ax.twinx()
            right.plot(rounds, [_nan(r["central_accuracy"]) for r in self.rows], marker="s", label="central accuracy")
            right.set_ylabel("central accuracy")
            right.set_ylim(0, 1)


def _whole_rounds():
    """Round ticks at whole numbers only (a 3-round run showed 1.5 and 2.5)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _nan(value: Any) -> float:
    return float("nan") if value is None else value


class _figure:
    """A matplotlib figure (Agg, no display) saved atomically to ``path`` on exit."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.fig, ax = plt.subplots(figsize=(6, 4))
        ax.grid(alpha=0.3)
        return ax

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.fig.tight_layout()
            partial_path = self.path[:-4] + ".tmp.png"
            self.fig.savefig(partial_path, dpi=100)
            os.replace(partial_path, self.path)
        self.plt.close(self.fig)
