"""End-to-end federations on Flower's real simulation runtime, judged by the files they write."""

import csv
import json

import pytest
import torch

from common.models import build_model
from common.names import STRATEGIES
from simulation import read_results, run_app

pytestmark = pytest.mark.e2e

EXPECTED_FILES = ["config.json", "metrics.csv", "metrics.json", "summary.json", "model.pt", "accuracy.png"]
ROW_FIELDS = {
    "round", "central_loss", "central_accuracy", "federated_loss", "federated_accuracy",
    "train_loss", "num_replies", "seconds",
}
CHANCE = 0.1  # ten balanced digit classes


def check_outputs(output_dir, rounds, num_clients):
    for name in EXPECTED_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    metrics, summary = read_results(output_dir)
    assert [row["round"] for row in metrics] == list(range(1, rounds + 1))
    for row in metrics:
        assert ROW_FIELDS <= set(row)
        assert row["num_replies"] == num_clients and row["num_failures"] == 0
    with open(output_dir / "metrics.csv") as handle:
        assert [int(r["round"]) for r in csv.DictReader(handle)] == list(range(1, rounds + 1))
    assert summary["rounds"] == rounds and summary["wall_seconds"] > 0
    assert summary["final_central_accuracy"] == metrics[-1]["central_accuracy"]
    assert summary["best_central_accuracy"] == max(r["central_accuracy"] for r in metrics)
    config = json.loads((output_dir / "config.json").read_text())
    model = build_model(config["model"], 64, 10)
    model.load_state_dict(torch.load(output_dir / "model.pt"))  # a plain state dict
    return metrics, summary


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_completes_two_rounds(tmp_path, strategy):
    overrides = {"output-dir": str(tmp_path), "strategy": strategy, "num-server-rounds": 2, "local-epochs": 2}
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        overrides["server-learning-rate"] = 0.1
    metrics, summary = check_outputs(run_app(overrides, num_clients=10), rounds=2, num_clients=10)
    assert summary["final_central_accuracy"] > CHANCE + 0.1, metrics
    if strategy in ("fedavg", "fedprox", "fedadam", "fedmedian"):
        assert summary["final_central_accuracy"] > 0.6, metrics
        assert metrics[-1]["central_loss"] < metrics[0]["central_loss"]


def test_non_iid_dirichlet_completes_and_reports(tmp_path):
    overrides = {"output-dir": str(tmp_path), "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
                 "num-server-rounds": 3, "clients-per-round": 5}
    metrics, summary = check_outputs(run_app(overrides, num_clients=10), rounds=3, num_clients=5)
    assert summary["final_central_accuracy"] > CHANCE + 0.2


def test_a_failing_client_app_fails_the_run(tmp_path):
    """Clients without data crash; the run must stop with their reason, not aggregate nothing."""
    central = tmp_path / "central.npz"
    import numpy as np

    np.savez(central, x=np.zeros((5, 64), dtype=np.float32), y=np.arange(5))
    overrides = {"output-dir": str(tmp_path / "out"), "dataset": "file", "central-data-path": str(central),
                 "num-server-rounds": 2}
    with pytest.raises(Exception) as error:
        run_app(overrides, num_clients=3)
    assert "none of 3 sampled clients returned an update" in str(error.value)
    assert "has no demo partitions" in str(error.value)
