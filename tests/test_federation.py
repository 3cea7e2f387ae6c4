"""Whole federations of the real ServerApp and ClientApp, in process (tests/inprocess.py, no Ray),
judged by the files they write: every strategy, a non-IID split, a ClientApp that fails.

The same runs on Flower's simulation runtime took ~15-30 s each; the harness releases the same
model bit for bit (tests/test_inprocess.py), so the real runtime is left to the few e2e tests
(tests/test_simulation_e2e.py, tests/test_flwr_run.py, tests/test_deployment.py, ...).
"""

import numpy as np
import pytest
from inprocess import run_inprocess
from run_outputs import CHANCE, check_outputs

from common.names import STRATEGIES
from server_app.federation import RoundFailed

pytestmark = pytest.mark.usefixtures("frozen_heap")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_completes_two_rounds(tmp_path, strategy):
    overrides = {"output-dir": str(tmp_path), "strategy": strategy, "num-server-rounds": 2, "local-epochs": 2}
    if strategy in ("fedadam", "fedyogi", "fedadagrad"):
        overrides["server-learning-rate"] = 0.1
    metrics, summary = check_outputs(run_inprocess(overrides, num_clients=10), rounds=2, num_clients=10)
    assert summary["final_central_accuracy"] > CHANCE + 0.1, metrics
    if strategy in ("fedavg", "fedprox", "fedadam", "fedmedian"):
        assert summary["final_central_accuracy"] > 0.6, metrics
        assert metrics[-1]["central_loss"] < metrics[0]["central_loss"]


def test_non_iid_dirichlet_completes_and_reports(tmp_path):
    overrides = {"output-dir": str(tmp_path), "partitioner": "dirichlet", "dirichlet-alpha": 0.3,
                 "num-server-rounds": 3, "clients-per-round": 5}
    metrics, summary = check_outputs(run_inprocess(overrides, num_clients=10), rounds=3, num_clients=5)
    assert summary["final_central_accuracy"] > CHANCE + 0.2


def test_a_failing_client_app_fails_the_run(tmp_path):
    """Clients without data crash; the run must stop with their reason, not aggregate nothing."""
    central = tmp_path / "central.npz"
    np.savez(central, x=np.zeros((5, 64), dtype=np.float32), y=np.arange(5))
    overrides = {"output-dir": str(tmp_path / "out"), "dataset": "file", "central-data-path": str(central),
                 "num-server-rounds": 2}
    with pytest.raises(RoundFailed) as error:
        run_inprocess(overrides, num_clients=3)
    assert "none of 3 sampled clients returned an update" in str(error.value)
    assert "has no demo partitions" in str(error.value)
