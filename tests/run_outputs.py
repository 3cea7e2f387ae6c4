"""What every finished run must have written, checked the same way for a run in process
(tests/inprocess.py) and one on Flower's simulation runtime (tests/simulation.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from common.models import build_model

EXPECTED_FILES = ["config.json", "metrics.csv", "metrics.json", "summary.json", "model.pt", "accuracy.png"]
ROW_FIELDS = {
    "round", "central_loss", "central_accuracy", "federated_loss", "federated_accuracy",
    "train_loss", "num_replies", "seconds",
}
CHANCE = 0.1  # ten balanced digit classes


def read_results(output_dir: Path) -> tuple[list[dict], dict]:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    summary = json.loads((output_dir / "summary.json").read_text())
    return metrics, summary


def check_outputs(output_dir: Path, rounds: int, num_clients: int | None) -> tuple[list[dict], dict]:
    """The files of a run that completed ``rounds`` rounds; ``num_clients``: the replies every round
    must have had, none failed (None: a DP run, which releases no exact counts: they are null)."""
    for name in EXPECTED_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    metrics, summary = read_results(output_dir)
    assert [row["round"] for row in metrics] == list(range(1, rounds + 1))
    for row in metrics:
        assert ROW_FIELDS <= set(row)
        if num_clients is None:
            assert row["num_replies"] is None and row["num_failures"] is None, row
        else:
            assert row["num_replies"] == num_clients and row["num_failures"] == 0, row
    with open(output_dir / "metrics.csv") as handle:
        assert [int(r["round"]) for r in csv.DictReader(handle)] == list(range(1, rounds + 1))
    assert summary["rounds"] == rounds and summary["wall_seconds"] > 0
    assert summary["final_central_accuracy"] == metrics[-1]["central_accuracy"]
    assert summary["best_central_accuracy"] == max(r["central_accuracy"] for r in metrics)
    config = json.loads((output_dir / "config.json").read_text())
    model = build_model(config["model"], 64, 10)
    model.load_state_dict(torch.load(output_dir / "model.pt"))  # a plain state dict
    return metrics, summary
