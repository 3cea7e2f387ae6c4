"""One DP federation on Flower's real simulation runtime (Ray), judged by the files it writes.

Behaviour is tested in process (tests/test_federation.py, tests/test_privacy_modes.py,
tests/test_byzantine.py); this checks what only the real runtime does: ClientApps in Ray actors,
each node's Context (here DP-SGD's privacy ledger) carried between rounds by Flower's NodeState
and serialized on the way, and the app loaded from its directory with the fused run config.
"""

import pytest
from run_outputs import check_outputs
from simulation import run_app

pytestmark = pytest.mark.e2e

NUM_CLIENTS = 3  # each DP-SGD client solves its noise multiplier with Opacus in every round (~2-4 s)
ROUNDS = 2
TARGET_EPSILON = 8.0


def test_a_dpsgd_federation_learns_and_keeps_each_clients_ledger_across_rounds(tmp_path):
    overrides = {"output-dir": str(tmp_path), "num-server-rounds": ROUNDS, "local-epochs": 1, "dp": "dpsgd",
                 "target-epsilon": TARGET_EPSILON, "clipping-norm": 1.0, "learning-rate": 0.2}
    metrics, summary = check_outputs(run_app(overrides, num_clients=NUM_CLIENTS), rounds=ROUNDS, num_clients=None)
    assert summary["final_central_accuracy"] > 0.2, [r["central_accuracy"] for r in metrics]
    # Each client's ledger lives in its Context: had the runtime lost it between rounds, epsilon
    # would restart at one round's worth instead of growing to the calibrated target.
    epsilons = [row["sample_epsilon_max"] for row in metrics]
    assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    assert len(set(epsilons)) == ROUNDS and epsilons[-1] <= TARGET_EPSILON
    assert epsilons[-1] == pytest.approx(TARGET_EPSILON, rel=0.05)  # calibrated for every planned round
    assert summary["sample_epsilon_max"] == epsilons[-1] and f"{epsilons[-1]:.3f}" in summary["guarantee"]
    assert (tmp_path / "privacy.png").stat().st_size > 0
